"""`SharedValue`: a cached value refreshed by one task for all concurrent callers (single flight). asyncio helper.

The one single-flight in the agent: the attested KBS session, passport-mode tokens and per-`kid` image KEKs.
Callers that arrive while a refresh runs share its result, including its failure; a cancelled caller does not
cancel the refresh the others wait for. A refresh may also start in the background (`refresh()`), in which case
the current value keeps being served until the new one arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["SharedValue"]

T = TypeVar("T")


class SharedValue(Generic[T]):
    def __init__(self, fetch: Callable[[], Awaitable[T]], usable: Callable[[T], bool], *, keep: bool = True) -> None:
        """`usable(value)` says whether a cached value may still be served; `keep=False` never caches one."""
        self._fetch = fetch
        self._usable = usable
        self._keep = keep
        self._value: T | None = None
        self._inflight: asyncio.Future[T] | None = None
        self.refreshes = 0

    @property
    def value(self) -> T | None:
        return self._value

    @property
    def busy(self) -> bool:
        """A refresh is running."""
        return self._inflight is not None

    def clear(self) -> None:
        self._value = None

    def cancel(self) -> None:
        """Stop a running refresh (at shutdown); its waiters get CancelledError."""
        if self._inflight is not None:
            self._inflight.cancel()

    async def get(self, *, stale: T | None = None) -> T:
        """The current value, refreshed when missing, unusable, or identical to `stale` (a rejected value)."""
        current = self._value
        if current is not None and current is not stale and self._usable(current):
            return current
        if self._inflight is None:
            self._value = None
        return await asyncio.shield(self.refresh())

    def refresh(self) -> asyncio.Future[T]:
        """Start a refresh (or join the running one) without waiting; the current value stays until it succeeds."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh())
            # the outcome is always retrieved, even if every waiter was cancelled or nobody waited
            self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._inflight

    async def _refresh(self) -> T:
        try:
            self.refreshes += 1
            value = await self._fetch()
            if self._keep:
                self._value = value
            return value
        finally:
            self._inflight = None
