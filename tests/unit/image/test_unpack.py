"""Layer unpacking: GNU tar as the oracle for benign archives, Python's tarfile as the oracle for parsing, the
kernel's openat2(RESOLVE_IN_ROOT) as the oracle for path resolution, and a hostile-tar suite for every escape.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.errors import LayerError
from agent.image.unpack import TarReader, UnpackLimits, _Extractor, split_name, unpack_layer
from tests.unit.image.tarfixtures import (
    Member,
    build_tar,
    directory,
    file,
    gnu_tar_extract,
    hardlink,
    needs_gnu_tar,
    needs_root,
    openat2_available,
    openat2_in_root,
    snapshot,
    symlink,
)

FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


def unpack(archive: bytes, dest: Path, **kwargs: object) -> object:
    dest.mkdir(parents=True, exist_ok=True)
    return unpack_layer(io.BytesIO(archive), dest, **kwargs)  # type: ignore[arg-type]


BENIGN = [
    directory("etc", mode=0o755, uid=0, gid=0),
    file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", mode=0o644),
    file("etc/shadow", b"root:*:19000::::::\n", mode=0o640, gid=42),
    directory("usr/bin", mode=0o755),
    file("usr/bin/su", b"\x7fELF su", mode=0o4755),
    file("usr/bin/wall", b"\x7fELF wall", mode=0o2755, gid=5),
    directory("tmp", mode=0o1777),
    directory("home/user", mode=0o700, uid=1000, gid=1000),
    file("home/user/.profile", b"export A=1\n", mode=0o600, uid=1000, gid=1000, mtime=1_600_000_000),
    symlink("bin", "usr/bin"),
    symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
    symlink("dangling", "../../nowhere/at/all"),
    hardlink("usr/bin/su-again", "usr/bin/su"),
    file("big", bytes(range(256)) * 5000, mode=0o755),
    file("a" * 120 + "/" + "b" * 120 + "/long-name-file", b"long", mode=0o644),
    symlink("long-link", "t" * 150),
    file("unicode-é-名前", b"utf8", mode=0o644),
    directory("empty", mode=0o555, mtime=1_500_000_000),
]


@needs_root
@needs_gnu_tar
class TestAgainstGnuTar:
    @pytest.mark.parametrize("fmt", FORMATS, ids=["ustar", "gnu", "pax"])
    def test_benign_archive_matches_file_by_file(self, tmp_path: Path, fmt: int) -> None:
        members = [m for m in BENIGN if fmt != tarfile.USTAR_FORMAT or (len(m.name) < 100 and len(m.linkname) < 100)]
        archive = build_tar(members, fmt)
        result = unpack(archive, tmp_path / "ours")
        gnu_tar_extract(archive, tmp_path / "gnu")
        assert snapshot(tmp_path / "ours") == snapshot(tmp_path / "gnu")
        assert result.diff_id == "sha256:" + hashlib.sha256(archive).hexdigest()  # type: ignore[attr-defined]
        for m in members:
            if m.type == tarfile.DIRTYPE:  # applied after every entry, so files created inside do not change it
                assert os.lstat(tmp_path / "ours" / m.name).st_mtime_ns == m.mtime * 10**9, m.name

    def test_archive_written_by_gnu_tar(self, tmp_path: Path) -> None:
        import subprocess

        source = tmp_path / "src"
        unpack(build_tar(BENIGN), source)
        os.setxattr(source / "etc/passwd", "user.note", b"hello")
        os.setxattr(source / "usr/bin/su", "security.capability", bytes.fromhex("0100000200200000" + "00" * 12))
        archive = subprocess.run(
            ["tar", "-c", "-f", "-", "-C", str(source), "--xattrs", "--xattrs-include=*", "--format=posix", "."],
            check=True,
            capture_output=True,
        ).stdout
        unpack(archive, tmp_path / "ours")
        gnu_tar_extract(archive, tmp_path / "gnu")
        ours = snapshot(tmp_path / "ours")
        assert ours == snapshot(tmp_path / "gnu")
        assert dict(ours["etc/passwd"][8])["user.note"] == b"hello"  # type: ignore[call-overload]

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_random_archives_match(self, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
        members = data.draw(_trees())
        fmt = data.draw(st.sampled_from(FORMATS))
        archive = buildable(members, fmt)
        base = tmp_path_factory.mktemp("random")
        result = unpack(archive, base / "ours")
        gnu_tar_extract(archive, base / "gnu")
        assert snapshot(base / "ours") == snapshot(base / "gnu")
        assert result.diff_id == "sha256:" + hashlib.sha256(archive).hexdigest()  # type: ignore[attr-defined]


def buildable(members: list[Member], fmt: int) -> bytes:
    try:
        return build_tar(members, fmt)
    except ValueError:  # a name or link too long for ustar
        assume(False)
        raise


_NAMES = st.text(alphabet="abcxyz._-é", min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..") and not n.startswith(".wh.")
)


@st.composite
def _trees(draw: st.DrawFn) -> list[Member]:
    """Unique paths; parents declared first; symlinks only as leaves; hard links to earlier files."""
    members: list[Member] = []
    dirs = [""]
    files: list[str] = []
    used: set[str] = set()
    for _ in range(draw(st.integers(1, 14))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_NAMES)
        path = f"{parent}/{name}" if parent else name
        if path in used:
            continue
        used.add(path)
        kind = draw(st.sampled_from(["dir", "file", "file", "symlink", "hardlink"]))
        mode = draw(st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2711, 0o1777, 0o444, 0o6750]))
        owner = {"uid": draw(st.integers(0, 70000)), "gid": draw(st.integers(0, 70000))}
        mtime = draw(st.integers(0, 8**11 - 1))  # what ustar can hold
        if kind == "dir":
            # GNU tar keeps a set-gid bit a directory inherited from its parent (coreutils chmod rules);
            # containerd and tar-rs apply the header mode exactly, as we do (test_header_mode_is_exact).
            members.append(directory(path, mode=(mode | 0o700) & ~0o2000, mtime=mtime, **owner))
            dirs.append(path)
        elif kind == "file" or (kind == "hardlink" and not files):
            members.append(file(path, draw(st.binary(max_size=3000)), mode=mode, mtime=mtime, **owner))
            files.append(path)
        elif kind == "symlink":
            target = draw(
                st.sampled_from(["/etc/passwd", "../../..", "x", "/", "a/b/../c", files[0] if files else "y"])
            )
            members.append(symlink(path, target, mtime=mtime, **owner))
        else:
            members.append(hardlink(path, draw(st.sampled_from(files))))
    return members


class TestTarReader:
    @settings(max_examples=60, deadline=None)
    @given(members=_trees(), fmt=st.sampled_from(FORMATS))
    def test_parses_what_tarfile_parses(self, members: list[Member], fmt: int) -> None:
        archive = buildable(members, fmt)
        reader = TarReader(io.BytesIO(archive))
        ours = []
        while (entry := reader.next()) is not None:
            ours.append(
                (
                    entry.name.decode().rstrip("/"),
                    entry.type,
                    entry.mode,
                    entry.uid,
                    entry.gid,
                    entry.size,
                    entry.linkname.decode(),
                    entry.mtime_ns // 10**9,
                    reader.read(1 << 20),
                )
            )
        with tarfile.open(fileobj=io.BytesIO(archive)) as theirs:
            expected = [
                (
                    m.name,
                    m.type[0],
                    m.mode,
                    m.uid,
                    m.gid,
                    m.size,
                    m.linkname,
                    int(m.mtime),
                    theirs.extractfile(m).read() if m.isreg() else b"",  # type: ignore[union-attr]
                )
                for m in theirs.getmembers()
            ]
        assert ours == expected
        assert reader.diff_id == "sha256:" + hashlib.sha256(archive).hexdigest()

    def test_sha512_diff_id(self) -> None:
        archive = build_tar([file("x", b"1")])
        reader = TarReader(io.BytesIO(archive), digest_algorithm="sha512")
        while reader.next() is not None:
            pass
        assert reader.diff_id == "sha512:" + hashlib.sha512(archive).hexdigest()

    def test_base256_numbers_as_gnu_tar_writes_them(self) -> None:
        archive = build_tar([file("big-uid", b"", uid=2**30, gid=2**25)], tarfile.GNU_FORMAT)
        entry = TarReader(io.BytesIO(archive)).next()
        assert entry is not None
        assert (entry.uid, entry.gid) == (2**30, 2**25)

    def test_pax_overrides_and_subsecond_mtime(self) -> None:
        archive = build_tar([file("short", b"", pax={"path": "p/" + "x" * 300, "mtime": "1700000000.123456789"})])
        entry = TarReader(io.BytesIO(archive)).next()
        assert entry is not None
        assert entry.name == b"p/" + b"x" * 300
        assert entry.mtime_ns == 1_700_000_000_123_456_789


def test_split_name() -> None:
    assert split_name(b"/a//./b/") == ["a", "b"]
    assert split_name(b"./") == []
    assert split_name(b"a/../b") is None
    assert split_name(b"..") is None


# --- hostile archives -------------------------------------------------------------------------------------


@pytest.fixture
def jail(tmp_path: Path) -> Path:
    """`<tmp>/outside/secret` beside the layer dir `<tmp>/layer`; the test checks `outside` never changes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (tmp_path / "layer").mkdir()
    return tmp_path


def outside_snapshot(jail: Path) -> dict[str, object]:
    return {p.name: snapshot(jail)[p.name] for p in jail.iterdir() if p.name != "layer"} | {
        "tree": sorted(k for k in snapshot(jail) if not k.startswith("layer"))
    }


def hostile_cases(jail: Path) -> list[tuple[str, list[Member], dict[str, str]]]:
    out = str(jail / "outside")
    return [
        ("dotdot", [file("../outside/pwned", b"x"), file("a/../../outside/pwned2", b"x")], {}),
        ("absolute", [file(out + "/pwned", b"x")], {out[1:] + "/pwned": "file"}),
        ("symlink parent relative", [symlink("l", "../outside"), file("l/pwned", b"x")], {"outside/pwned": "file"}),
        ("symlink parent absolute", [symlink("l", out), file("l/pwned", b"x")], {out[1:] + "/pwned": "file"}),
        (
            "symlink chain",
            [
                directory("d"),
                symlink("d/up", "../.."),
                symlink("a", "d/up/up2"),
                symlink("d/up2", "../../../.."),
                file("a/pwned", b"x"),
            ],
            {"up2/pwned": "file"},  # d/up is the root, so a -> <root>/up2, created inside
        ),
        (
            "deep relative",
            [directory("a/b/c"), symlink("a/b/c/l", "../../../../../../../../outside"), file("a/b/c/l/pwned", b"x")],
            {"outside/pwned": "file"},
        ),
        ("symlink final then file", [symlink("f", out + "/secret"), file("f", b"replaced")], {"f": "file"}),
        ("symlink then dir", [symlink("d", out), directory("d"), file("d/pwned", b"x")], {"d/pwned": "file"}),
        ("whiteout through symlink", [symlink("s", out), file("s/.wh.secret")], {out[1:] + "/secret": "whiteout"}),
        ("opaque through symlink", [symlink("s", out), file("s/.wh..wh..opq")], {out[1:]: "opaque"}),
        ("whiteout dotdot name", [file(".wh..."), file("x/.wh."), file(".wh..wh.plnk")], {}),
        ("hardlink to symlinked dir", [symlink("s", out), hardlink("h", "s/secret")], {"error": "No such file"}),
        ("hardlink dotdot", [hardlink("h", "../outside/secret")], {"error": "expected a file of the layer"}),
        ("hardlink absolute", [hardlink("h", out + "/secret")], {"error": "No such file"}),
        ("symlink loop", [symlink("a", "b"), symlink("b", "a"), file("a/x", b"x")], {"error": "Too many levels"}),
        ("file as parent", [file("f", b"x"), file("f/x", b"x")], {"error": "Not a directory"}),
        (
            "device node",
            [Member("dev/sda", tarfile.CHRTYPE, mode=0o660, devmajor=8), Member("fifo", tarfile.FIFOTYPE, mode=0o600)],
            {"dev/sda": "file", "fifo": "file"},
        ),
    ]


@needs_root
class TestHostile:
    @pytest.mark.parametrize("case", range(17), ids=str)
    def test_no_write_outside_the_layer(self, jail: Path, case: int) -> None:
        name, members, expect = hostile_cases(jail)[case]
        layer = jail / "layer"
        before = outside_snapshot(jail)
        secret_links = (jail / "outside" / "secret").stat().st_nlink
        archive = build_tar(members)
        if "error" in expect:
            with pytest.raises(LayerError, match=re.escape(expect["error"])):
                unpack(archive, layer)
        else:
            unpack(archive, layer)
        assert outside_snapshot(jail) == before, name
        assert (jail / "outside" / "secret").stat().st_nlink == secret_links
        for rel, kind in expect.items():
            if rel == "error":
                continue
            path = layer / rel
            st_ = os.lstat(path)
            if kind == "file":
                assert stat.S_ISREG(st_.st_mode), rel
            elif kind == "whiteout":
                assert stat.S_ISCHR(st_.st_mode), rel
                assert st_.st_rdev == 0, rel
            elif kind == "opaque":
                assert os.getxattr(path, "trusted.overlay.opaque") == b"y"
        if name == "whiteout dotdot name":
            assert list(layer.iterdir()) == []

    def test_header_mode_is_exact_under_a_setgid_directory(self, tmp_path: Path) -> None:
        unpack(build_tar([directory("g", mode=0o2775), directory("g/child", mode=0o755)]), tmp_path / "l")
        assert stat.S_IMODE((tmp_path / "l/g").stat().st_mode) == 0o2775
        assert stat.S_IMODE((tmp_path / "l/g/child").stat().st_mode) == 0o755

    def test_device_nodes_become_empty_files(self, tmp_path: Path) -> None:
        unpack(build_tar([Member("sda", tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=8)]), tmp_path / "l")
        st_ = os.lstat(tmp_path / "l" / "sda")
        assert (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), st_.st_gid, st_.st_size) == (
            stat.S_IFREG,
            0o660,
            6,
            0,
        )

    def test_overlay_xattrs_in_the_tar_are_dropped(self, tmp_path: Path) -> None:
        pax = {
            "SCHILY.xattr.trusted.overlay.redirect": "/etc",
            "SCHILY.xattr.trusted.overlay.opaque": "y",
            "SCHILY.xattr.user.ok": "1",
        }
        result = unpack(build_tar([directory("d", pax=pax)]), tmp_path / "l")
        assert os.listxattr(tmp_path / "l" / "d") == ["user.ok"]
        assert result.xattrs_skipped == 2  # type: ignore[attr-defined]

    def test_root_entry_sets_the_layer_root(self, tmp_path: Path) -> None:
        archive = build_tar([directory("./", mode=0o751, uid=7, gid=8, mtime=1_234_567_890), file("./f", b"x")])
        unpack(archive, tmp_path / "l")
        st_ = (tmp_path / "l").stat()
        assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (0o751, 7, 8)
        assert st_.st_mtime_ns == 1_234_567_890 * 10**9

    def test_whiteouts_and_opaque(self, tmp_path: Path) -> None:
        archive = build_tar(
            [
                directory("etc"),
                file("etc/.wh.motd"),
                directory("var/cache"),
                file("var/cache/.wh..wh..opq"),
                file("var/cache/new", b"n"),
            ]
        )
        unpack(archive, tmp_path / "l")
        motd = os.lstat(tmp_path / "l/etc/motd")
        assert stat.S_ISCHR(motd.st_mode)
        assert motd.st_rdev == os.makedev(0, 0)
        assert stat.S_IMODE(motd.st_mode) == 0
        assert os.getxattr(tmp_path / "l/var/cache", "trusted.overlay.opaque") == b"y"
        assert not (tmp_path / "l/etc/.wh.motd").exists()
        assert (tmp_path / "l/var/cache/new").read_bytes() == b"n"


def raw_header(name: bytes, typeflag: bytes, size: int, *, size_field: bytes | None = None) -> bytes:
    info = tarfile.TarInfo(name.decode())
    info.type = typeflag
    info.size = size
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if size_field is not None:
        block[124:136] = size_field
        block[148:156] = b"        "
        block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


class TestMalformed:
    @pytest.mark.parametrize(
        ("archive", "message"),
        [
            (build_tar([file("x", b"hello" * 200)])[:700], "layer tar ends inside a member"),
            (build_tar([file("x", b"hello")])[:300], "layer tar ends inside header"),
            (build_tar([file("x")])[:512] + b"\x01" * 100, "layer tar ends inside header"),
            (b"\x01" + build_tar([file("x")])[1:], "layer tar header checksum is"),
            (raw_header(b"big", b"x", 2 * 1024 * 1024) + bytes(1024), "extension header is 0x200000 bytes"),
            (raw_header(b"long", b"L", 2 * 1024 * 1024) + bytes(1024), "extension header is 0x200000 bytes"),
            (raw_header(b"s", b"S", 0) + bytes(1024), "layer tar entry type is GNU sparse"),
            (raw_header(b"neg", b"0", 0, size_field=b"\xff" * 12) + bytes(1024), "`size` is negative"),
            (raw_header(b"oct", b"0", 0, size_field=b"12345678901\0") + bytes(1024), "`size` is b'12345678901'"),
            (build_tar([file("x", pax={"GNU.sparse.major": "1"})]), "PAX sparse file"),
            (build_tar([file("x", pax={"uid": "-1"})]), "PAX `uid` is b'-1'"),
            (build_tar([file("x")]) + b"garbage" + bytes(505), "layer tar header checksum is"),
        ],
    )
    def test_refused(self, tmp_path: Path, archive: bytes, message: str) -> None:
        with pytest.raises(LayerError, match=re.escape(message)):
            unpack(archive, tmp_path / "l")

    def test_entry_count_is_bounded(self, tmp_path: Path) -> None:
        archive = build_tar([file(f"f{i}") for i in range(20)])
        with pytest.raises(LayerError, match="more than 10 headers"):
            unpack(archive, tmp_path / "l", limits=UnpackLimits(max_entries=10))

    def test_zero_blocks_between_members_are_skipped(self, tmp_path: Path) -> None:
        one, two = build_tar([file("a", b"1")]), build_tar([file("b", b"2")])
        result = unpack(one + two, tmp_path / "l")  # concatenated archives, as tar -i reads them
        assert (tmp_path / "l/a").read_bytes() == b"1"
        assert (tmp_path / "l/b").read_bytes() == b"2"
        assert result.diff_id == "sha256:" + hashlib.sha256(one + two).hexdigest()  # type: ignore[attr-defined]


# --- in-root resolution against the kernel -----------------------------------------------------------------

needs_openat2 = pytest.mark.skipif(not openat2_available(), reason="openat2(2) not available (Linux < 5.6 or seccomp)")
_LINK_TARGETS = st.sampled_from(["/", "..", "../..", "/a", "a/b", "../a/../b", "/c/d", "b", "x", "a/l1", "/l2/..", "."])


@needs_openat2
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    links=st.lists(st.tuples(st.sampled_from(["l1", "l2", "a/l3", "a/b/l4", "c/l5"]), _LINK_TARGETS), max_size=6),
    path=st.lists(st.sampled_from(["a", "b", "c", "d", "l1", "l2", "l3", "l4", "l5", "..", ".", "x"]), max_size=6),
)
def test_resolution_matches_openat2_resolve_in_root(
    tmp_path_factory: pytest.TempPathFactory, links: list[tuple[str, str]], path: list[str]
) -> None:
    root = tmp_path_factory.mktemp("resolve")
    for d in ("a/b", "c/d"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "a/x").write_bytes(b"")
    for name, target in links:
        assume(not (root / name).exists() and not (root / name).is_symlink())
        (root / name).symlink_to(target)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        try:
            fd = openat2_in_root(root_fd, "/".join(path) or ".")
            expected: object = os.fstat(fd).st_ino
            os.close(fd)
        except OSError as exc:
            expected = exc.errno
        extractor = _Extractor(root_fd, TarReader(io.BytesIO(b"")))
        try:
            fd = extractor.resolve_dir(path, create=False)
            got: object = os.fstat(fd).st_ino
            os.close(fd)
        except OSError as exc:
            got = exc.errno
        assert got == expected
    finally:
        os.close(root_fd)


_COMPONENTS = st.sampled_from(["a", "b", "l", "..", ".", "", "outside", ".wh.a", ".wh..wh..opq", "secret"])


@st.composite
def _hostile(draw: st.DrawFn, outside: str) -> list[Member]:
    targets = st.sampled_from(
        ["/", "..", "../..", "../outside", outside, outside + "/secret", "a", "l/..", "l/l", "secret"]
    )
    members = []
    for _ in range(draw(st.integers(1, 10))):
        name = "/".join(draw(st.lists(_COMPONENTS, min_size=1, max_size=4)))
        kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink"]))
        if kind == "file":
            members.append(file(name, b"pwned"))
        elif kind == "dir":
            members.append(directory(name))
        elif kind == "symlink":
            members.append(symlink(name, draw(targets)))
        else:
            members.append(hardlink(name, draw(targets)))
    return members


@needs_root
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_hostile_archives_never_write_outside(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    jail = tmp_path_factory.mktemp("jail")
    (jail / "outside").mkdir()
    (jail / "outside" / "secret").write_bytes(b"secret")
    (jail / "layer").mkdir()
    members = data.draw(_hostile(str(jail / "outside")))
    before = outside_snapshot(jail)
    try:
        build = build_tar(members)
    except ValueError:
        assume(False)
        raise
    with contextlib.suppress(LayerError):
        unpack(build, jail / "layer")
    assert outside_snapshot(jail) == before
    assert (jail / "outside" / "secret").stat().st_nlink == 1
    assert (jail / "outside" / "secret").read_bytes() == b"secret"


class TestFuzz:
    @settings(max_examples=200, deadline=None)
    @given(data=st.binary(max_size=4096))
    def test_random_bytes_parse_or_raise_layer_error(self, data: bytes) -> None:
        reader = TarReader(io.BytesIO(data))
        with contextlib.suppress(LayerError):
            while reader.next() is not None:
                reader.read(1 << 20)

    @needs_root
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6))
    def test_corrupted_archives_unpack_or_raise_layer_error(
        self, tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[int, int]]
    ) -> None:
        archive = bytearray(build_tar(BENIGN[:10], tarfile.PAX_FORMAT))
        for offset, value in flips:
            archive[offset % len(archive)] = value
        with contextlib.suppress(LayerError):
            unpack(bytes(archive), tmp_path_factory.mktemp("fuzz") / "l")

    def test_ids_beyond_32_bits_are_refused(self, tmp_path: Path) -> None:
        archive = build_tar([file("x", uid=2**40)], tarfile.GNU_FORMAT)
        with pytest.raises(LayerError, match="uid/gid 1099511627776/0 or mtime is out of range"):
            unpack(archive, tmp_path / "l")
