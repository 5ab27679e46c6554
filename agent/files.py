"""Owner-only files and directories: the one way the agent creates anything that may hold a secret. Edge (filesystem).

- `private_dirs(path)`: creates every missing directory of `path` with mode 0700, whatever the umask
  (`Path.mkdir(parents=True)` gives intermediate directories the umask's mode: 0777 under umask 000).
  Existing directories are left as they are.
- `write_private(path, data)`: writes a 0600 temporary file beside `path`, fsyncs it and renames it over
  `path`. An existing file (of any mode) is replaced, never reopened, so its old mode cannot leak the secret.
- `create_private(path, data)`: creates `path` with O_EXCL and mode 0600; an existing path is an error.

Modes are set with fchmod/chmod after creation too, so a umask cannot loosen or tighten them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "create_private", "private_dirs", "write_private"]

DIR_MODE = 0o700
FILE_MODE = 0o600
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def private_dirs(path: str | os.PathLike[str]) -> None:
    """Create `path` and its missing parents, each 0700. Raises `OSError` (e.g. a parent is a file)."""
    missing: list[Path] = []
    current = Path(path)
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)  # noqa: PTH102 - the mode of exactly this directory
        except FileExistsError:
            continue  # created meanwhile by someone else: not ours to change
        os.chmod(directory, DIR_MODE)  # noqa: PTH101 - the umask may have removed owner bits


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (O_EXCL, 0600) and write `data`; a file this call created is removed if writing fails."""
    fd = os.open(path, _CREATE, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def create_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Create `path` (0600, O_EXCL) holding `data`. Raises `FileExistsError` if anything is at `path`."""
    _write_new(Path(path), data)


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace `path` by a 0600 file holding `data` (temporary file + fsync + rename).

    Raises `IsADirectoryError` if `path` is a directory, `OSError` for anything else that fails; on failure
    `path` is unchanged and no temporary file is left behind.
    """
    target = Path(path)
    if target.is_dir():
        msg = f"{target} is a directory"
        raise IsADirectoryError(msg)
    temporary = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
    try:
        _write_new(temporary, data)
        os.replace(temporary, target)  # noqa: PTH105 - explicit about the atomic rename
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
