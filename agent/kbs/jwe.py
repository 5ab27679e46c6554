"""Ephemeral TEE key pairs, their canonical JWK, and JWE (RFC 7516 flattened JSON) for KBS responses. Pure.

What the KBS does (kbs-protocol.md §6): it encrypts each resource to the `tee-pubkey` from the attestation token
with `enc = A256GCM` and one of `ECDH-ES+A256KW` (P-256, P-521) or `RSA-OAEP-256`; the AAD is the ASCII of the
`protected` member exactly as sent.

`decrypt()` allow-lists the algorithm that matches the key, checks the header, and turns every failure into one
opaque `DecryptionError`. `encrypt()` exists for the development KBS and for tests.
"""

from __future__ import annotations

import json
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from agent.errors import DecryptionError
from agent.kbs.keyalg import ECDH_ES_A256KW, RSA_OAEP_256, KeyAlgorithm
from agent.strictjson import b64url_decode, b64url_encode, load_json_object

__all__ = ["KeyAlgorithm", "TeeKeyPair", "decrypt", "encrypt"]

_ENC = "A256GCM"
_ECDH = ECDH_ES_A256KW
_RSA_OAEP = RSA_OAEP_256
_MAX_JWE_BYTES = 64 * 1024 * 1024


_CURVES: dict[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-521": (ec.SECP521R1, 66),
}


def _b64(value: object, what: str) -> bytes:
    # kbs-protocol.md §6.2: the KBS writes no padding; a client may accept both
    return b64url_decode(value, what, error=ValueError, padded=True)


def _int_bytes(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


@dataclass(frozen=True, slots=True)
class TeeKeyPair:
    """An ephemeral key pair whose public half is bound into the TEE evidence as `tee-pubkey`."""

    algorithm: KeyAlgorithm
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    @classmethod
    def generate(cls, algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> TeeKeyPair:
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if algorithm is KeyAlgorithm.RSA_OAEP_256:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm is KeyAlgorithm.EC_P521:
            key = ec.generate_private_key(ec.SECP521R1())
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        return cls(algorithm, key)

    @classmethod
    def from_pem(cls, pem: bytes) -> TeeKeyPair:
        """Load a key from the PEM the reference `tee_keypair` carries (PKCS#8 EC or PKCS#1 RSA)."""
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

    def public_jwk(self) -> dict[str, str]:
        """The JWK with exactly the members the KBS re-serialises and hashes (kbs-protocol.md §5.2)."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            numbers = self.private_key.public_key().public_numbers()
            n = _int_bytes(numbers.n, (numbers.n.bit_length() + 7) // 8)
            e = _int_bytes(numbers.e, (numbers.e.bit_length() + 7) // 8)
            return {"kty": "RSA", "alg": _RSA_OAEP, "n": b64url_encode(n), "e": b64url_encode(e)}
        crv = "P-256" if self.algorithm is KeyAlgorithm.EC_P256 else "P-521"
        size = _CURVES[crv][1]
        point = self.private_key.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "alg": _ECDH,
            "x": b64url_encode(_int_bytes(point.x, size)),
            "y": b64url_encode(_int_bytes(point.y, size)),
        }

    def private_pem(self) -> bytes:
        """PEM as the reference `tee_keypair`: PKCS#8 for EC, PKCS#1 for RSA. This is secret material."""
        fmt = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if isinstance(self.private_key, rsa.RSAPrivateKey)
            else serialization.PrivateFormat.PKCS8
        )
        return self.private_key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())

    def __repr__(self) -> str:
        return f"TeeKeyPair({self.algorithm.value}, <private key>)"


def _concat_kdf(z: bytes, header: dict[str, Any]) -> bytes:
    """RFC 7518 §4.6.2 Concat KDF for ECDH-ES+A256KW (256-bit KEK, SHA-256)."""
    apu = _b64(header["apu"], "apu") if "apu" in header else b""
    apv = _b64(header["apv"], "apv") if "apv" in header else b""
    alg = _ECDH.encode("ascii")
    other_info = (
        struct.pack(">I", len(alg))
        + alg
        + struct.pack(">I", len(apu))
        + apu
        + struct.pack(">I", len(apv))
        + apv
        + struct.pack(">I", 256)
    )
    return ConcatKDFHash(hashes.SHA256(), 32, other_info).derive(z)


def _load_epk(epk: object, crv: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(epk, dict) or epk.get("kty") != "EC" or epk.get("crv") != crv:
        msg = "epk does not match the key"
        raise ValueError(msg)
    curve_cls, size = _CURVES[crv]
    x, y = _b64(epk.get("x"), "x"), _b64(epk.get("y"), "y")
    if len(x) != size or len(y) != size:
        msg = "epk coordinates have the wrong length"
        raise ValueError(msg)
    numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve_cls())
    return numbers.public_key()  # validates the point is on the curve


def decrypt(keypair: TeeKeyPair, jwe: bytes) -> bytes:
    """Decrypt a flattened-JSON JWE addressed to `keypair`.

    Verifies: the JSON shape, `enc == A256GCM`, `alg` equal to the key's algorithm, no `crit`/`zip`, the EC
    ephemeral key on our curve, the key unwrap integrity check and the GCM tag (AAD = the raw `protected`).

    Raises:
        DecryptionError: for every failure, without saying which check failed.
    """
    try:
        if len(jwe) > _MAX_JWE_BYTES:
            raise DecryptionError
        body = load_json_object(jwe, "JWE", error=ValueError)
        protected_b64 = body["protected"]
        if not isinstance(protected_b64, str) or "aad" in body:
            raise DecryptionError
        header = load_json_object(_b64(protected_b64, "protected"), "JWE header", error=ValueError)
        # JOSE header = union of protected, shared and per-recipient headers; the members must be disjoint
        # (RFC 7516 §7.2.1). Trustee puts everything in `protected`; jwcrypto puts `epk` per recipient.
        for extra_name in ("unprotected", "header"):
            extra = body.get(extra_name, {})
            if not isinstance(extra, dict) or header.keys() & extra.keys():
                raise DecryptionError
            header = {**header, **extra}
        if header.get("enc") != _ENC or "crit" in header or "zip" in header:
            raise DecryptionError
        if header.get("alg") != keypair.algorithm.jwe_alg:
            raise DecryptionError
        encrypted_key = _b64(body["encrypted_key"], "encrypted_key")
        iv = _b64(body["iv"], "iv")
        ciphertext = _b64(body["ciphertext"], "ciphertext")
        tag = _b64(body["tag"], "tag")
        if len(iv) != 12 or len(tag) != 16:
            raise DecryptionError
        key = keypair.private_key
        if isinstance(key, rsa.RSAPrivateKey):
            cek = key.decrypt(
                encrypted_key,
                padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
            )
        else:
            crv = "P-256" if keypair.algorithm is KeyAlgorithm.EC_P256 else "P-521"
            epk = _load_epk(header.get("epk"), crv)
            z = key.exchange(ec.ECDH(), epk)
            cek = aes_key_unwrap(_concat_kdf(z, header), encrypted_key)
        if len(cek) != 32:
            raise DecryptionError
        return AESGCM(cek).decrypt(iv, ciphertext + tag, protected_b64.encode("ascii"))
    except DecryptionError:
        raise
    except (ValueError, KeyError, TypeError, InvalidTag, InvalidUnwrap, UnicodeError, AttributeError) as exc:
        raise DecryptionError from exc


def _public_key_from_jwk(jwk: dict[str, Any]) -> tuple[str, ec.EllipticCurvePublicKey | rsa.RSAPublicKey]:
    kty = jwk.get("kty")
    if kty == "RSA" and jwk.get("alg", _RSA_OAEP) == _RSA_OAEP:
        n = int.from_bytes(b64url_decode(jwk["n"], "n", error=ValueError), "big")
        e = int.from_bytes(b64url_decode(jwk["e"], "e", error=ValueError), "big")
        return _RSA_OAEP, rsa.RSAPublicNumbers(e, n).public_key()
    if kty == "EC" and jwk.get("alg", _ECDH) == _ECDH and jwk.get("crv") in _CURVES:
        return _ECDH, _load_epk({"kty": "EC", "crv": jwk["crv"], "x": jwk["x"], "y": jwk["y"]}, jwk["crv"])
    msg = "unsupported tee-pubkey algorithm"
    raise ValueError(msg)


def encrypt(jwk: dict[str, Any], plaintext: bytes) -> bytes:
    """Encrypt `plaintext` to a public JWK as the KBS does (flattened JSON, A256GCM).

    Raises:
        ValueError: if the JWK is not one of the supported key types.
    """
    alg, public = _public_key_from_jwk(jwk)
    cek = AESGCM.generate_key(bit_length=256)
    header: dict[str, Any] = {"alg": alg, "enc": _ENC}
    if isinstance(public, rsa.RSAPublicKey):
        encrypted_key = public.encrypt(
            cek, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        )
    else:
        crv = jwk["crv"]
        curve_cls, size = _CURVES[crv]
        ephemeral = ec.generate_private_key(curve_cls())
        point = ephemeral.public_key().public_numbers()
        header["epk"] = {
            "crv": crv,
            "kty": "EC",
            "x": b64url_encode(_int_bytes(point.x, size)),
            "y": b64url_encode(_int_bytes(point.y, size)),
        }
        z = ephemeral.exchange(ec.ECDH(), public)
        encrypted_key = aes_key_wrap(_concat_kdf(z, header), cek)
    protected = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    iv = secrets.token_bytes(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    body = {
        "protected": protected,
        "encrypted_key": b64url_encode(encrypted_key),
        "iv": b64url_encode(iv),
        "ciphertext": b64url_encode(sealed[:-16]),
        "tag": b64url_encode(sealed[-16:]),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def self_test() -> None:
    """Generate a P-256 key, encrypt to it and decrypt, as a handshake and a fetch do: a fault in the crypto library
    shows here, and its first-use work (curve tables, cipher contexts) is done before a caller waits on it."""
    keypair = TeeKeyPair.generate()
    if decrypt(keypair, encrypt(keypair.public_jwk(), b"self-test")) != b"self-test":
        msg = "the JWE self-test decrypted something else than it encrypted"
        raise DecryptionError(msg)
