"""Strict JSON and base64 for every external document. Pure.

Callers: annotation packets, key-provider requests, sealed secrets, and everything a KBS sends (challenge, token
claims, JWE and its protected header, error bodies). One place for the rules both Go ocicrypt and the Rust
reference enforce: UTF-8, no duplicate keys, no NaN/Infinity (spelled out or overflowing), no lone surrogates,
at most `MAX_DEPTH` levels of nesting; canonical padded standard base64 and canonical base64url.

Errors are `InvalidRequest` by default (a local caller's document); a KBS parser passes `error=KbsProtocolError`.
Messages name the document and never echo more than a short prefix of its content.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from typing import Any

from agent.errors import InvalidRequest

__all__ = [
    "MAX_DEPTH",
    "b64decode_std",
    "b64encode_std",
    "b64url_decode",
    "b64url_encode",
    "dump_json",
    "json_type",
    "load_json",
    "load_json_object",
    "shown",
    "split_compact",
]

MAX_DEPTH = 64  # serde_json's default recursion limit is 128; no legitimate document here nests past a handful
ErrorType = Callable[[str], Exception]  # an error class (AgentError, or ValueError to hide the reason), or a partial

_B64_STD = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def load_json(
    data: bytes | str,
    what: str,
    *,
    error: ErrorType = InvalidRequest,
    max_depth: int = MAX_DEPTH,
    max_bytes: int | None = None,
) -> object:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, no lone surrogates, at most `max_depth` levels and
    (when given) `max_bytes` bytes."""
    if max_bytes is not None and len(data) > max_bytes:
        msg = f"{what} is {len(data)} bytes, expected at most {max_bytes}"
        raise error(msg)
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            msg = f"{what} is not UTF-8."
            raise error(msg) from None
    try:
        value = json.loads(
            data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite_float
        )
    except _DuplicateKeyError as exc:
        msg = f"{what} has the key {shown(exc.key)} more than once."
        raise error(msg) from None
    except RecursionError:
        raise error(_too_deep(what, max_depth)) from None
    except ValueError:  # syntax, NaN/Infinity, out-of-range float, integer over the digit limit
        msg = f"{what} is not valid JSON."
        raise error(msg) from None
    _check_tree(value, what, error, max_depth)
    return value


def load_json_object(
    data: bytes | str,
    what: str,
    *,
    error: ErrorType = InvalidRequest,
    max_depth: int = MAX_DEPTH,
    max_bytes: int | None = None,
) -> dict[str, object]:
    """`load_json` that also requires an object at the top."""
    value = load_json(data, what, error=error, max_depth=max_depth, max_bytes=max_bytes)
    if not isinstance(value, dict):
        msg = f"{what} is {json_type(value)}, expected a JSON object."
        raise error(msg)
    return value


def _too_deep(what: str, max_depth: int) -> str:
    return f"{what} is nested more than {max_depth} levels deep, expected at most {max_depth}."


def _check_tree(value: object, what: str, error: ErrorType, max_depth: int) -> None:
    """Depth and string checks, iteratively (no recursion for an attacker to exhaust)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, what, error)
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > max_depth:
            raise error(_too_deep(what, max_depth))
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, what, error)
                stack.append((child, depth + 1))
        else:
            stack.extend((child, depth + 1) for child in item)


def _check_text(text: str, what: str, error: ErrorType) -> None:
    # serde_json and Go reject or replace lone surrogates (`"\ud800"`); refuse them rather than fail later.
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        msg = f"{what} has a lone surrogate \\u{ord(text[exc.start]):04x}, expected valid Unicode."
        raise error(msg) from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        msg = f"number {text[:40]} is out of range"
        raise ValueError(msg)
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


def b64url_decode(text: object, what: str, *, error: ErrorType = InvalidRequest, padded: bool = False) -> bytes:
    """Canonical base64url (the one decoder): unpadded as Rust `URL_SAFE_NO_PAD` and JOSE write it.

    `padded=True` also accepts correct `=` padding (kbs-protocol.md §6.2: a client may take both). Stray
    trailing bits, whitespace, the standard alphabet and wrong padding are refused.
    """
    if not isinstance(text, str):
        msg = f"{what} is {json_type(text)}, expected a base64url string."
        raise error(msg)
    body = text
    if padded and text.endswith("="):
        body = text.rstrip("=")
        if len(text) % 4 or len(text) - len(body) > 2:
            msg = f"{what} is not base64url (wrong padding)."
            raise error(msg)
    if len(body) % 4 == 1 or not _B64URL.fullmatch(body):
        msg = f"{what} is not unpadded base64url."
        raise error(msg)
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    if b64url_encode(raw) != body:
        msg = f"{what} is not canonical base64url (nonzero trailing bits)."
        raise error(msg)
    return raw


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def split_compact(
    token: str, what: str, *, error: ErrorType = InvalidRequest
) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """`(header, claims, signing_input, signature)` of a compact JWS with JSON-object parts; `error` if malformed.

    Parts are canonical unpadded base64url and strict, depth-limited JSON. Nothing is
    verified here (`agent.jws.verify` does; this module loads no crypto library, so a KBS token is read without one).
    """
    parts = token.split(".")
    if len(parts) != 3:
        msg = f"{what} has {len(parts)} dot-separated parts, expected 3."
        raise error(msg)
    head, body, sig = parts
    header = load_json_object(b64url_decode(head, f"{what} header", error=error), f"{what} header", error=error)
    claims = load_json_object(b64url_decode(body, f"{what} claims", error=error), f"{what} claims", error=error)
    signature = b64url_decode(sig, f"{what} signature", error=error)
    return header, claims, f"{head}.{body}".encode("ascii"), signature
