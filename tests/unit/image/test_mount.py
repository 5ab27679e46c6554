"""The rootfs overlay through real mount(2)/umount2(2): whiteouts and opaque dirs as overlayfs reads them."""

from __future__ import annotations

import errno
import io
import os
import re
from pathlib import Path

import pytest

from agent.errors import MountError
from agent.image.mount import mount_rootfs, overlay_options, scratch_dir_for, unmount
from agent.image.unpack import unpack_layer
from tests.unit.image.tarfixtures import build_tar, directory, file, needs_root


def _has_overlay() -> bool:
    try:
        return "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        return False


needs_overlay = pytest.mark.skipif(not _has_overlay(), reason="the kernel has no overlayfs (or it is not loaded)")


def layer(path: Path, members: list) -> Path:  # type: ignore[type-arg]
    path.mkdir(parents=True)
    unpack_layer(io.BytesIO(build_tar(members)), path)
    return path


class TestOverlayOptions:
    def test_top_layer_first(self) -> None:
        options = overlay_options([Path("/l/1"), Path("/l/2"), Path("/l/3")], Path("/o/u"), Path("/o/w"))
        assert options == "lowerdir=/l/3:/l/2:/l/1,upperdir=/o/u,workdir=/o/w"

    @pytest.mark.parametrize("bad", ["/l/a:b", "/l/a,b", "relative"])
    def test_paths_that_would_split_the_options_are_refused(self, bad: str) -> None:
        with pytest.raises(MountError, match="is not absolute or holds"):
            overlay_options([Path(bad)], Path("/u"), Path("/w"))

    def test_one_page_of_options_at_most(self) -> None:
        layers = [Path(f"/run/kata-containers/image/layers/{n}") for n in range(200)]
        with pytest.raises(MountError, match=re.escape("for 200 layers, expected at most 4095")):
            overlay_options(layers, Path("/u"), Path("/w"))


@needs_root
@needs_overlay
class TestMount:
    def test_whiteouts_opaque_dirs_and_writes(self, tmp_path: Path) -> None:
        bottom = layer(
            tmp_path / "layers/1",
            [
                directory("etc"),
                file("etc/keep", b"keep"),
                file("etc/gone", b"gone"),
                directory("var/cache"),
                file("var/cache/old", b"old"),
                file("bin/su", b"su", mode=0o4755),
            ],
        )
        top = layer(
            tmp_path / "layers/2",
            [
                file("etc/.wh.gone"),
                directory("var/cache"),
                file("var/cache/.wh..wh..opq"),
                file("var/cache/new", b"new"),
            ],
        )
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        scratch = tmp_path / "overlay"
        rootfs = mount_rootfs([bottom, top], bundle, scratch)
        try:
            assert rootfs == bundle / "rootfs"
            assert os.path.ismount(rootfs)
            assert sorted(p.name for p in (rootfs / "etc").iterdir()) == ["keep"]
            assert sorted(p.name for p in (rootfs / "var/cache").iterdir()) == ["new"]
            assert (rootfs / "bin/su").stat().st_mode & 0o7777 == 0o4755
            (rootfs / "etc/written").write_bytes(b"rw")
            assert (scratch_dir_for(bundle, scratch) / "upperdir/etc/written").read_bytes() == b"rw"
            assert not (bottom / "etc/written").exists()
            with pytest.raises(MountError, match="already a mount point") as info:
                mount_rootfs([bottom], bundle, scratch)
            assert info.value.errno == errno.EBUSY
        finally:
            unmount(rootfs, scratch=scratch)
        assert not os.path.ismount(rootfs)
        assert not scratch_dir_for(bundle, scratch).exists()
        assert list(rootfs.iterdir()) == []  # kata-agent removes the directory; it must be empty once unmounted

    def test_a_symlinked_rootfs_is_refused(self, tmp_path: Path) -> None:
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (tmp_path / "elsewhere").mkdir()
        (bundle / "rootfs").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(MountError, match="is a symbolic link"):
            mount_rootfs([tmp_path], bundle, tmp_path / "overlay")
        assert not os.path.ismount(tmp_path / "elsewhere")

    def test_unmount_of_a_plain_directory_is_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(MountError, match=re.escape(f"unmounting {tmp_path} failed: Invalid argument")) as info:
            unmount(tmp_path)
        assert info.value.errno == errno.EINVAL

    def test_a_failed_mount_leaves_no_scratch(self, tmp_path: Path) -> None:
        bundle = tmp_path / "bundle"
        with pytest.raises(MountError, match=r"mounting the overlay at .* failed: No such file"):
            mount_rootfs([tmp_path / "missing-layer"], bundle, tmp_path / "overlay")
        assert list((tmp_path / "overlay").iterdir()) == []
        assert not os.path.ismount(bundle / "rootfs")
