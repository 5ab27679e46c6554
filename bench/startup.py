"""Start-up inside Kata's launch window, and idle memory: exec -> first answered call, RSS, private memory.

kata-agent gives each guest component 6 s (interpreter start included) for its socket. Each round runs, in turn:
the import floor (`python -c "import grpc, grpc.aio, httpx, structlog, google.protobuf.message, cryptography...ec,
...aead"`), `cvm-agent serve` (first GetTeeType over gRPC), `attestation-agent` (GetTeeType over ttRPC),
`confidential-data-hub` (a GetResource with an empty request: answered INVALID_ARGUMENT, no KBS involved) and
`api-server-rest` (`GET /info`), each with a KBS configured that they must not need yet and at its default log
level (info, as Kata and the systemd units run them: start-up lines are written, so structlog is loaded once idle);
then `cvm-agent serve` with `kbs.preload = false` (idle RSS); then the three Kata drop-ins are started together
and, once idle, their `/proc/PID/smaps_rollup` private memory is summed, and again after the data hub served a
pod's first secret (a token from the attestation agent, a handshake, a fetch). Medians of the rounds; first calls
are made with hand-written frames so that the measuring client imports nothing. The guest package is byte-compiled
first, as guests ship it.

    python -m bench.startup [ROUNDS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    BIN,
    KbsProcess,
    Row,
    compile_agent,
    free_port,
    http_answered,
    private_kib,
    render,
    smaps_rollup,
    ttrpc_answered,
    ttrpc_call,
)

IMPORT_FLOOR = (
    "import grpc, grpc.aio, httpx, structlog, google.protobuf.message, "
    "cryptography.hazmat.primitives.asymmetric.ec, cryptography.hazmat.primitives.ciphers.aead"
)
LIGHT_FLOOR = "import asyncio, google.protobuf.message, structlog"
AA = "attestation_agent.AttestationAgentService"
SETTLE_S = 1.0
SECRET, SECRET_BYTES = "default/bench/secret", b"bench secret"


def floor_ms(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return (time.perf_counter() - started) * 1000


def floor_peak_rss_kib(code: str) -> int:
    """The floor process's VmHWM (its own peak: ru_maxrss would inherit the forking parent's)."""
    report = '; print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])'
    return int(subprocess.run([sys.executable, "-c", code + report], check=True, capture_output=True).stdout)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def grpc_answered(path: str) -> bool:
    import grpc

    if not Path(path).exists():
        return False
    with grpc.insecure_channel(f"unix:{path}") as channel:
        call = channel.unary_unary(f"/{AA}/GetTeeType", request_serializer=bytes, response_deserializer=bytes)
        try:
            call(b"", timeout=30)
        except grpc.RpcError:
            return False
    return True


def until(answered: Callable[[], bool], process: subprocess.Popen[bytes], started: float) -> float:
    while not answered():
        if process.poll() is not None:
            msg = f"{process.args!r} exited with {process.returncode} before answering"
            raise RuntimeError(msg)
        time.sleep(0.002)
    return (time.perf_counter() - started) * 1000


class Programs:
    """The four programs' command lines and first calls, in one scratch directory."""

    def __init__(self, root: Path, kbs_url: str) -> None:
        self.root = root
        self.rest_port = free_port()
        (root / "aa.toml").write_text(f'[token_configs.kbs]\nurl = "{kbs_url}"\n[cvm_agent]\ntee = "sample"\n')
        (root / "cdh.toml").write_text(
            f'socket = "unix://{root / "cdh.sock"}"\n[aa]\naa_socket = "unix://{root / "aa.sock"}"\n'
            f'[kbc]\nname = "cc_kbc"\nurl = "{kbs_url}"\n'
        )
        (root / "agent.toml").write_text(f'[kbs]\nurl = "{kbs_url}"\n')
        (root / "lazy.toml").write_text(f'[kbs]\nurl = "{kbs_url}"\npreload = false\n')
        self.commands = {
            "serve": [
                str(BIN / "cvm-agent"),
                "serve",
                "--config",
                str(root / "agent.toml"),
                "--tee",
                "sample",
                "--socket",
                str(root / "agent.sock"),
            ],
            "aa": [
                str(BIN / "attestation-agent"),
                "-a",
                f"unix://{root / 'aa.sock'}",
                "-c",
                str(root / "aa.toml"),
            ],
            "cdh": [
                *(str(BIN / "confidential-data-hub"), "-c", str(root / "cdh.toml")),
                *("--ocicrypt-config", str(root / "ocicrypt.json")),
            ],
            "rest": [
                *(str(BIN / "api-server-rest"), "-b", f"127.0.0.1:{self.rest_port}"),
                *("-a", f"unix://{root / 'aa.sock'}", "-c", f"unix://{root / 'cdh.sock'}"),
            ],
        }
        self.commands["serve-lazy"] = [
            str(root / "lazy.toml") if a.endswith("agent.toml") else a for a in self.commands["serve"]
        ]
        self.first_call: dict[str, Callable[[], bool]] = {
            "serve": lambda: grpc_answered(str(root / "agent.sock")),
            "serve-lazy": lambda: grpc_answered(str(root / "agent.sock")),
            "aa": lambda: ttrpc_answered(str(root / "aa.sock"), AA, "GetTeeType"),
            "cdh": lambda: ttrpc_answered(str(root / "cdh.sock"), "api.GetResourceService", "GetResource"),
            "rest": lambda: http_answered("127.0.0.1", self.rest_port),
        }

    def clean(self) -> None:
        for name in ("agent.sock", "aa.sock", "cdh.sock"):
            (self.root / name).unlink(missing_ok=True)

    def start(self, name: str) -> tuple[subprocess.Popen[bytes], float]:
        started = time.perf_counter()
        process = subprocess.Popen(self.commands[name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return process, started


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=10)


def one_round(programs: Programs) -> dict[str, float]:
    result = {"floor_ms": floor_ms(IMPORT_FLOOR), "light_floor_ms": floor_ms(LIGHT_FLOOR)}
    for name in ("serve", "aa", "cdh", "rest", "serve-lazy"):
        programs.clean()
        process, started = programs.start(name)
        try:
            result[f"{name}_ms"] = until(programs.first_call[name], process, started)
            if name.startswith("serve"):
                time.sleep(SETTLE_S)
                result[f"{name}_rss_kib"] = rss_kib(process.pid)
        finally:
            stop(process)
    programs.clean()
    trio = [programs.start(name)[0] for name in ("aa", "cdh", "rest")]
    try:
        for name, process in zip(("aa", "cdh", "rest"), trio, strict=True):
            until(programs.first_call[name], process, time.perf_counter())
        time.sleep(SETTLE_S)
        result["trio_private_kib"] = sum(private_kib(p.pid) for p in trio)
        result["trio_rss_kib"] = sum(smaps_rollup(p.pid).get("Rss", 0) for p in trio)
        result["trio_pss_kib"] = sum(smaps_rollup(p.pid).get("Pss", 0) for p in trio)
        # a pod's first secret: the data hub asks the attestation agent for a token (a handshake) and fetches
        path = f"kbs:///{SECRET}".encode()
        request = b"\x0a" + bytes([len(path)]) + path  # GetResourceRequest.ResourcePath = 1
        reply = ttrpc_call(str(programs.root / "cdh.sock"), "api.GetResourceService", "GetResource", request)
        if reply is None or not reply.endswith(SECRET_BYTES):
            msg = f"the data hub did not serve the secret: {reply!r}"
            raise RuntimeError(msg)
        time.sleep(SETTLE_S)
        result["trio_secret_private_kib"] = sum(private_kib(p.pid) for p in trio)
    finally:
        stop(*trio)
    return result


def rows(rounds: int = 5) -> list[Row]:
    compile_agent()
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="cvm-bench-", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "res" / SECRET).parent.mkdir(parents=True)
        (root / "res" / SECRET).write_bytes(SECRET_BYTES)
        with KbsProcess(root / "res") as kbs:
            programs = Programs(root, kbs.url)
            samples = [one_round(programs) for _ in range(rounds)]
    floor_peak = statistics.median(floor_peak_rss_kib(IMPORT_FLOOR) for _ in range(3)) / 1024
    light_peak = statistics.median(floor_peak_rss_kib(LIGHT_FLOOR) for _ in range(3)) / 1024

    def med(key: str) -> float:
        return statistics.median(s[key] for s in samples)

    floor, light = med("floor_ms"), med("light_floor_ms")
    floor_text = f"{floor:.0f} ms import floor"
    out = []
    for name, figure, limit in (
        ("serve", "`cvm-agent serve` exec -> first GetTeeType (gRPC)", 1.0),
        ("aa", "`attestation-agent` exec -> first GetTeeType (ttRPC)", 0.7),
        ("cdh", "`confidential-data-hub` exec -> first answered call", 0.8),
        ("rest", "`api-server-rest` exec -> first answered call", 0.8),
    ):
        value = med(f"{name}_ms")
        out.append(Row(figure, f"{value:.0f} ms", floor_text, value / floor, f"<= {limit:g}x", limit))
    for name, figure in (
        ("serve", "`cvm-agent serve` idle RSS (KBS client preloaded, the default)"),
        ("serve-lazy", "`cvm-agent serve` idle RSS, `kbs.preload = false`"),
    ):
        rss = med(f"{name}_rss_kib") / 1024
        floor_rss = f"{floor_peak:.1f} MiB import floor peak RSS"
        out.append(Row(figure, f"{rss:.1f} MiB", floor_rss, rss / floor_peak, "<= 1.0x", 1.0))
    private = med("trio_private_kib") / 1024
    detail = f"{private:.1f} MiB private (RSS {med('trio_rss_kib') / 1024:.0f}, PSS {med('trio_pss_kib') / 1024:.0f})"
    out.append(
        Row(
            "the three Kata drop-ins together, idle",
            detail,
            f"{light_peak:.1f} MiB, {light:.0f} ms light floor",
            private / 45.0,
            "<= 45 MiB private (ratio to 45)",
            1.0,
        )
    )
    after = med("trio_secret_private_kib") / 1024
    out.append(
        Row(
            "the three Kata drop-ins after a pod's first secret (CDH GetResource: token, handshake, fetch)",
            f"{after:.1f} MiB private",
            f"{private:.1f} MiB idle",
            None,
            "(no goal)",
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(render(rows(int(args[0]) if args else 5)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
