"""Key-provider service inside the guest: UnWrapKey. Orchestrator.

`GuestKeyProvider` unwraps layer keys after attestation: it fetches each packet's key-encryption key (KEK) from
the KBS by `kid` through the attested session, with one fetch per `kid` however many layers ask at once, and
keeps KEKs in memory only, for a bounded time (0 disables the cache).

Wrapping is the image owner's side and lives in the tools distribution (`cvm_tools.keyprovider.wrap`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from agent.errors import DecryptionError, InvalidRequest, NotSupported
from agent.keyprovider import annotation, messages
from agent.log import get_logger
from agent.secret import Secret
from agent.shared import SharedValue

__all__ = ["GuestKeyProvider"]

log = get_logger("agent.keyprovider")

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
        self._keks: dict[str, SharedValue[tuple[Secret, float]]] = {}  # kid -> (KEK, cached until)
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
        """One fetch per `kid` at a time, shared by every layer that asks (`SharedValue`), cached `cache_s`."""
        shared = self._keks.get(kid)
        if shared is None:
            self._forget_idle()
            shared = SharedValue(lambda: self._fetch_kek(kid), self._fresh, keep=self._cache_s > 0)
            self._keks[kid] = shared
        return (await shared.get())[0]

    def _fresh(self, cached: tuple[Secret, float]) -> bool:
        return self._clock() < cached[1]

    def _forget_idle(self) -> None:
        for kid in [k for k, s in self._keks.items() if not s.busy and (s.value is None or not self._fresh(s.value))]:
            del self._keks[kid]

    async def _fetch_kek(self, kid: str) -> tuple[Secret, float]:
        self.kek_fetches += 1
        kek = Secret(await self._fetch(kid))
        if len(kek) != KEK_BYTES:
            msg = f"the key-encryption key at {kid[:200]} is {len(kek)} bytes, expected {KEK_BYTES}"
            raise InvalidRequest(msg)
        return kek, self._clock() + self._cache_s

    def clear(self) -> None:
        """Forget every cached KEK."""
        for shared in self._keks.values():
            shared.clear()
