"""The TEE vocabulary: which kinds of TEE the agent knows. Pure.

The string values are the reference's tee names (evidence `tee` field, `GetTeeType`, the KBS `Request.tee`).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["AUTO", "TEE_CHOICES", "TeeKind"]


class TeeKind(StrEnum):
    TDX = "tdx"
    SNP = "snp"
    SAMPLE = "sample"  # the mock TEE: chosen by name only, never detected


AUTO = "auto"
# what `tee =` / `--tee` accept: `auto` probes the hardware kinds in the registry's order
TEE_CHOICES: tuple[str, ...] = (AUTO, *(kind.value for kind in TeeKind))
