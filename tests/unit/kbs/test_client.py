"""KbsClient orchestration against an in-memory transport: single flight, shared failures, cancellation."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from agent.config import KbsConfig
from agent.errors import AttestationRejected, KbsProtocolError
from agent.kbs.client import KbsClient
from agent.tee.sample import SampleAttester


class GatedKbs:
    """Answers /auth only after `release` is set, with a fixed status."""

    def __init__(self, status: int = 401, set_cookie: bool = True) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.status = status
        self.set_cookie = set_cookie

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        await self.release.wait()
        if self.status != 200:
            body = {"type": "https://github.com/confidential-containers/kbs/errors/AttestationError", "detail": "no"}
            return httpx.Response(self.status, json=body)
        headers = {"Set-Cookie": "kbs-session-id=0123456789abcdef0123456789abcdef"} if self.set_cookie else {}
        return httpx.Response(200, json={"nonce": "bm9uY2U=", "extra-params": ""}, headers=headers)


def client_for(handler: GatedKbs) -> KbsClient:
    return KbsClient(KbsConfig(url="http://kbs.test"), SampleAttester(), transport=httpx.MockTransport(handler))


async def test_waiters_share_one_failed_handshake() -> None:
    kbs = GatedKbs(status=401)
    client = client_for(kbs)
    tasks = [asyncio.create_task(client.session()) for _ in range(10)]
    await asyncio.sleep(0.05)
    kbs.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    assert all(isinstance(r, AttestationRejected) for r in results)
    assert client.handshakes == 1
    assert kbs.calls == 1
    assert str(results[0]) == "KBS auth failed with HTTP 401: AttestationError: no"


async def test_cancelled_waiter_does_not_cancel_the_handshake() -> None:
    kbs = GatedKbs(status=200, set_cookie=False)
    client = client_for(kbs)
    first = asyncio.create_task(client.session())
    second = asyncio.create_task(client.session())
    await asyncio.sleep(0.05)
    first.cancel()
    kbs.release.set()
    with pytest.raises(KbsProtocolError, match="did not set the kbs-session-id cookie"):
        await second
    assert first.cancelled()
    await client.aclose()
    assert client.handshakes == 1


async def test_next_call_after_failure_retries() -> None:
    kbs = GatedKbs(status=401)
    kbs.release.set()
    client = client_for(kbs)
    for _ in range(2):
        with pytest.raises(AttestationRejected):
            await client.session()
    await client.aclose()
    assert client.handshakes == 2


async def test_request_shapes() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/kbs/v0/auth":
            return httpx.Response(
                200,
                json={"nonce": "bm9uY2U=", "extra-params": ""},
                headers={
                    "Set-Cookie": f"kbs-session-id={'0123456789abcdef' * 2}; Expires=Wed, 01 Jan 2099 00:00:00 GMT"
                },
            )
        return httpx.Response(200, json={"token": "e30.eyJleHAiOjQxMDI0NDQ4MDB9.c2ln"})

    client = KbsClient(KbsConfig(url="http://kbs.test/"), SampleAttester(), transport=httpx.MockTransport(handler))
    session = await client.session()
    await client.aclose()
    auth, attest = seen
    assert auth.headers["content-type"] == "application/json"
    assert json.loads(auth.content)["version"] == "0.4.0"
    assert attest.headers["cookie"] == "kbs-session-id=0123456789abcdef0123456789abcdef"
    body = json.loads(attest.content)
    assert body["runtime-data"]["nonce"] == "bm9uY2U="
    assert set(body["tee-evidence"]) == {"primary_evidence", "additional_evidence"}
    assert session.token.exp == 4102444800.0
    assert session.cookie == "0123456789abcdef0123456789abcdef"
