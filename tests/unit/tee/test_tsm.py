"""agent.tee.tsm against the in-memory configfs-tsm model (tests.fakes.tsmfs.InMemoryTsm) and injected faults."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from agent.errors import DeviceError, TeeUnavailable, TsmGenerationError
from agent.tee import tsm
from tests.fakes.tsmfs import (
    DEFAULT_CERT_TABLE,
    DEFAULT_SNP_TEMPLATE,
    DEFAULT_TDX_TEMPLATE,
    InMemoryTsm,
    TsmFsOptions,
    snp_report_with,
    tdx_quote_with,
)

DATA = bytes(range(64))


class Faulty:
    """Wraps an InMemoryTsm and injects faults per (operation, attribute name)."""

    def __init__(self, inner: InMemoryTsm) -> None:
        self.inner = inner
        self.raise_on: dict[tuple[str, str], BaseException] = {}
        self.return_on: dict[tuple[str, str], bytes] = {}
        self.drop_writes: set[str] = set()
        self.mkdir_collisions = 0
        self.mkdir_paths: list[Path] = []

    def _fault(self, op: str, path: Path) -> None:
        exc = self.raise_on.get((op, path.name))
        if exc is not None:
            raise exc

    def mkdir(self, path: Path) -> None:
        self.mkdir_paths.append(path)
        if self.mkdir_collisions > 0:
            self.mkdir_collisions -= 1
            raise FileExistsError(errno.EEXIST, "exists")
        self._fault("mkdir", path)
        self.inner.mkdir(path)

    def rmdir(self, path: Path) -> None:
        self._fault("rmdir", path)
        self.inner.rmdir(path)

    def read(self, path: Path) -> bytes:
        self._fault("read", path)
        data = self.inner.read(path)
        return self.return_on.get(("read", path.name), data)

    def write(self, path: Path, data: bytes) -> None:
        self._fault("write", path)
        if path.name not in self.drop_writes:
            self.inner.write(path, data)

    def is_dir(self, path: Path) -> bool:
        return self.inner.is_dir(path)


def fake(**options: object) -> InMemoryTsm:
    return InMemoryTsm(TsmFsOptions(**options))  # type: ignore[arg-type]  # test shorthand over typed fields


def report(fs: InMemoryTsm | Faulty, **kwargs: object) -> tsm.TsmReport:
    root = fs.inner.root if isinstance(fs, Faulty) else fs.root
    return tsm.get_report(DATA, root=root, fsops=fs, **kwargs)  # type: ignore[arg-type]  # test shorthand


class TestGetReportTdx:
    def test_returns_quote_with_report_data(self) -> None:
        fs = fake()
        result = report(fs, expected_provider="tdx_guest")
        assert result.outblob == tdx_quote_with(DEFAULT_TDX_TEMPLATE.read_bytes(), DATA)
        assert result.outblob[0x238:0x278] == DATA
        assert result == tsm.TsmReport(outblob=result.outblob, auxblob=None, provider="tdx_guest", generation=1)

    def test_entry_created_once_and_removed(self) -> None:
        fs = fake()
        report(fs)
        mkdirs = [path for op, path in fs.calls if op == "mkdir"]
        rmdirs = [path for op, path in fs.calls if op == "rmdir"]
        assert mkdirs == rmdirs
        assert len(mkdirs) == 1
        assert re.fullmatch(rf"cvm-agent-{os.getpid()}-[0-9a-f]{{16}}", Path(mkdirs[0]).name)
        assert fs.entries() == []

    def test_each_call_uses_a_new_name(self) -> None:
        fs = fake()
        report(fs)
        report(fs)
        mkdirs = [path for op, path in fs.calls if op == "mkdir"]
        assert len(set(mkdirs)) == 2

    def test_tdx_writes_no_privlevel(self) -> None:
        fs = fake()
        report(fs)
        assert not [path for op, path in fs.calls if op == "write" and path.endswith("privlevel")]

    def test_want_auxblob_on_tdx_gives_none(self) -> None:
        assert report(fake(), want_auxblob=True).auxblob is None

    def test_privlevel_on_tdx_is_unavailable(self) -> None:
        fs = fake()
        msg = (
            "provider `tdx_guest` has no `privlevel` attribute on this kernel (privilege levels need a provider "
            "such as sev_guest, kernel >= 6.7); ask without `privlevel`"
        )
        with pytest.raises(TeeUnavailable, match=re.escape(msg)):
            report(fs, privlevel=0)
        assert fs.entries() == []

    def test_quote_v5_template(self, vectors: Path) -> None:
        template = vectors / "hw" / "tdx" / "quote_v5_tdx15_trustee.dat"
        result = report(fake(tdx_template=str(template)))
        assert result.outblob[0x23E:0x27E] == DATA


class TestGetReportSnp:
    def test_privlevel_and_auxblob(self) -> None:
        fs = fake(provider="sev_guest")
        result = report(fs, expected_provider="sev_guest", privlevel=2, want_auxblob=True)
        assert result.outblob == snp_report_with(DEFAULT_SNP_TEMPLATE.read_bytes(), DATA, 2)
        assert result.outblob[0x30:0x34] == b"\x02\x00\x00\x00"
        assert result.auxblob == DEFAULT_CERT_TABLE.read_bytes()
        assert result.generation == 2
        assert fs.entries() == []

    def test_privlevel_defaults_to_floor(self) -> None:
        result = report(fake(provider="sev_guest", privlevel_floor=1))
        assert result.outblob[0x30] == 1
        assert result.generation == 2

    def test_floor_zero_writes_no_privlevel(self) -> None:
        result = report(fake(provider="sev_guest"))
        assert result.outblob[0x30] == 0
        assert result.generation == 1

    def test_privlevel_below_floor(self) -> None:
        fs = fake(provider="sev_guest", privlevel_floor=2)
        msg = "`privlevel` is 1, expected at least `privlevel_floor` 2 (the guest runs at privilege level 2)"
        with pytest.raises(DeviceError, match=re.escape(msg)) as info:
            report(fs, privlevel=1)
        assert info.value.errno == errno.EINVAL
        assert fs.entries() == []

    def test_privlevel_rejected_by_kernel(self) -> None:
        fs = Faulty(fake(provider="sev_guest"))
        fs.raise_on["write", "privlevel"] = OSError(errno.EINVAL, "Invalid argument")
        with pytest.raises(DeviceError, match=r"the kernel rejected `privlevel` 3 .* \(EINVAL\)") as info:
            report(fs, privlevel=3)
        assert info.value.errno == errno.EINVAL

    def test_kernel_without_privlevel(self) -> None:
        fs = fake(provider="sev_guest", privlevel_attrs=False)
        with pytest.raises(TeeUnavailable, match=r"provider `sev_guest` has no `privlevel` attribute"):
            report(fs, privlevel=1)
        assert report(fs).outblob[0x30] == 0

    def test_privlevel_file_missing_although_floor_exists(self) -> None:
        fs = Faulty(fake(provider="sev_guest"))
        fs.raise_on["write", "privlevel"] = FileNotFoundError(errno.ENOENT, "No such file")
        with pytest.raises(TeeUnavailable, match=r"has no `privlevel` attribute \(kernel older than 6\.7\?\)"):
            report(fs, privlevel=1)

    def test_kernel_without_auxblob(self) -> None:
        assert report(fake(provider="sev_guest", auxblob_attr=False), want_auxblob=True).auxblob is None

    def test_host_without_certificates(self) -> None:
        assert report(fake(provider="sev_guest", certs=False), want_auxblob=True).auxblob == b""

    def test_malformed_floor(self) -> None:
        fs = Faulty(fake(provider="sev_guest"))
        fs.return_on["read", "privlevel_floor"] = b"7\n"
        with pytest.raises(DeviceError, match=r"`privlevel_floor` of entry .* is '7', expected 0\.\.3"):
            report(fs)


class TestRacingWriter:
    @pytest.mark.parametrize("race_on", ["inblob", "outblob"])
    def test_detected_and_retried(self, race_on: str) -> None:
        fs = fake(provider="sev_guest", race_writes=2, race_on=race_on)
        result = report(fs, privlevel=1, want_auxblob=True, retries=2)
        assert result.outblob[0x50:0x90] == DATA
        assert fs.stats()["races"] == 2
        assert fs.entries() == []

    @pytest.mark.parametrize(("race_on", "attribute"), [("inblob", "inblob"), ("outblob", "outblob")])
    def test_bound_exceeded(self, race_on: str, attribute: str) -> None:
        fs = fake(race_writes=10, race_on=race_on)
        with pytest.raises(TsmGenerationError, match=r"another writer changed the entry .* after 4 attempts") as info:
            report(fs, retries=3)
        # The racer wrote once in each of the four attempts.
        assert info.value.attribute == attribute
        assert info.value.got == info.value.want + 1
        assert fs.stats()["races"] == 4
        assert fs.entries() == []

    def test_no_retries(self) -> None:
        fs = fake(race_writes=1)
        with pytest.raises(TsmGenerationError, match=r"after 1 attempt$"):
            report(fs, retries=0)

    def test_dropped_inblob_write(self) -> None:
        fs = Faulty(fake())
        fs.drop_writes.add("inblob")
        msg = "`generation` after `inblob` is 0, expected 1: the kernel did not apply the write"
        with pytest.raises(TsmGenerationError, match=re.escape(msg)) as info:
            report(fs, retries=1)
        assert (info.value.attribute, info.value.got, info.value.want) == ("inblob", 0, 1)


class TestErrors:
    def test_wrong_provider(self) -> None:
        fs = fake(provider="sev_guest")
        with pytest.raises(
            TeeUnavailable, match=re.escape("configfs-tsm provider is `sev_guest`, expected `tdx_guest`")
        ):
            report(fs, expected_provider="tdx_guest")
        assert fs.entries() == []

    def test_tsm_missing(self) -> None:
        with pytest.raises(TeeUnavailable, match=r"configfs-tsm not found: /fake/config/tsm does not exist; check"):
            report(fake(layout="no_tsm"))

    def test_report_dir_missing(self) -> None:
        with pytest.raises(TeeUnavailable, match=r"configfs-tsm without reports \(CONFIG_TSM_REPORTS\)"):
            report(fake(layout="no_report"))

    def test_configfs_missing(self) -> None:
        fs = fake()
        with pytest.raises(TeeUnavailable, match=r"configfs not available: /elsewhere does not exist"):
            tsm.get_report(DATA, root="/elsewhere/tsm/report", fsops=fs)

    def test_no_provider(self) -> None:
        with pytest.raises(TeeUnavailable, match=r"no TSM provider is registered .* \(mkdir gave ENXIO\)"):
            report(fake(provider=""))

    @pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
    def test_mkdir_permission_denied(self, code: int) -> None:
        with pytest.raises(DeviceError, match=r"permission denied creating a configfs-tsm entry") as info:
            report(fake(mkdir_errno=code))
        assert info.value.errno == code

    def test_mkdir_other_errno(self) -> None:
        with pytest.raises(DeviceError, match=r"failed: Cannot allocate memory \(ENOMEM\)") as info:
            report(fake(mkdir_errno=errno.ENOMEM))
        assert info.value.errno == errno.ENOMEM

    @pytest.mark.parametrize(
        ("provider", "code", "text"),
        [
            ("tdx_guest", errno.EIO, "(EIO); for tdx_guest check the host quote service (QGS)"),
            ("tdx_guest", errno.ETIMEDOUT, "the host did not answer in time (ETIMEDOUT)"),
            ("tdx_guest", errno.EBUSY, "still in flight (EBUSY); retry later"),
            ("sev_guest", errno.ENXIO, "firmware returned an error status (ENXIO); for sev_guest check"),
            ("sev_guest", errno.EINVAL, "the provider rejected the request (EINVAL)"),
            ("sev_guest", errno.ENOSPC, "No space left on device (ENOSPC)"),
        ],
    )
    def test_outblob_errno(self, provider: str, code: int, text: str) -> None:
        fs = fake(provider=provider, outblob_errno=code)
        with pytest.raises(DeviceError, match=re.escape(text)) as info:
            report(fs)
        assert info.value.errno == code
        assert str(info.value).startswith("reading `outblob` of configfs-tsm entry /fake/config/tsm/report/")
        assert fs.entries() == []

    def test_outblob_error_then_recovers(self) -> None:
        fs = fake(outblob_errno=errno.EIO, outblob_errno_count=1)
        with pytest.raises(DeviceError):
            report(fs)
        assert report(fs).outblob[0x238:0x278] == DATA

    def test_auxblob_errno(self) -> None:
        fs = Faulty(fake(provider="sev_guest"))
        fs.raise_on["read", "auxblob"] = OSError(errno.EIO, "Input/output error")
        with pytest.raises(DeviceError, match=r"reading `auxblob` .* \(EIO\)"):
            report(fs, want_auxblob=True)

    @pytest.mark.parametrize(("op", "attribute"), [("read", "outblob"), ("write", "inblob"), ("read", "provider")])
    def test_permission_denied(self, op: str, attribute: str) -> None:
        fs = Faulty(fake())
        fs.raise_on[op, attribute] = PermissionError(errno.EACCES, "Permission denied")
        action = "reading" if op == "read" else "writing"
        with pytest.raises(DeviceError, match=rf"permission denied {action} `{attribute}` .* \(EACCES\): the agent"):
            report(fs)
        assert fs.inner.entries() == []

    def test_empty_outblob(self) -> None:
        fs = Faulty(fake())
        fs.return_on["read", "outblob"] = b""
        with pytest.raises(DeviceError, match=r"`outblob` of configfs-tsm entry .* is empty: `tdx_guest` produced"):
            report(fs)

    @pytest.mark.parametrize("text", [b"", b"x\n", b"-1\n", b"1\n\n"])
    def test_malformed_generation(self, text: bytes) -> None:
        fs = Faulty(fake())
        fs.return_on["read", "generation"] = text
        with pytest.raises(DeviceError, match=r"`generation` of configfs-tsm entry .* expected a decimal counter"):
            report(fs)

    def test_empty_provider(self) -> None:
        fs = Faulty(fake())
        fs.return_on["read", "provider"] = b"\n"
        with pytest.raises(DeviceError, match=r"`provider` of configfs-tsm entry .* is empty"):
            report(fs)

    def test_attribute_vanished(self) -> None:
        fs = Faulty(fake())
        fs.raise_on["read", "outblob"] = FileNotFoundError(errno.ENOENT, "No such file")
        with pytest.raises(DeviceError, match=r"the attribute does not exist \(entry removed, or an older kernel\)"):
            report(fs)

    @pytest.mark.parametrize(
        ("kwargs", "text"),
        [
            ({"inblob": b"x" * 63}, "`inblob` is 0x3f bytes, expected 0x40"),
            ({"inblob": b"x" * 65}, "`inblob` is 0x41 bytes, expected 0x40"),
            ({"privlevel": 4}, "`privlevel` is 4, expected 0..3"),
            ({"privlevel": -1}, "`privlevel` is -1, expected 0..3"),
            ({"retries": -1}, "`retries` is -1, expected at least 0"),
        ],
    )
    def test_caller_errors(self, kwargs: dict[str, object], text: str) -> None:
        fs = fake()
        args: dict[str, object] = {"inblob": DATA, "root": fs.root, "fsops": fs, **kwargs}
        with pytest.raises(ValueError, match=re.escape(text)):
            tsm.get_report(**args)  # type: ignore[arg-type]  # deliberately wrong values
        assert fs.calls == []


class TestEntryLifecycle:
    def test_name_collision_retried(self) -> None:
        fs = Faulty(fake())
        fs.mkdir_collisions = 2
        report(fs)
        assert len(set(fs.mkdir_paths)) == 3

    def test_name_collisions_exhausted(self) -> None:
        fs = Faulty(fake())
        fs.mkdir_collisions = 3
        with pytest.raises(DeviceError, match=r"3 random names already existed") as info:
            report(fs)
        assert info.value.errno == errno.EEXIST

    def test_removed_on_interrupt(self) -> None:
        fs = Faulty(fake())
        fs.raise_on["read", "outblob"] = KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt):
            report(fs)
        assert fs.inner.entries() == []

    def test_rmdir_failure_after_success_keeps_report(self) -> None:
        fs = Faulty(fake())

        def failing_rmdir(path: Path) -> None:
            raise OSError(errno.EBUSY, "Device or resource busy")

        fs.rmdir = failing_rmdir  # type: ignore[method-assign]  # replace one operation
        result = report(fs)
        assert result.outblob[0x238:0x278] == DATA
        assert len(fs.inner.entries()) == 1

    def test_rmdir_failure_is_noted_on_error(self) -> None:
        fs = Faulty(fake(outblob_errno=errno.EIO))

        def failing_rmdir(path: Path) -> None:
            raise OSError(errno.EBUSY, "Device or resource busy")

        fs.rmdir = failing_rmdir  # type: ignore[method-assign]  # replace one operation
        with pytest.raises(DeviceError) as info:
            report(fs)
        notes = getattr(info.value, "__notes__", [])
        assert len(notes) == 1
        assert re.fullmatch(r"could not remove configfs-tsm entry .*: Device or resource busy \(EBUSY\)", notes[0])


class TestProbe:
    @pytest.mark.parametrize("provider", ["tdx_guest", "sev_guest"])
    def test_provider(self, provider: str) -> None:
        fs = fake(provider=provider)
        assert tsm.probe(fs.root, fsops=fs) == provider
        assert fs.entries() == []
        assert [op for op, _ in fs.calls] == ["mkdir", "read", "rmdir"]

    @pytest.mark.parametrize("options", [{"layout": "no_tsm"}, {"layout": "no_report"}, {"provider": ""}])
    def test_unavailable(self, options: dict[str, object]) -> None:
        fs = fake(**options)
        assert tsm.probe(fs.root, fsops=fs) is None

    def test_root_missing(self) -> None:
        assert tsm.probe("/nowhere/tsm/report", fsops=fake()) is None

    def test_permission_denied_raises(self) -> None:
        fs = fake(mkdir_errno=errno.EACCES)
        with pytest.raises(DeviceError, match="permission denied"):
            tsm.probe(fs.root, fsops=fs)


class TestOsFsOps:
    def test_read_until_eof(self, tmp_path: Path) -> None:
        blob = os.urandom(200_000)
        (tmp_path / "outblob").write_bytes(blob)
        assert tsm.OsFsOps().read(tmp_path / "outblob") == blob

    def test_write_whole_buffer_no_create(self, tmp_path: Path) -> None:
        ops = tsm.OsFsOps()
        (tmp_path / "inblob").write_bytes(b"old-content-longer-than-new")
        ops.write(tmp_path / "inblob", b"new")
        assert (tmp_path / "inblob").read_bytes() == b"new-content-longer-than-new"  # no O_TRUNC
        with pytest.raises(FileNotFoundError):
            ops.write(tmp_path / "absent", b"x")

    def test_directories(self, tmp_path: Path) -> None:
        ops = tsm.OsFsOps()
        ops.mkdir(tmp_path / "entry")
        assert ops.is_dir(tmp_path / "entry")
        with pytest.raises(FileExistsError):
            ops.mkdir(tmp_path / "entry")
        ops.rmdir(tmp_path / "entry")
        assert not ops.is_dir(tmp_path / "entry")
        with pytest.raises(FileNotFoundError):
            ops.read(tmp_path / "entry")
