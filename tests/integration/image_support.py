"""Helpers for the image-pull integration tests: mount checks, rootfs snapshots, file-system change detection."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from agent.image.mount import unmount
from tests.fakes.registry import registry_available


def overlay_unavailable() -> str | None:
    """None when this process can mount overlayfs, else the reason to skip."""
    if os.geteuid() != 0:
        return "mounting the rootfs overlay needs root"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("l", "u", "w", "m"):
            (root / name).mkdir()
        options = f"lowerdir={root}/l,upperdir={root}/u,workdir={root}/w"
        result = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(root / "m")], capture_output=True, check=False
        )
        if result.returncode != 0:
            return f"overlayfs cannot be mounted here: {result.stderr.decode(errors='replace').strip()}"
        subprocess.run(["umount", str(root / "m")], check=True)
    return None


def snapshot(root: Path) -> dict[str, tuple[str, int, int, bytes | str]]:
    """Every entry below `root`: (type, mode, size, content or link target). Overlay whiteouts are not visible."""
    result: dict[str, tuple[str, int, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("symlink", mode, 0, str(path.readlink()))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", mode, 0, b"")
            elif stat.S_ISREG(st.st_mode):
                result[rel] = ("file", mode, st.st_size, path.read_bytes())
            else:
                result[rel] = ("other", mode, st.st_size, b"")
    return result


def tree_state(root: Path, exclude: tuple[Path, ...]) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of everything below `root` except the `exclude` subtrees, for change detection."""
    state: dict[str, tuple[int, int, int]] = {}
    excluded = {str(p) for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if str(Path(dirpath) / d) not in excluded]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            with contextlib.suppress(FileNotFoundError):
                st = path.lstat()
                state[str(path)] = (st.st_mode, st.st_size if not stat.S_ISDIR(st.st_mode) else 0, st.st_mtime_ns)
    return state


def cleanup_mount(bundle: Path, scratch: Path) -> None:
    rootfs = bundle / "rootfs"
    if os.path.ismount(rootfs):
        unmount(rootfs, scratch=scratch, lazy=True)


def image_test_marks(*, overlay: bool) -> list[pytest.MarkDecorator]:
    """`pytestmark` of an image test module: integration, skipped with the reason where Debian's registry (or, for
    tests that mount, overlayfs) is not available."""
    marks = [
        pytest.mark.integration,
        pytest.mark.skipif(registry_available() is not None, reason=str(registry_available())),
    ]
    if overlay:
        marks.append(pytest.mark.skipif(overlay_unavailable() is not None, reason=str(overlay_unavailable())))
    return marks
