"""Encrypt image layers as `skopeo copy --encryption-key provider:NAME[:PARAM]` does. Image owner's side.

Go ocicrypt (`encryption.go`, `blockcipher/blockcipher_aes_ctr.go`): the plain layer blob is encrypted with
AES-256-CTR under a random 32-byte key and 16-byte nonce, authenticated by HMAC-SHA256 (same key) over the
ciphertext; the private options (key, nonce, the plain blob's digest) are wrapped by the key provider's `WrapKey`
(e.g. `cvm_tools.keyprovider.wrap.WrapKeyProvider`) and stored, base64, in the layer annotation
`org.opencontainers.image.enc.keys.provider.<NAME>`; the public options (cipher, HMAC) in
`org.opencontainers.image.enc.pubopts`. The guest decrypts with `agent.image.ocicrypt`.

    with open(plain, "rb") as src, open(encrypted, "wb") as dst:
        layer = await encrypt_layer(src, dst, media_type=desc_media_type, wrap=provider.wrap_key)
    # new descriptor: layer.media_type, layer.digest, layer.size, layer.annotations
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.errors import InvalidRequest
from agent.image.compression import Readable, parse_media_type
from agent.image.ocicrypt import (
    CIPHER,
    DEFAULT_PROVIDER,
    NONCE_SIZE,
    PROVIDER_PREFIX,
    PUBOPTS,
    SYMKEY_SIZE,
    PrivateOptions,
    PublicOptions,
)
from agent.keyprovider import messages
from agent.strictjson import b64encode_std

__all__ = ["EncryptedLayer", "Writable", "encrypt_layer", "encrypted_media_type"]

Wrap = Callable[[bytes], Awaitable[bytes]]


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


def encrypted_media_type(media_type: str) -> str:
    """The media type skopeo gives a layer it encrypts (Docker's gzip type becomes OCI's first)."""
    kind = parse_media_type(media_type)
    if kind.encrypted:
        msg = f"layer media type {media_type!r} is already encrypted"
        raise ValueError(msg)
    if media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip":
        media_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    return media_type + "+encrypted"


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedLayer:
    """The descriptor fields of an encrypted layer: what skopeo writes into the new manifest."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str]


async def encrypt_layer(
    source: Readable,
    sink: Writable,
    *,
    media_type: str,
    wrap: Wrap,
    provider: str = DEFAULT_PROVIDER,
    params: Sequence[bytes] = (b"Enabled",),
    annotations: Mapping[str, str] | None = None,
    chunk_size: int = 1024 * 1024,
    symkey: bytes | None = None,
    nonce: bytes | None = None,
) -> EncryptedLayer:
    """Encrypt one plain layer blob as `skopeo copy --encryption-key provider:<provider>[:<param>]` does.

    Streams `source` (the plain blob) into `sink` (the encrypted blob), then wraps the private options through
    `wrap` (a `WrapKey` implementation taking and returning key-provider JSON; `params` are the PARAM values,
    `b"Enabled"` when none is given). Returns the new descriptor's media type, digest, size and annotations
    (`annotations`, e.g. the original descriptor's, are kept; encryption annotations are added). `symkey` and
    `nonce` are for known-answer tests only; by default both are random, as in ocicrypt.

    Raises:
        InvalidRequest: the provider produced no wrapped key (`no wrapped keys produced by encryption`).
    """
    key = symkey if symkey is not None else secrets.token_bytes(SYMKEY_SIZE)
    iv = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
    if len(key) != SYMKEY_SIZE or len(iv) != NONCE_SIZE:
        msg = f"symkey must be {SYMKEY_SIZE} bytes and nonce {NONCE_SIZE} bytes"
        raise ValueError(msg)
    new_media_type = encrypted_media_type(media_type)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    mac = crypto_hmac.HMAC(key, hashes.SHA256())
    plain_digest = hashlib.sha256()
    blob_digest = hashlib.sha256()
    size = 0
    while chunk := source.read(chunk_size):
        plain_digest.update(chunk)
        encrypted = encryptor.update(chunk)
        mac.update(encrypted)
        blob_digest.update(encrypted)
        sink.write(encrypted)
        size += len(encrypted)
    encryptor.finalize()
    private = PrivateOptions(symkey=key, digest=f"sha256:{plain_digest.hexdigest()}", cipheroptions={"nonce": iv})
    public = PublicOptions(cipher=CIPHER, hmac=mac.finalize(), cipheroptions={})
    reply = await wrap(messages.wrap_request(private.to_json(), {provider: list(params)}))
    wrapped = messages.parse_reply(reply)
    if not wrapped:
        msg = "no wrapped keys produced by encryption"
        raise InvalidRequest(msg)
    result = dict(annotations or {})
    result[PROVIDER_PREFIX + provider] = b64encode_std(wrapped)
    result[PUBOPTS] = b64encode_std(public.to_json())
    return EncryptedLayer(
        media_type=new_media_type, digest=f"sha256:{blob_digest.hexdigest()}", size=size, annotations=result
    )
