"""Raw JWS signatures for EdDSA, ES256 and RS256, cross-checked with jwcrypto."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cvm_tools import sign as jws_sign
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws

from agent import jws

KEYS: dict[str, jws.PrivateKey] = {
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def pem(key: jws.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("alg", list(KEYS))
def test_ours_verified_by_jwcrypto(alg: str) -> None:
    token = jws_sign.encode_compact(KEYS[alg], {"typ": "JWT"}, {"exp": 1, "role": "admin"})
    checker = jw_jws.JWS()
    checker.deserialize(token, key=jw_jwk.JWK.from_pem(pem(KEYS[alg])), alg=alg)
    assert json.loads(checker.payload) == {"exp": 1, "role": "admin"}
    parts = jws.decode_compact(token)
    assert parts is not None
    assert parts[0] == {"alg": alg, "typ": "JWT"}


@pytest.mark.parametrize("alg", list(KEYS))
def test_jwcrypto_verified_by_ours(alg: str) -> None:
    signer = jw_jws.JWS(b'{"x":1}')
    signer.add_signature(jw_jwk.JWK.from_pem(pem(KEYS[alg])), alg=alg, protected=json.dumps({"alg": alg}))
    parts = jws.decode_compact(signer.serialize(compact=True))
    assert parts is not None
    header, claims, signing_input, signature = parts
    assert claims == {"x": 1}
    assert jws.verify(KEYS[alg].public_key(), header["alg"], signing_input, signature)


@pytest.mark.parametrize("alg", list(KEYS))
def test_rejections(alg: str) -> None:
    key = KEYS[alg]
    signature = jws_sign.sign(key, b"a.b")
    assert jws.verify(key.public_key(), alg, b"a.b", signature)
    assert not jws.verify(key.public_key(), alg, b"a.c", signature)
    assert not jws.verify(key.public_key(), "none", b"a.b", signature)
    assert not jws.verify(key.public_key(), "HS256", b"a.b", signature)
    assert not jws.verify(key.public_key(), alg, b"a.b", signature[:-1])
    other = {"EdDSA": "ES256", "ES256": "RS256", "RS256": "EdDSA"}[alg]
    assert not jws.verify(KEYS[other].public_key(), alg, b"a.b", signature)


def test_unsupported_key_and_malformed_tokens() -> None:
    with pytest.raises(TypeError, match="Ed25519, EC P-256 or RSA"):
        jws.algorithm(ec.generate_private_key(ec.SECP384R1()))
    for token in ("", "a.b", "a.b.c.d", "!!.e30.", "W10.e30.", "e30.W10."):
        assert jws.decode_compact(token) is None
