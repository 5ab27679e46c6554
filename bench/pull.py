"""Guest image pull on loopback: throughput against a plain pipeline, and peak memory of the agent.

A registry (Debian's docker-registry) on loopback holds an image of `--layers` gzip layers, `--size-mib` MiB of
files in total (half random, half text, so gzip has work to do). In the same run:

- floor: a plain download + decompress + untar of the same layers: httpx streams each blob to a file, GNU
  `tar -xzf` unpacks it; the layers run with the same concurrency as the agent (3);
- measured: `PullImage` on a `cvm-agent serve` process (sample TEE) into an empty work dir, until the overlay is
  mounted (needs root and overlayfs), and the agent's idle RSS and peak RSS (`VmHWM`) around the pull.

Floor and pull alternate for `--rounds` rounds (medians reported; the largest RSS growth). Reported: both
times, the throughput ratio floor_time / pull_time (goal >= 0.8), and peak - idle RSS (goal <= 64 MiB).
`python -m bench.pull [--size-mib 1024] [--layers 4] [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx

from agent.api._gen import api_pb2
from bench.common import Row
from tests.fakes.registry import LAYER_GZIP, OCI_CONFIG, OCI_MANIFEST, Registry, registry_available

CHUNK = 1 << 20


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def make_layer(path: Path, size: int, seed: int) -> tuple[str, str, int]:
    """A gzip layer of `size` bytes of files at `path`; returns (blob digest, diff_id, blob size)."""
    diff = hashlib.sha256()
    blob = hashlib.sha256()

    class Tee(io.RawIOBase):
        def __init__(self, out: gzip.GzipFile) -> None:
            self.out = out

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            diff.update(data)
            return self.out.write(data)

    with (
        path.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
        tarfile.open(fileobj=Tee(gz), mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        text = (f"layer {seed} " * 100_000).encode()[: CHUNK // 2]
        for i in range(max(1, size // CHUNK)):
            data = os.urandom(CHUNK // 2) + text
            info = tarfile.TarInfo(f"d{seed}/{i // 64}/f{i}")
            info.size = len(data)
            tar.addfile(info, _Bytes(data))
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            blob.update(chunk)
    return f"sha256:{blob.hexdigest()}", f"sha256:{diff.hexdigest()}", path.stat().st_size


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out = self.data[self.pos : end].tobytes()
        self.pos += len(out)
        return out


def push_file(http: httpx.Client, base: str, repo: str, path: Path, digest: str) -> None:
    start = http.post(f"{base}/v2/{repo}/blobs/uploads/")
    location = start.headers["location"]
    location = base + location if location.startswith("/") else location
    sep = "&" if "?" in location else "?"

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    done = http.put(
        f"{location}{sep}digest={digest}", content=chunks(), headers={"Content-Length": str(path.stat().st_size)}
    )
    assert done.status_code == 201, done.text


def floor(base: str, repo: str, layers: list[tuple[str, str, int]], root: Path) -> float:
    def one(index: int, digest: str) -> None:
        blob = root / f"blob{index}"
        with (
            httpx.Client(timeout=120) as http,
            http.stream("GET", f"{base}/v2/{repo}/blobs/{digest}") as response,
            blob.open("wb") as out,
        ):
            for chunk in response.iter_raw(CHUNK):
                out.write(chunk)
        target = root / f"layer{index}"
        target.mkdir()
        subprocess.run(["tar", "-xzf", str(blob), "-C", str(target)], check=True)
        blob.unlink()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(one, range(len(layers)), [d for d, _, _ in layers]))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pull")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure(args.size_mib, args.layers, args.rounds)
    if isinstance(result, str):
        print(f"bench.pull skipped: {result}")
        return 0
    mib, floor_s, pull_s, idle, peak = result
    print(
        f"image: {args.layers} layers, {args.size_mib} MiB unpacked, {mib:.0f} MiB compressed; medians of {args.rounds}"
    )
    print(f"floor (httpx download + tar -xzf, 3 at once): {floor_s:6.2f} s  {mib / floor_s:6.1f} MiB/s")
    print(f"PullImage (cvm-agent serve, to mounted rootfs): {pull_s:6.2f} s  {mib / pull_s:6.1f} MiB/s")
    print(f"throughput ratio floor/pull: {floor_s / pull_s:.2f} (goal >= 0.8)")
    print(
        f"agent RSS: idle {idle / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
        f"peak - idle {(peak - idle) / 1024:.1f} MiB (goal <= 64)"
    )
    return 0


def rows(size_mib: int = 32, layers: int = 4, rounds: int = 3) -> list[Row]:
    """The `make bench` rows: PullImage throughput against its floor, and the pull's memory growth."""
    result = measure(size_mib, layers, rounds)
    if isinstance(result, str):
        return [Row(f"PullImage throughput ({size_mib} MiB image)", f"skipped: {result}", "", None, ">= 0.8x floor")]
    mib, floor_s, pull_s, idle, peak = result
    growth = (peak - idle) / 1024
    return [
        Row(
            f"PullImage throughput ({size_mib} MiB unpacked, {mib:.0f} MiB gzip, {layers} layers)",
            f"{mib / pull_s:.1f} MiB/s",
            f"{mib / floor_s:.1f} MiB/s httpx download + tar -xzf",
            floor_s / pull_s,
            ">= 0.8x",
            0.8,
            at_least=True,
        ),
        Row("PullImage agent RSS growth", f"{growth:.1f} MiB", f"idle {idle / 1024:.1f} MiB", None, "<= 64 MiB"),
    ]


def measure(size_mib: int, layer_count: int, rounds: int) -> tuple[float, float, float, int, int] | str:
    """(compressed MiB, floor s, pull s, agent idle RSS KiB, peak RSS KiB), medians; or why it cannot run here."""
    reason = registry_available() or (None if os.geteuid() == 0 else "mounting needs root")
    if reason:
        return reason
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        per_layer = size_mib * CHUNK // layer_count
        print(f"bench.pull: building {layer_count} layers, {size_mib} MiB of files ...", file=sys.stderr, flush=True)
        layers = [make_layer(root / f"l{i}.tar.gz", per_layer, i) for i in range(layer_count)]
        compressed = sum(size for _, _, size in layers)
        with Registry(root / "registry") as registry:
            repo = "bench/big"
            with httpx.Client(timeout=300) as http:
                config = json.dumps(
                    {
                        "architecture": "amd64",
                        "os": "linux",
                        "rootfs": {"type": "layers", "diff_ids": [d for _, d, _ in layers]},
                    }
                ).encode()
                config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
                (root / "config.json").write_bytes(config)
                push_file(http, registry.url, repo, root / "config.json", config_digest)
                for i, (digest, _, _) in enumerate(layers):
                    push_file(http, registry.url, repo, root / f"l{i}.tar.gz", digest)
                    (root / f"l{i}.tar.gz").unlink()
                manifest = json.dumps(
                    {
                        "schemaVersion": 2,
                        "mediaType": OCI_MANIFEST,
                        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                        "layers": [{"mediaType": LAYER_GZIP, "digest": d, "size": s} for d, _, s in layers],
                    }
                ).encode()
                response = http.put(
                    f"{registry.url}/v2/{repo}/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST}
                )
                assert response.status_code == 201, response.text
            floors, pulls, growth = [], [], []
            for round_ in range(rounds):  # alternated, so a change in machine load hits both sides
                floor_dir = root / "floor"
                floor_dir.mkdir()
                floors.append(floor(registry.url, repo, layers, floor_dir))
                shutil.rmtree(floor_dir)
                pull_s, idle, peak = pull_with_agent(root / f"round{round_}", registry, repo)
                pulls.append(pull_s)
                growth.append((idle, peak))
            floor_s, pull_s = statistics.median(floors), statistics.median(pulls)
            idle, peak = max(growth, key=lambda g: g[1] - g[0])
    return compressed / CHUNK, floor_s, pull_s, idle, peak


def pull_with_agent(root: Path, registry: Registry, repo: str) -> tuple[float, int, int]:
    """One pull by a fresh agent into a fresh work dir: (seconds, idle RSS KiB, peak RSS KiB)."""
    root.mkdir()
    socket = root / "agent.sock"
    work = root / "work"
    bundle = root / "bundle"
    bundle.mkdir()
    config = root / "agent.toml"
    config.write_text(
        f'tee = "sample"\nsocket = "{socket}"\n[log]\nlevel = "warning"\n[image]\nwork_dir = "{work}"\n'
        f'[[image.registry_config.registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
    )
    agent = subprocess.Popen(
        [str(Path(sys.executable).parent / "cvm-agent"), "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        idle = status_kib(agent.pid, "VmRSS")
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub: Any = channel.unary_unary(
                "/api.ImagePullService/PullImage",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=api_pb2.ImagePullResponse.FromString,
            )
            started = time.perf_counter()
            stub(
                api_pb2.ImagePullRequest(image_url=f"{registry.host}/{repo}:v1", bundle_path=str(bundle)), timeout=1800
            )
            pull_s = time.perf_counter() - started
        peak = status_kib(agent.pid, "VmHWM")
    finally:
        agent.terminate()
        agent.wait(10)
        subprocess.run(["umount", "-l", str(bundle / "rootfs")], check=False)
    return pull_s, idle, peak


if __name__ == "__main__":
    raise SystemExit(main())
