"""Fixtures that run the real pieces: the dev KBS over real HTTP on loopback, the gRPC daemon on a unix socket."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cvm_tools.devkbs.server import DevKbsServer
from google.protobuf.message import Message

from agent.app import App
from agent.config import Config, DataHubConfig, KbsConfig, ListenAddress
from agent.kbs.client import KbsClient
from agent.kbs.jwe import KeyAlgorithm
from agent.tee.sample import SampleAttester

__all__ = ["SECRET", "DevKbsServer", "RunningAgent", "TlsFiles", "start_agent", "stop_agent"]

SECRET = b"top-secret-resource-\x00\x01\x02-value"


@pytest.fixture
def resources(tmp_path: Path) -> Path:
    root = tmp_path / "resources"
    (root / "default" / "key").mkdir(parents=True)
    (root / "default" / "key" / "1").write_bytes(SECRET)
    return root


@pytest.fixture
def dev_kbs(resources: Path) -> Iterator[DevKbsServer]:
    with DevKbsServer(resources) as server:
        yield server


@dataclass
class RunningAgent:
    socket: str
    app: App
    channel: grpc.aio.Channel

    @property
    def kbs(self) -> KbsClient:
        assert self.app.kbs is not None
        return self.app.kbs

    async def call(self, path: str, request: Message, response_type: type[Any]) -> Any:
        stub: Any = self.channel.unary_unary(
            path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_type.FromString
        )
        return await stub(request, timeout=30)

    async def raw(self, path: str, payload: bytes) -> bytes:
        stub: Any = self.channel.unary_unary(path)
        result: bytes = await stub(payload, timeout=30)
        return result


async def start_agent(
    socket: str,
    kbs_url: str,
    *,
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    hub_options: dict[str, Any] | None = None,
    **kbs_options: Any,
) -> RunningAgent:
    """`cvm-agent serve` in this process, built by the composition root: config-like options go into the
    `Config`; `clock`, `sleep` and `transport` are the KBS client's test seams."""
    seams: dict[str, Any] = {n: kbs_options.pop(n) for n in ("clock", "sleep", "transport") if n in kbs_options}
    renamed = {"refresh_margin_s": "token_refresh_margin_s"}
    kbs = KbsConfig(url=kbs_url, tee_key_algorithm=algorithm, **{renamed.get(k, k): v for k, v in kbs_options.items()})
    config = Config(socket=ListenAddress(unix_path=socket), kbs=kbs, data_hub=DataHubConfig(**(hub_options or {})))
    app = App(config, attester=SampleAttester(), kbs_seams=seams)
    await app.start()
    await app.complete_startup()
    return RunningAgent(socket, app, grpc.aio.insecure_channel(f"unix:{socket}"))


async def stop_agent(agent: RunningAgent) -> None:
    await agent.channel.close()
    await agent.app.close()


@pytest.fixture
async def agent(tmp_path: Path, dev_kbs: DevKbsServer) -> AsyncIterator[RunningAgent]:
    running = await start_agent(str(tmp_path / "run" / "agent.sock"), dev_kbs.url)
    yield running
    await stop_agent(running)


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A private CA and a server certificate for 127.0.0.1, as a self-signed KBS deployment has."""
    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cvm-agent test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files
