"""Annotation packets: the wrapped layer key that ocicrypt stores in an encrypted image layer. Pure.

An encrypted layer's `org.opencontainers.image.enc.keys.provider.attestation-agent` annotation carries (in
base64) one annotation packet, a JSON object naming the key-encryption key (KEK) and holding ocicrypt's
private layer options ("optsdata") encrypted with it:

- **v1**, as guest-components' `coco_keyprovider` writes it:
  `{"kid":"kbs:///default/key/1","wrapped_data":"<b64 std>","iv":"<b64 std>","wrap_type":"A256GCM"}`.
- **v2**, what the confidential data hub parses (a superset of v1): `version` (default and only value
  `"0.1.0"`), `kid`, `wrapped_data`, `provider` (default `"kbs"`), `iv`?, `wrap_type`?,
  `provider_settings` {}, `annotations` {}.

With provider `kbs` the KEK is the 32-byte KBS resource named by `kid`, and `wrapped_data` is
AES-256-GCM (12-byte IV, 16-byte tag appended, no AAD) or AES-256-CTR (16-byte IV used as a 128-bit big-endian
counter) of the optsdata.

    packet = parse_packet(annotation_bytes)     # structure only; InvalidRequest names the bad field
    optsdata = unwrap(kek, packet)              # DecryptionError on any authentication failure

`parse_packet` checks structure, types, base64 and sizes; it does not check that `kid` resolves to anything.
`unwrap` authenticates A256GCM; A256CTR is unauthenticated (ocicrypt detects a wrong key later, by the layer
HMAC).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from agent import aes
from agent.errors import DecryptionError, InvalidRequest, InvalidResourceUri, NotSupported
from agent.kbs.resource import parse_resource_uri
from agent.strictjson import b64decode_std as _b64decode_std
from agent.strictjson import b64encode_std as _b64encode_std
from agent.strictjson import dump_json as _dump_json
from agent.strictjson import json_type as _json_type
from agent.strictjson import load_json_object as _load_json_object
from agent.strictjson import shown as _shown

__all__ = [
    "AnnotationPacket",
    "WrapType",
    "parse_packet",
    "wrap",
    "unwrap",
    "PACKET_VERSION",
    "KBS_PROVIDER",
    "KEK_SIZE",
    "MAX_PACKET_SIZE",
    "MAX_OPTSDATA_SIZE",
]

PACKET_VERSION = "0.1.0"
KBS_PROVIDER = "kbs"
KEK_SIZE = 32
GCM_TAG_SIZE = 16
MAX_PACKET_SIZE = 64 * 1024
"""Largest annotation packet JSON accepted by `parse_packet` (ocicrypt's optsdata is a few hundred bytes)."""
MAX_OPTSDATA_SIZE = 32 * 1024
"""Largest optsdata `wrap` accepts, so that every packet it makes parses again under `MAX_PACKET_SIZE`."""
MAX_KID_LENGTH = 2048

_B64_STD = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class WrapType(StrEnum):
    """How `wrapped_data` is encrypted, named as in RFC 7518 §5.2.6 / §4.7 (`A256GCM`, `A256CTR`)."""

    A256GCM = "A256GCM"
    A256CTR = "A256CTR"

    @property
    def iv_size(self) -> int:
        """The IV length this cipher takes, in bytes."""
        return 12 if self is WrapType.A256GCM else 16


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnotationPacket:
    """One annotation packet (v2 model; a v1 packet is a v2 packet with every default).

    Construction validates: `version` is `"0.1.0"`; `kid` and `provider` are non-empty; with provider `kbs`,
    `iv` and `wrap_type` are present, the IV has the cipher's length and A256GCM data holds at least a tag.
    Violations raise `InvalidRequest` naming the field (packets come from untrusted layers).
    """

    kid: str
    wrapped_data: bytes = field(repr=False)
    iv: bytes | None = None
    wrap_type: WrapType | None = None
    version: str = PACKET_VERSION
    provider: str = KBS_PROVIDER
    provider_settings: Mapping[str, object] = field(default_factory=dict)
    annotations: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version != PACKET_VERSION:
            msg = f"annotation packet `version` is {_shown(self.version)}, expected {PACKET_VERSION!r}."
            raise InvalidRequest(msg)
        if not self.kid:
            msg = "annotation packet `kid` is empty, expected a key id."
            raise InvalidRequest(msg)
        if len(self.kid) > MAX_KID_LENGTH:
            msg = f"annotation packet `kid` is {len(self.kid)} characters, expected at most {MAX_KID_LENGTH}."
            raise InvalidRequest(msg)
        if not self.provider:
            msg = "annotation packet `provider` is empty, expected a provider name such as 'kbs'."
            raise InvalidRequest(msg)
        if self.provider == KBS_PROVIDER:
            _check_kbs_fields(self.iv, self.wrap_type, self.wrapped_data)
        object.__setattr__(self, "provider_settings", MappingProxyType(dict(self.provider_settings)))
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))

    def to_v1_json(self) -> bytes:
        """Serialise as a v1 packet, byte for byte as `coco_keyprovider` writes one (compact, serde order).

        Raises `ValueError` if the packet uses what v1 cannot express (other provider, settings, annotations).
        """
        if self.provider != KBS_PROVIDER or self.provider_settings or self.annotations:
            msg = "only a `kbs` packet without provider_settings or annotations can be written as v1"
            raise ValueError(msg)
        if self.iv is None or self.wrap_type is None:  # pragma: no cover - excluded by __post_init__
            msg = "a `kbs` packet always has `iv` and `wrap_type`"
            raise ValueError(msg)
        obj: dict[str, object] = {
            "kid": self.kid,
            "wrapped_data": _b64encode_std(self.wrapped_data),
            "iv": _b64encode_std(self.iv),
            "wrap_type": str(self.wrap_type),
        }
        return _dump_json(obj)

    def to_v2_json(self) -> bytes:
        """Serialise as a v2 packet in the data hub's field order, leaving out an absent `iv`/`wrap_type`."""
        obj: dict[str, object] = {
            "version": self.version,
            "kid": self.kid,
            "wrapped_data": _b64encode_std(self.wrapped_data),
            "provider": self.provider,
        }
        if self.iv is not None:
            obj["iv"] = _b64encode_std(self.iv)
        if self.wrap_type is not None:
            obj["wrap_type"] = str(self.wrap_type)
        obj["provider_settings"] = dict(self.provider_settings)
        obj["annotations"] = dict(self.annotations)
        return _dump_json(obj)


def parse_packet(data: bytes) -> AnnotationPacket:
    """Parse a v1 or v2 annotation packet from its JSON bytes (the base64-decoded layer annotation).

    Checks types, strict standard base64 (padded, canonical), sizes and the rules of `AnnotationPacket`.
    Unknown members are ignored, as the data hub does. Raises `InvalidRequest` naming the bad field.
    """
    if len(data) > MAX_PACKET_SIZE:
        msg = f"annotation packet is {len(data):#x} bytes, expected at most {MAX_PACKET_SIZE:#x}."
        raise InvalidRequest(msg)
    obj = _load_json_object(data, "annotation packet")

    version = _get_str(obj, "version", default=PACKET_VERSION)
    kid = _get_str(obj, "kid")
    wrapped_data = _b64decode_std(_get_str(obj, "wrapped_data"), "annotation packet `wrapped_data`")
    provider = _get_str(obj, "provider", default=KBS_PROVIDER)

    iv_text = _get_optional_str(obj, "iv")
    iv = None if iv_text is None else _b64decode_std(iv_text, "annotation packet `iv`")

    wrap_type_text = _get_optional_str(obj, "wrap_type")
    wrap_type = None
    if wrap_type_text is not None:
        wrap_type = _wrap_type(wrap_type_text, "annotation packet `wrap_type`")

    return AnnotationPacket(
        version=version,
        kid=kid,
        wrapped_data=wrapped_data,
        provider=provider,
        iv=iv,
        wrap_type=wrap_type,
        provider_settings=_get_object(obj, "provider_settings"),
        annotations=_get_object(obj, "annotations"),
    )


def wrap(
    kek: bytes,
    optsdata: bytes,
    *,
    kid: str,
    wrap_type: WrapType | str = WrapType.A256GCM,
    iv: bytes | None = None,
) -> AnnotationPacket:
    """Encrypt `optsdata` under the 32-byte `kek` into a `kbs` packet (serialise it with `to_v1_json()`).

    `kid` must be a resource URI `kbs[+plugin]://[host]/<repo>/<type>/<tag>` so that the data hub can fetch
    the KEK. `iv` defaults to fresh random bytes of the cipher's length; pass one only for known-answer tests
    (reusing a GCM IV under one KEK destroys confidentiality and integrity).
    Raises `InvalidRequest` for a bad KEK length, kid, wrap type, IV length or oversized optsdata.
    """
    _check_kek(kek)
    kind = _wrap_type(wrap_type, "`wrap_type`")
    # the same URI rule the agent's GetResource applies, so every kid `wrap` writes can be fetched again
    try:
        parse_resource_uri(kid)
    except InvalidResourceUri as exc:
        msg = "`kid` is not a resource URI, expected `kbs:///<repo>/<type>/<tag>`."
        raise InvalidRequest(msg) from exc
    if not optsdata:
        msg = "`optsdata` is empty, expected the layer options to wrap."
        raise InvalidRequest(msg)
    if len(optsdata) > MAX_OPTSDATA_SIZE:
        msg = f"`optsdata` is {len(optsdata):#x} bytes, expected at most {MAX_OPTSDATA_SIZE:#x}."
        raise InvalidRequest(msg)
    if iv is None:
        iv = secrets.token_bytes(kind.iv_size)
    elif len(iv) != kind.iv_size:
        msg = f"`iv` is {len(iv)} bytes, expected {kind.iv_size} for {kind}."
        raise InvalidRequest(msg)

    wrapped = aes.gcm_encrypt(kek, iv, optsdata, b"") if kind is WrapType.A256GCM else aes.ctr(kek, iv, optsdata)
    return AnnotationPacket(kid=kid, wrapped_data=wrapped, iv=iv, wrap_type=kind)


def unwrap(kek: bytes, packet: AnnotationPacket) -> bytes:
    """Decrypt a `kbs` packet's `wrapped_data` with the 32-byte `kek` and return the optsdata.

    Raises `NotSupported` for a provider other than `kbs`, `InvalidRequest` for a KEK that is not 32 bytes,
    and `DecryptionError` (with no detail) when A256GCM authentication fails.
    """
    if packet.provider != KBS_PROVIDER:
        msg = f"annotation packet provider {_shown(packet.provider)} is not supported, expected 'kbs'."
        raise NotSupported(msg)
    _check_kek(kek)
    iv, kind = packet.iv, packet.wrap_type
    if iv is None or kind is None:  # pragma: no cover - excluded by AnnotationPacket.__post_init__
        msg = "a `kbs` packet always has `iv` and `wrap_type`"
        raise ValueError(msg)
    if kind is not WrapType.A256GCM:
        optsdata = aes.ctr(kek, iv, packet.wrapped_data)
    else:
        try:
            data = packet.wrapped_data  # ciphertext || 16-byte tag
            optsdata = aes.gcm_decrypt(kek, iv, data[:-16], data[-16:], b"")
        except ValueError:
            raise DecryptionError from None
    if not optsdata:  # pragma: no cover - excluded by the `wrapped_data` length rule of AnnotationPacket
        msg = "annotation packet `wrapped_data` decrypts to nothing, expected layer options."
        raise InvalidRequest(msg)
    return optsdata


# --- validation helpers ---------------------------------------------------------------------------------


def _check_kek(kek: bytes) -> None:
    if len(kek) != KEK_SIZE:
        msg = f"key encryption key is {len(kek)} bytes, expected {KEK_SIZE}."
        raise InvalidRequest(msg)


def _check_kbs_fields(iv: bytes | None, wrap_type: WrapType | None, wrapped_data: bytes) -> None:
    if wrap_type is None:
        msg = "annotation packet `wrap_type` is missing, expected 'A256GCM' or 'A256CTR' for provider 'kbs'."
        raise InvalidRequest(msg)
    if iv is None:
        msg = "annotation packet `iv` is missing, expected one for provider 'kbs'."
        raise InvalidRequest(msg)
    if len(iv) != wrap_type.iv_size:
        msg = f"annotation packet `iv` is {len(iv)} bytes, expected {wrap_type.iv_size} for {wrap_type}."
        raise InvalidRequest(msg)
    # optsdata is never empty (ocicrypt reads empty optsdata as "no key"), so neither is the ciphertext
    gcm = wrap_type is WrapType.A256GCM
    least = GCM_TAG_SIZE + 1 if gcm else 1
    if len(wrapped_data) < least:
        why = f"the {GCM_TAG_SIZE}-byte tag and one byte of optsdata" if gcm else "one byte of optsdata"
        msg = f"annotation packet `wrapped_data` is {len(wrapped_data)} bytes, expected at least {least} ({why})."
        raise InvalidRequest(msg)


def _wrap_type(value: str, what: str) -> WrapType:
    try:
        return WrapType(value)
    except ValueError:
        msg = f"{what} is {_shown(value)}, expected 'A256GCM' or 'A256CTR'."
        raise InvalidRequest(msg) from None


def _get_str(obj: Mapping[str, object], key: str, *, default: str | None = None) -> str:
    if key not in obj and default is not None:
        return default
    value = obj.get(key)
    if not isinstance(value, str):
        got = _json_type(value) if key in obj else "missing"
        msg = f"annotation packet `{key}` is {got}, expected a string."
        raise InvalidRequest(msg)
    return value


def _get_optional_str(obj: Mapping[str, object], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        msg = f"annotation packet `{key}` is {_json_type(value)}, expected a string or null."
        raise InvalidRequest(msg)
    return value


def _get_object(obj: Mapping[str, object], key: str) -> dict[str, object]:
    if key not in obj:
        return {}
    value = obj[key]
    if not isinstance(value, dict):
        msg = f"annotation packet `{key}` is {_json_type(value)}, expected an object."
        raise InvalidRequest(msg)
    return value


# --- JSON and base64 helpers (shared with agent.keyprovider.messages) -----------------------------------
