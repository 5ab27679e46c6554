"""Helpers for layer tests: tar building (Python's tarfile), tree snapshots, GNU tar and openat2 oracles."""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted.* xattrs)")
needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")


@dataclass
class Member:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0


def build_tar(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as archive:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.type
            info.mode = m.mode
            info.uid, info.gid = m.uid, m.gid
            info.mtime = m.mtime
            info.linkname = m.linkname
            info.devmajor, info.devminor = m.devmajor, m.devminor
            info.pax_headers = dict(m.pax)
            if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(m.data)
                archive.addfile(info, io.BytesIO(m.data))
            else:
                archive.addfile(info)
    return buf.getvalue()


def file(name: str, data: bytes = b"", **kw: object) -> Member:
    return Member(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def directory(name: str, **kw: object) -> Member:
    kw.setdefault("mode", 0o755)
    return Member(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str, **kw: object) -> Member:
    kw.setdefault("mode", 0o777)
    return Member(name, tarfile.SYMTYPE, linkname=target, **kw)  # type: ignore[arg-type]


def hardlink(name: str, target: str, **kw: object) -> Member:
    return Member(name, tarfile.LNKTYPE, linkname=target, **kw)  # type: ignore[arg-type]


Entry = tuple[object, ...]


def snapshot(root: Path, *, mtimes: bool = True) -> dict[str, Entry]:
    """Every path under `root` (not following links): type, mode, owner, size, content, target, mtime, xattrs,
    and which earlier path it is a hard link of.

    Directory mtimes are left out: GNU tar's placeholders for delayed symlinks and hard links touch directories
    after it restored their times, and implicitly created parents get the current time; the tests check the
    unpacker's directory times on their own.
    """
    result: dict[str, Entry] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            content = target = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = str(path.readlink())
            link_of = None
            if not stat.S_ISDIR(st.st_mode):
                link_of = inodes.setdefault((st.st_dev, st.st_ino), rel)
                link_of = None if link_of == rel else link_of
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                xattrs = {
                    k: os.getxattr(path, k, follow_symlinks=False)
                    for k in sorted(os.listxattr(path, follow_symlinks=False))
                }
            result[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                content,
                target,
                st.st_mtime_ns if mtimes and stat.S_ISREG(st.st_mode) else None,
                tuple(xattrs.items()),
                link_of,
                st.st_rdev if stat.S_ISCHR(st.st_mode) else None,
            )
    return result


def gnu_tar_extract(archive: bytes, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "-x", "-f", "-", "-C", str(dest), "--numeric-owner", "-p", "--xattrs", "--xattrs-include=*"],
        input=archive,
        check=True,
        capture_output=True,
    )


# openat2(2) with RESOLVE_IN_ROOT: the kernel's own in-root resolution, the oracle for the unpacker's walk.
_SYS_OPENAT2 = 437  # same number on every architecture (asm-generic and x86_64)
_RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def openat2_in_root(root_fd: int, path: str) -> int:
    """An O_PATH|O_DIRECTORY fd for `path` resolved with RESOLVE_IN_ROOT; OSError with the kernel's errno."""
    how = _OpenHow(os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT)
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def openat2_available() -> bool:
    root = os.open("/", os.O_PATH)
    try:
        os.close(openat2_in_root(root, "."))
    except OSError:
        return False
    finally:
        os.close(root)
    return True


def zstd_compress(data: bytes) -> bytes:
    """One zstd frame, from the same module the agent uses (stdlib on Python >= 3.14, else the backport)."""
    module = importlib.import_module("compression.zstd" if sys.version_info >= (3, 14) else "backports.zstd")
    compressed: bytes = module.compress(data)
    return compressed
