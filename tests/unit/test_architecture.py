"""The house's walls: pure modules free of I/O, one ioctl site, and a guest package that never imports a tool."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "agent"
TOOLS = REPO / "tools" / "cvm_tools"
PURE = [
    "errors.py",
    "kbs/jcs.py",
    "kbs/jwe.py",
    "kbs/teekey.py",
    "kbs/keyalg.py",
    "kbs/protocol.py",
    "kbs/resource.py",
    "tee/base.py",
    "tee/sample.py",
    "api/status.py",
    "tee/tdx.py",
    "tee/snp.py",
    "tee/ccel.py",
    "tee/eventlog.py",
    "tee/_uapi.py",
    "tee/_layout.py",
    "tee/decode.py",
    "tee/kinds.py",
    "initdata.py",
    "compat/refconfig.py",
    "api/ttrpc_frame.py",
    "keyprovider/annotation.py",
    "keyprovider/messages.py",
    "secrets/sealed.py",
    "strictjson.py",
    "jws.py",
    "aes.py",
    "libcrypto.py",
    "secret.py",
    "image/compression.py",
    "image/ocicrypt.py",
    "image/reference.py",
    "image/manifest.py",
    "image/registries.py",
    "image/auth.py",
    "image/policy.py",
    "image/settings.py",
]
FORBIDDEN = {"os", "fcntl", "socket", "asyncio", "httpx", "grpc", "structlog", "subprocess", "threading", "pathlib"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE)
def test_pure_module_has_no_io_imports(module: str) -> None:
    assert (ROOT / module).is_file(), f"{module} is listed as pure but does not exist: update PURE"
    assert imported_roots(ROOT / module) & FORBIDDEN == set()


def test_guest_package_never_imports_the_tools() -> None:
    """What runs in a TEE installs nothing it does not run: no dev KBS, no token minting, no wrapping."""
    offenders = sorted(str(p.relative_to(REPO)) for p in ROOT.rglob("*.py") if "cvm_tools" in imported_roots(p))
    assert offenders == []


def test_guest_package_has_no_signing_code() -> None:
    """Signing keys and minting tokens belong to the tools: no guest module calls a private key's `sign`."""
    offenders = sorted(
        str(p.relative_to(REPO))
        for p in ROOT.rglob("*.py")
        if "_gen" not in p.parts and (".sign(" in p.read_text() or "encode_compact" in p.read_text())
    )
    assert offenders == []
    assert (TOOLS / "sign.py").is_file()


def test_only_device_module_calls_ioctl() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if "ioctl(" in p.read_text() and p.name not in {"_device.py"} and "_gen" not in p.parts
    ]
    assert offenders == []


def test_only_sdnotify_talks_to_systemd() -> None:
    """READY/WATCHDOG/STOPPING go through agent.sdnotify, so no second copy of the protocol drifts."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if "NOTIFY_SOCKET" in p.read_text() and p.name != "sdnotify.py" and "_gen" not in p.parts
    ]
    assert offenders == []


def test_only_the_log_module_imports_structlog() -> None:
    """Modules log through `agent.log.get_logger`: a module importing structlog itself would load it before the
    daemons answer (decision 18) and bypass the deferred configuration's level filter and kept lines."""
    offenders = sorted(
        str(p.relative_to(REPO))
        for p in ROOT.rglob("*.py")
        if "structlog" in imported_roots(p) and p.relative_to(ROOT).as_posix() != "log.py"
    )
    assert offenders == []
