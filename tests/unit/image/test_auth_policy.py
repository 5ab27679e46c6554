"""auth.json lookup, WWW-Authenticate parsing, policy scopes and cosign verification."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.errors import ConfigError, ImageRejected, InvalidRequest
from agent.image.auth import Credentials, parse_auth_json, parse_challenge, parse_token_reply
from agent.image.policy import CosignSignature, Requirement, cosign_signature_tag, parse_policy, verify_cosign
from agent.image.reference import parse_reference

DIGEST = "sha256:" + "d" * 64
INDEX = "sha256:" + "e" * 64


def auth_json(entries: dict[str, str]) -> bytes:
    return json.dumps(
        {"auths": {k: {"auth": base64.b64encode(v.encode()).decode()} for k, v in entries.items()}}
    ).encode()


class TestAuthJson:
    def test_lookup_order(self) -> None:
        config = parse_auth_json(
            auth_json({"quay.io/org": "org:1", "quay.io": "host:2", "https://index.docker.io/v1/": "hub:3\n"})
        )
        assert config.credentials_for(parse_reference("quay.io/org/app")) == Credentials("org", "1")
        assert config.credentials_for(parse_reference("quay.io/other/app")) == Credentials("host", "2")
        assert config.credentials_for(parse_reference("busybox")) == Credentials("hub", "3")  # newline trimmed
        assert config.credentials_for(parse_reference("ghcr.io/x")) is None

    def test_password_never_in_repr(self) -> None:
        creds = parse_auth_json(auth_json({"r.io": "user:s3cret-pass"})).entries["r.io"]
        assert "s3cret" not in repr(creds)
        assert creds.basic_header() == "Basic " + base64.b64encode(b"user:s3cret-pass").decode()

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            (b'{"auths": {"r.io": {"identitytoken": "x"}}}', "auth.json entry 'r.io' has no `auth` string"),
            (b'{"auths": {"r.io": {"auth": "!!"}}}', "`auth` is not base64"),
            (b'{"auths": {"r.io": {"auth": "bm9jb2xvbg=="}}}', "is not base64 of user:password"),
            (b'{"credHelpers": {}}', "auth.json `auths` is null, expected an object"),
            (b"[]", "is an array, expected a JSON object"),
        ],
    )
    def test_rejects_without_echoing_secrets(self, raw: bytes, message: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            parse_auth_json(raw)
        assert "bm9jb2xvbg" not in str(info.value)


class TestChallenge:
    def test_bearer(self) -> None:
        challenge = parse_challenge('Bearer realm="https://auth.io/token",service="registry.io",scope="a:b,c:pull"')
        assert challenge is not None
        assert challenge.scheme == "bearer"
        assert challenge.params == {"realm": "https://auth.io/token", "service": "registry.io", "scope": "a:b,c:pull"}

    def test_basic_and_empty(self) -> None:
        challenge = parse_challenge('Basic realm="basic-realm"')
        assert challenge is not None
        assert challenge.scheme == "basic"
        assert parse_challenge("") is None

    def test_token_reply(self) -> None:
        assert parse_token_reply(b'{"token": "t", "expires_in": 300}') == ("t", 300)
        assert parse_token_reply(b'{"access_token": "a"}') == ("a", None)
        with pytest.raises(InvalidRequest, match="no `token`"):
            parse_token_reply(b'{"token": ""}')


POLICY = {
    "default": [{"type": "reject"}],
    "transports": {
        "docker": {
            "quay.io/org/app:v1": [{"type": "insecureAcceptAnything"}],
            "quay.io/org": [{"type": "reject"}, {"type": "insecureAcceptAnything"}],
            "localhost:5000": [],
            "*.example.com": [
                {"type": "sigstoreSigned", "keyData": "PEM", "signedIdentity": {"type": "matchRepository"}}
            ],
            "docker.io/library": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k"}],
        }
    },
}


class TestPolicy:
    @pytest.mark.parametrize(
        ("image", "types"),
        [
            ("quay.io/org/app:v1", ["insecureAcceptAnything"]),
            ("quay.io/org/app:v2", ["reject", "insecureAcceptAnything"]),
            ("quay.io/other/app", ["reject"]),
            ("localhost:5000/app", []),
            ("a.b.example.com/x", ["sigstoreSigned"]),
            ("busybox", ["signedBy"]),
        ],
    )
    def test_scopes(self, image: str, types: list[str]) -> None:
        policy = parse_policy(json.dumps(POLICY).encode())
        assert [r.type for r in policy.requirements_for(parse_reference(image))] == types

    @pytest.mark.parametrize(
        ("doc", "message"),
        [
            ({"default": []}, "needs both `default` and `transports`"),
            ({"default": [{"type": "nope"}], "transports": {}}, "`type` is 'nope'"),
            ({"default": [{"type": "sigstoreSigned"}], "transports": {}}, "exactly one of `keyPath` and `keyData`"),
            (
                {
                    "default": [{"type": "sigstoreSigned", "keyData": "k", "signedIdentity": {"type": "matchExact"}}],
                    "transports": {},
                },
                "`signedIdentity` type is 'matchExact'",
            ),
            ({"default": {}, "transports": {}}, "policy `default` is an object, expected an array"),
        ],
    )
    def test_rejects(self, doc: object, message: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_policy(json.dumps(doc).encode())


def signed(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, digest: str, ref: str) -> CosignSignature:
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": ref},
                "image": {"docker-manifest-digest": digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        }
    ).encode()
    sig = (
        key.sign(payload, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, ec.EllipticCurvePrivateKey)
        else key.sign(payload)
    )
    return CosignSignature(payload=payload, signature_b64=base64.b64encode(sig).decode())


def pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class TestCosign:
    image = parse_reference("quay.io/org/app:v1")

    def requirement(self, identity: dict[str, str] | None = None) -> Requirement:
        doc = {"type": "sigstoreSigned", "keyData": "x"} | ({"signedIdentity": identity} if identity else {})
        return parse_policy(json.dumps({"default": [doc], "transports": {}}).encode()).default[0]

    def test_accepts_platform_or_index_digest(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        requirement = self.requirement({"type": "matchRepository"})
        for digest in (DIGEST, INDEX):
            verify_cosign(
                requirement,
                pem(key),
                [signed(key, digest, "quay.io/org/app")],
                self.image,
                manifest_digest=DIGEST,
                index_digest=INDEX,
            )

    def test_ed25519(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        verify_cosign(
            self.requirement(),
            pem(key),
            [signed(key, DIGEST, "other/repo")],
            self.image,
            manifest_digest=DIGEST,
            index_digest=None,
        )

    @pytest.mark.parametrize("case", ["wrong-key", "wrong-digest", "wrong-identity", "tampered", "none", "bad-b64"])
    def test_rejects(self, case: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        other = ec.generate_private_key(ec.SECP256R1())
        sig = signed(key, DIGEST, "quay.io/org/app")
        sigs = {
            "wrong-key": [signed(other, DIGEST, "quay.io/org/app")],
            "wrong-digest": [signed(key, "sha256:" + "f" * 64, "quay.io/org/app")],
            "wrong-identity": [signed(key, DIGEST, "quay.io/org/evil")],
            "tampered": [
                CosignSignature(payload=sig.payload.replace(b"cosign", b"cosigN"), signature_b64=sig.signature_b64)
            ],
            "none": [],
            "bad-b64": [CosignSignature(payload=sig.payload, signature_b64="***")],
        }[case]
        with pytest.raises(ImageRejected, match=re.escape("Image policy rejected: Denied by policy: no valid cosign")):
            verify_cosign(
                self.requirement({"type": "matchRepository"}),
                pem(key),
                sigs,
                self.image,
                manifest_digest=DIGEST,
                index_digest=None,
            )

    def test_exact_repository(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        requirement = self.requirement({"type": "exactRepository", "dockerRepository": "quay.io/signed/name"})
        verify_cosign(
            requirement,
            pem(key),
            [signed(key, DIGEST, "quay.io/signed/name")],
            self.image,
            manifest_digest=DIGEST,
            index_digest=None,
        )

    def test_bad_key(self) -> None:
        with pytest.raises(ConfigError, match="is not a PEM public key"):
            verify_cosign(self.requirement(), b"nope", [], self.image, manifest_digest=DIGEST, index_digest=None)

    def test_signature_tag(self) -> None:
        assert cosign_signature_tag(DIGEST) == "sha256-" + "d" * 64 + ".sig"


@pytest.mark.parametrize(
    ("parse", "what", "key"),
    [
        (parse_auth_json, "registry credentials (auth.json)", "authenticated_registry_credentials_uri"),
        (parse_policy, "image security policy", "image_security_policy"),
    ],
)
def test_oversized_or_malformed_documents_are_config_errors(
    parse: Callable[[bytes], object], what: str, key: str
) -> None:
    big = b'{"x": "' + b"a" * (1024 * 1024) + b'"}'
    with pytest.raises(ConfigError) as info:
        parse(big)
    assert str(info.value) == f"{what} is {len(big)} bytes, expected at most {1024 * 1024}"
    assert info.value.key == key
    with pytest.raises(ConfigError) as info:
        parse(b'{"auths": {}, "auths": {}}')
    assert str(info.value) == f"{what} has the key 'auths' more than once."
    assert info.value.key == key
