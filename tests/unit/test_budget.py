"""The reply budget: what is charged, who waits, who is refused, and that every byte comes back."""

from __future__ import annotations

import asyncio

import pytest

from agent.api.budget import EXEMPT_REPLY_BYTES, HandlerSlots, ReplyBudget
from agent.api.status import StatusCode

MIB = 1024 * 1024


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^`limit_bytes` is 4194304, expected at least 4259840$"):
        ReplyBudget(4 * MIB)
    with pytest.raises(ValueError, match="expected both at least 0"):
        ReplyBudget(8 * MIB, wait_s=-1)


async def test_small_replies_are_never_charged_nor_refused() -> None:
    budget = ReplyBudget(8 * MIB, wait_s=0)
    big = await budget.charge(8 * MIB)
    assert big is not None
    assert budget.held == 8 * MIB
    small = await budget.charge(EXEMPT_REPLY_BYTES)
    assert small is not None
    assert small.size == 0
    assert budget.held == 8 * MIB
    assert await budget.charge(EXEMPT_REPLY_BYTES + 1) is None  # no waiting allowed: refused at once
    assert budget.refused == 1
    big.release()
    big.release()  # idempotent
    assert budget.held == 0


async def test_a_waiting_reply_gets_the_bytes_given_back() -> None:
    budget = ReplyBudget(8 * MIB, wait_s=5, max_waiting_bytes=4 * MIB)
    first = await budget.charge(6 * MIB)
    assert first is not None
    waiting = asyncio.create_task(budget.charge(2 * MIB + 1))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert budget.waiting == 2 * MIB + 1
    first.release()
    second = await asyncio.wait_for(waiting, 1)
    assert second is not None
    assert budget.held == 2 * MIB + 1
    assert budget.waiting == 0
    second.release()
    assert budget.held == 0


async def test_waiting_is_bounded_in_time_and_in_bytes() -> None:
    budget = ReplyBudget(8 * MIB, wait_s=0.05, max_waiting_bytes=3 * MIB)
    held = await budget.charge(8 * MIB)
    assert held is not None
    waiter = asyncio.create_task(budget.charge(2 * MIB))
    await asyncio.sleep(0.01)
    assert await budget.charge(2 * MIB) is None  # 4 MiB would be waiting: refused at once
    assert await waiter is None  # waited 50 ms, then refused
    assert budget.refused == 2
    assert budget.waiting == 0
    held.release()
    assert budget.held == 0


async def test_replies_are_granted_first_come_first_served() -> None:
    budget = ReplyBudget(8 * MIB, wait_s=5, max_waiting_bytes=4 * MIB)
    held = await budget.charge(7 * MIB)
    assert held is not None
    big = asyncio.create_task(budget.charge(2 * MIB))
    await asyncio.sleep(0.01)
    small = asyncio.create_task(budget.charge(MIB // 2))  # would fit now, but a larger reply waits before it
    await asyncio.sleep(0.01)
    assert not small.done()
    held.release()
    charges = await asyncio.wait_for(asyncio.gather(big, small), 1)
    assert [c.size for c in charges if c is not None] == [2 * MIB, MIB // 2]
    for charge in charges:
        assert charge is not None
        charge.release()
    assert budget.held == 0


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    budget = ReplyBudget(8 * MIB, wait_s=5, max_waiting_bytes=4 * MIB)
    held = await budget.charge(8 * MIB)
    assert held is not None
    waiter = asyncio.create_task(budget.charge(MIB))
    await asyncio.sleep(0.01)
    held.release()  # grants the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.held == 0
    assert budget.waiting == 0
    again = await budget.charge(8 * MIB)
    assert again is not None
    again.release()


async def test_a_reply_larger_than_the_budget_is_charged_the_whole_budget() -> None:
    budget = ReplyBudget(8 * MIB)
    charge = await budget.charge(9 * MIB)
    assert charge is not None
    assert budget.held == 8 * MIB
    charge.release()
    assert budget.held == 0


async def test_a_reservation_waits_whatever_is_waiting_and_shrinks_to_the_reply() -> None:
    budget = ReplyBudget(8 * MIB, wait_s=5, max_waiting_bytes=0)
    held = await budget.charge(7 * MIB)
    assert held is not None
    assert await budget.charge(2 * MIB) is None  # a reply in memory may not wait here
    reserving = asyncio.create_task(budget.charge(2 * MIB, reserve=True))  # nothing in memory yet: it may
    await asyncio.sleep(0.01)
    assert not reserving.done()
    held.release()
    reserved = await asyncio.wait_for(reserving, 1)
    assert reserved is not None
    assert budget.held == 2 * MIB
    reserved.shrink_to(MIB)
    assert budget.held == MIB
    reserved.shrink_to(EXEMPT_REPLY_BYTES)  # an exempt reply: nothing stays charged
    assert budget.held == 0
    reserved.release()
    assert budget.held == 0


async def test_a_method_is_heavy_once_it_made_a_large_reply() -> None:
    slots = HandlerSlots(3, heavy_limit=1)
    budget = ReplyBudget(8 * MIB, wait_s=0.05)
    assert slots.reply_size("/s/Big") == 0
    slots.made("/s/Big", EXEMPT_REPLY_BYTES)
    assert slots.reply_size("/s/Big") == 0
    slots.made("/s/Big", 2 * MIB)
    slots.made("/s/Big", MIB)
    assert slots.reply_size("/s/Big") == 2 * MIB  # the largest it made
    first = await slots.start("/s/Big", budget, framing=10)
    assert first is not None
    slot, reserved = first
    assert reserved is not None
    assert budget.held == 2 * MIB + 10  # reserved before any work
    second = asyncio.create_task(slots.start("/s/Big", budget))  # one heavy call at a time
    light = await asyncio.wait_for(slots.start("/s/Small", budget), 1)  # light calls do not queue behind it
    assert light is not None
    assert light[1] is None
    await asyncio.sleep(0.01)
    assert not second.done()
    slot.release()
    slot.release()  # idempotent
    started = await asyncio.wait_for(second, 1)
    assert started is not None
    started[0].release()
    light[0].release()
    for charge in (reserved, started[1]):
        assert charge is not None
        charge.release()
    assert budget.held == 0


async def test_a_heavy_call_without_room_does_no_work() -> None:
    slots = HandlerSlots(3)
    budget = ReplyBudget(8 * MIB, wait_s=0.05)
    slots.made("/s/Big", 7 * MIB)
    held = await budget.charge(2 * MIB)
    assert held is not None
    assert await slots.start("/s/Big", budget) is None  # waited 50 ms for room, refused
    held.release()
    assert budget.held == 0


async def test_a_call_queued_as_light_reserves_once_its_method_turns_heavy() -> None:
    slots = HandlerSlots(1)
    budget = ReplyBudget(8 * MIB, wait_s=5)
    first = await slots.start("/s/Big", budget)
    assert first is not None
    queued = asyncio.create_task(slots.start("/s/Big", budget))  # waits as light
    await asyncio.sleep(0.01)
    slots.made("/s/Big", 3 * MIB)  # the first call's reply was large
    first[0].release()
    started = await asyncio.wait_for(queued, 1)
    assert started is not None
    assert started[1] is not None
    assert started[1].size == 3 * MIB
    started[0].release()
    started[1].release()
    with pytest.raises(ValueError, match="expected both at least 1"):
        HandlerSlots(0)


async def test_a_reply_uses_its_reservation_when_it_fits_and_gives_it_back_when_not() -> None:
    budget = ReplyBudget(8 * MIB, wait_s=0)
    reserved = await budget.charge(2 * MIB, reserve=True)
    assert reserved is not None
    charge = await budget.charge_reply(MIB, reserved)
    assert charge is reserved
    assert budget.held == MIB  # shrunk to the reply
    charge.release()
    reserved = await budget.charge(2 * MIB, reserve=True)
    assert reserved is not None
    charge = await budget.charge_reply(3 * MIB, reserved)
    assert charge is not None
    assert charge is not reserved
    assert budget.held == 3 * MIB  # the reservation was given back, not held beside the reply
    charge.release()
    assert budget.held == 0


async def test_a_refused_reply_is_answered_with_its_figures() -> None:
    budget = ReplyBudget(8 * MIB, wait_s=0)
    full = await budget.charge(8 * MIB)
    assert full is not None
    assert await budget.charge_reply(MIB) is None
    refusal = budget.refusal(MIB)
    assert refusal.code is StatusCode.RESOURCE_EXHAUSTED
    assert refusal.message == (
        f"reply is {MIB} bytes and the {8 * MIB}-byte reply budget is held by replies waiting for their readers;"
        " try again"
    )
    assert refusal.fields == {"length": MIB, "limit": 8 * MIB, "held": 8 * MIB}
    full.release()
