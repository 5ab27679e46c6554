"""Shared test fixtures: paths to the shared vectors and reference documents."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
VECTORS = SHARED / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The read-only `../shared/vectors` folder (real TDX/SNP/Trustee data with SOURCES.md files)."""
    if not VECTORS.is_dir():
        pytest.fail(f"shared vectors not found at {VECTORS}")
    return VECTORS
