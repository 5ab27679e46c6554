"""Pure modules stay free of I/O: they must not import os, sockets, asyncio, HTTP, RPC or logging code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "agent"
PURE = [
    "errors.py",
    "kbs/jcs.py",
    "kbs/jwe.py",
    "kbs/protocol.py",
    "kbs/resource.py",
    "tee/base.py",
    "tee/sample.py",
    "api/status.py",
    "tee/tdx.py",
    "tee/snp.py",
    "tee/ccel.py",
    "tee/_uapi.py",
    "tee/_layout.py",
    "tee/decode.py",
    "initdata.py",
    "compat/refconfig.py",
    "api/ttrpc_frame.py",
    "keyprovider/annotation.py",
    "keyprovider/messages.py",
    "secrets/sealed.py",
    "strictjson.py",
    "jws.py",
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


@pytest.mark.parametrize("module", [m for m in PURE if (ROOT / m).exists()])
def test_pure_module_has_no_io_imports(module: str) -> None:
    assert imported_roots(ROOT / module) & FORBIDDEN == set()


def test_only_device_module_calls_ioctl() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if "ioctl(" in p.read_text() and p.name not in {"_device.py"} and "_gen" not in p.parts
    ]
    assert offenders == []
