"""Hostile local clients against ttRPC, gRPC and REST (issue 9, item 3), measured on the real processes.

Each attack runs against the daemon and api-server-rest as subprocesses while a legitimate caller must be
served within `LEGIT_S`; the server's RSS growth during the attack must stay under a ceiling, and its
descriptors return to the baseline once the attackers are gone. Attacks: clients that send and never read,
idle connections beyond the connection cap, oversized frames/messages/heads, slowloris (a byte at a time) and
half-open connections.

Ceilings are what the design guarantees, not what was measured: for clients that ask for large replies and
never read, the reply budget (held, plus a quarter waiting for it) and the heavy calls at work (each the cost
of serving one 3 MiB resource), the same for 8 attackers as for 64 or 100; for the others a small constant per
connection. GetResource is made known to be heavy before the attacks (`warm_up(big=True)`).

`LEGIT_S` is 10 s in `make test` (a loaded machine must not fail the suite; a caller shut out by the attack
would wait the full 10 s or more) and the strict 2 s of issue 9 in `make hostile` (HOSTILE_LEGIT_S=2).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from agent.api._gen import api_pb2
from agent.api._gen import attestation_agent_pb2 as aa_pb2
from agent.api.budget import DEFAULT_REPLY_BUDGET, HandlerSlots
from agent.api.ttrpc import TtrpcClient
from agent.api.ttrpc_frame import MessageType, RpcRequest, encode_frame
from tests.reliability.processes import Sampler, Served, rss_mib, serve_everything

pytestmark = pytest.mark.integration

AA = "attestation_agent.AttestationAgentService"
RESOURCE = "api.GetResourceService"
LEGIT_S = float(os.environ.get("HOSTILE_LEGIT_S", "10"))
MIB = 1024 * 1024
ALLOCATOR_SLACK_MIB = 64
"""RSS that two Python processes may grow by under any burst of work (arenas, gRPC core pools)."""
REPLIES_MIB = 1.25 * DEFAULT_REPLY_BUDGET / MIB
"""Replies held for peers: the budget, and a quarter of it waiting for budget (agent.api.budget)."""
CALL_MIB = 12
"""Transient memory of one GetResource of the 3 MiB resource at work (KBS body, base64, plaintext, reply)."""
HEAVY_CALLS = HandlerSlots(1).heavy_limit
"""Calls of a heavy method (one known to make large replies) at work at once, per server."""
NON_READING_MIB = REPLIES_MIB + HEAVY_CALLS * CALL_MIB
"""What peers that ask for large replies and never read can make a server hold, however many they are."""
FIGURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_everything(tmp_path_factory.mktemp("hostile")) as running:
        asyncio.run(warm_up(running, big=True))
        yield running
    for name, figure in FIGURES.items():
        print(f"hostile {name}: {figure}")


# --- legitimate callers ------------------------------------------------------------------------------------


async def legit_ttrpc(served: Served) -> None:
    async with TtrpcClient(served.aa_socket) as client:
        reply = await client.call(AA, "GetTeeType", b"", timeout=LEGIT_S)
    assert aa_pb2.GetTeeTypeResponse.FromString(reply).tee == "sample"


async def legit_grpc(served: Served) -> None:
    async with grpc.aio.insecure_channel(f"unix:{served.grpc_socket}") as channel:
        stub: Any = channel.unary_unary(f"/{AA}/GetTeeType")
        reply = await stub(b"", timeout=LEGIT_S)
    assert aa_pb2.GetTeeTypeResponse.FromString(reply).tee == "sample"


async def legit_rest(served: Served) -> None:
    async with asyncio.timeout(LEGIT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", served.rest_port)
        writer.write(b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await reader.read()
        writer.close()
    assert data.startswith(b"HTTP/1.1 200 "), data[:100]


async def warm_up(served: Served, *, big: bool = False) -> None:
    """Legitimate calls first, so that api-server-rest's own ttRPC connections are part of the baseline.

    `big`: also one 3 MiB GetResource on each server, read at once, so that GetResource is known to be heavy
    (see `agent.api.budget.HandlerSlots`) before any attack: the calls of a method that run before its
    first large reply are bounded by the handler caps only, once in a process's life.
    """
    for call in LEGIT.values():
        await call(served)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.rest_port)
    writer.write(b"GET /cdh/resource/default/key/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
    writer.close()
    if big:
        async with TtrpcClient(served.cdh_socket) as client:
            reply = await client.call(RESOURCE, "GetResource", big_resource_request(), timeout=30)
        assert len(api_pb2.GetResourceResponse.FromString(reply).Resource) == 3 * MIB
        async with grpc.aio.insecure_channel(f"unix:{served.grpc_socket}") as channel:
            stub: Any = channel.unary_unary(f"/{RESOURCE}/GetResource")
            reply = await stub(big_resource_request(), timeout=30)
        assert len(api_pb2.GetResourceResponse.FromString(reply).Resource) == 3 * MIB


LEGIT: dict[str, Callable[[Served], Awaitable[None]]] = {"ttrpc": legit_ttrpc, "grpc": legit_grpc, "rest": legit_rest}


# --- attack plumbing ---------------------------------------------------------------------------------------


def unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    return sock


def tcp(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def send_some(sock: socket.socket, data: bytes) -> int:
    """Send what the socket takes now (the peer may have stopped reading)."""
    try:
        return sock.send(data)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        return 0


def closed_by_peer(sock: socket.socket) -> bool:
    """True if the server has closed this connection (EOF or reset), without blocking."""
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def ttrpc_request(stream_id: int, service: str, method: str, payload: bytes = b"") -> bytes:
    data = RpcRequest(service=service, method=method, payload=payload).to_bytes()
    return encode_frame(stream_id, MessageType.REQUEST, data)


def big_resource_request() -> bytes:
    return api_pb2.GetResourceRequest(ResourcePath="kbs:///default/big/1").SerializeToString()


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(name: str, value: str) -> bytes:
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def h2_grpc_call(stream: int, path: str, message: bytes) -> bytes:
    """A gRPC unary call as raw HTTP/2 frames (HEADERS + DATA), for a client that will never read."""
    headers = b"".join(
        _hpack_literal(k, v)
        for k, v in ((":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
                     ("content-type", "application/grpc"), ("te", "trailers"))
    )  # fmt: skip
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return _h2_frame(0x1, 0x4, stream, headers) + _h2_frame(0x0, 0x1, stream, body)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(0x4, 0, 0, b"")


async def attack(
    served: Served,
    transport: str,
    name: str,
    open_attackers: Callable[[], list[socket.socket]],
    *,
    per_connection_mib: float = 0,
    ceiling_mib: float | None = None,
    keep_s: float = 3.0,
    pump: Callable[[list[socket.socket]], None] | None = None,
) -> None:
    """Run one attack: open the attackers, serve a legitimate caller during it, bound RSS, check fds after."""
    pids = (served.pid, served.rest_pid)
    await warm_up(served)  # api-server-rest reconnects what an earlier attack evicted, before the baseline
    baseline_fds = served.client_fds()
    base_rss = sum(rss_mib(pid) for pid in pids)
    attackers: list[socket.socket] = []
    try:
        with Sampler(*pids) as sampler:
            attackers = open_attackers()
            started = time.monotonic()
            legit_times: list[float] = []
            while time.monotonic() - started < keep_s:
                if pump is not None:
                    pump(attackers)
                t0 = time.monotonic()
                await LEGIT[transport](served)  # raises if not served within LEGIT_S
                legit_times.append(time.monotonic() - t0)
                await asyncio.sleep(0.2)
    finally:
        for sock in attackers:
            sock.close()
    growth = sampler.peak - base_rss
    ceiling = ALLOCATOR_SLACK_MIB + (ceiling_mib if ceiling_mib is not None else per_connection_mib * len(attackers))
    FIGURES[f"{transport}/{name}"] = (
        f"{len(attackers)} connections, RSS +{growth:.1f} MiB (ceiling {ceiling:.0f}), "
        f"legit calls {len(legit_times)}, slowest {max(legit_times):.3f} s"
    )
    assert growth <= ceiling, FIGURES[f"{transport}/{name}"]

    def settled(now: dict[str, int]) -> bool:
        # fewer is fine: an idle client connection (api-server-rest's own) may have been evicted; it reconnects
        return all(now[key] <= baseline_fds[key] for key in now)

    after = served.client_fds()
    for _ in range(500):  # a hostile connection is gone within 25 s: 10 s waiting for budget, 10 s for its peer
        if settled(after):
            break
        await asyncio.sleep(0.05)
        after = served.client_fds()
    assert settled(after), (baseline_fds, after)


# --- ttRPC -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [8, 64])
async def test_ttrpc_non_reading_clients(served: Served, count: int) -> None:
    def open_attackers() -> list[socket.socket]:
        socks = [unix(served.cdh_socket) for _ in range(count)]
        for sock in socks:
            requests = b"".join(
                ttrpc_request(2 * i + 1, "api.GetResourceService", "GetResource", big_resource_request())
                for i in range(32)
            )
            send_some(sock, requests)
        return socks

    # whatever the number of connections: the replies within the budget, and the heavy calls at work
    await attack(served, "ttrpc", f"non-reading x{count}", open_attackers, ceiling_mib=NON_READING_MIB)


async def test_non_readers_are_dropped_on_every_transport(served: Served) -> None:
    """A peer that asks for a 3 MiB reply and never reads is let go by the server while it still holds on."""
    await warm_up(served)  # api-server-rest reconnects what an earlier attack evicted, before the baseline
    baseline = served.client_fds()
    socks = {"ttrpc": unix(served.cdh_socket), "grpc": unix(served.grpc_socket), "rest": tcp(served.rest_port)}
    for sock in socks.values():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = big_resource_request()
    send_some(socks["ttrpc"], ttrpc_request(1, "api.GetResourceService", "GetResource", request))
    send_some(socks["grpc"], H2_PREFACE + h2_grpc_call(1, "/api.GetResourceService/GetResource", request))
    send_some(socks["rest"], b"GET /cdh/resource/default/big/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(1)
    held = served.client_fds()
    try:
        # 10 s write timeout (ttRPC, REST), 5 s SETTINGS/ping timeouts (gRPC), plus fetching the resource
        for _ in range(200):
            if served.client_fds() == baseline:
                break
            await asyncio.sleep(0.1)
        released = served.client_fds()
    finally:
        for sock in socks.values():
            sock.close()
    assert held["daemon"] == baseline["daemon"] + 2  # api-server-rest may already have handed its reply to TCP
    assert released == baseline


async def test_ttrpc_idle_connections_beyond_the_cap(served: Served) -> None:
    await attack(served, "ttrpc", "idle", lambda: [unix(served.aa_socket) for _ in range(80)], per_connection_mib=1)


async def test_ttrpc_oversized(served: Served) -> None:
    long_name = "x" * (4 * MIB - 100)

    def open_attackers() -> list[socket.socket]:
        socks = [unix(served.aa_socket) for _ in range(8)]
        for sock in socks:
            # a huge header (data skipped, never buffered), then requests whose names are 4 MiB long
            send_some(sock, struct.pack(">IIBB", 0xFFFF_FFF0, 1, 1, 0))
        return socks

    def pump(socks: list[socket.socket]) -> None:
        for index, sock in enumerate(socks):
            if index % 2:
                send_some(sock, b"\0" * 65536)
            else:
                send_some(sock, ttrpc_request(3, AA, long_name))

    await attack(served, "ttrpc", "oversized", open_attackers, per_connection_mib=12, pump=pump)


async def test_ttrpc_slowloris(served: Served) -> None:
    frame = ttrpc_request(1, AA, "GetTeeType")

    def open_attackers() -> list[socket.socket]:
        socks = [unix(served.aa_socket) for _ in range(80)]
        for sock in socks:
            send_some(sock, frame[:3])
        return socks

    sent = [3]

    def pump(socks: list[socket.socket]) -> None:
        position = sent[0]
        if position < len(frame) - 1:
            for sock in socks:
                send_some(sock, frame[position : position + 1])
            sent[0] += 1

    await attack(served, "ttrpc", "slowloris", open_attackers, per_connection_mib=1, pump=pump)


async def test_ttrpc_half_open(served: Served) -> None:
    def open_attackers() -> list[socket.socket]:
        socks = [unix(served.aa_socket) for _ in range(40)]
        for sock in socks:
            send_some(sock, ttrpc_request(1, AA, "GetTeeType"))
            sock.shutdown(socket.SHUT_WR)
        return socks

    await attack(served, "ttrpc", "half-open", open_attackers, per_connection_mib=1)


# --- gRPC --------------------------------------------------------------------------------------------------


async def test_grpc_non_reading_clients(served: Served) -> None:
    def open_attackers() -> list[socket.socket]:
        socks = [unix(served.grpc_socket) for _ in range(8)]
        for sock in socks:
            calls = b"".join(
                h2_grpc_call(2 * i + 1, "/api.GetResourceService/GetResource", big_resource_request()) for i in range(8)
            )
            send_some(sock, H2_PREFACE + calls)
        return socks

    # the replies within the budget until the peer is dropped (keepalive, ~7 s), and the heavy calls at work
    await attack(served, "grpc", "non-reading", open_attackers, ceiling_mib=NON_READING_MIB)


async def test_grpc_idle_connections(served: Served) -> None:
    # fewer than the cap: gRPC core refuses connections beyond it until its idle/handshake timers free some
    await attack(served, "grpc", "idle", lambda: [unix(served.grpc_socket) for _ in range(48)], per_connection_mib=1)


async def test_grpc_oversized(served: Served) -> None:
    async with grpc.aio.insecure_channel(f"unix:{served.grpc_socket}") as channel:
        stub: Any = channel.unary_unary(f"/{AA}/GetEvidence")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(aa_pb2.GetEvidenceRequest(RuntimeData=b"x" * (5 * MIB)).SerializeToString(), timeout=10)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    def open_attackers() -> list[socket.socket]:
        socks = [unix(served.grpc_socket) for _ in range(4)]
        for sock in socks:
            send_some(sock, H2_PREFACE + h2_grpc_call(1, "/" + "x" * 100, b"y" * (5 * MIB)))
        return socks

    await attack(served, "grpc", "oversized", open_attackers, per_connection_mib=12)


async def test_grpc_slowloris_and_half_open(served: Served) -> None:
    def open_attackers() -> list[socket.socket]:
        socks = [unix(served.grpc_socket) for _ in range(32)]
        for index, sock in enumerate(socks):
            if index % 2:
                send_some(sock, H2_PREFACE[:5])
            else:
                send_some(sock, H2_PREFACE + h2_grpc_call(1, f"/{AA}/GetTeeType", b""))
                sock.shutdown(socket.SHUT_WR)
        return socks

    await attack(served, "grpc", "slowloris+half-open", open_attackers, per_connection_mib=1)


# --- REST --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [8, 100])
async def test_rest_non_reading_clients(served: Served, count: int) -> None:
    def open_attackers() -> list[socket.socket]:
        socks = [tcp(served.rest_port) for _ in range(count)]
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            send_some(sock, b"GET /cdh/resource/default/big/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        return socks

    # api-server-rest's replies within its budget; the daemon's are taken at once by api-server-rest, and its
    # heavy calls at work
    await attack(served, "rest", f"non-reading x{count}", open_attackers, ceiling_mib=NON_READING_MIB, keep_s=4)


async def test_rest_idle_slowloris_and_half_open(served: Served) -> None:
    head = b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n"

    def open_attackers() -> list[socket.socket]:
        socks = [tcp(served.rest_port) for _ in range(100)]
        for index, sock in enumerate(socks):
            if index % 3 == 1:
                send_some(sock, head[:4])
            elif index % 3 == 2:
                send_some(sock, head)
                sock.shutdown(socket.SHUT_WR)
        return socks

    def pump(socks: list[socket.socket]) -> None:
        for sock in socks[1::3]:
            send_some(sock, b"x")

    await attack(served, "rest", "idle+slowloris+half-open", open_attackers, per_connection_mib=1, pump=pump)


async def test_rest_oversized(served: Served) -> None:
    def open_attackers() -> list[socket.socket]:
        socks = [tcp(served.rest_port) for _ in range(16)]
        for index, sock in enumerate(socks):
            if index % 2:
                send_some(sock, b"GET /info HTTP/1.1\r\nX: " + b"a" * (64 * 1024))
            else:
                send_some(sock, b"POST /aa/aael HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n" + b"{" * 60000)
        return socks

    await attack(served, "rest", "oversized", open_attackers, per_connection_mib=1)
