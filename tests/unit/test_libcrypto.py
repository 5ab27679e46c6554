"""agent.libcrypto against known answers (RFC 3394, the GCM specification) and pyca/cryptography as the independent
implementation: every operation, every refusal, and a clean OpenSSL error queue after each failure."""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys
import threading
import types

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import libcrypto

LIB = libcrypto.load()
pytestmark = pytest.mark.skipif(
    LIB is None, reason="this Python's _hashlib is not linked against OpenSSL 3: agent.kbs.jwe uses pyca here"
)
P = 2**256 - 2**224 + 2**192 + 2**96 - 1  # the P-256 field prime
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B  # and its curve constant b
KEY32 = st.binary(min_size=32, max_size=32)
IV12 = st.binary(min_size=12, max_size=12)


@functools.cache
def shared_key() -> libcrypto.P256Key:
    return libcrypto.P256Key.generate()


def small_x_point() -> tuple[int, int]:
    """A point on P-256 whose x is below 2**256 - p, so that x + p still fits 32 bytes."""
    for x in range(1, 1000):
        rhs = (x**3 - 3 * x + B) % P
        y = pow(rhs, (P + 1) // 4, P)  # p = 3 (mod 4)
        if y * y % P == rhs:
            return x, y
    raise AssertionError


def error_queue_is_empty() -> bool:
    assert LIB is not None
    return int(LIB.ERR_peek_error()) == 0


def coordinates(key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    numbers = key.public_key().public_numbers()
    return numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")


def pyca_public(x: bytes, y: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
    ).public_key()


class TestKnownAnswers:
    def test_rfc3394_256_bit_key_under_256_bit_kek(self) -> None:
        kek = bytes(range(32))
        key = bytes.fromhex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
        wrapped = bytes.fromhex("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21")
        assert libcrypto.aes_key_wrap(kek, key) == wrapped
        assert libcrypto.aes_key_unwrap(kek, wrapped) == key

    def test_gcm_spec_test_cases_13_and_14(self) -> None:
        zero_key, zero_iv = bytes(32), bytes(12)
        assert libcrypto.aes_gcm_encrypt(zero_key, zero_iv, b"", b"") == bytes.fromhex(
            "530f8afbc74536b9a963b4f1c4cb738b"
        )
        sealed = libcrypto.aes_gcm_encrypt(zero_key, zero_iv, bytes(16), b"")
        assert sealed == bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919")
        assert libcrypto.aes_gcm_decrypt(zero_key, zero_iv, sealed[:16], sealed[16:], b"") == bytes(16)


class TestP256:
    def test_exchange_matches_pyca_both_ways(self) -> None:
        ours = libcrypto.P256Key.generate()
        theirs = ec.generate_private_key(ec.SECP256R1())
        shared = ours.exchange(*coordinates(theirs))
        assert shared == theirs.exchange(ec.ECDH(), pyca_public(*ours.public_point()))
        assert len(shared) == 32

    def test_private_scalar_is_the_public_points_scalar(self) -> None:
        ours = libcrypto.P256Key.generate()
        scalar = int.from_bytes(ours.private_scalar(), "big")
        assert 0 < scalar < 2**256
        assert coordinates(ec.derive_private_key(scalar, ec.SECP256R1())) == ours.public_point()

    def test_import_of_a_pyca_key_pair(self) -> None:
        theirs = ec.generate_private_key(ec.SECP256R1())
        scalar = theirs.private_numbers().private_value.to_bytes(32, "big")
        imported = libcrypto.P256Key.from_private(scalar, *coordinates(theirs))
        assert imported.public_point() == coordinates(theirs)
        assert imported.private_scalar() == scalar
        other = libcrypto.P256Key.generate()
        assert imported.exchange(*other.public_point()) == other.exchange(*coordinates(theirs))

    @pytest.mark.parametrize(
        "scalar",
        [
            bytes(32),  # zero
            bytes.fromhex("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551"),  # the group order n
            b"\xff" * 32,  # above n
            None,  # a valid scalar, but not the point's
        ],
    )
    def test_import_refuses_a_scalar_that_is_not_the_points(self, scalar: bytes | None) -> None:
        theirs = ec.generate_private_key(ec.SECP256R1())
        if scalar is None:
            scalar = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value.to_bytes(32, "big")
        with pytest.raises(ValueError, match="libcrypto operation failed"):
            libcrypto.P256Key.from_private(scalar, *coordinates(theirs))
        assert error_queue_is_empty()

    def test_keys_differ(self) -> None:
        assert libcrypto.P256Key.generate().public_point() != libcrypto.P256Key.generate().public_point()

    @pytest.mark.parametrize(
        ("x", "y"),
        [
            (b"\x01" * 32, b"\x02" * 32),  # not on the curve
            (bytes(32), bytes(32)),  # (0, 0): not on the curve (the point at infinity has no affine form)
            (b"\xff" * 32, b"\xff" * 32),  # coordinates above the field prime
            (b"\x01" * 31, b"\x02" * 32),  # wrong length
            (b"\x01" * 33, b"\x02" * 32),
        ],
    )
    def test_invalid_peer_points_are_refused(self, x: bytes, y: bytes) -> None:
        with pytest.raises(ValueError, match=r"^(libcrypto operation failed|P-256 coordinates must be 32 bytes each)$"):
            libcrypto.P256Key.generate().exchange(x, y)
        assert error_queue_is_empty()

    def test_a_valid_point_spelled_with_x_plus_p_is_refused(self) -> None:
        x, y = small_x_point()
        pyca_public(x.to_bytes(32, "big"), y.to_bytes(32, "big"))  # (x, y) itself is a valid key: no ValueError
        with pytest.raises(ValueError, match="libcrypto operation failed"):
            shared_key().exchange((x + P).to_bytes(32, "big"), y.to_bytes(32, "big"))
        assert error_queue_is_empty()

    def test_the_negated_point_agrees_with_pyca(self) -> None:
        theirs = ec.generate_private_key(ec.SECP256R1())
        x, y = coordinates(theirs)
        negated = (P - int.from_bytes(y, "big")).to_bytes(32, "big")
        expected = theirs.exchange(ec.ECDH(), pyca_public(*shared_key().public_point()))
        assert shared_key().exchange(x, negated) == expected  # -Q gives the same x-coordinate of d*Q

    @settings(max_examples=40, deadline=None)
    @given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
    def test_any_point_is_refused_exactly_when_pyca_refuses_it(self, x: bytes, y: bytes) -> None:
        try:
            pyca_public(x, y)
        except ValueError:
            with pytest.raises(ValueError, match="libcrypto operation failed"):
                shared_key().exchange(x, y)
        else:  # pragma: no cover - a random pair is on the curve with negligible probability
            shared_key().exchange(x, y)
        assert error_queue_is_empty()

    def test_repr_hides_the_key(self) -> None:
        assert repr(libcrypto.P256Key.generate()) == "P256Key(<private key>)"

    def test_exchanges_from_threads_share_one_key(self) -> None:
        theirs = [ec.generate_private_key(ec.SECP256R1()) for _ in range(8)]
        expected = [t.exchange(ec.ECDH(), pyca_public(*shared_key().public_point())) for t in theirs]
        results: list[bytes] = [b""] * len(theirs)

        def run(index: int) -> None:
            for _ in range(20):
                results[index] = shared_key().exchange(*coordinates(theirs[index]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(theirs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == expected


class TestKeyWrap:
    @settings(max_examples=60, deadline=None)
    @given(KEY32, st.integers(min_value=2, max_value=8).flatmap(lambda n: st.binary(min_size=8 * n, max_size=8 * n)))
    def test_matches_pyca(self, kek: bytes, key: bytes) -> None:
        wrapped = libcrypto.aes_key_wrap(kek, key)
        assert wrapped == aes_key_wrap(kek, key)
        assert libcrypto.aes_key_unwrap(kek, wrapped) == key

    @settings(max_examples=60, deadline=None)
    @given(KEY32, st.binary(min_size=0, max_size=72))
    def test_unwrap_of_anything_agrees_with_pyca(self, kek: bytes, blob: bytes) -> None:
        try:
            expected: bytes | None = aes_key_unwrap(kek, blob)
        except (InvalidUnwrap, ValueError):
            expected = None
        try:
            got: bytes | None = libcrypto.aes_key_unwrap(kek, blob)
        except ValueError:
            got = None
        assert got == expected
        assert error_queue_is_empty()

    def test_tampered_wrap_is_refused(self) -> None:
        kek = bytes(range(32))
        wrapped = bytearray(libcrypto.aes_key_wrap(kek, bytes(32)))
        wrapped[5] ^= 0x40
        with pytest.raises(ValueError, match="libcrypto operation failed"):
            libcrypto.aes_key_unwrap(kek, bytes(wrapped))
        assert error_queue_is_empty()

    @pytest.mark.parametrize("kek", [b"", bytes(16), bytes(24), bytes(33)])
    def test_only_256_bit_keks(self, kek: bytes) -> None:
        with pytest.raises(ValueError, match="32 bytes"):
            libcrypto.aes_key_wrap(kek, bytes(32))

    @pytest.mark.parametrize("size", [0, 8, 15, 33])
    def test_wrap_input_must_be_blocks(self, size: int) -> None:
        with pytest.raises(ValueError, match="multiple of 8"):
            libcrypto.aes_key_wrap(bytes(32), bytes(size))


class TestGcm:
    @settings(max_examples=60, deadline=None)
    @given(KEY32, IV12, st.binary(max_size=300), st.binary(max_size=80))
    def test_matches_pyca(self, key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> None:
        sealed = libcrypto.aes_gcm_encrypt(key, iv, plaintext, aad)
        assert sealed == AESGCM(key).encrypt(iv, plaintext, aad)
        assert libcrypto.aes_gcm_decrypt(key, iv, sealed[:-16], sealed[-16:], aad) == plaintext

    @settings(max_examples=60, deadline=None)
    @given(KEY32, IV12, st.binary(min_size=1, max_size=64), st.binary(max_size=16), st.data())
    def test_any_single_bit_flip_is_refused(
        self, key: bytes, iv: bytes, plaintext: bytes, aad: bytes, data: st.DataObject
    ) -> None:
        sealed = bytearray(AESGCM(key).encrypt(iv, plaintext, aad))
        bit = data.draw(st.integers(min_value=0, max_value=8 * len(sealed) - 1))
        sealed[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(iv, bytes(sealed), aad)
        with pytest.raises(ValueError, match="libcrypto operation failed"):
            libcrypto.aes_gcm_decrypt(key, iv, bytes(sealed[:-16]), bytes(sealed[-16:]), aad)
        assert error_queue_is_empty()

    def test_wrong_aad_is_refused(self) -> None:
        sealed = libcrypto.aes_gcm_encrypt(bytes(32), bytes(12), b"secret", b"header")
        with pytest.raises(ValueError, match="libcrypto operation failed"):
            libcrypto.aes_gcm_decrypt(bytes(32), bytes(12), sealed[:-16], sealed[-16:], b"headex")

    @pytest.mark.parametrize("iv", [b"", bytes(8), bytes(16)])
    def test_only_96_bit_ivs(self, iv: bytes) -> None:
        with pytest.raises(ValueError, match="96-bit IV"):
            libcrypto.aes_gcm_encrypt(bytes(32), iv, b"x", b"")

    @pytest.mark.parametrize("tag", [b"", bytes(12), bytes(17)])
    def test_only_128_bit_tags(self, tag: bytes) -> None:
        with pytest.raises(ValueError, match="16 bytes"):
            libcrypto.aes_gcm_decrypt(bytes(32), bytes(12), b"x", tag, b"")

    def test_a_large_message(self) -> None:
        plaintext = bytes(range(256)) * 8192  # 2 MiB
        sealed = libcrypto.aes_gcm_encrypt(bytes(32), bytes(12), plaintext, b"aad")
        assert sealed == AESGCM(bytes(32)).encrypt(bytes(12), plaintext, b"aad")
        assert libcrypto.aes_gcm_decrypt(bytes(32), bytes(12), sealed[:-16], sealed[-16:], b"aad") == plaintext


class TestCtr:
    def test_sp800_38a_f55_ctr_aes256_known_answer(self) -> None:
        key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
        counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
        plaintext = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
        ciphertext = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5")
        assert libcrypto.aes_ctr(key, counter, plaintext) == ciphertext
        assert libcrypto.aes_ctr(key, counter, ciphertext) == plaintext

    @settings(max_examples=60, deadline=None)
    @given(KEY32, st.binary(min_size=16, max_size=16), st.binary(max_size=300))
    def test_matches_pyca(self, key: bytes, counter: bytes, data: bytes) -> None:
        encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        assert libcrypto.aes_ctr(key, counter, data) == encryptor.update(data) + encryptor.finalize()

    def test_the_counter_wraps_at_128_bits_as_pycas(self) -> None:
        key, counter, data = bytes(32), b"\xff" * 16, bytes(48)
        encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        assert libcrypto.aes_ctr(key, counter, data) == encryptor.update(data) + encryptor.finalize()

    @pytest.mark.parametrize("counter", [b"", bytes(12), bytes(17)])
    def test_only_16_byte_counter_blocks(self, counter: bytes) -> None:
        with pytest.raises(ValueError, match="16-byte counter block"):
            libcrypto.aes_ctr(bytes(32), counter, b"x")


class TestLoading:
    def test_is_the_library_python_ssl_uses(self) -> None:
        assert LIB is not None
        assert int(LIB.OpenSSL_version_num()) == ssl.OPENSSL_VERSION_NUMBER

    def test_ssl_still_works_after_failures(self) -> None:
        with pytest.raises(ValueError, match="libcrypto operation failed"):
            libcrypto.aes_key_unwrap(bytes(32), bytes(40))
        context = ssl.create_default_context()
        assert context.verify_mode == ssl.CERT_REQUIRED

    def test_missing_symbols_mean_unavailable(self) -> None:
        assert libcrypto._bind(types.SimpleNamespace()) is None  # type: ignore[arg-type]

    def test_openssl_1_1_means_unavailable(self) -> None:
        handle = types.SimpleNamespace(**{name: (lambda: 0x1010117F) for name in libcrypto._SIGNATURES})
        assert libcrypto._bind(handle) is None  # type: ignore[arg-type]

    def test_ossl_param_layout_is_openssl_cores(self) -> None:
        """struct ossl_param_st (openssl/core.h): key, data_type, data, data_size, return_size, natural alignment."""
        word = ctypes.sizeof(ctypes.c_void_p)
        fields = ("key", "data_type", "data", "data_size", "return_size")
        assert [getattr(libcrypto._Param, name).offset for name in fields] == [0, word, 2 * word, 3 * word, 4 * word]
        assert ctypes.sizeof(libcrypto._Param) == 5 * word

    def test_no_hashlib_means_unavailable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "_hashlib", None)
        assert libcrypto.load.__wrapped__() is None
