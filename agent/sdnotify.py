"""systemd's service notification protocol (`sd_notify`): READY, WATCHDOG, STOPPING. Edge (the notify socket).

Nothing happens unless systemd started the process with `NOTIFY_SOCKET` set (a `Type=notify` unit), so the calls are
safe everywhere else (kata-agent, a shell, tests). When the unit sets `WatchdogSec=`, `ready()` starts a task on the
running event loop that sends `WATCHDOG=1` at half the interval: if the loop stops turning (a blocking call, a
deadlock), the pings stop and systemd kills and restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket

__all__ = ["notify", "ready", "stopping", "watchdog_interval"]

_tasks: set[asyncio.Task[None]] = set()


def _address(target: str) -> str:
    return "\0" + target[1:] if target.startswith("@") else target


def notify(*fields: str) -> bool:
    """Send `KEY=value` fields to systemd; False when not started by systemd or the socket is gone."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not fields:
        return False
    payload = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, _address(target))
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog period systemd asked for (`WATCHDOG_USEC`) in seconds, if it is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


async def _watchdog(period: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(period)


def ready(status: str | None = None) -> None:
    """READY=1 once the sockets accept calls; starts the watchdog pings when the unit asked for them.

    Must be called from the running event loop that serves the requests: that loop is what the watchdog watches.
    """
    fields = ["READY=1", f"MAINPID={os.getpid()}"]
    if status:
        fields.append(f"STATUS={status}")
    notify(*fields)
    interval = watchdog_interval()
    if interval is not None:
        task = asyncio.get_running_loop().create_task(_watchdog(interval / 2), name="sd-watchdog")
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)


def stopping() -> None:
    """STOPPING=1, and no more watchdog pings (a slow shutdown is bounded by TimeoutStopSec=, not the watchdog)."""
    notify("STOPPING=1")
    for task in list(_tasks):
        task.cancel()
