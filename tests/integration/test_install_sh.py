"""rootfs/install.sh refuses loudly what it cannot install correctly (the happy path is in test_boot.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "rootfs/install.sh"), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_usage_and_missing_root_dir(tmp_path: Path) -> None:
    assert install().returncode == 2
    result = install(str(tmp_path / "absent"))
    assert result.returncode == 1
    assert "is not a directory" in result.stderr


def test_relative_interpreter_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh needs root (chroot)")
    result = install("--python", "python3", str(tmp_path))
    assert result.returncode == 1
    assert "--python must be an absolute path inside the guest" in result.stderr


def fake_guest(root: Path, facts: str) -> None:
    """A root with busybox and a `python3` that answers install.sh's question with `facts`."""
    busybox = shutil.which("busybox")
    kind = subprocess.run(["file", "-L", str(busybox)], capture_output=True, text=True, check=False).stdout
    if busybox is None or "statically linked" not in kind:
        pytest.skip("busybox-static is missing: run rootfs/setup-build-host.sh")
    (root / "bin").mkdir()
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    script = root / "usr/bin/python3"
    script.write_text(f"#!/bin/sh\n/bin/busybox cat <<'EOF'\n{facts}EOF\n")
    script.chmod(0o755)


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        (
            "/usr/bin/python3.9\n3.9\nglibc 2.31\nx86_64\n/usr/local/lib/python3.9/dist-packages\nyes\n",
            "expected >= 3.11",
        ),
        ("/usr/bin/python3.12\n3.12\n- -\nx86_64\n/usr/lib/python3.12/site-packages\nyes\n", "expected glibc"),
        (
            "/usr/bin/python3.11\n3.11\nglibc 2.36\nx86_64\n/usr/local/local/lib/python3.11/dist-packages\nno\n",
            "is not on that interpreter's sys.path",
        ),
    ],
)
def test_guest_interpreter_that_cannot_work_is_refused(tmp_path: Path, facts: str, message: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh needs root (chroot)")
    fake_guest(tmp_path, facts)
    result = install(str(tmp_path))
    assert result.returncode == 1, result.stdout
    assert message in result.stderr
    assert not (tmp_path / "usr/local/bin").exists()  # nothing half-installed


def test_missing_interpreter_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh needs root (chroot)")
    result = install("--python", "/usr/bin/python3", str(tmp_path))
    assert result.returncode == 1
    assert "/usr/bin/python3 does not exist in" in result.stderr
