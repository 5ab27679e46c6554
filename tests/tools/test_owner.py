"""`cvm-tools keyprovider` checks every option at start and exits 2 naming the problem, never echoing a key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cvm_tools.keyprovider.owner import OwnerOptions, build_provider

from agent.config import ListenAddress
from agent.errors import ConfigError

LISTEN = ListenAddress(host="127.0.0.1", port=1)
NOT_PEM = b"this is not a PEM key but a secret the crash line must never show 0123456789"


def options(**kwargs: object) -> OwnerOptions:
    return OwnerOptions(listen=LISTEN, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "flag", "message"),
    [
        ({}, "--kek-file", "no KEK source"),
        ({"kid": "default/image-kek/x", "kek_dir": "."}, "--kid", "is not a resource URI"),
        ({"kid": "kbs:///default/tls/key", "kek_dir": "."}, "--kid", "is outside --register-prefix"),
        ({"register_prefix": "kbs:///", "kek_dir": "."}, "--register-prefix", "is not kbs:///<repo>/"),
        ({"keypath_dir": "/nonexistent/dir"}, "--keypath-dir", "is not a directory"),
        ({"kbs_url": "http://127.0.0.1:1"}, "--kbs-url", "needs exactly one of --admin-key or --admin-token-file"),
    ],
)
def test_bad_options_are_refused_at_start(kwargs: dict[str, object], flag: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        build_provider(options(**kwargs))
    assert caught.value.key == flag


def test_non_pem_admin_key_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "admin.pem").write_bytes(NOT_PEM)
    with pytest.raises(ConfigError, match="--admin-key is not an unencrypted PEM private key"):
        build_provider(options(kbs_url="http://127.0.0.1:1", admin_key_file=str(tmp_path / "admin.pem")))


def test_command_exits_2_and_never_prints_the_key(tmp_path: Path) -> None:
    (tmp_path / "admin.pem").write_bytes(NOT_PEM)
    result = subprocess.run(
        [sys.executable, "-m", "cvm_tools.cli", "keyprovider", "--listen", "127.0.0.1:1", "--kbs-url",
         "http://127.0.0.1:1", "--admin-key", str(tmp_path / "admin.pem")],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == b"cvm-tools: --admin-key is not an unencrypted PEM private key\n"
    assert b"secret" not in result.stdout + result.stderr
