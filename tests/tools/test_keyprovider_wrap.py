"""The image owner's WrapKey provider (tools distribution): wrapping, KEK storage, and what callers may ask."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cvm_tools.keyprovider.wrap import KekStore, WrapKeyProvider, parse_wrap_parameters

from agent.errors import InvalidRequest, NotSupported
from agent.keyprovider import annotation, messages
from agent.keyprovider.annotation import WrapType
from agent.keyprovider.service import GuestKeyProvider
from tests.unit.keyprovider.test_service import KEK, OPTSDATA, FakeKbs, go_wrap_request, unwrap_request


class TestWrapKeyProvider:
    async def test_fixed_kek_round_trips_with_the_guest(self) -> None:
        owner = WrapKeyProvider(kek=KEK, kid="kbs:///default/image-kek/fixed")
        reply = await owner.wrap_key(go_wrap_request({"attestation-agent": ["Enabled"]}))
        packet_bytes = messages.parse_reply(reply)
        packet = json.loads(packet_bytes)
        assert list(packet) == ["kid", "wrapped_data", "iv", "wrap_type"]
        assert packet["kid"] == "kbs:///default/image-kek/fixed"
        guest = GuestKeyProvider(FakeKbs({"kbs:///default/image-kek/fixed": KEK}))
        assert messages.parse_reply(await guest.unwrap_key(messages.unwrap_request(packet_bytes))) == OPTSDATA

    async def test_parameters_choose_kid_key_and_algorithm(self, tmp_path: Path) -> None:
        keyfile = tmp_path / "kek"
        keyfile.write_bytes(KEK)
        owner = WrapKeyProvider(keypath_dir=tmp_path)
        params = "keyid=kbs:///default/k/1::keypath=kek::algorithm=A256CTR"
        reply = await owner.wrap_key(go_wrap_request({"attestation-agent": [params], "other": ["x"]}))
        packet = json.loads(messages.parse_reply(reply))
        assert packet["kid"] == "kbs:///default/k/1"
        assert packet["wrap_type"] == "A256CTR"
        assert len(base64.b64decode(packet["iv"])) == 16

    async def test_generated_kek_is_stored_before_the_reply(self, tmp_path: Path) -> None:
        registered: dict[str, bytes] = {}

        async def register(kid: str, kek: bytes) -> None:
            registered[kid] = kek

        owner = WrapKeyProvider(store=KekStore(register=register, directory=tmp_path / "keks"))
        packet = json.loads(messages.parse_reply(await owner.wrap_key(go_wrap_request({}))))
        assert packet["kid"].startswith("kbs:///default/image-kek/")
        kek = registered[packet["kid"]]
        saved = tmp_path / "keks" / "default" / "image-kek" / packet["kid"].rsplit("/", 1)[1]
        assert saved.read_bytes() == kek
        assert saved.stat().st_mode & 0o777 == 0o600
        assert annotation.unwrap(kek, annotation.parse_packet(json.dumps(packet).encode())) == OPTSDATA

    async def test_generated_kek_with_nowhere_to_go_is_refused(self) -> None:
        with pytest.raises(InvalidRequest, match="nowhere to keep a generated one"):
            await WrapKeyProvider().wrap_key(go_wrap_request({}))

    async def test_fixed_kek_needs_a_kid(self) -> None:
        with pytest.raises(InvalidRequest, match="no kid"):
            await WrapKeyProvider(kek=KEK).wrap_key(go_wrap_request({}))

    async def test_unwrap_requests_refused(self) -> None:
        with pytest.raises(NotSupported, match="not served by the image-owner provider"):
            await WrapKeyProvider(kek=KEK, kid="kbs:///a/b/c").wrap_key(unwrap_request("kbs:///a/b/c"))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((b"Enabled",), (None, None, None)),
        ((b"keyid=kbs:///a/b/c",), ("kbs:///a/b/c", None, None)),
        ((b"keyid=kbs:///a/b/c::algorithm=A256CTR", b"keypath=/k"), ("kbs:///a/b/c", "/k", WrapType.A256CTR)),
    ],
)
def test_parse_wrap_parameters(values: tuple[bytes, ...], expected: tuple[object, object, object]) -> None:
    parsed = parse_wrap_parameters(values)
    assert (parsed.kid, parsed.keypath, parsed.algorithm) == expected


@pytest.mark.parametrize("bad", [b"keyid", b"colour=red", b"algorithm=A128GCM"])
def test_parse_wrap_parameters_rejects(bad: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_wrap_parameters((bad,))


class TestConfusedDeputy:
    """Any local process can call the provider: it must not read, probe or register what the owner did not allow."""

    @pytest.mark.parametrize("keypath", ["/etc/hostname", "../outside", "sub/../../outside", "missing", "link", "sub"])
    async def test_keypath_outside_the_allowed_dir_is_refused_alike(self, tmp_path: Path, keypath: str) -> None:
        allowed = tmp_path / "allowed"
        (allowed / "sub").mkdir(parents=True)
        (tmp_path / "outside").write_bytes(KEK)
        (allowed / "link").symlink_to(tmp_path / "outside")
        owner = WrapKeyProvider(keypath_dir=allowed)
        request = go_wrap_request({"attestation-agent": [f"keyid=kbs:///default/k/1::keypath={keypath}"]})
        with pytest.raises(InvalidRequest, match=r"^keypath= is not allowed: pass a file inside the provider's"):
            await owner.wrap_key(request)

    async def test_keypath_without_an_allowed_dir_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "kek").write_bytes(KEK)
        request = go_wrap_request({"attestation-agent": [f"keyid=kbs:///default/k/1::keypath={tmp_path / 'kek'}"]})
        with pytest.raises(InvalidRequest, match="keypath= is not allowed"):
            await WrapKeyProvider(kek=KEK, kid="kbs:///default/k/2").wrap_key(request)

    async def test_generated_kek_is_never_registered_outside_the_prefix(self, tmp_path: Path) -> None:
        registered: dict[str, bytes] = {}

        async def register(kid: str, kek: bytes) -> None:
            registered[kid] = kek

        owner = WrapKeyProvider(store=KekStore(register=register))
        request = go_wrap_request({"attestation-agent": ["keyid=kbs:///default/tls/server-key"]})
        with pytest.raises(InvalidRequest, match="outside 'kbs:///default/image-kek/'"):
            await owner.wrap_key(request)
        assert registered == {}
        inside = go_wrap_request({"attestation-agent": ["keyid=kbs:///default/image-kek/app"]})
        await owner.wrap_key(inside)
        assert list(registered) == ["kbs:///default/image-kek/app"]
