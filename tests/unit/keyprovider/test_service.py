"""Key-provider orchestration: KEK single flight and cache in the guest, KEK choice on the owner side."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from agent.errors import InvalidRequest, NotSupported
from agent.keyprovider import annotation, messages
from agent.keyprovider.annotation import WrapType
from agent.keyprovider.service import GuestKeyProvider

KEK = bytes(range(32))
OPTSDATA = b'{"symkey":"c2VjcmV0","digest":"","cipheroptions":{"nonce":"bm9uY2U="}}'


class FakeKbs:
    def __init__(self, keys: dict[str, bytes], delay: float = 0.02) -> None:
        self.keys = keys
        self.fetches: list[str] = []
        self.delay = delay

    async def __call__(self, kid: str) -> bytes:
        self.fetches.append(kid)
        await asyncio.sleep(self.delay)
        return self.keys[kid]


def unwrap_request(kid: str, *, kek: bytes = KEK, wrap_type: WrapType = WrapType.A256GCM) -> bytes:
    packet = annotation.wrap(kek, OPTSDATA, kid=kid, wrap_type=wrap_type)
    return messages.unwrap_request(packet.to_v1_json())


class TestGuestKeyProvider:
    async def test_parallel_layers_fetch_each_kek_once(self) -> None:
        kbs = FakeKbs({"kbs:///default/key/a": KEK, "kbs:///default/key/b": KEK[::-1]})
        provider = GuestKeyProvider(kbs)
        requests = [unwrap_request("kbs:///default/key/a") for _ in range(8)]
        requests += [
            unwrap_request("kbs:///default/key/b", kek=KEK[::-1], wrap_type=WrapType.A256CTR) for _ in range(8)
        ]
        replies = await asyncio.gather(*(provider.unwrap_key(r) for r in requests))
        assert {messages.parse_reply(r) for r in replies} == {OPTSDATA}
        assert sorted(kbs.fetches) == ["kbs:///default/key/a", "kbs:///default/key/b"]

    async def test_cache_expires(self) -> None:
        now = [0.0]
        kbs = FakeKbs({"kbs:///default/key/a": KEK}, delay=0)
        provider = GuestKeyProvider(kbs, cache_s=60, clock=lambda: now[0])
        await provider.unwrap_key(unwrap_request("kbs:///default/key/a"))
        now[0] = 59
        await provider.unwrap_key(unwrap_request("kbs:///default/key/a"))
        assert len(kbs.fetches) == 1
        now[0] = 61
        await provider.unwrap_key(unwrap_request("kbs:///default/key/a"))
        assert len(kbs.fetches) == 2

    async def test_cache_disabled_still_coalesces_concurrent_fetches(self) -> None:
        kbs = FakeKbs({"kbs:///default/key/a": KEK})
        provider = GuestKeyProvider(kbs, cache_s=0)
        await asyncio.gather(*(provider.unwrap_key(unwrap_request("kbs:///default/key/a")) for _ in range(5)))
        assert len(kbs.fetches) == 1
        await provider.unwrap_key(unwrap_request("kbs:///default/key/a"))
        assert len(kbs.fetches) == 2

    async def test_wrong_kek_length_names_no_key_material(self) -> None:
        provider = GuestKeyProvider(FakeKbs({"kbs:///default/key/a": b"short-key"}))
        with pytest.raises(InvalidRequest) as info:
            await provider.unwrap_key(unwrap_request("kbs:///default/key/a"))
        assert str(info.value) == "the key-encryption key at kbs:///default/key/a is 9 bytes, expected 32"

    async def test_tampered_packet_fails_opaquely(self) -> None:
        provider = GuestKeyProvider(FakeKbs({"kbs:///default/key/a": KEK}))
        packet = json.loads(annotation.wrap(KEK, OPTSDATA, kid="kbs:///default/key/a").to_v1_json())
        raw = bytearray(base64.b64decode(packet["wrapped_data"]))
        raw[0] ^= 1
        packet["wrapped_data"] = base64.b64encode(bytes(raw)).decode()
        with pytest.raises(InvalidRequest, match=r"^annotation packet `wrapped_data` does not authenticate under"):
            await provider.unwrap_key(messages.unwrap_request(json.dumps(packet).encode()))

    async def test_wrong_kek_fails(self) -> None:
        provider = GuestKeyProvider(FakeKbs({"kbs:///default/key/a": bytes(32)}))
        with pytest.raises(InvalidRequest, match="does not authenticate"):
            await provider.unwrap_key(unwrap_request("kbs:///default/key/a"))

    async def test_other_provider_and_wrap_requests_refused(self) -> None:
        provider = GuestKeyProvider(FakeKbs({}))
        v2 = json.dumps({"version": "0.1.0", "kid": "k", "wrapped_data": "AA==", "provider": "aliyun"}).encode()
        with pytest.raises(NotSupported, match="provider 'aliyun'"):
            await provider.unwrap_key(messages.unwrap_request(v2))
        wrap = json.dumps(
            {
                "op": "keywrap",
                "keywrapparams": {"ec": None, "optsdata": "AA=="},
                "keyunwrapparams": {"dc": None, "annotation": None},
            }
        ).encode()
        with pytest.raises(NotSupported, match="WrapKey is not served inside the guest"):
            await provider.unwrap_key(wrap)

    async def test_failed_fetch_is_shared_then_retried(self) -> None:
        calls = 0

        async def failing(kid: str) -> bytes:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            msg = "kbs down"
            raise InvalidRequest(msg)

        provider = GuestKeyProvider(failing)
        results = await asyncio.gather(
            *(provider.unwrap_key(unwrap_request("kbs:///default/key/a")) for _ in range(4)), return_exceptions=True
        )
        assert all(isinstance(r, InvalidRequest) for r in results)
        assert calls == 1
        with pytest.raises(InvalidRequest):
            await provider.unwrap_key(unwrap_request("kbs:///default/key/a"))
        assert calls == 2


def go_wrap_request(params: dict[str, list[str]], optsdata: bytes = OPTSDATA) -> bytes:
    """A keywrap request as Go ocicrypt marshals it (keyprovider.md §3.1)."""
    encoded = {name: [base64.b64encode(v.encode()).decode() for v in values] for name, values in params.items()}
    return json.dumps(
        {
            "op": "keywrap",
            "keywrapparams": {
                "ec": {"Parameters": encoded, "DecryptConfig": {"Parameters": {}}},
                "optsdata": base64.b64encode(optsdata).decode(),
            },
            "keyunwrapparams": {"dc": None, "annotation": None},
        }
    ).encode()
