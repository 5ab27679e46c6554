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


def test_gc_paused_is_off_inside_and_back_on_after_a_failure() -> None:
    gc.enable()
    inside: list[bool] = []

    def start_up() -> None:
        with lifecycle.gc_paused():
            inside.append(gc.isenabled())
            raise RuntimeError

    with pytest.raises(RuntimeError):
        start_up()
    assert inside == [False]
    assert gc.isenabled()


def test_gc_paused_keeps_a_collector_the_caller_turned_off() -> None:
    gc.disable()
    with lifecycle.gc_paused():
        pass
    assert not gc.isenabled()
