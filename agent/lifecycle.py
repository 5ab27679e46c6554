"""The collector during a daemon's start-up. Edge (the interpreter's garbage collector).

Loading the daemons allocates some hundred thousand objects that live as long as the process (modules,
classes, the code dataclasses generate) and almost no garbage, yet each allocation burst runs the collector,
which walks everything allocated so far: ~6 ms of a ~100 ms start. The entry points pause it before they import
their modules; once the program serves, `resume_gc(freeze=True)` moves what start-up allocated to the
permanent generation (no later collection walks it again) and turns the collector back on.

    pause_gc()
    try:
        ...                       # imports, configuration, bind, serve
    finally:
        resume_gc()               # also when start-up fails; a no-op if it was resumed already
"""

from __future__ import annotations

import gc

__all__ = ["pause_gc", "resume_gc"]

_paused = [False]  # set only when this module turned the collector off, so it never turns on one it did not


def pause_gc() -> None:
    if gc.isenabled():
        gc.disable()
        _paused[0] = True


def resume_gc(*, freeze: bool = False) -> None:
    if not _paused[0]:
        return
    _paused[0] = False
    if freeze:
        gc.freeze()
    gc.enable()
