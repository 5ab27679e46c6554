"""Known answers for reference parsing (image-pull.md §2.2, the distribution grammar as oci-spec-rs applies it)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import InvalidImageReference, InvalidRequest
from agent.image.reference import ImageReference, parse_reference

D64 = "sha256:" + "a" * 64


class TestParseReference:
    @pytest.mark.parametrize(
        ("text", "registry", "repository", "tag", "digest"),
        [
            ("busybox", "docker.io", "library/busybox", "latest", None),
            ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
            ("foo/bar:1", "docker.io", "foo/bar", "1", None),
            ("index.docker.io/x", "docker.io", "library/x", "latest", None),
            ("docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
            ("localhost/app", "localhost", "app", "latest", None),
            ("localhost:5000/a/b:v", "localhost:5000", "a/b", "v", None),
            ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None),
            ("quay.io/a/b@" + D64, "quay.io", "a/b", None, D64),
            ("quay.io/a/b:t@" + D64, "quay.io", "a/b", "t", D64),
            ("Registry.Example.com/a", "Registry.Example.com", "a", "latest", None),
            ("a__b/c-d/e.f", "docker.io", "a__b/c-d/e.f", "latest", None),
            ("busybox@sha512:" + "0" * 128, "docker.io", "library/busybox", None, "sha512:" + "0" * 128),
        ],
    )
    def test_known_answers(
        self, text: str, registry: str, repository: str, tag: str | None, digest: str | None
    ) -> None:
        ref = parse_reference(text)
        assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)

    def test_whole_and_urls(self) -> None:
        ref = parse_reference("busybox")
        assert ref.whole() == "docker.io/library/busybox:latest"
        assert ref.api_host == "index.docker.io"
        assert ref.manifest_reference == "latest"
        pinned = parse_reference("quay.io/a/b:t@" + D64)
        assert pinned.manifest_reference == D64  # the digest wins in URLs, as OC `to_v2_manifest_url`
        assert pinned.whole() == f"quay.io/a/b:t@{D64}"
        assert pinned.api_host == "quay.io"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "image reference is empty"),
            ("Busybox", "has an uppercase repository name"),
            ("quay.io/Org/app", "has an uppercase repository name"),
            ("busybox@sha256:" + "a" * 40, "expected 64 lowercase hex digits"),
            ("busybox@sha256:abc", "is not [registry/]repository"),
            ("busybox@md5:" + "a" * 32, "algorithm is 'md5'"),
            ("busybox@sha256:" + "A" * 64, "expected 64 lowercase hex digits"),
            ("busybox@sha384:" + "a" * 64, "expected 96 lowercase hex digits"),
            ("a/../b", "is not [registry/]repository"),
            ("busy box", "is not [registry/]repository"),
            ("busybox:", "is not [registry/]repository"),
            ("-x/y", "is not [registry/]repository"),
            ("x" * 256, "image name is 256 characters"),
        ],
    )
    def test_rejects(self, text: str, message: str) -> None:
        with pytest.raises(InvalidImageReference, match=re.escape(message)):
            parse_reference(text)

    def test_is_caller_error(self) -> None:
        assert issubclass(InvalidImageReference, InvalidRequest)

    @given(st.text(max_size=300))
    def test_any_text_parses_or_raises_domain_error(self, text: str) -> None:
        try:
            ref = parse_reference(text)
        except InvalidImageReference:
            return
        assert isinstance(ref, ImageReference)
        assert parse_reference(ref.whole()) == ref  # the normal form is a fixed point
