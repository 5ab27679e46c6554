"""`SharedValue`: a cached value refreshed by one task for all concurrent callers. Pure asyncio helper.

Used for the attested KBS session and for passport-mode tokens: callers that arrive while a refresh runs share
its result, including its failure; a cancelled caller does not cancel the refresh the others wait for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["SharedValue"]

T = TypeVar("T")


class SharedValue(Generic[T]):
    def __init__(self, fetch: Callable[[], Awaitable[T]], usable: Callable[[T], bool]) -> None:
        self._fetch = fetch
        self._usable = usable
        self._value: T | None = None
        self._inflight: asyncio.Future[T] | None = None
        self.refreshes = 0

    @property
    def value(self) -> T | None:
        return self._value

    def clear(self) -> None:
        self._value = None

    async def get(self, *, stale: T | None = None) -> T:
        """The current value, refreshed when missing, unusable, or identical to `stale` (a rejected value)."""
        current = self._value
        if current is not None and current is not stale and self._usable(current):
            return current
        if self._inflight is None:
            self._value = None
            self._inflight = asyncio.ensure_future(self._refresh())
            # the outcome is always retrieved, even if every waiter was cancelled
            self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._inflight)

    async def _refresh(self) -> T:
        try:
            self.refreshes += 1
            self._value = await self._fetch()
            return self._value
        finally:
            self._inflight = None
