"""RCAR 0.4.0 messages and the runtime-data binding (known answers from kbs-protocol.md §5.1)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import AttestationRejected, KbsProtocolError
from agent.kbs import protocol

NONCE = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
PUBKEY = {
    "kty": "EC",
    "crv": "P-256",
    "alg": "ECDH-ES+A256KW",
    "x": "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis",
    "y": "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE",
}
DIGEST_HEX = "7e3c430d1b20027dfa91ba1dd104beca19d90df8d91b7fb9511a6854d70541021962a1b216b184b0b17813eba377f204"


class TestBinding:
    def test_worked_example(self) -> None:
        digest = protocol.binding_digest(protocol.runtime_data(NONCE, PUBKEY))
        assert digest.hex() == DIGEST_HEX

    def test_canonical_bytes(self) -> None:
        from agent.kbs.jcs import canonicalize

        expected = (
            '{"additional-evidence":"","nonce":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","tee-pubkey":'
            '{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis",'
            '"y":"y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"}}'
        )
        assert canonicalize(protocol.runtime_data(NONCE, PUBKEY)) == expected.encode()

    def test_sample_report_data(self) -> None:
        digest = protocol.binding_digest(protocol.runtime_data(NONCE, PUBKEY))
        assert base64.b64encode(digest).decode() == "fjxDDRsgAn36kbod0QS+yhnZDfjZG3+5URpoVNcFQQIZYqGyFrGEsLF4E+ujd/IE"

    def test_additional_evidence_always_present(self) -> None:
        assert protocol.runtime_data(NONCE, PUBKEY)["additional-evidence"] == ""

    @pytest.mark.parametrize("alg", ["sha256", "sha512"])
    def test_selected_hash(self, alg: str) -> None:
        from agent.kbs.jcs import canonicalize

        rd = protocol.runtime_data(NONCE, PUBKEY)
        assert protocol.binding_digest(rd, alg) == hashlib.new(alg, canonicalize(rd)).digest()

    def test_unknown_hash(self) -> None:
        with pytest.raises(ValueError, match="sm3"):
            protocol.binding_digest({}, "sm3")


class TestMessages:
    def test_request(self) -> None:
        assert json.loads(protocol.request_body("sample")) == {
            "version": "0.4.0",
            "tee": "sample",
            "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512"]},
        }

    def test_challenge_empty_extra_params(self) -> None:
        challenge = protocol.parse_challenge(json.dumps({"nonce": NONCE, "extra-params": ""}).encode())
        assert challenge.nonce == NONCE
        assert challenge.hash_algorithm == "sha384"

    @pytest.mark.parametrize("extra", [{"selected-hash-algorithm": "SHA512"}, '{"selected-hash-algorithm":"sha512"}'])
    def test_challenge_selected_hash(self, extra: object) -> None:
        challenge = protocol.parse_challenge(json.dumps({"nonce": NONCE, "extra-params": extra}).encode())
        assert challenge.hash_algorithm == "sha512"

    def test_challenge_unsupported_hash(self) -> None:
        body = json.dumps({"nonce": NONCE, "extra-params": {"selected-hash-algorithm": "md5"}}).encode()
        with pytest.raises(KbsProtocolError, match="md5"):
            protocol.parse_challenge(body)

    @pytest.mark.parametrize("body", [b"", b"[]", b'{"nonce": 3}', b'{"nonce": ""}', b"\xff"])
    def test_challenge_malformed(self, body: bytes) -> None:
        with pytest.raises(KbsProtocolError):
            protocol.parse_challenge(body)

    def test_attestation_shape(self) -> None:
        body = json.loads(
            protocol.attestation_body(
                nonce=NONCE, tee_pubkey=PUBKEY, evidence={"svn": "1"}, init_data_toml='version = "0.1.0"'
            )
        )
        assert body == {
            "runtime-data": {"nonce": NONCE, "tee-pubkey": PUBKEY},
            "tee-evidence": {"primary_evidence": {"svn": "1"}, "additional_evidence": ""},
            "init-data": {"format": "toml", "body": 'version = "0.1.0"'},
        }

    def test_attestation_without_init_data(self) -> None:
        body = json.loads(protocol.attestation_body(nonce=NONCE, tee_pubkey=PUBKEY, evidence={}))
        assert "init-data" not in body


def _enc(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _jwt(claims: dict[str, object]) -> str:
    enc = _enc
    return f"{enc({'alg': 'ES256'})}.{enc(claims)}.c2ln"


class TestToken:
    def test_claims(self) -> None:
        token = protocol.parse_attest_response(json.dumps({"token": _jwt({"exp": 100, "nbf": 5})}).encode())
        assert token.exp == 100.0
        assert token.nbf == 5.0
        assert "eyJ" not in repr(token)

    def test_no_exp(self) -> None:
        assert protocol.parse_token(_jwt({"iss": "x"})).exp is None
        assert protocol.parse_token(_jwt({"exp": True})).exp is None

    @pytest.mark.parametrize("raw", ["a.b", "a.!!!.c", f"a.{base64.urlsafe_b64encode(b'[1]').decode()}.c"])
    def test_malformed(self, raw: str) -> None:
        with pytest.raises(KbsProtocolError):
            protocol.parse_token(raw)

    def test_missing_token(self) -> None:
        with pytest.raises(KbsProtocolError, match="no `token`"):
            protocol.parse_attest_response(b"{}")


class TestErrors:
    def test_trustee_body(self) -> None:
        body = json.dumps(
            {
                "type": "https://github.com/confidential-containers/kbs/errors/PolicyDeny",
                "detail": "Access denied by policy",
            }
        ).encode()
        error = protocol.error_from_response(401, body, step="resource a/b/c")
        assert isinstance(error, AttestationRejected)
        assert error.status == 401
        assert error.kbs_type == "PolicyDeny"
        assert error.detail == "Access denied by policy"
        assert str(error) == "KBS resource a/b/c failed with HTTP 401: PolicyDeny: Access denied by policy"

    def test_non_json_body(self) -> None:
        error = protocol.error_from_response(413, b"<html>too large</html>", step="attest")
        assert str(error) == "KBS attest failed with HTTP 413"

    def test_detail_bounded_and_printable(self) -> None:
        body = json.dumps({"type": "x/Y", "detail": "a\nb" + "z" * 5000}).encode()
        error = protocol.error_from_response(401, body, step="auth")
        assert isinstance(error, AttestationRejected)
        assert "\n" not in str(error)
        assert len(error.detail) == protocol.MAX_ERROR_DETAIL


@given(st.binary(max_size=200))
def test_challenge_parser_never_crashes(data: bytes) -> None:
    with contextlib.suppress(KbsProtocolError):
        protocol.parse_challenge(data)


def test_token_longer_than_the_kbs_request_head_is_refused() -> None:
    raw = _jwt({"exp": 1, "pad": "x" * protocol.MAX_TOKEN_BYTES})
    with pytest.raises(KbsProtocolError, match=r"^KBS token is \d+ bytes, expected at most 131072"):
        protocol.parse_attest_response(json.dumps({"token": raw}).encode())
