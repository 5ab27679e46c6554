"""Deferred logging (`agent.log.configure(..., defer=True)`): the daemons answer before structlog is loaded, and no
line is lost or reordered: kept lines come out through the same processors, with their own time and request."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import structlog

from agent import log

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    log.configure("info", "json", stream=io.StringIO())  # back to direct mode: nothing is kept for later tests
    structlog.reset_defaults()


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_kept_lines_come_out_at_release_in_order_with_their_time_and_request(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream, defer=True)
    logger = log.get_logger("t")
    logger.debug("below.level")
    before = time.time()
    logger.info("first", n=1)
    log.bind_request(rpc="/s/M", request_id="abc", transport="ttrpc")
    logger.warning("in.request", code="OK")
    log.clear_request()
    logger.info("third", secret="hunter2", blob=b"xyz")
    logged = time.time()
    time.sleep(0.05)
    assert stream.getvalue() == ""  # kept, not written
    log.release()
    lines = _lines(stream)
    assert [line["event"] for line in lines] == ["first", "in.request", "third"]
    assert lines[1] == {
        "code": "OK",
        "event": "in.request",
        "rpc": "/s/M",
        "request_id": "abc",
        "transport": "ttrpc",
        "level": "warning",
        "timestamp": lines[1]["timestamp"],
    }
    assert "rpc" not in lines[0]
    assert "rpc" not in lines[2]
    assert lines[2]["secret"] == "<redacted>"
    assert lines[2]["blob"] == "<3 bytes>"
    assert all(str(line["timestamp"]).endswith("Z") for line in lines)  # TimeStamper's format
    stamps = [datetime.fromisoformat(str(line["timestamp"])).timestamp() for line in lines]
    # the time they were logged, not released (the ISO text keeps whole microseconds: 1 ms of slack)
    assert all(before - 0.001 <= stamp <= logged + 0.001 for stamp in stamps)
    logger.info("after.release")  # written at once
    assert _lines(stream)[-1]["event"] == "after.release"


def test_an_error_line_releases_at_once_after_the_kept_lines(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream, defer=True)
    logger = log.get_logger("t")
    logger.info("kept")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    lines = _lines(stream)
    assert [line["event"] for line in lines] == ["kept", "failed"]
    assert lines[1]["level"] == "error"
    assert lines[1]["exc_type"] == "ValueError"


def test_a_warning_with_exc_info_keeps_the_exception_being_handled(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream, defer=True)
    try:
        raise KeyError("k")
    except KeyError:
        log.get_logger("t").warning("handled", exc_info=True)
    log.release()
    assert _lines(stream)[0]["exc_type"] == "KeyError"


def test_a_later_configure_keeps_lines_that_passed_the_earlier_level(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream, defer=True)
    log.get_logger("t").info("translating")  # the drop-ins log while reading their config
    log.configure("error", "json", stream=stream, defer=True)  # then the config asks for errors only
    log.get_logger("t").info("dropped")
    log.release()
    assert [line["event"] for line in _lines(stream)] == ["translating"]


def test_the_timer_releases_kept_lines(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "DEFER_S", 0.05)
    log.configure("info", "json", stream=stream, defer=True)
    log.get_logger("t").info("by.timer")
    deadline = time.monotonic() + 30
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [line["event"] for line in _lines(stream)] == ["by.timer"]


def test_an_eager_configure_writes_kept_lines_first(stream: io.StringIO) -> None:
    log.configure("info", "json", stream=stream, defer=True)
    log.get_logger("t").info("kept")
    log.configure("info", "json", stream=stream)
    structlog.get_logger("t").info("direct")
    assert [line["event"] for line in _lines(stream)] == ["kept", "direct"]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_a_process_that_logs_nothing_at_its_level_never_loads_structlog() -> None:
    result = _run(
        "import sys, time\n"
        "from agent import log\n"
        "log.configure('error', 'json', defer=True)\n"
        "log.get_logger('t').info('quiet')\n"
        "log.get_logger('t').warning('quiet too')\n"
        "log.release()\n"
        "log.get_logger('t').info('still quiet')\n"
        "print('structlog' in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert result.stderr == ""


def test_kept_lines_are_written_at_exit_before_structlog_was_ever_loaded() -> None:
    result = _run(
        "import sys\n"
        "from agent import log\n"
        "log.configure('info', 'json', defer=True)\n"
        "log.get_logger('t').info('early.exit', n=1)\n"
        "print('structlog' in sys.modules)\n"
        "sys.exit(3)\n"
    )
    assert result.returncode == 3
    assert result.stdout.strip() == "False"  # nothing loaded while the line was kept
    assert [json.loads(line)["event"] for line in result.stderr.splitlines()] == ["early.exit"]


def test_an_uncaught_exception_writes_kept_lines_then_the_crash_line() -> None:
    result = _run(
        "from agent import log\n"
        "log.configure('info', 'json', defer=True)\n"
        "log.get_logger('t').info('before.crash')\n"
        "raise RuntimeError('a bug')\n"
    )
    assert result.returncode == 1
    events = [json.loads(line)["event"] for line in result.stderr.splitlines()]
    assert events == ["before.crash", "process.crash"]
