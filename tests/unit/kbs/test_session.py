"""protocol.RcarSession: the RCAR state machine, the token binding check and the one 401 rule. Pure."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import AttestationRejected, KbsProtocolError, KbsTransportError, ResourceNotFound
from agent.kbs import protocol
from agent.kbs.protocol import RcarSession, Renew, Step

KBS = "http://kbs.test"
OURS = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "AAAA", "y": "BBBB"}
OTHER = {**OURS, "x": "CCCC"}
NONCE = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
COOKIE = "kbs-session-id=0123456789abcdef0123456789abcdef; Expires=Wed, 01 Jan 2099 00:00:00 GMT"
CHALLENGE = json.dumps({"nonce": NONCE, "extra-params": ""}).encode()
EVIDENCE = b'{"svn":"1","report_data":"x"}'


def _b64(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def jwt(claims: dict[str, object]) -> str:
    return f"{_b64({'alg': 'ES256', 'typ': 'JWT'})}.{_b64(claims)}.c2ln"


def ear(pubkey: object, name: str = "cpu0") -> dict[str, object]:
    return {
        "iat": 100,
        "exp": 400,
        "submods": {name: {"ear.veraison.annotated-evidence": {"runtime_data_claims": {"tee-pubkey": pubkey}}}},
    }


def attest_reply(claims: dict[str, object]) -> bytes:
    return json.dumps({"token": jwt(claims)}).encode()


def error_body(variant: str, detail: str = "d") -> bytes:
    return json.dumps(
        {"type": f"https://github.com/confidential-containers/kbs/errors/{variant}", "detail": detail}
    ).encode()


def attested(claims: dict[str, object] | None = None) -> RcarSession:
    session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS)
    session.auth_request()
    session.receive_auth(200, CHALLENGE, [COOKIE])
    session.binding_digest()
    session.attest_request(EVIDENCE)
    session.receive_attest(200, attest_reply(claims or ear(OURS)))
    return session


class TestHappyPath:
    def test_background_check_sequence(self) -> None:
        session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS, init_data_toml='version = "0.1.0"')
        auth = session.auth_request()
        assert (auth.method, auth.path) == ("POST", "/kbs/v0/auth")
        assert json.loads(auth.body or b"")["tee"] == "sample"
        challenge = session.receive_auth(200, CHALLENGE, ["other=1", COOKIE])
        assert challenge.nonce == NONCE
        assert session.cookie == "0123456789abcdef0123456789abcdef"
        digest = session.binding_digest()
        assert digest == protocol.binding_digest(protocol.runtime_data(NONCE, OURS))
        attest = session.attest_request(EVIDENCE)
        assert attest.headers is not None
        assert attest.headers["Cookie"] == "kbs-session-id=0123456789abcdef0123456789abcdef"
        body = json.loads(attest.body or b"")
        assert body["runtime-data"] == {"nonce": NONCE, "tee-pubkey": OURS}
        assert body["init-data"] == {"format": "toml", "body": 'version = "0.1.0"'}
        token = session.receive_attest(200, attest_reply(ear(OURS)))
        assert token.exp == 400
        assert session.step is Step.ATTESTED
        get = session.resource_request("/kbs/v0/resource/a/b/c")
        assert get.headers == {"Authorization": f"Bearer {token.raw}", "Cookie": f"kbs-session-id={session.cookie}"}
        assert "Bearer" not in repr(get)
        assert session.receive_resource(200, b"{jwe}", what="a/b/c", may_renew=True) == b"{jwe}"

    def test_passport_session_starts_attested_without_cookie(self) -> None:
        token = protocol.parse_token(jwt(ear(OURS)))
        session = RcarSession.with_token(token, OURS, kbs=KBS)
        assert session.step is Step.ATTESTED
        assert session.resource_request("/kbs/v0/resource/a/b/c").headers == {"Authorization": f"Bearer {token.raw}"}
        with pytest.raises(RuntimeError, match="RCAR auth called in state 'attested', expected 'new'"):
            session.auth_request()


# -- the state machine as a model: every step is allowed in exactly one state -------------------------------------

ACTIONS: dict[str, tuple[Step, Callable[[RcarSession], object]]] = {
    "auth": (Step.NEW, lambda s: s.auth_request()),
    "receive_auth": (Step.AUTH_SENT, lambda s: s.receive_auth(200, CHALLENGE, [COOKIE])),
    "binding": (Step.CHALLENGED, lambda s: s.binding_digest()),
    "attest": (Step.CHALLENGED, lambda s: s.attest_request(EVIDENCE)),
    "receive_attest": (Step.ATTEST_SENT, lambda s: s.receive_attest(200, attest_reply(ear(OURS)))),
    "resource": (Step.ATTESTED, lambda s: s.resource_request("/kbs/v0/resource/a/b/c")),
    "receive_resource": (Step.ATTESTED, lambda s: s.receive_resource(200, b"x", what="a/b/c", may_renew=True)),
}
NEXT = {"auth": Step.AUTH_SENT, "receive_auth": Step.CHALLENGED, "attest": Step.ATTEST_SENT}
NEXT["receive_attest"] = Step.ATTESTED


@given(st.lists(st.sampled_from(sorted(ACTIONS)), max_size=12))
def test_steps_out_of_order_are_refused_and_change_nothing(actions: list[str]) -> None:
    session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS)
    for name in actions:
        allowed_in, call = ACTIONS[name]
        before = session.step
        if before is allowed_in:
            call(session)
            assert session.step is NEXT.get(name, before)
        else:
            with pytest.raises(RuntimeError, match=f"called in state '{before.value}'"):
                call(session)
            assert session.step is before


@given(st.integers(min_value=100, max_value=599).filter(lambda s: s != 200), st.binary(max_size=200))
def test_any_failed_auth_is_a_kbs_error_and_fails_the_session(status: int, body: bytes) -> None:
    session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS)
    session.auth_request()
    expected = {401: AttestationRejected, 404: ResourceNotFound}.get(status, KbsTransportError)
    with pytest.raises(expected):
        session.receive_auth(status, body, [COOKIE])
    assert session.step is Step.FAILED
    with pytest.raises(RuntimeError):
        session.binding_digest()


@given(st.binary(max_size=300))
def test_garbage_challenge_and_token_are_protocol_errors(body: bytes) -> None:
    session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS)
    session.auth_request()
    errors: list[KbsProtocolError] = []
    try:
        session.receive_auth(200, body, [COOKIE])
    except KbsProtocolError as exc:
        errors.append(exc)
    assert session.step is (Step.FAILED if errors else Step.CHALLENGED)
    assert all(KBS in str(e) for e in errors)
    session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS)
    session.auth_request()
    session.receive_auth(200, CHALLENGE, [COOKIE])
    session.attest_request(EVIDENCE)
    with pytest.raises(KbsProtocolError):  # random bytes are never a token bound to our key
        session.receive_attest(200, body)
    assert session.step is Step.FAILED


class TestErrorsNameTheCause:
    def test_nested_challenge(self) -> None:
        session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS)
        session.auth_request()
        with pytest.raises(KbsProtocolError) as info:
            session.receive_auth(200, b'{"nonce":' + b"[" * 100 + b"]" * 100 + b"}", [COOKIE])
        assert str(info.value) == (
            "KBS challenge is nested more than 64 levels deep, expected at most 64. (KBS at http://kbs.test)"
        )

    def test_missing_cookie(self) -> None:
        session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS)
        session.auth_request()
        with pytest.raises(KbsProtocolError, match="did not set the kbs-session-id cookie"):
            session.receive_auth(200, CHALLENGE, ["Expires=x"])

    def test_5xx_is_unavailable_not_a_refusal(self) -> None:
        session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS)
        session.auth_request()
        with pytest.raises(KbsTransportError) as info:
            session.receive_auth(503, b"busy", [])
        assert str(info.value) == "KBS at http://kbs.test auth failed with HTTP 503"

    def test_version_mismatch_is_a_refusal_with_the_detail(self) -> None:
        session = RcarSession(tee="sample", tee_pubkey=OURS, kbs=KBS)
        session.auth_request()
        detail = "Attestation error: RCAR handshake Auth failed: KBS Client Protocol Version Mismatch"
        with pytest.raises(AttestationRejected, match="Version Mismatch"):
            session.receive_auth(401, error_body("AttestationError", detail), [])


class TestBinding:
    @pytest.mark.parametrize(
        "claims",
        [
            {"tee-pubkey": OTHER},
            ear(OTHER),
            ear(OTHER, name="gpu0"),
            {"customized_claims": {"runtime_data": {"tee-pubkey": OTHER}}},
            {**ear(OURS), "tee-pubkey": OTHER},
            ear({**OURS, "crv": "P-521"}),
            ear("not a key"),
        ],
    )
    def test_foreign_key_fails_the_handshake(self, claims: dict[str, object]) -> None:
        with pytest.raises(KbsProtocolError, match="tee-pubkey is another key, expected the agent's own key"):
            attested(claims)

    def test_foreign_key_in_passport_token(self) -> None:
        with pytest.raises(KbsProtocolError, match="another key"):
            RcarSession.with_token(protocol.parse_token(jwt(ear(OTHER))), OURS, kbs=KBS)

    @pytest.mark.parametrize(
        "claims", [ear(OURS), {"tee-pubkey": OURS}, {"iat": 1, "exp": 2}, ear({**OURS, "kid": "x"})]
    )
    def test_own_or_absent_key_accepted(self, claims: dict[str, object]) -> None:
        assert attested(claims).step is Step.ATTESTED


class TestResourceRule:
    @pytest.mark.parametrize("variant", ["TokenVerifierError", "TokenNotFound", "PolicyDeny", "Unknown"])
    def test_401_renews_once(self, variant: str) -> None:
        session = attested()
        assert session.receive_resource(401, error_body(variant), what="a/b/c", may_renew=True) is Renew.CREDENTIAL
        with pytest.raises(AttestationRejected, match=variant):
            session.receive_resource(401, error_body(variant), what="a/b/c", may_renew=False)

    def test_missing_resource_is_final_and_says_so(self) -> None:
        session = attested()
        with pytest.raises(AttestationRejected) as info:
            session.receive_resource(
                401, error_body("PluginInternalError", "Plugin internal error"), what="a/b/c", may_renew=True
            )
        assert str(info.value) == (
            "KBS resource a/b/c failed with HTTP 401: PluginInternalError: Plugin internal error"
            " (the resource may not exist, or the KBS resource policy refused it)"
        )

    def test_unsupported_key_is_final(self) -> None:
        with pytest.raises(AttestationRejected, match=r"kbs\.tee_key_algorithm"):
            attested().receive_resource(401, error_body("JweError", "JWE failed"), what="a/b/c", may_renew=True)

    @pytest.mark.parametrize(
        ("status", "error"), [(500, KbsTransportError), (413, KbsTransportError), (404, ResourceNotFound)]
    )
    def test_other_statuses(self, status: int, error: type[Exception]) -> None:
        with pytest.raises(error):
            attested().receive_resource(status, b"", what="a/b/c", may_renew=True)
