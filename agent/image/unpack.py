"""Safe extraction of one layer tar into a layer directory, for overlayfs. Edge: touches the file system.

`unpack_layer(source, dest)` reads an uncompressed tar stream and recreates it under `dest`, computing the
layer's uncompressed digest (diff_id) over every byte of the stream. What the tar says is never trusted:

- **Paths stay inside `dest`.** Every entry's parent directory is resolved from `dest` one component at a time
  through directory file descriptors (`openat` with `O_NOFOLLOW`), symlinks expanded *inside* the root: an
  absolute target restarts at `dest`, `..` stops at `dest` — the semantics of `openat2(RESOLVE_IN_ROOT)`,
  which the tests use as the oracle. The last component is never followed (files are created `O_EXCL|O_NOFOLLOW`
  after removing whatever was there; links, directories and nodes by the `*at` calls on the parent fd).
  Entry names holding a `..` component are skipped, as image-rs does; leading `/` is stripped.
- **Links**: symlink targets are stored verbatim (they are resolved by the container, not by us); a hardlink
  target is resolved inside `dest` like any path, so it can only link a file of this layer.
- **Whiteouts** (`.wh.<name>`) become a character device 0/0 named `<name>`; an opaque marker
  (`.wh..wh..opq`) sets `trusted.overlay.opaque=y` on its directory (containerd and image-rs do the same).
  Other `.wh..wh.` names (aufs metadata) are dropped.
- **Metadata**: numeric uid/gid from the header (`chown` first, then `chmod`, so set-id bits survive), mode,
  mtime (directories after all entries); PAX `SCHILY.xattr.*` where the file system accepts them, except
  `trusted.overlay.*`/`user.overlay.*`, which would steer overlayfs itself. Character and block devices and
  FIFOs become empty regular files with their owner and mode, as in image-rs (no `mknod` from a layer).
- **Bounds**: header blocks are checksummed; PAX and GNU long-name records, entry counts, path lengths and
  xattrs are limited; sparse and multi-volume entries are refused; a truncated stream is an error. Zero
  blocks are skipped and reading goes on to the end of the stream (tar-rs `ignore_zeros`, as image-rs reads).

Failures raise `LayerError` (or `NotSupported` for an opaque directory on a file system without trusted
xattrs); `dest` is then left half-written, and the caller (the layer store) deletes it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import LayerError, NotSupported
from agent.image.compression import Readable

__all__ = ["UnpackLimits", "UnpackResult", "TarEntry", "TarReader", "unpack_layer", "WHITEOUT_PREFIX", "OPAQUE"]

BLOCK = 512
WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_COPY_CHUNK = 1024 * 1024
_MAX_SYMLINK_EXPANSIONS = 40  # the kernel's MAXSYMLINKS

# tar type flags (POSIX ustar, GNU)
REGULAR = frozenset(b"0\x007")
HARDLINK = ord("1")
SYMLINK = ord("2")
CHARDEV = ord("3")
BLOCKDEV = ord("4")
DIRECTORY = ord("5")
FIFO = ord("6")
_PAX = ord("x")
_PAX_GLOBAL = ord("g")
_GNU_LONGNAME = ord("L")
_GNU_LONGLINK = ord("K")
_GNU_DUMPDIR = ord("D")
_GNU_VOLUME = ord("V")
_OCTAL = re.compile(rb"[0-7]+")
_MAX_ID = 2**32 - 1  # (uid_t)-1 means "unchanged" to chown(2)
_MAX_NS = 2**63
_REFUSED = {ord("S"): "GNU sparse", ord("M"): "GNU multi-volume", ord("N"): "GNU old long name"}


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpackLimits:
    max_header_bytes: int = 1024 * 1024
    """Largest PAX or GNU long-name record."""
    max_entries: int = 1_000_000
    """Most tar headers (entries and their extension headers) in one layer."""
    max_path_bytes: int = 4096
    """Longest entry name or link target (PATH_MAX)."""
    max_xattrs: int = 128
    """Most xattrs on one entry."""
    max_xattr_bytes: int = 64 * 1024
    """Largest xattr value (the Linux VFS limit)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpackResult:
    diff_id: str
    """`<algorithm>:<hex>` over the whole uncompressed stream."""
    size: int
    """Bytes of the uncompressed stream."""
    entries: int
    skipped: int = 0
    """Entries not extracted: names with `..`, aufs metadata, volume labels, global PAX headers."""
    xattrs_skipped: int = 0
    """PAX xattrs the file system refused or that were filtered out."""


@dataclass(slots=True, kw_only=True)
class TarEntry:
    """One tar member after its PAX / GNU extension headers were applied."""

    name: bytes
    type: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    linkname: bytes = b""
    xattrs: dict[str, bytes] = field(default_factory=dict)


class TarReader:
    """A strict, streaming tar parser (ustar, GNU and PAX formats) that hashes every byte it reads.

    Parsing only: no file-system access. `next()` returns the next member or None at the end of the stream;
    `read(n)` reads the current member's data; the rest of a member is skipped by the following `next()`.
    """

    def __init__(self, source: Readable, *, digest_algorithm: str = "sha256", limits: UnpackLimits | None = None):
        if digest_algorithm not in ("sha256", "sha512"):
            msg = f"diff_id algorithm is {digest_algorithm!r}, expected 'sha256' or 'sha512'"
            raise LayerError(msg)
        self._source = source
        self._hash = hashlib.new(digest_algorithm)
        self._algorithm = digest_algorithm
        self._limits = limits or UnpackLimits()
        self._left = 0  # data bytes of the current member not yet read
        self._pad = 0
        self.headers = 0
        self.size = 0
        self.skipped = 0

    @property
    def diff_id(self) -> str:
        return f"{self._algorithm}:{self._hash.hexdigest()}"

    def _read_exact(self, size: int, what: str) -> bytes:
        parts: list[bytes] = []
        want = size
        while want:
            chunk = self._source.read(min(want, _COPY_CHUNK))
            if not chunk:
                if want == size and what == "header":
                    return b""
                msg = f"layer tar ends inside {what}, expected {size:#x} more bytes"
                raise LayerError(msg)
            self._hash.update(chunk)
            self.size += len(chunk)
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def read(self, size: int) -> bytes:
        """Up to `size` bytes of the current member's data; b"" at its end."""
        if self._left == 0:
            return b""
        chunk = self._source.read(min(size, self._left))
        if not chunk:
            msg = f"layer tar ends inside a member, expected {self._left:#x} more bytes"
            raise LayerError(msg)
        self._hash.update(chunk)
        self.size += len(chunk)
        self._left -= len(chunk)
        return chunk

    def _skip_data(self) -> None:
        while self.read(_COPY_CHUNK):
            pass
        if self._pad:
            self._read_exact(self._pad, "padding")
            self._pad = 0

    def next(self) -> TarEntry | None:  # noqa: PLR0915 - one header state machine, read top to bottom
        self._skip_data()
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            block = self._read_exact(BLOCK, "header")
            if not block:
                if pax or long_name is not None or long_link is not None:
                    msg = "layer tar ends after an extension header, expected its member"
                    raise LayerError(msg)
                return None
            if block == bytes(BLOCK):
                continue  # end-of-archive blocks and padding: read on (ignore_zeros)
            self.headers += 1
            if self.headers > self._limits.max_entries:
                msg = f"layer tar has more than {self._limits.max_entries} headers, expected fewer"
                raise LayerError(msg)
            header = _parse_header(block)
            typeflag = header.type
            if typeflag in _REFUSED:
                msg = f"layer tar entry type is {_REFUSED[typeflag]}, which is not supported"
                raise LayerError(msg)
            if typeflag in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
                if header.size > self._limits.max_header_bytes:
                    msg = (
                        f"layer tar extension header is {header.size:#x} bytes, "
                        f"expected at most {self._limits.max_header_bytes:#x}"
                    )
                    raise LayerError(msg)
                data = self._read_exact(header.size, "an extension header")
                self._read_exact(-header.size % BLOCK, "padding")
                if typeflag == _PAX:
                    pax.update(_parse_pax(data))
                elif typeflag == _PAX_GLOBAL:
                    _parse_pax(data)  # validated, then ignored (as containerd and tar-rs extraction do)
                    self.skipped += 1
                elif typeflag == _GNU_LONGNAME:
                    long_name = data.split(b"\0", 1)[0]
                else:
                    long_link = data.split(b"\0", 1)[0]
                continue
            break
        entry = header
        if long_name is not None:
            entry.name = long_name
        if long_link is not None:
            entry.linkname = long_link
        _apply_pax(entry, pax, self._limits)
        if not (0 <= entry.uid < _MAX_ID and 0 <= entry.gid < _MAX_ID) or not -_MAX_NS <= entry.mtime_ns < _MAX_NS:
            msg = f"layer tar entry uid/gid {entry.uid}/{entry.gid} or mtime is out of range, expected 32-bit ids"
            raise LayerError(msg)
        for value in (entry.name, entry.linkname):
            if len(value) > self._limits.max_path_bytes or b"\0" in value:
                msg = f"layer tar entry name or link is {len(value):#x} bytes or holds NUL, expected a path"
                raise LayerError(msg)
        has_data = entry.type in REGULAR or entry.type not in (HARDLINK, SYMLINK, DIRECTORY, CHARDEV, BLOCKDEV, FIFO)
        # Hard links, symlinks, directories and nodes carry no data in practice; a size on them is still skipped.
        self._left = entry.size
        self._pad = -entry.size % BLOCK
        if not has_data:
            self._skip_data()
        return entry


def _parse_header(block: bytes) -> TarEntry:
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block) - sum(block[148:156]) + 32 * 8
    if stored != unsigned and stored != unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127):
        # the second form is the signed-char sum some old tars wrote
        msg = f"layer tar header checksum is {stored:#o}, expected {unsigned:#o}"
        raise LayerError(msg)
    name = _cstring(block[0:100])
    magic = block[257:263]
    if magic == b"ustar\0":
        prefix = _cstring(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    entry = TarEntry(
        name=name,
        type=block[156],
        mode=_number(block[100:108], "mode") & 0o7777,
        uid=_number(block[108:116], "uid"),
        gid=_number(block[116:124], "gid"),
        size=_number(block[124:136], "size"),
        mtime_ns=_number(block[136:148], "mtime", signed=True) * 1_000_000_000,
        linkname=_cstring(block[157:257]),
    )
    if entry.type == 0:
        entry.type = ord("0")
    return entry


def _cstring(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def _number(field_: bytes, what: str, *, signed: bool = False) -> int:
    """An octal field (NUL/space padded) or a GNU base-256 one (high bit set; 0xff = negative)."""
    if field_ and field_[0] & 0x80:
        value = int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
        if field_[0] == 0xFF:
            value = int.from_bytes(field_, "big", signed=True)
        if value < 0 and not signed:
            msg = f"layer tar header `{what}` is negative, expected a size or an id"
            raise LayerError(msg)
        return value
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not _OCTAL.fullmatch(text):
        msg = f"layer tar header `{what}` is {text[:16]!r}, expected octal digits"
        raise LayerError(msg)
    return int(text, 8)


def _parse_pax(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        length_text = data[pos:space] if space > pos else b""
        if not length_text.isdigit():
            msg = "layer tar PAX record has no length, expected '<len> <key>=<value>\\n'"
            raise LayerError(msg)
        length = int(length_text)
        record = data[pos : pos + length]
        if length <= len(length_text) + 1 or len(record) != length or not record.endswith(b"\n"):
            msg = f"layer tar PAX record length {length} does not fit, expected a record ending in a newline"
            raise LayerError(msg)
        key, sep, value = record[space - pos + 1 : -1].partition(b"=")
        if not sep or not key:
            msg = "layer tar PAX record has no key, expected '<key>=<value>'"
            raise LayerError(msg)
        try:
            records[key.decode("utf-8")] = value
        except UnicodeDecodeError:
            msg = "layer tar PAX record key is not UTF-8"
            raise LayerError(msg) from None
        pos += length
    return records


def _apply_pax(entry: TarEntry, pax: dict[str, bytes], limits: UnpackLimits) -> None:
    for key, value in pax.items():
        if key == "path" and value:
            entry.name = value
        elif key == "linkpath" and value:
            entry.linkname = value
        elif key in ("size", "uid", "gid") and value:
            if not value.isdigit():
                msg = f"layer tar PAX `{key}` is {value[:20]!r}, expected a decimal number"
                raise LayerError(msg)
            setattr(entry, key, int(value))
        elif key == "mtime" and value:
            entry.mtime_ns = _pax_time(value)
        elif key.startswith("SCHILY.xattr."):
            entry.xattrs[key[len("SCHILY.xattr.") :]] = value
        elif key.startswith("GNU.sparse."):
            msg = "layer tar entry is a PAX sparse file, which is not supported"
            raise LayerError(msg)
    if len(entry.xattrs) > limits.max_xattrs or any(len(v) > limits.max_xattr_bytes for v in entry.xattrs.values()):
        msg = f"layer tar entry has more than {limits.max_xattrs} xattrs or one over {limits.max_xattr_bytes:#x} bytes"
        raise LayerError(msg)


def _pax_time(value: bytes) -> int:
    text = value.decode("ascii", "replace")
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(whole) > 20:
        msg = f"layer tar PAX `mtime` is {text[:30]!r}, expected seconds with an optional fraction"
        raise LayerError(msg)
    return sign * (int(whole) * 1_000_000_000 + int((frac + "000000000")[:9]))


# --- extraction -----------------------------------------------------------------------------------------

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EINVAL)


def unpack_layer(
    source: Readable,
    dest: Path,
    *,
    digest_algorithm: str = "sha256",
    limits: UnpackLimits | None = None,
) -> UnpackResult:
    """Extract the tar stream `source` into the existing, empty directory `dest`; see the module docstring.

    Returns the diff_id over every byte of `source` (read to its end) and entry counts. Blocking; the caller
    runs it in a worker thread.

    Raises:
        LayerError: malformed or truncated tar, an entry that cannot be created (the message names it), or an
            error from `source` (decompression, decryption) — those propagate with their own type.
        NotSupported: an opaque directory on a file system without `trusted.*` xattrs.
    """
    reader = TarReader(source, digest_algorithm=digest_algorithm, limits=limits)
    root = os.open(dest, _O_PATH_DIR)
    try:
        extractor = _Extractor(root, reader)
        entries = 0
        while (entry := reader.next()) is not None:
            entries += 1
            try:
                extractor.extract(entry)
            except OSError as exc:
                shown = os.fsdecode(entry.name)[:200]
                msg = f"layer entry {shown!r} cannot be unpacked: {exc.strerror or exc}"
                raise LayerError(msg) from exc
        extractor.finish()  # next() returned None: the stream was read to its very end
    finally:
        os.close(root)
    return UnpackResult(
        diff_id=reader.diff_id,
        size=reader.size,
        entries=entries,
        skipped=reader.skipped + extractor.skipped,
        xattrs_skipped=extractor.xattrs_skipped,
    )


def split_name(name: bytes) -> list[str] | None:
    """The path components of a tar name, or None when it holds `..` (such entries are skipped).

    A leading `/` is stripped and empty and `.` components are dropped; `[]` is the root itself.
    """
    parts = [os.fsdecode(p) for p in name.split(b"/") if p not in (b"", b".")]
    if ".." in parts:
        return None
    return parts


class _Extractor:
    def __init__(self, root: int, reader: TarReader) -> None:
        self._root = root
        self._reader = reader
        self._dir_times: dict[tuple[str, ...], int] = {}
        self._cache: tuple[tuple[str, ...], int] | None = None
        self.skipped = 0
        self.xattrs_skipped = 0

    # path resolution --------------------------------------------------------------------------------

    def resolve_dir(self, parts: list[str], *, create: bool) -> int:
        """An O_PATH fd of directory `parts` resolved inside the root (RESOLVE_IN_ROOT semantics).

        Missing directories are created 0755 when `create` is set. The caller closes the fd.
        """
        stack = [os.dup(self._root)]
        pending = list(reversed(parts))
        expansions = 0
        try:
            while pending:
                component = pending.pop()
                if component in ("", "."):
                    continue
                if component == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                current = stack[-1]
                try:
                    fd = os.open(component, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(component, 0o755, dir_fd=current)
                    fd = os.open(component, _O_PATH_DIR, dir_fd=current)
                mode = os.fstat(fd).st_mode
                if stat.S_ISLNK(mode):
                    os.close(fd)
                    expansions += 1
                    if expansions > _MAX_SYMLINK_EXPANSIONS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                    target = os.readlink(component, dir_fd=current)
                    if target.startswith("/"):
                        while len(stack) > 1:
                            os.close(stack.pop())
                    pending.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(mode):
                    os.close(fd)
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                stack.append(fd)
            return stack.pop()
        finally:
            for fd in stack:
                os.close(fd)

    def _parent(self, parts: list[str]) -> int:
        key = tuple(parts[:-1])
        if self._cache is not None and self._cache[0] == key:
            return os.dup(self._cache[1])
        self._drop_cache()
        fd = self.resolve_dir(parts[:-1], create=True)
        self._cache = (key, os.dup(fd))
        return fd

    def _drop_cache(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    # entries ----------------------------------------------------------------------------------------

    def extract(self, entry: TarEntry) -> None:
        parts = split_name(entry.name)
        if parts is None:
            self.skipped += 1
            return
        if not parts:
            if entry.type == DIRECTORY:
                self._directory_metadata(self._root, ".", entry, [])
            else:
                self.skipped += 1
            return
        name = parts[-1]
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts)
            return
        if entry.type == _GNU_VOLUME:
            self.skipped += 1
            return
        parent = self._parent(parts)
        try:
            if entry.type in (DIRECTORY, _GNU_DUMPDIR):
                self._directory(parent, name, entry, parts)
            elif entry.type == SYMLINK:
                self._symlink(parent, name, entry)
            elif entry.type == HARDLINK:
                self._hardlink(parent, name, entry)
            else:  # regular files, unknown types (POSIX: read as regular) and device nodes/FIFOs (no data)
                self._regular(parent, name, entry)
        finally:
            os.close(parent)

    def _remove(self, parent: int, name: str, *, keep_dir: bool) -> bool:
        """Remove `name` unless it is a directory and `keep_dir`; True if a directory was kept."""
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._drop_cache()
            shutil.rmtree(name, dir_fd=parent)
        else:
            if stat.S_ISLNK(st.st_mode):
                self._drop_cache()  # the cached parent may have been resolved through this link
            os.unlink(name, dir_fd=parent)
        return False

    def _regular(self, parent: int, name: str, entry: TarEntry) -> None:
        self._remove(parent, name, keep_dir=False)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent)
        try:
            while chunk := self._reader.read(_COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode & 0o7777)
            self._xattrs(fd, entry)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)

    def _directory(self, parent: int, name: str, entry: TarEntry, parts: list[str]) -> None:
        if not self._remove(parent, name, keep_dir=True):
            os.mkdir(name, 0o700, dir_fd=parent)
        self._directory_metadata(parent, name, entry, parts)

    def _directory_metadata(self, parent: int, name: str, entry: TarEntry, parts: list[str]) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode & 0o7777)
            self._xattrs(fd, entry)
        finally:
            os.close(fd)
        self._dir_times[tuple(parts)] = entry.mtime_ns

    def _symlink(self, parent: int, name: str, entry: TarEntry) -> None:
        self._remove(parent, name, keep_dir=False)
        os.symlink(os.fsdecode(entry.linkname), name, dir_fd=parent)
        os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        if entry.xattrs:
            self._xattrs(f"/proc/self/fd/{parent}/{name}", entry)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, parent: int, name: str, entry: TarEntry) -> None:
        target = split_name(entry.linkname)
        if not target:
            msg = f"hard link {name!r} points at {os.fsdecode(entry.linkname)[:100]!r}, expected a file of the layer"
            raise LayerError(msg)
        target_parent = self.resolve_dir(target[:-1], create=False)
        try:
            source_stat = os.lstat(target[-1], dir_fd=target_parent)
            try:
                if os.lstat(name, dir_fd=parent).st_ino == source_stat.st_ino:
                    return  # already the same file
            except FileNotFoundError:
                pass
            self._remove(parent, name, keep_dir=False)
            os.link(target[-1], name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(target_parent)

    def _whiteout(self, parts: list[str]) -> None:
        name = parts[-1]
        self._drop_cache()
        if name == OPAQUE:
            parent = self.resolve_dir(parts[:-1], create=True)
            try:
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
                try:
                    os.setxattr(fd, OPAQUE_XATTR, b"y")
                except OSError as exc:
                    if exc.errno in _NOT_SUPPORTED:
                        msg = (
                            "the layer has an opaque directory, but the work dir's file system refuses the "
                            f"{OPAQUE_XATTR} xattr ({exc.strerror}); put the work dir on tmpfs or ext4"
                        )
                        raise NotSupported(msg) from exc
                    raise
                finally:
                    os.close(fd)
            finally:
                os.close(parent)
            return
        hidden = name[len(WHITEOUT_PREFIX) :]
        if hidden.startswith(WHITEOUT_PREFIX) or hidden in ("", ".", ".."):
            self.skipped += 1  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs) and malformed names
            return
        parent = self.resolve_dir(parts[:-1], create=True)
        try:
            self._remove(parent, hidden, keep_dir=False)
            os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent)
        finally:
            os.close(parent)

    def _xattrs(self, target: int | str, entry: TarEntry) -> None:
        for key, value in entry.xattrs.items():
            if key.startswith(("trusted.overlay.", "user.overlay.")):
                self.xattrs_skipped += 1
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
                self.xattrs_skipped += 1

    def finish(self) -> None:
        """Apply directory mtimes, deepest first (after every entry, so later entries do not touch them)."""
        self._drop_cache()
        for parts, mtime_ns in sorted(self._dir_times.items(), key=lambda item: -len(item[0])):
            if not parts:
                os.utime(self._root_path(), ns=(mtime_ns, mtime_ns))
                continue
            try:
                parent = self.resolve_dir(list(parts[:-1]), create=False)
            except OSError:
                continue  # removed or replaced by a later entry
            try:
                os.utime(parts[-1], ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            finally:
                os.close(parent)

    def _root_path(self) -> str:
        return f"/proc/self/fd/{self._root}"
