"""JWE decryption for each TEE key algorithm.

Vectors are built in the test directly from `cryptography` primitives (RFC 7516/7518 steps written out), and
cross-checked both ways against jwcrypto, an independent JOSE implementation.
"""

from __future__ import annotations

import base64
import json
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from hypothesis import given
from hypothesis import strategies as st
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk

from agent import libcrypto
from agent.errors import DecryptionError
from agent.kbs.jwe import KeyAlgorithm, TeeKeyPair, decrypt, encrypt
from agent.kbs.teekey import _p256_pkcs8_parts
from agent.strictjson import b64url_decode as _strict_b64url_decode
from agent.strictjson import b64url_encode


def b64url_decode(text: str) -> bytes:
    return _strict_b64url_decode(text, "test value")


ALGORITHMS = list(KeyAlgorithm)
PLAINTEXT = b"\x00the resource bytes\xff" * 3


_KEYS: dict[tuple[KeyAlgorithm, str], TeeKeyPair] = {}


@pytest.fixture(params=ALGORITHMS, ids=[a.value for a in ALGORITHMS])
def keypair(request: pytest.FixtureRequest, crypto_backend: str) -> TeeKeyPair:
    """One key per algorithm and backend, made once (RSA key generation is slow)."""
    algorithm: KeyAlgorithm = request.param
    if (algorithm, crypto_backend) not in _KEYS:
        _KEYS[algorithm, crypto_backend] = TeeKeyPair.generate(algorithm)
    return _KEYS[algorithm, crypto_backend]


def test_default_key_is_native_where_libcrypto_is_openssl3(crypto_backend: str) -> None:
    key = TeeKeyPair.generate().private_key
    assert isinstance(key, libcrypto.P256Key) == (crypto_backend == "libcrypto")


def independent_jwe(keypair: TeeKeyPair, plaintext: bytes, *, cek: bytes = b"\x11" * 32) -> bytes:
    """A KBS-style flattened JWE built step by step from RFC 7518, independent of agent.kbs.jwe.encrypt."""
    jwk = keypair.public_jwk()
    if jwk["kty"] == "RSA":
        header: dict[str, object] = {"alg": "RSA-OAEP-256", "enc": "A256GCM"}
        rsa_numbers = rsa.RSAPublicNumbers(
            int.from_bytes(b64url_decode(jwk["e"]), "big"), int.from_bytes(b64url_decode(jwk["n"]), "big")
        )
        encrypted_key = rsa_numbers.public_key().encrypt(
            cek, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        )
    else:
        curve: ec.EllipticCurve = ec.SECP256R1() if jwk["crv"] == "P-256" else ec.SECP521R1()
        size = 32 if jwk["crv"] == "P-256" else 66
        ephemeral = ec.generate_private_key(curve)
        numbers = ephemeral.public_key().public_numbers()
        header = {
            "alg": "ECDH-ES+A256KW",
            "enc": "A256GCM",
            "epk": {
                "crv": jwk["crv"],
                "kty": "EC",
                "x": b64url_encode(numbers.x.to_bytes(size, "big")),
                "y": b64url_encode(numbers.y.to_bytes(size, "big")),
            },
        }
        peer = ec.EllipticCurvePublicNumbers(
            int.from_bytes(b64url_decode(jwk["x"]), "big"), int.from_bytes(b64url_decode(jwk["y"]), "big"), curve
        ).public_key()
        z = ephemeral.exchange(ec.ECDH(), peer)
        other = struct.pack(">I", 14) + b"ECDH-ES+A256KW" + struct.pack(">II", 0, 0) + struct.pack(">I", 256)
        kek = ConcatKDFHash(hashes.SHA256(), 32, other).derive(z)
        encrypted_key = aes_key_wrap(kek, cek)
    protected = b64url_encode(json.dumps(header).encode())
    iv = b"\x22" * 12
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode())
    return json.dumps(
        {
            "protected": protected,
            "encrypted_key": b64url_encode(encrypted_key),
            "iv": b64url_encode(iv),
            "ciphertext": b64url_encode(sealed[:-16]),
            "tag": b64url_encode(sealed[-16:]),
        }
    ).encode()


def mutate(jwe: bytes, member: str, change: object) -> bytes:
    body = json.loads(jwe)
    body[member] = change(body[member]) if callable(change) else change
    return json.dumps(body).encode()


def flip_last(text: str) -> str:
    raw = bytearray(b64url_decode(text))
    raw[-1] ^= 0x01
    return b64url_encode(bytes(raw))


class TestDecrypt:
    def test_independent_vector(self, keypair: TeeKeyPair) -> None:
        assert decrypt(keypair, independent_jwe(keypair, PLAINTEXT)) == PLAINTEXT

    def test_empty_plaintext(self, keypair: TeeKeyPair) -> None:
        assert decrypt(keypair, independent_jwe(keypair, b"")) == b""

    def test_jwcrypto_produced(self, keypair: TeeKeyPair) -> None:
        key = jw_jwk.JWK(**keypair.public_jwk())
        alg = keypair.public_jwk()["alg"]
        token = jw_jwe.JWE(PLAINTEXT, protected=json.dumps({"alg": alg, "enc": "A256GCM"}))
        token.add_recipient(key)
        assert decrypt(keypair, token.serialize(compact=False).encode()) == PLAINTEXT

    def test_padded_base64_accepted(self, keypair: TeeKeyPair) -> None:
        jwe = independent_jwe(keypair, PLAINTEXT)
        body = json.loads(jwe)
        body["iv"] += "=" * (-len(body["iv"]) % 4)
        assert decrypt(keypair, json.dumps(body).encode()) == PLAINTEXT

    @pytest.mark.parametrize("member", ["tag", "ciphertext", "iv", "encrypted_key"])
    def test_tampered_member_fails(self, keypair: TeeKeyPair, member: str) -> None:
        jwe = independent_jwe(keypair, PLAINTEXT)
        with pytest.raises(DecryptionError, match=r"^decryption failed$"):
            decrypt(keypair, mutate(jwe, member, flip_last))

    def test_tampered_protected_header_fails(self, keypair: TeeKeyPair) -> None:
        # same header meaning, different bytes: the AAD is the raw string, so the tag check must fail
        jwe = independent_jwe(keypair, PLAINTEXT)
        header = json.loads(b64url_decode(json.loads(jwe)["protected"]))
        respelled = b64url_encode(json.dumps(header, indent=1).encode())
        with pytest.raises(DecryptionError):
            decrypt(keypair, mutate(jwe, "protected", respelled))

    @pytest.mark.parametrize("size", [0, 24, 32, 48, 4096])
    def test_encrypted_key_of_another_size_fails(self, keypair: TeeKeyPair, size: int) -> None:
        jwe = mutate(independent_jwe(keypair, PLAINTEXT), "encrypted_key", b64url_encode(bytes(size)))
        with pytest.raises(DecryptionError):
            decrypt(keypair, jwe)

    def test_wrong_key_fails(self, keypair: TeeKeyPair) -> None:
        other = TeeKeyPair.generate(keypair.algorithm)
        with pytest.raises(DecryptionError):
            decrypt(other, independent_jwe(keypair, PLAINTEXT))

    @pytest.mark.parametrize(
        "header_change",
        [
            {"enc": "A128GCM"},
            {"alg": "RSA1_5"},
            {"alg": "ECDH-ES"},
            {"crit": ["exp"]},
            {"zip": "DEF"},
        ],
    )
    def test_header_not_allowed(self, keypair: TeeKeyPair, header_change: dict[str, object]) -> None:
        jwe = independent_jwe(keypair, PLAINTEXT)
        header = json.loads(b64url_decode(json.loads(jwe)["protected"]))
        header.update(header_change)
        with pytest.raises(DecryptionError):
            decrypt(keypair, mutate(jwe, "protected", b64url_encode(json.dumps(header).encode())))

    @pytest.mark.parametrize("garbage", [b"", b"null", b"[]", b'{"protected": 1}', b"\xff\xfe", b"{" * 10])
    def test_garbage(self, keypair: TeeKeyPair, garbage: bytes) -> None:
        with pytest.raises(DecryptionError):
            decrypt(keypair, garbage)


class TestEncryptForDevKbs:
    def test_jwcrypto_decrypts_our_jwe(self, keypair: TeeKeyPair) -> None:
        jwe = encrypt(keypair.public_jwk(), PLAINTEXT)
        private = jw_jwk.JWK.from_pem(keypair.private_pem())
        token = jw_jwe.JWE()
        token.deserialize(jwe.decode(), key=private)
        assert token.payload == PLAINTEXT

    def test_round_trip(self, keypair: TeeKeyPair) -> None:
        assert decrypt(keypair, encrypt(keypair.public_jwk(), PLAINTEXT)) == PLAINTEXT

    def test_unsupported_key(self) -> None:
        with pytest.raises(ValueError, match="unsupported"):
            encrypt({"kty": "EC", "crv": "P-384", "alg": "ECDH-ES+A256KW", "x": "AA", "y": "AA"}, b"x")


class TestKeys:
    def test_jwk_members_are_canonical(self, keypair: TeeKeyPair) -> None:
        jwk = keypair.public_jwk()
        if jwk["kty"] == "RSA":
            assert set(jwk) == {"kty", "alg", "n", "e"}
            assert jwk["alg"] == "RSA-OAEP-256"
            assert len(b64url_decode(jwk["n"])) == 256
            assert jwk["e"] == "AQAB"
        else:
            assert set(jwk) == {"kty", "crv", "alg", "x", "y"}
            size = 32 if jwk["crv"] == "P-256" else 66
            assert len(b64url_decode(jwk["x"])) == size == len(b64url_decode(jwk["y"]))
        assert "=" not in "".join(jwk.values())

    def test_pem_forms_match_reference(self, keypair: TeeKeyPair) -> None:
        pem = keypair.private_pem()
        expected = (
            b"-----BEGIN RSA PRIVATE KEY-----"
            if keypair.public_jwk()["kty"] == "RSA"
            else b"-----BEGIN PRIVATE KEY-----"
        )
        assert pem.startswith(expected)
        assert TeeKeyPair.from_pem(pem).public_jwk() == keypair.public_jwk()

    def test_p256_pem_is_byte_for_byte_pycas(self, crypto_backend: str) -> None:
        keypair = TeeKeyPair.generate()
        pem = keypair.private_pem()
        scalar = serialization.load_pem_private_key(pem, password=None).private_numbers().private_value  # type: ignore[union-attr]
        expected = ec.derive_private_key(scalar, ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        assert pem == expected

    @pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
    def test_p256_pem_from_pyca_loads_natively(self, crypto_backend: str, line_end: bytes) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).replace(b"\n", line_end)
        loaded = TeeKeyPair.from_pem(pem)
        assert isinstance(loaded.private_key, libcrypto.P256Key) == (crypto_backend == "libcrypto")
        numbers = key.public_key().public_numbers()
        assert loaded.public_jwk()["x"] == b64url_encode(numbers.x.to_bytes(32, "big"))
        assert loaded.public_jwk()["y"] == b64url_encode(numbers.y.to_bytes(32, "big"))
        assert decrypt(loaded, encrypt(loaded.public_jwk(), PLAINTEXT)) == PLAINTEXT

    def test_other_p256_encodings_load_through_pyca(self, crypto_backend: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        sec1 = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        assert sec1.startswith(b"-----BEGIN EC PRIVATE KEY-----")
        loaded = TeeKeyPair.from_pem(sec1)
        assert isinstance(loaded.private_key, ec.EllipticCurvePrivateKey)
        assert loaded.algorithm is KeyAlgorithm.EC_P256

    def test_a_p256_pkcs8_without_its_public_point_loads_through_pyca(self, crypto_backend: str) -> None:
        """RFC 5915 makes the public point optional: such a PKCS#8 is not the form read natively, pyca reads it."""
        key = ec.generate_private_key(ec.SECP256R1())
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        ec_private_key = bytes.fromhex("3025020101" + "0420") + scalar  # version 1, the scalar, nothing else
        algorithm = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107")
        body = bytes.fromhex("020100") + algorithm + b"\x04\x27" + ec_private_key
        der = b"\x30" + bytes([len(body)]) + body
        pem = b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(der) + b"-----END PRIVATE KEY-----\n"
        loaded = TeeKeyPair.from_pem(pem)
        assert isinstance(loaded.private_key, ec.EllipticCurvePrivateKey)
        numbers = key.public_key().public_numbers()
        assert loaded.public_jwk()["x"] == b64url_encode(numbers.x.to_bytes(32, "big"))
        assert decrypt(loaded, encrypt(loaded.public_jwk(), PLAINTEXT)) == PLAINTEXT

    def test_a_p256_pem_whose_point_is_not_its_scalars_is_refused(self, crypto_backend: str) -> None:
        ours, other = TeeKeyPair.generate().private_pem(), TeeKeyPair.generate().private_pem()
        der, other_der = (base64.b64decode(b"".join(p.split(b"\n")[1:-2])) for p in (ours, other))
        mixed = der[:-64] + other_der[-64:]  # our scalar, the other key's public point
        body = base64.b64encode(mixed)
        pem = b"-----BEGIN PRIVATE KEY-----\n" + body + b"\n-----END PRIVATE KEY-----\n"
        with pytest.raises(ValueError):  # libcrypto and pyca word it differently
            TeeKeyPair.from_pem(pem)

    def test_each_key_does_only_its_own_operation(self, keypair: TeeKeyPair) -> None:
        other = keypair.public_jwk()
        if keypair.algorithm is KeyAlgorithm.RSA_OAEP_256:
            with pytest.raises(ValueError, match="an RSA key has no ECDH"):
                keypair.exchange(b"\x01" * 32, b"\x02" * 32)
        else:
            with pytest.raises(ValueError, match="an EC key has no RSA-OAEP"):
                keypair.decrypt_oaep(b"\x00" * 256)
            x, y = b64url_decode(other["x"]), b64url_decode(other["y"])
            assert len(keypair.exchange(x, y)) == len(x)  # ECDH with its own public point works

    def test_repr_hides_key(self, keypair: TeeKeyPair) -> None:
        assert "PRIVATE" not in repr(keypair)

    def test_from_pem_rejects_other_curves(self) -> None:
        from cryptography.hazmat.primitives import serialization

        pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with pytest.raises(ValueError, match="P-256"):
            TeeKeyPair.from_pem(pem)


JWE_MEMBERS = st.fixed_dictionaries(
    {},
    optional={
        name: st.one_of(
            st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=60),
            st.integers(),
            st.none(),
            st.lists(st.text(max_size=3), max_size=2),
        )
        for name in ("protected", "encrypted_key", "iv", "ciphertext", "tag", "aad", "header")
    },
)


@given(JWE_MEMBERS)
def test_decrypt_of_any_member_soup_is_only_a_decryption_error(members: dict[str, object]) -> None:
    keypair = _EC_KEYPAIR
    with pytest.raises(DecryptionError) as info:
        decrypt(keypair, json.dumps(members).encode())
    assert str(info.value) == "decryption failed"


@given(st.binary(max_size=300))
def test_decrypt_of_any_bytes_is_only_a_decryption_error(data: bytes) -> None:
    with pytest.raises(DecryptionError):
        decrypt(_EC_KEYPAIR, data)


_EC_KEYPAIR = TeeKeyPair.generate(KeyAlgorithm.EC_P256)


@given(st.binary(max_size=400), st.sampled_from([b"", b"-----BEGIN PRIVATE KEY-----\n"]))
def test_the_p256_pem_reader_takes_any_bytes_without_raising(data: bytes, header: bytes) -> None:
    footer = b"\n-----END PRIVATE KEY-----\n" if header else b""
    for pem in (data, header + data + footer, header + base64.b64encode(data) + footer):
        parts = _p256_pkcs8_parts(pem)
        assert parts is None or [len(p) for p in parts] == [32, 32, 32]
