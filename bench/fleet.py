"""Token refresh under a fleet: N agents fetching a resource at a steady rate from one KBS with short tokens.

Each agent is its own process (one `KbsClient`, as in `cvm-agent serve`), fetching `kbs:///default/key/1` at
`--rate` per second for `--seconds`; the dev KBS issues `--token-s` second tokens. Reported: the handshakes the
KBS counted (goal: about one per 75-80 % of a token lifetime per agent, i.e. <= 4 per agent for 45 s and 20 s
tokens, instead of one per fetch) and the latency tail of every fetch after each agent's first, against the
floor of the same fleet with tokens that never need renewing (goal: p99 <= 2x the floor's p99, i.e. no call waits
on a handshake). On a loaded machine p99/p50 alone mostly measures the machine, hence the floor run.

    python -m bench.fleet [--agents 10] [--seconds 45] [--rate 4] [--token-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from bench.common import Row


async def agent(url: str, seconds: float, rate: float) -> dict[str, object]:
    from agent.config import KbsConfig
    from agent.kbs.client import KbsClient
    from agent.kbs.resource import parse_resource_uri
    from agent.tee.sample import SampleAttester

    client = KbsClient(KbsConfig(url=url), SampleAttester())
    uri = parse_resource_uri("kbs:///default/key/1")
    latencies: list[float] = []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        began = time.perf_counter()
        await client.get_resource(uri)
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(max(0.0, start + len(latencies) / rate - time.monotonic()))
    await client.aclose()
    return {"latencies": latencies, "handshakes": client.handshakes}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--rate", type=float, default=4.0, help="fetches per second per agent")
    parser.add_argument("--token-s", type=float, default=20.0, help="token lifetime the KBS issues")
    parser.add_argument("--agent-url", help=argparse.SUPPRESS)  # internal: run one agent against this KBS
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.agent_url:
        print(json.dumps(asyncio.run(agent(args.agent_url, args.seconds, args.rate))))
        return 0

    short = fleet(args, args.token_s)
    floor = fleet(args, 100 * args.seconds)  # the same fleet with tokens that outlive the run: no renewal at all
    per_agent = int(args.seconds / (0.75 * args.token_s)) + 1
    print(f"fleet: {args.agents} agents x {args.seconds:g} s x {args.rate:g}/s, {args.token_s:g} s tokens")
    print(f"  fetches              {short.fetches}")
    print(
        f"  handshakes           {short.handshakes} (goal <= {per_agent * args.agents}; one per fetch: {short.fetches})"
    )
    print(
        f"  steady p50, p99      {short.p50 * 1000:.1f} ms, {short.p99 * 1000:.1f} ms: "
        f"p99/p50 = {short.p99 / short.p50:.2f}"
    )
    print(
        f"  floor p50, p99       {floor.p50 * 1000:.1f} ms, {floor.p99 * 1000:.1f} ms (no renewals): "
        f"p99/p50 = {floor.p99 / floor.p50:.2f}"
    )
    print(f"  p99 vs floor p99     {short.p99 / floor.p99:.2f} (goal <= 2: renewals add no tail of their own)")
    return 0


def rows(agents: int = 10, seconds: float = 45.0, rate: float = 4.0, token_s: float = 20.0) -> list[Row]:
    """The `make bench` rows: handshakes the KBS counted, and the latency tail against the no-renewal floor."""
    args = argparse.Namespace(agents=agents, seconds=seconds, rate=rate)
    short = fleet(args, token_s)
    floor = fleet(args, 100 * seconds)
    goal = (int(seconds / (0.75 * token_s)) + 1) * agents
    shape = f"{agents} agents x {seconds:g} s x {rate:g} fetches/s, {token_s:g} s tokens"
    return [
        Row(
            f"fleet handshakes ({shape})",
            f"{short.handshakes} of {short.fetches} fetches",
            f"{short.fetches} (one per fetch)",
            short.handshakes / goal,
            f"<= {goal} (ratio to {goal})",
            1.0,
        ),
        Row(
            f"fleet steady latency p99 / p50 ({shape})",
            f"p50 {short.p50 * 1000:.1f} ms, p99 {short.p99 * 1000:.1f} ms",
            f"no-renewal fleet: p50 {floor.p50 * 1000:.1f} ms, p99 {floor.p99 * 1000:.1f} ms",
            short.p99 / short.p50,
            "<= 2x p50",
            2.0,
        ),
    ]


@dataclass(frozen=True)
class FleetRun:
    fetches: int
    handshakes: int
    p50: float
    p99: float


def fleet(args: argparse.Namespace, token_s: float) -> FleetRun:
    from cvm_tools.devkbs.server import DevKbsServer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "default" / "key").mkdir(parents=True)
        (root / "default" / "key" / "1").write_bytes(b"k" * 32)
        with DevKbsServer(root, token_minutes=token_s / 60) as kbs:
            command = [sys.executable, "-m", "bench.fleet", "--agent-url", kbs.url]
            command += ["--seconds", str(args.seconds), "--rate", str(args.rate)]
            agents = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(args.agents)]
            results = [json.loads(process.communicate()[0]) for process in agents]
            handshakes = kbs.core.counters["auth"]
    warm = [value for r in results for value in r["latencies"][1:]]  # each agent's first fetch is cold
    return FleetRun(len(warm) + len(results), handshakes, percentile(warm, 0.5), percentile(warm, 0.99))


if __name__ == "__main__":
    raise SystemExit(main())
