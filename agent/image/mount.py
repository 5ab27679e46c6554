"""The container rootfs: a read-write overlay of the image layers at `<bundle>/rootfs`. Edge: mount(2).

As image-rs mounts it (`snapshots/overlay.rs`; image-pull.md §2.9): `mount("overlay", <bundle>/rootfs,
"overlay", 0, "lowerdir=<top>:…:<bottom>,upperdir=…,workdir=…")`, no other flags, `<bundle>/rootfs` created
if absent. The upper and work directories live under `scratch` (the store's `<work_dir>/overlay/`), in a
directory named after the bundle so `unmount` can find and remove it. kata-agent unmounts the rootfs itself
(`umount` + `rmdir`), which leaves that directory behind until the next mount for the same bundle or an
`unmount` through this module.

The mount goes through libc's `mount(2)` via ctypes; failures raise `MountError` with the errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from agent.errors import MountError

__all__ = ["mount_rootfs", "unmount", "scratch_dir_for", "overlay_options", "MAX_OPTIONS"]

MAX_OPTIONS = 4095
"""mount(2) copies at most one page of option text (including the NUL)."""
_MNT_DETACH = 2
_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc  # noqa: PLW0603 - one handle, loaded on first use
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def scratch_dir_for(bundle: Path, scratch: Path) -> Path:
    """`<scratch>/<sha256 of the bundle path>`: where the upper and work directories of its rootfs live."""
    return scratch / hashlib.sha256(os.fsencode(bundle.absolute())).hexdigest()


def overlay_options(layers: Sequence[Path], upper: Path, work: Path) -> str:
    """The overlay option string; `layers` in manifest order (bottom first), listed top first as overlayfs wants."""
    if not layers:
        msg = "an overlay needs at least one layer"
        raise ValueError(msg)
    for path in (*layers, upper, work):
        text = str(path)
        if any(c in text for c in ",:\\\n") or not path.is_absolute():
            msg = f"overlay path {text[:200]!r} is not absolute or holds ',', ':' or '\\'"
            raise MountError(msg)
    lower = ":".join(str(p) for p in reversed(layers))
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if len(options.encode()) > MAX_OPTIONS:
        msg = f"overlay options are {len(options)} bytes for {len(layers)} layers, expected at most {MAX_OPTIONS}"
        raise MountError(msg)
    return options


def mount_rootfs(layers: Sequence[Path], bundle: Path, scratch: Path) -> Path:
    """Mount the layers (manifest order, bottom first) read-write at `<bundle>/rootfs`; return that path.

    `scratch` is the directory for upper/work dirs (same file system as the layers is not required). A fresh,
    empty upper directory is used on every mount.

    Raises:
        MountError: `rootfs` is a symlink or already a mount point, or mount(2) failed (EPERM without
            CAP_SYS_ADMIN, ENODEV without overlayfs, EINVAL for options the kernel refuses).
    """
    rootfs = bundle / "rootfs"
    if rootfs.is_symlink():
        msg = f"{rootfs} is a symbolic link, expected a directory (mount(2) would follow it)"
        raise MountError(msg)
    rootfs.mkdir(mode=0o755, parents=True, exist_ok=True)
    if os.path.ismount(rootfs):
        msg = f"{rootfs} is already a mount point, expected an empty directory"
        raise MountError(msg, errno=errno.EBUSY)
    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    own = scratch_dir_for(bundle, scratch)
    if own.exists():
        shutil.rmtree(own)  # left by an earlier container of the same bundle path, already unmounted
    own.mkdir(mode=0o700)
    upper, work = own / "upperdir", own / "workdir"
    upper.mkdir(mode=0o755)
    work.mkdir(mode=0o700)
    try:
        options = overlay_options(layers, upper, work)
        _mount("overlay", rootfs, "overlay", 0, options)
    except BaseException:
        shutil.rmtree(own, ignore_errors=True)
        raise
    return rootfs


def unmount(rootfs: Path, *, scratch: Path | None = None, lazy: bool = False) -> None:
    """Unmount `rootfs` (detaching it if `lazy`) and remove its upper/work directory under `scratch`, if given.

    Raises:
        MountError: umount2(2) failed (EBUSY while the rootfs is in use, EINVAL if it is not a mount point).
    """
    result = _c().umount2(os.fsencode(rootfs), _MNT_DETACH if lazy else 0)
    if result != 0:
        err = ctypes.get_errno()
        msg = f"unmounting {rootfs} failed: {os.strerror(err)}"
        raise MountError(msg, errno=err)
    if scratch is not None:
        shutil.rmtree(scratch_dir_for(rootfs.parent, scratch), ignore_errors=True)


def _mount(source: str, target: Path, fstype: str, flags: int, options: str) -> None:
    result = _c().mount(source.encode(), os.fsencode(target), fstype.encode(), ctypes.c_ulong(flags), options.encode())
    if result != 0:
        err = ctypes.get_errno()
        advice = {
            errno.EPERM: " (mounting needs root / CAP_SYS_ADMIN)",
            errno.ENODEV: " (the kernel has no overlayfs)",
        }.get(err, "")
        msg = f"mounting the overlay at {target} failed: {os.strerror(err)}{advice}"
        raise MountError(msg, errno=err)
