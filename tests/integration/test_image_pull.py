"""The pull orchestrator against a real registry, with the real layer store and a real overlay mount."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import AgentError, ImageFormatError, ImageRejected, KbsTransportError, NotSupported, RegistryError
from agent.image.pull import ImagePuller, PullSettings, measurement_content
from tests.fakes.registry import (
    Entry,
    FlakyProxy,
    Image,
    Pusher,
    Registry,
    build_image,
    build_index,
    gzip_layer,
    sha256,
    tar_layer,
)
from tests.integration.image_support import cleanup_mount, image_test_marks, snapshot

pytestmark = image_test_marks(overlay=True)

BASE = gzip_layer(
    tar_layer(
        [
            Entry("bin/", kind="dir"),
            Entry("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755),
            Entry("bin/link", kind="symlink", target="tool"),
            Entry("bin/hard", kind="hardlink", target="bin/tool"),
            Entry("etc/", kind="dir"),
            Entry("etc/old", b"old"),
            Entry("etc/keep", b"keep"),
            Entry("var/", kind="dir"),
            Entry("var/cache/", kind="dir"),
            Entry("var/cache/a", b"a"),
        ]
    )
)
TOP = gzip_layer(
    tar_layer(
        [
            Entry("etc/.wh.old"),
            Entry("var/cache/", kind="dir"),
            Entry("var/cache/.wh..wh..opq"),
            Entry("var/cache/b", b"b"),
            Entry("etc/new", b"new", mode=0o600),
        ]
    )
)
OTHER = gzip_layer(tar_layer([Entry("app/", kind="dir"), Entry("app/main", b"main" * 1000)]))

EXPECTED = {
    "bin": ("dir", 0o755, 0, b""),
    "bin/tool": ("file", 0o4755, 20, b"#!/bin/sh\necho tool\n"),
    "bin/link": ("symlink", 0o777, 0, "tool"),
    "bin/hard": ("file", 0o4755, 20, b"#!/bin/sh\necho tool\n"),
    "etc": ("dir", 0o755, 0, b""),
    "etc/keep": ("file", 0o644, 4, b"keep"),
    "etc/new": ("file", 0o600, 3, b"new"),
    "var": ("dir", 0o755, 0, b""),
    "var/cache": ("dir", 0o755, 0, b""),
    "var/cache/b": ("file", 0o644, 1, b"b"),
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry")) as running:
        pusher = Pusher(running.url)
        pusher.image("apps/layered", "v1", build_image([BASE, TOP]))
        pusher.image("apps/shared", "v1", build_image([BASE, OTHER]))
        pusher.image("apps/dup", "v1", build_image([OTHER, BASE, OTHER]))
        amd = build_image([BASE], arch="amd64")
        arm = build_image([OTHER], arch="arm64", variant="v8")
        arm_v7 = build_image([TOP], arch="arm", variant="v7")
        for image in (amd, arm, arm_v7):
            pusher.image("apps/multi", image.digest.replace(":", "-"), image)
        pusher.manifest(
            "apps/multi",
            "v1",
            build_index([(arm_v7, "arm", "v7"), (arm, "arm64", "v8"), (amd, "amd64", None)]),
            "application/vnd.oci.image.index.v1+json",
        )
        pusher.close()
        yield running


class Harness:
    def __init__(self, root: Path, registry: Registry, **settings: object) -> None:
        self.root = root
        self.work = root / "work"
        self.registry = registry
        self.events: list[tuple[str, str]] = []
        self.resources: dict[str, bytes] = {}
        self.settings = PullSettings(
            work_dir=str(self.work),
            registry_config={"registry": [{"location": registry.host, "insecure": True}]},
            pull_timeout_s=60,
        )
        self.settings = replace(self.settings, **settings)  # type: ignore[arg-type]
        self.puller = self.new_puller()
        self.bundles: list[Path] = []

    def new_puller(self, machine: str = "x86_64") -> ImagePuller:
        async def measure(image: str, digest: str) -> None:
            self.events.append((image, digest))

        async def get_resource(uri: str) -> bytes:
            if uri not in self.resources:
                raise KbsTransportError("the KBS cannot be reached")
            return self.resources[uri]

        return ImagePuller(self.settings, get_resource=get_resource, unwrap=None, measure=measure, machine=machine)

    def puller_via(self, proxy: FlakyProxy, **settings: object) -> ImagePuller:
        """A puller of its own whose registry is reached through `proxy` (which counts and faults requests)."""
        registries = {"registry": [{"location": proxy.host, "insecure": True}]}
        return ImagePuller(
            replace(self.settings, registry_config=registries, **settings),  # type: ignore[arg-type]
            get_resource=self.puller._get_resource,
            unwrap=None,
            measure=None,
        )

    def bundle(self, name: str) -> Path:
        path = self.root / "bundles" / name
        path.mkdir(parents=True)
        self.bundles.append(path)
        return path

    async def close(self) -> None:
        for bundle in self.bundles:
            cleanup_mount(bundle, self.work / "overlay")
        await self.puller.aclose()


@pytest.fixture
async def harness(tmp_path: Path, registry: Registry) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, registry)
    yield h
    await h.close()


def assert_nothing_mounted(bundle: Path) -> None:
    assert not os.path.ismount(bundle / "rootfs")
    assert not (bundle / "config.json").exists()


class TestPull:
    async def test_layered_image_rootfs_file_by_file(self, harness: Harness) -> None:
        bundle = harness.bundle("c1")
        url = f"{harness.registry.host}/apps/layered:v1"
        digest = await harness.puller.pull(url, str(bundle))
        assert os.path.ismount(bundle / "rootfs")
        assert snapshot(bundle / "rootfs") == EXPECTED
        assert (bundle / "rootfs" / "bin" / "tool").stat().st_ino == (bundle / "rootfs" / "bin" / "hard").stat().st_ino
        spec = json.loads((bundle / "config.json").read_text())
        assert spec["process"]["args"] == ["/bin/sh"]
        assert spec["root"]["path"] == "rootfs"
        assert harness.events == [(url, digest)]
        (bundle / "rootfs" / "etc" / "written").write_text("rw")  # the overlay is read-write

    async def test_multi_arch_index_returns_platform_digest(self, harness: Harness, registry: Registry) -> None:
        url = f"{registry.host}/apps/multi:v1"
        amd_digest = await harness.puller.pull(url, str(harness.bundle("amd")))
        assert amd_digest == build_image([BASE], arch="amd64").digest
        arm = harness.new_puller(machine="aarch64")
        try:
            arm_digest = await arm.pull(url, str(harness.bundle("arm")))
        finally:
            await arm.aclose()
        assert arm_digest == build_image([OTHER], arch="arm64", variant="v8").digest
        assert (harness.bundles[-1] / "rootfs" / "app" / "main").exists()
        assert harness.events[-1] == (url, arm_digest)

    async def test_duplicate_layers_fetched_once(self, harness: Harness, registry: Registry) -> None:
        with FlakyProxy(registry.port) as proxy:
            puller = harness.puller_via(proxy)
            try:
                await puller.pull(f"{proxy.host}/apps/dup:v1", str(harness.bundle("dup")))
            finally:
                await puller.aclose()
            blobs = [path for path, _ in proxy.seen if f"/blobs/{sha256(OTHER.blob)}" in path]
        assert len(blobs) == 1
        assert (harness.bundles[-1] / "rootfs" / "app" / "main").exists()

    async def test_concurrent_pulls_download_a_shared_missing_layer_once(
        self, harness: Harness, registry: Registry
    ) -> None:
        """Two pulls at once of images sharing BASE: one GET of BASE's blob, the other pull reuses the layer."""
        with FlakyProxy(registry.port) as proxy:
            puller = harness.puller_via(proxy)
            try:
                await asyncio.gather(
                    puller.pull(f"{proxy.host}/apps/layered:v1", str(harness.bundle("a"))),
                    puller.pull(f"{proxy.host}/apps/shared:v1", str(harness.bundle("b"))),
                )
                assert puller._setup is not None
                assert puller._setup.store.unpacked == 3  # BASE once, TOP, OTHER
            finally:
                await puller.aclose()
            base = [path for path, _ in proxy.seen if f"/blobs/{sha256(BASE.blob)}" in path]
        assert len(base) == 1
        assert snapshot(harness.bundles[0] / "rootfs") == EXPECTED
        assert (harness.bundles[1] / "rootfs" / "app" / "main").exists()

    async def test_a_pull_waiting_for_a_failed_pulls_layer_downloads_it_itself(
        self, harness: Harness, registry: Registry
    ) -> None:
        """The first pull holds BASE's download and fails (its blob stalls past the pull deadline); the second,
        which waited for it, then downloads BASE itself and succeeds: a failed pull leaves no one waiting."""
        with FlakyProxy(registry.port) as proxy:
            proxy.faults = {f"/apps/layered/blobs/{sha256(BASE.blob)}": ["stall"]}
            puller = harness.puller_via(proxy, pull_timeout_s=4)

            failed_at: list[int] = []  # how many requests the proxy had seen when the first pull failed

            async def first() -> str:
                try:
                    return await puller.pull(f"{proxy.host}/apps/layered:v1", str(harness.bundle("a")))
                finally:
                    failed_at.append(len(proxy.seen))

            async def second() -> str:
                await asyncio.sleep(1.5)  # the first pull holds BASE by now, stalled
                return await puller.pull(f"{proxy.host}/apps/shared:v1", str(harness.bundle("b")))

            try:
                outcome, later = await asyncio.gather(first(), second(), return_exceptions=True)
            finally:
                await puller.aclose()
            base = [(i, path, fault) for i, (path, fault) in enumerate(proxy.seen) if sha256(BASE.blob) in path]
        assert isinstance(outcome, AgentError), outcome
        assert isinstance(later, str), later
        assert [(path.split("/")[3], fault) for _, path, fault in base] == [("layered", "stall"), ("shared", "pass")]
        assert base[1][0] >= failed_at[0]  # the second pull asked for BASE only once the first had given it up
        assert (harness.bundles[1] / "rootfs" / "app" / "main").exists()

    async def test_concurrent_pulls_share_layers_and_restart_reuses_them(
        self, harness: Harness, registry: Registry
    ) -> None:
        await asyncio.gather(
            harness.puller.pull(f"{registry.host}/apps/layered:v1", str(harness.bundle("a"))),
            harness.puller.pull(f"{registry.host}/apps/shared:v1", str(harness.bundle("b"))),
        )
        assert snapshot(harness.bundles[0] / "rootfs") == EXPECTED
        assert harness.puller._setup is not None
        assert harness.puller._setup.store.unpacked == 3  # BASE once, TOP, OTHER
        # a restart: a new puller on the same work dir reuses every layer without downloading one
        with FlakyProxy(registry.port) as proxy:
            again = harness.puller_via(proxy)
            try:
                await again.pull(f"{proxy.host}/apps/layered:v1", str(harness.bundle("c")))
                assert again._setup is not None
                assert again._setup.store.unpacked == 0
            finally:
                await again.aclose()
            layer_blobs = {sha256(BASE.blob), sha256(TOP.blob)}
            assert not [p for p, _ in proxy.seen if any(d in p for d in layer_blobs)]
        assert snapshot(harness.bundles[-1] / "rootfs") == EXPECTED

    async def test_mirror_fallback(self, tmp_path: Path, registry: Registry) -> None:
        dead = f"127.0.0.1:{_closed_port()}"
        conf = {
            "registry": [
                {
                    "prefix": "example.test/apps",
                    "location": f"{registry.host}/apps",
                    "insecure": True,
                    "mirror": [{"location": f"{dead}/apps", "insecure": True}],
                }
            ]
        }
        h = Harness(tmp_path, registry, registry_config=conf, pull_timeout_s=3)
        try:
            digest = await h.puller.pull("example.test/apps/layered:v1", str(h.bundle("m")))
            assert h.events == [("example.test/apps/layered:v1", digest)]  # the caller's string, not the mirror's
        finally:
            await h.close()

    async def test_existing_config_json_is_refused_before_pulling(self, harness: Harness) -> None:
        bundle = harness.bundle("exists")
        (bundle / "config.json").write_text("{}")
        with pytest.raises(Exception, match="OCI config file already exists"):
            await harness.puller.pull(f"{harness.registry.host}/apps/layered:v1", str(bundle))
        assert not os.path.ismount(bundle / "rootfs")

    def test_measurement_content_format(self) -> None:
        assert measurement_content("busybox", "sha256:ab") == '{"image":"busybox", "digest":"sha256:ab"}'


class TestRefusals:
    async def test_reject_policy_leaves_nothing(self, tmp_path: Path, registry: Registry) -> None:
        policy = {
            "default": [{"type": "insecureAcceptAnything"}],
            "transports": {"docker": {f"{registry.host}/apps": [{"type": "reject"}]}},
        }
        h = Harness(tmp_path, registry, image_security_policy=json.dumps(policy))
        try:
            bundle = h.bundle("r")
            with pytest.raises(ImageRejected, match="Image policy rejected: Denied by policy"):
                await h.puller.pull(f"{registry.host}/apps/layered:v1", str(bundle))
            assert_nothing_mounted(bundle)
            assert h.events == []
            assert not list((h.work / "layers").iterdir())  # the policy runs before any layer is fetched
        finally:
            await h.close()

    async def test_signed_by_is_not_supported(self, tmp_path: Path, registry: Registry) -> None:
        policy = {"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k"}], "transports": {}}
        h = Harness(tmp_path, registry, image_security_policy=json.dumps(policy))
        try:
            with pytest.raises(NotSupported, match="GPG simple signing"):
                await h.puller.pull(f"{registry.host}/apps/layered:v1", str(h.bundle("s")))
        finally:
            await h.close()

    async def test_policy_from_kbs_that_is_down(self, tmp_path: Path, registry: Registry) -> None:
        h = Harness(tmp_path, registry, image_security_policy_uri="kbs:///default/security-policy/test")
        try:
            bundle = h.bundle("k")
            with pytest.raises(KbsTransportError):
                await h.puller.pull(f"{registry.host}/apps/layered:v1", str(bundle))
            assert_nothing_mounted(bundle)
            h.resources["kbs:///default/security-policy/test"] = json.dumps(
                {"default": [{"type": "insecureAcceptAnything"}], "transports": {}}
            ).encode()
            await h.puller.pull(f"{registry.host}/apps/layered:v1", str(bundle))  # set-up is retried after a failure
            assert os.path.ismount(bundle / "rootfs")
        finally:
            await h.close()

    async def test_cosign_signed_image(self, tmp_path: Path, registry: Registry) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        image = build_image([BASE, OTHER], config_extra={"author": "signed"})
        repo = "apps/signed"
        pusher = Pusher(registry.url)
        pusher.image(repo, "v1", image)
        unsigned = build_image([BASE, OTHER], config_extra={"author": "unsigned"})
        pusher.image(repo, "unsigned", unsigned)
        payload = json.dumps(
            {
                "critical": {
                    "identity": {"docker-reference": f"{registry.host}/{repo}"},
                    "image": {"docker-manifest-digest": image.digest},
                    "type": "cosign container image signature",
                },
                "optional": None,
            }
        ).encode()
        signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
        sig_config = b"{}"
        sig_manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(sig_config),
                    "size": 2,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                        "digest": sha256(payload),
                        "size": len(payload),
                        "annotations": {"dev.cosignproject.cosign/signature": signature},
                    }
                ],
            }
        ).encode()
        pusher.blob(repo, sig_config)
        pusher.blob(repo, payload)
        pusher.manifest(
            repo,
            "sha256-" + image.digest.split(":")[1] + ".sig",
            sig_manifest,
            "application/vnd.oci.image.manifest.v1+json",
        )
        pusher.close()
        h = Harness(tmp_path, registry)
        h.resources["kbs:///default/cosign-key/1"] = public
        policy = {
            "default": [
                {
                    "type": "sigstoreSigned",
                    "keyPath": "kbs:///default/cosign-key/1",
                    "signedIdentity": {"type": "matchRepository"},
                }
            ],
            "transports": {},
        }
        h.settings = replace(h.settings, image_security_policy=json.dumps(policy))
        h.puller = h.new_puller()
        try:
            digest = await h.puller.pull(f"{registry.host}/{repo}:v1", str(h.bundle("ok")))
            assert digest == image.digest
            bundle = h.bundle("no")
            with pytest.raises(ImageRejected, match=re.escape("no valid cosign signature")):
                await h.puller.pull(f"{registry.host}/{repo}:unsigned", str(bundle))
            assert_nothing_mounted(bundle)
        finally:
            await h.close()

    @pytest.mark.parametrize("fault", ["diff_ids", "layer-digest", "media-type", "os"])
    async def test_hostile_images_leave_nothing(self, tmp_path: Path, registry: Registry, fault: str) -> None:
        repo = f"hostile/{fault}"
        image: Image
        pusher = Pusher(registry.url)
        if fault == "diff_ids":
            image = build_image([BASE], config_extra={"rootfs": {"type": "layers", "diff_ids": []}})
        elif fault == "os":
            image = build_image([BASE], config_extra={"os": "windows"})
        else:
            image = build_image([BASE])
        manifest = json.loads(image.manifest)
        if fault == "media-type":
            manifest["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        image.manifest = json.dumps(manifest).encode()
        for data in image.blobs.values():
            pusher.blob(repo, data)
        pusher.manifest(repo, "v1", image.manifest, image.media_type)
        pusher.close()
        h = Harness(tmp_path, registry)
        try:
            bundle = h.bundle("h")
            if fault == "layer-digest":
                # The registry itself refuses a blob whose digest is wrong, so serve it through a corrupting proxy.
                with FlakyProxy(registry.port) as proxy:
                    proxy.faults = {f"/blobs/{sha256(BASE.blob)}": ["corrupt"] * 5}
                    h.settings = replace(
                        h.settings, registry_config={"registry": [{"location": proxy.host, "insecure": True}]}
                    )
                    puller = h.new_puller()
                    try:
                        with pytest.raises(ImageFormatError, match=re.escape(f"expected {sha256(BASE.blob)}")):
                            await puller.pull(f"{proxy.host}/apps/layered:v1", str(bundle))
                    finally:
                        await puller.aclose()
            else:
                expected: type[Exception] = NotSupported if fault == "media-type" else ImageFormatError
                with pytest.raises(expected):
                    await h.puller.pull(f"{registry.host}/{repo}:v1", str(bundle))
            assert_nothing_mounted(bundle)
            assert h.events == []
        finally:
            await h.close()

    async def test_measurement_failure_unmounts(self, tmp_path: Path, registry: Registry) -> None:
        h = Harness(tmp_path, registry)

        async def broken(_image: str, _digest: str) -> None:
            raise RegistryError("the attestation agent is unreachable")

        h.puller._measure = broken
        try:
            bundle = h.bundle("m")
            with pytest.raises(RegistryError, match="attestation agent"):
                await h.puller.pull(f"{registry.host}/apps/layered:v1", str(bundle))
            assert_nothing_mounted(bundle)
        finally:
            await h.close()


def _closed_port() -> int:
    from tests.fakes.registry import free_port

    return free_port()
