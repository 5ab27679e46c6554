"""Layer media types and streaming decompression, checked against the gzip and zstd command-line tools."""

from __future__ import annotations

import gzip
import io
import re
import shutil
import subprocess
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import LayerError, NotSupported
from agent.image.compression import Compression, LayerMediaType, Readable, open_decompressed, parse_media_type
from tests.unit.image.tarfixtures import zstd_compress

OCI = "application/vnd.oci.image.layer.v1.tar"


def read_all(reader: Readable, size: int = 4096) -> bytes:
    chunks = []
    while chunk := reader.read(size):
        assert len(chunk) <= size
        chunks.append(chunk)
    return b"".join(chunks)


class TestParseMediaType:
    @pytest.mark.parametrize(
        ("media_type", "expected"),
        [
            (OCI, LayerMediaType(Compression.IDENTITY, encrypted=False)),
            (OCI + "+gzip", LayerMediaType(Compression.GZIP, encrypted=False)),
            (OCI + "+zstd", LayerMediaType(Compression.ZSTD, encrypted=False)),
            (OCI + "+encrypted", LayerMediaType(Compression.IDENTITY, encrypted=True)),
            (OCI + "+gzip+encrypted", LayerMediaType(Compression.GZIP, encrypted=True)),
            (OCI + "+zstd+encrypted", LayerMediaType(Compression.ZSTD, encrypted=True)),
            ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", LayerMediaType(Compression.GZIP, False)),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", LayerMediaType(Compression.GZIP, encrypted=False)),
        ],
    )
    def test_known_types(self, media_type: str, expected: LayerMediaType) -> None:
        assert parse_media_type(media_type) == expected

    @pytest.mark.parametrize(
        "media_type",
        [
            "application/vnd.docker.image.rootfs.diff.tar",  # image-rs: unhandled
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            OCI + "+bzip2",
            OCI + "+encrypted+gzip",
            OCI + "+gzip+encrypted+encrypted",
            "text/plain",
        ],
    )
    def test_unhandled_types(self, media_type: str) -> None:
        with pytest.raises(NotSupported, match=re.escape(f"layer media type is {media_type!r}")):
            parse_media_type(media_type)


PAYLOAD = bytes(range(256)) * 4096 + b"tail"


class TestGzip:
    def test_multi_member_as_pigz_and_cat_write_it(self) -> None:
        data = gzip.compress(PAYLOAD[:1000]) + gzip.compress(PAYLOAD[1000:])
        assert read_all(open_decompressed(io.BytesIO(data), Compression.GZIP)) == PAYLOAD

    @pytest.mark.skipif(shutil.which("gzip") is None, reason="gzip(1) not installed")
    def test_reads_what_gnu_gzip_writes(self) -> None:
        data = subprocess.run(["gzip", "-c", "-9"], input=PAYLOAD, capture_output=True, check=True).stdout
        assert read_all(open_decompressed(io.BytesIO(data), Compression.GZIP)) == PAYLOAD

    def test_truncated_member_is_an_error(self) -> None:
        data = gzip.compress(PAYLOAD)
        with pytest.raises(LayerError, match="layer data is corrupt"):
            read_all(open_decompressed(io.BytesIO(data[:-9]), Compression.GZIP))

    def test_trailing_garbage_is_an_error(self) -> None:
        with pytest.raises(LayerError, match="layer data is corrupt"):
            read_all(open_decompressed(io.BytesIO(gzip.compress(b"x") + b"garbage"), Compression.GZIP))

    def test_bad_crc_is_an_error(self) -> None:
        data = bytearray(gzip.compress(PAYLOAD))
        data[-6] ^= 1  # CRC32 field
        with pytest.raises(LayerError, match="layer data is corrupt"):
            read_all(open_decompressed(io.BytesIO(bytes(data)), Compression.GZIP))

    def test_bomb_is_bounded_per_read_and_in_total(self) -> None:
        bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
        data = bomb.compress(bytes(64 * 1024 * 1024)) + bomb.flush()
        assert len(data) < 128 * 1024
        reader = open_decompressed(io.BytesIO(data), Compression.GZIP, max_output=8 * 1024 * 1024)
        assert len(reader.read(1000)) == 1000
        with pytest.raises(LayerError, match=re.escape("uncompressed layer is larger than 0x800000 bytes")):
            read_all(reader, 1024 * 1024)


class TestZstd:
    zstd_cli = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd(1) not installed")

    @zstd_cli
    def test_reads_what_the_zstd_tool_writes_across_frames(self) -> None:
        one = subprocess.run(["zstd", "-c", "-19"], input=PAYLOAD[:5000], capture_output=True, check=True).stdout
        two = subprocess.run(["zstd", "-c", "-1"], input=PAYLOAD[5000:], capture_output=True, check=True).stdout
        assert read_all(open_decompressed(io.BytesIO(one + two), Compression.ZSTD)) == PAYLOAD

    @zstd_cli
    def test_truncated_frame_is_an_error(self) -> None:
        data = subprocess.run(["zstd", "-c"], input=PAYLOAD, capture_output=True, check=True).stdout
        with pytest.raises(LayerError, match="layer data is corrupt: Compressed file ended"):
            read_all(open_decompressed(io.BytesIO(data[: len(data) // 2]), Compression.ZSTD))

    @zstd_cli
    def test_window_over_128_mib_is_refused(self) -> None:
        # --long=28 asks for a 256 MiB window; zstd records it in the frame header even for small input.
        data = subprocess.run(
            ["zstd", "-c", "--long=28", "--ultra", "-22", "--no-content-size"],
            input=bytes(300 * 1024 * 1024 // 1024),
            capture_output=True,
            check=True,
        ).stdout
        window_descriptor = data[5]
        if (window_descriptor >> 3) + 10 <= 27:
            pytest.skip("this zstd wrote a smaller window than asked")
        with pytest.raises(LayerError, match="layer data is corrupt"):
            read_all(open_decompressed(io.BytesIO(data), Compression.ZSTD))

    def test_garbage_is_an_error(self) -> None:
        with pytest.raises(LayerError, match="layer data is corrupt"):
            read_all(open_decompressed(io.BytesIO(b"not zstd at all"), Compression.ZSTD))


class TestIdentity:
    def test_passes_through_and_bounds(self) -> None:
        assert read_all(open_decompressed(io.BytesIO(PAYLOAD), Compression.IDENTITY)) == PAYLOAD
        with pytest.raises(LayerError, match="larger than 0x10 bytes"):
            read_all(open_decompressed(io.BytesIO(PAYLOAD), Compression.IDENTITY, max_output=16))

    def test_unbounded_read_is_refused(self) -> None:
        with pytest.raises(ValueError, match="read\\(\\) needs a size"):
            open_decompressed(io.BytesIO(b""), Compression.IDENTITY).read()


@settings(max_examples=50, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
    size=st.integers(min_value=1, max_value=700),
    kind=st.sampled_from([Compression.GZIP, Compression.ZSTD]),
)
def test_any_split_into_members_round_trips(parts: list[bytes], size: int, kind: Compression) -> None:
    if kind is Compression.GZIP:
        data = b"".join(gzip.compress(p) for p in parts)
    else:
        data = b"".join(zstd_compress(p) for p in parts)
    assert read_all(open_decompressed(io.BytesIO(data), kind), size) == b"".join(parts)
