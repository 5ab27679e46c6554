"""End to end: PullImage over ttRPC on a cdh socket, as kata-agent calls it, with an encrypted layer whose KEK the
image owner's provider registered with the dev KBS; the guest attests to get it. Real registry, real overlay."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cvm_tools.devkbs.server import DevKbsServer
from cvm_tools.keyprovider.encrypt import encrypt_layer
from cvm_tools.keyprovider.owner import OwnerOptions, build_provider

from agent.api._gen import api_pb2
from agent.api._gen import attestation_agent_pb2 as aa_pb
from agent.api.methods import build_methods
from agent.api.status import RpcError, StatusCode
from agent.api.ttrpc import TtrpcClient, TtrpcServer
from agent.api.ttrpc_service import build_ttrpc_server
from agent.config import KbsConfig, ListenAddress
from agent.image.measure import AaMeasurementClient
from agent.image.settings import ImageConfig
from agent.kbs.client import KbsClient
from agent.measurement import MeasurementResult
from agent.service import AttestationAgent, DataHub, pull_image_measurement
from agent.tee.sample import SampleAttester
from tests.fakes.registry import (
    LAYER_GZIP,
    Entry,
    FlakyProxy,
    Layer,
    Pusher,
    Registry,
    build_image,
    gzip_layer,
    sha256,
    tar_layer,
)
from tests.integration.image_support import cleanup_mount, image_test_marks, snapshot, tree_state

pytestmark = image_test_marks(overlay=True)

CDH = "api.ImagePullService"
BASE = tar_layer(
    [
        Entry("etc/", kind="dir"),
        Entry("etc/os-release", b"ID=test\n"),
        Entry("bin/", kind="dir"),
        Entry("bin/sh", b"\x7fELF", mode=0o755),
    ]
)
SECRET = tar_layer(
    [
        Entry("secret/", kind="dir", mode=0o700),
        Entry("secret/model.bin", b"confidential weights" * 500, mode=0o600),
        Entry("etc/.wh.os-release"),
        Entry("etc/issue", b"encrypted layer\n"),
    ]
)


class RecordingAgent(AttestationAgent):
    """The attestation agent with its runtime measurement recorded (the AA side is another engineer's)."""

    events: list[tuple[str, str, str]]

    async def extend_runtime_measurement(
        self, domain: str, operation: str, content: str, register_index: int | None
    ) -> MeasurementResult:
        self.events.append((domain, operation, content))
        return MeasurementResult.OK


@dataclass
class Guest:
    root: Path
    cdh_socket: str
    aa: RecordingAgent
    hub: DataHub
    kbs_client: KbsClient
    servers: list[TtrpcServer]
    registry: Registry
    url: str
    digest: str
    kbs: FlakyProxy
    proxy: FlakyProxy

    async def pull(self, image: str, bundle: Path) -> str:
        request = api_pb2.ImagePullRequest(image_url=image, bundle_path=str(bundle))
        async with TtrpcClient(self.cdh_socket) as client:
            reply = await client.call(CDH, "PullImage", request.SerializeToString(), timeout=60)
        return api_pb2.ImagePullResponse.FromString(reply).manifest_digest


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture
async def guest(tmp_path: Path, resources: Path, registry: Registry) -> AsyncIterator[Guest]:
    admin = ed25519.Ed25519PrivateKey.generate()
    admin_pem = tmp_path / "admin.pem"
    admin_pem.write_bytes(
        admin.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public = admin.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    proxy = FlakyProxy(registry.port).__enter__()
    (resources / "default" / "security-policy").mkdir(parents=True)
    accept = [{"type": "insecureAcceptAnything"}]
    policy = {
        "default": [{"type": "reject"}],
        "transports": {"docker": {f"{registry.host}/e2e": accept, f"{proxy.host}/e2e": accept}},
    }
    (resources / "default" / "security-policy" / "test").write_text(json.dumps(policy))
    with DevKbsServer(resources, admin_public_key=public) as kbs:
        owner = build_provider(
            OwnerOptions(listen=ListenAddress(host="127.0.0.1", port=1), kbs_url=kbs.url, admin_key_file=str(admin_pem))
        )
        plain = gzip_layer(BASE)
        encrypted_blob = io.BytesIO()
        secret_gz = gzip.compress(SECRET, mtime=0)
        enc = await encrypt_layer(io.BytesIO(secret_gz), encrypted_blob, media_type=LAYER_GZIP, wrap=owner.wrap_key)
        secret_layer = Layer(encrypted_blob.getvalue(), enc.media_type, sha256(SECRET), dict(enc.annotations))
        assert enc.media_type == "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        image = build_image([plain, secret_layer], config_extra={"config": {"Entrypoint": ["/bin/sh"], "Env": ["A=1"]}})
        pusher = Pusher(registry.url)
        pusher.image("e2e/encrypted", "v1", image)
        pusher.close()

        attester = SampleAttester()
        # the guest reaches the KBS through a proxy that can be taken down, closing every connection
        kbs_proxy = FlakyProxy(int(kbs.url.rsplit(":", 1)[1])).__enter__()
        kbs_client = KbsClient(KbsConfig(url=f"http://{kbs_proxy.host}"), attester)
        aa = RecordingAgent(attester, kbs_client)
        aa.events = []
        aa_socket = str(tmp_path / "aa.sock")
        cdh_socket = str(tmp_path / "cdh.sock")
        measurement = AaMeasurementClient(aa_socket)  # the drop-in CDH's path: ttRPC to the AA socket
        hub = DataHub(
            kbs_client,
            image=ImageConfig(
                work_dir=str(tmp_path / "work"),
                image_security_policy_uri="kbs:///default/security-policy/test",
                registry_config={
                    "registry": [
                        {"location": registry.host, "insecure": True},
                        {"location": proxy.host, "insecure": True},
                    ]
                },
                pull_timeout_s=60,
            ),
            measure=pull_image_measurement(measurement.extend),
        )
        aa_server = build_ttrpc_server(build_methods(aa, None))
        cdh_server = build_ttrpc_server(build_methods(None, hub))
        await aa_server.start(aa_socket)
        await cdh_server.start(cdh_socket)
        g = Guest(
            tmp_path,
            cdh_socket,
            aa,
            hub,
            kbs_client,
            [aa_server, cdh_server],
            registry,
            f"{registry.host}/e2e/encrypted:v1",
            image.digest,
            kbs_proxy,
            proxy,
        )
        try:
            yield g
        finally:
            for server in g.servers:
                await server.close(grace_s=1)
            for rootfs in (tmp_path / "run").rglob("rootfs"):
                cleanup_mount(rootfs.parent, tmp_path / "work" / "overlay")
            proxy.__exit__(None, None, None)
            kbs_proxy.__exit__(None, None, None)
            await measurement.close()
            await hub.aclose()
            await kbs_client.aclose()


def expected_rootfs() -> dict[str, tuple[str, int, int, bytes | str]]:
    weights = b"confidential weights" * 500
    return {
        "etc": ("dir", 0o755, 0, b""),
        "etc/issue": ("file", 0o644, 16, b"encrypted layer\n"),
        "bin": ("dir", 0o755, 0, b""),
        "bin/sh": ("file", 0o755, 4, b"\x7fELF"),
        "secret": ("dir", 0o700, 0, b""),
        "secret/model.bin": ("file", 0o600, len(weights), weights),
    }


async def test_pull_encrypted_image_over_ttrpc(guest: Guest) -> None:
    bundle = guest.root / "run" / "kata-containers" / "c1"
    bundle.mkdir(parents=True)  # kata-agent creates it
    watched = guest.root
    before = tree_state(watched, exclude=(bundle, guest.root / "work", guest.root / "run"))
    kata_default = Path("/run/kata-containers/image").exists()

    digest = await guest.pull(guest.url, bundle)

    assert digest == guest.digest
    assert os.path.ismount(bundle / "rootfs")
    assert snapshot(bundle / "rootfs") == expected_rootfs()
    spec = json.loads((bundle / "config.json").read_text())
    assert spec["process"]["args"] == ["/bin/sh"]
    assert guest.aa.events == [
        ("github.com/confidential-containers", "PullImage", f'{{"image":"{guest.url}", "digest":"{digest}"}}')
    ]
    # nothing outside the bundle and the work dir changed (sockets and the KBS live under `root` too)
    after = tree_state(watched, exclude=(bundle, guest.root / "work", guest.root / "run"))
    assert {k: v for k, v in after.items() if not k.endswith(".sock")} == {
        k: v for k, v in before.items() if not k.endswith(".sock")
    }
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "rootfs"]
    assert Path("/run/kata-containers/image").exists() == kata_default
    work = sorted(p.name for p in (guest.root / "work").iterdir())
    assert work == ["downloads", "layers", "meta_store.json", "overlay"]
    assert list((guest.root / "work" / "downloads").iterdir()) == []  # blobs are deleted once unpacked


async def test_kbs_down_during_pull_leaves_nothing(guest: Guest) -> None:
    pusher = Pusher(guest.registry.url)
    pusher.image("e2e/plain", "v1", build_image([gzip_layer(BASE)]))
    pusher.close()
    first = guest.root / "run" / "plain"
    first.mkdir(parents=True)
    await guest.pull(f"{guest.registry.host}/e2e/plain:v1", first)  # policy fetched from the KBS, base layer stored
    guest.kbs.__exit__(None, None, None)  # the KBS goes away before the encrypted layer's key is asked for
    bundle = guest.root / "run" / "c2"
    bundle.mkdir(parents=True)
    with pytest.raises(RpcError) as info:
        await guest.pull(guest.url, bundle)
    assert info.value.code is StatusCode.UNAVAILABLE
    assert info.value.message.startswith("Image Pull error: KBS at http://127.0.0.1:")
    assert not os.path.ismount(bundle / "rootfs")
    assert not (bundle / "config.json").exists()
    assert len(list((guest.root / "work" / "layers").iterdir())) == 1  # only the shared plain layer
    assert [event[2] for event in guest.aa.events] == [
        f'{{"image":"{guest.registry.host}/e2e/plain:v1", "digest":"{build_image([gzip_layer(BASE)]).digest}"}}'
    ]


async def test_rejected_image_over_ttrpc(guest: Guest) -> None:
    bundle = guest.root / "run" / "c3"
    bundle.mkdir(parents=True)
    pusher = Pusher(guest.registry.url)
    pusher.image("other/app", "v1", build_image([gzip_layer(BASE)]))
    pusher.close()
    with pytest.raises(RpcError) as info:
        await guest.pull(f"{guest.registry.host}/other/app:v1", bundle)
    assert info.value.code is StatusCode.PERMISSION_DENIED
    assert info.value.message.startswith("Image Pull error: Image policy rejected: Denied by policy")
    assert not os.path.ismount(bundle / "rootfs")
    assert list(bundle.iterdir()) in ([], [bundle / "rootfs"])


async def test_get_resource_and_unwrap_during_a_pull(guest: Guest, tmp_path: Path) -> None:
    """A pull in flight (layer downloads held back by the proxy) does not block GetResource on the same socket."""
    proxy = guest.proxy
    proxy.faults = {"/blobs/": ["delay"] * 4}
    bundle = guest.root / "run" / "c4"
    bundle.mkdir(parents=True)
    pull = asyncio.create_task(guest.pull(f"{proxy.host}/e2e/encrypted:v1", bundle))
    while not any(fault == "delay" for _, fault in proxy.seen):  # noqa: ASYNC110 - the proxy runs in a thread
        await asyncio.sleep(0.02)
    request = api_pb2.GetResourceRequest(ResourcePath="kbs:///default/key/1")
    async with TtrpcClient(guest.cdh_socket) as client:
        reply = await client.call("api.GetResourceService", "GetResource", request.SerializeToString(), timeout=5)
    assert api_pb2.GetResourceResponse.FromString(reply).Resource.startswith(b"top-secret")
    assert not pull.done()  # the pull is still waiting for its layers
    assert await pull == guest.digest  # and it then unwraps the layer key through the hub while others are served
    assert snapshot(bundle / "rootfs") == expected_rootfs()


async def test_measurement_without_aa_socket_is_skipped(tmp_path: Path) -> None:
    measurement = AaMeasurementClient(str(tmp_path / "absent.sock"))
    assert await measurement.extend("d", "PullImage", "{}") == MeasurementResult.NOT_ENABLED
    assert aa_pb.ExtendRuntimeMeasurementRequest(Domain="d").Domain == "d"


class RecordingAa(AttestationAgent):
    """The attestation agent of the separate AA process, recording the events the CDH sends over ttRPC."""

    events: ClassVar[list[tuple[str, str, str]]] = []

    async def extend_runtime_measurement(
        self, domain: str, operation: str, content: str, register_index: int | None
    ) -> MeasurementResult:
        RecordingAa.events.append((domain, operation, content))
        return MeasurementResult.OK


async def test_drop_in_cdh_as_kata_launches_it(guest: Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference layout: an attestation-agent process (passport tokens, events) and a confidential-data-hub
    built from its own cdh.toml by the composition root, PullImage on its cdh.sock; the layer key comes through
    the AA's token (cc_kbc), the event reaches the AA over ttRPC."""
    from agent.app import App
    from agent.compat import cdh
    from agent.config import Config, KbsConfig

    aa_socket = str(tmp_path / "aa2.sock")
    cdh_socket = str(tmp_path / "cdh2.sock")
    monkeypatch.setattr("agent.service.AttestationAgent", RecordingAa)
    aa_app = App(
        Config(socket=None, ttrpc_aa_socket=aa_socket, kbs=KbsConfig(url=f"http://{guest.kbs.host}")),
        attester=SampleAttester(),
    )
    await aa_app.start()
    await aa_app.complete_startup()
    conf = tmp_path / "cdh.toml"
    conf.write_text(
        f'socket = "unix://{cdh_socket}"\n[aa]\naa_socket = "unix://{aa_socket}"\n'
        f'[kbc]\nname = "cc_kbc"\nurl = "http://{guest.kbs.host}"\n'
        f'[image]\nwork_dir = "{tmp_path / "cdh-work"}"\n'
        'image_security_policy_uri = "kbs:///default/security-policy/test"\n'
        f'[[image.registry_config.registry]]\nlocation = "{guest.registry.host}"\ninsecure = true\n'
    )
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=hvc0\n")
    monkeypatch.setenv("OCICRYPT_KEYPROVIDER_CONFIG", str(tmp_path / "absent-ocicrypt.json"))
    args = cdh.build_parser().parse_args(["-c", str(conf), "--kernel-cmdline", str(cmdline)])
    config, _level = cdh.to_config(args)
    assert config.image.work_dir == str(tmp_path / "cdh-work")
    cdh_app = App(config)
    await cdh_app.start()
    await cdh_app.complete_startup()
    bundle = tmp_path / "run" / "dropin"
    bundle.mkdir(parents=True)
    try:
        request = api_pb2.ImagePullRequest(image_url=guest.url, bundle_path=str(bundle))
        async with TtrpcClient(cdh_socket) as client:
            reply = await client.call(CDH, "PullImage", request.SerializeToString(), timeout=60)
        digest = api_pb2.ImagePullResponse.FromString(reply).manifest_digest
        assert digest == guest.digest
        assert snapshot(bundle / "rootfs") == expected_rootfs()
        assert RecordingAa.events == [
            ("github.com/confidential-containers", "PullImage", f'{{"image":"{guest.url}", "digest":"{digest}"}}')
        ]
    finally:
        cleanup_mount(bundle, tmp_path / "cdh-work" / "overlay")
        await cdh_app.close()
        await aa_app.close()
