"""The integration fixtures (dev KBS over loopback, resources) for the reliability suite, and its summary."""

from __future__ import annotations

import pytest

from tests.integration.conftest import dev_kbs, resources
from tests.reliability.harness import FUZZ_COUNTS

__all__ = ["dev_kbs", "pytest_terminal_summary", "resources"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    total = sum(FUZZ_COUNTS.values())
    if total:
        parts = ", ".join(f"{name} {count}" for name, count in FUZZ_COUNTS.items())
        failed = len(terminalreporter.stats.get("failed", [])) + len(terminalreporter.stats.get("error", []))
        verdict = "0 crashes, 0 hangs, no INTERNAL" if not failed else f"{failed} FAILED: see above"
        terminalreporter.write_line(f"fuzz: {total} examples run ({parts}); {verdict}")
