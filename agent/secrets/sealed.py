"""Sealed secrets: `sealed.<header>.<payload>.<signature>`, an ES256 JWS over a secret description. Pure.

The three parts after `sealed.` are a JWS compact serialisation (RFC 7515), each part base64url without padding.
The protected header carries `alg` (`"ES256"`) and `kid`; the signature is raw `r || s` (64 bytes) over the
ASCII bytes `"<header>.<payload>"`; the payload is JSON `{"version":"0.1.0","type":"vault"|"envelope",...}`.

`kid` names the P-256 public JWK that verifies the signature: a KBS resource when it parses as a resource URI
(`kid_is_resource_uri`), otherwise a local key name. Fetching that key is the caller's job:

    secret = parse(text)                          # structure, alg and kid only; nothing is verified yet
    jwk = fetch(secret.kid)                       # I/O, elsewhere
    payload = verify(secret, jwk)                 # VaultSecret | EnvelopeSecret, or InvalidRequest

`parse_unverified` is the insecure skip-verification mode. Creating sealed secrets is an owner's job:
`cvm_tools.sign.seal` in the tools distribution.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec

from agent import jws
from agent.errors import InvalidRequest
from agent.keyprovider.annotation import WrapType
from agent.strictjson import b64decode_std
from agent.strictjson import b64encode_std as _b64encode_std
from agent.strictjson import b64url_decode as _b64url_decode
from agent.strictjson import load_json_object as _load_json_object
from agent.strictjson import shown as _shown

__all__ = [
    "EnvelopeSecret",
    "SealedSecret",
    "VaultSecret",
    "kid_is_resource_uri",
    "parse",
    "parse_payload",
    "parse_unverified",
    "verify",
    "MAX_SEALED_SECRET_SIZE",
    "SECRET_VERSION",
]

SEALED_PREFIX = "sealed."
SECRET_VERSION = "0.1.0"
ALGORITHM = "ES256"
MAX_SEALED_SECRET_SIZE = 1024 * 1024
"""Largest sealed secret accepted (the size limit of a Kubernetes Secret)."""

_P256_COORDINATE_SIZE = 32
_SIGNATURE_SIZE = 2 * _P256_COORDINATE_SIZE
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64_STD = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))


@dataclass(frozen=True, slots=True, kw_only=True)
class VaultSecret:
    """A secret stored by a provider (`kbs`, `aliyun`, `aws`, ...) under `name`, e.g. `kbs:///one/2/trois`."""

    name: str
    provider: str
    provider_settings: Mapping[str, object] = field(default_factory=dict)
    annotations: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _freeze(self, "provider_settings", "annotations")

    def to_json_object(self) -> dict[str, object]:
        """The payload object `seal` signs, members in the reference order (`version`, `type` first)."""
        return {
            "version": SECRET_VERSION,
            "type": "vault",
            "name": self.name,
            "provider": self.provider,
            "provider_settings": dict(self.provider_settings),
            "annotations": dict(self.annotations),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvelopeSecret:
    """A secret encrypted under a data key (`encrypted_data`), whose key a KMS wraps (`encrypted_key`).

    The byte fields travel as standard base64. Construction checks that `iv` has the cipher's length
    (12 bytes for A256GCM, 16 for A256CTR) and raises `InvalidRequest` otherwise.
    """

    key_id: str
    encrypted_key: bytes = field(repr=False)
    encrypted_data: bytes = field(repr=False)
    wrap_type: WrapType
    iv: bytes
    provider: str
    provider_settings: Mapping[str, object] = field(default_factory=dict)
    annotations: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.iv) != self.wrap_type.iv_size:
            msg = f"sealed secret `iv` is {len(self.iv)} bytes, expected {self.wrap_type.iv_size} for {self.wrap_type}."
            raise InvalidRequest(msg)
        _freeze(self, "provider_settings", "annotations")

    def to_json_object(self) -> dict[str, object]:
        """The payload object `seal` signs, members in the reference order (`version`, `type` first)."""
        return {
            "version": SECRET_VERSION,
            "type": "envelope",
            "key_id": self.key_id,
            "encrypted_key": _b64encode_std(self.encrypted_key),
            "encrypted_data": _b64encode_std(self.encrypted_data),
            "wrap_type": str(self.wrap_type),
            "iv": _b64encode_std(self.iv),
            "provider": self.provider,
            "provider_settings": dict(self.provider_settings),
            "annotations": dict(self.annotations),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedSecret:
    """A sealed secret split into its JWS parts. Its structure is checked; its signature is not (see `verify`)."""

    kid: str
    protected: Mapping[str, object]
    signing_input: bytes
    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _freeze(self, "protected")


def parse(sealed: str | bytes) -> SealedSecret:
    """Split `sealed.<header>.<payload>.<signature>` and check its structure. Does **not** verify the signature.

    Checks: the `sealed.` prefix, four parts, strict base64url (no padding), a JSON object header with a
    non-empty string `kid` and `alg == "ES256"` and no `crit`, and a 64-byte signature.
    Raises `InvalidRequest` naming what is wrong.
    """
    text = _text(sealed)
    if not text.startswith(SEALED_PREFIX):
        msg = "sealed secret does not start with `sealed.`."
        raise InvalidRequest(msg)
    parts = text[len(SEALED_PREFIX) :].split(".")
    if len(parts) != 3:
        msg = f"sealed secret has {len(parts) + 1} dot-separated parts, expected 4."
        raise InvalidRequest(msg)
    header_b64, payload_b64, signature_b64 = parts

    header = _load_json_object(_b64url_decode(header_b64, "sealed secret header"), "sealed secret header")
    alg = header.get("alg")
    if alg != ALGORITHM:
        got = _shown(alg) if isinstance(alg, str) else "missing" if alg is None else "not a string"
        msg = f"sealed secret header `alg` is {got}, expected 'ES256'."
        raise InvalidRequest(msg)
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        msg = "sealed secret header `kid` is missing or not a non-empty string."
        raise InvalidRequest(msg)
    if "crit" in header:
        msg = "sealed secret header has `crit`, expected no critical extensions."
        raise InvalidRequest(msg)

    payload = _b64url_decode(payload_b64, "sealed secret payload")
    signature = _b64url_decode(signature_b64, "sealed secret signature")
    if len(signature) != _SIGNATURE_SIZE:
        msg = f"sealed secret signature is {len(signature)} bytes, expected {_SIGNATURE_SIZE} (ES256 r || s)."
        raise InvalidRequest(msg)
    return SealedSecret(
        kid=kid,
        protected=header,
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        payload=payload,
        signature=signature,
    )


def verify(secret: SealedSecret | str | bytes, jwk: bytes | Mapping[str, object]) -> VaultSecret | EnvelopeSecret:
    """Verify the ES256 signature with the P-256 public JWK, then parse the payload.

    `jwk` is the key's JSON (bytes) or its decoded object; `d` and other private members are ignored.
    Raises `InvalidRequest("sealed secret signature does not verify")` on a bad signature, and
    `InvalidRequest` naming the member for a malformed key or payload.
    """
    if not isinstance(secret, SealedSecret):
        secret = parse(secret)
    public_key = _load_p256_jwk(jwk)
    if not jws.verify(public_key, ALGORITHM, secret.signing_input, secret.signature):
        msg = "sealed secret signature does not verify"
        raise InvalidRequest(msg)
    return parse_payload(secret.payload)


def parse_unverified(sealed: str | bytes) -> VaultSecret | EnvelopeSecret:
    """**Insecure**: read the payload without any signature check (`skip_sealed_secret_verification`).

    Mirrors the reference data hub: any string of exactly four dot-separated parts is accepted, the first,
    second and fourth are not looked at, and the third is decoded as base64url without padding.
    """
    parts = _text(sealed).split(".")
    if len(parts) != 4:
        msg = f"sealed secret has {len(parts)} dot-separated parts, expected 4."
        raise InvalidRequest(msg)
    return parse_payload(_b64url_decode(parts[2], "sealed secret payload"))


def parse_payload(data: bytes) -> VaultSecret | EnvelopeSecret:
    """Parse the payload JSON (version `0.1.0`, type `vault` or `envelope`). Unknown members are ignored."""
    obj = _load_json_object(data, "sealed secret payload")
    version = obj.get("version")
    if version != SECRET_VERSION:
        got = _shown(version) if isinstance(version, str) else _json_kind(obj, "version")
        msg = f"sealed secret `version` is {got}, expected '0.1.0'."
        raise InvalidRequest(msg)
    kind = obj.get("type")
    if kind == "vault":
        return VaultSecret(
            name=_get_str(obj, "name"),
            provider=_get_str(obj, "provider"),
            provider_settings=_get_object(obj, "provider_settings"),
            annotations=_get_object(obj, "annotations"),
        )
    if kind == "envelope":
        wrap_type_text = _get_str(obj, "wrap_type")
        try:
            wrap_type = WrapType(wrap_type_text)
        except ValueError:
            msg = f"sealed secret `wrap_type` is {_shown(wrap_type_text)}, expected 'A256GCM' or 'A256CTR'."
            raise InvalidRequest(msg) from None
        return EnvelopeSecret(
            key_id=_get_str(obj, "key_id"),
            encrypted_key=_b64decode_std(_get_str(obj, "encrypted_key"), "encrypted_key"),
            encrypted_data=_b64decode_std(_get_str(obj, "encrypted_data"), "encrypted_data"),
            wrap_type=wrap_type,
            iv=_b64decode_std(_get_str(obj, "iv"), "iv"),
            provider=_get_str(obj, "provider"),
            provider_settings=_get_object(obj, "provider_settings"),
            annotations=_get_object(obj, "annotations"),
        )
    got = _shown(kind) if isinstance(kind, str) else _json_kind(obj, "type")
    msg = f"sealed secret `type` is {got}, expected 'vault' or 'envelope'."
    raise InvalidRequest(msg)


def kid_is_resource_uri(kid: str) -> bool:
    """Whether the data hub would fetch this `kid` from the KBS rather than read a local key file.

    Mirrors guest-components' `ResourceUri::try_from`: the kid parses as a URL whose scheme is `kbs` or
    `kbs+<plugin>` and whose path is not empty (`kbs:///repo/type/tag`, `kbs://host:8080/a/b/c`); the number
    of path segments is not checked here. URL parsing follows WHATWG only as far as this decision needs.
    """
    text = kid.strip(_C0_AND_SPACE).replace("\t", "").replace("\n", "").replace("\r", "")
    scheme, colon, _ = text.partition(":")
    if not colon or not _URL_SCHEME.fullmatch(scheme):
        return False
    scheme = scheme.lower()
    if scheme != "kbs" and not (scheme.startswith("kbs+") and len(scheme) > len("kbs+")):
        return False
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    if any(c.isspace() or c in "<>[]^|\\" for c in parts.netloc.rpartition("@")[2]):
        return False
    return parts.path != ""


# --- helpers -------------------------------------------------------------------------------------------------


def _freeze(obj: object, *names: str) -> None:
    for name in names:
        object.__setattr__(obj, name, MappingProxyType(dict(getattr(obj, name))))


def _text(sealed: str | bytes) -> str:
    if len(sealed) > MAX_SEALED_SECRET_SIZE:
        msg = f"sealed secret is {len(sealed):#x} bytes, expected at most {MAX_SEALED_SECRET_SIZE:#x}."
        raise InvalidRequest(msg)
    if isinstance(sealed, str):
        return sealed
    try:
        return sealed.decode("utf-8")
    except UnicodeDecodeError:
        msg = "sealed secret is not UTF-8."
        raise InvalidRequest(msg) from None


def _load_p256_jwk(jwk: bytes | Mapping[str, object]) -> ec.EllipticCurvePublicKey:
    obj = _load_json_object(jwk, "verification key") if isinstance(jwk, bytes) else jwk
    if obj.get("kty") != "EC":
        msg = "verification key `kty` is not 'EC', expected an EC P-256 JWK."
        raise InvalidRequest(msg)
    if obj.get("crv") != "P-256":
        msg = "verification key `crv` is not 'P-256', expected an EC P-256 JWK."
        raise InvalidRequest(msg)
    coordinates = []
    for name in ("x", "y"):
        value = obj.get(name)
        if not isinstance(value, str):
            msg = f"verification key `{name}` is missing or not a string."
            raise InvalidRequest(msg)
        raw = _b64url_decode(value, f"verification key `{name}`")
        if len(raw) != _P256_COORDINATE_SIZE:
            msg = f"verification key `{name}` is {len(raw)} bytes, expected {_P256_COORDINATE_SIZE}."
            raise InvalidRequest(msg)
        coordinates.append(int.from_bytes(raw, "big"))
    try:
        return ec.EllipticCurvePublicNumbers(coordinates[0], coordinates[1], ec.SECP256R1()).public_key()
    except ValueError:
        msg = "verification key is not a point on P-256."
        raise InvalidRequest(msg) from None


def _get_str(obj: Mapping[str, object], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        msg = f"sealed secret `{key}` is {_json_kind(obj, key)}, expected a string."
        raise InvalidRequest(msg)
    return value


def _get_object(obj: Mapping[str, object], key: str) -> dict[str, object]:
    value = obj.get(key)
    if not isinstance(value, dict):
        msg = f"sealed secret `{key}` is {_json_kind(obj, key)}, expected an object."
        raise InvalidRequest(msg)
    return value


def _json_kind(obj: Mapping[str, object], key: str) -> str:
    if key not in obj:
        return "missing"
    value = obj[key]
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )


def _b64decode_std(text: str, key: str) -> bytes:
    return b64decode_std(text, f"sealed secret `{key}`")
