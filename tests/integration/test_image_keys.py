"""Encrypted image layers and sealed secrets end to end.

The image owner's provider wraps layer options and registers the KEK with the dev KBS through the admin API
(Ed25519 bearer JWT); the agent unwraps over gRPC after attestation, for requests shaped as Go ocicrypt and as
ocicrypt-rs send them.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cvm_tools import sign
from cvm_tools.devkbs.server import DevKbsServer
from cvm_tools.keyprovider.owner import OwnerOptions, build_provider

from agent.api._gen import api_pb2
from agent.api._gen import keyprovider_pb2 as kp
from agent.api.grpc_server import GrpcServer
from agent.api.methods import keyprovider_methods
from agent.config import ListenAddress
from agent.keyprovider import messages
from agent.keyprovider.annotation import WrapType
from agent.secrets import sealed
from tests.integration.conftest import SECRET, RunningAgent, start_agent, stop_agent
from tests.unit.keyprovider.test_service import OPTSDATA, go_wrap_request

pytestmark = pytest.mark.integration

UNWRAP = "/keyprovider.KeyProviderService/UnWrapKey"
WRAP = "/keyprovider.KeyProviderService/WrapKey"


@pytest.fixture
def admin_key(tmp_path: Path) -> Path:
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "admin.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    path = tmp_path / "admin.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


@pytest.fixture
def admin_kbs(resources: Path, admin_key: Path) -> Iterator[DevKbsServer]:
    public = (admin_key.parent / "admin.pub").read_bytes()
    with DevKbsServer(resources, admin_public_key=public) as server:
        yield server


@pytest.fixture
async def owner(admin_kbs: DevKbsServer, admin_key: Path) -> AsyncIterator[grpc.aio.Channel]:
    """The image owner's wrap-only provider on a loopback TCP port, registering generated KEKs."""
    provider = build_provider(
        OwnerOptions(
            listen=ListenAddress(host="127.0.0.1", port=1),
            kbs_url=admin_kbs.url,
            admin_key_file=str(admin_key),
        )
    )
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = GrpcServer(
        keyprovider_methods(wrap=provider.wrap_key, unwrap=None), [ListenAddress(host="127.0.0.1", port=port)]
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    await channel.close()
    await server.stop(0)


@pytest.fixture
async def guest(tmp_path: Path, admin_kbs: DevKbsServer) -> AsyncIterator[RunningAgent]:
    running = await start_agent(str(tmp_path / "guest.sock"), admin_kbs.url)
    yield running
    await stop_agent(running)


async def kp_call(channel: grpc.aio.Channel, path: str, payload: bytes) -> bytes:
    stub: Any = channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=kp.KeyProviderKeyWrapProtocolOutput.FromString,
    )
    reply = await stub(kp.KeyProviderKeyWrapProtocolInput(KeyProviderKeyWrapProtocolInput=payload), timeout=30)
    data: bytes = reply.KeyProviderKeyWrapProtocolOutput
    return data


def go_unwrap_request(annotation_b64: str) -> bytes:
    """keyunwrap as Go ocicrypt sends it (keyprovider.md §3.4)."""
    return json.dumps(
        {
            "op": "keyunwrap",
            "keywrapparams": {"ec": None, "optsdata": None},
            "keyunwrapparams": {
                "dc": {"Parameters": {"attestation-agent": ["RW5hYmxlZA=="]}},
                "annotation": annotation_b64,
            },
        }
    ).encode()


def rust_unwrap_request(packet: bytes) -> bytes:
    """keyunwrap as ocicrypt-rs sends it: null dc, annotation as base64 std text (guest-api.md §9.3)."""
    return json.dumps(
        {
            "op": "keyunwrap",
            "keywrapparams": {"ec": None, "optsdata": None},
            "keyunwrapparams": {"dc": None, "annotation": base64.b64encode(packet).decode()},
        }
    ).encode()


class TestImageLayerKeys:
    async def test_wrap_register_unwrap(
        self, owner: grpc.aio.Channel, guest: RunningAgent, admin_kbs: DevKbsServer
    ) -> None:
        reply = await kp_call(
            owner, WRAP, go_wrap_request({"attestation-agent": ["keyid=kbs:///default/image-kek/l1"]})
        )
        packet = messages.parse_reply(reply)
        assert json.loads(packet)["kid"] == "kbs:///default/image-kek/l1"
        assert admin_kbs.core.counters["registered"] == 1
        # the layer annotation is base64 of the reply's bytes; Go sends that text back on decrypt
        go_reply = json.loads(
            await kp_call(guest.channel, UNWRAP, go_unwrap_request(base64.b64encode(packet).decode()))
        )
        assert bytes(go_reply["keyunwrapresults"]["optsdata"]) == OPTSDATA
        rust_reply = json.loads(await kp_call(guest.channel, UNWRAP, rust_unwrap_request(packet)))
        assert bytes(rust_reply["keyunwrapresults"]["optsdata"]) == OPTSDATA

    async def test_parallel_layers_one_attestation_one_kek_fetch(
        self, owner: grpc.aio.Channel, guest: RunningAgent, admin_kbs: DevKbsServer
    ) -> None:
        layers = [
            messages.parse_reply(
                await kp_call(
                    owner, WRAP, go_wrap_request({"attestation-agent": ["keyid=kbs:///default/image-kek/img"]}, opts)
                )
            )
            for opts in (OPTSDATA, OPTSDATA[::-1], b"{}" + OPTSDATA)
        ]
        # three layers under one keyid share one generated KEK, registered once (no overwrite of earlier layers)
        assert admin_kbs.core.counters["registered"] == 1
        requests = [rust_unwrap_request(layers[i % 3]) for i in range(12)]
        replies = await asyncio.gather(*(kp_call(guest.channel, UNWRAP, r) for r in requests))
        assert {bytes(json.loads(r)["keyunwrapresults"]["optsdata"]) for r in replies} == {
            OPTSDATA,
            OPTSDATA[::-1],
            b"{}" + OPTSDATA,
        }
        assert admin_kbs.core.counters["auth"] == 1
        assert admin_kbs.core.counters["resource"] == 1
        assert guest.kbs.handshakes == 1

    async def test_unknown_kek_is_a_clear_error(
        self, guest: RunningAgent, owner: grpc.aio.Channel, admin_kbs: DevKbsServer
    ) -> None:
        packet = messages.parse_reply(
            await kp_call(owner, WRAP, go_wrap_request({"attestation-agent": ["keyid=kbs:///default/image-kek/x"]}))
        )
        (admin_kbs.core.resources / "default" / "image-kek" / "x").unlink()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kp_call(guest.channel, UNWRAP, rust_unwrap_request(packet))
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "PluginInternalError" in (info.value.details() or "")

    async def test_guest_refuses_wrap_and_owner_refuses_unwrap(
        self, guest: RunningAgent, owner: grpc.aio.Channel
    ) -> None:
        for channel, path in ((guest.channel, WRAP), (owner, UNWRAP)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await kp_call(channel, path, b"{}")
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED

    async def test_registration_without_valid_admin_token_fails(self, admin_kbs: DevKbsServer, tmp_path: Path) -> None:
        wrong = tmp_path / "wrong.pem"
        wrong.write_bytes(
            ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        provider = build_provider(
            OwnerOptions(
                listen=ListenAddress(host="127.0.0.1", port=1), kbs_url=admin_kbs.url, admin_key_file=str(wrong)
            )
        )
        from agent.errors import AttestationRejected

        with pytest.raises(AttestationRejected, match="AdminAuthInitialization"):
            await provider.wrap_key(go_wrap_request({}))


async def unseal(agent: RunningAgent, secret: str) -> bytes:
    reply = await agent.call(
        "/api.SealedSecretService/UnsealSecret",
        api_pb2.UnsealSecretInput(secret=secret.encode()),
        api_pb2.UnsealSecretOutput,
    )
    data: bytes = reply.plaintext
    return data


class TestSealedSecrets:
    @pytest.fixture
    def signing(self, resources: Path) -> Any:
        private_pem, public_jwk = sign.generate_signing_key()
        (resources / "default" / "sealing").mkdir(parents=True)
        (resources / "default" / "sealing" / "pub").write_bytes(public_jwk)
        return serialization.load_pem_private_key(private_pem, password=None)

    async def test_vault_secret_with_kbs_key(self, guest: RunningAgent, signing: Any) -> None:
        secret = sign.seal(
            sealed.VaultSecret(name="kbs:///default/key/1", provider="kbs"), signing, "kbs:///default/sealing/pub"
        )
        assert await unseal(guest, secret) == SECRET

    async def test_vault_secret_with_local_key(
        self, tmp_path: Path, admin_kbs: DevKbsServer, signing: Any, resources: Path
    ) -> None:
        key_dir = tmp_path / "keys"
        key_dir.mkdir()
        (key_dir / "local-key").write_bytes((resources / "default" / "sealing" / "pub").read_bytes())
        agent = await start_agent(
            str(tmp_path / "l.sock"), admin_kbs.url, hub_options={"sealed_secret_key_dir": str(key_dir)}
        )
        try:
            secret = sign.seal(sealed.VaultSecret(name="kbs:///default/key/1", provider="kbs"), signing, "local-key")
            assert await unseal(agent, secret) == SECRET
            traversal = sign.seal(
                sealed.VaultSecret(name="kbs:///default/key/1", provider="kbs"), signing, "../keys/local-key"
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unseal(agent, traversal)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await stop_agent(agent)

    async def test_tampered_secret_rejected(self, guest: RunningAgent, signing: Any) -> None:
        secret = sign.seal(
            sealed.VaultSecret(name="kbs:///default/key/1", provider="kbs"), signing, "kbs:///default/sealing/pub"
        )
        prefix, header, _payload, signature = secret.split(".")
        forged = (
            base64.urlsafe_b64encode(
                json.dumps(
                    {
                        "version": "0.1.0",
                        "type": "vault",
                        "name": "kbs:///default/key/2",
                        "provider": "kbs",
                        "provider_settings": {},
                        "annotations": {},
                    }
                ).encode()
            )
            .rstrip(b"=")
            .decode()
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unseal(guest, ".".join((prefix, header, forged, signature)))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "sealed secret signature does not verify"

    async def test_envelope_secret_not_supported(self, guest: RunningAgent, signing: Any) -> None:
        envelope = sealed.EnvelopeSecret(
            key_id="k",
            encrypted_key=b"k",
            encrypted_data=b"d",
            wrap_type=WrapType.A256GCM,
            iv=bytes(12),
            provider="aliyun",
        )
        secret = sign.seal(envelope, signing, "kbs:///default/sealing/pub")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unseal(guest, secret)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "aliyun" in (info.value.details() or "")

    async def test_skip_verification_is_explicit(self, tmp_path: Path, admin_kbs: DevKbsServer) -> None:
        agent = await start_agent(
            str(tmp_path / "s.sock"), admin_kbs.url, hub_options={"skip_sealed_secret_verification": True}
        )
        try:
            payload = (
                base64.urlsafe_b64encode(
                    json.dumps(
                        {
                            "version": "0.1.0",
                            "type": "vault",
                            "name": "kbs:///default/key/1",
                            "provider": "kbs",
                            "provider_settings": {},
                            "annotations": {},
                        }
                    ).encode()
                )
                .rstrip(b"=")
                .decode()
            )
            assert await unseal(agent, f"sealed.e30.{payload}.c2ln") == SECRET
        finally:
            await stop_agent(agent)
