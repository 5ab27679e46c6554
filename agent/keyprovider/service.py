"""Key-provider services: UnWrapKey inside the guest, WrapKey for image owners. Orchestrator.

`GuestKeyProvider` unwraps layer keys after attestation: it fetches each packet's key-encryption key (KEK) from
the KBS by `kid` through the attested session, with one fetch per `kid` however many layers ask at once, and
keeps KEKs in memory only, for a bounded time (0 disables the cache).

`WrapKeyProvider` is the image owner's side (outside the TEE): it wraps ocicrypt's layer options under a KEK
and returns a v1 annotation packet the reference data hub can also unwrap.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.errors import InvalidRequest, NotSupported
from agent.keyprovider import annotation, messages

__all__ = ["GuestKeyProvider", "KekStore", "WrapKeyProvider", "WrapParameters", "parse_wrap_parameters"]

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
        self._cache: dict[str, tuple[bytes, float]] = {}
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self.kek_fetches = 0

    async def unwrap_key(self, request: bytes) -> bytes:
        """Answer a `keyunwrap` JSON request with `{"keyunwrapresults":{"optsdata":[...]}}`."""
        parsed = messages.parse_request(request)
        if not isinstance(parsed, messages.UnwrapRequest):
            msg = "WrapKey is not served inside the guest; image owners wrap with `cvm-agent keyprovider`"
            raise NotSupported(msg)
        packet = annotation.parse_packet(parsed.annotation)
        if packet.provider != "kbs":
            msg = f"annotation packet provider {packet.provider!r} is not supported, expected 'kbs'"
            raise NotSupported(msg)
        kek = await self._kek(packet.kid)
        optsdata = annotation.unwrap(kek, packet)
        log.info("keyprovider.unwrapped", kid=packet.kid, wrap_type=str(packet.wrap_type))
        return messages.unwrap_reply(optsdata)

    async def _kek(self, kid: str) -> bytes:
        cached = self._cache.get(kid)
        if cached is not None and self._clock() < cached[1]:
            return cached[0]
        future = self._inflight.get(kid)
        if future is None:
            future = asyncio.ensure_future(self._fetch_kek(kid))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._inflight[kid] = future
        return await asyncio.shield(future)

    async def _fetch_kek(self, kid: str) -> bytes:
        try:
            self.kek_fetches += 1
            kek = await self._fetch(kid)
            if len(kek) != KEK_BYTES:
                msg = f"the key-encryption key at {kid} is {len(kek)} bytes, expected {KEK_BYTES}"
                raise InvalidRequest(msg)
            if self._cache_s > 0:
                self._cache[kid] = (kek, self._clock() + self._cache_s)
            return kek
        finally:
            del self._inflight[kid]

    def clear(self) -> None:
        """Forget every cached KEK."""
        self._cache.clear()


@dataclass(frozen=True, slots=True, kw_only=True)
class WrapParameters:
    """What one WrapKey call was asked for (skopeo `provider:NAME:k=v::k=v`)."""

    kid: str | None = None
    keypath: str | None = None
    algorithm: annotation.WrapType | None = None


def parse_wrap_parameters(values: tuple[bytes, ...]) -> WrapParameters:
    """Parse `keyid=…::keypath=…::algorithm=…` entries (`::` because skopeo splits flags on commas)."""
    found: dict[str, str] = {}
    for value in values:
        text = value.decode("utf-8", "replace")
        if text == "Enabled":  # skopeo's value for `provider:NAME` with no parameter
            continue
        for item in filter(None, text.split("::")):
            key, sep, val = item.partition("=")
            if not sep or key not in ("keyid", "keypath", "algorithm"):
                msg = f"key-provider parameter {item[:60]!r} is not keyid=, keypath= or algorithm="
                raise InvalidRequest(msg)
            found[key] = val
    algorithm = None
    if "algorithm" in found:
        try:
            algorithm = annotation.WrapType(found["algorithm"])
        except ValueError as exc:
            msg = f"algorithm is {found['algorithm']!r}, expected A256GCM or A256CTR"
            raise InvalidRequest(msg) from exc
    return WrapParameters(kid=found.get("keyid"), keypath=found.get("keypath"), algorithm=algorithm)


class KekStore:
    """Where the image-owner provider keeps KEKs it generated: a KBS registration and/or a 0700 directory."""

    def __init__(
        self,
        *,
        register: Callable[[str, bytes], Awaitable[None]] | None = None,
        directory: Path | None = None,
    ) -> None:
        self._register = register
        self._directory = directory

    @property
    def can_store(self) -> bool:
        return self._register is not None or self._directory is not None

    async def store(self, kid: str, kek: bytes) -> None:
        if self._directory is not None:
            await asyncio.to_thread(self._write, kid, kek)
        if self._register is not None:
            await self._register(kid, kek)

    def load(self, kid: str) -> bytes | None:
        """A KEK this store already holds for `kid` (from an earlier run), if it keeps a directory."""
        if self._directory is None:
            return None
        path = self._path(kid)
        return path.read_bytes() if path.is_file() else None

    def _path(self, kid: str) -> Path:
        from agent.kbs.resource import parse_resource_uri

        uri = parse_resource_uri(kid)
        assert self._directory is not None
        return self._directory.joinpath(uri.repo, uri.type, uri.tag)

    def _write(self, kid: str, kek: bytes) -> None:
        path = self._path(kid)
        target = path.parent
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.touch(mode=0o600)
        tmp.write_bytes(kek)
        tmp.replace(path)


class WrapKeyProvider:
    """WrapKey for image owners: one KEK for every layer, or a fresh generated one per call."""

    def __init__(
        self,
        *,
        provider_name: str = "attestation-agent",
        kek: bytes | None = None,
        kid: str | None = None,
        store: KekStore | None = None,
        default_algorithm: annotation.WrapType = annotation.WrapType.A256GCM,
        read_key: Callable[[str], bytes] = lambda path: Path(path).read_bytes(),
    ) -> None:
        if kek is not None and len(kek) != KEK_BYTES:
            msg = f"the key-encryption key is {len(kek)} bytes, expected {KEK_BYTES}"
            raise InvalidRequest(msg)
        self._name = provider_name
        self._kek = kek
        self._kid = kid
        self._store = store or KekStore()
        self._algorithm = default_algorithm
        self._read_key = read_key
        self._generated: dict[str, bytes] = {}
        self._lock = asyncio.Lock()

    async def wrap_key(self, request: bytes) -> bytes:
        """Answer a `keywrap` JSON request with `{"keywrapresults":{"annotation":[...]}}`."""
        parsed = messages.parse_request(request)
        if not isinstance(parsed, messages.WrapRequest):
            msg = "UnWrapKey is not served by the image-owner provider; layers are unwrapped in the guest"
            raise NotSupported(msg)
        params = parse_wrap_parameters(parsed.params.get(self._name, ()))
        kek, kid, generated = self._choose_key(params)
        if generated:
            kek = await self._generated_kek(kid, kek)
        algorithm = params.algorithm or self._algorithm
        packet = annotation.wrap(kek, parsed.optsdata, kid=kid, wrap_type=algorithm)
        log.info("keyprovider.wrapped", kid=kid, wrap_type=str(algorithm), generated_kek=generated)
        return messages.wrap_reply(packet.to_v1_json())

    async def _generated_kek(self, kid: str, fresh: bytes) -> bytes:
        """One generated KEK per kid: layers wrapped under the same kid (concurrently, or in an earlier run with
        --kek-dir) must not overwrite each other's key in the KBS."""
        async with self._lock:
            known = self._generated.get(kid)
            if known is None:
                known = await asyncio.to_thread(self._store.load, kid)
            if known is None:
                await self._store.store(kid, fresh)
                known = fresh
            self._generated[kid] = known
            return known

    def _choose_key(self, params: WrapParameters) -> tuple[bytes, str, bool]:
        kid = params.kid or self._kid
        if params.keypath is not None:
            try:
                kek = self._read_key(params.keypath)
            except OSError as exc:
                msg = f"keypath {params.keypath!r} cannot be read: {exc.strerror}"
                raise InvalidRequest(msg) from exc
            if len(kek) != KEK_BYTES:
                msg = f"the key in {params.keypath!r} is {len(kek)} bytes, expected {KEK_BYTES}"
                raise InvalidRequest(msg)
            if kid is None:
                msg = "a keypath= key needs keyid= (the KBS resource URI guests will fetch it from)"
                raise InvalidRequest(msg)
            return kek, kid, False
        if self._kek is not None:
            if kid is None:
                msg = "no kid: pass --kid or keyid= (the KBS resource URI guests will fetch the KEK from)"
                raise InvalidRequest(msg)
            return self._kek, kid, False
        if not self._store.can_store:
            msg = (
                "no KEK given and nowhere to keep a generated one: pass --kek-file, keypath=, --kek-dir, "
                "or --kbs-url with admin credentials to register it"
            )
            raise InvalidRequest(msg)
        return secrets.token_bytes(KEK_BYTES), kid or f"kbs:///default/image-kek/{uuid.uuid4()}", True
