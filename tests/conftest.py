"""Shared test fixtures: the repository's own test vectors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from tests.paths import GUEST_CACHE, VECTORS_DIR

# No timing assertions in `make test` (the machine is shared): hypothesis's per-example deadline is one.
settings.register_profile("cvm-agent", deadline=None)
settings.load_profile("cvm-agent")

# The slow guest tests (image build, systemd-nspawn boot) run in `make test` only where their download cache exists
# (filled by `make guest-test`) or in CI; elsewhere they skip with this reason.
_SLOW_GATES = {
    "guestimage": (GUEST_CACHE / "guest-image", "make guest-test"),
    "boot": (GUEST_CACHE / "bookworm-minbase", "make guest-test"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI") == "true":
        return
    for marker, (cache, command) in _SLOW_GATES.items():
        if cache.is_dir():
            continue
        reason = f"{marker} test: its cache {cache} does not exist; run `{command}` or set CI=true"
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def vectors() -> Path:
    """`tests/vectors`: real TDX/SNP/Trustee data with SOURCES.md files."""
    if not VECTORS_DIR.is_dir():
        pytest.fail(f"test vectors not found at {VECTORS_DIR}")
    return VECTORS_DIR
