"""Initdata: the TOML document a Kata pod hands the guest, its digest, and the platform binding value. Pure.

The digest is `algorithm(raw TOML bytes exactly as delivered)`; nothing is canonicalised (guest-api.md §8).
TDX binds it in MRCONFIGID (48 bytes, zero-padded or truncated), SNP in HOST_DATA (32 bytes): the attesters
compare with `binding_value(digest, size)`. The same bytes go to the KBS as `init-data` (`format = "toml"`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import tomllib
from dataclasses import dataclass, field

from agent.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "MAX_INITDATA_BYTES",
    "MISMATCH_MESSAGE",
    "InitData",
    "binding_value",
    "decode_digest_argument",
    "parse_initdata",
]

ALGORITHMS = {"sha256": 32, "sha384": 48, "sha512": 64}
MAX_INITDATA_BYTES = 4 * 1024 * 1024
MISMATCH_MESSAGE = "The initdata supplied by the parameter is inconsistent with that of the current platform."


@dataclass(frozen=True, slots=True, kw_only=True)
class InitData:
    """A parsed initdata document; `raw` is kept byte for byte (it is what was measured)."""

    raw: bytes = field(repr=False)
    version: str
    algorithm: str
    data: dict[str, str]

    @property
    def digest(self) -> bytes:
        return hashlib.new(self.algorithm, self.raw).digest()

    @property
    def text(self) -> str:
        """The TOML text sent to the KBS as `init-data.body` (the raw bytes are UTF-8 by construction)."""
        return self.raw.decode("utf-8")


def parse_initdata(raw: bytes, *, source: str = "initdata") -> InitData:
    """Parse and validate an initdata TOML: `version`, `algorithm` (sha256/384/512), `[data]` of strings."""
    if len(raw) > MAX_INITDATA_BYTES:
        msg = f"{source} is {len(raw)} bytes, expected at most {MAX_INITDATA_BYTES}"
        raise ConfigError(msg, key=source)
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        msg = f"{source} is not valid UTF-8 TOML: {exc}"
        raise ConfigError(msg, key=source) from exc
    version = document.get("version")
    if not isinstance(version, str):
        msg = f"{source} `version` is {version!r}, expected a string such as '0.1.0'"
        raise ConfigError(msg, key=source)
    algorithm = document.get("algorithm")
    if algorithm == "sm3":
        msg = f"{source} `algorithm` is 'sm3', which this agent does not support (sha256, sha384, sha512)"
        raise ConfigError(msg, key=source)
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        msg = f"{source} `algorithm` is {algorithm!r}, expected one of: {', '.join(ALGORITHMS)}"
        raise ConfigError(msg, key=source)
    data = document.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        msg = f"{source} `[data]` must map names to strings"
        raise ConfigError(msg, key=source)
    return InitData(raw=raw, version=version, algorithm=algorithm, data=dict(data))


def binding_value(digest: bytes, size: int) -> bytes:
    """The digest zero-padded or truncated to the platform field's size (MRCONFIGID 48, HOST_DATA 32)."""
    return digest[:size].ljust(size, b"\0")


def decode_digest_argument(text: str) -> bytes:
    """`--initdata-digest`: standard base64 (as the reference takes it), 1 to 64 bytes."""
    try:
        digest = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        msg = f"--initdata-digest {text[:80]!r} is not standard base64"
        raise ConfigError(msg, key="--initdata-digest") from exc
    if not 1 <= len(digest) <= 64:
        msg = f"--initdata-digest is {len(digest)} bytes, expected 1 to 64"
        raise ConfigError(msg, key="--initdata-digest")
    return digest
