"""The reply budget through the ttRPC server: a peer that never reads holds budget, not the process's memory."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.api.budget import ReplyBudget
from agent.api.status import RpcError, StatusCode
from agent.api.ttrpc import REPLY_ADMISSION, TtrpcClient, TtrpcServer
from agent.api.ttrpc_frame import MessageType, RpcRequest, encode_frame
from tests.integration.test_ttrpc_server import RawPeer

pytestmark = pytest.mark.integration

SVC = "test.Budget"
MIB = 1024 * 1024
REPLY = 3 * MIB


class Served:
    def __init__(self, server: TtrpcServer, path: str, budget: ReplyBudget) -> None:
        self.server = server
        self.path = path
        self.budget = budget
        self.handled: list[str] = []


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    # room for one 3 MiB reply and no waiting; a peer that does not read is dropped after 2 s
    budget = ReplyBudget(REPLY + 2 * MIB, wait_s=1.0, max_waiting_bytes=0)
    holder: list[Served] = []

    async def big(payload: bytes) -> bytes:
        holder[0].handled.append("Big")
        return bytes(REPLY)

    async def small(payload: bytes) -> bytes:
        holder[0].handled.append("Small")
        return b"ok"

    server = TtrpcServer({SVC: {"Big": big, "Small": small}}, reply_budget=budget, write_timeout_s=2.0)
    path = str(tmp_path / "s" / "budget.sock")
    await server.start(path)
    holder.append(Served(server, path, budget))
    try:
        yield holder[0]
    finally:
        await server.close(grace_s=1)


def non_reader(path: str, calls: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(path)
    frames = b"".join(
        encode_frame(2 * i + 1, MessageType.REQUEST, RpcRequest(service=SVC, method="Big").to_bytes())
        for i in range(calls)
    )
    sock.sendall(frames)
    return sock


async def wait_until(condition: Callable[[], bool], within_s: float = 3.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 - the server's state has no event to wait on
            await asyncio.sleep(0.01)


async def test_a_non_reader_holds_budget_and_others_are_refused_or_served(served: Served) -> None:
    attacker = non_reader(served.path, 8)
    try:
        await wait_until(lambda: served.budget.held >= REPLY)
        async with TtrpcClient(served.path) as client:
            assert await client.call(SVC, "Small", b"", timeout=5) == b"ok"  # small replies are never charged
            with pytest.raises(RpcError) as info:
                await client.call(SVC, "Big", b"", timeout=5)
        assert info.value.code is StatusCode.RESOURCE_EXHAUSTED
        assert info.value.message == (
            f"reply is {REPLY} bytes and the {REPLY + 2 * MIB}-byte reply budget is held by replies waiting for"
            " their readers; try again"
        )
        # Big is heavy now: the attacker's other requests wait for room before any work, then are refused
        # (the budget's 1 s wait), so it cannot make the server work in a loop
        handled = served.handled.count("Big")
        assert handled <= 4  # the calls in flight before Big had made its first reply (max_in_flight)
        await asyncio.sleep(1.5)
        assert served.handled.count("Big") == handled
        # dropped at the write timeout, which gives the budget back
        await wait_until(lambda: served.budget.held == 0, within_s=5)
        async with TtrpcClient(served.path) as client:
            assert len(await client.call(SVC, "Big", b"", timeout=5)) == REPLY
        assert served.budget.held == 0
    finally:
        attacker.close()


RAW_SVC = "test.TestService"  # the service `RawPeer` calls


async def admitted(payload: bytes) -> bytes:
    """A reply of the size in the payload, admitted by the handler (as `Method.invoke` does) before it returns."""
    reply = bytes(int(payload))
    admit = REPLY_ADMISSION.get()
    assert admit is not None
    await admit(len(reply))
    return reply


@pytest.fixture
async def admitting(tmp_path: Path) -> AsyncIterator[tuple[TtrpcServer, RawPeer, list[tuple[str, object]]]]:
    budget = ReplyBudget(REPLY + 2 * MIB, wait_s=2.0)
    events: list[tuple[str, object]] = []
    server = TtrpcServer(
        {RAW_SVC: {"Admitted": admitted}},
        reply_budget=budget,
        on_call=lambda _s, method, code, _d: events.append((method, code)),
        on_event=lambda event, fields: events.append((event, dict(fields))),
    )
    path = str(tmp_path / "s" / "admit.sock")
    await server.start(path)
    peer = await RawPeer.open(path)
    try:
        yield server, peer, events
    finally:
        await peer.close()
        await server.close(grace_s=1)


async def test_a_reply_admitted_by_its_handler_is_charged_once_and_written(
    admitting: tuple[TtrpcServer, RawPeer, list[tuple[str, object]]],
) -> None:
    server, peer, events = admitting
    budget = server.reply_budget
    full = await budget.charge(budget.limit_bytes)
    assert full is not None
    # the request's deadline (0.2 s) bounds the handler's work, not the wait for budget that follows it
    await peer.request(1, "Admitted", b"100000", timeout_nano=200_000_000)
    await asyncio.sleep(0.5)
    assert budget.waiting == 100000 + 32
    full.release()
    stream_id, response = await peer.recv_response()
    assert (stream_id, response.code, len(response.payload)) == (1, StatusCode.OK, 100000)
    await wait_until(lambda: budget.held == 0)
    assert events == [("Admitted", StatusCode.OK)]


async def test_a_reply_refused_at_admission_is_answered_as_the_handler_was_told(
    admitting: tuple[TtrpcServer, RawPeer, list[tuple[str, object]]],
) -> None:
    server, peer, events = admitting
    budget = server.reply_budget
    budget.wait_s = 0
    full = await budget.charge(budget.limit_bytes)
    assert full is not None
    try:
        await peer.request(1, "Admitted", b"100000")
        stream_id, response = await peer.recv_response()
    finally:
        full.release()
    assert (stream_id, response.code) == (1, StatusCode.RESOURCE_EXHAUSTED)
    assert response.message == budget.refusal(100000 + 32).message
    await wait_until(lambda: len(events) == 1)
    assert events == [("Admitted", StatusCode.RESOURCE_EXHAUSTED)]  # no `ttrpc.reply.refused`: the handler said it
    assert budget.held == 0
