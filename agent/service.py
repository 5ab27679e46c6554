"""Transport-agnostic service objects: what the attestation agent and the data hub do. Orchestrator.

The gRPC and ttRPC adapters in `agent.api` translate protobuf messages to these calls and errors to statuses;
nothing here knows about either transport.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.errors import ConfigError, InvalidRequest, NotSupported
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.image.pull import ImagePuller
    from agent.image.settings import ImageConfig
    from agent.kbs.client import KbsClient
    from agent.kbs.resource import ResourceUri
    from agent.keyprovider.service import GuestKeyProvider
    from agent.measurement import MeasurementResult, RuntimeMeasurement
    from agent.tee.base import Attester

__all__ = ["AttestationAgent", "DataHub", "ResourceBackend", "pull_image_measurement"]

log = get_logger("agent.service")

MAX_RUNTIME_DATA = 64 * 1024
MAX_SEALED_SECRET = 64 * 1024
_LOCAL_KID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
TOKEN_TYPES = ("kbs", "coco_as")


class AttestationAgent:
    """The attestation agent: evidence, tokens, runtime measurement, initdata binding."""

    def __init__(
        self,
        attester: Attester,
        kbs: KbsClient | None,
        *,
        ready: asyncio.Event | None = None,
        measurement: RuntimeMeasurement | None = None,
    ) -> None:
        self._attester = attester
        self._kbs = kbs
        self._ready = ready
        if measurement is None:
            from agent.measurement import RuntimeMeasurement

            measurement = RuntimeMeasurement(enabled=False)
        self._measurement = measurement

    async def _wait_ready(self) -> None:
        """Calls that use the TEE or the KBS wait until start-up checks (initdata binding) have passed."""
        if self._ready is not None:
            await self._ready.wait()

    @property
    def tee(self) -> str:
        return self._attester.tee

    def additional_tees(self) -> list[str]:
        return []

    async def get_evidence(self, runtime_data: bytes) -> bytes:
        """Evidence with `runtime_data` as the report data, verbatim (never hashed here)."""
        if len(runtime_data) > MAX_RUNTIME_DATA:
            msg = f"runtime data is {len(runtime_data)} bytes, expected at most {MAX_RUNTIME_DATA}"
            raise InvalidRequest(msg)
        await self._wait_ready()
        return await self._attester.get_evidence(runtime_data)

    async def get_additional_evidence(self, runtime_data: bytes) -> bytes:
        """Device evidence keyed by tee; empty bytes when there is no device attester (as the reference)."""
        if len(runtime_data) > MAX_RUNTIME_DATA:
            msg = f"runtime data is {len(runtime_data)} bytes, expected at most {MAX_RUNTIME_DATA}"
            raise InvalidRequest(msg)
        return b""

    async def get_token(self, token_type: str) -> bytes:
        """`kbs`: `{"token": <JWT>, "tee_keypair": <PEM private key>}` as the reference returns it."""
        if token_type not in TOKEN_TYPES:
            msg = f"token type is {token_type!r}, expected one of: {', '.join(TOKEN_TYPES)}"
            raise InvalidRequest(msg)
        if token_type == "coco_as":
            msg = "the coco_as token type is not supported by this agent; use `kbs`"
            raise NotSupported(msg)
        kbs = self._require_kbs()
        await self._wait_ready()
        session = await kbs.fresh_session()
        payload = {"token": session.token.raw, "tee_keypair": session.keypair.private_pem().decode("ascii")}
        return json.dumps(payload, separators=(",", ":")).encode()

    async def extend_runtime_measurement(
        self, domain: str, operation: str, content: str, register_index: int | None
    ) -> MeasurementResult:
        """Log the event `"<domain> <operation> <content>"` and extend the register for PCR `register_index`."""
        if "\n" in content or " " in domain or " " in operation or not domain or not operation:
            msg = "`Domain` and `Operation` must be non-empty without spaces, and `Content` must not contain a newline"
            raise InvalidRequest(msg)
        return await self._measurement.extend(domain, operation, content, register_index)

    async def bind_init_data(self, digest: bytes) -> None:
        if not digest or len(digest) > 64:
            msg = f"initdata digest is {len(digest)} bytes, expected 1 to 64"
            raise InvalidRequest(msg)
        await self._attester.bind_init_data(digest)

    def _require_kbs(self) -> KbsClient:
        if self._kbs is None:
            msg = "no KBS is configured: set `kbs.url` in the config or pass --kbs-url"
            raise ConfigError(msg, key="kbs.url")
        return self._kbs


MEASUREMENT_DOMAIN = "github.com/confidential-containers"
Extend = Callable[[str, str, str], Awaitable["MeasurementResult"]]
Measure = Callable[[str, str], Awaitable[None]]


def pull_image_measurement(extend: Extend) -> Measure:
    """The `PullImage` event after a pull, through `extend(domain, operation, content)` (the attestation agent's
    ExtendRuntimeMeasurement): OK is logged, NOT_SUPPORTED / NOT_ENABLED are warnings, an error fails the pull."""

    async def measure(image_url: str, digest: str) -> None:
        from agent.image.pull import measurement_content  # the image modules load at the first PullImage
        from agent.measurement import MeasurementResult

        result = await extend(MEASUREMENT_DOMAIN, "PullImage", measurement_content(image_url, digest))
        if result == MeasurementResult.OK:
            log.info("image.measurement.extended", image=image_url, digest=digest)
        else:
            log.warning("image.measurement.skipped", image=image_url, result=result.name)

    return measure


class ResourceBackend(Protocol):
    """Where resources come from: the attested KBS session, passport-mode tokens, or offline files."""

    async def get_resource(self, uri: ResourceUri) -> bytes: ...


class DataHub:
    """The confidential data hub: KBS resources, sealed secrets, image-layer key unwrapping."""

    def __init__(
        self,
        kbs: ResourceBackend | None,
        *,
        kek_cache_s: float = 300.0,
        skip_sealed_secret_verification: bool = False,
        sealed_secret_key_dir: str = "/run/confidential-containers/cdh/sealed-secret",
        image: ImageConfig | None = None,
        measure: Measure | None = None,
    ) -> None:
        self._kbs = kbs
        self._skip_verification = skip_sealed_secret_verification
        self._key_dir = Path(sealed_secret_key_dir)
        self._kek_cache_s = kek_cache_s
        self._keyprovider: GuestKeyProvider | None = None
        self._image_config = image
        self._measure = measure
        self._puller: ImagePuller | None = None

    @property
    def images(self) -> ImagePuller:
        """The image puller, built on first use. Its key and resource look-ups call this hub directly, so
        `GetResource` / `UnWrapKey` served during a pull never wait for the pull."""
        if self._puller is None:
            from agent.image.pull import ImagePuller
            from agent.image.settings import ImageConfig

            self._puller = ImagePuller(
                self._image_config or ImageConfig(),
                get_resource=self.get_resource,
                unwrap=self.unwrap_key,
                measure=self._measure,
            )
        return self._puller

    async def pull_image(self, image_url: str, bundle_path: str) -> str:
        """Pull, verify, unpack and mount `image_url` at `<bundle_path>/rootfs`; the platform manifest digest."""
        return await self.images.pull(image_url, bundle_path)

    def pull_progress(self, bundle_path: str) -> dict[str, object] | None:
        """The progress of the pull into `bundle_path`, if one runs (for `cvm-agent pull`)."""
        if self._puller is None:
            return None
        state = self._puller.in_flight.get(bundle_path)
        return state.describe() if state is not None else None

    async def aclose(self) -> None:
        if self._puller is not None:
            await self._puller.aclose()

    async def get_resource(self, resource_path: str) -> bytes:
        """Raw resource bytes for `kbs:///repo/type/tag` (the URI's host part is ignored)."""
        from agent.kbs.resource import parse_resource_uri

        uri = parse_resource_uri(resource_path)
        if self._kbs is None:
            msg = "no KBS is configured: set `kbs.url` in the config or pass --kbs-url"
            raise ConfigError(msg, key="kbs.url")
        return await self._kbs.get_resource(uri)

    @property
    def keyprovider(self) -> GuestKeyProvider:
        """The layer-key unwrapper, built (its modules loaded) at the first UnWrapKey."""
        if self._keyprovider is None:
            from agent.keyprovider.service import GuestKeyProvider

            self._keyprovider = GuestKeyProvider(self.get_resource, cache_s=self._kek_cache_s)
        return self._keyprovider

    async def unwrap_key(self, request: bytes) -> bytes:
        """ocicrypt `keyunwrap`: the layer options, after fetching the packet's KEK through attestation."""
        return await self.keyprovider.unwrap_key(request)

    async def unseal_secret(self, secret: bytes) -> bytes:
        """Verify a sealed secret (ES256 JWS) and resolve it: `vault` secrets are KBS resources."""
        if len(secret) > MAX_SEALED_SECRET:
            msg = f"sealed secret is {len(secret)} bytes, expected at most {MAX_SEALED_SECRET}"
            raise InvalidRequest(msg)
        from agent.secrets import sealed  # cryptography (ES256) loads at the first sealed secret

        if self._skip_verification:
            log.warning("sealed_secret.unverified", warning="signature verification is disabled (insecure)")
            payload = sealed.parse_unverified(secret)
        else:
            parsed = sealed.parse(secret)
            payload = sealed.verify(parsed, await self._verification_key(parsed.kid))
        if isinstance(payload, sealed.EnvelopeSecret):
            msg = (
                f"envelope sealed secrets need the {payload.provider!r} KMS, which cvm-agent does not support; "
                "use a vault secret backed by the KBS"
            )
            raise NotSupported(msg)
        if payload.provider != "kbs":
            msg = f"vault sealed secrets from provider {payload.provider!r} are not supported, expected 'kbs'"
            raise NotSupported(msg)
        return await self.get_resource(payload.name)

    async def _verification_key(self, kid: str) -> bytes:
        from agent.secrets import sealed

        if sealed.kid_is_resource_uri(kid):
            return await self.get_resource(kid)
        if not _LOCAL_KID.fullmatch(kid):
            msg = "sealed secret `kid` is neither a resource URI nor a plain key name"
            raise InvalidRequest(msg)
        path = self._key_dir / kid
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            msg = f"sealed secret verification key {kid!r} cannot be read from {self._key_dir}: {exc.strerror}"
            raise InvalidRequest(msg) from exc
