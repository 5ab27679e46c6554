"""Annotation packets: parsing, serialisation, wrap and unwrap.

Vectors are built in the tests with cryptography's primitives directly (AESGCM, and AES-ECB for an independent
CTR keystream), plus one real packet from guest-components (provenance below).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from typing import ClassVar

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DecryptionError, InvalidRequest, NotSupported
from agent.keyprovider.annotation import (
    MAX_OPTSDATA_SIZE,
    MAX_PACKET_SIZE,
    AnnotationPacket,
    WrapType,
    parse_packet,
    unwrap,
    wrap,
)

KEK = bytes(range(0x20, 0x40))
OTHER_KEK = bytes(range(0x40, 0x60))
GCM_IV = bytes.fromhex("000102030405060708090a0b")
CTR_IV = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
OPTSDATA = (
    b'{"symkey":"1jL2jJV0Oyz2nmPkLtqulW6cKcpIUN5FpILcVnP5Uqs=","digest":"sha256:'
    + b"ab" * 32
    + b'","cipheroptions":{"nonce":"r10F9oaCu+nWFXfod3l83g=="}}'
)
KID = "kbs:///default/key/1"
GCM_MIN = "the 16-byte tag and one byte of optsdata"

# Real packet: confidential-containers/guest-components@8246e5e0977f6322f0a1b0f77e0739cf1c3e1f74
# `ocicrypt-rs/data/sample_kbc_annotation.json` (tab-indented as in the file), encrypted under the sample KEK
# `HARDCODED_KEY` of `attestation-agent/kbc/src/sample_kbc/mod.rs` (also coco_keyprovider's `sample=true` key).
SAMPLE_KEK = bytes.fromhex("d99b7705b0ba7a168295b3a3367270b0dd9b371bf514ca8b9ba7f0a33711daea")
SAMPLE_PACKET = (
    b'{\n\t"kid": "kbs:///default/key/1",\n\t"wrapped_data": "'
    b"KxAFgXwa0y72Xdygub9lF00RVMtSRbYzvakIEASgi3Gvt1wGLkhKPXf0S033Jdi6vAN6zBM7d0xZSDo2JCeew0FeKwTYgdJfdcPhuEpZOpjh"
    b"wIsidyeiunzp0J/crvI1tSPZJw4DPHZN2eQtg71rDzIbuDM5ATheiDM9/YJv+k+n6Nv6/pRb8qynNzbWFz7Q8wEo1ZZlL6UftOBJ6j9GuEOT"
    b'M2k/B+5sMA2VhGHSzDsKA1mn0qzcn2HJg4GcmxwDpJwzm5n7B4iIJ3A0umrQAjQ=",\n\t"iv": "3PQMqtjbR4hxCr83",\n'
    b'\t"wrap_type": "A256GCM"\n}'
)
SAMPLE_OPTSDATA = (
    b'{"symkey":"1jL2jJV0Oyz2nmPkLtqulW6cKcpIUN5FpILcVnP5Uqs=","digest":"sha256:18be1897f9402f27c8c0eba7c86e0c00'
    b'f5656db62961b5949d55f9565c42c6e7","cipheroptions":{"nonce":"r10F9oaCu+nWFXfod3l83g=="}}'
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gcm_vector(kek: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """AES-256-GCM ciphertext || tag, no AAD, via the streaming Cipher API (not the AESGCM class `wrap` uses)."""
    encryptor = Cipher(algorithms.AES(kek), modes.GCM(iv)).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    return ciphertext + encryptor.tag


def ctr_vector(kek: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """AES-256-CTR built by hand: ECB-encrypt the 128-bit big-endian counter blocks and XOR."""
    ecb = Cipher(algorithms.AES(kek), modes.ECB()).encryptor()  # ECB only to build a CTR keystream
    counter = int.from_bytes(iv, "big")
    keystream = b"".join(
        ecb.update(((counter + i) % (1 << 128)).to_bytes(16, "big")) for i in range((len(plaintext) + 15) // 16)
    )
    return bytes(p ^ k for p, k in zip(plaintext, keystream, strict=False))


def v1_json(kid: str, wrapped: bytes, iv: bytes, wrap_type: str) -> bytes:
    """What coco_keyprovider writes: serde_json::to_string of {kid, wrapped_data, iv, wrap_type}."""
    return (f'{{"kid":"{kid}","wrapped_data":"{b64(wrapped)}","iv":"{b64(iv)}","wrap_type":"{wrap_type}"}}').encode()


def packet_json(**members: object) -> bytes:
    return json.dumps(members).encode()


class TestWrapType:
    def test_values_and_iv_sizes(self) -> None:
        assert [str(w) for w in WrapType] == ["A256GCM", "A256CTR"]
        assert WrapType.A256GCM.iv_size == 12
        assert WrapType.A256CTR.iv_size == 16


@pytest.mark.usefixtures("crypto_backend")
class TestParsePacket:
    def test_real_reference_sample_packet(self) -> None:
        packet = parse_packet(SAMPLE_PACKET)
        assert packet.kid == "kbs:///default/key/1"
        assert packet.wrap_type is WrapType.A256GCM
        assert packet.iv == base64.b64decode("3PQMqtjbR4hxCr83")
        assert (packet.version, packet.provider) == ("0.1.0", "kbs")
        assert unwrap(SAMPLE_KEK, packet) == SAMPLE_OPTSDATA

    def test_v1_gcm_known_answer(self) -> None:
        wrapped = gcm_vector(KEK, GCM_IV, OPTSDATA)
        packet = parse_packet(v1_json(KID, wrapped, GCM_IV, "A256GCM"))
        assert packet == AnnotationPacket(kid=KID, wrapped_data=wrapped, iv=GCM_IV, wrap_type=WrapType.A256GCM)
        assert unwrap(KEK, packet) == OPTSDATA

    def test_v1_ctr_known_answer(self) -> None:
        wrapped = ctr_vector(KEK, CTR_IV, OPTSDATA)
        packet = parse_packet(v1_json(KID, wrapped, CTR_IV, "A256CTR"))
        assert packet.wrap_type is WrapType.A256CTR
        assert unwrap(KEK, packet) == OPTSDATA

    def test_ctr_counter_wraps_at_128_bits(self) -> None:
        iv = b"\xff" * 16
        wrapped = ctr_vector(KEK, iv, OPTSDATA)
        assert unwrap(KEK, parse_packet(v1_json(KID, wrapped, iv, "A256CTR"))) == OPTSDATA

    def test_v2_full_known_answer(self) -> None:
        wrapped = ctr_vector(KEK, CTR_IV, OPTSDATA)
        data = packet_json(
            version="0.1.0",
            kid="kbs://kbs.example:8080/repo/kek/2",
            wrapped_data=b64(wrapped),
            provider="kbs",
            iv=b64(CTR_IV),
            wrap_type="A256CTR",
            provider_settings={"a": 1},
            annotations={"b": ["c"]},
        )
        packet = parse_packet(data)
        assert packet.kid == "kbs://kbs.example:8080/repo/kek/2"
        assert dict(packet.provider_settings) == {"a": 1}
        assert dict(packet.annotations) == {"b": ["c"]}
        assert unwrap(KEK, packet) == OPTSDATA

    def test_v2_other_provider_needs_no_iv(self) -> None:
        packet = parse_packet(packet_json(kid="key-1", wrapped_data="AAEC", provider="aliyun"))
        assert (packet.provider, packet.iv, packet.wrap_type) == ("aliyun", None, None)
        assert packet.wrapped_data == b"\x00\x01\x02"

    def test_null_iv_and_wrap_type_read_as_absent(self) -> None:
        packet = parse_packet(packet_json(kid="k", wrapped_data="", provider="ehsm", iv=None, wrap_type=None))
        assert (packet.iv, packet.wrap_type) == (None, None)

    def test_unknown_members_are_ignored(self) -> None:
        wrapped = gcm_vector(KEK, GCM_IV, OPTSDATA)
        data = packet_json(kid=KID, wrapped_data=b64(wrapped), iv=b64(GCM_IV), wrap_type="A256GCM", extra=1)
        assert unwrap(KEK, parse_packet(data)) == OPTSDATA

    def test_mappings_are_read_only(self) -> None:
        packet = parse_packet(packet_json(kid="k", wrapped_data="", provider="aws", annotations={"x": 1}))
        with pytest.raises(TypeError):
            packet.annotations["x"] = 2  # type: ignore[index]

    GOOD: ClassVar[dict[str, object]] = {
        "kid": KID,
        "wrapped_data": b64(bytes(32)),
        "iv": b64(GCM_IV),
        "wrap_type": "A256GCM",
    }
    NOT_B64 = "is not padded standard base64."

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"version": "0.2.0"}, "`version` is '0.2.0', expected '0.1.0'."),
            ({"version": None}, "`version` is null, expected a string."),
            ({"kid": None}, "`kid` is missing, expected a string."),
            ({"kid": 7}, "`kid` is a number, expected a string."),
            ({"kid": ""}, "`kid` is empty, expected a key id."),
            ({"kid": "k" * 2049}, "`kid` is 2049 characters, expected at most 2048."),
            ({"wrapped_data": None}, "`wrapped_data` is missing, expected a string."),
            ({"wrapped_data": [1, 2]}, "`wrapped_data` is an array, expected a string."),
            ({"wrapped_data": "AAE"}, f"`wrapped_data` {NOT_B64}"),
            ({"wrapped_data": "AA-_"}, f"`wrapped_data` {NOT_B64}"),
            ({"wrapped_data": "AA E"}, f"`wrapped_data` {NOT_B64}"),
            ({"wrapped_data": "AAE=\n"}, f"`wrapped_data` {NOT_B64}"),
            ({"wrapped_data": "AB=="}, "`wrapped_data` is not canonical base64 (nonzero trailing bits)."),
            ({"iv": None}, "`iv` is missing, expected one for provider 'kbs'."),
            ({"iv": True}, "`iv` is a boolean, expected a string or null."),
            ({"iv": b64(bytes(16))}, "`iv` is 16 bytes, expected 12 for A256GCM."),
            ({"iv": "AAAA===="}, f"`iv` {NOT_B64}"),
            ({"wrap_type": None}, "`wrap_type` is missing, expected 'A256GCM' or 'A256CTR' for provider 'kbs'."),
            ({"wrap_type": "A128GCM"}, "`wrap_type` is 'A128GCM', expected 'A256GCM' or 'A256CTR'."),
            ({"wrap_type": "a256gcm"}, "`wrap_type` is 'a256gcm', expected 'A256GCM' or 'A256CTR'."),
            ({"wrap_type": "A256CTR"}, "`iv` is 12 bytes, expected 16 for A256CTR."),
            ({"wrapped_data": b64(bytes(15))}, f"`wrapped_data` is 15 bytes, expected at least 17 ({GCM_MIN})."),
            ({"wrapped_data": b64(bytes(16))}, f"`wrapped_data` is 16 bytes, expected at least 17 ({GCM_MIN})."),
            ({"wrapped_data": ""}, f"`wrapped_data` is 0 bytes, expected at least 17 ({GCM_MIN})."),
            (
                {"wrapped_data": "", "wrap_type": "A256CTR", "iv": b64(bytes(16))},
                "`wrapped_data` is 0 bytes, expected at least 1 (one byte of optsdata).",
            ),
            ({"provider": ""}, "`provider` is empty, expected a provider name such as 'kbs'."),
            ({"provider": None}, "`provider` is null, expected a string."),
            ({"provider_settings": []}, "`provider_settings` is an array, expected an object."),
            ({"annotations": None}, "`annotations` is null, expected an object."),
        ],
    )
    def test_malformed_field(self, change: dict[str, object], message: str) -> None:
        members = {**self.GOOD, **change}
        for key in ("kid", "wrapped_data"):
            if members[key] is None:
                del members[key]
        with pytest.raises(InvalidRequest, match=f"^{re.escape('annotation packet ' + message)}$"):
            parse_packet(json.dumps(members).encode())

    NAN = b'{"kid":"a","wrapped_data":"","provider":"x","annotations":{"n":NaN}}'

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            (b"", "is not valid JSON."),
            (b"{", "is not valid JSON."),
            (b"[]", "is an array, expected a JSON object."),
            (b'"kid"', "is a string, expected a JSON object."),
            (b"\xff{}", "is not UTF-8."),
            (b'{"kid":"a","kid":"b"}', "has the key 'kid' more than once."),
            (NAN, "is not valid JSON."),
            (
                b'{"kid":"\\ud800","wrapped_data":"","provider":"x"}',
                "has a lone surrogate \\ud800, expected valid Unicode.",
            ),
            (b'{"a":' + b"[" * 20000 + b"]" * 20000 + b"}", "is nested more than 64 levels deep, expected at most 64."),
            (b'{"n":' + b"9" * 5000 + b"}", "is not valid JSON."),
        ],
    )
    def test_malformed_document(self, data: bytes, message: str) -> None:
        with pytest.raises(InvalidRequest, match=f"^{re.escape('annotation packet ' + message)}$"):
            parse_packet(data)

    def test_size_bound(self) -> None:
        padding = " " * (MAX_PACKET_SIZE - len(v1_json(KID, bytes(17), GCM_IV, "A256GCM")))
        at_limit = v1_json(KID, bytes(17), GCM_IV, "A256GCM")[:-1] + padding.encode() + b"}"
        assert len(at_limit) == MAX_PACKET_SIZE
        parse_packet(at_limit)
        with pytest.raises(
            InvalidRequest, match=re.escape("annotation packet is 0x10001 bytes, expected at most 0x10000.")
        ):
            parse_packet(at_limit + b" ")

    def test_messages_never_carry_the_data(self) -> None:
        secret_b64 = b64(b"s3cret-material!" * 2)[:-1]  # made unpadded so that it fails
        with pytest.raises(InvalidRequest) as info:
            parse_packet(packet_json(kid=KID, wrapped_data=secret_b64, iv=b64(GCM_IV), wrap_type="A256GCM"))
        assert secret_b64 not in str(info.value)


class TestSerialise:
    def test_v1_is_byte_for_byte_what_coco_keyprovider_writes(self) -> None:
        wrapped = gcm_vector(KEK, GCM_IV, OPTSDATA)
        packet = AnnotationPacket(kid=KID, wrapped_data=wrapped, iv=GCM_IV, wrap_type=WrapType.A256GCM)
        assert packet.to_v1_json() == v1_json(KID, wrapped, GCM_IV, "A256GCM")
        assert parse_packet(packet.to_v1_json()) == packet

    def test_v2_field_order_and_defaults(self) -> None:
        packet = AnnotationPacket(kid=KID, wrapped_data=b"\x01" * 16, iv=CTR_IV, wrap_type=WrapType.A256CTR)
        assert packet.to_v2_json() == (
            b'{"version":"0.1.0","kid":"kbs:///default/key/1","wrapped_data":"AQEBAQEBAQEBAQEBAQEBAQ==",'
            b'"provider":"kbs","iv":"8PHy8/T19vf4+fr7/P3+/w==","wrap_type":"A256CTR",'
            b'"provider_settings":{},"annotations":{}}'
        )
        assert parse_packet(packet.to_v2_json()) == packet

    def test_v2_without_iv_or_wrap_type(self) -> None:
        packet = AnnotationPacket(kid="k", wrapped_data=b"", provider="aws", annotations={"r": "eu"})
        assert packet.to_v2_json() == (
            b'{"version":"0.1.0","kid":"k","wrapped_data":"","provider":"aws",'
            b'"provider_settings":{},"annotations":{"r":"eu"}}'
        )
        assert parse_packet(packet.to_v2_json()) == packet

    def test_non_ascii_kid_is_written_as_utf8(self) -> None:
        packet = AnnotationPacket(kid="k\u00e9y", wrapped_data=b"", provider="aws")
        assert b'"kid":"k\xc3\xa9y"' in packet.to_v2_json()

    @pytest.mark.parametrize(
        "packet",
        [
            AnnotationPacket(kid="k", wrapped_data=b"", provider="aws"),
            AnnotationPacket(kid=KID, wrapped_data=bytes(17), iv=GCM_IV, wrap_type=WrapType.A256GCM,
                             annotations={"a": 1}),
        ],
    )  # fmt: skip
    def test_v1_cannot_express_v2_only_packets(self, packet: AnnotationPacket) -> None:
        with pytest.raises(ValueError, match="only a `kbs` packet"):
            packet.to_v1_json()

    def test_repr_hides_wrapped_data(self) -> None:
        packet = AnnotationPacket(kid=KID, wrapped_data=b"\xaa" * 17, iv=GCM_IV, wrap_type=WrapType.A256GCM)
        assert "wrapped_data" not in repr(packet)


class TestWrap:
    def test_gcm_known_answer(self) -> None:
        packet = wrap(KEK, OPTSDATA, kid=KID, iv=GCM_IV)
        assert packet.to_v1_json() == v1_json(KID, gcm_vector(KEK, GCM_IV, OPTSDATA), GCM_IV, "A256GCM")

    def test_ctr_known_answer(self) -> None:
        packet = wrap(KEK, OPTSDATA, kid=KID, wrap_type="A256CTR", iv=CTR_IV)
        assert packet.to_v1_json() == v1_json(KID, ctr_vector(KEK, CTR_IV, OPTSDATA), CTR_IV, "A256CTR")

    def test_gcm_output_decrypts_with_aesgcm(self) -> None:
        packet = wrap(KEK, OPTSDATA, kid=KID)
        assert packet.iv is not None
        assert AESGCM(KEK).decrypt(packet.iv, packet.wrapped_data, None) == OPTSDATA

    @pytest.mark.parametrize(("wrap_type", "size"), [(WrapType.A256GCM, 12), (WrapType.A256CTR, 16)])
    def test_random_iv(self, wrap_type: WrapType, size: int) -> None:
        ivs = {wrap(KEK, OPTSDATA, kid=KID, wrap_type=wrap_type).iv for _ in range(8)}
        assert len(ivs) == 8
        assert all(iv is not None and len(iv) == size for iv in ivs)

    @pytest.mark.parametrize(
        "kid",
        ["kbs:///a/b/c", "kbs://kbs.example:8080/repo/type/tag", "kbs+pkcs11:///r/t/1", "kbs:///r/t/1?v=2",
         "kbs://[::1]:80/a/b/c", "kbs:///default/image-kek/0f8e3c1a-2b4d-4e6f-8a9b-0c1d2e3f4a5b"],
    )  # fmt: skip
    def test_resource_uri_kids(self, kid: str) -> None:
        assert wrap(KEK, OPTSDATA, kid=kid).kid == kid

    @pytest.mark.parametrize(
        "kid",
        ["", "/default/image-kek/1", "default/key/1", "kbs:///a/b", "kbs:///a/b/c/d", "kbs:///a/../c",
         "kbs:///a//c", "kbs:///a/b/c#f", "http:///a/b/c", "KBS:///a/b/c", "kbs:///a/b/ c", "kbs:/a/b/c"],
    )  # fmt: skip
    def test_kid_must_be_resource_uri(self, kid: str) -> None:
        message = "`kid` is not a resource URI, expected `kbs:///<repo>/<type>/<tag>`."
        with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):
            wrap(KEK, OPTSDATA, kid=kid)

    @pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
    def test_kek_length(self, size: int) -> None:
        message = f"key encryption key is {size} bytes, expected 32."
        with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):
            wrap(bytes(size), OPTSDATA, kid=KID)

    def test_unknown_wrap_type(self) -> None:
        with pytest.raises(
            InvalidRequest, match=re.escape("`wrap_type` is 'A256CBC', expected 'A256GCM' or 'A256CTR'.")
        ):
            wrap(KEK, OPTSDATA, kid=KID, wrap_type="A256CBC")

    @pytest.mark.parametrize(("wrap_type", "iv"), [("A256GCM", CTR_IV), ("A256CTR", GCM_IV), ("A256GCM", b"")])
    def test_iv_length(self, wrap_type: str, iv: bytes) -> None:
        with pytest.raises(InvalidRequest, match=rf"^`iv` is {len(iv)} bytes, expected \d+ for {wrap_type}\.$"):
            wrap(KEK, OPTSDATA, kid=KID, wrap_type=wrap_type, iv=iv)

    def test_empty_optsdata_is_refused(self) -> None:
        with pytest.raises(InvalidRequest, match=re.escape("`optsdata` is empty")):
            wrap(KEK, b"", kid=KID)

    def test_optsdata_size_bound(self) -> None:
        packet = wrap(KEK, bytes(MAX_OPTSDATA_SIZE), kid="kbs:///" + "/".join(["r" * 600] * 3))
        assert len(packet.to_v1_json()) <= MAX_PACKET_SIZE
        assert parse_packet(packet.to_v1_json()) == packet
        with pytest.raises(InvalidRequest, match=re.escape("`optsdata` is 0x8001 bytes, expected at most 0x8000.")):
            wrap(KEK, bytes(MAX_OPTSDATA_SIZE + 1), kid=KID)

    @settings(max_examples=60, deadline=None)
    @given(
        optsdata=st.binary(min_size=1, max_size=2048),
        kek=st.binary(min_size=32, max_size=32),
        wrap_type=st.sampled_from(WrapType),
    )
    def test_round_trip(self, optsdata: bytes, kek: bytes, wrap_type: WrapType) -> None:
        packet = wrap(kek, optsdata, kid=KID, wrap_type=wrap_type)
        for data in (packet.to_v1_json(), packet.to_v2_json()):
            assert unwrap(kek, parse_packet(data)) == optsdata


@pytest.mark.usefixtures("crypto_backend")
class TestUnwrap:
    def gcm_packet(self) -> AnnotationPacket:
        return parse_packet(v1_json(KID, gcm_vector(KEK, GCM_IV, OPTSDATA), GCM_IV, "A256GCM"))

    def tampered(self, *, wrapped_data: bytes | None = None, iv: bytes | None = None) -> AnnotationPacket:
        good = self.gcm_packet()
        return AnnotationPacket(
            kid=good.kid,
            wrapped_data=good.wrapped_data if wrapped_data is None else wrapped_data,
            iv=good.iv if iv is None else iv,
            wrap_type=good.wrap_type,
        )

    def test_good(self) -> None:
        assert unwrap(KEK, self.gcm_packet()) == OPTSDATA

    @pytest.mark.parametrize("index", [0, len(OPTSDATA) // 2, len(OPTSDATA) - 1])
    def test_tampered_ciphertext(self, index: int) -> None:
        data = bytearray(self.gcm_packet().wrapped_data)
        data[index] ^= 0x01
        with pytest.raises(DecryptionError, match=r"^decryption failed$"):
            unwrap(KEK, self.tampered(wrapped_data=bytes(data)))

    @pytest.mark.parametrize("index", [-16, -1])
    def test_tampered_tag(self, index: int) -> None:
        data = bytearray(self.gcm_packet().wrapped_data)
        data[index] ^= 0x80
        with pytest.raises(DecryptionError, match=r"^decryption failed$"):
            unwrap(KEK, self.tampered(wrapped_data=bytes(data)))

    def test_truncated_tag(self) -> None:
        with pytest.raises(DecryptionError):
            unwrap(KEK, self.tampered(wrapped_data=self.gcm_packet().wrapped_data[:-1]))

    def test_tampered_iv(self) -> None:
        with pytest.raises(DecryptionError, match=r"^decryption failed$"):
            unwrap(KEK, self.tampered(iv=bytes(12)))

    def test_wrong_kek(self) -> None:
        with pytest.raises(DecryptionError, match=r"^decryption failed$") as info:
            unwrap(OTHER_KEK, self.gcm_packet())
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__

    @pytest.mark.parametrize("size", [0, 16, 24, 48])
    def test_kek_length(self, size: int) -> None:
        with pytest.raises(InvalidRequest, match=f"^key encryption key is {size} bytes, expected 32.$"):
            unwrap(bytes(size), self.gcm_packet())

    def test_ctr_is_unauthenticated(self) -> None:
        wrapped = bytearray(ctr_vector(KEK, CTR_IV, OPTSDATA))
        wrapped[0] ^= 0x01
        packet = parse_packet(v1_json(KID, bytes(wrapped), CTR_IV, "A256CTR"))
        assert unwrap(KEK, packet) == bytes([OPTSDATA[0] ^ 0x01]) + OPTSDATA[1:]

    @pytest.mark.parametrize("provider", ["aliyun", "aws", "ehsm", "KBS"])
    def test_other_provider_is_not_supported(self, provider: str) -> None:
        packet = parse_packet(packet_json(kid="key-1", wrapped_data=b64(b"x" * 32), provider=provider))
        message = f"annotation packet provider '{provider}' is not supported, expected 'kbs'."
        with pytest.raises(NotSupported, match=f"^{re.escape(message)}$"):
            unwrap(KEK, packet)

    def test_other_provider_with_kbs_fields_is_still_not_supported(self) -> None:
        wrapped = gcm_vector(KEK, GCM_IV, OPTSDATA)
        data = packet_json(kid=KID, wrapped_data=b64(wrapped), iv=b64(GCM_IV), wrap_type="A256GCM", provider="aws")
        with pytest.raises(NotSupported):
            unwrap(KEK, parse_packet(data))


class TestParseProperties:
    @settings(max_examples=200, deadline=None)
    @given(data=st.binary(max_size=512))
    def test_random_bytes_parse_or_raise_invalid_request(self, data: bytes) -> None:
        with contextlib.suppress(InvalidRequest):
            parse_packet(data)

    @settings(max_examples=200, deadline=None)
    @given(
        members=st.dictionaries(
            st.sampled_from(["version", "kid", "wrapped_data", "provider", "iv", "wrap_type", "annotations"]),
            st.none() | st.booleans() | st.integers() | st.text(max_size=24) | st.sampled_from(["A256GCM", "AAAA"]),
        )
    )
    def test_random_members_parse_or_raise_invalid_request(self, members: dict[str, object]) -> None:
        try:
            packet = parse_packet(json.dumps(members).encode())
        except InvalidRequest:
            return
        assert parse_packet(packet.to_v2_json()) == packet
