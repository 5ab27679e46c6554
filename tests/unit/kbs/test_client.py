"""KbsClient orchestration against an in-memory transport: single flight, shared failures, cancellation."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cvm_tools.sign import encode_compact

from agent.config import KbsConfig
from agent.errors import AttestationRejected, KbsProtocolError, KbsTransportError
from agent.kbs.client import KbsClient
from agent.kbs.http import ReadError
from agent.kbs.jwe import TeeKeyPair, encrypt
from agent.kbs.resource import parse_resource_uri
from agent.strictjson import b64url_decode, b64url_encode
from agent.tee.sample import SampleAttester
from tests.fakes.kbs_transport import MockTransport


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
    return KbsClient(KbsConfig(url="http://kbs.test"), SampleAttester(), transport=MockTransport(handler))


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

    client = KbsClient(KbsConfig(url="http://kbs.test/"), SampleAttester(), transport=MockTransport(handler))
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


# -- a small in-memory KBS with real crypto, and the faults the client must survive ------------------------------


class FakeKbs:
    """auth/attest/resource as Trustee answers them; `faults` maps a path prefix to a list of one-shot answers."""

    def __init__(self, *, lifetime: int = 300, clock: list[float] | None = None, foreign_key: bool = False) -> None:
        self.lifetime = lifetime
        self.now = clock or [1_000_000.0]
        self.foreign_key = foreign_key
        self.signer = ec.generate_private_key(ec.SECP256R1())
        self.calls: dict[str, int] = {"auth": 0, "attest": 0, "resource": 0}
        self.faults: dict[str, list[httpx.Response | Exception]] = {}
        self.seen: list[httpx.Request] = []
        self.pubkey: dict[str, str] = {}
        self.gate: asyncio.Event | None = None  # when set, /auth waits for it

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        path = request.url.path
        step = path.split("/")[3]
        queued = self.faults.get(step)
        if queued:
            fault = queued.pop(0)
            if isinstance(fault, Exception):
                raise fault
            return fault
        self.calls[step] += 1
        if step == "auth" and self.gate is not None:
            await self.gate.wait()
        if step == "auth":
            cookie = "kbs-session-id=" + "ab" * 16
            return httpx.Response(200, json={"nonce": "bm9uY2U=", "extra-params": ""}, headers={"Set-Cookie": cookie})
        if step == "attest":
            self.pubkey = json.loads(request.content)["runtime-data"]["tee-pubkey"]
            claimed = dict(self.pubkey, x=TeeKeyPair.generate().public_jwk()["x"]) if self.foreign_key else self.pubkey
            iat = int(self.now[0])
            claims = {"iat": iat, "exp": iat + self.lifetime, "tee-pubkey": claimed}
            return httpx.Response(200, json={"token": encode_compact(self.signer, {"typ": "JWT"}, claims)})
        return httpx.Response(200, content=encrypt(self.pubkey, SECRET_VALUE))


SECRET_VALUE = b"fake-kbs-secret"
URI = parse_resource_uri("kbs:///default/key/1")


def fake_client(kbs: FakeKbs, *, timeout_s: float = 5.0, clock: bool = True, **config: Any) -> KbsClient:
    return KbsClient(
        KbsConfig(url="https://kbs.test", timeout_s=timeout_s, **config),
        SampleAttester(),
        transport=MockTransport(kbs),
        clock=(lambda: kbs.now[0]) if clock else None,
        sleep=_no_sleep,
    )


async def _no_sleep(_seconds: float) -> None:
    return None


async def test_identity_encoding_requested_and_compressed_answer_refused() -> None:
    kbs = FakeKbs()
    kbs.faults["auth"] = [httpx.Response(200, content=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"})]
    async with fake_client(kbs) as client:
        with pytest.raises(KbsProtocolError) as info:
            await client.get_resource(URI)
        assert str(info.value) == (
            "KBS at https://kbs.test answered POST /kbs/v0/auth with Content-Encoding 'gzip', expected identity"
        )
        assert kbs.seen[0].headers["accept-encoding"] == "identity"
        assert kbs.seen[0].headers["user-agent"].startswith("cvm-agent/")
        assert await client.get_resource(URI) == SECRET_VALUE  # the next call recovers


async def test_503_then_recovers_within_one_exchange() -> None:
    kbs = FakeKbs()
    kbs.faults["auth"] = [httpx.Response(503), httpx.Response(502)]
    async with fake_client(kbs) as client:
        assert await client.get_resource(URI) == SECRET_VALUE
    assert client.handshakes == 1


async def test_500_is_unavailable_naming_the_kbs() -> None:
    kbs = FakeKbs()
    kbs.faults["auth"] = [httpx.Response(500, json={"type": "x/Internal", "detail": "boom"})]
    async with fake_client(kbs) as client:
        with pytest.raises(
            KbsTransportError, match=r"^KBS at https://kbs\.test auth failed with HTTP 500: Internal: boom$"
        ):
            await client.get_resource(URI)


async def test_connection_reset_is_retried() -> None:
    kbs = FakeKbs()
    kbs.faults["resource"] = [ReadError("[Errno 104] Connection reset by peer")]
    async with fake_client(kbs) as client:
        assert await client.get_resource(URI) == SECRET_VALUE


async def test_oversized_body_refused() -> None:
    kbs = FakeKbs()
    kbs.faults["attest"] = [httpx.Response(200, content=b" " * 2000)]
    async with fake_client(kbs, max_response_bytes=1000) as client:
        with pytest.raises(KbsTransportError, match="exceeds 1000 bytes"):
            await client.get_resource(URI)


async def test_dripping_body_hits_the_exchange_deadline() -> None:
    async def drip() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.02)
            yield b" "

    kbs = FakeKbs()
    kbs.faults["auth"] = [httpx.Response(200, content=drip())]
    async with fake_client(kbs, timeout_s=0.3) as client:
        with pytest.raises(KbsTransportError) as info:
            await client.get_resource(URI)
    assert str(info.value) == "KBS at https://kbs.test did not answer POST /kbs/v0/auth within 0.3 s (kbs.timeout_s)"


async def test_foreign_tee_pubkey_never_reaches_a_caller() -> None:
    kbs = FakeKbs(foreign_key=True)
    async with fake_client(kbs) as client:
        with pytest.raises(KbsProtocolError, match="tee-pubkey is another key"):
            await client.fresh_session()
        assert client._credentials.current is None
    assert kbs.calls["resource"] == 0


@pytest.mark.parametrize("field", ["tag", "ciphertext", "protected", "iv"])
async def test_tampered_jwe_is_unavailable_not_internal(field: str) -> None:
    kbs = FakeKbs()
    async with fake_client(kbs) as client:
        await client.session()
        good = json.loads(encrypt(kbs.pubkey, SECRET_VALUE))
        raw = bytearray(b64url_decode(good[field], field))
        raw[0] ^= 1
        good[field] = b64url_encode(bytes(raw))
        kbs.faults["resource"] = [httpx.Response(200, json=good)]
        with pytest.raises(KbsProtocolError) as info:
            await client.get_resource(URI)
    assert str(info.value) == (
        "KBS at https://kbs.test: the response for resource default/key/1 cannot be decrypted with the agent's key"
    )


async def test_expired_on_arrival_token_fails_the_handshake() -> None:
    kbs = FakeKbs(lifetime=-10)
    async with fake_client(kbs) as client:
        with pytest.raises(KbsProtocolError, match="already expired"):
            await client.session()


async def test_401_renews_the_session_once() -> None:
    kbs = FakeKbs()
    async with fake_client(kbs) as client:
        await client.get_resource(URI)
        kbs.faults["resource"] = [
            httpx.Response(401, json={"type": "x/TokenVerifierError", "detail": "Token Verifier error"})
        ]
        assert await client.get_resource(URI) == SECRET_VALUE
    assert kbs.calls["auth"] == 2


class TestTokenRefresh:
    async def test_short_tokens_do_not_cost_a_handshake_per_call(self) -> None:
        kbs = FakeKbs(lifetime=20)
        async with fake_client(kbs, token_refresh_margin_s=30) as client:
            for _ in range(10):
                assert await client.get_resource(URI) == SECRET_VALUE
                kbs.now[0] += 1  # 10 calls over 10 s of a 20 s token
        assert kbs.calls["auth"] == 1

    async def test_background_renewal_serves_the_old_token_meanwhile(self) -> None:
        kbs = FakeKbs(lifetime=20)
        async with fake_client(kbs) as client:
            first = await client.session()
            assert first.refresh_at is not None
            assert first.received_at + 15 <= first.refresh_at <= first.received_at + 16
            kbs.now[0] += 16.5
            assert await client.session() is first  # due: renewal started, nobody waits
            await asyncio.sleep(0.05)
            second = await client.session()
        assert second is not first
        assert kbs.calls["auth"] == 2

    async def test_failed_renewal_backs_off_while_the_old_token_is_valid(self) -> None:
        kbs = FakeKbs(lifetime=100)
        async with fake_client(kbs) as client:
            first = await client.session()
            kbs.now[0] += 81
            kbs.faults["auth"] = [httpx.Response(500)] * 2
            assert await client.session() is first
            await asyncio.sleep(0.05)
            assert len(kbs.faults["auth"]) == 1
            assert await client.session() is first  # within the backoff: no new attempt
            await asyncio.sleep(0.05)
            assert len(kbs.faults["auth"]) == 1
            kbs.now[0] += 2.5  # past the first backoff (1-2 s)
            assert await client.session() is first
            await asyncio.sleep(0.05)
            assert kbs.faults["auth"] == []
            kbs.now[0] += 4.5  # past the second backoff (2-4 s): this renewal succeeds
            assert await client.session() is first
            await asyncio.sleep(0.05)
            assert await client.session() is not first
        assert kbs.calls["auth"] == 2

    async def test_close_stops_a_running_renewal(self) -> None:
        kbs = FakeKbs(lifetime=20)
        client = fake_client(kbs)
        first = await client.session()
        kbs.gate = asyncio.Event()
        kbs.now[0] += 16.5
        assert await client.session() is first
        await asyncio.sleep(0.05)
        assert renewing(client)
        await client.aclose()
        await asyncio.sleep(0.05)
        assert not renewing(client)
        assert client._credentials.current is first


def renewing(client: KbsClient) -> bool:
    return client._credentials._shared.busy


class HangingAttester(SampleAttester):
    async def get_evidence(self, runtime_data: bytes) -> bytes:
        await asyncio.Event().wait()
        raise AssertionError


async def test_a_shared_handshake_ends_at_its_own_deadline() -> None:
    kbs = FakeKbs()
    client = KbsClient(
        KbsConfig(url="https://kbs.test", timeout_s=0.2), HangingAttester(), transport=MockTransport(kbs)
    )
    results = await asyncio.gather(*(client.get_resource(URI) for _ in range(3)), return_exceptions=True)
    await client.aclose()
    assert [str(r) for r in results] == [
        "KBS at https://kbs.test: attestation did not finish within 0.4 s (2 x kbs.timeout_s)"
    ] * 3
    assert all(isinstance(r, KbsTransportError) for r in results)
    assert client.handshakes == 1


class SlowQuoteAttester(SampleAttester):
    """A sample attester whose quote blocks a worker thread until the event loop has served someone else."""

    def __init__(self) -> None:
        self.quotes = 0
        self.quote_started = asyncio.Event()
        self.served_meanwhile = threading.Event()

    async def get_evidence(self, runtime_data: bytes) -> bytes:
        self.quotes += 1
        self.quote_started.set()
        # a configfs quote takes ~1 s; the loop must keep serving while it runs (`served_meanwhile` is set by
        # another coroutine on the loop: if the loop were blocked, the wait would time out and fail the handshake)
        if not await asyncio.to_thread(self.served_meanwhile.wait, 10):
            msg = "the event loop did not run while the quote was taken"
            raise AssertionError(msg)
        return await super().get_evidence(runtime_data)


async def test_one_quote_per_handshake_and_the_loop_serves_meanwhile() -> None:
    kbs, attester = FakeKbs(), SlowQuoteAttester()
    client = KbsClient(
        KbsConfig(url="https://kbs.test"), attester, transport=MockTransport(kbs), clock=lambda: kbs.now[0]
    )
    async with client:
        fetch = asyncio.create_task(client.get_resource(URI))
        await attester.quote_started.wait()
        assert not fetch.done()
        attester.served_meanwhile.set()  # another caller served on the loop while the quote is pending
        assert await fetch == SECRET_VALUE
        await client.fresh_session()
    assert attester.quotes == 2
    assert client.handshakes == 2


async def test_a_warm_get_resource_is_exactly_one_kbs_request() -> None:
    kbs = FakeKbs()
    async with fake_client(kbs) as client:
        await client.get_resource(URI)
        before = dict(kbs.calls)
        for _ in range(5):
            assert await client.get_resource(URI) == SECRET_VALUE
    assert kbs.calls == {"auth": before["auth"], "attest": before["attest"], "resource": before["resource"] + 5}
