"""Signing for image owners and the dev KBS: JWS signatures, compact JWTs, sealed secrets. Pure.

The guest package only verifies (`agent.jws`, `agent.secrets.sealed`); everything that creates a signature a
guest or a KBS would trust lives here, in the tools distribution, and is never installed into a TEE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.jws import PrivateKey, algorithm
from agent.secrets import sealed
from agent.strictjson import b64url_encode, dump_json

__all__ = ["encode_compact", "generate_signing_key", "seal", "sign"]

_P256_COORDINATE = 32


def sign(key: PrivateKey, signing_input: bytes) -> bytes:
    """The JWS signature of `signing_input` (`<b64url header>.<b64url payload>`) with the key's algorithm."""
    alg = algorithm(key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(signing_input)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(_P256_COORDINATE, "big") + s.to_bytes(_P256_COORDINATE, "big")
    assert alg == "RS256"
    return key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())


def encode_compact(key: PrivateKey, header: Mapping[str, object], claims: Mapping[str, object]) -> str:
    """A compact JWS/JWT: `alg` (first) from the key, then `header`, compact JSON claims, the signature."""
    head = b64url_encode(json.dumps({"alg": algorithm(key), **header}, separators=(",", ":")).encode())
    body = b64url_encode(json.dumps(dict(claims), separators=(",", ":")).encode())
    signing_input = f"{head}.{body}"
    return f"{signing_input}.{b64url_encode(sign(key, signing_input.encode('ascii')))}"


def seal(payload: sealed.VaultSecret | sealed.EnvelopeSecret, signing_key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    """Sign `payload` with a P-256 key as `sealed.<header>.<payload>.<signature>`, header `{"alg":"ES256","kid"}`.

    Raises `TypeError` for a key on another curve and `ValueError` for an empty `kid`.
    """
    if not isinstance(signing_key.curve, ec.SECP256R1):
        msg = f"signing key is on {signing_key.curve.name}, expected secp256r1 (P-256) for ES256"
        raise TypeError(msg)
    if not kid:
        msg = "`kid` must be a non-empty key id"
        raise ValueError(msg)
    header_b64 = b64url_encode(dump_json({"alg": sealed.ALGORITHM, "kid": kid}))
    payload_b64 = b64url_encode(dump_json(payload.to_json_object()))
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    signature = sign(signing_key, signing_input)
    return f"{sealed.SEALED_PREFIX}{header_b64}.{payload_b64}.{b64url_encode(signature)}"


def generate_signing_key() -> tuple[bytes, bytes]:
    """A fresh P-256 key: (private key as unencrypted PKCS#8 PEM, public JWK as JSON bytes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(numbers.x.to_bytes(_P256_COORDINATE, "big")),
        "y": b64url_encode(numbers.y.to_bytes(_P256_COORDINATE, "big")),
    }
    return pem, dump_json(jwk)
