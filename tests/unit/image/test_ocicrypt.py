"""ocicrypt layer decryption: a layer built by hand from Go's format (AES from pycryptodome), round trips with
the owner-side tools (`cvm_tools.keyprovider.encrypt`, `WrapKeyProvider`), and fail-closed authentication.

No independent ocicrypt implementation exists on PyPI, so the known answers are built from Go ocicrypt's
documented format (blockcipher/blockcipher_aes_ctr.go, encryption.go): AES-256-CTR with the 16-byte nonce as
one 128-bit big-endian counter, HMAC-SHA256 keyed with the symkey over the ciphertext, and the options JSON in
Go struct-field order.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import re

import pytest
from Crypto.Cipher import AES
from cvm_tools.keyprovider.encrypt import EncryptedLayer, encrypt_layer
from cvm_tools.keyprovider.wrap import WrapKeyProvider
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DecryptionError, KbsTransportError, LayerError, NotSupported
from agent.image import ocicrypt
from agent.image.ocicrypt import PrivateOptions, PublicOptions, layer_decryptor
from agent.keyprovider import messages
from agent.keyprovider.service import GuestKeyProvider
from tests.unit.keyprovider.test_service import FakeKbs

KEK = bytes(range(32))
KID = "kbs:///default/image-kek/layers"
SYMKEY = bytes(range(100, 132))
NONCE = bytes(8) + b"\xff" * 7 + b"\xfe"  # the counter carries from the low into the high 64 bits
PLAIN = b"layer bytes " * 1000
GZIP_ENC = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
PROVIDER_KEY = "org.opencontainers.image.enc.keys.provider.attestation-agent"


class Recorder:
    """A WrapKey stand-in that keeps the request and returns a fixed packet."""

    def __init__(self, packet: bytes = b'{"kid":"x"}') -> None:
        self.requests: list[bytes] = []
        self.packet = packet

    async def __call__(self, request: bytes) -> bytes:
        self.requests.append(request)
        return messages.wrap_reply(self.packet)


def reference_ctr(key: bytes, nonce: bytes, data: bytes) -> bytes:
    return AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=nonce).encrypt(data)


async def encrypt(plain: bytes, wrap: object, **kwargs: object) -> tuple[bytes, EncryptedLayer]:
    sink = io.BytesIO()
    layer = await encrypt_layer(
        io.BytesIO(plain),
        sink,
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        wrap=wrap,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    return sink.getvalue(), layer


def decrypt_all(decryptor: ocicrypt.LayerDecryptor, ciphertext: bytes, size: int = 4096) -> bytes:
    reader = decryptor.reader(io.BytesIO(ciphertext))
    out = []
    while chunk := reader.read(size):
        out.append(chunk)
    assert reader.verified
    return b"".join(out)


class TestKnownAnswers:
    async def test_decrypts_a_layer_built_by_hand_from_the_go_format(self) -> None:
        ciphertext = reference_ctr(SYMKEY, NONCE, PLAIN)
        tag = hmac.new(SYMKEY, ciphertext, hashlib.sha256).digest()
        private = json.dumps(
            {
                "symkey": base64.b64encode(SYMKEY).decode(),
                "digest": "sha256:" + hashlib.sha256(PLAIN).hexdigest(),
                "cipheroptions": {"nonce": base64.b64encode(NONCE).decode()},
            }
        ).encode()
        public = json.dumps({"cipher": "AES_256_CTR_HMAC_SHA256", "hmac": base64.b64encode(tag).decode()})

        async def unwrap(request: bytes) -> bytes:
            # the reply in Go's base64 form this time (ocicrypt-rs and CDH use integer arrays)
            assert json.loads(request)["keyunwrapparams"]["annotation"] == base64.b64encode(b"packet").decode()
            return json.dumps({"keyunwrapresults": {"optsdata": base64.b64encode(private).decode()}}).encode()

        annotations = {
            PROVIDER_KEY: base64.b64encode(b"packet").decode(),
            ocicrypt.PUBOPTS: base64.b64encode(public.encode()).decode(),
        }
        decryptor = await layer_decryptor(annotations, unwrap)
        assert decryptor.digest == "sha256:" + hashlib.sha256(PLAIN).hexdigest()
        assert decrypt_all(decryptor, ciphertext, 1000) == PLAIN


@pytest.fixture
def owner() -> WrapKeyProvider:
    return WrapKeyProvider(kek=KEK, kid=KID)


@pytest.fixture
def guest() -> GuestKeyProvider:
    return GuestKeyProvider(FakeKbs({KID: KEK}, delay=0))


class TestRoundTrip:
    async def test_owner_provider_to_guest_provider(self, owner: WrapKeyProvider, guest: GuestKeyProvider) -> None:
        ciphertext, layer = await encrypt(PLAIN, owner.wrap_key)
        assert ciphertext != PLAIN
        packet = json.loads(base64.b64decode(layer.annotations[PROVIDER_KEY]))
        assert packet["kid"] == KID
        decryptor = await layer_decryptor(layer.annotations, guest.unwrap_key)
        assert decrypt_all(decryptor, ciphertext) == PLAIN

    async def test_a_failing_wrapped_key_falls_through_to_the_next(
        self, owner: WrapKeyProvider, guest: GuestKeyProvider
    ) -> None:
        ciphertext, layer = await encrypt(PLAIN, owner.wrap_key)
        bogus = base64.b64encode(b'{"kid":"kbs:///default/image-kek/other","wrapped_data":"AAAA","iv":"AAAA"}')
        annotations = dict(layer.annotations)
        annotations[PROVIDER_KEY] = bogus.decode() + "," + annotations[PROVIDER_KEY]
        decryptor = await layer_decryptor(annotations, guest.unwrap_key)
        assert decrypt_all(decryptor, ciphertext) == PLAIN

    async def test_unwrap_errors_keep_their_type(self, owner: WrapKeyProvider) -> None:
        _, layer = await encrypt(PLAIN, owner.wrap_key)

        async def down(request: bytes) -> bytes:
            raise KbsTransportError("KBS at https://kbs is unreachable")

        with pytest.raises(KbsTransportError, match="unreachable"):
            await layer_decryptor(layer.annotations, down)

    async def test_public_nonce_wins_as_go_getopt_does(self) -> None:
        other = bytes(16)
        ciphertext = reference_ctr(SYMKEY, other, PLAIN)
        public = PublicOptions(
            cipher=ocicrypt.CIPHER, hmac=hmac.new(SYMKEY, ciphertext, hashlib.sha256).digest(), cipheroptions={}
        )
        public = PublicOptions(cipher=public.cipher, hmac=public.hmac, cipheroptions={"nonce": other})
        private = PrivateOptions(symkey=SYMKEY, digest="", cipheroptions={"nonce": NONCE})
        assert decrypt_all(ocicrypt.LayerDecryptor(private, public), ciphertext) == PLAIN


class TestFailClosed:
    async def layer(self, owner: WrapKeyProvider, guest: GuestKeyProvider) -> tuple[bytes, ocicrypt.LayerDecryptor]:
        ciphertext, layer = await encrypt(PLAIN, owner.wrap_key)
        return ciphertext, await layer_decryptor(layer.annotations, guest.unwrap_key)

    async def test_flipped_bit_fails_at_the_end_and_keeps_failing(
        self, owner: WrapKeyProvider, guest: GuestKeyProvider
    ) -> None:
        ciphertext, decryptor = await self.layer(owner, guest)
        tampered = bytearray(ciphertext)
        tampered[100] ^= 0x01
        reader = decryptor.reader(io.BytesIO(bytes(tampered)))
        assert len(reader.read(len(PLAIN))) == len(PLAIN)  # unauthenticated plaintext flows...
        with pytest.raises(DecryptionError, match=re.escape("encrypted layer failed authentication")):
            reader.read(10)  # ...and the end of the stream refuses it
        with pytest.raises(DecryptionError):
            reader.read(10)
        assert not reader.verified

    async def test_truncated_ciphertext_fails(self, owner: WrapKeyProvider, guest: GuestKeyProvider) -> None:
        ciphertext, decryptor = await self.layer(owner, guest)
        with pytest.raises(DecryptionError):
            decryptor.reader(io.BytesIO(ciphertext[:-1])).finish()

    def test_the_recorded_digest_is_not_enforced(self) -> None:
        # skopeo records the *source* descriptor's digest, taken before it recompresses (containers/image
        # blobPipelineEncryptionStep), e.g. the uncompressed digest of a docker-archive layer it pushed gzip'd.
        ciphertext = reference_ctr(SYMKEY, NONCE, PLAIN)
        public = PublicOptions(cipher=ocicrypt.CIPHER, hmac=hmac.new(SYMKEY, ciphertext, hashlib.sha256).digest())
        private = PrivateOptions(symkey=SYMKEY, digest="sha256:" + "0" * 64, cipheroptions={"nonce": NONCE})
        reader = ocicrypt.LayerDecryptor(private, public).reader(io.BytesIO(ciphertext))
        assert reader.read(len(PLAIN) + 1) == PLAIN
        reader.finish()
        assert reader.verified

    @pytest.mark.parametrize(
        ("public", "private", "error", "message"),
        [
            (PublicOptions(cipher="", hmac=b"x"), None, LayerError, "layer cipher is missing"),
            (PublicOptions(cipher="AES_128_GCM", hmac=b"x"), None, NotSupported, "layer cipher is 'AES_128_GCM'"),
            (PublicOptions(cipher=ocicrypt.CIPHER, hmac=b""), None, LayerError, "carry no `hmac`"),
            (
                PublicOptions(cipher=ocicrypt.CIPHER, hmac=b"x"),
                PrivateOptions(symkey=b"short", digest="", cipheroptions={"nonce": NONCE}),
                LayerError,
                "layer key is 5 bytes, expected 32",
            ),
            (
                PublicOptions(cipher=ocicrypt.CIPHER, hmac=b"x"),
                PrivateOptions(symkey=SYMKEY, digest=""),
                LayerError,
                "layer cipher option `nonce` is missing, expected 16 bytes",
            ),
        ],
    )
    def test_bad_options_are_refused(
        self, public: PublicOptions, private: PrivateOptions | None, error: type[Exception], message: str
    ) -> None:
        private = private or PrivateOptions(symkey=SYMKEY, digest="", cipheroptions={"nonce": NONCE})
        with pytest.raises(error, match=re.escape(message)):
            ocicrypt.LayerDecryptor(private, public)

    def test_private_options_never_show_the_key(self) -> None:
        options = ocicrypt.parse_private_options(PrivateOptions(symkey=SYMKEY, digest="").to_json())
        assert options.symkey == SYMKEY
        assert base64.b64encode(SYMKEY).decode() not in repr(options)
        assert SYMKEY.hex() not in repr(options)


class TestAnnotations:
    async def test_only_other_schemes_is_not_supported(self) -> None:
        with pytest.raises(NotSupported, match=re.escape("encrypted layer is wrapped for jwe, expected key provider")):
            await layer_decryptor({"org.opencontainers.image.enc.keys.jwe": "e30="}, Recorder())

    async def test_no_wrapped_key_is_a_layer_error(self) -> None:
        with pytest.raises(LayerError, match=re.escape("has no `org.opencontainers.image.enc.keys.provider.<name>`")):
            await layer_decryptor({"org.opencontainers.image.title": "x"}, Recorder())

    async def test_bad_base64_is_a_layer_error(self) -> None:
        with pytest.raises(LayerError, match="is not padded standard base64"):
            await layer_decryptor({PROVIDER_KEY: "not base64!"}, Recorder())


@settings(max_examples=40, deadline=None)
@given(plain=st.binary(max_size=5000), chunk=st.integers(1, 600), flip=st.integers(min_value=0))
async def test_any_layer_round_trips_and_any_flipped_bit_is_caught(plain: bytes, chunk: int, flip: int) -> None:
    wrap = Recorder()
    ciphertext, layer = await encrypt(plain, wrap, chunk_size=chunk)
    optsdata = base64.b64decode(json.loads(wrap.requests[0])["keywrapparams"]["optsdata"])

    async def unwrap(request: bytes) -> bytes:
        return messages.unwrap_reply(optsdata)

    decryptor = await layer_decryptor(layer.annotations, unwrap)
    assert decrypt_all(decryptor, ciphertext, chunk) == plain
    if ciphertext:
        tampered = bytearray(ciphertext)
        tampered[flip % len(ciphertext)] ^= 1 << (flip % 8)
        with pytest.raises(DecryptionError):
            decryptor.reader(io.BytesIO(bytes(tampered))).finish()
