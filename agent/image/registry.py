"""The registry client: manifests and blobs over the distribution API, with auth, retries and digests. Edge.

One `RegistryClient` (connection pool, TLS roots, proxies) per data hub; one `RegistrySession` per pull task with
its own token cache, as the reference builds a fresh client per task (image-pull.md §2.4).

What it verifies: every manifest against the reference digest and `Docker-Content-Digest`; every blob against its
descriptor digest and size while streaming (a blob is never held in memory unless it is a small document).
What it does not: manifest structure (`agent.image.manifest`) and layer contents (the layer store).

Retries: connection failures, resets, truncated bodies, 429 and 5xx are retried with exponential back-off until
the pull's deadline; 4xx answers and digest mismatches are not (a wrong digest will not fix itself).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agent import __version__
from agent.errors import ImageFormatError, InvalidRequest, RegistryError
from agent.image.auth import Credentials, parse_challenge, parse_token_reply
from agent.image.manifest import ACCEPT, MAX_MANIFEST_BYTES, Descriptor, digest_of
from agent.image.reference import ImageReference
from agent.image.registries import PullTask
from agent.log import get_logger

__all__ = ["Deadline", "ProxyConfig", "RegistryClient", "RegistrySession", "build_tls_context"]

log = get_logger("agent.image.registry")

_USER_AGENT = f"cvm-agent/{__version__}"
_RETRY_STATUS = {429, 500, 502, 503, 504}
_TRANSIENT = (httpx.TransportError,)  # connect, read, write, pool, protocol (reset, truncated) and timeouts
DEFAULT_TOKEN_TTL_S = 60.0
CHUNK = 256 * 1024
MAX_SMALL_BODY = 64 * 1024  # probes and error bodies
MAX_TOKEN_BYTES = 64 * 1024


async def _read_bounded(response: httpx.Response, limit: int, url: str) -> bytes:
    """Read a streamed response body, at most `limit` bytes; an oversized 200 body is an `ImageFormatError`."""
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limit:
                if response.status_code == 200:
                    msg = f"{url} answered more than {limit} bytes, expected at most {limit}"
                    raise ImageFormatError(msg)
                del body[limit:]
                break
    finally:
        await response.aclose()
    return bytes(body)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    https_proxy: str | None = None
    http_proxy: str | None = None
    no_proxy: str | None = None


class Deadline:
    """A per-pull deadline on the monotonic clock."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._end = clock() + seconds

    def remaining(self) -> float:
        return self._end - self._clock()

    def check(self, what: str) -> None:
        if self.remaining() <= 0:
            msg = f"{what}: the pull deadline has passed"
            raise RegistryError(msg)


def build_tls_context(extra_roots: Sequence[str]) -> ssl.SSLContext:
    """System roots plus the `extra_root_certificates` (PEM text)."""
    context = ssl.create_default_context()
    for i, pem in enumerate(extra_roots):
        try:
            context.load_verify_locations(cadata=pem)
        except (ssl.SSLError, ValueError) as exc:
            msg = f"`extra_root_certificates[{i}]` is not a PEM certificate: {exc}"
            raise RegistryError(msg) from None
    return context


def _mounts(proxies: ProxyConfig, verify: ssl.SSLContext) -> dict[str, httpx.AsyncBaseTransport | None]:
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
    if proxies.https_proxy:
        mounts["https://"] = httpx.AsyncHTTPTransport(proxy=proxies.https_proxy, verify=verify)
    if proxies.http_proxy:
        mounts["http://"] = httpx.AsyncHTTPTransport(proxy=proxies.http_proxy, verify=verify)
    for entry in (proxies.no_proxy or "").split(","):
        host = entry.strip().lstrip(".")
        if host and mounts:
            mounts[f"all://*{host}" if host != "*" else "all://"] = None
    return mounts


class RegistryClient:
    """Connection pool, TLS and proxy settings shared by every pull."""

    def __init__(
        self,
        *,
        extra_roots: Sequence[str] = (),
        proxies: ProxyConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        verify = build_tls_context(extra_roots)
        self._http = httpx.AsyncClient(
            verify=verify,
            transport=transport,
            mounts=_mounts(proxies or ProxyConfig(), verify) if transport is None else None,
            trust_env=False,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
            follow_redirects=True,
            max_redirects=5,
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def session(self, task: PullTask, credentials: Credentials | None, deadline: Deadline) -> RegistrySession:
        return RegistrySession(self._http, task, credentials, deadline)


@dataclass
class _Auth:
    header: str | None = None
    expires: float = 0.0
    basic: bool = False
    probed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RegistrySession:
    """Requests for one repository on one registry (one pull task)."""

    def __init__(
        self, http: httpx.AsyncClient, task: PullTask, credentials: Credentials | None, deadline: Deadline
    ) -> None:
        self._http = http
        self.reference: ImageReference = task.reference
        self._scheme = "http" if task.insecure else "https"
        self._credentials = credentials
        self._deadline = deadline
        self._auth = _Auth()

    @property
    def base(self) -> str:
        return f"{self._scheme}://{self.reference.api_host}/v2/{self.reference.repository}"

    # -- authentication -------------------------------------------------------------------------------------
    async def _authorization(self, *, renew: bool = False) -> str | None:
        auth = self._auth
        async with auth.lock:
            if auth.basic:
                return auth.header
            if auth.probed and not renew and (auth.header is None or time.monotonic() < auth.expires):
                return auth.header
            response, _ = await self._send("GET", f"{self._scheme}://{self.reference.api_host}/v2/", auth=False)
            auth.probed = True
            challenge = parse_challenge(response.headers.get("www-authenticate", ""))
            if response.status_code != 401 or challenge is None:
                auth.header = None
            elif challenge.scheme == "bearer":
                auth.header, auth.expires = await self._fetch_token(challenge.params)
            elif self._credentials is not None:
                auth.basic = True
                auth.header = self._credentials.basic_header()
            return auth.header

    async def _fetch_token(self, params: Mapping[str, str]) -> tuple[str | None, float]:
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            log.warning("registry.token_realm_invalid", registry=self.reference.registry)
            return None, 0.0
        query = {"scope": f"repository:{self.reference.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {}
        if self._credentials is not None:
            if realm.startswith("http://") and self._scheme == "https":
                log.warning("registry.token_realm_plain_http", registry=self.reference.registry)
                return None, 0.0
            headers["Authorization"] = self._credentials.basic_header()
        try:
            request = self._http.build_request("GET", realm, params=query, headers=headers)
            response = await self._http.send(request, stream=True)
            body = await _read_bounded(response, MAX_TOKEN_BYTES, realm)
            if response.status_code != 200:
                log.warning("registry.token_refused", registry=self.reference.registry, status=response.status_code)
                return None, 0.0
            token, expires_in = parse_token_reply(body)
        except (httpx.HTTPError, InvalidRequest, ImageFormatError) as exc:
            # As the reference: a token failure is not fatal here; the request then fails with the registry's 401.
            log.warning("registry.token_failed", registry=self.reference.registry, error=type(exc).__name__)
            return None, 0.0
        ttl = float(expires_in) if expires_in else _jwt_ttl(token)
        return f"Bearer {token}", time.monotonic() + max(ttl - 5.0, 1.0)

    # -- requests -------------------------------------------------------------------------------------------
    async def _send(
        self,
        method: str,
        url: str,
        *,
        auth: bool = True,
        headers: Mapping[str, str] | None = None,
        limit: int = MAX_SMALL_BODY,
    ) -> tuple[httpx.Response, bytes]:
        """One request with retries, and its body read up to `limit` bytes (small documents and probes only).

        A 200 answer larger than `limit` raises `ImageFormatError`; other answers are cut at `limit`."""
        attempt = 0
        renewed = False
        while True:
            self._deadline.check(f"{method} {url}")
            request_headers = dict(headers or {})
            if auth:
                authorization = await self._authorization()
                if authorization:
                    request_headers["Authorization"] = authorization
            try:
                async with asyncio.timeout(max(self._deadline.remaining(), 0.001)):
                    request = self._http.build_request(method, url, headers=request_headers)
                    response = await self._http.send(request, stream=True)
                    body = await _read_bounded(response, limit, url)
            except (*_TRANSIENT, TimeoutError) as exc:
                attempt = await self._backoff(attempt, f"{method} {url}", type(exc).__name__)
                continue
            if response.status_code in _RETRY_STATUS:
                attempt = await self._backoff(attempt, f"{method} {url}", f"HTTP {response.status_code}")
                continue
            if response.status_code == 401 and auth and not renewed and not self._auth.basic:
                renewed = True
                await self._authorization(renew=True)
                continue
            return response, body

    async def _backoff(self, attempt: int, what: str, reason: str) -> int:
        delay = min(0.1 * 2**attempt, 2.0)
        if self._deadline.remaining() <= delay:
            msg = f"{what} failed ({reason}) and the pull deadline leaves no time to retry"
            raise RegistryError(msg)
        log.info("registry.retry", what=what, reason=reason, attempt=attempt + 1, delay_s=delay)
        await asyncio.sleep(delay)
        return attempt + 1

    @staticmethod
    def _fail(response: httpx.Response, body: bytes, what: str) -> RegistryError:
        detail = ""
        try:
            errors = json.loads(body[:4096]).get("errors", [])
            detail = f": {errors[0].get('code')} {errors[0].get('message')}"[:200] if errors else ""
        except (ValueError, AttributeError, IndexError, TypeError):
            pass
        msg = f"{what} answered HTTP {response.status_code}{detail}"
        return RegistryError(msg, status=response.status_code)

    async def get_manifest(self, reference: str) -> tuple[bytes, str | None, str]:
        """A manifest or index by tag or digest: (body, content type, verified digest)."""
        url = f"{self.base}/manifests/{reference}"
        response, body = await self._send("GET", url, headers={"Accept": ACCEPT}, limit=MAX_MANIFEST_BYTES)
        if response.status_code != 200:
            raise self._fail(response, body, f"manifest {self.reference.name}:{reference}")
        header = response.headers.get("docker-content-digest")
        expected = reference if ":" in reference else header
        algorithm = expected.partition(":")[0] if expected else "sha256"
        if algorithm not in ("sha256", "sha384", "sha512"):
            msg = f"manifest digest algorithm is {algorithm[:20]!r}, expected sha256, sha384 or sha512"
            raise ImageFormatError(msg)
        digest = digest_of(body, algorithm)
        for want in (reference if ":" in reference else None, header):
            if want is not None and want.partition(":")[0] == algorithm and want != digest:
                msg = f"manifest digest is {digest}, expected {want}"
                raise ImageFormatError(msg)
        return body, response.headers.get("content-type"), digest

    async def get_blob(self, descriptor: Descriptor, *, limit: int) -> bytes:
        """A small blob (image config, signature payload) in memory, digest and size verified."""
        if descriptor.size > limit:
            msg = f"blob {descriptor.digest} is {descriptor.size} bytes, expected at most {limit}"
            raise ImageFormatError(msg)
        response, body = await self._send("GET", f"{self.base}/blobs/{descriptor.digest}", limit=descriptor.size)
        if response.status_code != 200:
            raise self._fail(response, body, f"blob {descriptor.digest}")
        if len(body) != descriptor.size:
            msg = f"blob {descriptor.digest} is {len(body)} bytes, expected {descriptor.size}"
            raise ImageFormatError(msg)
        got = digest_of(body, descriptor.digest.partition(":")[0])
        if got != descriptor.digest:
            msg = f"blob digest is {got}, expected {descriptor.digest}"
            raise ImageFormatError(msg)
        return body

    async def download_blob(
        self, descriptor: Descriptor, dest: Path, progress: Callable[[int], None] | None = None
    ) -> None:
        """Stream a blob to `dest` (created 0600), verifying size and digest; retried from the start on transient
        failures. On any failure `dest` is removed."""
        url = f"{self.base}/blobs/{descriptor.digest}"
        attempt = 0
        try:
            while True:
                self._deadline.check(f"blob {descriptor.digest}")
                headers = {}
                authorization = await self._authorization()
                if authorization:
                    headers["Authorization"] = authorization
                try:
                    async with asyncio.timeout(max(self._deadline.remaining(), 0.001)):
                        await self._stream_once(url, headers, descriptor, dest, progress)
                except _Retry as exc:
                    reason = exc.reason
                except (*_TRANSIENT, TimeoutError) as exc:
                    reason = type(exc).__name__
                else:
                    return
                attempt = await self._backoff(attempt, f"blob {descriptor.digest}", reason)
        except BaseException:
            dest.unlink(missing_ok=True)  # noqa: ASYNC240 - one unlink, no waiting worth a thread
            raise

    async def _stream_once(
        self,
        url: str,
        headers: Mapping[str, str],
        descriptor: Descriptor,
        dest: Path,
        progress: Callable[[int], None] | None,
    ) -> None:
        algorithm = descriptor.digest.partition(":")[0]
        digest = hashlib.new(algorithm)
        written = 0
        async with self._http.stream("GET", url, headers=headers) as response:
            if response.status_code in _RETRY_STATUS:
                raise _Retry.status(response.status_code)
            if response.status_code == 401 and not self._auth.basic:
                await self._authorization(renew=True)
                raise _Retry.status(401)
            if response.status_code != 200:
                raise self._fail(
                    response, await _read_bounded(response, MAX_SMALL_BODY, url), f"blob {descriptor.digest}"
                )
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                try:
                    async for chunk in response.aiter_raw(CHUNK):
                        written += len(chunk)
                        if written > descriptor.size:
                            msg = f"blob {descriptor.digest} is larger than its descriptor size {descriptor.size}"
                            raise ImageFormatError(msg)
                        digest.update(chunk)
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                        if progress is not None:
                            progress(len(chunk))
                except (*_TRANSIENT, TimeoutError) as exc:
                    if progress is not None:
                        progress(-written)
                    raise _Retry(type(exc).__name__) from None
            finally:
                os.close(fd)
        if written != descriptor.size:
            if progress is not None:
                progress(-written)
            reason = f"truncated body: {written} of {descriptor.size} bytes"
            raise _Retry(reason)
        got = f"{algorithm}:{digest.hexdigest()}"
        if got != descriptor.digest:
            msg = f"blob digest is {got}, expected {descriptor.digest}"
            raise ImageFormatError(msg)


class _Retry(Exception):
    """Internal signal: the attempt failed transiently; never escapes this module."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @classmethod
    def status(cls, code: int) -> _Retry:
        return cls(f"HTTP {code}")


def _jwt_ttl(token: str) -> float:
    """Seconds until the token's `exp` if it is a JWT (read only, not verified), else the default 60 s."""
    parts = token.split(".")
    if len(parts) == 3:
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            exp = claims.get("exp") if isinstance(claims, dict) else None
            if isinstance(exp, int | float) and not isinstance(exp, bool):
                return max(float(exp) - time.time(), 0.0)
        except (ValueError, UnicodeDecodeError):
            pass
    return DEFAULT_TOKEN_TTL_S
