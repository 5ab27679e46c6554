"""AES-256 for the agent's secrets: GCM, key wrap (RFC 3394) and CTR, on one backend chosen in one place. Pure.

The platform libcrypto (`agent.libcrypto`) where it is OpenSSL 3, else pyca/cryptography, imported at first use
(docs/decisions.md, 22). Both backends take the same inputs and fail the same way: `ValueError`, with no detail,
for a tag or an unwrap integrity check that does not verify.
"""

from __future__ import annotations

from agent import libcrypto

__all__ = ["ctr", "gcm_decrypt", "gcm_encrypt", "key_unwrap", "key_wrap"]


def gcm_encrypt(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Ciphertext || 16-byte tag under a 32-byte key and a 12-byte IV."""
    if libcrypto.available():
        return libcrypto.aes_gcm_encrypt(key, iv, plaintext, aad)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).encrypt(iv, plaintext, aad)


def gcm_decrypt(key: bytes, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
    """The plaintext; `ValueError` unless the 16-byte tag verifies. Ciphertext and tag apart: a JWE carries them
    so, and libcrypto takes them so, without a copy of a large resource."""
    if libcrypto.available():
        return libcrypto.aes_gcm_decrypt(key, iv, ciphertext, tag, aad)
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(tag) != 16:  # pyca takes ciphertext || tag: a shorter tag would shift into the ciphertext
        raise ValueError
    try:
        return AESGCM(key).decrypt(iv, ciphertext + tag, aad)
    except InvalidTag as exc:
        raise ValueError from exc


def key_wrap(kek: bytes, key: bytes) -> bytes:
    """RFC 3394 wrap under a 32-byte KEK (JWE `A256KW`)."""
    if libcrypto.available():
        return libcrypto.aes_key_wrap(kek, key)
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    return aes_key_wrap(kek, key)


def key_unwrap(kek: bytes, wrapped: bytes) -> bytes:
    """RFC 3394 unwrap; `ValueError` unless the integrity check passes."""
    if libcrypto.available():
        return libcrypto.aes_key_unwrap(kek, wrapped)
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

    try:
        return aes_key_unwrap(kek, wrapped)
    except InvalidUnwrap as exc:
        raise ValueError from exc


def ctr(key: bytes, counter: bytes, data: bytes) -> bytes:
    """AES-256-CTR from a 16-byte initial counter block (encrypting and decrypting are the same operation)."""
    if libcrypto.available():
        return libcrypto.aes_ctr(key, counter, data)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    cipher = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    return cipher.update(data) + cipher.finalize()
