"""The registry client with an injected transport: hostile sizes and bodies never reach memory unbounded."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from agent.errors import ImageFormatError, RegistryError
from agent.image.manifest import MAX_MANIFEST_BYTES, Descriptor
from agent.image.reference import parse_reference
from agent.image.registries import PullTask
from agent.image.registry import Deadline, RegistryClient

DIGEST = "sha256:" + "a" * 64


def client(handler: httpx.MockTransport) -> RegistryClient:
    return RegistryClient(transport=handler)


def task() -> PullTask:
    return PullTask(reference=parse_reference("registry.test/app:v1"))


class TestHostile:
    async def test_oversized_manifest_is_cut_off(self) -> None:
        served = []

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v2/":
                return httpx.Response(200)

            async def body() -> AsyncIterator[bytes]:
                for _ in range(MAX_MANIFEST_BYTES // 65536 + 10):
                    served.append(1)
                    yield b" " * 65536

            return httpx.Response(200, content=body())

        registry = client(httpx.MockTransport(handler))
        try:
            session = registry.session(task(), None, Deadline(10))
            with pytest.raises(ImageFormatError, match=re.escape(f"expected at most {MAX_MANIFEST_BYTES}")):
                await session.get_manifest("v1")
        finally:
            await registry.aclose()
        assert len(served) <= MAX_MANIFEST_BYTES // 65536 + 2  # reading stopped at the limit

    async def test_config_larger_than_descriptor(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=b"x" * 100)

        registry = client(httpx.MockTransport(handler))
        try:
            session = registry.session(task(), None, Deadline(10))
            descriptor = Descriptor(media_type="application/vnd.oci.image.config.v1+json", digest=DIGEST, size=10)
            with pytest.raises(ImageFormatError, match="answered more than 10 bytes"):
                await session.get_blob(descriptor, limit=1 << 20)
        finally:
            await registry.aclose()

    async def test_manifest_digest_header_mismatch(self) -> None:
        body = json.dumps({"schemaVersion": 2}).encode()

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v2/":
                return httpx.Response(200)
            return httpx.Response(200, content=body, headers={"Docker-Content-Digest": DIGEST})

        registry = client(httpx.MockTransport(handler))
        try:
            session = registry.session(task(), None, Deadline(10))
            with pytest.raises(ImageFormatError, match=re.escape(f"expected {DIGEST}")):
                await session.get_manifest("v1")
        finally:
            await registry.aclose()

    async def test_4xx_is_not_retried(self) -> None:
        calls = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request.url.path)
            if request.url.path == "/v2/":
                return httpx.Response(200)
            return httpx.Response(403, json={"errors": [{"code": "DENIED", "message": "no"}]})

        registry = client(httpx.MockTransport(handler))
        try:
            session = registry.session(task(), None, Deadline(10))
            with pytest.raises(RegistryError, match="answered HTTP 403: DENIED no") as info:
                await session.get_manifest("v1")
            assert info.value.status == 403
        finally:
            await registry.aclose()
        assert calls == ["/v2/", "/v2/app/manifests/v1"]

    async def test_token_is_not_sent_to_a_plain_http_realm(self) -> None:
        seen: list[str | None] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers.get("authorization"))
            if request.url.path == "/v2/":
                return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="http://evil.test/token"'})
            return httpx.Response(401)

        from agent.image.auth import Credentials

        registry = client(httpx.MockTransport(handler))
        try:
            session = registry.session(task(), Credentials("u", "secret"), Deadline(10))
            with pytest.raises(RegistryError):
                await session.get_manifest("v1")
        finally:
            await registry.aclose()
        assert all(h is None or "secret" not in h for h in seen)
        assert not any(h and h.startswith("Basic") for h in seen)
