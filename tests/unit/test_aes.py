"""agent.aes on each backend: the same answers (checked against each other and pyca's directly) and the same
refusals (`ValueError`) for a tag or an unwrap check that does not verify."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from agent import aes

KEY, IV, COUNTER = bytes(range(32)), bytes(range(12)), bytes(range(16))
PLAINTEXT, AAD = b"layer options or a resource" * 3, b"protected"


@pytest.mark.usefixtures("crypto_backend")
class TestBothBackends:
    def test_gcm_round_trip_is_pycas(self) -> None:
        sealed = aes.gcm_encrypt(KEY, IV, PLAINTEXT, AAD)
        assert sealed == AESGCM(KEY).encrypt(IV, PLAINTEXT, AAD)
        assert aes.gcm_decrypt(KEY, IV, sealed[:-16], sealed[-16:], AAD) == PLAINTEXT

    @pytest.mark.parametrize("tag", [b"", bytes(8), bytes(15)])
    def test_gcm_short_tag_is_refused(self, tag: bytes) -> None:
        sealed = aes.gcm_encrypt(KEY, IV, PLAINTEXT, AAD)
        with pytest.raises(ValueError):  # no detail, by design
            aes.gcm_decrypt(KEY, IV, sealed[:-16] + sealed[-16 : -16 + 16 - len(tag)], tag, AAD)

    def test_gcm_wrong_aad_is_refused(self) -> None:
        sealed = aes.gcm_encrypt(KEY, IV, PLAINTEXT, AAD)
        with pytest.raises(ValueError):  # no detail, by design
            aes.gcm_decrypt(KEY, IV, sealed[:-16], sealed[-16:], b"other")

    def test_key_wrap_round_trip_is_pycas(self) -> None:
        wrapped = aes.key_wrap(KEY, bytes(32))
        assert wrapped == aes_key_wrap(KEY, bytes(32))
        assert aes.key_unwrap(KEY, wrapped) == bytes(32)

    def test_tampered_unwrap_is_refused(self) -> None:
        wrapped = bytearray(aes.key_wrap(KEY, bytes(32)))
        wrapped[0] ^= 1
        with pytest.raises(ValueError):  # no detail, by design
            aes.key_unwrap(KEY, bytes(wrapped))

    def test_ctr_is_its_own_inverse(self) -> None:
        data = aes.ctr(KEY, COUNTER, PLAINTEXT)
        assert data != PLAINTEXT
        assert aes.ctr(KEY, COUNTER, data) == PLAINTEXT


def test_the_backends_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import libcrypto

    if not libcrypto.available():
        pytest.skip("this Python's _hashlib is not linked against OpenSSL 3: only the pyca backend runs here")
    native = (aes.gcm_encrypt(KEY, IV, PLAINTEXT, AAD), aes.key_wrap(KEY, bytes(32)), aes.ctr(KEY, COUNTER, PLAINTEXT))
    monkeypatch.setattr(libcrypto, "load", lambda: None)
    pyca = (aes.gcm_encrypt(KEY, IV, PLAINTEXT, AAD), aes.key_wrap(KEY, bytes(32)), aes.ctr(KEY, COUNTER, PLAINTEXT))
    assert native == pyca
