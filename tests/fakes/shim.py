"""Builds and runs the LD_PRELOAD guest-device shim (`guestdev_shim.c`) for tests.

LD_PRELOAD only takes effect when a process starts, so the code under test runs in a child process. Two ways:

- `GuestDevShim.run_python(code, ...)` runs a Python snippet in a child with the shim loaded and returns what the
  snippet passed to ``emit(value)`` (bytes survive the trip), or the exception it raised, plus the shim's event
  log (opens, closes, ioctls on the emulated devices).
- `GuestDevShim.environ(...)` returns an environment for any child you start yourself (e.g. the daemon in an
  end-to-end test); read the log afterwards with `read_log`.

Use the session fixture `guestdev_shim` (compiled once per session) by listing this module as a plugin, and
import its names for annotations only (a runtime import before the plugin is registered makes pytest warn that
it cannot rewrite the module's asserts, which ``filterwarnings = error`` turns into a collection error)::

    if TYPE_CHECKING:
        from tests.fakes.shim import GuestDevShim

    pytest_plugins = ("tests.fakes.shim",)

    def test_x(guestdev_shim: GuestDevShim, tmp_path: Path) -> None:
        run = guestdev_shim.run_python("emit(snp_get_report(bytes(64), path=SEV))", tmp_path=tmp_path)
        assert len(run.value) == 1184

For a child you start yourself::

    env = guestdev_shim.environ(sev_path=tmp_path / "sev-guest", log_path=tmp_path / "shim.log",
                                settings={"SNP_CERTS": cert_table_path})
    ...  # start the daemon with env=env, configured to use tmp_path / "sev-guest"
    assert guestdev_shim.read_log(tmp_path / "shim.log").closes == ...

Settings are the shim's ``CVM_SHIM_*`` variables without the prefix, e.g. ``settings={"FW_ERROR": 0x16}``; see
the comment at the top of `guestdev_shim.c` for the full list.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "SHIM_SOURCE",
    "ShimBuildError",
    "ShimEvent",
    "ShimLog",
    "ShimError",
    "ShimRun",
    "GuestDevShim",
    "build_shim",
    "read_log",
    "guestdev_shim",
]

SHIM_SOURCE = Path(__file__).with_name("guestdev_shim.c")
_PREFIX = "CVM_SHIM_"
_RESULT_ENV = "CVM_SHIM_TEST_RESULT"

# Runs in the child: executes the snippet with `emit`, SEV/TDX paths and the device functions in scope, and
# writes {"value": ...} or {"error": ...} as JSON to the file named by CVM_SHIM_TEST_RESULT.
_CHILD = r"""
import json, os, sys

def _enc(value):
    if isinstance(value, bytes):
        return {"__bytes__": value.hex()}
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _enc(v) for k, v in value.items()}
    return value

_out = {}

def emit(value):
    _out["value"] = _enc(value)

_scope = {"emit": emit, "SEV": os.environ.get("CVM_SHIM_SEV_PATH"), "TDX": os.environ.get("CVM_SHIM_TDX_PATH")}
try:
    exec("from agent.tee._device import *\n", _scope)
    exec(compile(sys.argv[1], "<shim-snippet>", "exec"), _scope)
except BaseException as exc:
    _out["error"] = {
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc),
        "errno": getattr(exc, "errno", None),
        "fw_error": getattr(exc, "fw_error", None),
        "vmm_error": getattr(exc, "vmm_error", None),
    }
with open(os.environ["CVM_SHIM_TEST_RESULT"], "w") as fh:
    json.dump(_out, fh)
"""


class ShimBuildError(RuntimeError):
    """gcc is missing or failed to compile the shim."""


@dataclass(frozen=True, slots=True)
class ShimEvent:
    """One line of the shim log: ``open``/``close``/``ioctl`` on an emulated ``sev`` or ``tdx`` device."""

    op: str
    device: str
    fd: int
    request: int | None = None
    errno: int = 0


@dataclass(frozen=True, slots=True)
class ShimLog:
    """The events the shim logged, in order."""

    events: tuple[ShimEvent, ...] = ()

    def count(self, op: str, device: str | None = None) -> int:
        return sum(1 for e in self.events if e.op == op and (device is None or e.device == device))

    @property
    def opens(self) -> int:
        """Successful opens of emulated devices."""
        return sum(1 for e in self.events if e.op == "open" and e.fd >= 0)

    @property
    def closes(self) -> int:
        return self.count("close")

    @property
    def ioctls(self) -> tuple[ShimEvent, ...]:
        return tuple(e for e in self.events if e.op == "ioctl")


@dataclass(frozen=True, slots=True)
class ShimError:
    """The exception the child's snippet raised."""

    type: str
    module: str
    message: str
    errno: int | None
    fw_error: int | None
    vmm_error: int | None


@dataclass(frozen=True, slots=True)
class ShimRun:
    """Outcome of `GuestDevShim.run_python`."""

    returncode: int
    stdout: str
    stderr: str
    value: Any
    error: ShimError | None
    log: ShimLog


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes__"}:
            return bytes.fromhex(value["__bytes__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def read_log(path: Path) -> ShimLog:
    """Parses a ``CVM_SHIM_LOG`` file (missing file = no events)."""
    if not path.exists():
        return ShimLog()
    events = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "ioctl":
            _, dev, fd, request, err = parts
            events.append(ShimEvent("ioctl", dev, int(fd), int(request, 16), int(err)))
        elif parts[0] == "open":
            _, dev, fd, err = parts
            events.append(ShimEvent("open", dev, int(fd), None, int(err)))
        else:
            _, dev, fd = parts
            events.append(ShimEvent("close", dev, int(fd)))
    return ShimLog(tuple(events))


def build_shim(out_dir: Path, *, cc: str = "gcc") -> Path:
    """Compiles `guestdev_shim.c` into `out_dir` (reused when the source has not changed)."""
    compiler = shutil.which(cc)
    if compiler is None:
        msg = f"`{cc}` not found: run tests/setup-host.sh to install it"
        raise ShimBuildError(msg)
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:16]
    library = out_dir / f"libguestdev_shim-{digest}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [compiler, "-shared", "-fPIC", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]
    cmd += ["-U_FORTIFY_SOURCE", "-o", str(library), str(SHIM_SOURCE), "-ldl", "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = f"compiling {SHIM_SOURCE.name} failed:\n{proc.stderr}"
        raise ShimBuildError(msg)
    return library


@dataclass(frozen=True, slots=True)
class GuestDevShim:
    """A compiled shim library and the means to run children under it."""

    library: Path
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    @staticmethod
    def read_log(path: Path) -> ShimLog:
        """Parses a ``CVM_SHIM_LOG`` file; see `read_log`."""
        return read_log(path)

    def environ(
        self,
        *,
        sev_path: Path | None = None,
        tdx_path: Path | None = None,
        log_path: Path | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> dict[str, str]:
        """A child environment with the shim preloaded; `settings` keys are ``CVM_SHIM_*`` minus the prefix."""
        env = {k: v for k, v in self.base_env.items() if not k.startswith(_PREFIX)}
        preload = env.get("LD_PRELOAD")
        env["LD_PRELOAD"] = f"{self.library}:{preload}" if preload else str(self.library)
        if sev_path is not None:
            env[_PREFIX + "SEV_PATH"] = str(sev_path)
        if tdx_path is not None:
            env[_PREFIX + "TDX_PATH"] = str(tdx_path)
        if log_path is not None:
            env[_PREFIX + "LOG"] = str(log_path)
        for key, value in (settings or {}).items():
            env[_PREFIX + key] = str(value)
        return env

    def run_python(
        self,
        code: str,
        *,
        tmp_path: Path,
        settings: Mapping[str, object] | None = None,
        timeout_s: float = 60.0,
    ) -> ShimRun:
        """Runs `code` in a child Python under the shim with devices emulated at ``tmp_path/dev/{sev-guest,tdx_guest}``.

        In `code`: ``emit(value)`` returns a value, ``SEV``/``TDX`` are the emulated paths, and the public names of
        `agent.tee._device` are imported.
        """
        dev = tmp_path / "dev"  # never created: the shim answers for these paths
        log_path = tmp_path / "shim.log"
        result_path = tmp_path / "result.json"
        for stale in (log_path, result_path):
            stale.unlink(missing_ok=True)
        env = self.environ(sev_path=dev / "sev-guest", tdx_path=dev / "tdx_guest", log_path=log_path, settings=settings)
        env[_RESULT_ENV] = str(result_path)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, code],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if not result_path.exists():
            msg = f"shim child wrote no result (rc {proc.returncode}):\n{proc.stderr}"
            raise AssertionError(msg)
        out = json.loads(result_path.read_text())
        error = ShimError(**out["error"]) if "error" in out else None
        return ShimRun(
            returncode=proc.returncode,
            stdout=proc.stdout,
            stderr=proc.stderr,
            value=_decode(out.get("value")),
            error=error,
            log=read_log(log_path),
        )


@pytest.fixture(scope="session")
def guestdev_shim(tmp_path_factory: pytest.TempPathFactory) -> GuestDevShim:
    """The shim compiled once per test session."""
    try:
        library = build_shim(tmp_path_factory.getbasetemp() / "guestdev_shim")
    except ShimBuildError as exc:
        pytest.fail(str(exc))
    return GuestDevShim(library=library)
