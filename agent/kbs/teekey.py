"""Ephemeral TEE key pairs: generation, the canonical public JWK, the reference `tee_keypair` PEM, and the key
operations a JWE needs (ECDH, RSA-OAEP-256). Pure.

Two crypto backends, one behaviour (docs/decisions.md, 22): the default P-256 key lives in the platform libcrypto
(`agent.libcrypto`) where it is OpenSSL 3, and so does a P-256 PEM in the PKCS#8 form OpenSSL and pyca write;
P-521, RSA, other PEM forms, and any platform without it use pyca/cryptography, imported on first use only.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import libcrypto
from agent.kbs.keyalg import ECDH_ES_A256KW, RSA_OAEP_256, KeyAlgorithm
from agent.strictjson import b64url_encode

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["SIZES", "KeyAlgorithm", "TeeKeyPair", "oaep"]

SIZES = {"P-256": 32, "P-521": 66}  # coordinate bytes per curve
# A P-256 key in PKCS#8 (RFC 5208: version 0, id-ecPublicKey with prime256v1) around an RFC 5915 ECPrivateKey
# (version 1, the scalar, no parameters, the public point), as OpenSSL and pyca write it. Other PKCS#8 forms (e.g.
# without the public point, which RFC 5915 makes optional) go to pyca's loader.
# DER: _P256_PKCS8_HEAD || scalar (32) || _P256_PKCS8_MID || 04 || X || Y.
_P256_PKCS8_HEAD = bytes.fromhex("308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420")
_P256_PKCS8_MID = bytes.fromhex("a14403420004")
_P256_PKCS8_SIZE = len(_P256_PKCS8_HEAD) + 32 + len(_P256_PKCS8_MID) + 64
_PEM_HEADER, _PEM_FOOTER = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


def _int_bytes(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def _p256_pkcs8_pem(scalar: bytes, x: bytes, y: bytes) -> bytes:
    body = base64.b64encode(_P256_PKCS8_HEAD + scalar + _P256_PKCS8_MID + x + y)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join([_PEM_HEADER, *lines, _PEM_FOOTER]) + b"\n"


def _p256_pkcs8_parts(pem: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(scalar, x, y) of a P-256 PKCS#8 PEM in the form `_p256_pkcs8_pem` writes (any line breaks); None for every
    other PEM, which pyca/cryptography's loader then reads or refuses."""
    text = pem.strip()
    if not text.startswith(_PEM_HEADER) or not text.endswith(_PEM_FOOTER):
        return None
    body = b"".join(text[len(_PEM_HEADER) : -len(_PEM_FOOTER)].split())
    try:
        der = base64.b64decode(body, validate=True)
    except binascii.Error:
        return None
    head, mid = len(_P256_PKCS8_HEAD), len(_P256_PKCS8_HEAD) + 32
    if len(der) != _P256_PKCS8_SIZE or der[:head] != _P256_PKCS8_HEAD or der[mid : mid + 6] != _P256_PKCS8_MID:
        return None
    point = der[mid + 6 :]
    return der[head:mid], point[:32], point[32:]


def _curve(crv: str) -> ec.EllipticCurve:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.SECP256R1() if crv == "P-256" else ec.SECP521R1()


def oaep() -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@dataclass(frozen=True, slots=True)
class TeeKeyPair:
    """An ephemeral key pair whose public half is bound into the TEE evidence as `tee-pubkey`."""

    algorithm: KeyAlgorithm
    private_key: libcrypto.P256Key | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    @classmethod
    def generate(cls, algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> TeeKeyPair:
        if algorithm is KeyAlgorithm.EC_P256 and libcrypto.available():
            return cls(algorithm, libcrypto.P256Key.generate())
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if algorithm is KeyAlgorithm.RSA_OAEP_256:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(_curve("P-521" if algorithm is KeyAlgorithm.EC_P521 else "P-256"))
        return cls(algorithm, key)

    @classmethod
    def from_pem(cls, pem: bytes) -> TeeKeyPair:
        """Load a key from the PEM the reference `tee_keypair` carries (PKCS#8 EC or PKCS#1 RSA)."""
        parts = _p256_pkcs8_parts(pem) if libcrypto.available() else None
        if parts is not None:
            return cls(KeyAlgorithm.EC_P256, libcrypto.P256Key.from_private(*parts))
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        key = serialization.load_pem_private_key(pem, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            return cls(KeyAlgorithm.RSA_OAEP_256, key)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if isinstance(key.curve, ec.SECP256R1):
                return cls(KeyAlgorithm.EC_P256, key)
            if isinstance(key.curve, ec.SECP521R1):
                return cls(KeyAlgorithm.EC_P521, key)
        msg = "tee key pair must be RSA-2048, EC P-256 or EC P-521"
        raise ValueError(msg)

    @property
    def crv(self) -> str:
        return "P-521" if self.algorithm is KeyAlgorithm.EC_P521 else "P-256"

    def public_jwk(self) -> dict[str, str]:
        """The JWK with exactly the members the KBS re-serialises and hashes (kbs-protocol.md §5.2)."""
        key = self.private_key
        if isinstance(key, libcrypto.P256Key):
            x, y = key.public_point()
        else:
            from cryptography.hazmat.primitives.asymmetric import rsa  # loaded already: the key is pyca's

            if isinstance(key, rsa.RSAPrivateKey):
                numbers = key.public_key().public_numbers()
                n = _int_bytes(numbers.n, (numbers.n.bit_length() + 7) // 8)
                e = _int_bytes(numbers.e, (numbers.e.bit_length() + 7) // 8)
                return {"kty": "RSA", "alg": RSA_OAEP_256, "n": b64url_encode(n), "e": b64url_encode(e)}
            point = key.public_key().public_numbers()
            x, y = _int_bytes(point.x, SIZES[self.crv]), _int_bytes(point.y, SIZES[self.crv])
        return {"kty": "EC", "crv": self.crv, "alg": ECDH_ES_A256KW, "x": b64url_encode(x), "y": b64url_encode(y)}

    def private_pem(self) -> bytes:
        """PEM as the reference `tee_keypair`: PKCS#8 for EC, PKCS#1 for RSA. This is secret material."""
        key = self.private_key
        if isinstance(key, libcrypto.P256Key):
            return _p256_pkcs8_pem(key.private_scalar(), *key.public_point())
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        fmt = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if isinstance(key, rsa.RSAPrivateKey)
            else serialization.PrivateFormat.PKCS8
        )
        return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())

    def exchange(self, x: bytes, y: bytes) -> bytes:
        """ECDH with the peer point (x, y) on this key's curve; `ValueError` if the point is not on it, or if this
        is an RSA key."""
        key = self.private_key
        if isinstance(key, libcrypto.P256Key):
            return key.exchange(x, y)
        from cryptography.hazmat.primitives.asymmetric import ec

        if not isinstance(key, ec.EllipticCurvePrivateKey):
            msg = "an RSA key has no ECDH"
            raise ValueError(msg)  # noqa: TRY004 - one error type for every bad input, as the callers expect
        numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), _curve(self.crv))
        return key.exchange(ec.ECDH(), numbers.public_key())  # public_key() checks the point is on the curve

    def decrypt_oaep(self, data: bytes) -> bytes:
        """RSA-OAEP-256 decryption; `ValueError` if it fails, or if this is an EC key."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = self.private_key
        if not isinstance(key, rsa.RSAPrivateKey):
            msg = "an EC key has no RSA-OAEP"
            raise ValueError(msg)  # noqa: TRY004 - one error type for every bad input, as the callers expect
        return key.decrypt(data, oaep())

    def __repr__(self) -> str:
        return f"TeeKeyPair({self.algorithm.value}, <private key>)"
