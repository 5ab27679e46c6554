"""The reply budget: bytes of replies made for local peers and not yet handed to the kernel. Edge (asyncio).

One `ReplyBudget` is shared by every connection of the servers it is given to (in the daemon: gRPC and both
ttRPC sockets; api-server-rest has its own), so what peers that do not read can make the process hold is
bounded by the budget, not by how many connections or calls they open:

    reply size                          what happens
    ----------------------------------  -------------------------------------------------------------------
    up to `exempt_bytes` (64 KiB)       not charged (status replies, tokens, TEE types): such replies are
                                        bounded by the transports' own per-connection limits instead, and
                                        stay available to every caller however full the budget is
    fits in the budget now, nobody      charged until the transport has written it (or dropped the peer);
    waiting                             `release()` gives it back
    does not fit                        waits, first come first served, up to `wait_s`, as long as the
                                        replies already waiting hold less than `max_waiting_bytes` (a
                                        quarter of the budget); then it is charged, or refused
    otherwise                           refused at once: the transport answers RESOURCE_EXHAUSTED and the
                                        reply is dropped

A reply's size is known only once its handler has produced it, so it is charged then: a reply waiting for
budget is already in memory, which is why waiting is limited by bytes too. Reserving the largest reply (4 MiB)
before every call instead would let eight peers that never read shut out even `GetTeeType`.

Example:

    budget = ReplyBudget(32 * 1024 * 1024)
    charge = await budget.charge(len(reply))
    if charge is None:
        ...  # answer RESOURCE_EXHAUSTED
    try:
        ...  # write the reply, wait for the peer to take it (with a timeout)
    finally:
        charge.release()
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

__all__ = ["DEFAULT_REPLY_BUDGET", "EXEMPT_REPLY_BYTES", "Charge", "ReplyBudget"]

DEFAULT_REPLY_BUDGET: Final = 32 * 1024 * 1024
EXEMPT_REPLY_BYTES: Final = 64 * 1024
_MIN_BUDGET: Final = 4 * 1024 * 1024 + 64 * 1024
"""The largest reply (4 MiB, the message limit of every transport) with its framing must fit."""


class Charge:
    """Bytes charged to a `ReplyBudget`; `release()` gives them back (idempotent)."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: ReplyBudget | None, size: int) -> None:
        self._budget = budget
        self.size = size

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.size)


class ReplyBudget:
    """A byte semaphore for replies (see the module docstring).

    Args:
        limit_bytes: bytes that may be charged at once; at least 4 MiB + 64 KiB (one largest reply).
        exempt_bytes: replies up to this size are not charged.
        wait_s: how long a reply waits for budget before it is refused.
        max_waiting_bytes: replies waiting for budget hold at most this many bytes (default: a quarter of
            `limit_bytes`); a further one is refused at once.

    Raises:
        ValueError: `limit_bytes` is too small or a bound is negative.
    """

    def __init__(
        self,
        limit_bytes: int = DEFAULT_REPLY_BUDGET,
        *,
        exempt_bytes: int = EXEMPT_REPLY_BYTES,
        wait_s: float = 10.0,
        max_waiting_bytes: int | None = None,
    ) -> None:
        if limit_bytes < _MIN_BUDGET:
            msg = f"`limit_bytes` is {limit_bytes}, expected at least {_MIN_BUDGET}"
            raise ValueError(msg)
        if exempt_bytes < 0 or wait_s < 0:
            msg = f"`exempt_bytes` is {exempt_bytes} and `wait_s` {wait_s}, expected both at least 0"
            raise ValueError(msg)
        self.limit_bytes = limit_bytes
        self.exempt_bytes = exempt_bytes
        self.wait_s = wait_s
        self.max_waiting_bytes = limit_bytes // 4 if max_waiting_bytes is None else max_waiting_bytes
        self.held = 0
        """Bytes charged now."""
        self.waiting = 0
        """Bytes of replies waiting for budget now."""
        self.refused = 0
        """Replies refused since start."""
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def charge(self, size: int) -> Charge | None:
        """Charge `size` bytes, waiting for room as the module docstring says; None if refused."""
        if size <= self.exempt_bytes:
            return Charge(None, 0)
        size = min(size, self.limit_bytes)
        if not self._waiters and self.held + size <= self.limit_bytes:
            self.held += size
            return Charge(self, size)
        if self.waiting + size > self.max_waiting_bytes or self.wait_s == 0:
            self.refused += 1
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        self.waiting += size
        try:
            async with asyncio.timeout(self.wait_s):
                await asyncio.shield(future)  # `_wake` grants it; only this coroutine gives it up
        except TimeoutError:
            pass
        except BaseException:
            if future.done() and not future.cancelled():
                self._give_back(size)  # granted, but the caller is gone (cancelled)
            raise
        finally:
            self.waiting -= size
            if not future.done():
                self._waiters.remove(entry)
                future.cancel()
                self._wake()  # a smaller reply behind this one may fit now
        if future.cancelled():
            self.refused += 1
            return None
        return Charge(self, size)  # granted by `_wake`, which has charged it

    def _give_back(self, size: int) -> None:
        self.held -= size
        self._wake()

    def _wake(self) -> None:
        """Grant waiting replies in order while the first one fits."""
        while self._waiters:
            size, future = self._waiters[0]
            if self.held + size > self.limit_bytes:
                return
            self._waiters.popleft()
            self.held += size
            future.set_result(None)
