"""Image references: parsing and normalisation as the reference puller does it. Pure.

Grammar and defaults follow the distribution reference grammar as oci-spec-rs implements it (image-pull.md §2.2):
`[domain/]path[:tag][@digest]`; a first path component without `.` or `:` that is not `localhost` is not a
domain, so the registry is `docker.io`; `index.docker.io` is rewritten to `docker.io`; single-segment docker.io
repositories get `library/`; no tag and no digest means `:latest`. Digests are `sha256`, `sha384` or `sha512`
with 64, 96 or 128 lowercase hex digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import InvalidImageReference

__all__ = [
    "DIGEST_HEX_LENGTHS",
    "DOCKER_HUB",
    "ImageReference",
    "parse_digest",
    "parse_reference",
]

DOCKER_HUB = "docker.io"
DOCKER_HUB_LEGACY = "index.docker.io"
DOCKER_HUB_HOST = "index.docker.io"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255
MAX_REFERENCE_LENGTH = 4096
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-zA-Z]{32,}"
_REFERENCE = re.compile(rf"({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?")
_ANYCASE_REFERENCE = re.compile(rf"({_NAME.replace('a-z0-9', 'a-zA-Z0-9')})(?::({_TAG}))?(?:@({_DIGEST}))?")
_HEX = re.compile(r"[0-9a-f]+")


def parse_digest(text: str, *, what: str = "digest") -> str:
    """`<algorithm>:<hex>` with a supported algorithm and its exact lowercase hex length."""
    algorithm, sep, hex_part = text.partition(":")
    if not sep:
        msg = f"{what} is {text[:80]!r}, expected <algorithm>:<hex>"
        raise InvalidImageReference(msg)
    want = DIGEST_HEX_LENGTHS.get(algorithm)
    if want is None:
        msg = f"{what} algorithm is {algorithm[:20]!r}, expected one of: {', '.join(DIGEST_HEX_LENGTHS)}"
        raise InvalidImageReference(msg)
    if len(hex_part) != want or not _HEX.fullmatch(hex_part):
        msg = f"{what} is {text[:80]!r}, expected {want} lowercase hex digits after {algorithm}:"
        raise InvalidImageReference(msg)
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageReference:
    """A normalised reference: `registry` (`docker.io` for Docker Hub), `repository`, optional tag and digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """`registry/repository`."""
        return f"{self.registry}/{self.repository}"

    def whole(self) -> str:
        """The full normalised form, e.g. `docker.io/library/busybox:latest` (used for policy scopes)."""
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def __str__(self) -> str:
        return self.whole()

    @property
    def api_host(self) -> str:
        """The host (with port) the registry API is reached at: Docker Hub's is `index.docker.io`."""
        return DOCKER_HUB_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def manifest_reference(self) -> str:
        """What goes after `/manifests/`: the digest when there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    def with_registry(self, registry: str, repository: str) -> ImageReference:
        return ImageReference(registry=registry, repository=repository, tag=self.tag, digest=self.digest)

    def with_digest(self, digest: str) -> ImageReference:
        """The same repository pinned to `digest` (the tag is dropped)."""
        return ImageReference(registry=self.registry, repository=self.repository, digest=digest)


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if not sep or (("." not in first and ":" not in first and not first.startswith("[")) and first != "localhost"):
        domain, remainder = DOCKER_HUB, name
    else:
        domain, remainder = first, rest
    if domain == DOCKER_HUB_LEGACY:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in remainder:
        remainder = f"library/{remainder}"
    return domain, remainder


def parse_reference(text: str) -> ImageReference:
    """Parse and normalise an image reference as given by the runtime (short, qualified, or digest-pinned).

    Raises:
        InvalidImageReference: the text does not follow the grammar, the repository has uppercase letters,
            the name is too long, or the digest is malformed or uses an unsupported algorithm.
    """
    if not text:
        msg = "image reference is empty, expected [registry/]repository[:tag][@digest]"
        raise InvalidImageReference(msg)
    if len(text) > MAX_REFERENCE_LENGTH:
        msg = f"image reference is {len(text)} characters, expected at most {MAX_REFERENCE_LENGTH}"
        raise InvalidImageReference(msg)
    match = _REFERENCE.fullmatch(text)
    if match is None:
        if _ANYCASE_REFERENCE.fullmatch(text):
            msg = f"image reference {text[:200]!r} has an uppercase repository name, expected lowercase"
        else:
            msg = f"image reference {text[:200]!r} is not [registry/]repository[:tag][@digest]"
        raise InvalidImageReference(msg)
    name, tag, digest = match.group(1), match.group(2), match.group(3)
    if len(name) > MAX_NAME_LENGTH:
        msg = f"image name is {len(name)} characters, expected at most {MAX_NAME_LENGTH}"
        raise InvalidImageReference(msg)
    if digest is not None:
        parse_digest(digest, what="image reference digest")
    registry, repository = _split_domain(name)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(registry=registry, repository=repository, tag=tag, digest=digest)
