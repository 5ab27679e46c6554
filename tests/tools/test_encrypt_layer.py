"""Owner-side layer encryption: known answers from an independent AES (pycryptodome) and Go ocicrypt's JSON.

No independent ocicrypt implementation exists on PyPI, so the known answers are built from Go ocicrypt's
documented format (blockcipher/blockcipher_aes_ctr.go, encryption.go): AES-256-CTR with the 16-byte nonce as
one 128-bit big-endian counter, HMAC-SHA256 keyed with the symkey over the ciphertext, the options JSON in Go
struct-field order, and the keywrap request as skopeo sends it (keyprovider.md §3.1).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from cvm_tools.keyprovider.encrypt import encrypted_media_type

from agent.image.ocicrypt import decrypted_media_type
from tests.unit.image.test_ocicrypt import (
    GZIP_ENC,
    NONCE,
    PLAIN,
    PROVIDER_KEY,
    SYMKEY,
    Recorder,
    encrypt,
    reference_ctr,
)


class TestKnownAnswers:
    async def test_ciphertext_hmac_and_options_match_the_go_format(self) -> None:
        wrap = Recorder()
        ciphertext, layer = await encrypt(PLAIN, wrap, symkey=SYMKEY, nonce=NONCE, chunk_size=777)
        assert ciphertext == reference_ctr(SYMKEY, NONCE, PLAIN)
        tag = hmac.new(SYMKEY, ciphertext, hashlib.sha256).digest()
        assert base64.b64decode(layer.annotations["org.opencontainers.image.enc.pubopts"]) == (
            b'{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":"' + base64.b64encode(tag) + b'","cipheroptions":{}}'
        )
        request = json.loads(wrap.requests[0])
        optsdata = base64.b64decode(request["keywrapparams"]["optsdata"])
        assert optsdata == (
            b'{"symkey":"'
            + base64.b64encode(SYMKEY)
            + b'","digest":"sha256:'
            + hashlib.sha256(PLAIN).hexdigest().encode()
            + b'","cipheroptions":{"nonce":"'
            + base64.b64encode(NONCE)
            + b'"}}'
        )
        assert layer.media_type == GZIP_ENC
        assert layer.digest == "sha256:" + hashlib.sha256(ciphertext).hexdigest()
        assert layer.size == len(PLAIN)
        assert layer.annotations[PROVIDER_KEY] == base64.b64encode(wrap.packet).decode()

    async def test_wrap_request_is_what_skopeo_sends(self) -> None:
        # keyprovider.md §3.1, from `--encryption-key provider:grpckp:kid-tcp`
        wrap = Recorder()
        await encrypt(b"x", wrap, provider="grpckp", params=[b"kid-tcp"], symkey=SYMKEY, nonce=NONCE)
        request = wrap.requests[0]
        optsdata_b64 = json.loads(request)["keywrapparams"]["optsdata"]
        assert request == (
            b'{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"grpckp":["a2lkLXRjcA=="]},'
            b'"DecryptConfig":{"Parameters":{}}},"optsdata":"' + optsdata_b64.encode() + b'"},'
            b'"keyunwrapparams":{"dc":null,"annotation":null}}'
        )


class TestMediaTypes:
    def test_media_types(self) -> None:
        assert encrypted_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip") == GZIP_ENC
        assert decrypted_media_type(GZIP_ENC) == "application/vnd.oci.image.layer.v1.tar+gzip"
        with pytest.raises(ValueError, match="already encrypted"):
            encrypted_media_type(GZIP_ENC)
