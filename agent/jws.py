"""JWS verification (RFC 7515/7518) for `EdDSA` (Ed25519), `ES256` (P-256, raw `r || s`) and `RS256`. Pure.

The guest only verifies (sealed secrets) and decodes (KBS tokens). Signing lives in the tools distribution
(`cvm_tools.sign`): nothing in the guest package can mint a token or seal a secret.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.errors import InvalidRequest
from agent.strictjson import split_compact

__all__ = ["PrivateKey", "PublicKey", "algorithm", "decode_compact", "split_compact", "verify"]

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


def decode_compact(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes] | None:
    """`split_compact`, or None if the token is malformed."""
    try:
        return split_compact(token, "token")
    except InvalidRequest:
        return None
