"""An in-memory KBS transport for the KBS client's unit tests: a handler written with httpx's request and response
models answers instead of a server (the real transport, `agent.kbs.http.Pool`, has its own tests on loopback).

The handler may be sync or async, return an `httpx.Response` (its body may be an async iterator, read here with
the same size bound as the real transport), or raise one of `agent.kbs.http`'s errors.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import httpx

from agent.kbs.http import HttpResponse, ResponseTooLarge

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]

ORIGIN = "http://kbs.test"


class MockTransport:
    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def send(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None, *, max_bytes: int
    ) -> HttpResponse:
        request = httpx.Request(method, ORIGIN + path, headers=dict(headers), content=body)
        answer = self._handler(request)
        response = await answer if inspect.isawaitable(answer) else answer
        chunks: list[bytes] = []
        size = 0
        # a body given as bytes is already read (httpx reads it when the response is built); an iterator streams
        stream = _whole(response.content) if response.is_stream_consumed else response.aiter_raw()
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                raise ResponseTooLarge(max_bytes)
            chunks.append(chunk)
        fields = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in response.headers.raw)
        return HttpResponse(response.status_code, fields, b"".join(chunks))

    async def aclose(self) -> None:
        return None


async def _whole(content: bytes) -> AsyncIterator[bytes]:
    yield content
