"""Strict JSON and base64 for caller-supplied documents (packets, key-provider requests, sealed secrets). Pure.

One place for the rules both Go ocicrypt and the Rust reference enforce: UTF-8, no duplicate keys, no
NaN/Infinity, no lone surrogates; canonical padded standard base64 and canonical unpadded base64url. Errors are
`InvalidRequest` with a message naming the document, never echoing more than a short prefix of its content.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from agent.errors import InvalidRequest

__all__ = [
    "b64decode_std",
    "b64encode_std",
    "b64url_decode",
    "b64url_encode",
    "dump_json",
    "json_type",
    "load_json_object",
    "shown",
]

_B64_STD = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def load_json_object(data: bytes, what: str) -> dict[str, object]:
    """Strict JSON: UTF-8, one object at the top, no duplicate keys, no NaN/Infinity, no lone surrogates."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        msg = f"{what} is not UTF-8."
        raise InvalidRequest(msg) from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        # serde_json and Go reject or replace lone surrogates; refuse them here rather than fail later.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except _DuplicateKeyError as exc:
        msg = f"{what} has the key {shown(exc.key)} more than once."
        raise InvalidRequest(msg) from None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeEncodeError, int-size limit: ValueErrors
        msg = f"{what} is not valid JSON."
        raise InvalidRequest(msg) from None
    if not isinstance(value, dict):
        msg = f"{what} is {json_type(value)}, expected a JSON object."
        raise InvalidRequest(msg)
    return value


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _no_constant(name: str) -> object:
    msg = f"{name} is not JSON"
    raise ValueError(msg)


def dump_json(obj: object) -> bytes:
    # Compact, non-ASCII written as UTF-8, like serde_json::to_string.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def b64decode_std(text: str, what: str) -> bytes:
    """Standard base64, padded and canonical (Rust `STANDARD` and Go `StdEncoding` both write this form)."""
    if len(text) % 4 or not _B64_STD.fullmatch(text):
        msg = f"{what} is not padded standard base64."
        raise InvalidRequest(msg)
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        msg = f"{what} is not padded standard base64."
        raise InvalidRequest(msg) from None
    if b64encode_std(raw) != text:
        msg = f"{what} is not canonical base64 (nonzero trailing bits)."
        raise InvalidRequest(msg)
    return raw


def b64encode_std(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: bool is an int subclass
    (int, "a number"),
    (float, "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "an object"),
)


def json_type(value: object) -> str:
    """The JSON type of a decoded value, for error messages ("a string", "null", ...)."""
    if value is None:
        return "null"
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__)


def shown(value: str, limit: int = 40) -> str:
    """A caller-supplied string, quoted and cut short, for an error message."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"


def b64url_decode(text: str, what: str) -> bytes:
    """base64url without padding, canonical (Rust `URL_SAFE_NO_PAD` rejects padding and stray trailing bits)."""
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        msg = f"{what} is not unpadded base64url."
        raise InvalidRequest(msg)
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(raw) != text:
        msg = f"{what} is not canonical base64url (nonzero trailing bits)."
        raise InvalidRequest(msg)
    return raw


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
