"""configfs-tsm attestation reports (`/sys/kernel/config/tsm/report`, Linux >= 6.7). Edge.

The kernel's TSM report interface is a configfs directory: `mkdir` creates a report entry, writes to its
attributes configure the request, reading `outblob` runs the TEE's report generator, `rmdir` destroys it.

    >>> report = get_report(report_data, expected_provider=PROVIDER_TDX)   # doctest: +SKIP
    >>> report.outblob                      # a raw TD quote (v4/v5); for `sev_guest` the bare SNP report

What is checked here: the entry's `provider`, that `generation` moved by exactly one per write we made (a
write to `inblob` is applied only at close() and a failure there is silently dropped by configfs, so the
counter is the only proof it landed) and stayed put while the blobs were read. Nothing in the blobs is parsed
or verified here; callers parse the evidence and compare its report data with what they asked for.

Every filesystem call goes through an `FsOps` (the default `OsFsOps` makes the real calls), so tests run the
same code against an in-memory fake or a FUSE emulation of configfs-tsm.

Kernel differences handled:
- `privlevel`/`privlevel_floor`/`auxblob` exist only for providers with privilege levels (`sev_guest`,
  `arm_cca_guest`); `tdx_guest` entries have only `provider`, `generation`, `inblob` and `outblob`.
  Without `privlevel_floor` the entry is taken to have no privilege levels (asking for one raises
  `TeeUnavailable`); a missing `auxblob` gives `auxblob=None`.
- `service_*` and `manifestblob` (v6.10, SVSM) are not used.
- The core module was called `tsm` and later `tsm_report`; both are named in the advice.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from agent.errors import DeviceError, TeeError, TeeUnavailable, TsmGenerationError
from agent.log import get_logger

__all__ = [
    "DEFAULT_ROOT",
    "INBLOB_LEN",
    "PRIVLEVEL_MAX",
    "PROVIDER_CCA",
    "PROVIDER_SNP",
    "PROVIDER_TDX",
    "FsOps",
    "OsFsOps",
    "TsmReport",
    "get_report",
    "probe",
]

log = get_logger("agent.tee.tsm")

DEFAULT_ROOT: Final = Path("/sys/kernel/config/tsm/report")
PROVIDER_TDX: Final = "tdx_guest"
PROVIDER_SNP: Final = "sev_guest"
PROVIDER_CCA: Final = "arm_cca_guest"
INBLOB_LEN: Final = 64  # TDX REPORTDATA and SNP REPORT_DATA; the kernel's TSM_INBLOB_MAX
PRIVLEVEL_MAX: Final = 3  # TSM_PRIVLEVEL_MAX (SNP VMPL 0..3)
# The largest TSM_OUTBLOB_MAX of any kernel (v6.7 had 32 KiB).
MAX_BLOB_BYTES: Final = 16 * 1024 * 1024

_READ_CHUNK: Final = 64 * 1024
_NAME_ATTEMPTS: Final = 3
_PRIVLEVEL: Final = "privlevel"
_GENERATION_RE: Final = re.compile(rb"[0-9]{1,20}\n?")
_CHECK_TSM: Final = (
    "check that configfs is mounted (`mount -t configfs none /sys/kernel/config`), that the kernel is >= 6.7 "
    "with CONFIG_TSM_REPORTS, and that the `tsm` (newer kernels: `tsm_report`) module is loaded"
)


class FsOps(Protocol):
    """The file operations the client needs. Each raises `OSError` (with `errno` set) like the os calls."""

    def mkdir(self, path: Path) -> None: ...

    def rmdir(self, path: Path) -> None: ...

    def read(self, path: Path) -> bytes:
        """Open read-only, read until EOF, close."""
        ...

    def write(self, path: Path, data: bytes) -> None:
        """Open write-only (no create, no truncate), write `data` in one write(), close."""
        ...

    def is_dir(self, path: Path) -> bool: ...


class OsFsOps:
    """`FsOps` with the real system calls; the only configfs I/O site of the agent."""

    def mkdir(self, path: Path) -> None:
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        path.rmdir()

    def read(self, path: Path) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            total = 0
            while chunk := os.read(fd, _READ_CHUNK):
                total += len(chunk)
                if total > MAX_BLOB_BYTES:
                    raise OSError(errno.EFBIG, f"more than {MAX_BLOB_BYTES:#x} bytes", str(path))
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short write: {written:#x} of {len(data):#x} bytes", str(path))
        finally:
            # configfs applies a binary attribute (inblob) here, at close(), and drops the provider's status.
            os.close(fd)

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()


@dataclass(frozen=True, slots=True, kw_only=True)
class TsmReport:
    """What one configfs-tsm request returned.

    `outblob` is the evidence in the provider's format (`tdx_guest`: raw TD quote; `sev_guest`: bare SNP
    report). `auxblob` is None when it was not asked for or the entry has no such attribute; for `sev_guest`
    it is the GHCB certificate table, empty when the host supplies no certificates. `generation` is the
    entry's final write counter.
    """

    outblob: bytes
    auxblob: bytes | None
    provider: str
    generation: int


def get_report(
    inblob: bytes,
    *,
    root: Path | str = DEFAULT_ROOT,
    expected_provider: str | None = None,
    privlevel: int | None = None,
    want_auxblob: bool = False,
    retries: int = 3,
    fsops: FsOps | None = None,
) -> TsmReport:
    """Create a private report entry, request evidence for `inblob`, and remove the entry again.

    Args:
        inblob: exactly 64 bytes of report data.
        root: the configfs-tsm report directory.
        expected_provider: fail unless the entry's `provider` is this (`tdx_guest`, `sev_guest`).
        privlevel: the privilege level (SNP: VMPL) of the report. None uses `privlevel_floor` when the
            provider has privilege levels and nothing otherwise.
        want_auxblob: also read `auxblob` (SNP certificate table).
        retries: how many more times to try after a write from someone else changed the entry.
        fsops: file operations; the real os calls by default.

    Returns:
        The evidence, read back under a consistent `generation`.

    Raises:
        TeeUnavailable: configfs or configfs-tsm is missing, no provider is registered, the provider is not
            the expected one, or the provider has no `privlevel` although one was asked for.
        DeviceError: a configfs operation failed (permission, a rejected attribute, the provider's error
            when generating the evidence, an empty `outblob`); `errno` is set when the kernel gave one.
        TsmGenerationError: `generation` did not move as expected on every one of `retries + 1` attempts.
        ValueError: `inblob` is not 64 bytes, `privlevel` is outside 0..3, or `retries` is negative.
    """
    if len(inblob) != INBLOB_LEN:
        msg = f"`inblob` is {len(inblob):#x} bytes, expected {INBLOB_LEN:#x}"
        raise ValueError(msg)
    if privlevel is not None and not 0 <= privlevel <= PRIVLEVEL_MAX:
        msg = f"`privlevel` is {privlevel}, expected 0..{PRIVLEVEL_MAX}"
        raise ValueError(msg)
    if retries < 0:
        msg = f"`retries` is {retries}, expected at least 0"
        raise ValueError(msg)
    ops: FsOps = OsFsOps() if fsops is None else fsops
    with _report_entry(Path(root), ops) as entry:
        provider = entry.provider()
        if expected_provider is not None and provider != expected_provider:
            msg = f"configfs-tsm provider is `{provider}`, expected `{expected_provider}`"
            raise TeeUnavailable(msg)
        level = entry.resolve_privlevel(privlevel, provider)
        attempt = 1
        while True:
            try:
                return entry.request(inblob, provider=provider, privlevel=level, want_auxblob=want_auxblob)
            except TsmGenerationError as exc:
                if attempt > retries:
                    msg = f"{exc}; gave up after {attempt} attempt{'s' if attempt > 1 else ''}"
                    raise TsmGenerationError(msg, attribute=exc.attribute, got=exc.got, want=exc.want) from exc
                log.warning(
                    "tsm.report.retry",
                    entry=str(entry.path),
                    attribute=exc.attribute,
                    got=exc.got,
                    want=exc.want,
                    attempt=attempt,
                )
                attempt += 1


def probe(root: Path | str = DEFAULT_ROOT, *, fsops: FsOps | None = None) -> str | None:
    """The registered configfs-tsm provider (`tdx_guest`, `sev_guest`, ...), found via a temporary entry.

    Returns None when configfs-tsm is not there or no provider is registered. Other failures (for example
    permission denied) raise `DeviceError`, since the interface exists but cannot be used.
    """
    ops: FsOps = OsFsOps() if fsops is None else fsops
    try:
        with _report_entry(Path(root), ops) as entry:
            return entry.provider()
    except TeeUnavailable as exc:
        log.debug("tsm.probe.unavailable", root=str(root), reason=str(exc))
        return None


@contextmanager
def _report_entry(root: Path, ops: FsOps) -> Iterator[_Entry]:
    """Create a uniquely named entry under `root` and always remove it afterwards."""
    path = _create_entry(root, ops)
    try:
        yield _Entry(path, ops)
    except BaseException as exc:
        problem = _remove_entry(path, ops)
        if problem:
            exc.add_note(problem)
        raise
    else:
        _remove_entry(path, ops)


def _create_entry(root: Path, ops: FsOps) -> Path:
    for _ in range(_NAME_ATTEMPTS):
        path = root / f"cvm-agent-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            ops.mkdir(path)
        except FileExistsError:
            continue
        except FileNotFoundError as exc:
            raise TeeUnavailable(_missing_root(root, ops)) from exc
        except OSError as exc:
            raise _mkdir_error(root, exc) from exc
        return path
    msg = f"could not create a configfs-tsm entry in {root}: {_NAME_ATTEMPTS} random names already existed"
    raise DeviceError(msg, errno=errno.EEXIST)


def _missing_root(root: Path, ops: FsOps) -> str:
    tsm, configfs = root.parent, root.parent.parent
    if ops.is_dir(root):
        # The directory exists but a new entry could not be created in it (vanished meanwhile, or odd kernel).
        return f"configfs-tsm report directory {root} refused a new entry (ENOENT); {_CHECK_TSM}"
    if ops.is_dir(tsm):
        return f"{root} does not exist but {tsm} does: configfs-tsm without reports (CONFIG_TSM_REPORTS)"
    if ops.is_dir(configfs):
        return f"configfs-tsm not found: {tsm} does not exist; {_CHECK_TSM}"
    return f"configfs not available: {configfs} does not exist (no CONFIG_CONFIGFS_FS?); {_CHECK_TSM}"


def _mkdir_error(root: Path, exc: OSError) -> TeeError:
    code = exc.errno
    if code == errno.ENXIO:
        msg = (
            f"no TSM provider is registered for {root} (mkdir gave ENXIO): load the TEE guest driver "
            "(`tdx_guest` or `sev_guest` module) or check that this is a confidential VM"
        )
        return TeeUnavailable(msg)
    if code in (errno.EACCES, errno.EPERM):
        msg = f"permission denied creating a configfs-tsm entry in {root} ({_errname(code)}): run as root"
        return DeviceError(msg, errno=code)
    msg = f"creating a configfs-tsm entry in {root} failed: {_describe(exc)}"
    return DeviceError(msg, errno=code)


def _remove_entry(path: Path, ops: FsOps) -> str | None:
    """Remove the entry; on failure log it and return a note (a stale entry only costs kernel memory)."""
    try:
        ops.rmdir(path)
    except OSError as exc:
        note = f"could not remove configfs-tsm entry {path}: {_describe(exc)}"
        log.warning("tsm.entry.remove_failed", entry=str(path), errno=exc.errno)
        return note
    return None


class _Entry:
    """One configfs-tsm report entry: attribute I/O with error mapping and the generation bookkeeping."""

    def __init__(self, path: Path, ops: FsOps) -> None:
        self.path = path
        self._ops = ops

    def provider(self) -> str:
        raw = self._read("provider")
        name = raw.decode("ascii", "replace").removesuffix("\n")
        if not name:
            msg = f"`provider` of configfs-tsm entry {self.path} is empty, expected a provider name"
            raise DeviceError(msg)
        return name

    def generation(self) -> int:
        raw = self._read("generation")
        if _GENERATION_RE.fullmatch(raw) is None:
            msg = f"`generation` of configfs-tsm entry {self.path} is {raw[:32]!r}, expected a decimal counter"
            raise DeviceError(msg)
        return int(raw)

    def expect_generation(self, attribute: str, want: int) -> int:
        got = self.generation()
        if got != want:
            if got < want:
                why = "the kernel did not apply the write (for a binary attribute it drops the error at close)"
            else:
                why = "another writer changed the entry"
            msg = f"`generation` after `{attribute}` is {got}, expected {want}: {why} ({self.path})"
            raise TsmGenerationError(msg, attribute=attribute, got=got, want=want)
        return got

    def resolve_privlevel(self, privlevel: int | None, provider: str) -> int | None:
        """The privlevel to write, or None to write none; checks it against `privlevel_floor`."""
        floor = self._privlevel_floor()
        if floor is None:
            if privlevel is not None:
                msg = (
                    f"provider `{provider}` has no `privlevel` attribute on this kernel (privilege levels "
                    "need a provider such as sev_guest, kernel >= 6.7); ask without `privlevel`"
                )
                raise TeeUnavailable(msg)
            return None
        if privlevel is None:
            # Always explicit: the kernel's default 0 is rejected when the guest runs above VMPL 0.
            return floor if floor > 0 else None
        if privlevel < floor:
            msg = (
                f"`privlevel` is {privlevel}, expected at least `privlevel_floor` {floor} "
                f"(the guest runs at privilege level {floor})"
            )
            raise DeviceError(msg, errno=errno.EINVAL)
        return privlevel

    def _privlevel_floor(self) -> int | None:
        raw = self._read_optional("privlevel_floor")
        if raw is None:
            return None
        text = raw.decode("ascii", "replace").strip()
        if not text.isdigit() or int(text) > PRIVLEVEL_MAX:
            msg = f"`privlevel_floor` of entry {self.path} is {text[:16]!r}, expected 0..{PRIVLEVEL_MAX}"
            raise DeviceError(msg)
        return int(text)

    def request(self, inblob: bytes, *, provider: str, privlevel: int | None, want_auxblob: bool) -> TsmReport:
        """One attempt: write the options and inblob, read the blobs, check `generation` at every step."""
        gen = self.generation()
        if privlevel is not None:
            self._write_privlevel(privlevel)
            gen = self.expect_generation("privlevel", gen + 1)
        self._write("inblob", inblob)
        gen = self.expect_generation("inblob", gen + 1)
        outblob = self._read("outblob", provider=provider)
        self.expect_generation("outblob", gen)
        if not outblob:
            msg = f"`outblob` of configfs-tsm entry {self.path} is empty: `{provider}` produced no evidence"
            raise DeviceError(msg)
        auxblob: bytes | None = None
        if want_auxblob:
            auxblob = self._read_optional("auxblob", provider=provider)
            if auxblob is not None:
                self.expect_generation("auxblob", gen)
        return TsmReport(outblob=outblob, auxblob=auxblob, provider=provider, generation=gen)

    def _write_privlevel(self, privlevel: int) -> None:
        try:
            self._ops.write(self.path / "privlevel", f"{privlevel}\n".encode("ascii"))
        except FileNotFoundError as exc:
            msg = f"configfs-tsm entry {self.path} has no `privlevel` attribute (kernel older than 6.7?)"
            raise TeeUnavailable(msg) from exc
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                msg = (
                    f"the kernel rejected `privlevel` {privlevel} for {self.path} (EINVAL): it must be "
                    f"between `privlevel_floor` and {PRIVLEVEL_MAX}"
                )
                raise DeviceError(msg, errno=exc.errno) from exc
            raise self._io_error(_PRIVLEVEL, exc, writing=True) from exc

    def _write(self, attribute: str, data: bytes) -> None:
        try:
            self._ops.write(self.path / attribute, data)
        except OSError as exc:
            raise self._io_error(attribute, exc, writing=True) from exc

    def _read(self, attribute: str, *, provider: str | None = None) -> bytes:
        try:
            return self._ops.read(self.path / attribute)
        except OSError as exc:
            raise self._io_error(attribute, exc, provider=provider) from exc

    def _read_optional(self, attribute: str, *, provider: str | None = None) -> bytes | None:
        """Like `_read`, but None when the attribute does not exist (older kernel or other provider)."""
        try:
            return self._ops.read(self.path / attribute)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io_error(attribute, exc, provider=provider) from exc

    def _io_error(
        self, attribute: str, exc: OSError, *, writing: bool = False, provider: str | None = None
    ) -> TeeError:
        code = exc.errno
        where = f"{'writing' if writing else 'reading'} `{attribute}` of configfs-tsm entry {self.path}"
        if code in (errno.EACCES, errno.EPERM):
            msg = f"permission denied {where} ({_errname(code)}): the agent must run as root"
        elif code == errno.ENOENT:
            msg = f"{where} failed: the attribute does not exist (entry removed, or an older kernel)"
        elif attribute in ("outblob", "auxblob"):
            reason = _BLOB_ERRORS.get(code or 0, _describe(exc))
            msg = f"{where} failed: {reason}{_provider_hint(code, provider)}"
        else:
            msg = f"{where} failed: {_describe(exc)}"
        return DeviceError(msg, errno=code)


_BLOB_ERRORS: Final[dict[int, str]] = {
    errno.EINVAL: "the provider rejected the request (EINVAL): `inblob` must be exactly 64 bytes and "
    "`privlevel` one the guest may use",
    errno.EIO: "the provider failed to generate evidence (EIO)",
    errno.ENXIO: "the firmware returned an error status (ENXIO)",
    errno.EBUSY: "an earlier request is still in flight (EBUSY); retry later",
    errno.ETIMEDOUT: "the host did not answer in time (ETIMEDOUT)",
    errno.EINTR: "interrupted by a signal (EINTR)",
    errno.EFBIG: f"the evidence exceeds the size limit (EFBIG; TSM_OUTBLOB_MAX, here {MAX_BLOB_BYTES:#x})",
    errno.ENOTTY: "the TSM provider was unregistered (ENOTTY)",
    errno.ENOMEM: "the kernel is out of memory (ENOMEM)",
}


def _provider_hint(code: int | None, provider: str | None) -> str:
    if code in (errno.EIO, errno.ETIMEDOUT, errno.EBUSY) and provider == PROVIDER_TDX:
        return "; for tdx_guest check the host quote service (QGS) and the TDVMCALL GetQuote path"
    if code in (errno.EIO, errno.ENXIO) and provider == PROVIDER_SNP:
        return "; for sev_guest check the guest kernel log: a failed firmware request may disable the VMPCK"
    return ""


def _errname(code: int | None) -> str:
    if code is None:
        return "no errno"
    return errno.errorcode.get(code, f"errno {code}")


def _describe(exc: OSError) -> str:
    if exc.errno is None:
        return str(exc)
    return f"{os.strerror(exc.errno)} ({_errname(exc.errno)})"
