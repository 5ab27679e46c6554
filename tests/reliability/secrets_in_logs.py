"""Every encoding of a secret that could end up in a log line, for searching captured logs."""

from __future__ import annotations

import base64
import json

__all__ = ["encodings", "find_leaks"]


def encodings(secret: bytes) -> dict[str, str]:
    """The forms a byte string takes when something prints it: raw, hex, base64 (std and url), int lists, repr."""
    ints = [str(b) for b in secret]
    forms = {
        "raw": secret.decode("latin-1"),
        "hex": secret.hex(),
        "HEX": secret.hex().upper(),
        "base64": base64.b64encode(secret).decode(),
        "base64-unpadded": base64.b64encode(secret).decode().rstrip("="),
        "base64url": base64.urlsafe_b64encode(secret).decode().rstrip("="),
        "int-list": "[" + ", ".join(ints) + "]",
        "int-list-compact": "[" + ",".join(ints) + "]",
        "repr": repr(secret)[2:-1],
        "python-escaped": secret.decode("latin-1").encode("unicode_escape").decode(),
        "json-escaped": json.dumps(secret.decode("latin-1"))[1:-1],
    }
    # a prefix of every form too: a log line cut to a limit still leaks the part it keeps
    return {**forms, **{f"{name}[:24]": value[:24] for name, value in forms.items() if len(value) >= 24}}


def find_leaks(text: str, secret: bytes) -> list[str]:
    """Names of the encodings of `secret` found in `text`."""
    return [name for name, form in encodings(secret).items() if form and form in text]
