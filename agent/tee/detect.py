"""TEE detection: which hardware TEE this guest has, and why. Edge (filesystem probes).

Order and probes follow the reference (guest-api.md §5.1), first match wins:

1. `tdx`: configfs-tsm reports work with provider `tdx_guest` (a temporary entry is created and its `provider`
   read), or the `/dev/tdx_guest` device exists.
2. `snp`: `/sys/devices/platform/sev-guest` exists (the reference's only probe); also configfs-tsm with provider
   `sev_guest`, or the `/dev/sev-guest` device (this agent can use either).

Nothing is probed at import time. Every interface is checked (cheap: one configfs mkdir/rmdir and a few stats),
so the report can say for each one what was found; the choice is still the first match in the order above. The
sample TEE is never a detection result.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import TeePaths
from agent.errors import TeeError
from agent.tee import registry, tsm

__all__ = ["Check", "Detection", "detect"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One interface that was looked at: what it would indicate, whether it did, and why."""

    tee: str
    interface: str
    path: str
    found: bool
    reason: str

    def line(self) -> str:
        mark = "found " if self.found else "absent"
        return f"{mark} {self.tee:<3} {self.interface} {self.path}: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Detection:
    tee: str | None
    checks: tuple[Check, ...]

    def summary(self) -> str:
        """One line listing every check and its reason (for error messages)."""
        return "; ".join(f"{c.tee} {c.interface} {c.path}: {c.reason}" for c in self.checks)


def _path_check(tee: str, interface: str, path: str, what: str) -> Check:
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return Check(tee=tee, interface=interface, path=path, found=False, reason=f"does not exist ({what})")
    except OSError as exc:
        reason = f"cannot be checked: {exc.strerror or exc}"
        return Check(tee=tee, interface=interface, path=path, found=False, reason=reason)
    if stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif stat.S_ISCHR(st.st_mode):
        kind = "character device"
    else:
        kind = "file"
    return Check(tee=tee, interface=interface, path=path, found=True, reason=f"exists ({kind})")


def _tsm_check(kind: str, root: str, want: str, provider: str | None, error: str | None) -> Check:
    interface = "configfs-tsm"
    if error is not None:
        return Check(tee=kind, interface=interface, path=root, found=False, reason=f"unusable: {error}")
    if provider is None:
        reason = "no configfs-tsm reports here, or no provider registered (kernel < 6.7, no TEE guest driver?)"
        return Check(tee=kind, interface=interface, path=root, found=False, reason=reason)
    if provider != want:
        return Check(
            tee=kind, interface=interface, path=root, found=False, reason=f"provider is `{provider}`, not `{want}`"
        )
    return Check(tee=kind, interface=interface, path=root, found=True, reason=f"provider `{provider}`")


def detect(paths: TeePaths, *, fsops: tsm.FsOps | None = None) -> Detection:
    """Probe every interface of every hardware TEE in the registry; the result's `tee` is the first match in the
    registry's (the reference's) order, or None. configfs-tsm is probed once, whichever TEEs ask for it."""
    provider: str | None = None
    error: str | None = None
    tsm_probed = False
    checks: list[Check] = []
    for entry in registry.TEES:
        for probe in entry.probes:
            if isinstance(probe, registry.TsmProbe):
                if not tsm_probed:
                    tsm_probed = True
                    try:
                        provider = tsm.probe(Path(paths.tsm_report_dir), fsops=fsops)
                    except TeeError as exc:
                        error = str(exc)
                checks.append(_tsm_check(entry.kind, paths.tsm_report_dir, probe.provider, provider, error))
            else:
                path = getattr(paths, probe.path_key)
                checks.append(_path_check(entry.kind, probe.interface, path, probe.absent))
    tee = next((c.tee for c in checks if c.found), None)
    return Detection(tee=tee, checks=tuple(checks))
