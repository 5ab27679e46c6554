"""Unix socket files: stale-socket replacement, private modes, removal. Edge (filesystem).

Shared by the gRPC and ttRPC servers so both treat socket files the same way.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from agent.errors import ConfigError
from agent.files import DIR_MODE, private_dirs

__all__ = ["prepare_socket_path", "remove_socket", "secure_socket"]

SOCKET_MODE = 0o600
DIRECTORY_MODE = DIR_MODE


def prepare_socket_path(path: str) -> None:
    """Create the parent directory (0700) if missing and remove a stale socket file.

    A socket file that still accepts connections belongs to a running process: that is an error, not stale.
    A path that exists but is not a socket is never deleted.
    """
    target = Path(path)
    private_dirs(target.parent)
    try:
        info = target.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        msg = f"socket path {path!r} exists and is not a socket; refusing to replace it"
        raise ConfigError(msg, key="socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        target.unlink(missing_ok=True)  # stale: nobody listens
    else:
        msg = f"socket {path!r} is in use by another running process"
        raise ConfigError(msg, key="socket")
    finally:
        probe.close()


def secure_socket(path: str) -> None:
    """Make the socket owner-only (0600)."""
    os.chmod(path, SOCKET_MODE)  # noqa: PTH101 - same call for sockets as files, kept explicit


def remove_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode):
            os.unlink(path)  # noqa: PTH108


def check_listen(address: str | tuple[str, int]) -> None:
    """Bind `address` (a unix socket path, or a TCP `(host, port)`) once ourselves and release it, so that an
    unusable address is reported as `cannot listen on ADDR: <reason>` before a server library prints its own
    lines. Raises `ConfigError`; a live socket file or a non-socket at the path is reported as such."""
    shown = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    try:
        if isinstance(address, str):
            prepare_socket_path(address)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.bind(address)
            os.unlink(address)  # noqa: PTH108
        else:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
                probe.bind(address)
    except OSError as exc:
        msg = f"cannot listen on {shown}: {exc.strerror or 'the address cannot be bound'}"
        raise ConfigError(msg, key="socket") from None
