"""`api-server-rest`: the reference REST front of the AA and CDH, forwarding over ttRPC. Edge (HTTP).

    api-server-rest [-b 127.0.0.1:8006] [-f resource|attestation|all] [-a unix:///...aa.sock] [-c unix:///...cdh.sock]

Endpoints, status codes and bodies follow guest-api.md §10. Requests from peers that are not on loopback get 403.
A call the agent answers INVALID_ARGUMENT is a 400 with the agent's message (the reference answers every failed
call 500; the text is the same). One request per connection (`Connection: close`).

Bounds against hostile local clients:

    what                                   bound
    -------------------------------------  --------------------------------------------------------------
    request head                           16 KiB, complete within 10 s, else 400
    request body                           64 KiB, else 400
    connections                            `MAX_CONNECTIONS` served; a further one waits (unread) up to
                                           10 s for a slot and evicts the connection that has waited
                                           longest (at least 0.5 s) for its peer: to send its request
                                           head, or to take its reply
    a reply the peer does not take         dropped with its connection after 10 s
    replies over 64 KiB                    charged to the process's reply budget (`REPLY_BUDGET`, 32 MiB;
                                           `agent.api.budget`) until the peer has taken them; one the
                                           budget refuses (after waiting up to 10 s while waiting is
                                           allowed) is answered 503 with the reason

So the replies held for peers (one per connection, at most the 4 MiB ttRPC limit) stay within the budget
and a quarter more waiting for it, whatever the number of connections; and hostile connections shut callers
out for about a second. Replies up to 64 KiB (`/info`, tokens, errors) are never refused for the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agent import __version__
from agent.api.budget import DEFAULT_REPLY_BUDGET, Charge, ReplyBudget
from agent.api.names import AA_SERVICE, RESOURCE_SERVICE
from agent.api.status import RpcError, StatusCode
from agent.api.ttrpc import TtrpcClient
from agent.argparsing import ArgumentParser
from agent.compat import common
from agent.compat.refconfig import DEFAULT_AA_SOCKET, DEFAULT_CDH_SOCKET, unix_path
from agent.errors import ConfigError, InvalidRequest
from agent.lifecycle import gc_paused, resume_gc
from agent.log import get_logger, log_crash
from agent.secret import clip
from agent.strictjson import b64url_decode, load_json_object

__all__ = ["ConnectionLimiter", "RestApi", "main"]

log = get_logger("agent.rest")

AA = AA_SERVICE
CDH_RESOURCE = RESOURCE_SERVICE
TIMEOUT_S = 50.0
MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 64
IO_TIMEOUT_S = 10.0
EVICT_AFTER_S = 0.5
REPLY_BUDGET = DEFAULT_REPLY_BUDGET
FEATURES = ("resource", "attestation", "all")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain"


def _text(status: int, text: str) -> Reply:
    return Reply(status, text.encode())


class RestApi:
    """Routes one request to the AA or CDH; transport-free apart from the ttRPC clients it is given."""

    def __init__(self, *, features: str, aa_client: TtrpcClient, cdh_client: TtrpcClient) -> None:
        self.features = features
        self._aa = aa_client
        self._cdh = cdh_client

    @property
    def attestation(self) -> bool:
        return self.features in ("attestation", "all")

    @property
    def resource(self) -> bool:
        return self.features in ("resource", "all")

    async def handle(self, method: str, target: str, body: bytes) -> Reply:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        try:
            if path == "/info":
                return await self._only_get(method) or await self._info()
            if path.startswith("/aa/"):
                if not self.attestation:
                    return _text(404, "Attestation Feature Not Enabled")
                return await self._aa_route(method, path, query, body)
            if path.startswith("/cdh/"):
                if not self.resource:
                    return _text(404, "Resource Feature Not Enabled")
                return await self._cdh_route(method, path)
        except RpcError as exc:
            return _text(400 if exc.code is StatusCode.INVALID_ARGUMENT else 500, clip(exc.message, 400))
        return _text(404, "URL NOT FOUND")

    async def _only_get(self, method: str) -> Reply | None:
        return None if method == "GET" else _text(405, "Method Not Allowed")

    async def _info(self) -> Reply:
        from agent.api._gen import attestation_agent_pb2 as aa

        info: dict[str, object] = {"version": __version__}
        if self.attestation:
            tee = aa.GetTeeTypeResponse.FromString(await self._call_aa("GetTeeType", b""))
            info["tee"] = tee.tee
            extra = aa.GetAdditionalTeesResponse.FromString(await self._call_aa("GetAdditionalTees", b""))
            info["additional_tees"] = list(extra.additional_tees)
        info["feature"] = self.features
        return Reply(200, json.dumps(info).encode(), "application/json")

    async def _call_aa(self, name: str, payload: bytes) -> bytes:
        return await self._aa.call(AA, name, payload, timeout=TIMEOUT_S)

    async def _aa_route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Reply:
        from agent.api._gen import attestation_agent_pb2 as aa

        if path == "/aa/aael":
            if method != "POST":
                return _text(405, "Method Not Allowed")
            try:
                event: dict[str, Any] = load_json_object(body, "AAEL event", error=ValueError)
                request = aa.ExtendRuntimeMeasurementRequest(
                    Domain=event["domain"], Operation=event["operation"], Content=event["content"]
                )
            except (ValueError, KeyError, TypeError):
                return _text(400, "BAD REQUEST")
            reply = aa.ExtendRuntimeMeasurementResponse.FromString(
                await self._call_aa("ExtendRuntimeMeasurement", request.SerializeToString())
            )
            outcome = {
                aa.OK: {"success": "true"},
                aa.NOT_SUPPORTED: {"success": "false", "message": "The platform does not support runtime measurement"},
                aa.NOT_ENABLED: {"success": "false", "message": "Attestation Agent does not enable eventlog recording"},
            }[reply.Result]
            return Reply(200, json.dumps(outcome).encode(), "application/json")
        if method != "GET":
            return _text(405, "Method Not Allowed")
        if path == "/aa/token":
            token_type = query.get("token_type", [""])[0]
            if not token_type:
                return _text(400, "BAD REQUEST")
            data = await self._call_aa("GetToken", aa.GetTokenRequest(TokenType=token_type).SerializeToString())
            return Reply(200, aa.GetTokenResponse.FromString(data).Token, "application/octet-stream")
        if path in ("/aa/evidence", "/aa/additional-evidence"):
            runtime_data = _runtime_data(query)
            if runtime_data is None:
                return _text(400, "BAD REQUEST")
            if path == "/aa/evidence":
                name, payload = "GetEvidence", aa.GetEvidenceRequest(RuntimeData=runtime_data).SerializeToString()
            else:
                extra = aa.GetAdditionalEvidenceRequest(RuntimeData=runtime_data)
                name, payload = "GetAdditionalEvidence", extra.SerializeToString()
            data = await self._call_aa(name, payload)
            return Reply(200, aa.GetEvidenceResponse.FromString(data).Evidence, "application/octet-stream")
        return _text(404, "URL NOT FOUND")

    async def _cdh_route(self, method: str, path: str) -> Reply:
        from agent.api._gen import api_pb2

        segments = path[len("/cdh/") :].split("/")
        if len(segments) != 4 or segments[0] != "resource":
            return _text(404, "URL NOT FOUND")
        if method != "GET":
            return _text(405, "Method Not Allowed")
        uri = "kbs:///" + "/".join(unquote(s) for s in segments[1:])
        request = api_pb2.GetResourceRequest(ResourcePath=uri).SerializeToString()
        data = await self._cdh.call(CDH_RESOURCE, "GetResource", request, timeout=TIMEOUT_S)
        return Reply(200, api_pb2.GetResourceResponse.FromString(data).Resource, "application/octet-stream")


def _runtime_data(query: dict[str, list[str]]) -> bytes | None:
    values = query.get("runtime_data")
    if not values:
        return None
    encoding = query.get("encoding", [None])[0]
    if encoding is None:
        return values[0].encode()
    if encoding != "base64":
        return None
    try:
        return b64url_decode(values[0], "runtime_data")  # URL-safe base64 without padding only
    except InvalidRequest:
        return None


def _loopback(peer: object) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        return ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass(eq=False)
class _Connection:
    """`waiting_since`: when the connection began waiting for its peer (the head, or taking the reply);
    None while the agent works on the request."""

    writer: asyncio.StreamWriter
    waiting_since: float | None = field(default_factory=time.monotonic)


class ConnectionLimiter:
    """At most `limit` connections served; room is made by evicting one that has waited `evict_after_s` for its peer.

    It also holds the `reply_budget` the connections' replies are charged to.
    """

    def __init__(
        self,
        limit: int = MAX_CONNECTIONS,
        *,
        evict_after_s: float = EVICT_AFTER_S,
        wait_s: float = IO_TIMEOUT_S,
        reply_budget: ReplyBudget | None = None,
    ) -> None:
        self.limit = limit
        self.evict_after_s = evict_after_s
        self.wait_s = wait_s
        self.reply_budget = reply_budget if reply_budget is not None else ReplyBudget(REPLY_BUDGET)
        self.active: set[_Connection] = set()
        self.waiting = 0

    async def admit(self, conn: _Connection) -> bool:
        if len(self.active) < self.limit:
            self.active.add(conn)
            return True
        if self.waiting >= self.limit:
            return False
        self.waiting += 1
        try:
            deadline = time.monotonic() + self.wait_s
            while True:
                if len(self.active) < self.limit:
                    self.active.add(conn)
                    return True
                stalled = [c for c in self.active if c.waiting_since is not None]
                if stalled:
                    oldest = min(stalled, key=lambda c: c.waiting_since or 0.0)
                    if time.monotonic() - (oldest.waiting_since or 0.0) >= self.evict_after_s:
                        self.active.discard(oldest)
                        oldest.writer.transport.abort()
                        log.info("rest.connection.evicted", connections=len(self.active))
                        self.active.add(conn)
                        return True
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.1)
        finally:
            self.waiting -= 1

    def release(self, conn: _Connection) -> None:
        self.active.discard(conn)


async def _serve_connection(
    api: RestApi, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limiter: ConnectionLimiter | None = None
) -> None:
    conn = _Connection(writer)
    if limiter is not None and not await limiter.admit(conn):
        log.warning("rest.connection.refused", connections=len(limiter.active))
        writer.transport.abort()
        return
    try:
        await _serve_admitted(api, reader, writer, conn, limiter.reply_budget if limiter is not None else None)
    finally:
        if limiter is not None:
            limiter.release(conn)
        writer.close()


async def _serve_admitted(
    api: RestApi,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: _Connection,
    budget: ReplyBudget | None = None,
) -> None:
    reply: Reply
    method = target = "-"
    started = time.monotonic()
    try:
        if not _loopback(writer.get_extra_info("peername")):
            reply = _text(403, "Forbidden")
        else:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=IO_TIMEOUT_S)
            started = time.monotonic()  # the request's time starts with its head, not with a slow client's wait
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            length = int(headers.get("content-length", "0"))
            if not 0 <= length <= MAX_BODY:
                reply = _text(400, "BAD REQUEST")
            else:
                body = await asyncio.wait_for(reader.readexactly(length), timeout=IO_TIMEOUT_S) if length else b""
                conn.waiting_since = None
                reply = await api.handle(method, target, body)
    except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError, TimeoutError):
        reply = _text(400, "BAD REQUEST")
    except ConnectionError:
        return
    except Exception as exc:  # an agent bug: one safe line, a generic answer
        log_crash("rest.crash", exc, method=method, path=_path_of(target))
        reply = _text(500, "internal error")
    conn.waiting_since = time.monotonic()  # a reply waiting for budget may make room for a new connection
    charge = Charge(None, 0)
    refused: dict[str, int] = {}  # for the request's one line: what the budget refused
    if budget is not None:
        taken = await budget.charge(len(reply.body))
        if taken is None:
            refused = {"length": len(reply.body), "limit": budget.limit_bytes, "held": budget.held}
            reply = _text(503, _refused(len(reply.body), budget))
        else:
            charge = taken
    held = [reply]
    del reply  # `_write_reply` drops it once written: the transport's buffer is then the only copy
    try:
        await _write_reply(writer, conn, held, method, target, started=started, refused=refused)
    finally:
        charge.release()


def _refused(size: int, budget: ReplyBudget | None) -> str:
    limit = budget.limit_bytes if budget is not None else 0
    return f"reply is {size} bytes and the {limit}-byte reply budget is held by replies waiting for their readers"


async def _write_reply(
    writer: asyncio.StreamWriter,
    conn: _Connection,
    held: list[Reply],
    method: str,
    target: str,
    *,
    started: float,
    refused: dict[str, int] | None = None,
) -> None:
    """Write the reply and log the request's one line: `rest.request` (at warning with `refused`, the figures
    of a reply the budget refused, which `held` replaced), or `rest.write_timeout` for a peer that did not read;
    `duration_ms` from `started` (the request head's arrival) until the peer took the reply."""
    reply = held.pop()
    status = reply.status
    status_line = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
    head_out = (
        f"{status_line}Content-Type: {reply.content_type}\r\nContent-Length: {len(reply.body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    conn.waiting_since = time.monotonic()
    try:
        writer.write(head_out.encode())
        writer.write(reply.body)  # not concatenated: no second copy of a resource
        del reply  # what the peer has not taken is in the transport's buffer
        async with asyncio.timeout(IO_TIMEOUT_S):
            await writer.drain()
    except TimeoutError:
        writer.transport.abort()  # a peer that does not read its reply
        log.warning("rest.write_timeout", method=method, path=_path_of(target), status=status, **(refused or {}))
        return
    except OSError:
        pass
    duration_ms = round((time.monotonic() - started) * 1000, 2)
    if refused:
        log.warning(
            "rest.request", method=method, path=_path_of(target), status=status, duration_ms=duration_ms, **refused
        )
    else:
        log.info("rest.request", method=method, path=_path_of(target), status=status, duration_ms=duration_ms)


def _path_of(target: str) -> str:
    return clip(target.partition("?")[0])


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="api-server-rest", description="REST API in front of the AA and CDH.")
    parser.add_argument("-b", "--bind", default="127.0.0.1:8006", help="listen address (default %(default)s)")
    parser.add_argument("-f", "--features", default="resource", choices=FEATURES, help="default %(default)s")
    parser.add_argument("-a", "--aa_addr", default=DEFAULT_AA_SOCKET, help="AA ttRPC socket")
    parser.add_argument("-c", "--cdh_addr", default=DEFAULT_CDH_SOCKET, help="CDH ttRPC socket")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    common.add_version_flag(parser)
    return parser


async def run(args: argparse.Namespace) -> int:
    common.configure_logging(None, args.log_level)
    host, sep, port = args.bind.rpartition(":")
    if not sep or not port.isdigit():
        msg = f"--bind is {args.bind!r}, expected HOST:PORT"
        raise ConfigError(msg, key="--bind")
    aa = TtrpcClient(unix_path(args.aa_addr, key="--aa_addr"))
    cdh = TtrpcClient(unix_path(args.cdh_addr, key="--cdh_addr"))
    api = RestApi(features=args.features, aa_client=aa, cdh_client=cdh)
    limiter = ConnectionLimiter()
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(api, r, w, limiter), host.strip("[]"), int(port), limit=MAX_HEAD
    )
    log.info("rest.listening", bind=args.bind, features=args.features)
    resume_gc()  # start-up is over (agent.lifecycle)
    try:
        await common.wait_for_stop()
    finally:
        server.close()
        await server.wait_closed()
        await aa.close()
        await cdh.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    with gc_paused():
        args = build_parser().parse_args(argv)
        return common.run_command("api-server-rest", lambda: run(args))
