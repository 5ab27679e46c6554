"""WrapKey for image owners (outside the TEE): wrap ocicrypt's layer options under a KEK. Orchestrator.

`WrapKeyProvider` returns a v1 annotation packet that the guest's data hub (ours or the reference) unwraps after
fetching the KEK from the KBS by `kid`. KEKs come from a file, from a caller's `keypath=` (only inside an
explicitly allowed directory), or are generated once per `kid` and kept by a `KekStore` (a 0700 directory and/or
a registration at the KBS).
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.errors import InvalidRequest, NotSupported
from agent.keyprovider import annotation, messages

__all__ = ["KEK_BYTES", "KekStore", "WrapKeyProvider", "WrapParameters", "parse_wrap_parameters"]

log = structlog.get_logger("cvm_tools.keyprovider")

KEK_BYTES = 32


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
        prefix: str = "kbs:///default/image-kek/",
    ) -> None:
        self._register = register
        self._directory = directory
        self.prefix = prefix

    @property
    def can_store(self) -> bool:
        return self._register is not None or self._directory is not None

    async def store(self, kid: str, kek: bytes) -> None:
        if not kid.startswith(self.prefix):
            msg = f"keyid {kid[:200]!r} is outside {self.prefix!r}: generated KEKs are only stored there"
            raise InvalidRequest(msg)
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
        keypath_dir: Path | None = None,
    ) -> None:
        if kek is not None and len(kek) != KEK_BYTES:
            msg = f"the key-encryption key is {len(kek)} bytes, expected {KEK_BYTES}"
            raise InvalidRequest(msg)
        self._name = provider_name
        self._kek = kek
        self._kid = kid
        self._store = store or KekStore()
        self._algorithm = default_algorithm
        self._keypath_dir = keypath_dir
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
            kek = self._read_keypath(params.keypath)
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
        return secrets.token_bytes(KEK_BYTES), kid or f"{self._store.prefix}{uuid.uuid4()}", True

    def _read_keypath(self, keypath: str) -> bytes:
        """A caller's `keypath=`: only a regular file inside `keypath_dir`, so that no local caller can use (or
        probe for) any other file the provider can read. Errors say the same for every refusal."""
        refused = "keypath= is not allowed: pass a file inside the provider's --keypath-dir"
        if self._keypath_dir is None:
            raise InvalidRequest(refused)
        try:
            target = (self._keypath_dir / keypath).resolve(strict=True)
        except (OSError, RuntimeError):
            raise InvalidRequest(refused) from None
        if not target.is_relative_to(self._keypath_dir) or not target.is_file():
            raise InvalidRequest(refused)
        try:
            kek = target.read_bytes()
        except OSError:
            raise InvalidRequest(refused) from None
        if len(kek) != KEK_BYTES:
            msg = f"the keypath= key is {len(kek)} bytes, expected {KEK_BYTES}"
            raise InvalidRequest(msg)
        return kek
