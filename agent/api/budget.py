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
    a call of a heavy method            (one that has made a reply over 64 KiB, see `HandlerSlots`) reserves
                                        the largest reply its method has made *before* its handler runs,
                                        waiting up to `wait_s` (it holds no reply yet, so any number may
                                        wait), or is answered RESOURCE_EXHAUSTED without any work done; the
                                        reservation shrinks to the reply once made. So peers whose replies
                                        would be refused cannot make the agent fetch and decrypt in a loop.

A reply's size is known only once its handler has produced it, so a call of a method not known to be heavy is
charged then: a reply waiting for budget is already in memory, which is why waiting is limited by bytes too.
Reserving the largest reply (4 MiB) before every call instead would let eight peers that never read shut out
even `GetTeeType`.

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

from agent.api.status import ReplyRefused, StatusCode

__all__ = ["DEFAULT_REPLY_BUDGET", "EXEMPT_REPLY_BYTES", "Charge", "HandlerSlots", "ReplyBudget", "Slot"]

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

    def shrink_to(self, size: int) -> None:
        """Give back what exceeds `size` bytes (all of it if `size` is exempt from charges)."""
        budget = self._budget
        if budget is None:
            return
        if size <= budget.exempt_bytes:
            self.release()
        elif size < self.size:
            excess, self.size = self.size - size, size
            budget._give_back(excess)


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

    async def charge(self, size: int, *, reserve: bool = False) -> Charge | None:
        """Charge `size` bytes, waiting for room as the module docstring says; None if refused.

        `reserve`: the bytes are not in memory yet (a reservation before the work): charged whatever their size,
        and the wait is not limited by `max_waiting_bytes`.
        """
        if size <= self.exempt_bytes and not reserve:
            return Charge(None, 0)
        size = min(size, self.limit_bytes)
        if not self._waiters and self.held + size <= self.limit_bytes:
            self.held += size
            return Charge(self, size)
        if self.wait_s == 0 or (not reserve and self.waiting + size > self.max_waiting_bytes):
            self.refused += 1
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        counted = 0 if reserve else size  # `waiting` counts bytes held in memory while waiting
        self.waiting += counted
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
            self.waiting -= counted
            if not future.done():
                self._waiters.remove(entry)
                future.cancel()
                self._wake()  # a smaller reply behind this one may fit now
        if future.cancelled():
            self.refused += 1
            return None
        return Charge(self, size)  # granted by `_wake`, which has charged it

    async def charge_reply(self, size: int, reserved: Charge | None = None) -> Charge | None:
        """Charge a reply of `size` bytes whose call reserved `reserved` before its handler ran (taken over).

        The reservation shrinks to the reply if the reply fits in it; otherwise it is given back first and the
        reply is charged as `charge` does. None if refused.
        """
        if reserved is not None and size <= reserved.size:
            reserved.shrink_to(size)
            return reserved
        if reserved is not None:
            reserved.release()
        return await self.charge(size)

    def refusal(self, size: int) -> ReplyRefused:
        """What gRPC and ttRPC answer for a reply (or reservation) of `size` bytes this budget refused."""
        msg = (
            f"reply is {size} bytes and the {self.limit_bytes}-byte reply budget is held by replies waiting for"
            " their readers; try again"
        )
        return ReplyRefused(StatusCode.RESOURCE_EXHAUSTED, msg, length=size, limit=self.limit_bytes, held=self.held)

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


class HandlerSlots:
    """Handlers at work: at most `limit`, and of them at most `heavy_limit` for heavy methods.

    A method is heavy once it has made a reply over `exempt_bytes` (e.g. `GetResource` of a large secret): its
    calls cost a KBS fetch, decoding and decryption of that size. Limiting them apart bounds their working
    memory (the part of a large reply the budget cannot see: it exists before the reply does) and keeps cheap
    calls such as `GetTeeType` from queueing behind them.

    Args:
        limit: handlers at once.
        heavy_limit: handlers of heavy methods at once.
    """

    def __init__(self, limit: int, *, heavy_limit: int = 4, exempt_bytes: int = EXEMPT_REPLY_BYTES) -> None:
        if limit < 1 or heavy_limit < 1:
            msg = f"`limit` is {limit} and `heavy_limit` {heavy_limit}, expected both at least 1"
            raise ValueError(msg)
        self.limit = limit
        self.heavy_limit = heavy_limit
        self.exempt_bytes = exempt_bytes
        self._all = asyncio.Semaphore(limit)
        self._heavy = asyncio.Semaphore(heavy_limit)
        self._heavy_methods: dict[str, int] = {}  # path -> largest reply it has made

    def reply_size(self, method: str) -> int:
        """The largest reply `method` has made if it is heavy, else 0."""
        return self._heavy_methods.get(method, 0)

    async def start(self, method: str, budget: ReplyBudget, *, framing: int = 0) -> tuple[Slot, Charge | None] | None:
        """Take a slot for a call of `method` (its path), reserving its reply first if it is heavy.

        Returns the slot and the reservation (None for a light method), or None if the budget refused the
        reservation (no work may start). A call that waited as light while its method became heavy goes back
        to reserve and queue as heavy. The caller bounds the wait for a slot.
        """
        reserved: Charge | None = None
        try:
            while True:
                expected = self.reply_size(method)
                if expected and reserved is None:
                    reserved = await budget.charge(expected + framing, reserve=True)
                    if reserved is None:
                        return None
                heavy = reserved is not None
                if heavy:
                    await self._heavy.acquire()  # first: a heavy call waiting holds no general slot
                try:
                    await self._all.acquire()
                except BaseException:
                    if heavy:
                        self._heavy.release()
                    raise
                if heavy or not self.reply_size(method):
                    slot, charge, reserved = Slot(self, heavy), reserved, None
                    return slot, charge
                self._all.release()  # it became heavy while this call waited: reserve, then queue as heavy
        finally:
            if reserved is not None:
                reserved.release()

    def made(self, method: str, size: int) -> None:
        """Record that a call of `method` (a served method's path) made a reply of `size` bytes."""
        if size > self.exempt_bytes:
            self._heavy_methods[method] = max(size, self._heavy_methods.get(method, 0))

    def _release(self, heavy: bool) -> None:
        self._all.release()
        if heavy:
            self._heavy.release()


class Slot:
    """A handler slot from `HandlerSlots.acquire`; `release()` is idempotent."""

    __slots__ = ("_heavy", "_slots")

    def __init__(self, slots: HandlerSlots, heavy: bool) -> None:
        self._slots: HandlerSlots | None = slots
        self._heavy = heavy

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots._release(self._heavy)
