"""`LayerStore`: unpacked layers under the image work dir, reused by compressed digest. Orchestrator.

Layout (image-rs's, image-pull.md §2.9), every directory 0700 and every file 0600:

    <work_dir>/layers/<n>/              one unpacked layer per directory (n = 1, 2, …)
    <work_dir>/layers/.staging-<rand>/  a layer being unpacked; never reused, swept at start
    <work_dir>/overlay/                 upper/work dirs of mounted rootfs (see `mount`)
    <work_dir>/meta_store.json          {"layer_db": {<compressed digest>: {...}}, "image_db": {...}}

A layer is unpacked into a staging directory; only when the tar ended cleanly, an encrypted layer
authenticated, and the diff_id matched is it synced to disk (syncfs), renamed to `layers/<n>` and recorded,
with the metadata file replaced atomically (write, fsync, rename, fsync the directory). So a crash at any
point leaves either no trace of the layer (staging and unrecorded directories are deleted when the store
opens) or a complete, recorded one. Concurrent `ensure_layer` calls for one digest unpack it once: later
callers wait and reuse it.

The store trusts `open_blob` to return a file whose compressed digest was verified (the registry client hashes
while downloading); it verifies everything after that: decryption, decompression, tar, diff_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import LayerError
from agent.image import ocicrypt
from agent.image.compression import LayerMediaType, Readable, open_decompressed, parse_media_type
from agent.image.unpack import unpack_layer
from agent.log import get_logger

__all__ = ["Layer", "LayerStore", "META_FILE", "Unwrap", "OpenBlob"]

log = get_logger("agent.image")

META_FILE = "meta_store.json"
MAX_META_SIZE = 64 * 1024 * 1024
_STAGING = ".staging-"
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")

Unwrap = Callable[[bytes], Awaitable[bytes]]
OpenBlob = Callable[[], Awaitable[Path]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
    digest: str
    """The compressed (blob) digest, the key of the store."""
    diff_id: str
    """The uncompressed tar's digest."""
    path: Path
    """The unpacked layer directory, an overlay lower dir."""


class LayerStore:
    """Layers under `<work_dir>/layers`, metadata in `<work_dir>/meta_store.json`. Use from one event loop."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.layers_dir = work_dir / "layers"
        self.overlay_dir = work_dir / "overlay"
        self._meta_path = work_dir / META_FILE
        for directory in (work_dir, self.layers_dir, self.overlay_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        self._meta = self._load()
        self._sweep()
        self._locks: dict[str, asyncio.Lock] = {}
        self._meta_lock = asyncio.Lock()
        self._number_lock = threading.Lock()
        self.unpacked = 0
        """Layers unpacked by this store object (not reused): for tests and progress."""

    # metadata ---------------------------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = self._meta_path.read_bytes()
        except FileNotFoundError:
            return {"layer_db": {}, "image_db": {}}
        try:
            loaded = json.loads(data) if len(data) <= MAX_META_SIZE else None
        except ValueError:
            loaded = None
        layer_db = loaded.get("layer_db") if isinstance(loaded, dict) else None
        image_db = loaded.get("image_db") if isinstance(loaded, dict) else None
        if not isinstance(layer_db, dict) or not isinstance(image_db, dict):
            # A damaged file loses the cache, never the pull: layers are pulled again (see `_sweep` for the old
            # directories).
            log.warning("image.meta_store.unreadable", path=str(self._meta_path))
            return {"layer_db": {}, "image_db": {}}
        return {"layer_db": layer_db, "image_db": image_db}

    def _sweep(self) -> None:
        """Drop records whose directory is gone; delete staging directories and unrecorded layer directories.

        An unrecorded layer directory that is a lower dir of a mounted overlay (a running container's rootfs, after
        the metadata file was lost) is kept: deleting it would pull files from under the container. If the mount
        table cannot be read, only staging directories are deleted.
        """
        layer_db = self._meta["layer_db"]
        recorded: set[str] = set()
        for digest, record in list(layer_db.items()):
            path = record.get("store_path") if isinstance(record, dict) else None
            if not isinstance(path, str) or not path.isdigit() or not _DIGEST.fullmatch(digest):
                del layer_db[digest]
                continue
            if not (self.layers_dir / path).is_dir():
                del layer_db[digest]
                continue
            recorded.add(path)
        in_use = _mounted_lower_dirs()
        for entry in self.layers_dir.iterdir():
            if entry.name in recorded:
                continue
            if entry.name.startswith(_STAGING) or (in_use is not None and str(entry) not in in_use):
                log.info("image.layer.swept", path=str(entry))
                _remove_tree(entry)
            else:  # a lower dir of a running container's rootfs (metadata lost): keep it until it is unmounted
                log.warning("image.layer.unrecorded_in_use", path=str(entry))

    def _write_meta(self) -> None:
        data = json.dumps(self._meta, indent=1, sort_keys=True).encode()
        tmp = self.work_dir / f".{META_FILE}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self._meta_path)
        dir_fd = os.open(self.work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def layer(self, digest: str) -> Layer | None:
        """The stored layer with this compressed digest, if any."""
        record = self._meta["layer_db"].get(digest)
        if not isinstance(record, dict):
            return None
        path = self.layers_dir / str(record["store_path"])
        if not path.is_dir():
            return None
        return Layer(digest=digest, diff_id=str(record["uncompressed_digest"]), path=path)

    def image_record(self, key: str) -> Mapping[str, object] | None:
        """What `record_image` stored under `key` (the pull orchestrator's image_db, e.g. by config digest)."""
        record = self._meta["image_db"].get(key)
        return record if isinstance(record, dict) else None

    async def record_image(self, key: str, record: Mapping[str, object]) -> None:
        """Store a JSON-serialisable image record under `key`, atomically with the layer metadata."""
        async with self._meta_lock:
            self._meta["image_db"][key] = dict(record)
            await asyncio.to_thread(self._write_meta)

    # layers -----------------------------------------------------------------------------------------

    async def ensure_layer(
        self,
        digest: str,
        media_type: str,
        annotations: Mapping[str, str],
        open_blob: OpenBlob,
        unwrap: Unwrap | None,
        *,
        diff_id: str | None = None,
    ) -> Layer:
        """The layer with compressed digest `digest`, unpacked now unless it is stored already.

        `open_blob` is awaited only when the layer must be unpacked; it returns a digest-verified blob file
        inside the work dir, which the store deletes afterwards. `unwrap` answers key-provider `keyunwrap`
        requests for encrypted layers (`DataHub.unwrap_key`). `diff_id`, from the image config's
        `rootfs.diff_ids`, is checked against the unpacked tar (its prefix picks sha256 or sha512).

        Raises:
            NotSupported: an unhandled media type, or encryption with no `unwrap`.
            LayerError, DecryptionError, KbsError: the layer could not be verified or unpacked; nothing of it
                is kept.
        """
        if not _DIGEST.fullmatch(digest):
            msg = f"layer digest is {digest[:80]!r}, expected sha256:<64 hex> or sha512:<128 hex>"
            raise LayerError(msg)
        if diff_id is not None and not _DIGEST.fullmatch(diff_id):
            msg = f"layer diff_id is {diff_id[:80]!r}, expected sha256:<64 hex> or sha512:<128 hex>"
            raise LayerError(msg)
        kind = parse_media_type(media_type)
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            stored = self.layer(digest)
            if stored is not None:
                _check_diff_id(stored.diff_id, diff_id, digest)
                log.info("image.layer.reused", digest=digest, path=str(stored.path))
                return stored
            decryptor = None
            if kind.encrypted:
                if unwrap is None:
                    from agent.errors import NotSupported

                    msg = "the layer is encrypted and no key provider is available to unwrap its key"
                    raise NotSupported(msg)
                decryptor = await ocicrypt.layer_decryptor(annotations, unwrap)
            blob = await open_blob()
            algorithm = diff_id.partition(":")[0] if diff_id else "sha256"
            started = time.monotonic()
            cancel = threading.Event()
            work = asyncio.ensure_future(
                asyncio.to_thread(self._unpack, blob, kind, decryptor, algorithm, diff_id, digest, cancel)
            )
            try:
                path, got = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The worker thread cannot be interrupted: tell it to stop at its next chunk, and drop the layer
                # if it had already finished (it is not recorded, so nothing would ever use or remove it).
                cancel.set()
                work.add_done_callback(_discard_unrecorded)
                raise
            finally:
                blob.unlink(missing_ok=True)  # the worker keeps its open descriptor
            async with self._meta_lock:
                self._meta["layer_db"][digest] = {
                    "compressed_digest": digest,
                    "uncompressed_digest": got,
                    "decoder": kind.compression.value,
                    "encrypted": kind.encrypted,
                    "media_type": media_type,
                    "store_path": path.name,
                }
                await asyncio.to_thread(self._write_meta)
            self.unpacked += 1
            log.info(
                "image.layer.unpacked",
                digest=digest,
                diff_id=got,
                encrypted=kind.encrypted,
                seconds=round(time.monotonic() - started, 3),
            )
            return Layer(digest=digest, diff_id=got, path=path)

    def _unpack(  # noqa: PLR0917 - a private worker-thread entry point
        self,
        blob: Path,
        kind: LayerMediaType,
        decryptor: ocicrypt.LayerDecryptor | None,
        algorithm: str,
        expected: str | None,
        digest: str,
        cancel: threading.Event,
    ) -> tuple[Path, str]:
        """Blocking: decrypt → decompress → unpack into staging, verify, then rename into place."""
        staging = self.layers_dir / f"{_STAGING}{secrets.token_hex(8)}"
        staging.mkdir(mode=0o755)
        try:
            with blob.open("rb", buffering=0) as raw:
                decrypting = decryptor.reader(raw) if decryptor is not None else None
                source = open_decompressed(decrypting or raw, kind.compression)
                with _Prefetcher(source, cancel=cancel) as prefetched:
                    result = unpack_layer(prefetched, staging, digest_algorithm=algorithm)
                if decrypting is not None:
                    decrypting.finish()
            _check_diff_id(result.diff_id, expected, digest)
            _syncfs(staging)  # the files reach the disk before the metadata that vouches for them
            with self._number_lock:
                final = self.layers_dir / str(self._next_number())
                staging.rename(final)
        except BaseException:
            _remove_tree(staging)
            raise
        return final, result.diff_id

    def _next_number(self) -> int:
        numbers = [int(p.name) for p in self.layers_dir.iterdir() if p.name.isdigit()]
        return max(numbers, default=0) + 1


def _discard_unrecorded(work: asyncio.Future[tuple[Path, str]]) -> None:
    if work.cancelled() or work.exception() is not None:
        return  # the worker removed its staging directory itself
    path = work.result()[0]
    threading.Thread(target=_remove_tree, args=(path,), name="layer-discard", daemon=True).start()


def _syncfs(path: Path) -> None:
    """syncfs(2) on the file system holding `path` (a no-op on tmpfs; needed on a disk-backed work dir)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _check_diff_id(got: str, expected: str | None, digest: str) -> None:
    if expected is not None and got != expected:
        msg = f"layer {digest} has uncompressed digest {got}, expected {expected} (the image config's diff_id)"
        raise LayerError(msg)


def _mounted_lower_dirs(mounts: Path = Path("/proc/self/mounts")) -> set[str] | None:
    """Every `lowerdir` path of the overlays in this mount namespace, or None if the table cannot be read."""
    try:
        table = mounts.read_text()
    except OSError:
        return None
    found: set[str] = set()
    for line in table.splitlines():
        fields = line.split(" ")
        if len(fields) < 4 or fields[2] != "overlay":
            continue
        for option in fields[3].split(","):
            if option.startswith("lowerdir="):
                found.update(p.replace("\\040", " ") for p in option[len("lowerdir=") :].split(":"))
    return found


def _remove_tree(path: Path) -> None:
    """Remove a layer directory whatever its modes (a layer may hold 0000 directories)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    shutil.rmtree(path, ignore_errors=True)


class _Prefetcher:
    """Reads `source` in a second thread, a bounded queue ahead of the consumer.

    Decryption and decompression (zlib and zstd release the GIL) then overlap with tar parsing and file
    writes, as `tar -xz` overlaps gzip and tar in two processes. At most `depth` chunks of `chunk` bytes are
    buffered. An exception in the reader thread is raised to the consumer at the point it occurred.
    """

    def __init__(
        self, source: Readable, *, chunk: int = 1024 * 1024, depth: int = 4, cancel: threading.Event | None = None
    ) -> None:
        self._source = source
        self._cancel = cancel or threading.Event()
        self._chunk = chunk
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._buffer = b""
        self._offset = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, name="layer-prefetch", daemon=True)

    def __enter__(self) -> _Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)  # unblock a producer waiting for room
        self._thread.join()

    def _run(self) -> None:
        item: bytes | BaseException
        while not self._stop.is_set():
            try:
                if self._cancel.is_set():
                    raise LayerError("layer unpacking was cancelled")  # noqa: EM101 - a fixed text
                item = self._source.read(self._chunk)
            except BaseException as exc:  # handed to the consumer thread, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    def read(self, size: int = -1, /) -> bytes:
        if self._offset >= len(self._buffer):
            if self._done:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            self._buffer, self._offset = item, 0
        end = len(self._buffer) if size < 0 else self._offset + size
        data = self._buffer[self._offset : end]
        self._offset += len(data)
        return data
