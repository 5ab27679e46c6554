"""What every attester provides. Pure."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Attester"]


class Attester(Protocol):
    """A source of TEE evidence.

    `get_evidence` passes `runtime_data` to the TEE verbatim (TEEs with a fixed-size report-data field zero-pad it
    and reject longer input) and returns the compact evidence JSON the KBS verifiers expect for `tee`.
    """

    @property
    def tee(self) -> str:
        """The tee string on the wire (`sample`, `tdx`, `snp`)."""
        ...

    async def get_evidence(self, runtime_data: bytes) -> bytes: ...

    async def bind_init_data(self, digest: bytes) -> None:
        """Compare an initdata digest with the platform's binding; raises NotSupported or EvidenceMismatch."""
        ...
