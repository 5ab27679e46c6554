"""Passport mode: fetch KBS resources with a token obtained elsewhere (from the attestation agent). Edge.

This is how the reference data hub works in `cc_kbc` mode: it asks the attestation agent for
`GetToken("kbs")` (`{"token", "tee_keypair"}`), then sends `GET /kbs/v0/resource/...` with
`Authorization: Bearer <token>` and decrypts the JWE with the key pair. The pair is kept until shortly before
the token's `exp`; a 401 fetches a new pair once and retries.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from agent.errors import KbsProtocolError, ResourceNotFound
from agent.kbs import protocol
from agent.kbs.client import KbsHttp
from agent.kbs.jwe import TeeKeyPair, decrypt
from agent.kbs.resource import ResourceUri
from agent.shared import SharedValue

__all__ = ["PassportClient", "TokenPair", "parse_token_reply"]

log = structlog.get_logger("agent.kbs.passport")


@dataclass(frozen=True, slots=True)
class TokenPair:
    token: protocol.Token
    keypair: TeeKeyPair

    def __repr__(self) -> str:
        return f"TokenPair(exp={self.token.exp})"


def parse_token_reply(data: bytes) -> TokenPair:
    """The AA's `GetToken("kbs")` payload `{"token": "<JWT>", "tee_keypair": "<PEM>"}`."""
    try:
        value = json.loads(data)
        token, pem = value["token"], value["tee_keypair"]
        if not isinstance(token, str) or not isinstance(pem, str):
            raise TypeError
        keypair = TeeKeyPair.from_pem(pem.encode("ascii"))
    except (ValueError, KeyError, TypeError, UnicodeError) as exc:
        msg = "the attestation agent's token reply is not {token, tee_keypair}"
        raise KbsProtocolError(msg) from exc
    return TokenPair(protocol.parse_token(token), keypair)


TokenSource = Callable[[], Awaitable[TokenPair]]


class PassportClient:
    def __init__(
        self,
        http: KbsHttp,
        token_source: TokenSource,
        *,
        refresh_margin_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.http = http
        self._margin = refresh_margin_s
        self._clock = clock
        self._pairs: SharedValue[TokenPair] = SharedValue(token_source, self._usable)

    async def aclose(self) -> None:
        await self.http.aclose()

    def _usable(self, pair: TokenPair) -> bool:
        exp = pair.token.exp
        return exp is None or self._clock() < exp - self._margin

    @property
    def token_requests(self) -> int:
        return self._pairs.refreshes

    async def get_resource(self, uri: ResourceUri) -> bytes:
        pair = await self._pairs.get()
        for retry in (True, False):
            headers = {"Authorization": f"Bearer {pair.token.raw}"}
            status, body, _ = await self.http.exchange("GET", uri.kbs_path(), headers=headers)
            if status == 200:
                return await asyncio.to_thread(decrypt, pair.keypair, body)
            if status == 401 and retry:
                log.info("kbs.token.rejected", path=uri.kbs_path(), action="new token")
                pair = await self._pairs.get(stale=pair)
                continue
            error = protocol.error_from_response(status, body, step=f"resource {uri.path}")
            if status == 404:
                raise ResourceNotFound(str(error))
            raise error
        msg = "unreachable"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover
