"""PassportClient: the same credential rules (binding, nbf/exp, one renewal on 401) as the background-check client."""

from __future__ import annotations

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cvm_tools.sign import encode_compact

from agent.config import KbsConfig
from agent.errors import KbsProtocolError
from agent.kbs import protocol
from agent.kbs.jwe import TeeKeyPair
from agent.kbs.passport import PassportClient, TokenPair, parse_token_reply
from tests.fakes.kbs_transport import MockTransport
from tests.unit.kbs.test_client import SECRET_VALUE, URI, FakeKbs

SIGNER = ec.generate_private_key(ec.SECP256R1())


class TokenSource:
    """What the attestation agent's GetToken("kbs") hands out: a token and the key pair it is bound to."""

    def __init__(self, kbs: FakeKbs, *, foreign: bool = False, nbf_offset: float = 0.0) -> None:
        self.kbs = kbs
        self.foreign = foreign
        self.nbf_offset = nbf_offset
        self.calls = 0

    async def __call__(self) -> TokenPair:
        self.calls += 1
        keypair = TeeKeyPair.generate()
        self.kbs.pubkey = keypair.public_jwk()
        bound = TeeKeyPair.generate().public_jwk() if self.foreign else self.kbs.pubkey
        iat = int(self.kbs.now[0])
        claims = {"iat": iat, "nbf": iat + self.nbf_offset, "exp": iat + 300, "tee-pubkey": bound}
        return TokenPair(protocol.parse_token(encode_compact(SIGNER, {"typ": "JWT"}, claims)), keypair)


def passport(kbs: FakeKbs, source: TokenSource) -> PassportClient:
    return PassportClient(
        KbsConfig(url="https://kbs.test"), source, transport=MockTransport(kbs), clock=lambda: kbs.now[0]
    )


async def test_fetches_with_bearer_only_and_reuses_the_token() -> None:
    kbs = FakeKbs()
    source = TokenSource(kbs)
    client = passport(kbs, source)
    assert await client.get_resource(URI) == SECRET_VALUE
    assert await client.get_resource(URI) == SECRET_VALUE
    await client.aclose()
    assert source.calls == 1
    assert "cookie" not in kbs.seen[0].headers
    assert kbs.seen[0].headers["authorization"].startswith("Bearer ey")


async def test_token_bound_to_another_key_is_refused() -> None:
    kbs = FakeKbs()
    client = passport(kbs, TokenSource(kbs, foreign=True))
    with pytest.raises(KbsProtocolError, match="tee-pubkey is another key"):
        await client.get_resource(URI)
    await client.aclose()
    assert kbs.seen == []


async def test_nbf_is_honoured_as_in_background_check_mode() -> None:
    kbs = FakeKbs()
    source = TokenSource(kbs, nbf_offset=120)  # not valid for two minutes, beyond the 30 s margin
    client = passport(kbs, source)
    await client.get_resource(URI)
    await client.get_resource(URI)
    await client.aclose()
    assert source.calls == 2  # a token not yet valid is never reused


async def test_401_fetches_one_new_token() -> None:
    kbs = FakeKbs()
    source = TokenSource(kbs)
    client = passport(kbs, source)
    kbs.faults["resource"] = [
        httpx.Response(401, json={"type": "x/TokenVerifierError", "detail": "Token Verifier error"})
    ]
    assert await client.get_resource(URI) == SECRET_VALUE
    await client.aclose()
    assert source.calls == 2


def test_token_reply_is_strict_json() -> None:
    with pytest.raises(KbsProtocolError, match="nested more than 64 levels"):
        parse_token_reply(b'{"token":' + b"[" * 70 + b"]" * 70 + b"}")
    with pytest.raises(KbsProtocolError, match=r"^the attestation agent's token reply is not \{token, tee_keypair\}$"):
        parse_token_reply(b'{"token":"a.b.c","tee_keypair":"not a PEM"}')
