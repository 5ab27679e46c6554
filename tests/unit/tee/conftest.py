"""Fixtures for the parser tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.tee.vectorutil import load_expected


@pytest.fixture(scope="module")
def expected(vectors: Path) -> dict[str, Any]:
    """vectors/hw/expected.json: the fields every real vector must decode to."""
    return load_expected(vectors)
