"""GetResource over gRPC, warm and cold, against a plain client doing the same KBS work (issue 13's RPC rows).

The dev KBS runs in its own process, and so does each agent (`cvm-agent serve --tee sample`), as in a guest. Each
round starts a fresh agent and measures, interleaved with the floors:

- cold: the first GetResource of the fresh agent, 1 s after its previous answer (auth, sample evidence, attest, GET,
  JWE decrypt, and whatever is still loaded on first use), against a plain client's raw auth + attest + GET +
  decrypt (stdlib `http.client` on a new connection, a new P-256 key, the pure RCAR state machine), also after 1 s
  of idle, plus one empty RPC after 1 s of idle (what waking the client, the agent and gRPC's pollers costs);
- warm: GetResource on the attested session (one KBS GET + decrypt: no resource bytes are cached), against the plain
  client's GET + decrypt on its kept-alive connection plus one empty RPC;
- the empty RPC: GetTeeType (transport and dispatch only).

    python -m bench.rpc [ROUNDS] [CALLS]
"""

from __future__ import annotations

import asyncio
import http.client
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import BIN, KbsProcess, Row, compile_agent, render

AA = "/attestation_agent.AttestationAgentService"
RESOURCE = "default/key/1"
SETTLE_S = 1.0  # the cold call comes this long after the agent's first answer (kata's pods start after its agents)


class PlainClient:
    """RCAR with the standard library's HTTP client and the agent's pure protocol and JWE code: the work itself."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._conn: http.client.HTTPConnection | None = None
        self._session: Any = None
        self._keypair: Any = None

    def _exchange(self, request: Any) -> tuple[int, bytes, list[str]]:
        assert self._conn is not None
        self._conn.request(request.method, request.path, body=request.body, headers=dict(request.headers or {}))
        response = self._conn.getresponse()
        return response.status, response.read(), response.headers.get_all("set-cookie") or []

    async def attest_and_get(self) -> bytes:
        """A new connection and key, auth + attest + GET + decrypt."""
        from agent.kbs import protocol
        from agent.kbs.jwe import TeeKeyPair
        from agent.tee.sample import SampleAttester

        if self._conn is not None:
            self._conn.close()
        self._conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
        self._keypair = TeeKeyPair.generate()
        url = f"http://127.0.0.1:{self._port}"
        self._session = protocol.RcarSession(tee="sample", tee_pubkey=self._keypair.public_jwk(), kbs=url)
        status, body, cookies = self._exchange(self._session.auth_request())
        self._session.receive_auth(status, body, cookies)
        evidence = await SampleAttester().get_evidence(self._session.binding_digest())
        status, body, _ = self._exchange(self._session.attest_request(evidence))
        self._session.receive_attest(status, body)
        return self.get()

    def get(self) -> bytes:
        """GET + decrypt on the attested session and kept-alive connection."""
        from agent.kbs.jwe import decrypt

        status, body, _ = self._exchange(self._session.resource_request(f"/kbs/v0/resource/{RESOURCE}"))
        outcome = self._session.receive_resource(status, body, what=RESOURCE, may_renew=False)
        assert isinstance(outcome, bytes)
        return decrypt(self._keypair, outcome)


async def timed_ms(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def one_round(root: Path, kbs: KbsProcess, calls: int) -> dict[str, float]:
    import grpc.aio

    from agent.api._gen import api_pb2

    sock = root / "agent.sock"
    sock.unlink(missing_ok=True)
    command = [str(BIN / "cvm-agent"), "serve", "--tee", "sample", "--socket", str(sock), "--kbs-url", kbs.url]
    # the default log level (info): one line per call and per KBS exchange, rendered as JSON, as a guest runs it
    agent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plain = PlainClient(kbs.port)
    try:
        while not sock.exists():  # noqa: ASYNC110 - a file appearing in another process
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            tee = channel.unary_unary(f"{AA}/GetTeeType", request_serializer=bytes, response_deserializer=bytes)
            resource = channel.unary_unary(
                "/api.GetResourceService/GetResource", request_serializer=bytes, response_deserializer=bytes
            )
            request = api_pb2.GetResourceRequest(ResourcePath=f"kbs:///{RESOURCE}").SerializeToString()
            await tee(b"", wait_for_ready=True, timeout=30)
            # every cold figure comes after the same idle time: a process (agent, KBS, this client) idle for a second
            # answers its next message slower, gRPC's pollers most of all (a bare grpc.aio server: ~1 ms hot, 3-9 ms
            # after 0.5 s idle), so the cold floor's RPC is the empty one after the same idle time
            await asyncio.sleep(SETTLE_S)
            idle_empty = await timed_ms(lambda: tee(b"", timeout=30))
            await asyncio.sleep(SETTLE_S)
            cold = await timed_ms(lambda: resource(request, timeout=30))
            await asyncio.sleep(SETTLE_S)
            raw_cold = await timed_ms(plain.attest_and_get)
            empty, warm, raw_warm = [], [], []
            for _ in range(calls):  # interleaved: a change in load hits figure and floor alike
                empty.append(await timed_ms(lambda: tee(b"", timeout=30)))
                warm.append(await timed_ms(lambda: resource(request, timeout=30)))
                raw_warm.append(await timed_ms(lambda: asyncio.sleep(0, plain.get())))
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    med = statistics.median
    return {
        "cold": cold,
        "raw_cold": raw_cold,
        "idle_empty": idle_empty,
        "empty": med(empty),
        "warm": med(warm),
        "raw_warm": med(raw_warm),
    }


def rows(rounds: int = 5, calls: int = 50) -> list[Row]:
    from agent import log as agent_log

    agent_log.configure("error")
    compile_agent()
    with tempfile.TemporaryDirectory(prefix="cvm-bench-", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "res" / "default" / "key").mkdir(parents=True)
        (root / "res" / "default" / "key" / "1").write_bytes(b"x" * 32)
        with KbsProcess(root / "res") as kbs:
            samples = [asyncio.run(one_round(root, kbs, calls)) for _ in range(rounds)]

    def med(key: str) -> float:
        return statistics.median(s[key] for s in samples)

    empty, warm, raw_warm, cold, raw_cold = med("empty"), med("warm"), med("raw_warm"), med("cold"), med("raw_cold")
    idle_empty = med("idle_empty")
    return [
        Row(
            "warm GetResource (gRPC)",
            f"{warm:.2f} ms",
            f"{raw_warm:.2f} ms plain GET + decrypt + {empty:.2f} ms empty RPC",
            warm / (raw_warm + empty),
            "<= 1.3x",
            1.3,
        ),
        Row(
            "cold GetResource (first call of a fresh agent)",
            f"{cold:.1f} ms",
            f"{raw_cold:.1f} ms plain auth + attest + GET + decrypt + {idle_empty:.2f} ms empty RPC (after 1 s idle)",
            cold / (raw_cold + idle_empty),
            "<= 1.3x",
            1.3,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(render(rows(int(args[0]) if args else 5, int(args[1]) if len(args) > 1 else 50)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
