"""Key-provider service inside the guest: UnWrapKey. Orchestrator.

`GuestKeyProvider` unwraps layer keys after attestation: it fetches each packet's key-encryption key (KEK) from
the KBS by `kid` through the attested session, with one fetch per `kid` however many layers ask at once, and
keeps KEKs in memory only, for a bounded time (0 disables the cache).

Wrapping is the image owner's side and lives in the tools distribution (`cvm_tools.keyprovider.wrap`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from agent.errors import DecryptionError, InvalidRequest, NotSupported
from agent.keyprovider import annotation, messages
from agent.secret import Secret

__all__ = ["GuestKeyProvider"]

log = structlog.get_logger("agent.keyprovider")

KEK_BYTES = 32
ResourceFetcher = Callable[[str], Awaitable[bytes]]


class GuestKeyProvider:
    """UnWrapKey for ocicrypt clients inside the TEE."""

    def __init__(
        self,
        fetch_resource: ResourceFetcher,
        *,
        cache_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch_resource
        self._cache_s = cache_s
        self._clock = clock
        self._cache: dict[str, tuple[Secret, float]] = {}
        self._inflight: dict[str, asyncio.Future[Secret]] = {}
        self.kek_fetches = 0

    async def unwrap_key(self, request: bytes) -> bytes:
        """Answer a `keyunwrap` JSON request with `{"keyunwrapresults":{"optsdata":[...]}}`."""
        parsed = messages.parse_request(request)
        if not isinstance(parsed, messages.UnwrapRequest):
            msg = "WrapKey is not served inside the guest; image owners wrap with `cvm-tools keyprovider`"
            raise NotSupported(msg)
        packet = annotation.parse_packet(parsed.annotation)
        if packet.provider != "kbs":
            msg = f"annotation packet provider {packet.provider[:200]!r} is not supported, expected 'kbs'"
            raise NotSupported(msg)
        kek = await self._kek(packet.kid)
        try:
            optsdata = annotation.unwrap(kek.reveal(), packet)
        except DecryptionError:
            # The caller's packet does not authenticate under the key it names: bad input, not an agent fault.
            msg = f"annotation packet `wrapped_data` does not authenticate under the key at {packet.kid[:200]}"
            raise InvalidRequest(msg) from None
        log.info("keyprovider.unwrapped", kid=packet.kid, wrap_type=str(packet.wrap_type))
        return messages.unwrap_reply(optsdata)

    async def _kek(self, kid: str) -> Secret:
        cached = self._cache.get(kid)
        if cached is not None and self._clock() < cached[1]:
            return cached[0]
        future = self._inflight.get(kid)
        if future is None:
            future = asyncio.ensure_future(self._fetch_kek(kid))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._inflight[kid] = future
        return await asyncio.shield(future)

    async def _fetch_kek(self, kid: str) -> Secret:
        try:
            self.kek_fetches += 1
            kek = Secret(await self._fetch(kid))
            if len(kek) != KEK_BYTES:
                msg = f"the key-encryption key at {kid[:200]} is {len(kek)} bytes, expected {KEK_BYTES}"
                raise InvalidRequest(msg)
            if self._cache_s > 0:
                self._cache[kid] = (kek, self._clock() + self._cache_s)
            return kek
        finally:
            del self._inflight[kid]

    def clear(self) -> None:
        """Forget every cached KEK."""
        self._cache.clear()
