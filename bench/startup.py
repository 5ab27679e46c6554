"""Start-up inside Kata's launch window: exec -> socket exists, exec -> first successful call, idle RSS.

kata-agent gives each guest component 6 s (interpreter start included) for its socket file to appear. Figures
are medians over several runs, reported in ms and as ratios to the floor measured in the same run: the bare
import time of the runtime dependencies (`python -c "import grpc, google.protobuf, cryptography..., httpx,
structlog"`).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvm_tools.devkbs.server import DevKbsServer

from agent import log as agent_log
from agent.api._gen import api_pb2
from agent.api.ttrpc import TtrpcClient

BIN = Path(sys.executable).parent
FLOOR_CODE = "import grpc, google.protobuf.message, cryptography.hazmat.primitives.asymmetric.ec, httpx, structlog"


def floor_ms() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR_CODE], check=True)
    return (time.perf_counter() - started) * 1000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def wait_socket(path: Path, process: subprocess.Popen[bytes], started: float) -> float:
    while not path.exists():
        if process.poll() is not None:
            msg = f"process exited with {process.returncode} before its socket appeared"
            raise RuntimeError(msg)
        await asyncio.sleep(0.002)
    return (time.perf_counter() - started) * 1000


async def first_call(path: Path, service: str, method: str, payload: bytes, started: float) -> float:
    async with TtrpcClient(str(path)) as client:
        while True:
            try:
                await client.call(service, method, payload, timeout=30)
                return (time.perf_counter() - started) * 1000
            except Exception:
                await asyncio.sleep(0.002)


async def one_round(root: Path, kbs_url: str) -> dict[str, float]:
    aa_sock, cdh_sock = root / "aa.sock", root / "cdh.sock"
    for sock in (aa_sock, cdh_sock):
        sock.unlink(missing_ok=True)
    (root / "aa.toml").write_text(f'[token_configs.kbs]\nurl = "{kbs_url}"\n[cvm_agent]\ntee = "sample"\n')
    (root / "cdh.toml").write_text(
        f'socket = "unix://{cdh_sock}"\n[aa]\naa_socket = "unix://{aa_sock}"\n'
        f'[kbc]\nname = "cc_kbc"\nurl = "{kbs_url}"\n'
    )
    out = subprocess.DEVNULL
    started = time.perf_counter()
    aa = subprocess.Popen(
        [
            str(BIN / "attestation-agent"),
            "-a",
            f"unix://{aa_sock}",
            "-c",
            str(root / "aa.toml"),
            "--log-level",
            "error",
        ],
        stdout=out,
        stderr=out,
    )
    result: dict[str, float] = {}
    cdh = None
    try:
        result["aa_socket_ms"] = await wait_socket(aa_sock, aa, started)
        result["aa_first_call_ms"] = await first_call(
            aa_sock, "attestation_agent.AttestationAgentService", "GetTeeType", b"", started
        )
        started = time.perf_counter()
        cdh = subprocess.Popen(
            [
                str(BIN / "confidential-data-hub"),
                "-c",
                str(root / "cdh.toml"),
                "--log-level",
                "error",
                "--ocicrypt-config",
                str(root / "ocicrypt.json"),
            ],
            stdout=out,
            stderr=out,
        )
        result["cdh_socket_ms"] = await wait_socket(cdh_sock, cdh, started)
        request = api_pb2.GetResourceRequest(ResourcePath="kbs:///default/key/1").SerializeToString()
        result["cdh_first_call_ms"] = await first_call(
            cdh_sock, "api.GetResourceService", "GetResource", request, started
        )
        await asyncio.sleep(1.0)
        result["aa_rss_kib"] = rss_kib(aa.pid)
        result["cdh_rss_kib"] = rss_kib(cdh.pid)
    finally:
        for process in (cdh, aa):
            if process is not None:
                process.terminate()
                process.wait(timeout=10)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rounds = int(args[0]) if args else 5
    agent_log.configure("error")
    floors = [floor_ms() for _ in range(rounds)]
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="cvm-bench-", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "res" / "default" / "key").mkdir(parents=True)
        (root / "res" / "default" / "key" / "1").write_bytes(b"x" * 32)
        with DevKbsServer(root / "res") as kbs:
            for _ in range(rounds):
                samples.append(asyncio.run(one_round(root, kbs.url)))
    floor = statistics.median(floors)
    print(f"floor: bare import of the runtime dependencies, median of {rounds}: {floor:.0f} ms")
    for key in ("aa_socket_ms", "aa_first_call_ms", "cdh_socket_ms", "cdh_first_call_ms"):
        value = statistics.median(s[key] for s in samples)
        print(f"{key:>18}: {value:7.0f} ms  = {value / floor:5.2f} x floor   (kata window: 6000 ms)")
    for key in ("aa_rss_kib", "cdh_rss_kib"):
        print(f"{key:>18}: {statistics.median(s[key] for s in samples) / 1024:7.1f} MiB idle RSS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
