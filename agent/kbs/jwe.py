"""Ephemeral TEE key pairs, their canonical JWK, and JWE (RFC 7516 flattened JSON) for KBS responses. Pure.

What the KBS does (kbs-protocol.md §6): it encrypts each resource to the `tee-pubkey` from the attestation token
with `enc = A256GCM` and one of `ECDH-ES+A256KW` (P-256, P-521) or `RSA-OAEP-256`; the AAD is the ASCII of the
`protected` member exactly as sent.

`decrypt()` allow-lists the algorithm that matches the key, checks the header, and turns every failure into one
opaque `DecryptionError`. `encrypt()` exists for the development KBS, the self-test and tests.

Two crypto backends, one behaviour (docs/decisions.md, 22): the default P-256 key and the symmetric steps (AES key
unwrap, AES-GCM) use the platform libcrypto (`agent.libcrypto`) where it is OpenSSL 3; P-521, RSA, keys loaded from
PEM, and any platform without it use pyca/cryptography, imported on first use only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import libcrypto
from agent.errors import DecryptionError
from agent.kbs.keyalg import ECDH_ES_A256KW, RSA_OAEP_256, KeyAlgorithm
from agent.strictjson import b64url_decode, b64url_encode, load_json_object

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["KeyAlgorithm", "TeeKeyPair", "decrypt", "encrypt"]

_ENC = "A256GCM"
_ECDH = ECDH_ES_A256KW
_RSA_OAEP = RSA_OAEP_256
_MAX_JWE_BYTES = 64 * 1024 * 1024
_SIZES = {"P-256": 32, "P-521": 66}  # coordinate bytes per curve
# A P-256 key in PKCS#8 (RFC 5208: version 0, id-ecPublicKey with prime256v1) around an RFC 5915 ECPrivateKey
# (version 1, the scalar, no parameters, the public point): the one form OpenSSL, pyca and RustCrypto write.
# DER: _P256_PKCS8_HEAD || scalar (32) || _P256_PKCS8_MID || 04 || X || Y.
_P256_PKCS8_HEAD = bytes.fromhex("308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420")
_P256_PKCS8_MID = bytes.fromhex("a14403420004")
_P256_PKCS8_SIZE = len(_P256_PKCS8_HEAD) + 32 + len(_P256_PKCS8_MID) + 64
_PEM_HEADER, _PEM_FOOTER = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


def _b64(value: object, what: str) -> bytes:
    # kbs-protocol.md §6.2: the KBS writes no padding; a client may accept both
    return b64url_decode(value, what, error=ValueError, padded=True)


def _int_bytes(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def _native() -> bool:
    return libcrypto.load() is not None


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


def _oaep() -> Any:
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
        if algorithm is KeyAlgorithm.EC_P256 and _native():
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
        parts = _p256_pkcs8_parts(pem) if _native() else None
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
                return {"kty": "RSA", "alg": _RSA_OAEP, "n": b64url_encode(n), "e": b64url_encode(e)}
            point = key.public_key().public_numbers()
            x, y = _int_bytes(point.x, _SIZES[self.crv]), _int_bytes(point.y, _SIZES[self.crv])
        return {"kty": "EC", "crv": self.crv, "alg": _ECDH, "x": b64url_encode(x), "y": b64url_encode(y)}

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

    def __repr__(self) -> str:
        return f"TeeKeyPair({self.algorithm.value}, <private key>)"


def _concat_kdf(z: bytes, header: dict[str, Any]) -> bytes:
    """RFC 7518 §4.6.2 Concat KDF for ECDH-ES+A256KW: a 256-bit KEK is one SHA-256 round (NIST SP 800-56A)."""
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
    return hashlib.sha256(struct.pack(">I", 1) + z + other_info).digest()


def _point(jwk: object, crv: str) -> tuple[bytes, bytes]:
    """The (x, y) of an EC JWK on curve `crv`, each exactly the curve's size; not yet checked to be on the curve."""
    if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != crv:
        msg = "epk does not match the key"
        raise ValueError(msg)
    x, y = _b64(jwk.get("x"), "x"), _b64(jwk.get("y"), "y")
    if len(x) != _SIZES[crv] or len(y) != _SIZES[crv]:
        msg = "epk coordinates have the wrong length"
        raise ValueError(msg)
    return x, y


def _pyca_public(crv: str, x: bytes, y: bytes) -> ec.EllipticCurvePublicKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), _curve(crv))
    return numbers.public_key()  # validates the point is on the curve


def _ecdh(key: libcrypto.P256Key | ec.EllipticCurvePrivateKey, crv: str, x: bytes, y: bytes) -> bytes:
    """The ECDH shared secret with the peer point (x, y); `ValueError` if it is not on the curve."""
    if isinstance(key, libcrypto.P256Key):
        return key.exchange(x, y)
    from cryptography.hazmat.primitives.asymmetric import ec

    return key.exchange(ec.ECDH(), _pyca_public(crv, x, y))


def _cek(keypair: TeeKeyPair, header: dict[str, Any], encrypted_key: bytes) -> bytes:
    """The content-encryption key: RSA-OAEP-256 decryption, or ECDH-ES with the header's `epk` and A256KW unwrap."""
    key = keypair.private_key
    if not isinstance(key, libcrypto.P256Key):
        from cryptography.hazmat.primitives.asymmetric import rsa  # loaded already: the key is pyca's

        if isinstance(key, rsa.RSAPrivateKey):
            return key.decrypt(encrypted_key, _oaep())
    x, y = _point(header.get("epk"), keypair.crv)
    return _unwrap(_concat_kdf(_ecdh(key, keypair.crv, x, y), header), encrypted_key)


def _unwrap(kek: bytes, wrapped: bytes) -> bytes:
    if _native():
        return libcrypto.aes_key_unwrap(kek, wrapped)
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

    try:
        return aes_key_unwrap(kek, wrapped)
    except InvalidUnwrap as exc:
        raise ValueError from exc


def _wrap(kek: bytes, cek: bytes) -> bytes:
    if _native():
        return libcrypto.aes_key_wrap(kek, cek)
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    return aes_key_wrap(kek, cek)


def _open(cek: bytes, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
    if _native():
        return libcrypto.aes_gcm_decrypt(cek, iv, ciphertext, tag, aad)
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(cek).decrypt(iv, ciphertext + tag, aad)
    except InvalidTag as exc:
        raise ValueError from exc


def _seal(cek: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    if _native():
        return libcrypto.aes_gcm_encrypt(cek, iv, plaintext, aad)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(cek).encrypt(iv, plaintext, aad)


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
        cek = _cek(keypair, header, encrypted_key)
        if len(cek) != 32:
            raise DecryptionError
        return _open(cek, iv, ciphertext, tag, protected_b64.encode("ascii"))
    except DecryptionError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # the backends raise ValueError for bad crypto
        raise DecryptionError from exc


def encrypt(jwk: dict[str, Any], plaintext: bytes) -> bytes:
    """Encrypt `plaintext` to a public JWK as the KBS does (flattened JSON, A256GCM).

    Raises:
        ValueError: if the JWK is not one of the supported key types.
    """
    cek = secrets.token_bytes(32)
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA" and jwk.get("alg", _RSA_OAEP) == _RSA_OAEP:
        from cryptography.hazmat.primitives.asymmetric import rsa

        n = int.from_bytes(b64url_decode(jwk["n"], "n", error=ValueError), "big")
        e = int.from_bytes(b64url_decode(jwk["e"], "e", error=ValueError), "big")
        header: dict[str, Any] = {"alg": _RSA_OAEP, "enc": _ENC}
        encrypted_key = rsa.RSAPublicNumbers(e, n).public_key().encrypt(cek, _oaep())
    elif kty == "EC" and jwk.get("alg", _ECDH) == _ECDH and isinstance(crv, str) and crv in _SIZES:
        x, y = _point({"kty": "EC", "crv": crv, "x": jwk.get("x"), "y": jwk.get("y")}, crv)
        ephemeral = TeeKeyPair.generate(KeyAlgorithm.EC_P256 if crv == "P-256" else KeyAlgorithm.EC_P521)
        epk = ephemeral.public_jwk()
        header = {"alg": _ECDH, "enc": _ENC}
        header["epk"] = {"crv": crv, "kty": "EC", "x": epk["x"], "y": epk["y"]}
        z = _ecdh(ephemeral.private_key, crv, x, y)  # type: ignore[arg-type]  # an EC key: generated for a curve
        encrypted_key = _wrap(_concat_kdf(z, header), cek)
    else:
        msg = "unsupported tee-pubkey algorithm"
        raise ValueError(msg)
    protected = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    iv = secrets.token_bytes(12)
    sealed = _seal(cek, iv, plaintext, protected.encode("ascii"))
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
