"""Where the tests' own data lives: inside the repository, never beside it."""

from __future__ import annotations

from pathlib import Path

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
