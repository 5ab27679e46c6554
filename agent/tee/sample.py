"""The sample (mock) TEE: deterministic evidence with no hardware and NO protection. Pure.

Evidence is exactly the reference shape `{"svn":"1","report_data":"<base64 std of the runtime data>"}`
(guest-api.md §5.2). It must be asked for by name; the agent never falls back to it.
"""

from __future__ import annotations

import base64
import json

from agent.errors import InvalidRequest, NotSupported

__all__ = ["MAX_RUNTIME_DATA", "SampleAttester"]

MAX_RUNTIME_DATA = 64 * 1024
WARNING = (
    "the sample TEE is a mock: its evidence is not signed by any hardware and offers NO protection; "
    "use it only for development, with a KBS whose policy is meant for it"
)


class SampleAttester:
    """Mock attester for development."""

    @property
    def tee(self) -> str:
        return "sample"

    async def get_evidence(self, runtime_data: bytes) -> bytes:
        if len(runtime_data) > MAX_RUNTIME_DATA:
            msg = f"runtime data is {len(runtime_data)} bytes, expected at most {MAX_RUNTIME_DATA}"
            raise InvalidRequest(msg)
        evidence = {"svn": "1", "report_data": base64.b64encode(runtime_data).decode("ascii")}
        return json.dumps(evidence, separators=(",", ":")).encode()

    async def bind_init_data(self, digest: bytes) -> None:
        msg = "the sample TEE has no initdata binding"
        raise NotSupported(msg)
