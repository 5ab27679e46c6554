"""The one place that chooses the attester. Orchestrator.

`tee = "tdx" | "snp"` selects that attester by name (its interfaces are only used when evidence is asked for);
`auto` probes the interfaces in the reference order (`agent.tee.detect`) and never falls back to the mock; the
sample TEE is used only when asked for by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.config import Config
from agent.errors import TeeUnavailable
from agent.log import get_logger
from agent.tee import registry, sample
from agent.tee.kinds import AUTO, TeeKind

if TYPE_CHECKING:
    from agent.tee import tsm
    from agent.tee.base import Attester

__all__ = ["make_attester"]

log = get_logger("agent.tee")


def make_attester(config: Config, *, fsops: tsm.FsOps | None = None) -> Attester:
    """The attester for `config.tee`; `fsops` replaces the configfs calls (tests)."""
    name = config.tee
    if name == TeeKind.SAMPLE:
        log.warning("tee.sample.insecure", warning=sample.WARNING)
    elif name == AUTO:
        from agent.tee.detect import detect  # probing: only for `auto`

        detection = detect(config.tee_paths, fsops=fsops)
        if detection.tee is None:
            msg = (
                f"no supported TEE was found (checked: {detection.summary()}); run `cvm-agent tee --probe` for "
                "details; for development without hardware, ask for the mock TEE by name with --tee sample"
            )
            raise TeeUnavailable(msg)
        name = detection.tee
        log.info("tee.detected", tee=name, checks=[check.line() for check in detection.checks])
    else:
        log.info("tee.selected", tee=name, reason="asked for by name")
    return registry.support(name).attester(config, fsops)
