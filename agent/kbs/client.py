"""The KBS client: HTTP to the KBS, the attested-credential cache, and the resource fetch. Edge (network).

One `KbsClient` per agent (background-check mode) drives `protocol.RcarSession` over `KbsHttp`; the passport
client (`agent.kbs.passport`) shares `KbsHttp`, `CredentialCache` and `fetch_resource` with it.

- Every exchange (connect, send, every read, and the retries of a refused connection or a 502/503/504) has one
  deadline, `kbs.timeout_s`; a handshake (auth + evidence + attest) has `2 x kbs.timeout_s`. Callers share one
  handshake (single flight); the handshake ends at its own deadline, so no caller waits past it.
- Bodies are read raw (`Accept-Encoding: identity`; a `Content-Encoding` is refused) up to
  `kbs.max_response_bytes`; JSON is strict and depth-limited (`agent.strictjson`).
- A token is kept until shortly before it expires and renewed in the background at 75-80 % of its lifetime,
  so in steady state no call waits on a handshake; a failed renewal is retried with backoff while the old token
  is still valid. Lifetimes are measured from arrival on the local clock (`exp - iat`), not against the KBS clock.
- A token whose `tee-pubkey` is not the agent's key fails the handshake (`protocol.check_binding`).

What it does not verify: the token's signature (the KBS verifies it on every request).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent import __version__
from agent.config import KbsConfig
from agent.errors import AgentError, ConfigError, DecryptionError, KbsError, KbsProtocolError, KbsTransportError
from agent.kbs import protocol
from agent.kbs.keyalg import KeyAlgorithm
from agent.kbs.resource import ResourceUri
from agent.log import get_logger
from agent.shared import SharedValue

if TYPE_CHECKING:  # h11 (agent.kbs.http) and the JWE crypto (agent.kbs.jwe) load at the first KBS exchange
    import ssl

    from agent.kbs.http import HttpResponse, Transport
    from agent.kbs.teekey import TeeKeyPair
    from agent.tee.base import Attester

__all__ = [
    "AttestedSession",
    "CredentialCache",
    "KbsClient",
    "KbsHttp",
    "build_ssl_context",
    "fetch_resource",
    "preload",
]

log = get_logger("agent.kbs")

# on every request; bodies are read raw: a Content-Encoding in the answer is refused (`_check_encoding`)
_HEADERS = {"User-Agent": f"cvm-agent/{__version__}", "Accept-Encoding": "identity"}
_REFRESH_FRACTION = (0.75, 0.80)  # of the token lifetime, with jitter
_EXPIRY_GUARD = 0.1  # of the lifetime, at most `token_refresh_margin_s`: stop serving a token this close to exp
_MAX_BACKOFF_S = 60.0
_INLINE_DECRYPT_BYTES = 16 * 1024  # P-256 JWEs up to this size are decrypted on the event loop; others in a thread


def build_ssl_context(cert_path: str | None, cert_pem: str | None = None) -> ssl.SSLContext:
    """System roots plus an optional extra CA certificate (PEM file, or PEM text as the reference `cert`)."""
    import ssl

    context = ssl.create_default_context()
    try:
        if cert_path is not None:
            context.load_verify_locations(cafile=cert_path)
        if cert_pem is not None:
            context.load_verify_locations(cadata=cert_pem)
    except (OSError, ssl.SSLError, ValueError) as exc:
        msg = f"KBS certificate {cert_path or '(inline PEM)'!r} cannot be loaded: {exc}"
        raise KbsError(msg) from exc
    return context


class KbsHttp:
    """HTTP to one KBS: one deadline per exchange, raw bounded bodies, bounded retries of transient failures.

    Shared by the background-check client (`KbsClient`) and the passport-mode client. The connection pool
    (`agent.kbs.http`, h11 with it) is built at the first exchange, so a process that never reaches its KBS never
    loads it. `transport` replaces the pool (tests).
    """

    def __init__(
        self,
        config: KbsConfig,
        *,
        transport: Transport | None = None,
        attempts: int = 3,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not config.url:
            msg = "kbs.url is not set, expected the KBS URL (http:// or https://)"
            raise ConfigError(msg, key="kbs.url")
        self.url = config.url.rstrip("/")
        self.timeout_s = config.timeout_s
        self._max_bytes = config.max_response_bytes
        self._attempts = max(1, attempts)
        self._sleep = sleep
        self._config = config
        self._transport = transport
        self._closed = False

    def _pool(self) -> Transport:
        if self._transport is None:
            if self._closed:
                msg = f"the client of the KBS at {self.url} is closed"
                raise KbsTransportError(msg)
            from agent.kbs.http import Origin, Pool

            try:
                origin = Origin.parse(self.url)
            except ValueError as exc:
                msg = f"kbs.url {exc}"
                raise ConfigError(msg, key="kbs.url") from None
            config = self._config
            context = build_ssl_context(config.cert_path, config.cert_pem) if origin.tls else None
            self._transport = Pool(origin, ssl_context=context)  # its limits: agent.kbs.http.Pool
        return self._transport

    async def aclose(self) -> None:
        self._closed = True
        if self._transport is not None:
            await self._transport.aclose()

    async def exchange(self, request: protocol.HttpRequest) -> HttpResponse:
        """Send one request and read the whole answer, all within `kbs.timeout_s`."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._exchange(request)
        except TimeoutError:
            msg = (
                f"KBS at {self.url} did not answer {request.method} {request.path} within {self.timeout_s:g} s "
                "(kbs.timeout_s)"
            )
            raise KbsTransportError(msg) from None

    async def _exchange(self, request: protocol.HttpRequest) -> HttpResponse:
        from agent.kbs.http import HttpError, ResponseTooLarge

        method, path = request.method, request.path
        pool = self._pool()
        for attempt in range(1, self._attempts + 1):
            started = time.monotonic()
            try:
                headers = {**_HEADERS, **(request.headers or {})}
                response = await pool.send(method, path, headers, request.body, max_bytes=self._max_bytes)
            except ResponseTooLarge:
                msg = f"KBS at {self.url}: the response to {method} {path} exceeds {self._max_bytes} bytes"
                raise KbsTransportError(msg) from None
            except HttpError as exc:
                log.warning("kbs.exchange.failed", method=method, path=path, attempt=attempt, error=type(exc).__name__)
                if not exc.retryable or attempt == self._attempts:
                    msg = f"KBS at {self.url} is unreachable: {type(exc).__name__}: {exc}"
                    raise KbsTransportError(msg) from None
            else:
                log.info(
                    "kbs.exchange",
                    method=method,
                    path=path,
                    status=response.status,
                    bytes=len(response.body),
                    attempt=attempt,
                    duration_ms=round((time.monotonic() - started) * 1000, 1),
                )
                _check_encoding(self.url, method, path, response)
                if not protocol.retryable_status(response.status) or attempt == self._attempts:
                    return response
            await self._sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
        msg = "unreachable"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover


def _check_encoding(url: str, method: str, path: str, response: HttpResponse) -> None:
    """Bodies are raw: `Accept-Encoding: identity` is asked for and anything else refused, never decompressed."""
    encoding = (response.header("content-encoding") or "identity").strip().lower()
    if encoding not in ("", "identity"):
        msg = f"KBS at {url} answered {method} {path} with Content-Encoding {encoding[:40]!r}, expected identity"
        raise KbsProtocolError(msg)


def preload() -> None:
    """Import what the first handshake and fetch need (the HTTP client, the TEE key and JWE crypto: the platform
    libcrypto's, or pyca/cryptography where that is not OpenSSL 3) and run their first use once. Blocking: `App`
    runs it in a thread once the process serves, so the first GetResource does not pay for it; without it the same
    work happens on that call."""
    import agent.kbs.http  # noqa: F401
    from agent.kbs import jwe

    jwe.self_test()
    # JCS sorts member names by their UTF-16 code units: the first binding digest loads that codec (~0.6 ms)
    protocol.binding_digest(protocol.runtime_data("", {"kty": "EC"}))


@dataclass(frozen=True, slots=True, eq=False)
class AttestedSession:
    """An attested `RcarSession` (token and cookie), the TEE key pair its token is bound to, and its times.

    Times are on the cache's local clock: arrival, `not_before`/`expires` from the token, `refresh_at` when a
    background renewal starts.
    """

    session: protocol.RcarSession
    keypair: TeeKeyPair
    received_at: float
    not_before: float | None
    expires: float | None
    refresh_at: float | None

    @property
    def token(self) -> protocol.Token:
        assert self.session.token is not None
        return self.session.token

    @property
    def cookie(self) -> str | None:
        return self.session.cookie

    def __repr__(self) -> str:
        return f"AttestedSession(exp={self.token.exp})"


Attest = Callable[[], Awaitable[tuple[protocol.RcarSession, "TeeKeyPair"]]]


class CredentialCache:
    """The current attested session for every caller: one fetch at a time, background renewal, backoff.

    `attest` runs a handshake (background check) or asks for a token (passport) and returns an attested
    `RcarSession` with its key pair.
    """

    def __init__(
        self,
        attest: Attest,
        *,
        kbs: str,
        margin_s: float,
        deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._attest = attest
        self._kbs = kbs
        self._margin = margin_s
        self._deadline = deadline_s
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng
        self._failures = 0
        self._retry_at = 0.0
        self._shared: SharedValue[AttestedSession] = SharedValue(self._fetch, self._usable)

    @classmethod
    def for_kbs(cls, attest: Attest, config: KbsConfig, kbs: str, clock: Callable[[], float] | None) -> CredentialCache:
        """The cache a KBS client keeps: margin and deadline from `config`; `clock` (tests) replaces both clocks."""
        return cls(
            attest,
            kbs=kbs,
            margin_s=config.token_refresh_margin_s,
            deadline_s=2 * config.timeout_s,
            clock=clock or time.monotonic,
            wall_clock=clock or time.time,
        )

    @property
    def fetches(self) -> int:
        return self._shared.refreshes

    @property
    def current(self) -> AttestedSession | None:
        return self._shared.value

    async def _fetch(self) -> AttestedSession:
        try:
            async with asyncio.timeout(self._deadline):
                session, keypair = await self._attest()
            result = self._timed(session, keypair)
        except TimeoutError:
            self._failed()
            msg = f"KBS at {self._kbs}: attestation did not finish within {self._deadline:g} s (2 x kbs.timeout_s)"
            raise KbsTransportError(msg) from None
        except Exception as exc:  # e.g. the AA's ttRPC error in passport mode: every failure backs off
            self._failed()
            error = str(exc) if isinstance(exc, AgentError) else type(exc).__name__
            log.warning("kbs.attestation.failed", kbs=self._kbs, error=error, failures=self._failures)
            raise
        self._failures = 0
        return result

    def _failed(self) -> None:
        self._failures += 1
        backoff = min(2.0**self._failures, _MAX_BACKOFF_S)
        self._retry_at = self._clock() + self._rng(0.5 * backoff, backoff)

    def _timed(self, session: protocol.RcarSession, keypair: TeeKeyPair) -> AttestedSession:
        assert session.token is not None
        now = self._clock()
        not_before, expires = session.token.validity(now, self._wall())
        refresh_at = None
        if expires is not None:
            if expires <= now:
                msg = f"KBS at {self._kbs} issued a token that is already expired (exp is not after iat)"
                raise KbsProtocolError(msg)
            refresh_at = now + (expires - now) * self._rng(*_REFRESH_FRACTION)
        return AttestedSession(session, keypair, now, not_before, expires, refresh_at)

    def _usable(self, value: AttestedSession) -> bool:
        now = self._clock()
        if value.not_before is not None and now < value.not_before - self._margin:
            return False
        if value.expires is None:
            return True
        # short tokens keep most of their life: a 20 s token is served until 2 s before it expires, not 30 s
        guard = min(self._margin, _EXPIRY_GUARD * (value.expires - value.received_at))
        return now < value.expires - guard

    async def get(self, *, stale: AttestedSession | None = None) -> AttestedSession:
        """The current session; a caller waits only when there is no usable one (or it was `stale`: refused)."""
        current = self._shared.value
        if current is not None and current is not stale and self._usable(current):
            now = self._clock()
            due = current.refresh_at is not None and now >= current.refresh_at
            if due and not self._shared.busy and now >= self._retry_at:
                log.info("kbs.refresh.started", kbs=self._kbs, mode="background")
                self._shared.refresh()
            return current
        return await self._shared.get(stale=stale)

    def close(self) -> None:
        """Stop a renewal that is still running (the client is shutting down)."""
        self._shared.cancel()

    async def fresh(self) -> AttestedSession:
        """A session from a fetch that starts now (or is already running): never the cached one."""
        return await self._shared.get(stale=self._shared.value)


async def fetch_resource(http: KbsHttp, credentials: CredentialCache, uri: ResourceUri) -> bytes:
    """GET and decrypt a resource: the one 401 rule (renew the credential once, then give up) for both modes."""
    attested = await credentials.get()
    for may_renew in (True, False):
        request = attested.session.resource_request(uri.kbs_path())
        response = await http.exchange(request)
        outcome = attested.session.receive_resource(response.status, response.body, what=uri.path, may_renew=may_renew)
        if outcome is protocol.Renew.CREDENTIAL:
            log.info("kbs.credential.rejected", path=uri.kbs_path(), action="renew")
            attested = await credentials.get(stale=attested)
            continue
        assert isinstance(outcome, bytes)
        from agent.kbs.jwe import decrypt

        try:
            small = len(outcome) <= _INLINE_DECRYPT_BYTES
            if small and attested.keypair.algorithm is KeyAlgorithm.EC_P256:  # ~0.2 ms: less than a thread hop
                return decrypt(attested.keypair, outcome)
            return await asyncio.to_thread(decrypt, attested.keypair, outcome)
        except DecryptionError:
            msg = f"KBS at {http.url}: the response for resource {uri.path} cannot be decrypted with the agent's key"
            raise KbsProtocolError(msg) from None
    msg = "unreachable"  # pragma: no cover
    raise AssertionError(msg)  # pragma: no cover


class KbsClient:
    """RCAR 0.4.0 client (background-check mode) bound to one attester."""

    def __init__(
        self,
        config: KbsConfig,
        attester: Attester,
        *,
        init_data_toml: str | None = None,
        transport: Transport | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`clock` (tests) replaces both the monotonic and the wall clock."""
        self._config = config
        self._attester = attester
        self._init_data = init_data_toml
        self.http = KbsHttp(config, transport=transport, sleep=sleep)
        self._credentials = CredentialCache.for_kbs(self._handshake, config, self.http.url, clock)

    async def __aenter__(self) -> KbsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._credentials.close()
        await self.http.aclose()

    async def _handshake(self) -> tuple[protocol.RcarSession, TeeKeyPair]:
        from agent.kbs.teekey import TeeKeyPair

        algorithm = self._config.tee_key_algorithm
        if algorithm is KeyAlgorithm.EC_P256:  # ~0.03 ms: less than a thread hop
            keypair = TeeKeyPair.generate(algorithm)
        else:  # RSA-2048 takes tens of milliseconds
            keypair = await asyncio.to_thread(TeeKeyPair.generate, algorithm)
        session = protocol.RcarSession(
            tee=self._attester.tee, tee_pubkey=keypair.public_jwk(), kbs=self.http.url, init_data_toml=self._init_data
        )
        challenge = await self.http.exchange(session.auth_request())
        session.receive_auth(challenge.status, challenge.body, challenge.header_list("set-cookie"))
        evidence = await self._attester.get_evidence(session.binding_digest())
        answer = await self.http.exchange(session.attest_request(evidence))
        token = session.receive_attest(answer.status, answer.body)
        log.info(
            "kbs.attested", tee=self._attester.tee, exp=token.exp, key_algorithm=self._config.tee_key_algorithm.value
        )
        return session, keypair

    async def session(self, *, stale: AttestedSession | None = None) -> AttestedSession:
        """The current attested session, running one handshake for all concurrent callers when needed.

        `stale` names a session the caller found rejected (401): it is replaced unless someone already did.
        Callers that arrive while a handshake runs share its result, including its failure.
        """
        return await self._credentials.get(stale=stale)

    async def fresh_session(self) -> AttestedSession:
        """A session from a handshake that starts now (or is already in flight): never a cached one.

        GetToken callers (the data hub in passport mode) cache the token themselves and ask again only when it
        expired or the KBS rejected it, so handing out the cached session could hand back the rejected token.
        """
        return await self._credentials.fresh()

    @property
    def handshakes(self) -> int:
        return self._credentials.fetches

    async def get_resource(self, uri: ResourceUri) -> bytes:
        """Fetch and decrypt a resource; one renewed session and retry on a 401 that a new token may cure."""
        return await fetch_resource(self.http, self._credentials, uri)
