"""Shared test fixtures: the repository's own test vectors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.paths import VECTORS_DIR


@pytest.fixture(scope="session")
def vectors() -> Path:
    """`tests/vectors`: real TDX/SNP/Trustee data with SOURCES.md files."""
    if not VECTORS_DIR.is_dir():
        pytest.fail(f"test vectors not found at {VECTORS_DIR}")
    return VECTORS_DIR
