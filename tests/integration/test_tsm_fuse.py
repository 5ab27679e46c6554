"""agent.tee.tsm with real os calls against tsmfs, the FUSE emulation of configfs-tsm."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import DeviceError, TeeUnavailable, TsmGenerationError
from agent.tee import tsm
from tests.fakes import tsmfs
from tests.fakes.tsmfs import (
    DEFAULT_CERT_TABLE,
    DEFAULT_SNP_TEMPLATE,
    DEFAULT_TDX_TEMPLATE,
    MountedTsm,
    TsmFsOptions,
    mounted_tsm,
    snp_report_with,
    tdx_quote_with,
)

pytestmark = pytest.mark.integration

DATA = bytes(range(0x40, 0x80))


def names(directory: Path) -> list[str]:
    return sorted(child.name for child in directory.iterdir())


@pytest.fixture
def tdx(tmp_path: Path) -> Iterator[MountedTsm]:
    with mounted_tsm(TsmFsOptions(provider="tdx_guest"), workdir=tmp_path) as mount:
        yield mount


@pytest.fixture
def snp(tmp_path: Path) -> Iterator[MountedTsm]:
    with mounted_tsm(TsmFsOptions(provider="sev_guest", privlevel_floor=1), workdir=tmp_path) as mount:
        yield mount


class TestTdx:
    def test_quote(self, tdx: MountedTsm) -> None:
        result = tsm.get_report(DATA, root=tdx.root, expected_provider=tsm.PROVIDER_TDX, want_auxblob=True)
        assert result.outblob == tdx_quote_with(DEFAULT_TDX_TEMPLATE.read_bytes(), DATA)
        assert (result.auxblob, result.provider, result.generation) == (None, "tdx_guest", 1)
        assert names(tdx.root) == []
        assert tdx.state()["stats"]["rmdirs"] == 1

    def test_probe(self, tdx: MountedTsm) -> None:
        assert tsm.probe(tdx.root) == "tdx_guest"
        assert names(tdx.root) == []

    def test_privlevel_unavailable(self, tdx: MountedTsm) -> None:
        with pytest.raises(TeeUnavailable, match=r"provider `tdx_guest` has no `privlevel` attribute"):
            tsm.get_report(DATA, root=tdx.root, privlevel=0)
        assert names(tdx.root) == []


class TestSnp:
    def test_report_with_privlevel_and_auxblob(self, snp: MountedTsm) -> None:
        result = tsm.get_report(DATA, root=snp.root, expected_provider=tsm.PROVIDER_SNP, privlevel=3, want_auxblob=True)
        assert result.outblob == snp_report_with(DEFAULT_SNP_TEMPLATE.read_bytes(), DATA, 3)
        assert result.auxblob == DEFAULT_CERT_TABLE.read_bytes()
        assert result.generation == 2
        assert names(snp.root) == []

    def test_default_privlevel_is_floor(self, snp: MountedTsm) -> None:
        assert tsm.get_report(DATA, root=snp.root).outblob[0x30:0x34] == b"\x01\x00\x00\x00"

    def test_privlevel_below_floor(self, snp: MountedTsm) -> None:
        with pytest.raises(DeviceError, match=r"`privlevel` is 0, expected at least `privlevel_floor` 1") as info:
            tsm.get_report(DATA, root=snp.root, privlevel=0)
        assert info.value.errno == errno.EINVAL
        assert names(snp.root) == []

    def test_no_certificates(self, snp: MountedTsm) -> None:
        snp.configure(certs=False)
        assert tsm.get_report(DATA, root=snp.root, want_auxblob=True).auxblob == b""


class TestRacingWriter:
    @pytest.mark.parametrize("race_on", ["inblob", "outblob"])
    def test_retried(self, snp: MountedTsm, race_on: str) -> None:
        snp.configure(race_writes=3, race_on=race_on)
        result = tsm.get_report(DATA, root=snp.root, privlevel=2, want_auxblob=True, retries=3)
        assert result.outblob[0x50:0x90] == DATA
        assert result.outblob[0x30] == 2
        state = snp.state()
        assert state["stats"]["races"] == 3
        assert state["entries"] == []

    @pytest.mark.parametrize("race_on", ["inblob", "outblob"])
    def test_bound_exceeded(self, tdx: MountedTsm, race_on: str) -> None:
        tdx.configure(race_writes=100, race_on=race_on)
        with pytest.raises(TsmGenerationError, match=r"another writer changed the entry .* after 3 attempts") as info:
            tsm.get_report(DATA, root=tdx.root, retries=2)
        assert info.value.attribute == race_on
        assert info.value.got == info.value.want + 1
        assert tdx.entries() == []


class TestKernelVariants:
    def test_tsm_missing(self, tmp_path: Path) -> None:
        with mounted_tsm(TsmFsOptions(layout="no_tsm"), workdir=tmp_path) as mount:
            with pytest.raises(TeeUnavailable, match=r"configfs-tsm not found: .*/tsm does not exist; check that"):
                tsm.get_report(DATA, root=mount.root)
            assert tsm.probe(mount.root) is None

    def test_report_dir_missing(self, tmp_path: Path) -> None:
        with (
            mounted_tsm(TsmFsOptions(layout="no_report"), workdir=tmp_path) as mount,
            pytest.raises(TeeUnavailable, match=r"CONFIG_TSM_REPORTS"),
        ):
            tsm.get_report(DATA, root=mount.root)

    def test_no_provider(self, tmp_path: Path) -> None:
        with mounted_tsm(TsmFsOptions(provider=""), workdir=tmp_path) as mount:
            with pytest.raises(TeeUnavailable, match=r"\(mkdir gave ENXIO\)"):
                tsm.get_report(DATA, root=mount.root)
            assert tsm.probe(mount.root) is None

    def test_without_privlevel_and_auxblob(self, tmp_path: Path) -> None:
        opts = TsmFsOptions(provider="sev_guest", privlevel_attrs=False, auxblob_attr=False)
        with mounted_tsm(opts, workdir=tmp_path) as mount:
            with pytest.raises(TeeUnavailable, match=r"has no `privlevel` attribute"):
                tsm.get_report(DATA, root=mount.root, privlevel=1)
            result = tsm.get_report(DATA, root=mount.root, want_auxblob=True)
            assert result.auxblob is None
            assert result.outblob[0x50:0x90] == DATA
            assert mount.entries() == []

    def test_outblob_errno(self, tdx: MountedTsm) -> None:
        tdx.configure(outblob_errno=errno.EIO)
        with pytest.raises(DeviceError, match=r"reading `outblob` .* \(EIO\); for tdx_guest check") as info:
            tsm.get_report(DATA, root=tdx.root)
        assert info.value.errno == errno.EIO
        assert tdx.entries() == []
        tdx.configure(outblob_errno=0)
        assert tsm.get_report(DATA, root=tdx.root).outblob[0x238:0x278] == DATA

    def test_permission_denied(self, tdx: MountedTsm) -> None:
        tdx.configure(mkdir_errno=errno.EACCES)
        with pytest.raises(DeviceError, match=r"permission denied creating a configfs-tsm entry") as info:
            tsm.get_report(DATA, root=tdx.root)
        assert info.value.errno == errno.EACCES

    def test_configfs_absent(self, tmp_path: Path) -> None:
        with pytest.raises(TeeUnavailable, match=r"configfs not available"):
            tsm.get_report(DATA, root=tmp_path / "config" / "tsm" / "report")


class TestConcurrency:
    def test_threads_get_their_own_entries(self, tmp_path: Path) -> None:
        threads_n, calls_n = 8, 3
        opts = TsmFsOptions(provider="sev_guest", report_delay_s=0.02)
        results: dict[bytes, bytes] = {}
        failures: list[BaseException] = []
        lock = threading.Lock()
        with mounted_tsm(opts, workdir=tmp_path) as mount:
            barrier = threading.Barrier(threads_n)

            def worker(index: int) -> None:
                try:
                    barrier.wait()
                    for call in range(calls_n):
                        data = bytes([index, call]) * 32
                        result = tsm.get_report(data, root=mount.root, privlevel=index % 4, want_auxblob=True)
                        with lock:
                            results[data] = result.outblob
                except BaseException as exc:  # collected and re-raised in the main thread
                    failures.append(exc)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert not failures, failures
            state = mount.state()
        assert len(results) == threads_n * calls_n
        for data, outblob in results.items():
            assert outblob[0x50:0x90] == data
            assert outblob[0x30] == data[0] % 4
        assert state["entries"] == []
        assert state["stats"]["mkdirs"] == state["stats"]["rmdirs"] == threads_n * calls_n
        assert state["stats"]["max_entries"] >= 2


class TestEmulatedSemantics:
    """The file system itself behaves like configfs-tsm."""

    def test_attributes_and_errnos(self, snp: MountedTsm) -> None:
        entry = snp.root / "manual"
        entry.mkdir()
        try:
            assert names(entry) == [
                "auxblob",
                "generation",
                "inblob",
                "manifestblob",
                "outblob",
                "privlevel",
                "privlevel_floor",
                "provider",
                "service_guid",
                "service_manifest_version",
                "service_provider",
            ]
            assert (entry / "provider").read_bytes() == b"sev_guest\n"
            assert (entry / "generation").read_bytes() == b"0\n"
            with pytest.raises(OSError, match="Invalid argument"):
                (entry / "outblob").read_bytes()  # no inblob yet
            for name, flags in [("outblob", os.O_WRONLY), ("inblob", os.O_RDONLY), ("generation", os.O_WRONLY)]:
                with pytest.raises(PermissionError):
                    os.open(entry / name, flags)
            fd = os.open(entry / "inblob", os.O_WRONLY)
            try:
                with pytest.raises(OSError, match="File too large"):
                    os.write(fd, b"x" * 65)
                os.write(fd, DATA)
                assert (entry / "generation").read_bytes() == b"0\n"  # applied only at close
            finally:
                os.close(fd)
            assert (entry / "generation").read_bytes() == b"1\n"
            with pytest.raises(PermissionError):
                (entry / "extra").write_bytes(b"")
            with pytest.raises(PermissionError):
                (entry / "sub").mkdir()
            first = (entry / "outblob").read_bytes()
            assert (entry / "outblob").read_bytes() == first
            assert snp.state()["stats"]["reports"] == 1  # cached while generation is unchanged
            (entry / "service_provider").write_bytes(b"svsm\n")
            with pytest.raises(OSError, match="Invalid argument"):
                (entry / "service_provider").write_bytes(b"other\n")
            assert (entry / "generation").read_bytes() == b"2\n"
        finally:
            entry.rmdir()
        assert names(snp.root) == []

    def test_unmounted_after_failing_body(self, tmp_path: Path) -> None:
        seen: list[Path] = []

        def failing_test() -> None:
            with mounted_tsm(workdir=tmp_path) as mount:
                seen.append(mount.mountpoint)
                (mount.root / "left-behind").mkdir()
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            failing_test()
        assert len(seen) == 1
        assert not seen[0].exists()


class TestRequireFuse:
    def test_skips_without_dev_fuse(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(tsmfs, "fuse_unavailable_reason", lambda: "/dev/fuse is not usable (test)")
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match=r"/dev/fuse is not usable \(test\)"):
            tsmfs.require_fuse()

    def test_fails_in_ci(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(tsmfs, "fuse_unavailable_reason", lambda: "/dev/fuse is not usable (test)")
        monkeypatch.setenv("CI", "true")
        with pytest.raises(pytest.fail.Exception, match=r"CI=true but FUSE is unavailable"):
            tsmfs.require_fuse()
