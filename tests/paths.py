"""Where the tests' own data lives: inside the repository, never beside it."""

from __future__ import annotations

import os
from pathlib import Path

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"

# Downloads and the debootstrapped tree of the guest-image and boot tests, kept between runs (outside the repository).
GUEST_CACHE = Path(os.environ.get("CVM_AGENT_TEST_CACHE", "/var/cache/cvm-agent-tests"))
