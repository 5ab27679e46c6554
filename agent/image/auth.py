"""Registry credentials (auth.json) and authentication challenges. Pure.

auth.json as the reference reads it (image-pull.md §2.4): only `{"auths": {"<key>": {"auth": "<base64 user:pass>"}}}`;
every entry needs `auth`. Lookup for a reference: `<registry>/<repo>`, each parent path, `<registry>`, then any key
whose host normalises to the same (Docker Hub's three names compare equal). The file is fetched from the KBS by
the orchestrator; nothing here logs or returns the password except through `Credentials.basic_header()`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.errors import ConfigError, InvalidRequest
from agent.image.reference import ImageReference
from agent.strictjson import json_type, load_json_object

__all__ = [
    "AuthConfig",
    "Challenge",
    "Credentials",
    "parse_auth_json",
    "parse_challenge",
    "parse_token_reply",
]

MAX_AUTH_BYTES = 1024 * 1024
MAX_TOKEN_BYTES = 64 * 1024
_DOCKER_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io"}
_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password; `repr` never shows the password."""

    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def _host_key(key: str) -> str:
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    host = key.partition("/")[0]
    return "index.docker.io" if host in _DOCKER_HUB_HOSTS else host


@dataclass(frozen=True, slots=True)
class AuthConfig:
    entries: Mapping[str, Credentials] = field(default_factory=dict)

    def credentials_for(self, reference: ImageReference) -> Credentials | None:
        """The credentials for `reference`, as the reference lookup order finds them (None: anonymous)."""
        parts = reference.repository.split("/")
        for i in range(len(parts), 0, -1):
            found = self.entries.get(f"{reference.registry}/{'/'.join(parts[:i])}")
            if found is not None:
                return found
        found = self.entries.get(reference.registry)
        if found is not None:
            return found
        wanted = _host_key(reference.registry)
        for key, creds in self.entries.items():
            if _host_key(key) == wanted:
                return creds
        return None


def parse_auth_json(raw: bytes) -> AuthConfig:
    """Parse and validate an auth.json document; the message never contains a credential."""
    error = functools.partial(ConfigError, key="authenticated_registry_credentials_uri")
    doc = load_json_object(raw, "registry credentials (auth.json)", error=error, max_bytes=MAX_AUTH_BYTES)
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        msg = f"auth.json `auths` is {json_type(auths)}, expected an object"
        raise ConfigError(msg, key="authenticated_registry_credentials_uri")
    entries = {}
    for key, entry in auths.items():
        encoded = entry.get("auth") if isinstance(entry, dict) else None
        if not isinstance(encoded, str):
            msg = f"auth.json entry {key[:100]!r} has no `auth` string"
            raise ConfigError(msg, key="authenticated_registry_credentials_uri")
        try:
            text = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            msg = f"auth.json entry {key[:100]!r}: `auth` is not base64 of UTF-8 user:password"
            raise ConfigError(msg, key="authenticated_registry_credentials_uri") from None
        username, sep, password = text.partition(":")
        if not sep:
            msg = f"auth.json entry {key[:100]!r}: `auth` is not base64 of user:password"
            raise ConfigError(msg, key="authenticated_registry_credentials_uri")
        entries[key] = Credentials(username, password.strip("\r\n"))
    return AuthConfig(entries)


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """A `WWW-Authenticate` challenge: `scheme` in lowercase and its parameters."""

    scheme: str
    params: Mapping[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a `WWW-Authenticate` header (None when empty or unparsable)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _CHALLENGE_PARAM.match(rest, position)
        if match is None or match.end() == position:
            break
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        position = match.end()
    return Challenge(scheme=scheme.lower(), params=params)


def parse_token_reply(raw: bytes) -> tuple[str, int | None]:
    """A token server's JSON reply: `token` (or `access_token`) and `expires_in` seconds if given."""
    if len(raw) > MAX_TOKEN_BYTES:
        msg = f"token reply is {len(raw)} bytes, expected at most {MAX_TOKEN_BYTES}"
        raise InvalidRequest(msg)
    doc = load_json_object(raw, "token reply")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        msg = "token reply has no `token` or `access_token` string"
        raise InvalidRequest(msg)
    expires = doc.get("expires_in")
    return token, expires if isinstance(expires, int) and not isinstance(expires, bool) and expires > 0 else None
