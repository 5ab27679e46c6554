"""JWE (RFC 7516 flattened JSON) for KBS responses, to and from a TEE key pair (`agent.kbs.teekey`). Pure.

What the KBS does (kbs-protocol.md §6): it encrypts each resource to the `tee-pubkey` from the attestation token
with `enc = A256GCM` and one of `ECDH-ES+A256KW` (P-256, P-521) or `RSA-OAEP-256`; the AAD is the ASCII of the
`protected` member exactly as sent.

`decrypt()` allow-lists the algorithm that matches the key, checks the header, and turns every failure into one
opaque `DecryptionError`. `encrypt()` exists for the development KBS, the self-test and tests.

The Concat KDF is one SHA-256 (`hashlib`); AES key unwrap and AES-GCM are `agent.aes`'s, which picks the platform
libcrypto or pyca/cryptography (docs/decisions.md, 22).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
from typing import Any

from agent import aes
from agent.errors import DecryptionError
from agent.kbs.keyalg import ECDH_ES_A256KW, RSA_OAEP_256, KeyAlgorithm
from agent.kbs.teekey import SIZES, TeeKeyPair, oaep
from agent.strictjson import b64url_decode, b64url_encode, load_json_object

__all__ = ["KeyAlgorithm", "TeeKeyPair", "decrypt", "encrypt"]

_ENC = "A256GCM"
_ECDH = ECDH_ES_A256KW
_RSA_OAEP = RSA_OAEP_256
_MAX_JWE_BYTES = 64 * 1024 * 1024
_WRAPPED_CEK_BYTES = 32 + 8  # A256KW of the A256GCM key: the key and RFC 3394's integrity block


def _b64(value: object, what: str) -> bytes:
    # kbs-protocol.md §6.2: the KBS writes no padding; a client may accept both
    return b64url_decode(value, what, error=ValueError, padded=True)


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
    if len(x) != SIZES[crv] or len(y) != SIZES[crv]:
        msg = "epk coordinates have the wrong length"
        raise ValueError(msg)
    return x, y


def _cek(keypair: TeeKeyPair, header: dict[str, Any], encrypted_key: bytes) -> bytes:
    """The content-encryption key: RSA-OAEP-256 decryption, or ECDH-ES with the header's `epk` and A256KW unwrap."""
    if keypair.algorithm is KeyAlgorithm.RSA_OAEP_256:
        return keypair.decrypt_oaep(encrypted_key)
    if len(encrypted_key) != _WRAPPED_CEK_BYTES:  # before any ECDH: a 256-bit CEK wraps to exactly 40 bytes
        msg = "encrypted_key is not a wrapped 256-bit key"
        raise ValueError(msg)
    x, y = _point(header.get("epk"), keypair.crv)
    return aes.key_unwrap(_concat_kdf(keypair.exchange(x, y), header), encrypted_key)


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
        return aes.gcm_decrypt(cek, iv, ciphertext, tag, protected_b64.encode("ascii"))
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
        encrypted_key = rsa.RSAPublicNumbers(e, n).public_key().encrypt(cek, oaep())
    elif kty == "EC" and jwk.get("alg", _ECDH) == _ECDH and isinstance(crv, str) and crv in SIZES:
        x, y = _point({"kty": "EC", "crv": crv, "x": jwk.get("x"), "y": jwk.get("y")}, crv)
        ephemeral = TeeKeyPair.generate(KeyAlgorithm.EC_P256 if crv == "P-256" else KeyAlgorithm.EC_P521)
        epk = ephemeral.public_jwk()
        header = {"alg": _ECDH, "enc": _ENC}
        header["epk"] = {"crv": crv, "kty": "EC", "x": epk["x"], "y": epk["y"]}
        z = ephemeral.exchange(x, y)
        encrypted_key = aes.key_wrap(_concat_kdf(z, header), cek)
    else:
        msg = "unsupported tee-pubkey algorithm"
        raise ValueError(msg)
    protected = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    iv = secrets.token_bytes(12)
    sealed = aes.gcm_encrypt(cek, iv, plaintext, protected.encode("ascii"))
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
