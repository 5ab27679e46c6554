"""The KBS handshake's and the layer-key unwrap's primitives from the platform's OpenSSL 3 libcrypto, via ctypes. Pure.

P-256 key generation, import and ECDH, AES-256 key wrap (RFC 3394), AES-256-GCM and AES-256-CTR: everything a TEE
key needs to decrypt an `ECDH-ES+A256KW` / `A256GCM` JWE, and the data hub needs to unwrap an image layer's
annotation packet. The library is the one Python's own `hashlib` and `ssl` are linked against (already mapped in
every agent process: asyncio loads `ssl`), reached through `_hashlib`'s dlopen handle; pyca/cryptography's bundled
copy would add ~10 MiB to a process that only ever does this (docs/decisions.md, 22).

`load()` answers None where that library is not OpenSSL >= 3.0 or lacks a symbol; the callers then use
pyca/cryptography. Nothing here reads files or logs. Every failure raises `ValueError` without saying why (the
error queue is cleared, so no stale OpenSSL error reaches `ssl` or pyca later), and no secret leaves the library
except where a function returns it."""

from __future__ import annotations

import ctypes
import functools
import sys
import weakref
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint, c_ulong, c_void_p

__all__ = [
    "P256Key",
    "aes_ctr",
    "aes_gcm_decrypt",
    "aes_gcm_encrypt",
    "aes_key_unwrap",
    "aes_key_wrap",
    "available",
    "load",
]

_P256_SIZE = 32
_POINT_SIZE = 1 + 2 * _P256_SIZE  # uncompressed SEC1 point: 04 || X || Y
_OSSL_PARAM_UTF8_STRING = 4  # openssl/core.h
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNSIGNED_INTEGER = 2
_EVP_PKEY_PUBLIC_KEY = 0x86  # OSSL_KEYMGMT_SELECT_ALL_PARAMETERS | OSSL_KEYMGMT_SELECT_PUBLIC_KEY
_EVP_PKEY_KEYPAIR = 0x87  # ... | OSSL_KEYMGMT_SELECT_PRIVATE_KEY
_EVP_CTRL_AEAD_GET_TAG = 0x10
_EVP_CTRL_AEAD_SET_TAG = 0x11
_EVP_CIPHER_CTX_FLAG_WRAP_ALLOW = 0x1
_GCM_TAG = 16
_CTR_BLOCK = 16
_GCM_IV = 12  # libcrypto's default GCM IV length
_MAX_INPUT = 1 << 30  # EVP's lengths are C ints

# name -> (restype, argtypes); every function the module calls, declared so ctypes converts and checks arguments
_SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "OpenSSL_version_num": (c_ulong, []),
    "ERR_clear_error": (None, []),
    "ERR_peek_error": (c_ulong, []),
    "EVP_PKEY_CTX_new_from_name": (c_void_p, [c_void_p, c_char_p, c_char_p]),
    "EVP_PKEY_CTX_new": (c_void_p, [c_void_p, c_void_p]),
    "EVP_PKEY_CTX_free": (None, [c_void_p]),
    "EVP_PKEY_keygen_init": (c_int, [c_void_p]),
    "EVP_PKEY_CTX_set_group_name": (c_int, [c_void_p, c_char_p]),
    "EVP_PKEY_generate": (c_int, [c_void_p, POINTER(c_void_p)]),
    "EVP_PKEY_free": (None, [c_void_p]),
    "EVP_PKEY_fromdata_init": (c_int, [c_void_p]),
    "EVP_PKEY_fromdata": (c_int, [c_void_p, POINTER(c_void_p), c_int, c_void_p]),
    "EVP_PKEY_get_octet_string_param": (c_int, [c_void_p, c_char_p, c_void_p, c_size_t, POINTER(c_size_t)]),
    "EVP_PKEY_check": (c_int, [c_void_p]),
    "EVP_PKEY_derive_init": (c_int, [c_void_p]),
    "EVP_PKEY_derive_set_peer_ex": (c_int, [c_void_p, c_void_p, c_int]),
    "EVP_PKEY_derive": (c_int, [c_void_p, c_void_p, POINTER(c_size_t)]),
    "EVP_PKEY_get_bn_param": (c_int, [c_void_p, c_char_p, POINTER(c_void_p)]),
    "BN_bn2binpad": (c_int, [c_void_p, c_void_p, c_int]),
    "BN_clear_free": (None, [c_void_p]),
    "EVP_aes_256_gcm": (c_void_p, []),
    "EVP_aes_256_wrap": (c_void_p, []),
    "EVP_aes_256_ctr": (c_void_p, []),
    "EVP_CIPHER_CTX_new": (c_void_p, []),
    "EVP_CIPHER_CTX_free": (None, [c_void_p]),
    "EVP_CIPHER_CTX_set_flags": (None, [c_void_p, c_int]),
    "EVP_CIPHER_CTX_ctrl": (c_int, [c_void_p, c_int, c_int, c_void_p]),
    "EVP_CipherInit_ex": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int]),
    "EVP_CipherUpdate": (c_int, [c_void_p, c_void_p, POINTER(c_int), c_void_p, c_int]),
    "EVP_CipherFinal_ex": (c_int, [c_void_p, c_void_p, POINTER(c_int)]),
}


def _bind(handle: ctypes.CDLL) -> ctypes.CDLL | None:
    try:
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(handle, name)
            function.restype = restype
            function.argtypes = argtypes
    except AttributeError:  # not OpenSSL 3, or built without exported symbols
        return None
    return handle if handle.OpenSSL_version_num() >= 0x30000000 else None


@functools.cache
def load() -> ctypes.CDLL | None:
    """The libcrypto Python's `_hashlib` is linked against, bound; None where it is not a usable OpenSSL 3."""
    try:
        import _hashlib
    except ImportError:
        return None
    path = getattr(_hashlib, "__file__", None)
    if path is None:  # built into the interpreter: its libcrypto symbols are not ours to reach
        return None
    try:
        # dlsym on this handle searches _hashlib's own dependencies: its libcrypto, already mapped
        return _bind(ctypes.CDLL(path))
    except OSError:
        return None


def available() -> bool:
    """Whether this module can run here; where not, callers use pyca/cryptography."""
    return load() is not None


def _lib() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        msg = "the platform libcrypto is not OpenSSL 3"
        raise ValueError(msg)
    return lib


def _fail(lib: ctypes.CDLL) -> ValueError:
    lib.ERR_clear_error()
    return ValueError("libcrypto operation failed")


class _Param(ctypes.Structure):
    """`OSSL_PARAM` (openssl/core.h): a key, a type, and a borrowed buffer."""

    _fields_ = (
        ("key", c_char_p),
        ("data_type", c_uint),
        ("data", c_char_p),  # void *: only ever a borrowed bytes buffer here
        ("data_size", c_size_t),
        ("return_size", c_size_t),
    )


def _fromdata(lib: ctypes.CDLL, x: bytes, y: bytes, scalar: bytes | None = None) -> int:
    """A P-256 `EVP_PKEY` from its public point, and its private scalar if given. Decoding the point
    (EC_POINT_oct2point) refuses coordinates >= p and points off the curve; P-256's cofactor is 1, so every such
    point is in the prime-order group and libcrypto's further order check (`EVP_PKEY_public_check`) adds nothing
    for a peer's key."""
    if len(x) != _P256_SIZE or len(y) != _P256_SIZE or (scalar is not None and len(scalar) != _P256_SIZE):
        msg = "P-256 coordinates must be 32 bytes each"
        raise ValueError(msg)
    group, point = b"P-256", b"\x04" + x + y
    params = (_Param * 4)(
        _Param(b"group", _OSSL_PARAM_UTF8_STRING, group, len(group), 0),
        _Param(b"pub", _OSSL_PARAM_OCTET_STRING, point, len(point), 0),
    )  # the rest are end markers: NULL keys
    if scalar is not None:  # an OSSL_PARAM integer is in the machine's byte order
        native = scalar if sys.byteorder == "big" else scalar[::-1]
        params[2] = _Param(b"priv", _OSSL_PARAM_UNSIGNED_INTEGER, native, len(native), 0)
    ctx = lib.EVP_PKEY_CTX_new_from_name(None, b"EC", None)
    if not ctx:
        raise _fail(lib)
    try:
        pkey = c_void_p()
        selection = _EVP_PKEY_PUBLIC_KEY if scalar is None else _EVP_PKEY_KEYPAIR
        if (
            lib.EVP_PKEY_fromdata_init(ctx) != 1
            or lib.EVP_PKEY_fromdata(ctx, byref(pkey), selection, params) != 1
            or not pkey.value
        ):
            raise _fail(lib)
        return pkey.value
    finally:
        lib.EVP_PKEY_CTX_free(ctx)


class P256Key:
    """An ephemeral P-256 private key held inside libcrypto (an `EVP_PKEY`), freed with this object."""

    __slots__ = ("__weakref__", "_pkey")

    def __init__(self, pkey: int) -> None:
        self._pkey = pkey
        weakref.finalize(self, _lib().EVP_PKEY_free, pkey)

    @classmethod
    def generate(cls) -> P256Key:
        lib = _lib()
        ctx = lib.EVP_PKEY_CTX_new_from_name(None, b"EC", None)
        if not ctx:
            raise _fail(lib)
        try:
            pkey = c_void_p()
            if (
                lib.EVP_PKEY_keygen_init(ctx) != 1
                or lib.EVP_PKEY_CTX_set_group_name(ctx, b"P-256") != 1
                or lib.EVP_PKEY_generate(ctx, byref(pkey)) != 1
                or not pkey.value
            ):
                raise _fail(lib)
            return cls(pkey.value)
        finally:
            lib.EVP_PKEY_CTX_free(ctx)

    @classmethod
    def from_private(cls, scalar: bytes, x: bytes, y: bytes) -> P256Key:
        """Import a key pair (a PKCS#8 PEM's contents): `ValueError` unless the scalar is in [1, n - 1] and
        (x, y) is its public point (`EVP_PKEY_check`: parameters, public key, private key, pair)."""
        lib = _lib()
        key = cls(_fromdata(lib, x, y, scalar))
        ctx = lib.EVP_PKEY_CTX_new(key._pkey, None)
        if not ctx:
            raise _fail(lib)
        try:
            if lib.EVP_PKEY_check(ctx) != 1:
                raise _fail(lib)
        finally:
            lib.EVP_PKEY_CTX_free(ctx)
        return key

    def public_point(self) -> tuple[bytes, bytes]:
        """The public key's affine coordinates, 32 big-endian bytes each."""
        lib = _lib()
        point = ctypes.create_string_buffer(_POINT_SIZE)
        length = c_size_t(0)
        if (
            lib.EVP_PKEY_get_octet_string_param(self._pkey, b"encoded-pub-key", point, _POINT_SIZE, byref(length)) != 1
            or length.value != _POINT_SIZE
            or point.raw[0] != 4
        ):
            raise _fail(lib)
        return point.raw[1 : 1 + _P256_SIZE], point.raw[1 + _P256_SIZE :]

    def exchange(self, x: bytes, y: bytes) -> bytes:
        """ECDH with the peer point (x, y): the 32-byte shared secret. `ValueError` if the point is not a valid
        P-256 public key."""
        lib = _lib()
        peer = _fromdata(lib, x, y)
        try:
            ctx = lib.EVP_PKEY_CTX_new(self._pkey, None)
            if not ctx:
                raise _fail(lib)
            try:
                secret = ctypes.create_string_buffer(_P256_SIZE)
                length = c_size_t(_P256_SIZE)
                if (
                    lib.EVP_PKEY_derive_init(ctx) != 1
                    or lib.EVP_PKEY_derive_set_peer_ex(ctx, peer, 0) != 1  # validated by `_fromdata`
                    or lib.EVP_PKEY_derive(ctx, secret, byref(length)) != 1
                    or length.value != _P256_SIZE
                ):
                    raise _fail(lib)
                return secret.raw
            finally:
                lib.EVP_PKEY_CTX_free(ctx)
        finally:
            lib.EVP_PKEY_free(peer)

    def private_scalar(self) -> bytes:
        """The private scalar, 32 big-endian bytes: secret material, for exporting the key (GetToken's PEM)."""
        lib = _lib()
        bn = c_void_p()
        if lib.EVP_PKEY_get_bn_param(self._pkey, b"priv", byref(bn)) != 1 or not bn.value:
            raise _fail(lib)
        try:
            out = ctypes.create_string_buffer(_P256_SIZE)
            if lib.BN_bn2binpad(bn, out, _P256_SIZE) != _P256_SIZE:
                raise _fail(lib)
            return out.raw
        finally:
            lib.BN_clear_free(bn)

    def __repr__(self) -> str:
        return "P256Key(<private key>)"


class _Cipher:
    """One EVP_CIPHER_CTX, freed on exit."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.ctx = lib.EVP_CIPHER_CTX_new()
        if not self.ctx:
            raise _fail(lib)

    def __enter__(self) -> _Cipher:
        return self

    def __exit__(self, *_: object) -> None:
        self.lib.EVP_CIPHER_CTX_free(self.ctx)

    def update(self, out: ctypes.Array[ctypes.c_char] | None, data: bytes) -> int:
        written = c_int(0)
        if self.lib.EVP_CipherUpdate(self.ctx, out, byref(written), data, len(data)) != 1:
            raise _fail(self.lib)
        return written.value


def _check_key(key: bytes) -> None:
    if len(key) != 32:
        msg = "AES-256 keys are 32 bytes"
        raise ValueError(msg)


def _wrap(kek: bytes, data: bytes, *, encrypt: bool) -> bytes:
    _check_key(kek)
    if len(data) % 8 or len(data) < (16 if encrypt else 24) or len(data) > _MAX_INPUT:
        msg = "key wrap input must be a multiple of 8 bytes, at least two blocks"
        raise ValueError(msg)
    lib = _lib()
    size = len(data) + 8 if encrypt else len(data) - 8
    with _Cipher(lib) as cipher:
        lib.EVP_CIPHER_CTX_set_flags(cipher.ctx, _EVP_CIPHER_CTX_FLAG_WRAP_ALLOW)
        if lib.EVP_CipherInit_ex(cipher.ctx, lib.EVP_aes_256_wrap(), None, kek, None, int(encrypt)) != 1:
            raise _fail(lib)
        out = ctypes.create_string_buffer(size)
        if cipher.update(out, data) != size:
            raise _fail(lib)
        return out.raw


def aes_key_wrap(kek: bytes, key: bytes) -> bytes:
    """RFC 3394 wrap of `key` under the 256-bit `kek` (JWE `A256KW`)."""
    return _wrap(kek, key, encrypt=True)


def aes_key_unwrap(kek: bytes, wrapped: bytes) -> bytes:
    """RFC 3394 unwrap; `ValueError` if the integrity check fails."""
    return _wrap(kek, wrapped, encrypt=False)


def _gcm(
    cipher: _Cipher, key: bytes, iv: bytes, aad: bytes, data: bytes, *, encrypt: bool
) -> ctypes.Array[ctypes.c_char]:
    _check_key(key)
    if len(iv) != _GCM_IV or len(data) > _MAX_INPUT or len(aad) > _MAX_INPUT:
        msg = "AES-GCM takes a 96-bit IV (as JWE requires) and inputs under 1 GiB"
        raise ValueError(msg)
    lib = cipher.lib
    if (
        lib.EVP_CipherInit_ex(cipher.ctx, lib.EVP_aes_256_gcm(), None, None, None, int(encrypt)) != 1
        or lib.EVP_CipherInit_ex(cipher.ctx, None, None, key, iv, int(encrypt)) != 1
    ):
        raise _fail(lib)
    if aad:
        cipher.update(None, aad)
    out = ctypes.create_string_buffer(len(data) + _GCM_TAG)
    if cipher.update(out, data) != len(data):
        raise _fail(lib)
    return out


def aes_gcm_encrypt(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ciphertext || 16-byte tag."""
    lib = _lib()
    with _Cipher(lib) as cipher:
        out = _gcm(cipher, key, iv, aad, plaintext, encrypt=True)
        tail = c_int(0)
        tag = ctypes.create_string_buffer(_GCM_TAG)
        if (
            lib.EVP_CipherFinal_ex(cipher.ctx, tag, byref(tail)) != 1
            or tail.value != 0
            or lib.EVP_CIPHER_CTX_ctrl(cipher.ctx, _EVP_CTRL_AEAD_GET_TAG, _GCM_TAG, tag) != 1
        ):
            raise _fail(lib)
        return ctypes.string_at(out, len(plaintext)) + tag.raw  # one copy of the message


def aes_gcm_decrypt(key: bytes, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
    """AES-256-GCM; `ValueError` unless the 16-byte `tag` authenticates `aad` and `ciphertext`. Nothing of the
    plaintext is returned before the tag is checked."""
    if len(tag) != _GCM_TAG:
        msg = "AES-GCM tags are 16 bytes"
        raise ValueError(msg)
    lib = _lib()
    with _Cipher(lib) as cipher:
        out = _gcm(cipher, key, iv, aad, ciphertext, encrypt=False)
        tail = c_int(0)
        if (
            lib.EVP_CIPHER_CTX_ctrl(cipher.ctx, _EVP_CTRL_AEAD_SET_TAG, _GCM_TAG, tag) != 1
            or lib.EVP_CipherFinal_ex(cipher.ctx, ctypes.addressof(out) + len(ciphertext), byref(tail)) != 1
            or tail.value != 0
        ):
            ctypes.memset(out, 0, len(ciphertext))
            raise _fail(lib)
        return ctypes.string_at(out, len(ciphertext))  # one copy of the message


def aes_ctr(key: bytes, counter: bytes, data: bytes) -> bytes:
    """AES-256-CTR from the 16-byte initial counter block (encrypting and decrypting are the same operation)."""
    _check_key(key)
    if len(counter) != _CTR_BLOCK or len(data) > _MAX_INPUT:
        msg = "AES-CTR takes a 16-byte counter block and inputs under 1 GiB"
        raise ValueError(msg)
    lib = _lib()
    with _Cipher(lib) as cipher:
        if lib.EVP_CipherInit_ex(cipher.ctx, lib.EVP_aes_256_ctr(), None, key, counter, 1) != 1:
            raise _fail(lib)
        out = ctypes.create_string_buffer(len(data) + _CTR_BLOCK)
        if cipher.update(out, data) != len(data):
            raise _fail(lib)
        return ctypes.string_at(out, len(data))
