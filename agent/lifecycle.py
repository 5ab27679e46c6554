"""A daemon's process life: the collector during start-up, the stop signals. Edge (gc, signals).

Loading the daemons allocates some hundred thousand objects that live as long as the process (modules,
classes, the code dataclasses generate) and almost no garbage, yet each allocation burst runs the collector,
which walks everything allocated so far: ~6 ms of a ~100 ms start. The entry points pause it before they import
their modules and turn it back on once the program serves (the few hundred cyclic objects start-up left are
collected later as usual; a collection right then would delay the first call by ~8 ms).

    with gc_paused():             # resumed on the way out, also when start-up fails
        ...                       # imports, configuration, bind, serve; resume_gc() once serving

`stop_signals()` is the stop event of every daemon (here, not in `agent.app`, so that api-server-rest, which
builds no `App`, does not load the configuration world to get it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Iterator

__all__ = ["gc_paused", "pause_gc", "resume_gc", "stop_signals"]

_paused = [False]  # set only when this module turned the collector off, so it never turns on one it did not


def pause_gc() -> None:
    if gc.isenabled():
        gc.disable()
        _paused[0] = True


def resume_gc() -> None:
    if _paused[0]:
        _paused[0] = False
        gc.enable()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The collector off for the block (an entry point's start-up), back on at its end unless `resume_gc` ran
    first; a collector the caller had turned off stays off."""
    pause_gc()
    try:
        yield
    finally:
        resume_gc()


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """An event set on SIGTERM, SIGINT or SIGHUP (the reference exits on SIGINT and SIGHUP), with the handlers
    installed for the whole block: a signal that arrives right after READY=1 is not lost."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
