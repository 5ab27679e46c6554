"""Log lines under journald carry their priority; crash summaries name places, never values."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import structlog

from agent import log


def test_journal_stream_lines_carry_syslog_priorities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "journal").open("w+") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        log.configure("debug", "json", stream=stream)
        logger = structlog.get_logger("t")
        logger.debug("d")
        logger.info("i")
        logger.warning("w")
        logger.error("e")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e"]


def test_other_streams_get_plain_lines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with (tmp_path / "file").open("w+") as stream:
        log.configure("info", "json", stream=stream)
        structlog.get_logger("t").warning("w")
        stream.seek(0)
        assert json.loads(stream.read())["event"] == "w"
    log.configure("info", "json", stream=io.StringIO())


def test_crash_summary_names_the_place_and_never_a_value() -> None:
    def inner(secret: bytes) -> None:
        raise ValueError(secret.hex())

    try:
        inner(b"kek-material-0123456789")
    except ValueError as exc:
        summary = log.crash_summary(exc)
    assert summary.startswith("ValueError at test_log_journal.py:")
    assert " in inner <- test_log_journal.py:" in summary
    assert "kek" not in summary
    assert b"kek-material".hex() not in summary
