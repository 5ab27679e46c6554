"""Resource URIs `kbs[+<plugin>]://[<host>[:<port>]]/<repo>/<type>/<tag>[?<query>]`. Pure.

The host part is accepted and ignored, as the reference data hub does: the configured KBS URL is always used
(guest-api.md §9.1). Segments follow the KBS's own rule `[A-Za-z0-9_-][A-Za-z0-9_.-]*`, so `..`, empty segments,
leading dots, percent-escapes and any other character are rejected before any network traffic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import InvalidResourceUri

__all__ = ["MAX_URI_LENGTH", "ResourceUri", "parse_resource_uri"]

MAX_URI_LENGTH = 2048
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_PLUGIN = re.compile(r"[a-z0-9_-]+")
_HOST = re.compile(r"[A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]")
_QUERY = re.compile(r"[A-Za-z0-9_.~=&%+-]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceUri:
    """A validated resource locator."""

    plugin: str
    repo: str
    type: str
    tag: str
    query: str = ""

    @property
    def path(self) -> str:
        """`<repo>/<type>/<tag>` (no query)."""
        return f"{self.repo}/{self.type}/{self.tag}"

    def kbs_path(self) -> str:
        """The path below the KBS base URL: `/kbs/v0/<plugin>/<repo>/<type>/<tag>[?query]`."""
        suffix = f"?{self.query}" if self.query else ""
        return f"/kbs/v0/{self.plugin}/{self.path}{suffix}"

    def __str__(self) -> str:
        scheme = "kbs" if self.plugin == "resource" else f"kbs+{self.plugin}"
        suffix = f"?{self.query}" if self.query else ""
        return f"{scheme}:///{self.path}{suffix}"


def parse_resource_uri(uri: str) -> ResourceUri:
    """Parse and validate a resource URI.

    Raises:
        InvalidResourceUri: with a message naming what is wrong (the URI itself is echoed only when short and
            printable, since it is caller input, not a secret).
    """
    if len(uri) > MAX_URI_LENGTH:
        msg = f"resource URI is {len(uri)} characters, expected at most {MAX_URI_LENGTH}"
        raise InvalidResourceUri(msg)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        msg = f"resource URI {uri!r} has no scheme, expected kbs:///<repo>/<type>/<tag>"
        raise InvalidResourceUri(msg)
    if scheme == "kbs":
        plugin = "resource"
    elif scheme.startswith("kbs+") and _PLUGIN.fullmatch(scheme[4:]):
        plugin = scheme[4:]
    else:
        msg = f"resource URI scheme is {scheme!r}, expected 'kbs' or 'kbs+<plugin>'"
        raise InvalidResourceUri(msg)
    authority, slash, path_query = rest.partition("/")
    if not slash:
        msg = f"resource URI {uri!r} has no path, expected kbs:///<repo>/<type>/<tag>"
        raise InvalidResourceUri(msg)
    if authority.startswith("[") and "]" in authority:
        host, _, rest_port = authority.partition("]")
        host += "]"
        port = rest_port[1:] if rest_port.startswith(":") else rest_port
    elif ":" in authority:
        host, _, port = authority.rpartition(":")
    else:
        host, port = authority, ""
    if not _HOST.fullmatch(host) or (port and not (port.isdigit() and len(port) <= 5)):
        msg = f"resource URI host {authority!r} is not a valid host[:port]"
        raise InvalidResourceUri(msg)
    path, _, query = path_query.partition("?")
    if "#" in path_query:
        msg = "resource URI must not contain a fragment"
        raise InvalidResourceUri(msg)
    if not _QUERY.fullmatch(query):
        msg = "resource URI query contains characters outside [A-Za-z0-9_.~=&%+-]"
        raise InvalidResourceUri(msg)
    segments = path.split("/")
    if len(segments) != 3:
        msg = f"resource path {path!r} has {len(segments)} segments, expected 3 (<repo>/<type>/<tag>)"
        raise InvalidResourceUri(msg)
    for name, segment in zip(("repo", "type", "tag"), segments, strict=True):
        if not _SEGMENT.fullmatch(segment):
            msg = f"resource {name} segment {segment!r} is invalid, expected [A-Za-z0-9_-][A-Za-z0-9_.-]*"
            raise InvalidResourceUri(msg)
    return ResourceUri(plugin=plugin, repo=segments[0], type=segments[1], tag=segments[2], query=query)
