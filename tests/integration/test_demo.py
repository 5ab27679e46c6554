"""`make demo` is one of the README's two commands: the demo script itself runs in the suite, so a change that
breaks it (a readiness message, a moved command) fails `make test` instead of a user's first try."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stdout.decode(errors="replace")[-2000:] + result.stderr.decode()[-2000:]
    assert result.stdout.rstrip().endswith(b"demo OK")
    assert b"layer key round trip OK" in result.stdout
