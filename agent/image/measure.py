"""Where the `PullImage` measurement event goes when the attestation agent runs in another process. Edge (ttRPC).

As the reference CDH (image-pull.md §5): `ExtendRuntimeMeasurement` on the AA socket with a 10 s deadline; if the
socket file is absent at the first pull, "no AA" is remembered and every later event is skipped with a warning;
an RPC error fails the pull. In `cvm-agent serve` the data hub calls its own attestation agent directly instead.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from agent.errors import ImageError
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.api.ttrpc import TtrpcClient
    from agent.measurement import MeasurementResult

__all__ = ["AA_MEASUREMENT_TIMEOUT_S", "AaMeasurementClient"]

log = get_logger("agent.image.measure")

AA_MEASUREMENT_TIMEOUT_S = 10.0


class AaMeasurementClient:
    """`extend(domain, operation, content)` over ttRPC to the attestation agent at `socket_path`."""

    def __init__(self, socket_path: str) -> None:
        self._path = socket_path
        self._client: TtrpcClient | None = None
        self._absent: bool | None = None

    async def extend(self, domain: str, operation: str, content: str) -> MeasurementResult:
        from agent.api._gen import attestation_agent_pb2 as aa
        from agent.api.names import AA_SERVICE
        from agent.api.status import RpcError
        from agent.api.ttrpc import TtrpcClient
        from agent.measurement import MeasurementResult

        if self._absent is None:
            self._absent = not await asyncio.to_thread(os.path.exists, self._path)
        if self._absent:
            log.warning("image.measurement.no_aa", socket=self._path)
            return MeasurementResult.NOT_ENABLED
        if self._client is None:
            self._client = TtrpcClient(self._path)
        request = aa.ExtendRuntimeMeasurementRequest(Domain=domain, Operation=operation, Content=content)
        try:
            reply = await self._client.call(
                AA_SERVICE, "ExtendRuntimeMeasurement", request.SerializeToString(), timeout=AA_MEASUREMENT_TIMEOUT_S
            )
        except RpcError as exc:
            msg = f"extending the PullImage measurement through the attestation agent failed: {exc.message}"
            raise ImageError(msg) from exc
        return MeasurementResult(aa.ExtendRuntimeMeasurementResponse.FromString(reply).Result)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
