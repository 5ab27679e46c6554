"""The KBS client: RCAR handshake, token reuse and resource fetches over HTTP(S). Edge (network).

One `KbsClient` per agent. It keeps one attested session (token + the TEE key pair bound into it), reuses it
until shortly before the token's `exp`, and runs a fresh handshake when it is about to expire or when the KBS
answers 401. Concurrent callers share one handshake (single flight).

What it verifies: response sizes, JSON shapes, JWE integrity (via `agent.kbs.jwe`). What it does not: the
token's signature (the KBS verifies it on every request; the agent only reads `exp`).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import structlog

from agent import __version__
from agent.errors import (
    AgentError,
    KbsError,
    KbsProtocolError,
    KbsTransportError,
    ResourceNotFound,
)
from agent.kbs import protocol
from agent.kbs.jwe import KeyAlgorithm, TeeKeyPair, decrypt
from agent.kbs.resource import ResourceUri
from agent.shared import SharedValue
from agent.tee.base import Attester

__all__ = ["AttestedSession", "KbsClient", "KbsHttp", "build_ssl_context"]

log = structlog.get_logger("agent.kbs")

_COOKIE = re.compile(r"(?:^|[;,]\s*)kbs-session-id=([A-Za-z0-9_-]{1,128})")
_RETRYABLE = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_USER_AGENT = f"cvm-agent/{__version__}"


@dataclass(frozen=True, slots=True)
class AttestedSession:
    """A token with the TEE key pair it was issued for, and the KBS session cookie."""

    token: protocol.Token
    keypair: TeeKeyPair
    cookie: str | None

    def __repr__(self) -> str:
        return f"AttestedSession(exp={self.token.exp})"


def build_ssl_context(cert_path: str | None, cert_pem: str | None = None) -> ssl.SSLContext:
    """System roots plus an optional extra CA certificate (PEM file, or PEM text as the reference `cert`)."""
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
    """HTTP to one KBS: bounded bodies, explicit timeouts, bounded retries of connection failures only.

    Shared by the background-check client (`KbsClient`) and the passport-mode client.
    """

    def __init__(
        self,
        url: str,
        *,
        cert_path: str | None = None,
        cert_pem: str | None = None,
        timeout_s: float = 60.0,
        max_response_bytes: int = 16 * 1024 * 1024,
        attempts: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self._max_bytes = max_response_bytes
        self._attempts = max(1, attempts)
        self._sleep = sleep
        https = url.startswith("https://")
        verify: ssl.SSLContext | bool = build_ssl_context(cert_path, cert_pem) if https else False
        self._http = httpx.AsyncClient(
            transport=transport,
            verify=verify,
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(timeout_s),
            headers={"User-Agent": _USER_AGENT},
            # keep pooled connections shorter-lived than the KBS's ~5 s keep-alive (kbs-protocol.md §9)
            limits=httpx.Limits(keepalive_expiry=4.0),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def exchange(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, httpx.Headers]:
        """One HTTP exchange with bounded body, retried on connection-level failures only."""
        request_headers = dict(headers or {})
        if body is not None:
            request_headers["Content-Type"] = "application/json"
        url = self.url + path
        for attempt in range(1, self._attempts + 1):
            started = time.monotonic()
            try:
                async with self._http.stream(method, url, content=body, headers=request_headers) as response:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self._max_bytes:
                            msg = f"KBS response to {method} {path} exceeds {self._max_bytes} bytes"
                            raise KbsTransportError(msg)
                        chunks.append(chunk)
                    self._http.cookies.clear()  # cookies are handled explicitly, never by the jar
                    log.info(
                        "kbs.exchange",
                        method=method,
                        path=path,
                        status=response.status_code,
                        bytes=size,
                        duration_ms=round((time.monotonic() - started) * 1000, 1),
                    )
                    return response.status_code, b"".join(chunks), response.headers
            except _RETRYABLE as exc:
                log.warning("kbs.exchange.failed", method=method, path=path, attempt=attempt, error=type(exc).__name__)
                if attempt == self._attempts:
                    msg = f"KBS at {self.url} is unreachable: {type(exc).__name__}: {exc}"
                    raise KbsTransportError(msg) from exc
                await self._sleep(min(0.2 * 2**attempt, 2.0))
            except httpx.TimeoutException as exc:
                msg = f"KBS {method} {path} timed out ({type(exc).__name__})"
                raise KbsTransportError(msg) from exc
            except httpx.HTTPError as exc:
                msg = f"KBS {method} {path} failed: {type(exc).__name__}: {exc}"
                raise KbsTransportError(msg) from exc
        msg = "unreachable"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover


class KbsClient:
    """RCAR 0.4.0 client bound to one attester."""

    def __init__(
        self,
        *,
        url: str,
        attester: Attester,
        key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
        cert_path: str | None = None,
        cert_pem: str | None = None,
        timeout_s: float = 60.0,
        max_response_bytes: int = 16 * 1024 * 1024,
        refresh_margin_s: float = 30.0,
        attempts: int = 3,
        init_data_toml: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._attester = attester
        self._key_algorithm = key_algorithm
        self._margin = refresh_margin_s
        self._init_data = init_data_toml
        self._clock = clock
        self._sessions: SharedValue[AttestedSession] = SharedValue(self._handshake, self._usable)
        self.http = KbsHttp(
            url,
            cert_path=cert_path,
            cert_pem=cert_pem,
            timeout_s=timeout_s,
            max_response_bytes=max_response_bytes,
            attempts=attempts,
            transport=transport,
            sleep=sleep,
        )

    async def __aenter__(self) -> KbsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- RCAR --------------------------------------------------------------------------------------------------

    async def _handshake(self) -> AttestedSession:
        keypair = await asyncio.to_thread(TeeKeyPair.generate, self._key_algorithm)
        tee_pubkey = keypair.public_jwk()
        status, body, headers = await self.http.exchange(
            "POST", "/kbs/v0/auth", body=protocol.request_body(self._attester.tee)
        )
        if status != 200:
            raise self._rejected(status, body, "auth")
        challenge = protocol.parse_challenge(body)
        cookie = None
        for value in headers.get_list("set-cookie"):
            match = _COOKIE.search(value)
            if match:
                cookie = match.group(1)
        if cookie is None:
            msg = "KBS auth response did not set the kbs-session-id cookie"
            raise KbsProtocolError(msg)
        digest = protocol.binding_digest(protocol.runtime_data(challenge.nonce, tee_pubkey), challenge.hash_algorithm)
        evidence_bytes = await self._attester.get_evidence(digest)
        attestation = protocol.attestation_body(
            nonce=challenge.nonce,
            tee_pubkey=tee_pubkey,
            evidence=json.loads(evidence_bytes),
            init_data_toml=self._init_data,
        )
        status, body, _ = await self.http.exchange(
            "POST", "/kbs/v0/attest", body=attestation, headers={"Cookie": f"kbs-session-id={cookie}"}
        )
        if status != 200:
            raise self._rejected(status, body, "attest")
        token = protocol.parse_attest_response(body)
        log.info("kbs.attested", tee=self._attester.tee, exp=token.exp, key_algorithm=self._key_algorithm.value)
        return AttestedSession(token, keypair, cookie)

    @staticmethod
    def _rejected(status: int, body: bytes, step: str) -> AgentError:
        if status == 404:
            return ResourceNotFound(str(protocol.error_from_response(status, body, step=step)))
        return protocol.error_from_response(status, body, step=step)

    def _usable(self, session: AttestedSession) -> bool:
        now = self._clock()
        exp, nbf = session.token.exp, session.token.nbf
        if exp is not None and now >= exp - self._margin:
            return False
        return not (nbf is not None and now < nbf - self._margin)

    async def session(self, *, stale: AttestedSession | None = None) -> AttestedSession:
        """The current attested session, running one handshake for all concurrent callers when needed.

        `stale` names a session the caller found rejected (401): it is replaced unless someone already did.
        Callers that arrive while a handshake runs share its result, including its failure.
        """
        return await self._sessions.get(stale=stale)

    async def fresh_session(self) -> AttestedSession:
        """A session from a handshake that starts now (or is already in flight): never a cached one.

        GetToken callers (the data hub in passport mode) cache the token themselves and ask again only when it
        expired or the KBS rejected it, so handing out the cached session could hand back the rejected token.
        """
        return await self._sessions.get(stale=self._sessions.value)

    @property
    def handshakes(self) -> int:
        return self._sessions.refreshes

    async def get_resource(self, uri: ResourceUri) -> bytes:
        """Fetch and decrypt a resource; one fresh handshake and retry on 401."""
        session = await self.session()
        for retry in (True, False):
            headers = {"Authorization": f"Bearer {session.token.raw}"}
            if session.cookie:
                headers["Cookie"] = f"kbs-session-id={session.cookie}"
            status, body, _ = await self.http.exchange("GET", uri.kbs_path(), headers=headers)
            if status == 200:
                return await asyncio.to_thread(decrypt, session.keypair, body)
            if status == 401 and retry:
                log.info("kbs.session.rejected", path=uri.kbs_path(), action="re-attest")
                session = await self.session(stale=session)
                continue
            raise self._rejected(status, body, f"resource {uri.path}")
        msg = "unreachable"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover
