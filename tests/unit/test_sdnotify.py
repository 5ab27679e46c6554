"""agent.sdnotify against a real AF_UNIX datagram socket, as systemd's notify socket receives it."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent import log as agent_log
from agent import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def pending(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
        sock.settimeout(5)
    return out


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_gone_socket_is_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    assert sdnotify.notify("READY=1") is False


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"cvm-agent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STATUS=x", "READY=1") is True
        assert sock.recv(4096) == b"STATUS=x\nREADY=1"


async def test_ready_without_watchdog(notify_socket: socket.socket) -> None:
    sdnotify.ready(status="serving")
    assert notify_socket.recv(4096) == f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving".encode()
    await asyncio.sleep(0.05)
    assert pending(notify_socket) == []
    sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize(("usec", "pid", "expected"), [("2000000", None, 2.0), ("0", None, None), ("x", None, None)])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, expected: float | None) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert sdnotify.watchdog_interval() == expected


def test_watchdog_meant_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.0


async def test_watchdog_pings_come_from_the_loop_and_stop_when_it_is_stuck(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # 40 ms: pings every 20 ms
    sdnotify.ready()
    assert notify_socket.recv(4096).startswith(b"READY=1")
    await asyncio.sleep(0.2)
    pings = pending(notify_socket)
    assert len(pings) >= 2
    assert set(pings) == {b"WATCHDOG=1"}
    time.sleep(0.3)  # noqa: ASYNC251 - deliberately stuck loop: nothing runs the watchdog task
    assert pending(notify_socket) == []
    await asyncio.sleep(0.1)
    assert b"WATCHDOG=1" in pending(notify_socket)
    sdnotify.stopping()
    await asyncio.sleep(0.1)
    assert pending(notify_socket) == [b"STOPPING=1"]


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_structlog")
def test_journal_priorities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal"
    with path.open("w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        agent_log.configure("debug", "json", stream)
        logger = structlog.get_logger("test")
        logger.error("e.one")
        logger.warning("w.one", token="secret-value")
        logger.info("i.one")
        logger.debug("d.one")
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<3>", "<4>", "<6>", "<7>"]
    assert "secret-value" not in path.read_text()


@pytest.mark.usefixtures("restore_structlog")
def test_no_priority_prefix_off_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    path = tmp_path / "plain"
    with path.open("w") as stream:
        agent_log.configure("info", "json", stream)
        structlog.get_logger("test").warning("w.one")
    assert path.read_text().startswith("{")
