"""A FUSE file system that behaves like the kernel's configfs-tsm report interface, for tests.

The mount point plays `/sys/kernel/config`; the report directory is `<mount>/tsm/report` (`MountedTsm.root`).
`mkdir` there creates an entry with the attributes of the configured provider and kernel, with the kernel's
semantics (drivers/virt/coco/tsm.c, later guest/report.c; fs/configfs/file.c):

- read-only attributes refuse opening for write and write-only ones refuse opening for read (EACCES);
  entries accept no new files (EACCES), sub-directories (EPERM), unlink or rename (EPERM);
- `inblob` takes at most 64 bytes (EFBIG); like every configfs binary attribute it is buffered and applied
  only when the file is closed, and a failure to apply it (EBUSY) is dropped silently;
- every applied write to `inblob`, `privlevel` or a `service_*` attribute increments `generation`;
- reading `outblob`/`auxblob`/`manifestblob` fails with EINVAL before `inblob` was written, returns the cached
  blobs while `generation` is unchanged, and otherwise generates new evidence from the current `inblob`:
  `tdx_guest` splices it into a real TD quote at REPORTDATA, `sev_guest` into a real SNP report at REPORT_DATA
  with VMPL = `privlevel`, and `auxblob` is a GHCB certificate table (signatures therefore no longer verify);
  TDX and SEV reject an `inblob` that is not exactly 64 bytes (EINVAL);
- `privlevel` must lie in `privlevel_floor`..3 (EINVAL).

With `measurements=True` the mount also has `<mount>/measurements/` (`MountedTsm.measurements`), the Linux 6.16
TDX measurement sysfs (hw-abi.md §4): `rtmr0:sha384` … `rtmr3:sha384` (0644, 48 bytes; a write of exactly 48
bytes at offset 0 extends, `RTMR = SHA384(RTMR ‖ data)`, anything else is EINVAL), `mrtd:sha384`, `mrconfigid`,
`mrowner`, `mrownerconfig` (0444). The registers start as the template quote's values, and every TD quote carries
the current RTMR0..3 (also without `measurements`, where they never change).

Switches (`TsmFsOptions`, at mount time or later through `MountedTsm.configure`): provider, configfs present but
`tsm` missing, no provider registered, attributes missing as on other kernels, a racing writer, an errno for
evidence generation, an errno for mkdir, a generation delay.

The file system runs in a subprocess (`python tests/fakes/tsmfs.py serve ...`) so that libfuse's signal handling
and threads stay out of the test process; a hidden control file `<mount>/.tsmfs-control` carries switches in
(JSON object written in one go) and state out (JSON read). Use it through `mounted_tsm`:

    with mounted_tsm(TsmFsOptions(provider="sev_guest", privlevel_floor=1)) as tsm:
        report = get_report(data, root=tsm.root)
        assert tsm.state()["entries"] == []

FUSE library: mfusepy (ctypes bindings to libfuse 3; untyped, so only `_serve` touches it, as `Any`).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import dataclasses
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

__all__ = [
    "CONTROL_FILE",
    "InMemoryTsm",
    "DEFAULT_CERT_TABLE",
    "DEFAULT_SNP_TEMPLATE",
    "DEFAULT_TDX_TEMPLATE",
    "MountedTsm",
    "TsmFsOptions",
    "TsmModel",
    "fuse_unavailable_reason",
    "mounted_tsm",
    "require_fuse",
    "snp_report_with",
    "tdx_quote_registers",
    "tdx_quote_with",
    "tdx_quote_with_rtmrs",
]

_HW_VECTORS: Final = Path(__file__).resolve().parents[1] / "vectors" / "hw"  # also runs as a script
DEFAULT_TDX_TEMPLATE: Final = _HW_VECTORS / "tdx" / "quote_v4_trustee.dat"
DEFAULT_SNP_TEMPLATE: Final = _HW_VECTORS / "snp" / "report_v2_milan_gosevguest.bin"
DEFAULT_CERT_TABLE: Final = _HW_VECTORS / "snp" / "cert_table_SYNTH_milan_gosevguest.bin"
CONTROL_FILE: Final = ".tsmfs-control"

INBLOB_MAX: Final = 64  # TSM_INBLOB_MAX
PRIVLEVEL_MAX: Final = 3  # TSM_PRIVLEVEL_MAX
TDX_QUOTE_V4_REPORTDATA: Final = 0x238  # 48-byte header + body offset 520 (hw-abi.md §6.2)
TDX_QUOTE_V5_REPORTDATA: Final = 0x23E  # 48-byte header + 6-byte body descriptor + 520 (§6.3)
SNP_REPORT_VMPL: Final = 0x30  # hw-abi.md §6.4
SNP_REPORT_REPORT_DATA: Final = 0x50
SNP_REPORT_LEN: Final = 0x4A0
TDX_QUOTE_BODY: Final = {4: 48, 5: 54}  # after the header (and v5's body descriptor)
TDX_BODY_MRTD: Final = 136  # hw-abi.md §6.2: MRTD, MRCONFIGID, MROWNER, MROWNERCONFIG, RTMR0..3, 48 bytes each
MR_LEN: Final = 48
MEASUREMENTS: Final = "measurements"
_MR_FILES: Final = ("mrtd:sha384", "mrconfigid", "mrowner", "mrownerconfig")  # body order from MRTD on
_RTMR_FILES: Final = tuple(f"rtmr{i}:sha384" for i in range(4))

Provider = Literal["tdx_guest", "sev_guest", ""]
Layout = Literal["full", "no_tsm", "no_report"]

_ATTR_SIZE: Final = 4096  # what stat reports for every attribute; reads are not limited by it (direct_io)
_U64: Final = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------------------
# Evidence templates (pure)


def tdx_quote_with(template: bytes, reportdata: bytes) -> bytes:
    """`template` (a TD quote v4 or v5) with its REPORTDATA replaced by `reportdata` (64 bytes)."""
    if len(reportdata) != INBLOB_MAX:
        msg = f"reportdata is {len(reportdata):#x} bytes, expected {INBLOB_MAX:#x}"
        raise ValueError(msg)
    version = int.from_bytes(template[0:2], "little")
    offsets = {4: TDX_QUOTE_V4_REPORTDATA, 5: TDX_QUOTE_V5_REPORTDATA}
    if version not in offsets:
        msg = f"TD quote version is {version}, expected 4 or 5"
        raise ValueError(msg)
    at = offsets[version]
    return template[:at] + reportdata + template[at + INBLOB_MAX :]


def tdx_quote_registers(template: bytes) -> list[bytes]:
    """MRTD, MRCONFIGID, MROWNER, MROWNERCONFIG, RTMR0..3 of a TD quote v4/v5."""
    at = TDX_QUOTE_BODY[int.from_bytes(template[0:2], "little")] + TDX_BODY_MRTD
    return [template[at + i * MR_LEN : at + (i + 1) * MR_LEN] for i in range(8)]


def tdx_quote_with_rtmrs(template: bytes, rtmrs: list[bytes]) -> bytes:
    """`template` with RTMR0..3 replaced."""
    at = TDX_QUOTE_BODY[int.from_bytes(template[0:2], "little")] + TDX_BODY_MRTD + 4 * MR_LEN
    return template[:at] + b"".join(rtmrs) + template[at + 4 * MR_LEN :]


def snp_report_with(template: bytes, report_data: bytes, vmpl: int) -> bytes:
    """`template` (an SNP attestation report) with REPORT_DATA and VMPL replaced."""
    if len(report_data) != INBLOB_MAX or len(template) != SNP_REPORT_LEN:
        msg = f"report_data {len(report_data):#x} / report {len(template):#x} bytes, expected 0x40 / 0x4a0"
        raise ValueError(msg)
    out = bytearray(template)
    out[SNP_REPORT_VMPL : SNP_REPORT_VMPL + 4] = vmpl.to_bytes(4, "little")
    out[SNP_REPORT_REPORT_DATA : SNP_REPORT_REPORT_DATA + INBLOB_MAX] = report_data
    return bytes(out)


# --------------------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, slots=True, kw_only=True)
class TsmFsOptions:
    """What the emulated kernel looks like. Every field can also be changed at run time (`configure`).

    provider: `tdx_guest`, `sev_guest`, or "" for "configfs-tsm present but no provider registered" (mkdir ENXIO).
    layout: `full`; `no_tsm` (configfs mounted, no `tsm` directory: kernel < 6.7 or module not loaded);
        `no_report` (`tsm` without `report`).
    privlevel_floor: the guest's VMPL (`sev_guest`).
    privlevel_attrs / auxblob_attr: whether `sev_guest` entries show `privlevel`+`privlevel_floor` / `auxblob`
        (False emulates a kernel or provider without them; `tdx_guest` never shows them).
    service_attrs: whether `sev_guest` entries show `service_*` and `manifestblob` when privlevel_floor > 0 (v6.10+).
    certs: whether the host supplies certificates (otherwise `auxblob` is empty).
    race_writes: how many times a racing writer writes `inblob` of our entries; race_on says when: right after
        our `inblob` is applied (`inblob`) or just before evidence is generated on a blob read (`outblob`).
    outblob_errno / outblob_errno_count: the errno evidence generation fails with, for that many generations
        (-1: always); 0 for none.
    mkdir_errno: the errno every mkdir of an entry fails with (e.g. EACCES); 0 for none.
    report_delay_s: how long evidence generation takes (a real TDX quote takes about a second).
    measurements: whether `<mount>/measurements/` (the TDX measurement sysfs) exists.
    extend_delay_s: how long an RTMR write takes: half before the register changes, half after (so a writer
        killed meanwhile may or may not have extended it).
    """

    provider: Provider = "tdx_guest"
    layout: Layout = "full"
    privlevel_floor: int = 0
    privlevel_attrs: bool = True
    auxblob_attr: bool = True
    service_attrs: bool = True
    certs: bool = True
    race_writes: int = 0
    race_on: Literal["inblob", "outblob"] = "inblob"
    outblob_errno: int = 0
    outblob_errno_count: int = -1
    mkdir_errno: int = 0
    report_delay_s: float = 0.0
    measurements: bool = False
    extend_delay_s: float = 0.0
    tdx_template: str = str(DEFAULT_TDX_TEMPLATE)
    snp_template: str = str(DEFAULT_SNP_TEMPLATE)
    cert_table: str = str(DEFAULT_CERT_TABLE)

    def __post_init__(self) -> None:
        if self.provider not in ("tdx_guest", "sev_guest", ""):
            msg = f"provider is {self.provider!r}, expected 'tdx_guest', 'sev_guest' or ''"
            raise ValueError(msg)
        if self.layout not in ("full", "no_tsm", "no_report"):
            msg = f"layout is {self.layout!r}, expected 'full', 'no_tsm' or 'no_report'"
            raise ValueError(msg)
        if self.race_on not in ("inblob", "outblob"):
            msg = f"race_on is {self.race_on!r}, expected 'inblob' or 'outblob'"
            raise ValueError(msg)
        if not 0 <= self.privlevel_floor <= PRIVLEVEL_MAX:
            msg = f"privlevel_floor is {self.privlevel_floor}, expected 0..{PRIVLEVEL_MAX}"
            raise ValueError(msg)
        if self.race_writes < 0 or self.outblob_errno < 0 or self.mkdir_errno < 0 or self.report_delay_s < 0:
            msg = "race_writes, outblob_errno, mkdir_errno and report_delay_s must not be negative"
            raise ValueError(msg)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TsmFsOptions:
        data = json.loads(text)
        if not isinstance(data, dict):
            msg = "options must be a JSON object"
            raise TypeError(msg)
        return cls(**data)


# --------------------------------------------------------------------------------------------------------------
# The kernel model (no FUSE here): every method raises OSError(errno) like the kernel would.

_BIN: Final = "bin"
_TEXT: Final = "text"
_RO: Final = 0o444
_WO: Final = 0o200
_ATTRS: Final[dict[str, tuple[str, int]]] = {
    "inblob": (_BIN, _WO),
    "outblob": (_BIN, _RO),
    "auxblob": (_BIN, _RO),
    "manifestblob": (_BIN, _RO),
    "provider": (_TEXT, _RO),
    "generation": (_TEXT, _RO),
    "privlevel": (_TEXT, _WO),
    "privlevel_floor": (_TEXT, _RO),
    "service_provider": (_TEXT, _WO),
    "service_guid": (_TEXT, _WO),
    "service_manifest_version": (_TEXT, _WO),
}


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _kstrtouint(data: bytes) -> int:
    """The kernel's kstrtouint(buf, 0): optional '+', base from the prefix (0x hex, 0 octal), one trailing '\\n'."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise _err(errno.EINVAL) from None
    text = text.removesuffix("\n").removeprefix("+")
    if text[:2].lower() == "0x":
        base, digits = 16, text[2:]
    elif len(text) > 1 and text.startswith("0"):
        base, digits = 8, text[1:]
    else:
        base, digits = 10, text
    allowed = "0123456789abcdef"[:base]
    if not digits or any(c not in allowed for c in digits.lower()):
        raise _err(errno.EINVAL)
    value = int(digits, base)
    if value > 0xFFFFFFFF:
        raise _err(errno.ERANGE)
    return value


@dataclass(slots=True)
class _Entry:
    inblob: bytes = b""
    privlevel: int = 0
    write_gen: int = 0
    read_gen: int = 0
    outblob: bytes | None = None
    auxblob: bytes | None = None
    manifestblob: bytes | None = None
    service_provider: str = ""
    service_guid: bytes = bytes(16)
    service_manifest_version: int = 0


@dataclass(slots=True)
class _Handle:
    path: tuple[str, ...]
    writable: bool
    buffer: bytearray = field(default_factory=bytearray)
    dirty: bool = False
    snapshot: bytes | None = None


class TsmModel:
    """configfs-tsm state behind the FUSE callbacks; thread-safe (one lock, like the kernel's tsm_rwsem)."""

    def __init__(self, options: TsmFsOptions) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._stats = {"mkdirs": 0, "rmdirs": 0, "reports": 0, "races": 0, "max_entries": 0, "extends": 0}
        self.options = options
        self._load_templates()
        registers = tdx_quote_registers(self._tdx_template)
        self._mrs = dict(zip(_MR_FILES, registers[:4], strict=True))
        self._rtmrs = registers[4:]

    def _load_templates(self) -> None:
        self._tdx_template = Path(self.options.tdx_template).read_bytes()
        self._snp_template = Path(self.options.snp_template).read_bytes()
        self._cert_table = Path(self.options.cert_table).read_bytes()

    # ---- paths

    def kind(self, path: tuple[str, ...]) -> str:
        """`dir`, `attr`, `control`; raises ENOENT."""
        opts = self.options
        match path:
            case ():
                return "dir"
            case (name,) if name == CONTROL_FILE:
                return "control"
            case ("tsm",) if opts.layout != "no_tsm":
                return "dir"
            case (name,) if name == MEASUREMENTS and opts.measurements:
                return "dir"
            case (name, mr) if name == MEASUREMENTS and opts.measurements and mr in _MR_FILES + _RTMR_FILES:
                return "mr"
            case ("tsm", "report") if opts.layout == "full":
                return "dir"
            case ("tsm", "report", name) if opts.layout == "full" and name in self._entries:
                return "dir"
            case ("tsm", "report", name, attr) if (
                opts.layout == "full" and name in self._entries and attr in self.visible_attrs()
            ):
                return "attr"
        raise _err(errno.ENOENT)

    def visible_attrs(self) -> list[str]:
        opts = self.options
        names = ["generation", "provider", "inblob", "outblob"]
        if opts.provider == "sev_guest":
            if opts.privlevel_attrs:
                names += ["privlevel", "privlevel_floor"]
            if opts.auxblob_attr:
                names.append("auxblob")
            if opts.service_attrs and opts.privlevel_floor > 0:
                names += ["service_provider", "service_guid", "service_manifest_version", "manifestblob"]
        return names

    def listdir(self, path: tuple[str, ...]) -> list[str]:
        with self._lock:
            if self.kind(path) != "dir":
                raise _err(errno.ENOTDIR)
            match path:
                case ():
                    names = [CONTROL_FILE] + ([] if self.options.layout == "no_tsm" else ["tsm"])
                    return names + ([MEASUREMENTS] if self.options.measurements else [])
                case (name,) if name == MEASUREMENTS:
                    return sorted(_MR_FILES + _RTMR_FILES)
                case ("tsm",):
                    return ["report"] if self.options.layout == "full" else []
                case ("tsm", "report"):
                    return sorted(self._entries)
            return self.visible_attrs()

    def stat(self, path: tuple[str, ...]) -> dict[str, int]:
        with self._lock:
            kind = self.kind(path)
            if kind == "dir":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0}
            if kind == "control":
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": _ATTR_SIZE}
            if kind == "mr":
                mode = 0o644 if path[-1] in _RTMR_FILES else 0o444
                return {"st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": MR_LEN}
            return {"st_mode": stat.S_IFREG | _ATTRS[path[-1]][1], "st_nlink": 1, "st_size": _ATTR_SIZE}

    # ---- directories

    def mkdir(self, path: tuple[str, ...]) -> None:
        with self._lock:
            match path:
                case ("tsm", "report", name) if self.options.layout == "full":
                    if name in self._entries:
                        raise _err(errno.EEXIST)
                    if self.options.mkdir_errno:
                        raise _err(self.options.mkdir_errno)
                    if not self.options.provider:
                        raise _err(errno.ENXIO)
                    self._entries[name] = _Entry()
                    self._stats["mkdirs"] += 1
                    self._stats["max_entries"] = max(self._stats["max_entries"], len(self._entries))
                    return
            self.kind(path[:-1])  # ENOENT for a missing parent
            raise _err(errno.EPERM)  # not a configfs group that makes items

    def rmdir(self, path: tuple[str, ...]) -> None:
        with self._lock:
            kind = self.kind(path)
            if kind != "dir":
                raise _err(errno.ENOTDIR)
            match path:
                case ("tsm", "report", name):
                    del self._entries[name]
                    self._stats["rmdirs"] += 1
                    return
            raise _err(errno.EPERM)

    # ---- files

    def open(self, path: tuple[str, ...], flags: int) -> int:
        with self._lock:
            kind = self.kind(path)
            if kind == "dir":
                raise _err(errno.EISDIR)
            accmode = flags & os.O_ACCMODE
            wants_read = accmode in (os.O_RDONLY, os.O_RDWR)
            wants_write = accmode in (os.O_WRONLY, os.O_RDWR)
            if kind == "attr":
                mode = _ATTRS[path[-1]][1]
                if (wants_read and not mode & 0o444) or (wants_write and not mode & 0o222):
                    raise _err(errno.EACCES)
            if kind == "mr" and wants_write and path[-1] not in _RTMR_FILES:
                raise _err(errno.EACCES)
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(path=path, writable=wants_write)
            return fh

    def read(self, fh: int, size: int, offset: int) -> bytes:
        with self._lock:
            handle = self._handles[fh]
        if handle.snapshot is None:
            # configfs fills its buffer on the first read of an open file and serves later reads from it.
            handle.snapshot = self._content(handle.path)
        return handle.snapshot[offset : offset + size]

    def write(self, fh: int, data: bytes, offset: int) -> int:
        with self._lock:
            handle = self._handles[fh]
        if handle.path[0] == MEASUREMENTS:
            return self._extend(handle.path[-1], data, offset)
        with self._lock:
            if handle.path == (CONTROL_FILE,):
                handle.buffer[offset : offset + len(data)] = data
                handle.dirty = True
                return len(data)
            name, attr = self._entry_attr(handle.path)
            if _ATTRS[attr][0] == _BIN:
                if offset + len(data) > INBLOB_MAX:
                    raise _err(errno.EFBIG)
                end = offset + len(data)
                if len(handle.buffer) < end:
                    handle.buffer.extend(bytes(end - len(handle.buffer)))
                handle.buffer[offset:end] = data
                handle.dirty = True
                return len(data)
            self._store_text(self._entries[name], attr, data)
            return len(data)

    def flush(self, fh: int) -> None:
        """close(): configfs applies a written binary attribute here and ignores the result."""
        with self._lock:
            handle = self._handles.get(fh)
            if handle is None or not handle.dirty:
                return
            handle.dirty = False
            if handle.path == (CONTROL_FILE,):
                self._apply_control(bytes(handle.buffer))
                return
            name, _attr = self._entry_attr(handle.path)
            entry = self._entries.get(name)
            if entry is None or not self._advance(entry):
                return  # entry gone, or EBUSY: dropped silently like the kernel does
            entry.inblob = bytes(handle.buffer)
            if self.options.race_on == "inblob":
                self._race(entry)

    def release(self, fh: int) -> None:
        self.flush(fh)
        with self._lock:
            self._handles.pop(fh, None)

    def truncate(self, path: tuple[str, ...]) -> None:
        with self._lock:
            self.kind(path)  # O_TRUNC on an attribute is accepted and does nothing

    # ---- internals

    def _extend(self, name: str, data: bytes, offset: int) -> int:
        """tsm-mr's write: exactly 48 bytes at offset 0, applied at once (no buffering until close)."""
        if offset != 0 or len(data) != MR_LEN:
            raise _err(errno.EINVAL)
        delay = self.options.extend_delay_s / 2
        time.sleep(delay)
        with self._lock:
            i = _RTMR_FILES.index(name)
            self._rtmrs[i] = hashlib.sha384(self._rtmrs[i] + data).digest()
            self._stats["extends"] += 1
        time.sleep(delay)
        return len(data)

    def _entry_attr(self, path: tuple[str, ...]) -> tuple[str, str]:
        if len(path) != 4:
            raise _err(errno.EINVAL)
        if path[2] not in self._entries:
            raise _err(errno.ENOENT)
        return path[2], path[3]

    def _advance(self, entry: _Entry) -> bool:
        """try_advance_write_generation(): refuses (EBUSY) only when the counter would wrap onto an unread one."""
        if entry.write_gen == (entry.read_gen - 1) & _U64:
            return False
        entry.write_gen = (entry.write_gen + 1) & _U64
        return True

    def _race(self, entry: _Entry) -> None:
        if self.options.race_writes > 0:
            self.options = dataclasses.replace(self.options, race_writes=self.options.race_writes - 1)
            self._stats["races"] += 1
            if self._advance(entry):
                entry.inblob = secrets.token_bytes(INBLOB_MAX)

    def _store_text(self, entry: _Entry, attr: str, data: bytes) -> None:
        opts = self.options
        if attr == "privlevel":
            value = _kstrtouint(data)
            if not opts.privlevel_floor <= value <= PRIVLEVEL_MAX:
                raise _err(errno.EINVAL)
            if not self._advance(entry):
                raise _err(errno.EBUSY)
            entry.privlevel = value
        elif attr == "service_provider":
            if data.removesuffix(b"\n") != b"svsm":
                raise _err(errno.EINVAL)
            if not self._advance(entry):
                raise _err(errno.EBUSY)
            entry.service_provider = "svsm"
        elif attr == "service_guid":
            try:
                guid = uuid.UUID(data[:36].decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise _err(errno.EINVAL) from None
            if not self._advance(entry):
                raise _err(errno.EBUSY)
            entry.service_guid = guid.bytes_le  # guid_parse(): UEFI mixed-endian
        elif attr == "service_manifest_version":
            value = _kstrtouint(data)
            if not self._advance(entry):
                raise _err(errno.EBUSY)
            entry.service_manifest_version = value
        else:
            raise _err(errno.EACCES)

    def _content(self, path: tuple[str, ...]) -> bytes:
        with self._lock:
            if path == (CONTROL_FILE,):
                return self.state_json().encode()
            if path[0] == MEASUREMENTS:
                if path[-1] in _RTMR_FILES:
                    return self._rtmrs[_RTMR_FILES.index(path[-1])]
                return self._mrs[path[-1]]
            name, attr = self._entry_attr(path)
            entry = self._entries[name]
            if attr == "provider":
                return f"{self.options.provider}\n".encode()
            if attr == "generation":
                return f"{entry.write_gen}\n".encode()
            if attr == "privlevel_floor":
                return f"{self.options.privlevel_floor}\n".encode()
            return self._blob(entry, attr)

    def _blob(self, entry: _Entry, attr: str) -> bytes:
        if entry.outblob is None or entry.read_gen != entry.write_gen:
            if not entry.inblob:
                raise _err(errno.EINVAL)
            if self.options.race_on == "outblob":
                self._race(entry)
            self._generate(entry)
        blob = {"outblob": entry.outblob, "auxblob": entry.auxblob, "manifestblob": entry.manifestblob}[attr]
        return blob or b""

    def _generate(self, entry: _Entry) -> None:
        """The provider's report_new(): all blobs of one generation at once; serialised under the lock."""
        opts = self.options
        entry.outblob = entry.auxblob = entry.manifestblob = None
        if opts.report_delay_s:
            time.sleep(opts.report_delay_s)
        if opts.outblob_errno and opts.outblob_errno_count != 0:
            if opts.outblob_errno_count > 0:
                self.options = dataclasses.replace(opts, outblob_errno_count=opts.outblob_errno_count - 1)
            raise _err(opts.outblob_errno)
        if len(entry.inblob) != INBLOB_MAX:
            raise _err(errno.EINVAL)
        if opts.provider == "tdx_guest":
            entry.outblob = tdx_quote_with_rtmrs(tdx_quote_with(self._tdx_template, entry.inblob), self._rtmrs)
        else:
            entry.outblob = snp_report_with(self._snp_template, entry.inblob, entry.privlevel)
            entry.auxblob = self._cert_table if opts.certs else b""
            if entry.service_provider:
                entry.manifestblob = b"tsmfs-svsm-manifest:" + entry.service_guid
        entry.read_gen = entry.write_gen
        self._stats["reports"] += 1

    def _apply_control(self, data: bytes) -> None:
        try:
            changes = json.loads(data)
            if not isinstance(changes, dict):
                raise TypeError
            self.options = dataclasses.replace(self.options, **changes)
            self._load_templates()
            if "tdx_template" in changes:  # a new platform: its registers start over
                registers = tdx_quote_registers(self._tdx_template)
                self._mrs = dict(zip(_MR_FILES, registers[:4], strict=True))
                self._rtmrs = registers[4:]
        except (ValueError, TypeError, OSError):
            raise _err(errno.EINVAL) from None

    def state_json(self) -> str:
        with self._lock:
            state = {
                "options": dataclasses.asdict(self.options),
                "entries": sorted(self._entries),
                "generations": {name: e.write_gen for name, e in self._entries.items()},
                "stats": dict(self._stats),
                "rtmrs": [r.hex() for r in self._rtmrs],
            }
            return json.dumps(state, sort_keys=True)


class InMemoryTsm:
    """The same model as an in-process `agent.tee.tsm.FsOps` (no FUSE), rooted at a virtual `mountpoint`.

    Paths outside `mountpoint` do not exist. `calls` records every operation as (name, path).
    """

    def __init__(self, options: TsmFsOptions | None = None, *, mountpoint: Path = Path("/fake/config")) -> None:
        self.model = TsmModel(options or TsmFsOptions())
        self.mountpoint = mountpoint
        self.root = mountpoint / "tsm" / "report"
        self.calls: list[tuple[str, str]] = []

    def _rel(self, path: Path) -> tuple[str, ...]:
        try:
            return path.relative_to(self.mountpoint).parts
        except ValueError:
            raise _err(errno.ENOENT) from None

    def mkdir(self, path: Path) -> None:
        self.calls.append(("mkdir", str(path)))
        self.model.mkdir(self._rel(path))

    def rmdir(self, path: Path) -> None:
        self.calls.append(("rmdir", str(path)))
        self.model.rmdir(self._rel(path))

    def read(self, path: Path) -> bytes:
        self.calls.append(("read", str(path)))
        fh = self.model.open(self._rel(path), os.O_RDONLY)
        try:
            chunks: list[bytes] = []
            while chunk := self.model.read(fh, 65536, sum(map(len, chunks))):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            self.model.release(fh)

    def write(self, path: Path, data: bytes) -> None:
        self.calls.append(("write", str(path)))
        fh = self.model.open(self._rel(path), os.O_WRONLY)
        try:
            self.model.write(fh, data, 0)
        finally:
            self.model.release(fh)

    def is_dir(self, path: Path) -> bool:
        try:
            return self.model.kind(self._rel(path)) == "dir"
        except OSError:
            return False

    def entries(self) -> list[str]:
        return self.model.listdir(("tsm", "report"))

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = json.loads(self.model.state_json())["stats"]
        return stats


# --------------------------------------------------------------------------------------------------------------
# FUSE adapter: the only code that meets mfusepy (untyped, loaded as Any). Runs in the server process.


def _split(path: str) -> tuple[str, ...]:
    return tuple(part for part in path.split("/") if part)


class _FuseOps:
    """Callbacks in mfusepy's `Operations` shape (not a subclass: mfusepy registers what exists)."""

    use_ns = True  # times in nanoseconds; silences mfusepy's float-time deprecation warning

    def __init__(self, model: TsmModel) -> None:
        self.model = model
        self._now = time.time_ns()

    def init_with_config(self, conn_info: object, config: Any) -> None:
        if config is not None:  # libfuse 3: no caching, so every read and lookup reaches the model
            config.direct_io = 1
            config.entry_timeout = 0.0
            config.attr_timeout = 0.0
            config.negative_timeout = 0.0

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        attrs = self.model.stat(_split(path))
        times = {"st_atime": self._now, "st_mtime": self._now, "st_ctime": self._now}
        return {**attrs, **times, "st_uid": os.getuid(), "st_gid": os.getgid()}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *self.model.listdir(_split(path))]

    def mkdir(self, path: str, mode: int) -> int:
        self.model.mkdir(_split(path))
        return 0

    def rmdir(self, path: str) -> int:
        self.model.rmdir(_split(path))
        return 0

    def open(self, path: str, flags: int) -> int:
        return self.model.open(_split(path), flags)

    def create(self, path: str, mode: int, fi: object = None) -> int:
        raise _err(errno.EACCES)  # configfs directories have no ->create

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise _err(errno.EPERM)

    def unlink(self, path: str) -> int:
        raise _err(errno.EPERM)

    def rename(self, old: str, new: str) -> int:
        raise _err(errno.EPERM)

    def symlink(self, target: str, source: str) -> int:
        raise _err(errno.EPERM)

    def link(self, target: str, source: str) -> int:
        raise _err(errno.EPERM)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self.model.truncate(_split(path))
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.model.read(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self.model.write(fh, data, offset)

    def flush(self, path: str, fh: int) -> int:
        self.model.flush(fh)
        return 0

    def release(self, path: str, fh: int) -> int:
        self.model.release(fh)
        return 0


def _serve(mountpoint: str, options: TsmFsOptions) -> None:
    fuse_lib: Any = importlib.import_module("mfusepy")
    fuse_lib.FUSE(
        _FuseOps(TsmModel(options)),
        mountpoint,
        foreground=True,
        nothreads=False,
        fsname="tsmfs",
        direct_io=True,
        entry_timeout=0,
        attr_timeout=0,
        negative_timeout=0,
    )


def main(argv: list[str]) -> int:
    """`tsmfs.py serve MOUNTPOINT OPTIONS_JSON`: mount and serve until unmounted or signalled."""
    if len(argv) != 3 or argv[0] != "serve":
        sys.stderr.write("usage: tsmfs.py serve MOUNTPOINT OPTIONS_JSON\n")
        return 2
    _serve(argv[1], TsmFsOptions.from_json(argv[2]))
    return 0


# --------------------------------------------------------------------------------------------------------------
# Test-process side: availability, mounting, the handle.


def fuse_unavailable_reason() -> str | None:
    """Why FUSE cannot be used here (only a missing or unusable /dev/fuse counts), or None."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/fuse is not usable ({exc.strerror}); FUSE tests need it"
    os.close(fd)
    return None


def _setup_problem() -> str | None:
    """What is missing from the test setup (these never skip)."""
    if importlib.util.find_spec("mfusepy") is None:
        return "the Python package mfusepy is not installed (pip install 'mfusepy>=3.1')"
    if ctypes.util.find_library("fuse3") is None and ctypes.util.find_library("fuse") is None:
        return "libfuse is not installed (apt-get install fuse3 libfuse3-3; see tests/setup-host.sh)"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and no fusermount3 on PATH (apt-get install fuse3)"
    return None


def require_fuse() -> None:
    """Skip the calling test when /dev/fuse is unavailable (fail instead when CI=true); fail on setup gaps."""
    import pytest

    reason = fuse_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but FUSE is unavailable: {reason}")
        pytest.skip(reason)
    problem = _setup_problem()
    if problem is not None:
        pytest.fail(f"FUSE test setup incomplete: {problem}")


class MountedTsm:
    """A running tsmfs mount. `root` is the configfs-tsm report directory to hand to the client."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.root = mountpoint / "tsm" / "report"
        self.control = mountpoint / CONTROL_FILE
        self.measurements = mountpoint / MEASUREMENTS  # exists with TsmFsOptions(measurements=True)

    def configure(self, **changes: object) -> None:
        """Change `TsmFsOptions` fields in the running file system (EINVAL from close() if invalid)."""
        self.control.write_text(json.dumps(changes))

    def state(self) -> dict[str, Any]:
        """`options`, `entries` (names of live entries), `generations`, `stats` (mkdirs, rmdirs, reports, races)."""
        data: dict[str, Any] = json.loads(self.control.read_text())
        return data

    def entries(self) -> list[str]:
        return list(self.state()["entries"])

    def rtmrs(self) -> list[bytes]:
        """RTMR0..3 as the emulated kernel holds them now."""
        return [bytes.fromhex(r) for r in self.state()["rtmrs"]]


@contextlib.contextmanager
def mounted_tsm(
    options: TsmFsOptions | None = None, *, workdir: Path | None = None, timeout_s: float = 15.0
) -> Iterator[MountedTsm]:
    """Mount tsmfs in a fresh directory (under `workdir` or the system temp dir), yield it, always unmount."""
    require_fuse()
    opts = options or TsmFsOptions()
    with tempfile.TemporaryDirectory(prefix="tsmfs-", dir=workdir) as tmp:
        mountpoint = Path(tmp) / "config"
        mountpoint.mkdir()
        errlog = Path(tmp) / "tsmfs.stderr"
        with errlog.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "serve", str(mountpoint), opts.to_json()],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        try:
            _wait_mounted(proc, mountpoint, errlog, timeout_s)
            yield MountedTsm(mountpoint)
        finally:
            _stop(proc, mountpoint)


def _wait_mounted(proc: subprocess.Popen[bytes], mountpoint: Path, errlog: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"tsmfs exited with {proc.returncode} before mounting: {errlog.read_text(errors='replace')}"
            raise RuntimeError(msg)
        if mountpoint.is_mount() and (mountpoint / CONTROL_FILE).exists():
            return
        time.sleep(0.02)
    msg = f"tsmfs did not mount {mountpoint} within {timeout_s} s: {errlog.read_text(errors='replace')}"
    raise RuntimeError(msg)


def _stop(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """SIGTERM makes libfuse unmount and exit; if it does not, kill it and detach the mount."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if mountpoint.is_mount():
        for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
            if shutil.which(cmd[0]) is not None:
                subprocess.run(cmd, check=False, capture_output=True)
                if not mountpoint.is_mount():
                    break


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
