"""The one table of supported TEEs: how each is detected, attested and decoded. Orchestrator.

Adding a TEE is one new module (its attester and evidence decoder) plus one entry here; the dev KBS keys its
verifiers by the same `TeeKind` (a test checks that every hardware entry has one). Entries are in the reference's
detection order (guest-api.md §5.1); `auto` takes the first whose probes find an interface. Attesters and
decoders are imported only when used, so selecting one TEE never imports another's code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.tee.kinds import TeeKind

if TYPE_CHECKING:
    from agent.config import Config
    from agent.tee import tsm
    from agent.tee.base import Attester
    from agent.tee.journal import RuntimeRegisters

__all__ = ["TEES", "PathProbe", "TeeSupport", "TsmProbe", "support"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PathProbe:
    """A kernel interface whose presence indicates the TEE: `TeePaths.<path_key>` exists."""

    interface: str
    path_key: str
    absent: str  # what its absence usually means, for `tee --probe`


@dataclass(frozen=True, slots=True, kw_only=True)
class TsmProbe:
    """configfs-tsm reports work and their `provider` is this one."""

    provider: str


AttesterFactory = Callable[["Config", "tsm.FsOps | None"], "Attester"]
EvidenceDecoder = Callable[[Mapping[str, Any]], dict[str, Any]]
RegistersFactory = Callable[["Config"], "RuntimeRegisters"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TeeSupport:
    kind: TeeKind
    probes: tuple[PathProbe | TsmProbe, ...]  # empty: never detected (the mock)
    attester: AttesterFactory
    evidence_keys: frozenset[str]  # top-level keys that identify this TEE's evidence JSON
    decode_evidence: EvidenceDecoder
    # the registers ExtendRuntimeMeasurement extends; None: the TEE has none (NOT_SUPPORTED)
    runtime_registers: RegistersFactory | None = None


def _tdx_attester(config: Config, fsops: tsm.FsOps | None) -> Attester:
    from agent.tee.tdx_attester import TdxAttester

    return TdxAttester(config.tee_paths, fsops=fsops)


def _snp_attester(config: Config, fsops: tsm.FsOps | None) -> Attester:
    from agent.tee.snp_attester import SnpAttester

    return SnpAttester(config.tee_paths, vmpl=config.snp.vmpl, fsops=fsops)


def _sample_attester(_config: Config, _fsops: tsm.FsOps | None) -> Attester:
    from agent.tee.sample import SampleAttester

    return SampleAttester()


def _tdx_registers(config: Config) -> RuntimeRegisters:
    from agent.tee.rtmr_sysfs import SysfsRtmrs

    return SysfsRtmrs(config.tee_paths.tdx_measurements_dir)


def _tdx_decode(obj: Mapping[str, Any]) -> dict[str, Any]:
    from agent.tee.decode import decode_tdx_evidence

    return decode_tdx_evidence(obj)


def _snp_decode(obj: Mapping[str, Any]) -> dict[str, Any]:
    from agent.tee.decode import decode_snp_evidence

    return decode_snp_evidence(obj)


def _sample_decode(obj: Mapping[str, Any]) -> dict[str, Any]:
    from agent.tee.decode import decode_sample_evidence

    return decode_sample_evidence(obj)


TEES: tuple[TeeSupport, ...] = (
    TeeSupport(
        kind=TeeKind.TDX,
        probes=(
            TsmProbe(provider="tdx_guest"),
            PathProbe(
                interface="device",
                path_key="tdx_guest_device",
                absent="tdx-guest driver not loaded, or not a TDX guest",
            ),
        ),
        attester=_tdx_attester,
        evidence_keys=frozenset({"quote"}),
        decode_evidence=_tdx_decode,
        runtime_registers=_tdx_registers,
    ),
    TeeSupport(
        kind=TeeKind.SNP,
        probes=(
            PathProbe(interface="platform device", path_key="sev_guest_platform_dir", absent="not an SEV-SNP guest"),
            TsmProbe(provider="sev_guest"),
            PathProbe(
                interface="device",
                path_key="sev_guest_device",
                absent="sev-guest driver not loaded, or not an SNP guest",
            ),
        ),
        attester=_snp_attester,
        evidence_keys=frozenset({"attestation_report"}),
        decode_evidence=_snp_decode,
    ),
    TeeSupport(
        kind=TeeKind.SAMPLE,
        probes=(),
        attester=_sample_attester,
        evidence_keys=frozenset({"svn", "report_data"}),
        decode_evidence=_sample_decode,
    ),
)


def support(kind: str) -> TeeSupport:
    """The entry for a tee name; `ValueError` for a name the registry does not know."""
    for entry in TEES:
        if entry.kind == kind:
            return entry
    msg = f"unknown tee {kind!r}"
    raise ValueError(msg)
