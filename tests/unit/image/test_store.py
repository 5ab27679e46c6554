"""LayerStore: reuse by digest, one unpack per shared layer, restart and crash safety, fail-closed layers."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import re
import stat
from pathlib import Path

import pytest
from cvm_tools.keyprovider.encrypt import encrypt_layer
from cvm_tools.keyprovider.wrap import WrapKeyProvider

from agent.errors import DecryptionError, LayerError, NotSupported
from agent.image.mount import mount_rootfs, unmount
from agent.image.store import LayerStore, _mounted_lower_dirs
from agent.keyprovider.service import GuestKeyProvider
from tests.unit.image.tarfixtures import build_tar, directory, file, needs_root, symlink, zstd_compress
from tests.unit.keyprovider.test_service import FakeKbs

pytestmark = needs_root

TAR = build_tar([directory("etc"), file("etc/hostname", b"layer\n"), symlink("link", "/etc/hostname")])
DIFF_ID = "sha256:" + hashlib.sha256(TAR).hexdigest()
GZ = gzip.compress(TAR)
DIGEST = "sha256:" + hashlib.sha256(GZ).hexdigest()
MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"
KEK = bytes(range(32))
KID = "kbs:///default/image-kek/store"


class Blobs:
    """`open_blob` for one blob: writes it to a temp file in the work dir, counts calls."""

    def __init__(self, work_dir: Path, data: bytes, delay: float = 0.0) -> None:
        self.work_dir = work_dir
        self.data = data
        self.calls = 0
        self.delay = delay
        self.paths: list[Path] = []

    async def __call__(self) -> Path:
        self.calls += 1
        await asyncio.sleep(self.delay)
        path = self.work_dir / f"blob-{self.calls}.tmp"
        path.write_bytes(self.data)
        self.paths.append(path)
        return path


async def never() -> Path:
    raise AssertionError("open_blob must not be called for a stored layer")


def layer_dirs(work_dir: Path) -> list[str]:
    return sorted(p.name for p in (work_dir / "layers").iterdir())


class TestLayerStore:
    async def test_unpacks_records_and_cleans_up(self, tmp_path: Path) -> None:
        store = LayerStore(tmp_path)
        blobs = Blobs(tmp_path, GZ)
        layer = await store.ensure_layer(DIGEST, MEDIA, {}, blobs, None, diff_id=DIFF_ID)
        assert (layer.digest, layer.diff_id, layer.path) == (DIGEST, DIFF_ID, tmp_path / "layers" / "1")
        assert (layer.path / "etc/hostname").read_bytes() == b"layer\n"
        assert not blobs.paths[0].exists()
        meta = tmp_path / "meta_store.json"
        assert stat.S_IMODE(meta.stat().st_mode) == 0o600
        for d in (tmp_path, tmp_path / "layers", tmp_path / "overlay"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700
        record = json.loads(meta.read_bytes())["layer_db"][DIGEST]
        assert record == {
            "compressed_digest": DIGEST,
            "uncompressed_digest": DIFF_ID,
            "decoder": "gzip",
            "encrypted": False,
            "media_type": MEDIA,
            "store_path": "1",
        }

    async def test_reused_by_digest_and_after_a_restart(self, tmp_path: Path) -> None:
        store = LayerStore(tmp_path)
        first = await store.ensure_layer(DIGEST, MEDIA, {}, Blobs(tmp_path, GZ), None, diff_id=DIFF_ID)
        assert await store.ensure_layer(DIGEST, MEDIA, {}, never, None, diff_id=DIFF_ID) == first
        await store.record_image("sha256:config", {"manifest_digest": "sha256:m", "layers": [DIGEST]})
        restarted = LayerStore(tmp_path)
        assert await restarted.ensure_layer(DIGEST, MEDIA, {}, never, None) == first
        assert restarted.image_record("sha256:config") == {"manifest_digest": "sha256:m", "layers": [DIGEST]}
        assert restarted.unpacked == 0

    async def test_a_stored_layer_with_another_diff_id_is_refused(self, tmp_path: Path) -> None:
        store = LayerStore(tmp_path)
        await store.ensure_layer(DIGEST, MEDIA, {}, Blobs(tmp_path, GZ), None)
        with pytest.raises(
            LayerError, match=re.escape(f"has uncompressed digest {DIFF_ID}, expected sha256:{'1' * 64}")
        ):
            await store.ensure_layer(DIGEST, MEDIA, {}, never, None, diff_id="sha256:" + "1" * 64)

    async def test_concurrent_pulls_unpack_a_shared_layer_once(self, tmp_path: Path) -> None:
        store = LayerStore(tmp_path)
        blobs = Blobs(tmp_path, GZ, delay=0.05)
        layers = await asyncio.gather(*(store.ensure_layer(DIGEST, MEDIA, {}, blobs, None) for _ in range(5)))
        assert blobs.calls == 1
        assert store.unpacked == 1
        assert {layer.path for layer in layers} == {tmp_path / "layers" / "1"}

    async def test_diff_id_mismatch_leaves_nothing(self, tmp_path: Path) -> None:
        store = LayerStore(tmp_path)
        blobs = Blobs(tmp_path, GZ)
        wrong = "sha256:" + "0" * 64
        with pytest.raises(LayerError, match=re.escape(f"has uncompressed digest {DIFF_ID}, expected {wrong}")):
            await store.ensure_layer(DIGEST, MEDIA, {}, blobs, None, diff_id=wrong)
        assert layer_dirs(tmp_path) == []
        assert store.layer(DIGEST) is None
        assert not blobs.paths[0].exists()
        # the next attempt with the right diff_id works
        assert (await store.ensure_layer(DIGEST, MEDIA, {}, Blobs(tmp_path, GZ), None, diff_id=DIFF_ID)).path.is_dir()

    async def test_corrupt_layer_leaves_nothing(self, tmp_path: Path) -> None:
        store = LayerStore(tmp_path)
        bad = gzip.compress(TAR[:1000])  # a tar cut inside a header
        digest = "sha256:" + hashlib.sha256(bad).hexdigest()
        with pytest.raises(LayerError, match="layer tar ends inside"):
            await store.ensure_layer(digest, MEDIA, {}, Blobs(tmp_path, bad), None)
        assert layer_dirs(tmp_path) == []

    async def test_zstd_and_uncompressed_layers(self, tmp_path: Path) -> None:
        store = LayerStore(tmp_path)
        compressed = zstd_compress(TAR)
        zdigest = "sha256:" + hashlib.sha256(compressed).hexdigest()
        z = await store.ensure_layer(zdigest, MEDIA.replace("gzip", "zstd"), {}, Blobs(tmp_path, compressed), None)
        plain_digest = "sha256:" + hashlib.sha256(TAR).hexdigest()
        p = await store.ensure_layer(plain_digest, MEDIA[: -len("+gzip")], {}, Blobs(tmp_path, TAR), None)
        assert z.diff_id == p.diff_id == DIFF_ID
        assert z.path != p.path

    async def test_bad_input_is_refused_before_download(self, tmp_path: Path) -> None:
        store = LayerStore(tmp_path)
        with pytest.raises(LayerError, match="layer digest is 'sha256:abc'"):
            await store.ensure_layer("sha256:abc", MEDIA, {}, never, None)
        with pytest.raises(NotSupported, match=re.escape("layer media type is 'application/vnd.docker")):
            await store.ensure_layer(DIGEST, "application/vnd.docker.image.rootfs.diff.tar", {}, never, None)
        with pytest.raises(NotSupported, match="no key provider"):
            await store.ensure_layer(DIGEST, MEDIA + "+encrypted", {}, never, None)

    async def test_a_cancelled_pull_leaves_no_layer(self, tmp_path: Path) -> None:
        big = build_tar([file(f"f{i}", bytes(4 * 1024 * 1024)) for i in range(16)])
        blob = zstd_compress(big)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        store = LayerStore(tmp_path)
        started = asyncio.Event()

        async def open_blob() -> Path:
            started.set()
            return await Blobs(tmp_path, blob)()

        task = asyncio.ensure_future(store.ensure_layer(digest, MEDIA.replace("gzip", "zstd"), {}, open_blob, None))
        await started.wait()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(600):  # the worker stops at its next chunk, or its finished layer is discarded
            if layer_dirs(tmp_path) == []:
                break
            await asyncio.sleep(0.05)
        assert layer_dirs(tmp_path) == []
        assert store.layer(digest) is None
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("blob")] == []


class TestCrashSafety:
    async def test_staging_and_unrecorded_dirs_are_swept_and_missing_dirs_forgotten(self, tmp_path: Path) -> None:
        store = LayerStore(tmp_path)
        layer = await store.ensure_layer(DIGEST, MEDIA, {}, Blobs(tmp_path, GZ), None)
        (tmp_path / "layers" / ".staging-deadbeef" / "half").mkdir(parents=True)  # a crash mid-unpack
        (tmp_path / "layers" / "7").mkdir()  # a crash between rename and metadata
        LayerStore(tmp_path)
        assert layer_dirs(tmp_path) == ["1"]
        layer.path.rename(tmp_path / "moved")  # the directory vanished (e.g. tmpfs cleared)
        restarted = LayerStore(tmp_path)
        assert restarted.layer(DIGEST) is None
        assert (await restarted.ensure_layer(DIGEST, MEDIA, {}, Blobs(tmp_path, GZ), None)).path.is_dir()

    async def test_damaged_metadata_starts_empty(self, tmp_path: Path) -> None:
        await LayerStore(tmp_path).ensure_layer(DIGEST, MEDIA, {}, Blobs(tmp_path, GZ), None)
        (tmp_path / "meta_store.json").write_bytes(b'{"layer_db": [')
        store = LayerStore(tmp_path)
        assert store.layer(DIGEST) is None
        assert layer_dirs(tmp_path) == []

    @pytest.mark.skipif("overlay" not in Path("/proc/filesystems").read_text(), reason="no overlayfs")
    async def test_lost_metadata_never_deletes_a_mounted_lower_dir(self, tmp_path: Path) -> None:
        layer = await LayerStore(tmp_path).ensure_layer(DIGEST, MEDIA, {}, Blobs(tmp_path, GZ), None)
        bundle = tmp_path / "bundle"
        rootfs = mount_rootfs([layer.path], bundle, tmp_path / "overlay")
        try:
            (tmp_path / "meta_store.json").unlink()
            store = LayerStore(tmp_path)
            assert layer_dirs(tmp_path) == ["1"]  # in use by the rootfs: kept
            assert (rootfs / "etc/hostname").read_bytes() == b"layer\n"
            again = await store.ensure_layer(DIGEST, MEDIA, {}, Blobs(tmp_path, GZ), None)
            assert again.path == tmp_path / "layers" / "2"
        finally:
            unmount(rootfs, scratch=tmp_path / "overlay")
        LayerStore(tmp_path)
        assert layer_dirs(tmp_path) == ["2"]  # unmounted now: swept


class TestEncryptedLayers:
    async def encrypted(self) -> tuple[bytes, str, dict[str, str]]:
        owner = WrapKeyProvider(kek=KEK, kid=KID)
        sink = io.BytesIO()
        layer = await encrypt_layer(io.BytesIO(GZ), sink, media_type=MEDIA, wrap=owner.wrap_key)
        return sink.getvalue(), layer.digest, dict(layer.annotations)

    async def test_decrypted_and_unpacked(self, tmp_path: Path) -> None:
        blob, digest, annotations = await self.encrypted()
        guest = GuestKeyProvider(FakeKbs({KID: KEK}, delay=0))
        store = LayerStore(tmp_path)
        layer = await store.ensure_layer(
            digest, MEDIA + "+encrypted", annotations, Blobs(tmp_path, blob), guest.unwrap_key, diff_id=DIFF_ID
        )
        assert (layer.path / "etc/hostname").read_bytes() == b"layer\n"
        assert json.loads((tmp_path / "meta_store.json").read_bytes())["layer_db"][digest]["encrypted"] is True

    async def test_unauthenticated_layer_leaves_nothing_on_disk(self, tmp_path: Path) -> None:
        blob, digest, annotations = await self.encrypted()
        tampered = bytearray(blob)
        tampered[-1] ^= 0x80  # in the gzip trailer: the tar itself unpacks fine before the HMAC fails
        guest = GuestKeyProvider(FakeKbs({KID: KEK}, delay=0))
        store = LayerStore(tmp_path)
        blobs = Blobs(tmp_path, bytes(tampered))
        with pytest.raises((DecryptionError, LayerError)):
            await store.ensure_layer(digest, MEDIA + "+encrypted", annotations, blobs, guest.unwrap_key)
        assert layer_dirs(tmp_path) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["layers", "overlay"]

    async def test_tampered_uncompressed_layer_fails_on_the_hmac(self, tmp_path: Path) -> None:
        owner = WrapKeyProvider(kek=KEK, kid=KID)
        sink = io.BytesIO()
        layer = await encrypt_layer(io.BytesIO(TAR), sink, media_type=MEDIA[: -len("+gzip")], wrap=owner.wrap_key)
        tampered = bytearray(sink.getvalue())
        tampered[TAR.index(b"layer\n")] ^= 0x01  # file content: the tar stays valid, only the HMAC notices
        guest = GuestKeyProvider(FakeKbs({KID: KEK}, delay=0))
        store = LayerStore(tmp_path)
        with pytest.raises(DecryptionError, match="encrypted layer failed authentication"):
            await store.ensure_layer(
                layer.digest, layer.media_type, layer.annotations, Blobs(tmp_path, bytes(tampered)), guest.unwrap_key
            )
        assert layer_dirs(tmp_path) == []


def test_mount_table_parsing(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text(
        "proc /proc proc rw,nosuid 0 0\n"
        "overlay /run/kata-containers/c1/rootfs overlay rw,relatime,lowerdir=/w/layers/3:/w/layers/1,"
        "upperdir=/w/overlay/x/upperdir,workdir=/w/overlay/x/workdir 0 0\n"
        "overlay /a\\040b overlay rw,lowerdir=/w/with\\040space 0 0\n"
    )
    assert _mounted_lower_dirs(table) == {"/w/layers/3", "/w/layers/1", "/w/with space"}
    assert _mounted_lower_dirs(tmp_path / "missing") is None
