"""agent.files: owner-only files and directories whatever the umask (run under umask 000 here)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api.sockets import prepare_socket_path
from agent.files import create_private, private_dirs, write_private


@pytest.fixture(autouse=True)
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_created_directory_is_0700(tmp_path: Path) -> None:
    private_dirs(tmp_path / "a" / "b" / "c")
    for path in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert mode(path) == 0o700, path


def test_existing_directories_are_left_alone(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    private_dirs(existing / "mine")
    assert mode(existing) == 0o755
    assert mode(existing / "mine") == 0o700


def test_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        private_dirs(tmp_path / "f" / "sub")


def test_write_private_replaces_a_world_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "secret.bin"
    target.write_bytes(b"old")
    target.chmod(0o644)
    old_inode = target.stat().st_ino
    write_private(target, b"new secret")
    assert target.read_bytes() == b"new secret"
    assert mode(target) == 0o600
    assert target.stat().st_ino != old_inode  # a new file, not the old one truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.bin"]  # no temporary file left


def test_write_private_creates_0600_and_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(victim)
    write_private(link, b"s")
    assert victim.read_text() == "keep"
    assert not link.is_symlink()
    assert mode(link) == 0o600


def test_write_private_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        write_private(tmp_path / "dir", b"s")
    with pytest.raises(FileNotFoundError):
        write_private(tmp_path / "missing" / "f", b"s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_create_private_is_exclusive(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    create_private(target, b"private")
    assert mode(target) == 0o600
    with pytest.raises(FileExistsError):
        create_private(target, b"other")
    assert target.read_bytes() == b"private"


def test_socket_parent_directories_are_0700_under_umask_000(tmp_path: Path) -> None:
    prepare_socket_path(str(tmp_path / "run" / "cc" / "aa.sock"))
    assert mode(tmp_path / "run") == 0o700
    assert mode(tmp_path / "run" / "cc") == 0o700
