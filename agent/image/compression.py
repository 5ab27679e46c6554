"""Layer media types and streaming decompression: gzip (multi-member), zstd, identity. Pure.

Media types follow image-rs (`decoder/mod.rs` `Compression::try_from`, `decrypt.rs`; image-pull.md §2.7):
OCI `tar`, `tar+gzip`, `tar+zstd` and their `nondistributable` variants, Docker's `rootfs.diff.tar.gzip`;
encrypted layers add `+encrypted` to the OCI types (`tar+encrypted`, `tar+gzip+encrypted`, and
`tar+zstd+encrypted`, which image-rs does not recognise but Go ocicrypt produces for zstd layers).

Decompressors are pull readers over a `Readable` (anything with `read(n) -> bytes`). Every read returns at
most `n` bytes whatever the compression ratio, so memory stays bounded; the total output is capped by
`max_output`. A stream that ends inside a gzip member or a zstd frame, or that carries trailing garbage, is a
`LayerError`: a layer is never silently cut short.

zstd comes from `compression.zstd` (Python ≥ 3.14) or its backport `backports.zstd`, imported only when a zstd
layer is met.
"""

from __future__ import annotations

import enum
import gzip
import importlib
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

from agent.errors import LayerError, NotSupported

__all__ = [
    "Compression",
    "LayerMediaType",
    "Readable",
    "parse_media_type",
    "open_decompressed",
    "DEFAULT_MAX_OUTPUT",
    "ZSTD_WINDOW_LOG_MAX",
]

DEFAULT_MAX_OUTPUT = 64 * 1024**3
"""Largest uncompressed layer accepted by default (64 GiB); the disk under the work dir bounds it further."""
ZSTD_WINDOW_LOG_MAX = 27
"""Largest zstd window accepted (2^27 = 128 MiB): zstd's own default decoder limit, as the reference uses."""


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Compression(enum.Enum):
    IDENTITY = "identity"
    GZIP = "gzip"
    ZSTD = "zstd"


@dataclass(frozen=True, slots=True)
class LayerMediaType:
    """What a layer media type says: its compression and whether ocicrypt encrypted it."""

    compression: Compression
    encrypted: bool


_OCI = "application/vnd.oci.image.layer.v1.tar"
_OCI_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
_DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
_SUFFIXES = {"": Compression.IDENTITY, "+gzip": Compression.GZIP, "+zstd": Compression.ZSTD}


def parse_media_type(media_type: str) -> LayerMediaType:
    """Map a layer descriptor's media type to its compression and encryption.

    Raises:
        NotSupported: any other media type (Docker's uncompressed `rootfs.diff.tar` and foreign layers included,
            as in image-rs: "unhandled media type").
    """
    if media_type == _DOCKER_GZIP:
        return LayerMediaType(Compression.GZIP, encrypted=False)
    for base in (_OCI, _OCI_ND):
        if media_type.startswith(base):
            rest = media_type[len(base) :]
            encrypted = rest.endswith("+encrypted")
            if encrypted:
                rest = rest[: -len("+encrypted")]
            compression = _SUFFIXES.get(rest)
            if compression is not None:
                return LayerMediaType(compression, encrypted=encrypted)
    msg = f"layer media type is {media_type[:120]!r}, expected an OCI tar, tar+gzip or tar+zstd layer"
    raise NotSupported(msg)


def open_decompressed(source: Readable, compression: Compression, *, max_output: int = DEFAULT_MAX_OUTPUT) -> Readable:
    """A reader of `source` decompressed; `read(n)` returns at most `n` bytes, `b""` only at the true end.

    Raises (from `read`):
        LayerError: corrupt or truncated data, trailing garbage, a zstd window over 2^27, or more than
            `max_output` bytes of output.
    """
    if compression is Compression.IDENTITY:
        return _Bounded(source, max_output)
    if compression is Compression.GZIP:
        return _Bounded(_GzipReader(source), max_output)
    return _Bounded(_ZstdReader(source), max_output)


class _Bounded:
    """Counts output, maps decompressor exceptions to `LayerError`."""

    def __init__(self, inner: Readable, limit: int) -> None:
        self._inner = inner
        self._left = limit
        self._limit = limit

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            msg = "read() needs a size: layers are streamed, never read whole"
            raise ValueError(msg)
        try:
            data = self._inner.read(min(size, self._left + 1))
        except LayerError:
            raise
        except (OSError, EOFError, zlib.error) as exc:
            msg = f"layer data is corrupt: {_describe(exc)}"
            raise LayerError(msg) from exc
        except Exception as exc:
            if type(exc).__name__ == "ZstdError":  # the zstd module is imported lazily
                msg = f"layer data is corrupt: {_describe(exc)}"
                raise LayerError(msg) from exc
            raise
        self._left -= len(data)
        if self._left < 0:
            msg = f"uncompressed layer is larger than {self._limit:#x} bytes, expected at most that"
            raise LayerError(msg)
        return data


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


class _GzipReader:
    """Multi-member gzip (RFC 1952 members back to back, as `pigz` and Go's `gzip.Reader` multistream read)."""

    def __init__(self, source: Readable) -> None:
        self._file = gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[call-overload]  # only read() is used

    def read(self, size: int = -1, /) -> bytes:
        data: bytes = self._file.read(size)
        return data


class _ZstdReader:
    """zstd frames back to back (skippable frames allowed), window at most 2^27."""

    def __init__(self, source: Readable) -> None:
        zstd = _zstd_module()
        options = {zstd.DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG_MAX}
        self._file = zstd.ZstdFile(source, mode="rb", options=options)

    def read(self, size: int = -1, /) -> bytes:
        data: bytes = self._file.read(size)
        return data


def _zstd_module() -> Any:  # compression.zstd or backports.zstd: the same API, typed differently
    try:
        return importlib.import_module("compression.zstd")  # Python >= 3.14
    except ImportError:
        try:
            return importlib.import_module("backports.zstd")
        except ImportError as exc:  # pragma: no cover - a packaging error
            msg = "zstd layers need the `backports.zstd` package on Python < 3.14"
            raise NotSupported(msg) from exc
