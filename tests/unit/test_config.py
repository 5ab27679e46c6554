"""Configuration validation: every bad value names its key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from agent.kbs.jwe import KeyAlgorithm


def test_defaults() -> None:
    cfg = config.load(None)
    assert cfg.tee == "auto"
    assert cfg.socket is not None
    assert cfg.socket.unix_path == "/run/confidential-containers/cvm-agent/agent.sock"
    assert cfg.kbs.url is None
    assert cfg.kbs.tee_key_algorithm is KeyAlgorithm.EC_P256
    assert cfg.kbs.preload


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        """
tee = "sample"
socket = "unix:///tmp/x.sock"
grpc_listen = ["127.0.0.1:50002", "[::1]:50003", "localhost:50004"]
[kbs]
url = "https://kbs.example:8080/"
cert = "/etc/ca.pem"
tee_key_algorithm = "RSA-OAEP-256"
timeout_s = 5
max_response_bytes = 4096
token_refresh_margin_s = 0
preload = false
[log]
level = "DEBUG"
format = "json"
"""
    )
    cfg = config.load(path)
    assert cfg.tee == "sample"
    assert cfg.socket is not None
    assert cfg.socket.unix_path == "/tmp/x.sock"
    assert [str(a) for a in cfg.grpc_listen] == ["127.0.0.1:50002", "[::1]:50003", "127.0.0.1:50004"]
    assert cfg.kbs.url == "https://kbs.example:8080"
    assert cfg.kbs.cert_path == "/etc/ca.pem"
    assert cfg.kbs.tee_key_algorithm is KeyAlgorithm.RSA_OAEP_256
    assert cfg.kbs.timeout_s == 5.0
    assert not cfg.kbs.preload
    assert cfg.describe()["kbs"]["preload"] is False
    assert cfg.log.level == "debug"
    assert not cfg.kbs.insecure_http


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tee": "tdx2"}, "`tee` is 'tdx2', expected one of: auto, tdx, snp, sample"),
        ({"teee": "sample"}, "`teee` is not a known key"),
        ({"kbs": {"url": "ftp://x"}}, "`kbs.url` is 'ftp://x', expected an http:// or https:// URL with a host"),
        ({"kbs": {"preload": "yes"}}, "`kbs.preload` is 'yes', expected true or false"),
        ({"kbs": {"url": "http://"}}, "`kbs.url` is 'http://'"),
        ({"kbs": {"url": "http://u:p@h"}}, "credentials are not allowed"),
        ({"kbs": {"url": "http://h:99999"}}, "the port is not valid"),
        ({"kbs": {"url": 5}}, "`kbs.url` is 5"),
        ({"kbs": {"timeout_s": 0}}, "`kbs.timeout_s` is 0, expected a number from 0.1 to 600"),
        ({"kbs": {"timeout_s": True}}, "`kbs.timeout_s` is True"),
        ({"kbs": {"max_response_bytes": 1.5}}, "`kbs.max_response_bytes` is 1.5, expected a whole number"),
        ({"kbs": {"tee_key_algorithm": "RSA1_5"}}, "`kbs.tee_key_algorithm` is 'RSA1_5'"),
        ({"kbs": {"urll": "x"}}, "`kbs.urll` is not a known key"),
        ({"kbs": "x"}, "`kbs` is 'x', expected a table"),
        ({"log": {"level": "trace"}}, "`log.level` is 'trace'"),
        ({"socket": "10.0.0.1:80"}, "TCP listeners must be on loopback"),
        ({"socket": "0.0.0.0:80"}, "TCP listeners must be on loopback"),
        ({"socket": "127.0.0.1:0"}, "port '0' is not in 1..65535"),
        ({"socket": ""}, "`socket` is ''"),
        ({"socket": "/" + "a" * 120}, "at most 107"),
        ({"grpc_listen": "127.0.0.1:1"}, "`grpc_listen` is '127.0.0.1:1', expected a list"),
    ],
)
def test_invalid_values(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(data)
    assert message in str(info.value)


def test_cli_overrides_name_the_flag() -> None:
    cfg = config.Config()
    with pytest.raises(ConfigError, match="`--tee` is 'x'"):
        cfg.with_overrides(tee="x")
    with pytest.raises(ConfigError, match="`--kbs-url`"):
        cfg.with_overrides(kbs_url="nope")
    overridden = cfg.with_overrides(tee="sample", socket="/tmp/s", kbs_url="http://127.0.0.1:1", kbs_cert="/c.pem")
    assert overridden.tee == "sample"
    assert overridden.socket is not None
    assert overridden.socket.unix_path == "/tmp/s"
    assert overridden.kbs.insecure_http
    assert overridden.kbs.cert_path == "/c.pem"


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("tee = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_describe_round_trips_values() -> None:
    described = config.from_mapping({"tee": "sample", "kbs": {"url": "http://127.0.0.1:8080"}}).describe()
    assert described["tee"] == "sample"
    assert described["kbs"]["url"] == "http://127.0.0.1:8080"


def test_tee_names_and_hardware_tables() -> None:
    for name in ("auto", "tdx", "snp", "sample"):
        assert config.from_mapping({"tee": name}).tee == name
    cfg = config.from_mapping(
        {
            "snp": {"vmpl": 2},
            "tee_paths": {"tsm_report_dir": "/emu/tsm/report", "ccel_data": "/emu/CCEL"},
        }
    )
    assert cfg.snp.vmpl == 2
    assert cfg.tee_paths.tsm_report_dir == "/emu/tsm/report"
    assert cfg.tee_paths.ccel_data == "/emu/CCEL"
    assert cfg.tee_paths.sev_guest_device == "/dev/sev-guest"  # untouched keys keep the kernel's path
    described = cfg.describe()
    assert described["snp"] == {"vmpl": 2}
    assert described["tee_paths"]["tsm_report_dir"] == "/emu/tsm/report"
    assert set(described["tee_paths"]) == set(config.TEE_PATH_FLAGS)


def test_default_tee_paths_are_the_kernel_interfaces() -> None:
    paths = config.TeePaths()
    assert paths.describe() == {
        "tsm_report_dir": "/sys/kernel/config/tsm/report",
        "tdx_guest_device": "/dev/tdx_guest",
        "sev_guest_device": "/dev/sev-guest",
        "sev_guest_platform_dir": "/sys/devices/platform/sev-guest",
        "tdx_measurements_dir": "/sys/devices/virtual/misc/tdx_guest/measurements",
        "ccel_data": "/sys/firmware/acpi/tables/data/CCEL",
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"snp": {"vmpl": 4}}, "`snp.vmpl` is 4, expected a whole number from 0 to 3"),
        ({"snp": {"vmpl": True}}, "`snp.vmpl` is True"),
        ({"snp": {"vmpls": 0}}, "`snp.vmpls` is not a known key"),
        ({"tee_paths": {"ccel": "/x"}}, "`tee_paths.ccel` is not a known key"),
        ({"tee_paths": {"ccel_data": "relative/CCEL"}}, "'relative/CCEL', expected an absolute"),
        ({"tee_paths": {"tdx_guest_device": 3}}, "`tee_paths.tdx_guest_device` is 3"),
        ({"tee_paths": "x"}, "`tee_paths` is 'x', expected a table"),
    ],
)
def test_invalid_hardware_values(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(data)
    assert message in str(info.value)


def test_hardware_overrides_name_the_flag() -> None:
    cfg = config.Config()
    with pytest.raises(ConfigError, match="`--snp-vmpl` is 7"):
        cfg.with_overrides(snp_vmpl=7)
    with pytest.raises(ConfigError, match="`--ccel-data` is 'x'"):
        cfg.with_overrides(tee_paths={"ccel_data": "x"})
    with pytest.raises(ValueError, match="unknown tee_paths key"):
        cfg.with_overrides(tee_paths={"nope": "/x"})
    overridden = cfg.with_overrides(
        tee="snp", snp_vmpl=1, tee_paths={"sev_guest_device": "/emu/sev-guest", "tsm_report_dir": None}
    )
    assert (overridden.tee, overridden.snp.vmpl) == ("snp", 1)
    assert overridden.tee_paths.sev_guest_device == "/emu/sev-guest"
    assert overridden.tee_paths.tsm_report_dir == config.TeePaths().tsm_report_dir
