"""The agent's three local servers in-process, on an event loop of their own, driven from synchronous tests.

`InProcessAgent` serves one `AttestationAgent` and `DataHub` (sample TEE, the dev KBS) over gRPC (unix socket),
ttRPC (the AA and CDH sockets, as the daemon does) and the REST front, and offers one call helper per
transport that returns the status instead of raising. Hypothesis tests are synchronous; they hand coroutines
to the server loop with `run()`, so servers and clients live on one loop for the whole module.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog

from agent import log as agent_log
from agent.api.methods import Method, build_methods
from agent.api.status import RpcError
from agent.api.ttrpc import TtrpcClient
from agent.app import App
from agent.compat.rest import ConnectionLimiter, RestApi, _serve_connection
from agent.config import Config, KbsConfig, ListenAddress

__all__ = ["CALL_TIMEOUT_S", "FUZZ_COUNTS", "InProcessAgent", "RestReply"]

T = TypeVar("T")
CALL_TIMEOUT_S = 20.0
"""No call may take longer: a call that does is a hang."""


FUZZ_COUNTS: dict[str, int] = {}
"""Examples run per fuzz target in this session (printed by the conftest's summary)."""


class RestReply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body


class InProcessAgent:
    def __init__(self, root: Path, kbs_url: str) -> None:
        self.root = root
        self.kbs_url = kbs_url
        self.grpc_socket = str(root / "grpc" / "agent.sock")
        self.aa_socket = str(root / "ttrpc" / "aa.sock")
        self.cdh_socket = str(root / "ttrpc" / "cdh.sock")
        self.log = io.StringIO()
        self.methods: list[Method] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="agent-loop", daemon=True)
        self._state: dict[str, Any] = {}

    # --- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> InProcessAgent:
        agent_log.configure("info", "json", stream=self.log)
        self._thread.start()
        self.run(self._start(), timeout=30)
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self.run(self._stop(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            structlog.reset_defaults()

    async def _start(self) -> None:
        config = Config(
            tee="sample",
            socket=ListenAddress(unix_path=self.grpc_socket),
            ttrpc_aa_socket=self.aa_socket,
            ttrpc_cdh_socket=self.cdh_socket,
            kbs=KbsConfig(url=self.kbs_url, timeout_s=10),
        )
        app = App(config)  # the composition root, as `cvm-agent serve` builds it
        await app.start()
        await app.complete_startup()
        self.methods = build_methods(app.aa, app.hub)  # the same services, for direct invocation by the fuzzers
        rest_api = RestApi(
            features="all", aa_client=TtrpcClient(self.aa_socket), cdh_client=TtrpcClient(self.cdh_socket)
        )
        limiter = ConnectionLimiter()
        rest = await asyncio.start_server(
            lambda r, w: _serve_connection(rest_api, r, w, limiter), "127.0.0.1", 0, limit=16 * 1024
        )
        channel = grpc.aio.insecure_channel(f"unix:{self.grpc_socket}")
        self._state = {
            "app": app,
            "rest": rest,
            "rest_api": rest_api,
            "channel": channel,
            "clients": {self.aa_socket: TtrpcClient(self.aa_socket), self.cdh_socket: TtrpcClient(self.cdh_socket)},
        }
        self.rest_port = rest.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        state = self._state
        await state["channel"].close()
        for client in state["clients"].values():
            await client.close()
        state["rest"].close()
        await state["rest"].wait_closed()
        await state["rest_api"]._aa.close()
        await state["rest_api"]._cdh.close()
        await state["app"].close()

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float = CALL_TIMEOUT_S) -> T:
        """Run `coro` on the server loop; raises TimeoutError (a hang) if it takes longer than `timeout`."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    # --- calls -----------------------------------------------------------------------------------------

    async def grpc_call(self, path: str, payload: bytes) -> tuple[str, str]:
        stub: Any = self._state["channel"].unary_unary(path)
        try:
            await stub(payload, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
        return "OK", ""

    def ttrpc_socket(self, service: str) -> str:
        return self.aa_socket if service.startswith("attestation_agent.") else self.cdh_socket

    async def ttrpc_call(self, service: str, method: str, payload: bytes, socket: str | None = None) -> tuple[str, str]:
        client: TtrpcClient = self._state["clients"][socket or self.ttrpc_socket(service)]
        try:
            await client.call(service, method, payload, timeout=CALL_TIMEOUT_S)
        except RpcError as exc:
            return exc.code.name, exc.message
        return "OK", ""

    async def rest_call(self, request: bytes) -> RestReply:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.rest_port)
        try:
            writer.write(request)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        return RestReply(status, body)

    # --- what the logs say -------------------------------------------------------------------------------

    def log_position(self) -> int:
        return len(self.log.getvalue())

    def log_lines(self, since: int = 0) -> list[dict[str, Any]]:
        text = self.log.getvalue()[since:]
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def bad_lines(self, since: int = 0) -> list[dict[str, Any]]:
        """Crash lines, and calls answered INTERNAL or UNKNOWN (logged after position `since`)."""
        return [
            line
            for line in self.log_lines(since)
            if line["event"].endswith(".crash") or line.get("code") in ("INTERNAL", "UNKNOWN")
        ]
