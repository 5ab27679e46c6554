"""RPC latency over the gRPC unix socket, as ratios to the floor of an empty RPC measured in the same run.

Floor: `GetTeeType` (empty request, constant answer: transport + dispatch only). Measured: `GetEvidence`
(sample TEE), `GetResource` with a warm attested session (one KBS GET + JWE decrypt over loopback HTTP), and a
cold `GetResource` (full auth + attest + GET + decrypt with a fresh P-256 key).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc.aio
from cvm_tools.devkbs.server import DevKbsServer

from agent import log as agent_log
from agent.api._gen import api_pb2
from agent.api._gen import attestation_agent_pb2 as aa
from agent.app import App
from agent.config import Config, KbsConfig, ListenAddress


async def median_ms(call: Callable[[], Awaitable[Any]], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def run(rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "res" / "default" / "key").mkdir(parents=True)
        (root / "res" / "default" / "key" / "1").write_bytes(b"x" * 32)
        with DevKbsServer(root / "res") as kbs:
            sock = str(root / "agent.sock")
            app = App(Config(tee="sample", socket=ListenAddress(unix_path=sock), kbs=KbsConfig(url=kbs.url)))
            await app.start()
            await app.complete_startup()
            assert app.kbs is not None
            client = app.kbs
            channel = grpc.aio.insecure_channel(f"unix:{sock}")

            def stub(path: str, response: Any) -> Any:
                return channel.unary_unary(
                    path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response.FromString
                )

            tee = stub("/attestation_agent.AttestationAgentService/GetTeeType", aa.GetTeeTypeResponse)
            evidence = stub("/attestation_agent.AttestationAgentService/GetEvidence", aa.GetEvidenceResponse)
            resource = stub("/api.GetResourceService/GetResource", api_pb2.GetResourceResponse)
            request = api_pb2.GetResourceRequest(ResourcePath="kbs:///default/key/1")
            try:
                await tee(aa.GetTeeTypeRequest())  # warm the channel
                floor = await median_ms(lambda: tee(aa.GetTeeTypeRequest()), rounds)
                ev = await median_ms(lambda: evidence(aa.GetEvidenceRequest(RuntimeData=b"r" * 48)), rounds)
                await resource(request)
                warm = await median_ms(lambda: resource(request), rounds)

                async def cold() -> None:
                    await client.fresh_session()  # a full handshake, then the fetch on the new session
                    await resource(request)

                cold_ms = await median_ms(cold, max(5, rounds // 10))
            finally:
                await channel.close()
                await app.close()
    return {"floor_ms": floor, "evidence": ev / floor, "resource_warm": warm / floor, "resource_cold": cold_ms / floor}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rounds = int(args[0]) if args else 200
    agent_log.configure("error")
    result = asyncio.run(run(rounds))
    print(f"rpc floor (GetTeeType, median of {rounds}): {result['floor_ms']:.3f} ms")
    for name in ("evidence", "resource_warm", "resource_cold"):
        print(f"{name:>14}: {result[name]:7.2f} x floor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
