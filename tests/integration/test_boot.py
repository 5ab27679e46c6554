"""Boot test: a Debian bookworm tree with cvm-agent installed by rootfs/install.sh, booted with systemd-nspawn.

The tree is debootstrapped once (minbase + python3 + systemd) and cached under GUEST_CACHE; each run works on an
overlay of it. The units run with their full hardening: the agent must still serve under it. The container shares
the host's network (the dev KBS listens on the host's loopback) and gets /run/confidential-containers bound from a
host folder, so the test reaches the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cvm_tools.devkbs.server import DevKbsServer

from agent.api._gen import attestation_agent_pb2 as aa
from agent.api.ttrpc import TtrpcClient
from tests.integration.conftest import SECRET
from tests.integration.test_guest_image import port_free
from tests.integration.test_kata_dropin import cdh_get_resource, free_port
from tests.paths import GUEST_CACHE

pytestmark = [pytest.mark.integration, pytest.mark.boot]

REPO = Path(__file__).resolve().parents[2]
TREE = GUEST_CACHE / "bookworm-minbase"
MIRROR = os.environ.get("CVM_AGENT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
UNITS = ("attestation-agent", "confidential-data-hub", "api-server-rest", "cvm-agent")
ACTIVE_WITHIN_S = 60
SHORT_WATCHDOG_S = 2


def bookworm_tree() -> Path:
    """The cached debootstrap tree; made here only when the gate let the test run without it (CI=true)."""
    if (TREE / "usr/bin/python3").exists():
        return TREE
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is missing: run rootfs/setup-build-host.sh --boot")
    TREE.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="bookworm-", dir=TREE.parent))
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,systemd,systemd-sysv", "bookworm", staging, MIRROR],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    staging.rename(TREE)
    return TREE


@dataclass
class Booted:
    root: Path
    run_dir: Path  # the host side of the container's /run/confidential-containers
    nspawn: subprocess.Popen[bytes]
    init_pid: int
    rest_port: int
    console: Path

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-m", "-p", "systemctl", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-P", prop, f"{unit}.service").stdout.strip()


def container_init(nspawn_pid: int, timeout: float) -> int:
    """The container's PID 1 (systemd), a descendant of systemd-nspawn."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
                if fields.get("PPid", "").strip() == str(nspawn_pid) and fields.get("Name", "").strip() == "systemd":
                    return int(status.parent.name)
        time.sleep(0.1)
    pytest.fail("the container's systemd did not start")


def write_config(root: Path, kbs_url: str, rest_port: int) -> None:
    (root / "etc/default").mkdir(parents=True, exist_ok=True)
    (root / "etc/default/attestation-agent").write_text(f"AA_ARGS=--tee sample\nAA_KBC_PARAMS=cc_kbc::{kbs_url}\n")
    (root / "etc/cvm-agent/cdh.toml").write_text(
        f'socket = "unix:///run/confidential-containers/cdh.sock"\n\n[kbc]\nname = "cc_kbc"\nurl = "{kbs_url}"\n'
    )
    (root / "etc/default/confidential-data-hub").write_text("CDH_ARGS=-c /etc/cvm-agent/cdh.toml\n")
    (root / "etc/default/api-server-rest").write_text(f"REST_ARGS=--features all -b 127.0.0.1:{rest_port}\n")
    # a short watchdog on one unit, so the test sees a stuck process killed and restarted within seconds
    (root / "etc/systemd/system/api-server-rest.service.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/system/api-server-rest.service.d/watchdog.conf").write_text(
        f"[Service]\nWatchdogSec={SHORT_WATCHDOG_S}\n"
    )
    (root / "etc/cvm-agent/agent.toml").write_text(
        f'tee = "sample"\nsocket = "/run/confidential-containers/cvm-agent/agent.sock"\n\n[kbs]\nurl = "{kbs_url}"\n'
    )


@dataclass
class Installed:
    base: Path
    root: Path


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """An overlay of the cached bookworm tree with cvm-agent installed by rootfs/install.sh and its units enabled."""
    if os.geteuid() != 0:
        pytest.skip("install.sh (chroot), systemd-nspawn and the overlay mount need root")
    for tool in ("systemd-nspawn", "nsenter", "chroot", "systemd-analyze"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: run rootfs/setup-build-host.sh --boot")
    if "overlay" not in Path("/proc/filesystems").read_text():
        pytest.skip("the kernel has no overlayfs")
    lower = bookworm_tree()
    with tempfile.TemporaryDirectory(prefix="cvm-boot-", dir="/tmp") as folder:
        base = Path(folder)
        upper, work, root = base / "upper", base / "work", base / "root"
        for d in (upper, work, root):
            d.mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", root],
            check=True,
            capture_output=True,
        )
        try:
            result = subprocess.run(
                ["bash", str(REPO / "rootfs/install.sh"), "--enable", ",".join(UNITS), str(root)],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            yield Installed(base, root)
        finally:
            subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture
def booted(installed: Installed, dev_kbs: DevKbsServer) -> Iterator[Booted]:
    root = installed.root
    run_dir = installed.base / "ccrun"
    run_dir.mkdir()
    rest_port = free_port()
    write_config(root, dev_kbs.url, rest_port)
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)  # keep the journal for after the stop
    console = installed.base / "console.log"
    with console.open("wb") as out:
        nspawn = subprocess.Popen(
            [
                "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit", "-D", str(root),
                f"--bind={run_dir}:/run/confidential-containers",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    init_pid: int | None = None
    try:
        init_pid = container_init(nspawn.pid, 30)
        yield Booted(root, run_dir, nspawn, init_pid, rest_port, console)
    finally:
        if nspawn.poll() is None:
            nspawn.terminate()  # a clean halt of the container
            try:
                nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # killing nspawn alone would orphan the container: its init is in its own PID namespace
                if init_pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(init_pid, signal.SIGKILL)
                nspawn.kill()
                nspawn.wait()


def test_install_sh_tree(installed: Installed) -> None:
    """Debian's interpreter, its posix_local dist-packages, scripts in /usr/local/bin, units verified in the tree."""
    root = installed.root
    site = root / "usr/local/lib/python3.11/dist-packages"
    assert (site / "agent/__init__.py").exists()
    assert not (root / "usr/local/local").exists()
    assert not list((root / "usr/local/lib").glob("python3*/site-packages"))
    for name in ("attestation-agent", "confidential-data-hub", "api-server-rest", "cvm-agent"):
        script = root / "usr/local/bin" / name
        assert script.read_text().splitlines()[0] == "#!/usr/bin/python3.11 -I"
        assert os.access(script, os.X_OK)
    assert (root / "usr/share/doc/cvm-agent/README.md").read_bytes() == (REPO / "README.md").read_bytes()
    for unit in UNITS:
        assert (root / "etc/systemd/system/multi-user.target.wants" / f"{unit}.service").is_symlink()
        verify = subprocess.run(
            ["systemd-analyze", "verify", f"--root={root}", f"{unit}.service"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verify.returncode == 0, verify.stderr
        assert verify.stderr == "", verify.stderr
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", f"--root={root}", f"{unit}.service"],
            capture_output=True,
            text=True,
            check=False,
        )
        exposure = float(security.stdout.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
        assert exposure <= 2.0, security.stdout


def wait_active(booted: Booted, unit: str, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        state = booted.systemctl("is-active", f"{unit}.service").stdout.strip()
        if state == "active":
            return time.monotonic() - started
        if state == "failed":
            return None
        time.sleep(0.5)
    return None


async def serve_checks(booted: Booted) -> None:
    """cvm-agent's gRPC socket and the drop-ins' ttRPC sockets answer from inside the container."""
    channel = grpc.aio.insecure_channel(f"unix:{booted.run_dir / 'cvm-agent/agent.sock'}")
    try:
        stub: Any = channel.unary_unary("/attestation_agent.AttestationAgentService/GetTeeType")
        reply = await stub(b"", timeout=30)
    finally:
        await channel.close()
    assert aa.GetTeeTypeResponse.FromString(reply).tee == "sample"
    async with TtrpcClient(str(booted.run_dir / "attestation-agent/attestation-agent.sock")) as client:
        reply = await client.call("attestation_agent.AttestationAgentService", "GetTeeType", b"", timeout=10)
    assert aa.GetTeeTypeResponse.FromString(reply).tee == "sample"
    assert await cdh_get_resource(booted.run_dir / "cdh.sock", "kbs:///default/key/1") == SECRET


def journal(booted: Booted, *args: str, directory: Path | None = None) -> str:
    where = ["-D", str(directory)] if directory else []
    prefix = [] if directory else ["nsenter", "-t", str(booted.init_pid), "-m", "-p"]
    return subprocess.run(
        [*prefix, "journalctl", "--no-pager", *where, *args], capture_output=True, text=True, check=False, timeout=30
    ).stdout


def test_units_boot_serve_and_stop(booted: Booted, capsys: pytest.CaptureFixture[str]) -> None:
    boot_started = time.monotonic()
    for unit in UNITS:
        after = wait_active(booted, unit, ACTIVE_WITHIN_S - (time.monotonic() - boot_started))
        log = journal(booted, "-u", f"{unit}.service")
        assert after is not None, f"{unit} not active:\n{log}\n{booted.console.read_text(errors='replace')[-3000:]}"
        assert booted.show(unit, "Type") == "notify"
        assert booted.show(unit, "WatchdogUSec") == ("2s" if unit == "api-server-rest" else "30s")
    active_s = time.monotonic() - boot_started
    # the drop-ins became active in kata's order: AA, then CDH, then REST
    entered = [int(booted.show(u, "ActiveEnterTimestampMonotonic")) for u in UNITS[:3]]
    assert entered == sorted(entered)
    assert all(booted.show(u, "NRestarts") == "0" for u in UNITS)
    asyncio.run(serve_checks(booted))
    with urllib.request.urlopen(f"http://127.0.0.1:{booted.rest_port}/info", timeout=30) as response:
        assert json.loads(response.read())["tee"] == "sample"
    # a stuck process stops pinging the watchdog: systemd kills it and starts it again, and it serves again
    pid = booted.show("api-server-rest", "MainPID")
    stopped = booted.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", "api-server-rest.service")
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 10 * SHORT_WATCHDOG_S
    while time.monotonic() < deadline and booted.show("api-server-rest", "NRestarts") == "0":
        time.sleep(0.2)
    assert booted.show("api-server-rest", "NRestarts") == "1"
    assert wait_active(booted, "api-server-rest", 30) is not None
    assert booted.show("api-server-rest", "MainPID") != pid
    with urllib.request.urlopen(f"http://127.0.0.1:{booted.rest_port}/info", timeout=30) as response:
        assert json.loads(response.read())["tee"] == "sample"
    # journald got the priorities: the sample TEE's warning is PRIORITY=4, without the <4> prefix in the text
    entries = [json.loads(line) for line in journal(booted, "-o", "json", "-u", "cvm-agent.service").splitlines()]
    warnings = [e for e in entries if "tee.sample.insecure" in str(e.get("MESSAGE", ""))]
    assert warnings
    assert {e["PRIORITY"] for e in warnings} == {"4"}
    assert not str(warnings[0]["MESSAGE"]).startswith("<")
    # a clean stop: SIGTERM to systemd-nspawn halts the container; every unit stops without failing
    stop_started = time.monotonic()
    booted.nspawn.terminate()
    code = booted.nspawn.wait(timeout=60)
    stop_s = time.monotonic() - stop_started
    assert code == 0, booted.console.read_text(errors="replace")[-3000:]
    for unit in UNITS:  # the persistent journal, read from the host once the container is gone
        log = journal(booted, "-o", "cat", "-u", f"{unit}.service", directory=booted.root / "var/log/journal")
        assert "Deactivated successfully" in log, log[-2000:]
        if unit == "api-server-rest":  # the one watchdog kill above, and nothing else
            assert log.count("Failed with result") == 1, log[-2000:]
            assert "Failed with result 'watchdog'" in log, log[-2000:]
        else:
            assert "Failed with result" not in log, log[-2000:]
    assert '"event": "agent.stopped"' in journal(
        booted, "-o", "cat", "-u", "cvm-agent.service", directory=booted.root / "var/log/journal"
    )
    assert port_free(booted.rest_port)
    with capsys.disabled():
        print(f"\n[boot] all four units active {active_s:.1f} s after boot began; container stopped in {stop_s:.1f} s")
