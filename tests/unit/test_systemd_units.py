"""systemd/*.service: what kata-agent's order and the reference sockets require, and the hardening floor."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("*.service"))
TEE_UNITS = ("attestation-agent.service", "cvm-agent.service")


def parse(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file; a key may repeat (DeviceAllow=, ReadWritePaths=, SystemCallFilter=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, (key, values)
    return values[0]


def test_the_four_units_exist() -> None:
    assert [p.name for p in UNITS] == [
        "api-server-rest.service",
        "attestation-agent.service",
        "confidential-data-hub.service",
        "cvm-agent.service",
    ]


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_notify_watchdog_and_hardening(path: Path) -> None:
    unit = parse(path)
    service = unit["Service"]
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert int(one(unit, "Service", "WatchdogSec")) > 0
    assert one(unit, "Service", "Restart") == "on-failure"
    assert service["CapabilityBoundingSet"] == [""]
    assert service["AmbientCapabilities"] == [""]
    for key in (
        "NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
        "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictNamespaces",
        "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute",
    ):  # fmt: skip
        assert one(unit, "Service", key) == "yes", key
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "ProtectProc") == "invisible"
    assert one(unit, "Service", "UMask") == "0077"
    assert "@system-service" in service["SystemCallFilter"]
    assert one(unit, "Unit", "Documentation") == "file:///usr/share/doc/cvm-agent/README.md"
    if path.name in TEE_UNITS:
        assert one(unit, "Service", "DevicePolicy") == "closed"
        assert service["DeviceAllow"] == ["/dev/tdx_guest rw", "/dev/sev-guest rw"]
        sys_paths = [p for p in service["ReadWritePaths"] if "/sys/" in p]
        assert sys_paths == ["-/sys/kernel/config/tsm", "-/sys/devices/virtual/misc/tdx_guest/measurements"]
        # the runtime-measurement event log: writable, and kept when the unit stops or restarts
        assert "attestation-agent" in service["RuntimeDirectory"]
        assert one(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    else:
        assert one(unit, "Service", "PrivateDevices") == "yes"
        assert "DeviceAllow" not in service
        assert not [p for p in service.get("ReadWritePaths", []) if "/sys/" in p]


def test_commands_sockets_and_kata_order() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    units = {p.stem: parse(p) for p in UNITS}
    for name, unit in units.items():
        command = one(unit, "Service", "ExecStart").split()[0]
        assert command == f"/usr/local/bin/{name}"
        assert name in scripts
    aa_exec = one(units["attestation-agent"], "Service", "ExecStart")
    assert "--attestation_sock unix:///run/confidential-containers/attestation-agent/attestation-agent.sock" in aa_exec
    assert "confidential-containers/attestation-agent" in units["attestation-agent"]["Service"]["RuntimeDirectory"]
    cdh = units["confidential-data-hub"]
    assert "attestation-agent.service" in one(cdh, "Unit", "After").split()
    assert "OCICRYPT_KEYPROVIDER_CONFIG=/etc/ocicrypt_config.json" in cdh["Service"]["Environment"]
    assert "/run/confidential-containers" in cdh["Service"]["ReadWritePaths"]
    rest = units["api-server-rest"]
    assert set(one(rest, "Unit", "After").split()) >= {"attestation-agent.service", "confidential-data-hub.service"}
    assert one(rest, "Service", "IPAddressDeny") == "any"
    assert "/usr/share/doc/cvm-agent/README.md" in (REPO / "rootfs/install.sh").read_text()


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_security_exposure(path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (systemd)")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(path)], capture_output=True, text=True, check=False
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
