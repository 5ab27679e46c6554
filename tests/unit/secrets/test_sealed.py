"""Sealed secrets: parse, verify, the insecure unverified mode, seal, and interoperability with jwcrypto."""

from __future__ import annotations

import base64
import contextlib
import json
import re

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cvm_tools.sign import generate_signing_key, seal
from hypothesis import given, settings
from hypothesis import strategies as st
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws

from agent.errors import InvalidRequest
from agent.keyprovider.annotation import WrapType
from agent.secrets.sealed import (
    MAX_SEALED_SECRET_SIZE,
    EnvelopeSecret,
    SealedSecret,
    VaultSecret,
    kid_is_resource_uri,
    parse,
    parse_payload,
    parse_unverified,
    verify,
)

# guest-components@8246e5e0977f6322f0a1b0f77e0739cf1c3e1f74 `confidential-data-hub/hub/src/secret/tests/test-key.json`:
# the data hub's own test signing key, a private JWK that the reference also uses as the verification key.
REFERENCE_JWK = {
    "kty": "EC",
    "d": "7baJLiTk68NcLgYPv05jJvElqoAhbzi1ZWx4OyILUtA",
    "use": "sig",
    "crv": "P-256",
    "kid": "test-key",
    "x": "QT3_slJmispaOwnAo6hxebXGLRuiveFuRCLpS4j4S4k",
    "y": "jcDn4N4nRBQ-a7_D3qjqtb6hwOAXh_ve1wvibPSi1G0",
    "alg": "ES256",
}
# ... and `vault-2.json`, `vault-1.json`, `envelope-1.json` (payload samples).
REFERENCE_VAULT_2 = (
    b'{\n  "version": "0.1.0",\n  "type": "vault",\n  "name": "kbs:///one/2/trois",\n  "provider": "kbs",\n'
    b'  "provider_settings": {},\n  "annotations": {}\n}\n'
)
REFERENCE_VAULT_1 = (
    b'{\n  "version": "0.1.0",\n  "type": "vault",\n  "name": "xxx",\n  "provider": "aliyun",\n'
    b'  "provider_settings": {},\n  "annotations": {}\n}\n'
)
REFERENCE_ENVELOPE_1 = (
    b'{\n  "version": "0.1.0",\n  "type": "envelope",\n  "key_id": "xxx",\n  "encrypted_key": "yyy",\n'
    b'  "encrypted_data": "zzz",\n  "wrap_type": "A256GCM",\n  "iv": "www",\n  "provider": "aliyun",\n'
    b'  "provider_settings": {},\n  "annotations": {}\n}\n'
)

VAULT = VaultSecret(name="kbs:///one/2/trois", provider="kbs")
ENVELOPE = EnvelopeSecret(
    key_id="alias/app-key",
    encrypted_key=b"\x01" * 40,
    encrypted_data=b"\x02" * 50,
    wrap_type=WrapType.A256GCM,
    iv=b"\x03" * 12,
    provider="aws",
    provider_settings={"region": "eu-west-1"},
    annotations={"x": [1, 2]},
)
SIGNATURE_FAILS = "sealed secret signature does not verify"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def reference_key() -> ec.EllipticCurvePrivateKey:
    d = int.from_bytes(unb64url(str(REFERENCE_JWK["d"])), "big")
    return ec.derive_private_key(d, ec.SECP256R1())


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def parts(sealed: str) -> list[str]:
    return sealed.split(".")


def jwcrypto_sealed(key: jw_jwk.JWK, payload: bytes, header: dict[str, object]) -> str:
    token = jw_jws.JWS(payload)
    token.add_signature(key, alg=None, protected=json.dumps(header))
    return "sealed." + str(token.serialize(compact=True))


class TestSealAndVerify:
    @pytest.mark.parametrize("payload", [VAULT, ENVELOPE])
    def test_round_trip(self, payload: VaultSecret | EnvelopeSecret) -> None:
        key = reference_key()
        sealed = seal(payload, key, "test-key")
        assert verify(sealed, public_jwk(key)) == payload
        assert verify(parse(sealed), json.dumps(public_jwk(key)).encode()) == payload

    def test_layout(self) -> None:
        sealed = seal(VAULT, reference_key(), "kbs:///default/sealed-secret-key/1")
        prefix, header, payload, signature = parts(sealed)
        assert prefix == "sealed"
        assert unb64url(header) == b'{"alg":"ES256","kid":"kbs:///default/sealed-secret-key/1"}'
        assert unb64url(payload) == (
            b'{"version":"0.1.0","type":"vault","name":"kbs:///one/2/trois","provider":"kbs",'
            b'"provider_settings":{},"annotations":{}}'
        )
        assert len(unb64url(signature)) == 64
        assert "=" not in sealed

    def test_envelope_layout(self) -> None:
        payload = json.loads(unb64url(parts(seal(ENVELOPE, reference_key(), "k"))[2]))
        assert list(payload) == [
            "version",
            "type",
            "key_id",
            "encrypted_key",
            "encrypted_data",
            "wrap_type",
            "iv",
            "provider",
            "provider_settings",
            "annotations",
        ]
        assert payload["type"] == "envelope"
        assert payload["wrap_type"] == "A256GCM"
        assert base64.b64decode(payload["encrypted_key"]) == b"\x01" * 40

    @pytest.mark.parametrize("size", [0, 1, 2, 3])
    def test_no_padding_whatever_the_length(self, size: int) -> None:
        sealed = seal(VaultSecret(name="0" * size, provider="kbs"), reference_key(), "k")
        assert "=" not in sealed

    def test_reference_private_jwk_verifies(self) -> None:
        # The reference verifies with the same JWK it signs with (it carries `d`, `use`, `kid`, `alg`).
        sealed = seal(VAULT, reference_key(), "test-key")
        assert verify(sealed, REFERENCE_JWK) == VAULT
        assert verify(sealed, json.dumps(REFERENCE_JWK).encode()) == VAULT

    def test_signatures_are_randomised(self) -> None:
        key = reference_key()
        assert seal(VAULT, key, "k") != seal(VAULT, key, "k")

    def test_wrong_key(self) -> None:
        sealed = seal(VAULT, reference_key(), "test-key")
        other = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(InvalidRequest, match=f"^{SIGNATURE_FAILS}$"):
            verify(sealed, public_jwk(other))

    def test_seal_needs_p256(self) -> None:
        with pytest.raises(TypeError, match="secp384r1"):
            seal(VAULT, ec.generate_private_key(ec.SECP384R1()), "k")

    def test_seal_needs_kid(self) -> None:
        with pytest.raises(ValueError, match="kid"):
            seal(VAULT, reference_key(), "")


class TestJwcryptoInterop:
    @pytest.mark.parametrize("payload", [VAULT, ENVELOPE])
    def test_jwcrypto_signed_verifies_here(self, payload: VaultSecret | EnvelopeSecret) -> None:
        key = jw_jwk.JWK.generate(kty="EC", crv="P-256")
        body = json.dumps(payload.to_json_object()).encode()
        sealed = jwcrypto_sealed(key, body, {"alg": "ES256", "kid": "kbs:///default/key/sign"})
        secret = parse(sealed)
        assert secret.kid == "kbs:///default/key/sign"
        assert verify(secret, key.export_public(as_dict=True)) == payload
        assert verify(sealed, key.export_public().encode()) == payload

    def test_jwcrypto_header_with_extra_members(self) -> None:
        key = jw_jwk.JWK.generate(kty="EC", crv="P-256")
        body = json.dumps(VAULT.to_json_object()).encode()
        sealed = jwcrypto_sealed(key, body, {"kid": "k", "typ": "JWT", "alg": "ES256"})
        assert verify(sealed, key.export_public(as_dict=True)) == VAULT

    @pytest.mark.parametrize("payload", [VAULT, ENVELOPE])
    def test_sealed_here_verifies_with_jwcrypto(self, payload: VaultSecret | EnvelopeSecret) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        sealed = seal(payload, key, "my-key")
        token = jw_jws.JWS()
        token.deserialize(sealed.removeprefix("sealed."))
        token.verify(jw_jwk.JWK.from_pyca(key.public_key()), alg="ES256")
        assert token.jose_header == {"alg": "ES256", "kid": "my-key"}
        assert parse_payload(token.payload) == payload

    def test_jwcrypto_rejects_a_tampered_seal(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        _, header, _, signature = parts(seal(VAULT, key, "k"))
        forged = b64url(json.dumps(VaultSecret(name="kbs:///x/y/z", provider="kbs").to_json_object()).encode())
        token = jw_jws.JWS()
        token.deserialize(f"{header}.{forged}.{signature}")
        with pytest.raises(jw_jws.InvalidJWSSignature):
            token.verify(jw_jwk.JWK.from_pyca(key.public_key()), alg="ES256")


class TestTampering:
    def sealed(self) -> tuple[str, dict[str, str]]:
        key = ec.generate_private_key(ec.SECP256R1())
        return seal(VAULT, key, "test-key"), public_jwk(key)

    def test_payload_replaced(self) -> None:
        sealed, jwk = self.sealed()
        prefix, header, _, signature = parts(sealed)
        other = b64url(json.dumps(VaultSecret(name="kbs:///evil/key/1", provider="kbs").to_json_object()).encode())
        with pytest.raises(InvalidRequest, match=f"^{SIGNATURE_FAILS}$"):
            verify(f"{prefix}.{header}.{other}.{signature}", jwk)

    def test_header_replaced(self) -> None:
        sealed, jwk = self.sealed()
        prefix, _, payload, signature = parts(sealed)
        header = b64url(b'{"alg":"ES256","kid":"other-key"}')
        with pytest.raises(InvalidRequest, match=f"^{SIGNATURE_FAILS}$"):
            verify(f"{prefix}.{header}.{payload}.{signature}", jwk)

    @pytest.mark.parametrize("index", [0, 31, 32, 63])
    def test_signature_bit_flip(self, index: int) -> None:
        sealed, jwk = self.sealed()
        prefix, header, payload, signature = parts(sealed)
        raw = bytearray(unb64url(signature))
        raw[index] ^= 0x01
        with pytest.raises(InvalidRequest, match=f"^{SIGNATURE_FAILS}$"):
            verify(f"{prefix}.{header}.{payload}.{b64url(bytes(raw))}", jwk)

    @pytest.mark.parametrize("signature", [bytes(64), b"\xff" * 64])
    def test_degenerate_signatures(self, signature: bytes) -> None:
        sealed, jwk = self.sealed()
        prefix, header, payload, _ = parts(sealed)
        with pytest.raises(InvalidRequest, match=f"^{SIGNATURE_FAILS}$"):
            verify(f"{prefix}.{header}.{payload}.{b64url(signature)}", jwk)

    def test_high_s_signature_still_verifies(self) -> None:
        # ECDSA accepts both (r, s) and (r, n - s); pyca does, and no low-S rule is imposed here either.
        sealed, jwk = self.sealed()
        prefix, header, payload, signature = parts(sealed)
        raw = unb64url(signature)
        n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
        flipped = raw[:32] + (n - int.from_bytes(raw[32:], "big")).to_bytes(32, "big")
        assert verify(f"{prefix}.{header}.{payload}.{b64url(flipped)}", jwk) == VAULT

    def test_character_tampering_anywhere_fails(self) -> None:
        # The reference's own tamper test flips one character at a few offsets; do it at every offset.
        sealed, jwk = self.sealed()
        for offset in range(len("sealed."), len(sealed)):
            if sealed[offset] == ".":
                continue
            replacement = "X" if sealed[offset] != "X" else "Y"
            tampered = sealed[:offset] + replacement + sealed[offset + 1 :]
            with pytest.raises(InvalidRequest):
                verify(tampered, jwk)


class TestParse:
    GOOD_HEADER = b64url(b'{"alg":"ES256","kid":"k"}')
    GOOD_SIGNATURE = b64url(bytes(64))
    PAYLOAD = b64url(b"{}")

    def build(self, header: bytes, signature: bytes = bytes(64)) -> str:
        return f"sealed.{b64url(header)}.{self.PAYLOAD}.{b64url(signature)}"

    def test_structure(self) -> None:
        header = b'{"alg":"ES256","kid":"k","typ":"JWT"}'
        secret = parse(self.build(header))
        assert secret.kid == "k"
        assert dict(secret.protected) == {"alg": "ES256", "kid": "k", "typ": "JWT"}
        assert secret.signing_input == f"{b64url(header)}.{self.PAYLOAD}".encode()
        assert secret.payload == b"{}"
        assert secret.signature == bytes(64)
        assert "signature=" not in repr(secret)

    def test_bytes_input(self) -> None:
        assert isinstance(parse(self.build(b'{"alg":"ES256","kid":"k"}').encode()), SealedSecret)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "sealed secret does not start with `sealed.`."),
            ("Sealed.a.b.c", "sealed secret does not start with `sealed.`."),
            ("eyJh.eyJh.AAAA", "sealed secret does not start with `sealed.`."),
            ("sealed.a.b", "sealed secret has 3 dot-separated parts, expected 4."),
            ("sealed.a.b.c.d", "sealed secret has 5 dot-separated parts, expected 4."),
            ("sealed.sealed.a.b.c", "sealed secret has 5 dot-separated parts, expected 4."),
            (f"sealed.{GOOD_HEADER}=.{PAYLOAD}.{GOOD_SIGNATURE}", "sealed secret header is not unpadded base64url."),
            (f"sealed.+{GOOD_HEADER}.{PAYLOAD}.{GOOD_SIGNATURE}", "sealed secret header is not unpadded base64url."),
            (f"sealed.{GOOD_HEADER}.{PAYLOAD}xx.{GOOD_SIGNATURE}", "sealed secret payload is not unpadded base64url."),
            (f"sealed.{GOOD_HEADER}.e30=.{GOOD_SIGNATURE}", "sealed secret payload is not unpadded base64url."),
            (
                f"sealed.{GOOD_HEADER}.e31.{GOOD_SIGNATURE}",
                "sealed secret payload is not canonical base64url (nonzero trailing bits).",
            ),
            (f"sealed.{GOOD_HEADER}.{PAYLOAD}.{GOOD_SIGNATURE}=", "sealed secret signature is not unpadded base64url."),
            (
                f"sealed.{GOOD_HEADER}.{PAYLOAD}.{GOOD_SIGNATURE}A",
                "sealed secret signature is 65 bytes, expected 64 (ES256 r || s).",
            ),
            (f"sealed.{GOOD_HEADER}.{PAYLOAD}.", "sealed secret signature is 0 bytes, expected 64 (ES256 r || s)."),
        ],
    )
    def test_malformed(self, text: str, message: str) -> None:
        with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):
            parse(text)

    @pytest.mark.parametrize(
        ("header", "message"),
        [
            (b"not json", "sealed secret header is not valid JSON."),
            (b'["ES256"]', "sealed secret header is an array, expected a JSON object."),
            (b'{"alg":"ES256","kid":"a","kid":"b"}', "sealed secret header has the key 'kid' more than once."),
            (b'{"kid":"k"}', "sealed secret header `alg` is missing, expected 'ES256'."),
            (b'{"alg":"RS256","kid":"k"}', "sealed secret header `alg` is 'RS256', expected 'ES256'."),
            (b'{"alg":"none","kid":"k"}', "sealed secret header `alg` is 'none', expected 'ES256'."),
            (b'{"alg":"es256","kid":"k"}', "sealed secret header `alg` is 'es256', expected 'ES256'."),
            (b'{"alg":"HS256","kid":"k"}', "sealed secret header `alg` is 'HS256', expected 'ES256'."),
            (b'{"alg":["ES256"],"kid":"k"}', "sealed secret header `alg` is not a string, expected 'ES256'."),
            (b'{"alg":"ES256"}', "sealed secret header `kid` is missing or not a non-empty string."),
            (b'{"alg":"ES256","kid":""}', "sealed secret header `kid` is missing or not a non-empty string."),
            (b'{"alg":"ES256","kid":7}', "sealed secret header `kid` is missing or not a non-empty string."),
            (b'{"alg":"ES256","kid":null}', "sealed secret header `kid` is missing or not a non-empty string."),
            (
                b'{"alg":"ES256","kid":"k","b64":false,"crit":["b64"]}',
                "sealed secret header has `crit`, expected no critical extensions.",
            ),
        ],
    )
    def test_bad_header(self, header: bytes, message: str) -> None:
        with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):
            parse(self.build(header))

    def test_not_utf8(self) -> None:
        with pytest.raises(InvalidRequest, match=r"^sealed secret is not UTF-8\.$"):
            parse(b"sealed.\xff.a.b")

    def test_size_bound(self) -> None:
        text = "sealed." + "A" * MAX_SEALED_SECRET_SIZE
        with pytest.raises(
            InvalidRequest, match=re.escape("sealed secret is 0x100007 bytes, expected at most 0x100000.")
        ):
            parse(text)
        with pytest.raises(InvalidRequest, match="expected at most"):
            parse_unverified(text.encode())


class TestParseUnverified:
    def test_any_four_parts(self) -> None:
        payload = b64url(json.dumps(VAULT.to_json_object()).encode())
        assert parse_unverified(f"anything.not base64!.{payload}.!!") == VAULT
        assert parse_unverified(f"...{payload}.".replace("...", "..", 1)) == VAULT

    def test_a_real_sealed_secret(self) -> None:
        assert parse_unverified(seal(ENVELOPE, reference_key(), "k")) == ENVELOPE

    def test_a_bad_signature_is_not_looked_at(self) -> None:
        prefix, header, payload, _ = parts(seal(VAULT, reference_key(), "k"))
        assert parse_unverified(f"{prefix}.{header}.{payload}.AAAA") == VAULT

    @pytest.mark.parametrize(("text", "count"), [("a.b.c", 3), ("sealed.a.b.c.d", 5), ("", 1)])
    def test_part_count(self, text: str, count: int) -> None:
        message = f"sealed secret has {count} dot-separated parts, expected 4."
        with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):
            parse_unverified(text)

    @pytest.mark.parametrize("payload", ["e30=", "e30+", "e3"])
    def test_payload_must_be_unpadded_base64url(self, payload: str) -> None:
        with pytest.raises(
            InvalidRequest, match=r"^sealed secret payload (is not|is an array, expected a JSON object)"
        ):
            parse_unverified(f"sealed.h.{payload}.s")

    def test_payload_must_be_a_secret(self) -> None:
        with pytest.raises(InvalidRequest, match=r"^sealed secret payload is not valid JSON\.$"):
            parse_unverified(f"sealed.h.{b64url(b'nope')}.s")


class TestPayload:
    def test_reference_vault_samples(self) -> None:
        assert parse_payload(REFERENCE_VAULT_2) == VaultSecret(name="kbs:///one/2/trois", provider="kbs")
        assert parse_payload(REFERENCE_VAULT_1) == VaultSecret(name="xxx", provider="aliyun")

    def test_reference_envelope_sample_has_placeholder_base64(self) -> None:
        # The reference parses "yyy" as a string and fails only when unsealing; this parser decodes up front.
        with pytest.raises(InvalidRequest, match=r"^sealed secret `encrypted_key` is not padded standard base64\.$"):
            parse_payload(REFERENCE_ENVELOPE_1)

    def test_envelope(self) -> None:
        obj = ENVELOPE.to_json_object()
        parsed = parse_payload(json.dumps(obj).encode())
        assert parsed == ENVELOPE
        assert isinstance(parsed, EnvelopeSecret)
        assert dict(parsed.provider_settings) == {"region": "eu-west-1"}
        assert "encrypted_key" not in repr(parsed)

    def test_ctr_envelope(self) -> None:
        obj = {**ENVELOPE.to_json_object(), "wrap_type": "A256CTR", "iv": base64.b64encode(bytes(16)).decode()}
        parsed = parse_payload(json.dumps(obj).encode())
        assert isinstance(parsed, EnvelopeSecret)
        assert (parsed.wrap_type, parsed.iv) == (WrapType.A256CTR, bytes(16))

    def test_unknown_members_are_ignored(self) -> None:
        obj = {**VAULT.to_json_object(), "comment": "hello"}
        assert parse_payload(json.dumps(obj).encode()) == VAULT

    VAULT_OBJ = VAULT.to_json_object()
    ENVELOPE_OBJ = ENVELOPE.to_json_object()

    @pytest.mark.parametrize(
        ("base", "change", "message"),
        [
            (VAULT_OBJ, {"version": "0.2.0"}, "sealed secret `version` is '0.2.0', expected '0.1.0'."),
            (VAULT_OBJ, {"version": "0.1"}, "sealed secret `version` is '0.1', expected '0.1.0'."),
            (VAULT_OBJ, {"version": None}, "sealed secret `version` is null, expected '0.1.0'."),
            (VAULT_OBJ, {"version": 1}, "sealed secret `version` is a number, expected '0.1.0'."),
            (VAULT_OBJ, {"type": "Vault"}, "sealed secret `type` is 'Vault', expected 'vault' or 'envelope'."),
            (VAULT_OBJ, {"type": None}, "sealed secret `type` is null, expected 'vault' or 'envelope'."),
            (VAULT_OBJ, {"name": 5}, "sealed secret `name` is a number, expected a string."),
            (VAULT_OBJ, {"provider": None}, "sealed secret `provider` is null, expected a string."),
            (
                VAULT_OBJ,
                {"provider_settings": []},
                "sealed secret `provider_settings` is an array, expected an object.",
            ),
            (VAULT_OBJ, {"annotations": "x"}, "sealed secret `annotations` is a string, expected an object."),
            (
                ENVELOPE_OBJ,
                {"wrap_type": "A128GCM"},
                "sealed secret `wrap_type` is 'A128GCM', expected 'A256GCM' or 'A256CTR'.",
            ),
            (ENVELOPE_OBJ, {"iv": "AAAA"}, "sealed secret `iv` is 3 bytes, expected 12 for A256GCM."),
            (ENVELOPE_OBJ, {"iv": "AAAA_w=="}, "sealed secret `iv` is not padded standard base64."),
            (
                ENVELOPE_OBJ,
                {"encrypted_data": "AB=="},
                "sealed secret `encrypted_data` is not canonical base64 (nonzero trailing bits).",
            ),
            (ENVELOPE_OBJ, {"key_id": True}, "sealed secret `key_id` is a boolean, expected a string."),
        ],
    )
    def test_malformed(self, base: dict[str, object], change: dict[str, object], message: str) -> None:
        with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):
            parse_payload(json.dumps({**base, **change}).encode())

    @pytest.mark.parametrize(
        ("base", "key"),
        [
            (VAULT_OBJ, "version"),
            (VAULT_OBJ, "type"),
            (VAULT_OBJ, "name"),
            (VAULT_OBJ, "provider_settings"),
            (VAULT_OBJ, "annotations"),
            (ENVELOPE_OBJ, "key_id"),
            (ENVELOPE_OBJ, "encrypted_key"),
            (ENVELOPE_OBJ, "iv"),
            (ENVELOPE_OBJ, "wrap_type"),
            (ENVELOPE_OBJ, "provider"),
        ],
    )
    def test_required_members(self, base: dict[str, object], key: str) -> None:
        obj = {k: v for k, v in base.items() if k != key}
        with pytest.raises(InvalidRequest, match=f"`{key}` is missing"):
            parse_payload(json.dumps(obj).encode())

    @pytest.mark.parametrize("data", [b"[]", b"", b"{", b'{"version":NaN}'])
    def test_not_an_object(self, data: bytes) -> None:
        with pytest.raises(
            InvalidRequest, match=r"^sealed secret payload (is not|is an array, expected a JSON object)"
        ):
            parse_payload(data)

    def test_version_checked_through_verify(self) -> None:
        key = reference_key()
        obj = {**VAULT.to_json_object(), "version": "0.2.0"}
        header = b64url(b'{"alg":"ES256","kid":"k"}')
        payload = b64url(json.dumps(obj).encode())
        r, s = decode_dss_signature(key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256())))
        sealed = f"sealed.{header}.{payload}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
        with pytest.raises(InvalidRequest, match=re.escape("sealed secret `version` is '0.2.0', expected '0.1.0'.")):
            verify(sealed, public_jwk(key))

    def test_envelope_iv_checked_at_construction(self) -> None:
        with pytest.raises(InvalidRequest, match=re.escape("sealed secret `iv` is 12 bytes, expected 16 for A256CTR.")):
            EnvelopeSecret(
                key_id="k",
                encrypted_key=b"",
                encrypted_data=b"",
                wrap_type=WrapType.A256CTR,
                iv=bytes(12),
                provider="aws",
            )


class TestVerificationKey:
    def sealed(self) -> str:
        return seal(VAULT, reference_key(), "k")

    GOOD = public_jwk(reference_key())

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"kty": "RSA"}, "verification key `kty` is not 'EC', expected an EC P-256 JWK."),
            ({"kty": None}, "verification key `kty` is not 'EC', expected an EC P-256 JWK."),
            ({"crv": "P-384"}, "verification key `crv` is not 'P-256', expected an EC P-256 JWK."),
            ({"crv": "secp256k1"}, "verification key `crv` is not 'P-256', expected an EC P-256 JWK."),
            ({"x": None}, "verification key `x` is missing or not a string."),
            ({"y": 5}, "verification key `y` is missing or not a string."),
            ({"x": "AAAA"}, "verification key `x` is 3 bytes, expected 32."),
            ({"x": b64url(bytes(33))}, "verification key `x` is 33 bytes, expected 32."),
            ({"y": GOOD["y"] + "="}, "verification key `y` is not unpadded base64url."),
            ({"y": b64url(bytes(31) + b"\x01")}, "verification key is not a point on P-256."),
        ],
    )
    def test_bad_jwk(self, change: dict[str, object], message: str) -> None:
        jwk = {k: v for k, v in {**self.GOOD, **change}.items() if v is not None}
        with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):
            verify(self.sealed(), jwk)

    @pytest.mark.parametrize("data", [b"", b"not json", b"[]"])
    def test_jwk_bytes_not_an_object(self, data: bytes) -> None:
        with pytest.raises(InvalidRequest, match=r"^verification key (is not|is an array, expected a JSON object)"):
            verify(self.sealed(), data)

    def test_messages_never_carry_key_material(self) -> None:
        jwk = {**REFERENCE_JWK, "crv": "P-384"}
        with pytest.raises(InvalidRequest) as info:
            verify(self.sealed(), jwk)
        for member in ("d", "x", "y"):
            assert str(REFERENCE_JWK[member]) not in str(info.value)


class TestGenerateSigningKey:
    def test_pair(self) -> None:
        pem, jwk_json = generate_signing_key()
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
        jwk = json.loads(jwk_json)
        assert jwk == public_jwk(key)
        assert "d" not in jwk
        assert verify(seal(ENVELOPE, key, "kid-1"), jwk_json) == ENVELOPE

    def test_jwcrypto_reads_the_jwk(self) -> None:
        pem, jwk_json = generate_signing_key()
        imported = jw_jwk.JWK.from_json(jwk_json.decode())
        assert imported.has_public
        assert not imported.has_private
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        token = jw_jws.JWS()
        token.deserialize(seal(VAULT, key, "k").removeprefix("sealed."))
        token.verify(imported, alg="ES256")

    def test_fresh_each_time(self) -> None:
        assert generate_signing_key()[1] != generate_signing_key()[1]


class TestKidIsResourceUri:
    @pytest.mark.parametrize(
        "kid",
        [
            "kbs:///default/key/1",
            "kbs://kbs.example:8080/a/b/c",
            "kbs+pkcs11:///a/b/c",
            "KBS:///a/b/c",
            "kbs:///a",
            "kbs://host/",
            "kbs:foo",
            " kbs:///a/b/c\n",
            "kbs:///a/b/c?version=2",
        ],
    )
    def test_resource_uri(self, kid: str) -> None:
        assert kid_is_resource_uri(kid)

    @pytest.mark.parametrize(
        "kid",
        [
            "test-key",
            "sealed-secret-key",
            "keys/test-key",
            "/default/key/1",
            "kbs",
            "kbs:",
            "kbs://host",
            "kbs+:///a/b/c",
            "http://kbs/a/b/c",
            "kbsx:///a/b/c",
            "",
            "1kbs:///a",
            "kbs://host:port/a/b/c",
            "kbs://host:99999/a/b/c",
            "kbs://ho st/a/b/c",
        ],
    )
    def test_local_key_name(self, kid: str) -> None:
        assert not kid_is_resource_uri(kid)


class TestProperties:
    @settings(max_examples=200, deadline=None)
    @given(text=st.text(alphabet="sealed.AZaz09-_=+/{}", max_size=200))
    def test_random_text_parses_or_raises_invalid_request(self, text: str) -> None:
        for function in (parse, parse_unverified):
            with contextlib.suppress(InvalidRequest):
                function(text)

    @settings(max_examples=50, deadline=None)
    @given(
        name=st.text(max_size=40),
        provider=st.text(min_size=1, max_size=10),
        annotations=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
        kid=st.text(min_size=1, max_size=40),
    )
    def test_seal_verify_round_trip(self, name: str, provider: str, annotations: dict[str, object], kid: str) -> None:
        key = reference_key()
        payload = VaultSecret(name=name, provider=provider, annotations=annotations)
        sealed = seal(payload, key, kid)
        assert parse(sealed).kid == kid
        assert verify(sealed, public_jwk(key)) == payload
        assert parse_unverified(sealed) == payload
