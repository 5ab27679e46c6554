"""ocicrypt's layer encryption, as Go ocicrypt (skopeo) and ocicrypt-rs (image-rs) do it. Pure.

An encrypted layer (media type `…tar[+gzip|+zstd]+encrypted`) is the plain layer blob encrypted with
AES-256-CTR under a random 32-byte `symkey` and a random 16-byte initial counter block (`nonce`, used as one
128-bit big-endian counter), authenticated by HMAC-SHA256 keyed with the same `symkey` over the *ciphertext*
(encrypt-then-MAC; Go `blockcipher/blockcipher_aes_ctr.go`). Two layer annotations carry the rest:

- `org.opencontainers.image.enc.pubopts`: base64 of the public options, Go `json.Marshal` of
  `{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":"<b64>","cipheroptions":{}}`;
- `org.opencontainers.image.enc.keys.provider.<name>`: base64 of what the key provider returned when it wrapped
  the private options `{"symkey":"<b64>","digest":"<source layer digest>","cipheroptions":{"nonce":"<b64>"}}`
  (several wrapped keys under one scheme are joined with `,`).

Decrypting: each wrapped key is sent, as an ocicrypt-rs `keyunwrap` request, to `unwrap` (the data hub's own
`UnWrapKey`, which fetches the KEK from the KBS through the attested session); the first reply that yields
usable options wins. `LayerDecryptor.reader()` then streams the plaintext. What is verified, and when:

- the HMAC over the whole ciphertext, compared in constant time when the ciphertext ends (`DecryptionError`,
  no detail). Until then the plaintext is **unauthenticated**: callers must write it only where a failure
  removes it (the layer store unpacks into a staging directory that is deleted unless everything verified);
- the private options' `digest` is **not** checked against the plaintext, as neither Go ocicrypt's users nor
  image-rs check it: containers/image passes the *source* descriptor's digest to `EncryptLayer`, taken before
  its compression step, so a layer skopeo recompressed (an uncompressed `docker-archive` source pushed gzip'd,
  `--dest-compress-format`) legitimately carries another digest. The layer's content is bound by the HMAC and,
  after decompression, by the image config's diff_id (checked by the layer store);
- a `nonce` in the public options is honoured before the private one, as Go's `GetOpt` does.

The owner side (`skopeo copy --encryption-key provider:NAME`) is `cvm_tools.keyprovider.encrypt`, outside the
guest package; it serialises the options with `PublicOptions.to_json` / `PrivateOptions.to_json` from here.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.errors import AgentError, DecryptionError, InvalidRequest, LayerError, NotSupported
from agent.image.compression import Readable, parse_media_type
from agent.keyprovider import messages
from agent.strictjson import b64decode_std, b64encode_std, load_json_object

__all__ = [
    "CIPHER",
    "KEYS_PREFIX",
    "PROVIDER_PREFIX",
    "PUBOPTS",
    "DEFAULT_PROVIDER",
    "SYMKEY_SIZE",
    "NONCE_SIZE",
    "PublicOptions",
    "PrivateOptions",
    "parse_public_options",
    "parse_private_options",
    "LayerDecryptor",
    "DecryptingReader",
    "wrapped_keys",
    "layer_decryptor",
    "decrypted_media_type",
]

CIPHER = "AES_256_CTR_HMAC_SHA256"
KEYS_PREFIX = "org.opencontainers.image.enc.keys."
PROVIDER_PREFIX = KEYS_PREFIX + "provider."
PUBOPTS = "org.opencontainers.image.enc.pubopts"
DEFAULT_PROVIDER = "attestation-agent"
"""The provider name guest images carry (keyprovider.md §2), kept by the reference for historical reasons."""

SYMKEY_SIZE = 32
NONCE_SIZE = 16
MAX_OPTIONS_SIZE = 64 * 1024
MAX_WRAPPED_KEYS = 16

Unwrap = Callable[[bytes], Awaitable[bytes]]


@dataclass(frozen=True, slots=True, kw_only=True)
class PublicOptions:
    """`org.opencontainers.image.enc.pubopts` decoded."""

    cipher: str
    hmac: bytes
    cipheroptions: Mapping[str, bytes] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """Go `json.Marshal(PublicLayerBlockCipherOptions)`: struct field order, map keys sorted."""
        return _go_json(
            {"cipher": self.cipher, "hmac": b64encode_std(self.hmac), "cipheroptions": _b64_map(self.cipheroptions)}
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivateOptions:
    """The wrapped secret: the layer key, the source layer's digest and the cipher options (the nonce)."""

    symkey: bytes = field(repr=False)
    digest: str
    cipheroptions: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    def to_json(self) -> bytes:
        """Go `json.Marshal(PrivateLayerBlockCipherOptions)`: struct field order, map keys sorted."""
        return _go_json(
            {
                "symkey": b64encode_std(self.symkey),
                "digest": self.digest,
                "cipheroptions": _b64_map(self.cipheroptions),
            }
        )


def _go_json(obj: object) -> bytes:
    # Go escapes <, > and & in strings; base64 text and digests never hold them, so plain dumps matches.
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _b64_map(values: Mapping[str, bytes]) -> dict[str, str]:
    return {key: b64encode_std(values[key]) for key in sorted(values)}


def parse_public_options(data: bytes) -> PublicOptions:
    """Decode the public options JSON (Go decodes missing members as zero values; so does this)."""
    obj = _options_object(data, "layer public options (pubopts)")
    cipher = obj.get("cipher", "")
    if not isinstance(cipher, str):
        msg = "layer public options `cipher` is not a string, expected 'AES_256_CTR_HMAC_SHA256'"
        raise LayerError(msg)
    return PublicOptions(
        cipher=cipher,
        hmac=_bytes_member(obj, "hmac", "layer public options"),
        cipheroptions=_bytes_map(obj, "cipheroptions", "layer public options"),
    )


def parse_private_options(data: bytes) -> PrivateOptions:
    """Decode the unwrapped private options JSON. Messages never show the key."""
    obj = _options_object(data, "unwrapped layer options")
    digest = obj.get("digest", "")
    if not isinstance(digest, str):
        msg = "unwrapped layer options `digest` is not a string, expected '<algorithm>:<hex>'"
        raise LayerError(msg)
    return PrivateOptions(
        symkey=_bytes_member(obj, "symkey", "unwrapped layer options"),
        digest=digest,
        cipheroptions=_bytes_map(obj, "cipheroptions", "unwrapped layer options"),
    )


def _options_object(data: bytes, what: str) -> dict[str, object]:
    return load_json_object(data, what, error=LayerError, max_bytes=MAX_OPTIONS_SIZE)


def _bytes_member(obj: Mapping[str, object], key: str, what: str) -> bytes:
    value = obj.get(key)
    if value is None:
        return b""
    if not isinstance(value, str):
        msg = f"{what} `{key}` is not a base64 string"
        raise LayerError(msg)
    try:
        return b64decode_std(value, f"{what} `{key}`")
    except InvalidRequest as exc:
        raise LayerError(str(exc)) from None


def _bytes_map(obj: Mapping[str, object], key: str, what: str) -> dict[str, bytes]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        msg = f"{what} `{key}` is not an object"
        raise LayerError(msg)
    return {name: _bytes_member(value, name, f"{what} `{key}`") for name in value}


# --- media types ----------------------------------------------------------------------------------------


def decrypted_media_type(media_type: str) -> str:
    """The plain media type of an encrypted layer (`…+encrypted` removed)."""
    if not parse_media_type(media_type).encrypted:
        msg = f"layer media type {media_type!r} is not encrypted"
        raise ValueError(msg)
    return media_type[: -len("+encrypted")]


# --- decryption -----------------------------------------------------------------------------------------


def wrapped_keys(annotations: Mapping[str, str], providers: Collection[str] = (DEFAULT_PROVIDER,)) -> list[bytes]:
    """The wrapped keys (annotation packets) the named key providers can unwrap, in annotation order.

    Raises:
        NotSupported: the layer is wrapped only for schemes this agent does not serve (jwe, pgp, pkcs7,
            pkcs11 or another provider).
        LayerError: no wrapped key at all, or an annotation that is not base64.
    """
    found: list[bytes] = []
    others: list[str] = []
    for key, value in annotations.items():
        if not key.startswith(KEYS_PREFIX) or not value:
            continue
        if key.startswith(PROVIDER_PREFIX) and key[len(PROVIDER_PREFIX) :] in providers:
            for part in value.split(","):
                try:
                    found.append(b64decode_std(part, f"layer annotation `{key}`"))
                except InvalidRequest as exc:
                    raise LayerError(str(exc)) from None
        else:
            others.append(key[len(KEYS_PREFIX) :])
    if len(found) > MAX_WRAPPED_KEYS:
        msg = f"encrypted layer carries {len(found)} wrapped keys, expected at most {MAX_WRAPPED_KEYS}"
        raise LayerError(msg)
    if not found:
        if others:
            msg = (
                f"encrypted layer is wrapped for {', '.join(sorted(others))[:200]}, expected key provider "
                f"{', '.join(sorted(providers))}"
            )
            raise NotSupported(msg)
        msg = f"encrypted layer has no `{PROVIDER_PREFIX}<name>` annotation, expected a wrapped layer key"
        raise LayerError(msg)
    return found


async def layer_decryptor(
    annotations: Mapping[str, str],
    unwrap: Unwrap,
    *,
    providers: Collection[str] = (DEFAULT_PROVIDER,),
) -> LayerDecryptor:
    """Unwrap an encrypted layer's key through `unwrap` and return its decryptor.

    `unwrap` takes a key-provider request document and returns the reply document, as the `UnWrapKey` RPC does
    (`agent.service.DataHub.unwrap_key`). Each wrapped key is tried in order; the error of the last attempt is
    raised if none works (its type kept, so a KBS outage stays UNAVAILABLE).

    Raises:
        NotSupported, LayerError: see `wrapped_keys`; bad public options; a cipher other than
            AES_256_CTR_HMAC_SHA256.
        DecryptionError, KbsError, InvalidRequest: from the unwrap path.
    """
    packets = wrapped_keys(annotations, providers)
    public = parse_public_options(_pubopts(annotations))
    last: AgentError | None = None
    for packet in packets:
        try:
            reply = await unwrap(messages.unwrap_request(packet))
            optsdata = messages.parse_reply(reply)
        except AgentError as exc:
            last = exc
            continue
        return LayerDecryptor(parse_private_options(optsdata), public)
    assert last is not None
    raise last


def _pubopts(annotations: Mapping[str, str]) -> bytes:
    text = annotations.get(PUBOPTS, "")
    if not text:
        return b"{}"  # Go: json.Marshal of the zero options; the missing HMAC is refused below
    try:
        return b64decode_std(text, f"layer annotation `{PUBOPTS}`")
    except InvalidRequest as exc:
        raise LayerError(str(exc)) from None


class LayerDecryptor:
    """The unwrapped options of one encrypted layer; `reader()` streams its plaintext."""

    def __init__(self, private: PrivateOptions, public: PublicOptions) -> None:
        if public.cipher != CIPHER:
            got = repr(public.cipher[:40]) if public.cipher else "missing"
            msg = f"layer cipher is {got}, expected {CIPHER!r}"
            raise NotSupported(msg) if public.cipher else LayerError(msg)
        if len(private.symkey) != SYMKEY_SIZE:
            msg = f"layer key is {len(private.symkey)} bytes, expected {SYMKEY_SIZE}"
            raise LayerError(msg)
        nonce = public.cipheroptions.get("nonce", private.cipheroptions.get("nonce"))
        if nonce is None or len(nonce) != NONCE_SIZE:
            got = "missing" if nonce is None else f"{len(nonce)} bytes"
            msg = f"layer cipher option `nonce` is {got}, expected {NONCE_SIZE} bytes"
            raise LayerError(msg)
        if not public.hmac:
            msg = "layer public options carry no `hmac`, expected the HMAC-SHA256 of the ciphertext"
            raise LayerError(msg)
        self._symkey = private.symkey
        self._nonce = nonce
        self._hmac = public.hmac
        self.digest = private.digest
        """The source descriptor's digest the encrypting tool recorded (informational, see the module docstring)."""

    def reader(self, source: Readable) -> DecryptingReader:
        """The plaintext of the ciphertext `source`; see `DecryptingReader`."""
        return DecryptingReader(source, self._symkey, self._nonce, self._hmac)


class DecryptingReader:
    """AES-256-CTR plaintext of a ciphertext stream, authenticated when the ciphertext ends.

    `read(n)` returns at most `n` plaintext bytes. When the source is exhausted the HMAC is checked before `b""`
    is returned; a failure raises (and keeps raising) instead. `verified` tells whether
    that point was reached successfully; `finish()` reads any rest and makes sure it was.
    """

    def __init__(self, source: Readable, symkey: bytes, nonce: bytes, expected_hmac: bytes) -> None:
        self._source = source
        self._decryptor = Cipher(algorithms.AES(symkey), modes.CTR(nonce)).decryptor()
        self._mac = crypto_hmac.HMAC(symkey, hashes.SHA256())
        self._expected = expected_hmac
        self._failed: AgentError | None = None
        self.verified = False
        self.ciphertext_size = 0

    def read(self, size: int = -1, /) -> bytes:
        if self._failed is not None:
            raise self._failed
        if self.verified:
            return b""
        if size < 0:
            msg = "read() needs a size: layers are streamed, never read whole"
            raise ValueError(msg)
        data = self._source.read(size) if size else b""
        if not data:
            if size:
                self._verify()
            return b""
        self.ciphertext_size += len(data)
        self._mac.update(data)
        return self._decryptor.update(data)

    def finish(self) -> None:
        """Read the rest of the ciphertext (discarding it) and raise unless the layer authenticated."""
        while self.read(1024 * 1024):
            pass

    def _verify(self) -> None:
        self._decryptor.finalize()
        tag = self._mac.finalize()
        if not hmac.compare_digest(tag, self._expected):
            self._failed = DecryptionError("encrypted layer failed authentication (HMAC mismatch)")
            raise self._failed
        self.verified = True
