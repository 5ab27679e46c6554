"""Layer unpacking throughput and memory: `python -m bench.layers [--mib N] [--runs N]`.

A synthetic layer (files of mixed sizes, directories, symlinks, hard links) is gzip'd, then unpacked by
GNU `tar -xzf` (the floor: gzip and tar in two processes) and by `LayerStore.ensure_layer` for the plain layer
and for the same layer ocicrypt-encrypted. Each store run is a fresh subprocess, so its peak RSS (ru_maxrss)
minus that of an idle interpreter with the same imports is the memory the unpack costs. Figures are medians;
the ratio `floor s / store s` is what the pull-throughput target (>= 0.8) is about for this stage.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

KEK = bytes(range(32))
KID = "kbs:///default/bench/kek"
MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"

_CHILD = r"""
import asyncio, hashlib, json, resource, shutil, sys, time
from pathlib import Path
from agent.image.store import LayerStore
from agent.keyprovider.service import GuestKeyProvider

blob, media, annotations, work = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if media == "idle":
    print(json.dumps({"rss_kib": idle}))
    raise SystemExit

async def fetch(kid: str) -> bytes:
    return bytes(range(32))

async def main() -> float:
    store = LayerStore(work)
    digest = "sha256:" + hashlib.file_digest(blob.open("rb"), "sha256").hexdigest()
    async def open_blob() -> Path:
        tmp = work / "blob.tmp"
        tmp.hardlink_to(blob)
        return tmp
    started = time.perf_counter()
    await store.ensure_layer(digest, media, annotations, open_blob, GuestKeyProvider(fetch).unwrap_key)
    return time.perf_counter() - started

seconds = asyncio.run(main())
print(json.dumps({"seconds": seconds, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def make_layer(directory: Path, mib: int) -> tuple[Path, int]:
    """A gzip'd tar of about `mib` MiB: text-like and random files, dirs, symlinks, hard links."""
    rng = random.Random(7)
    raw = directory / "layer.tar"
    total, entries = 0, 0
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as archive:
        while total < mib * 1024 * 1024:
            d = f"usr/lib/pkg{entries // 50}"
            if entries % 50 == 0:
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            size = rng.choice([300, 3_000, 3_000, 12_000, 30_000, 30_000, 120_000, 1_000_000])  # distro-like mix
            data = (rng.randbytes(size // 2) + b"text " * (size // 10))[:size]
            info = tarfile.TarInfo(f"{d}/f{entries}")
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
            if entries % 10 == 0:
                link = tarfile.TarInfo(f"{d}/l{entries}")
                link.type, link.linkname = tarfile.SYMTYPE, f"f{entries}"
                archive.addfile(link)
                hard = tarfile.TarInfo(f"{d}/h{entries}")
                hard.type, hard.linkname = tarfile.LNKTYPE, f"{d}/f{entries}"
                archive.addfile(hard)
            total += size
            entries += 1
    blob = directory / "layer.tar.gz"
    with raw.open("rb") as src, gzip.open(blob, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1024 * 1024)
    raw.unlink()
    return blob, entries


def encrypt(blob: Path) -> tuple[Path, dict[str, str]]:
    from cvm_tools.keyprovider.encrypt import encrypt_layer
    from cvm_tools.keyprovider.wrap import WrapKeyProvider

    out = blob.with_suffix(".enc")
    with blob.open("rb") as src, out.open("wb") as dst:
        layer = asyncio.run(encrypt_layer(src, dst, media_type=MEDIA, wrap=WrapKeyProvider(kek=KEK, kid=KID).wrap_key))
    return out, dict(layer.annotations)


def gnu_tar(blob: Path, work: Path) -> float:
    target = work / "gnu"
    target.mkdir()
    started = time.perf_counter()
    subprocess.run(["tar", "-xzf", str(blob), "-C", str(target), "--numeric-owner", "-p"], check=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return seconds


def child(blob: Path, media: str, annotations: dict[str, str], work: Path) -> dict[str, float]:
    store = work / "store"
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(blob), media, json.dumps(annotations), str(store)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    ).stdout
    shutil.rmtree(store, ignore_errors=True)
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layers", description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="uncompressed layer size (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        work = Path(tmp)
        blob, entries = make_layer(work, args.mib)
        encrypted, annotations = encrypt(blob)
        idle = child(blob, "idle", {}, work)["rss_kib"]
        floor = statistics.median(gnu_tar(blob, work) for _ in range(args.runs))
        rows = {"gnu tar -xzf (floor)": (floor, 0.0)}
        for name, path, media, notes in (
            ("LayerStore gzip", blob, MEDIA, {}),
            ("LayerStore gzip+encrypted", encrypted, MEDIA + "+encrypted", annotations),
        ):
            runs = [child(path, media, notes, work) for _ in range(args.runs)]
            rows[name] = (
                statistics.median(r["seconds"] for r in runs),
                max(r["rss_kib"] for r in runs) - idle,
            )
        print(f"layer: {args.mib} MiB uncompressed, {entries} files, {blob.stat().st_size / 2**20:.0f} MiB gzip'd")
        for name, (seconds, rss) in rows.items():
            rate = args.mib / seconds
            extra = f", peak RSS +{rss / 1024:.0f} MiB" if rss else ""
            print(f"  {name:28s} {seconds:6.2f} s  {rate:6.1f} MiB/s  floor/this {floor / seconds:4.2f}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
