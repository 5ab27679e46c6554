"""RFC 8785 JSON Canonicalization Scheme (JCS). Pure.

Used for the KBS runtime-data binding: the KBS hashes the JCS form of `{"additional-evidence", "nonce",
"tee-pubkey"}`, so the agent must produce exactly the same bytes (kbs-protocol.md §5).

Rules implemented: object members sorted by the UTF-16 code units of their names, no whitespace, strings escaped
as ECMAScript `JSON.stringify` does (only `"`, `\\` and control characters), numbers in the ECMAScript
`Number.prototype.toString` form (integers must be exactly representable as IEEE 754 doubles).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["canonicalize"]

_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_MAX_SAFE_INT = 2**53


def canonicalize(value: object) -> bytes:
    """Return the RFC 8785 canonical UTF-8 encoding of a JSON value.

    Raises:
        ValueError: for values JSON cannot carry (NaN, infinities, lone surrogates, unsafe integers, non-str keys).
        TypeError: for Python objects that are not JSON values.
    """
    out: list[str] = []
    _emit(value, out)
    return "".join(out).encode("utf-8")


def _emit(value: object, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        if abs(value) >= _MAX_SAFE_INT:
            msg = f"integer {value} is not exactly representable in JSON (I-JSON)"
            raise ValueError(msg)
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        items: list[tuple[str, object]] = []
        for key, item in value.items():
            if not isinstance(key, str):
                msg = f"object key {key!r} is not a string"
                raise TypeError(msg)
            items.append((key, item))
        items.sort(key=lambda kv: kv[0].encode("utf-16-be"))
        out.append("{")
        for index, (key, item) in enumerate(items):
            if index:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _emit(item, out)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray | memoryview):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _emit(item, out)
        out.append("]")
    else:
        msg = f"{type(value).__name__} is not a JSON value"
        raise TypeError(msg)


def _string(text: str) -> str:
    parts = ['"']
    for char in text:
        code = ord(char)
        if char in _SHORT_ESCAPES:
            parts.append(_SHORT_ESCAPES[char])
        elif code < 0x20:
            parts.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            msg = "string contains a lone surrogate, which is not valid UTF-8"
            raise ValueError(msg)
        else:
            parts.append(char)
    parts.append('"')
    return "".join(parts)


def _number(value: float) -> str:
    """ECMAScript Number.prototype.toString for a finite double (ECMA-262 §7.1.12.1)."""
    if not math.isfinite(value):
        msg = f"{value} is not a JSON number"
        raise ValueError(msg)
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    # repr() gives the shortest round-tripping digits; split them into a digit string and exponent n such that
    # value = 0.d1d2...dk * 10**n.
    mantissa, _, exp_text = repr(abs(value)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    exponent = int(exp_text or "0") + len(int_part.lstrip("0") or "")
    if not int_part.lstrip("0"):
        exponent -= len(frac_part) - len(frac_part.lstrip("0"))
    digits = digits.rstrip("0") or "0"
    k, n = len(digits), exponent
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * (-n) + digits
    else:
        exp = n - 1
        exp_str = f"e{'+' if exp >= 0 else '-'}{abs(exp)}"
        body = digits[0] + ("." + digits[1:] if k > 1 else "") + exp_str
    return sign + body
