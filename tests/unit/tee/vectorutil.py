"""Helpers shared by the parser tests: reading vectors and patching bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read(vectors: Path, rel: str) -> bytes:
    return (vectors / rel).read_bytes()


def load_expected(vectors: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((vectors / "hw/expected.json").read_text())
    return result


def flip(data: bytes, offset: int, value: int = 0x01) -> bytes:
    return data[:offset] + bytes((data[offset] ^ value,)) + data[offset + 1 :]


def put(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]
