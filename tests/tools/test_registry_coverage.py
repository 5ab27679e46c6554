"""Every TEE the guest registry can attest has a dev-KBS verifier keyed by the same `TeeKind`."""

from __future__ import annotations

from pathlib import Path

from cvm_tools.devkbs.core import KNOWN_TEES, DevKbsCore
from cvm_tools.devkbs.verifiers import HARDWARE_VERIFIERS

from agent.tee import registry
from agent.tee.kinds import TEE_CHOICES, TeeKind


def test_every_hardware_tee_has_a_dev_verifier() -> None:
    hardware = {entry.kind for entry in registry.TEES if entry.probes}
    assert hardware == set(HARDWARE_VERIFIERS) == {TeeKind.TDX, TeeKind.SNP}
    assert {entry.kind for entry in registry.TEES} <= KNOWN_TEES
    assert set(DevKbsCore(Path("/nonexistent")).verifiers) >= {entry.kind for entry in registry.TEES}


def test_registry_order_is_the_reference_detection_order() -> None:
    assert [entry.kind for entry in registry.TEES] == [TeeKind.TDX, TeeKind.SNP, TeeKind.SAMPLE]
    assert TEE_CHOICES == ("auto", "tdx", "snp", "sample")
