"""Passport mode: fetch KBS resources with a token obtained elsewhere (from the attestation agent). Edge.

This is how the reference data hub works in `cc_kbc` mode: it asks the attestation agent for
`GetToken("kbs")` (`{"token", "tee_keypair"}`), then sends `GET /kbs/v0/resource/...` with
`Authorization: Bearer <token>` and decrypts the JWE with the key pair. The pair goes through the same
`CredentialCache` as the background-check client (kept until shortly before `exp`, renewed in the background,
`nbf` honoured) and the same `fetch_resource` (a 401 fetches a new pair once and retries). A token bound to a
key other than the pair's is refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.config import KbsConfig
from agent.errors import KbsProtocolError
from agent.kbs import protocol
from agent.kbs.client import CredentialCache, KbsHttp, fetch_resource
from agent.kbs.resource import ResourceUri
from agent.strictjson import load_json_object

if TYPE_CHECKING:  # h11 and the JWE crypto load at the first resource fetch
    from agent.kbs.http import Transport
    from agent.kbs.teekey import TeeKeyPair

__all__ = ["PassportClient", "TokenPair", "parse_token_reply"]


@dataclass(frozen=True, slots=True)
class TokenPair:
    token: protocol.Token
    keypair: TeeKeyPair

    def __repr__(self) -> str:
        return f"TokenPair(exp={self.token.exp})"


def parse_token_reply(data: bytes) -> TokenPair:
    """The AA's `GetToken("kbs")` payload `{"token": "<JWT>", "tee_keypair": "<PEM>"}`."""
    from agent.kbs.teekey import TeeKeyPair

    value = load_json_object(data, "the attestation agent's token reply", error=KbsProtocolError)
    token, pem = value.get("token"), value.get("tee_keypair")
    try:
        if not isinstance(token, str) or not isinstance(pem, str):
            raise TypeError
        keypair = TeeKeyPair.from_pem(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeError):
        msg = "the attestation agent's token reply is not {token, tee_keypair}"
        raise KbsProtocolError(msg) from None
    return TokenPair(protocol.parse_token(token), keypair)


TokenSource = Callable[[], Awaitable[TokenPair]]


class PassportClient:
    def __init__(
        self,
        config: KbsConfig,
        token_source: TokenSource,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`clock` (tests) replaces both the monotonic and the wall clock."""
        self.http = KbsHttp(config, transport=transport)
        self._token_source = token_source
        self._credentials = CredentialCache.for_kbs(self._attest, config, self.http.url, clock)

    async def aclose(self) -> None:
        self._credentials.close()
        await self.http.aclose()

    async def _attest(self) -> tuple[protocol.RcarSession, TeeKeyPair]:
        pair = await self._token_source()
        return protocol.RcarSession.with_token(pair.token, pair.keypair.public_jwk(), kbs=self.http.url), pair.keypair

    @property
    def token_requests(self) -> int:
        return self._credentials.fetches

    async def get_resource(self, uri: ResourceUri) -> bytes:
        return await fetch_resource(self.http, self._credentials, uri)
