"""The collector is paused during a daemon's start-up and left as the caller had it afterwards."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from agent import lifecycle


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    lifecycle.resume_gc()
    if enabled:
        gc.enable()


def test_pause_then_resume_turns_the_collector_off_then_on() -> None:
    gc.enable()
    lifecycle.pause_gc()
    assert not gc.isenabled()
    lifecycle.resume_gc()
    assert gc.isenabled()
    lifecycle.resume_gc()  # a second resume (run() and main's finally) changes nothing
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off() -> None:
    gc.disable()
    lifecycle.pause_gc()
    lifecycle.resume_gc()
    assert not gc.isenabled()
