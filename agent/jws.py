"""Raw JWS signatures (RFC 7515/7518) for the three key types the project signs with. Pure.

One place for `EdDSA` (Ed25519), `ES256` (P-256, `r || s`, 64 bytes, not DER) and `RS256` (PKCS#1 v1.5,
SHA-256): sealed secrets, dev-KBS attestation tokens and KBS admin tokens all sign and verify through it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from agent.strictjson import b64url_encode

__all__ = ["PrivateKey", "PublicKey", "algorithm", "decode_compact", "encode_compact", "sign", "verify"]

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
_P256_COORDINATE = 32


def algorithm(key: object) -> str:
    """The JWS `alg` for a private or public key; TypeError for anything but Ed25519, P-256 or RSA."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    msg = "the key must be Ed25519, EC P-256 or RSA"
    raise TypeError(msg)


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


def verify(key: PublicKey, alg: object, signing_input: bytes, signature: bytes) -> bool:
    """True only if `alg` is the key's algorithm and the signature verifies."""
    try:
        if alg != algorithm(key):
            return False
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signing_input)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if len(signature) != 2 * _P256_COORDINATE:
                return False
            r = int.from_bytes(signature[:_P256_COORDINATE], "big")
            s = int.from_bytes(signature[_P256_COORDINATE:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


def encode_compact(key: PrivateKey, header: Mapping[str, object], claims: Mapping[str, object]) -> str:
    """A compact JWS/JWT: `alg` (first) from the key, then `header`, compact JSON claims, the signature."""
    head = b64url_encode(json.dumps({"alg": algorithm(key), **header}, separators=(",", ":")).encode())
    body = b64url_encode(json.dumps(dict(claims), separators=(",", ":")).encode())
    signing_input = f"{head}.{body}"
    return f"{signing_input}.{b64url_encode(sign(key, signing_input.encode('ascii')))}"


def decode_compact(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes] | None:
    """`(header, claims, signing_input, signature)` of a compact JWS with JSON-object parts; None if malformed.

    Nothing is verified here: pass the parts to `verify`.
    """
    try:
        head, body, sig = token.split(".")
        header = json.loads(_b64url_decode_lenient(head))
        claims = json.loads(_b64url_decode_lenient(body))
        signature = _b64url_decode_lenient(sig)
    except (ValueError, UnicodeError, binascii.Error):
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims, f"{head}.{body}".encode("ascii"), signature


def _b64url_decode_lenient(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
