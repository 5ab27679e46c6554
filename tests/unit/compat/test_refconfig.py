"""Reference AA/CDH configs, KBS discovery, and initdata digests (known answers from the reference)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from agent.compat import common
from agent.compat.refconfig import (
    cmdline_value,
    credentials_from_cmdline,
    parse_aa_config,
    parse_cdh_config,
    parse_kbc_params,
    unix_path,
)
from agent.errors import ConfigError
from agent.initdata import binding_value, decode_digest_argument, parse_initdata
from agent.kbs.jwe import KeyAlgorithm


class TestInitdata:
    def test_reference_vector_digest(self, vectors: Path) -> None:
        raw = (vectors / "trustee" / "initdata" / "init-data-with-policy.toml").read_bytes()
        assert len(raw) == 61863
        initdata = parse_initdata(raw)
        assert initdata.algorithm == "sha256"
        assert initdata.digest.hex() == "0deccded0d87ec44702c7330fac3eb936b68dcca5c9f6b5df1fb3480c0b525ac"
        assert list(initdata.data) == ["policy.rego"]
        assert initdata.text.encode() == raw

    @pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
    def test_digest_is_over_the_raw_bytes(self, algorithm: str) -> None:
        raw = f"version = '0.1.0'\nalgorithm = '{algorithm}'   # spacing and comments are measured too\n".encode()
        assert parse_initdata(raw).digest == hashlib.new(algorithm, raw).digest()

    def test_binding_values(self) -> None:
        sha256, sha512 = b"\x01" * 32, b"\x02" * 64
        assert binding_value(sha256, 48) == sha256 + b"\0" * 16  # MRCONFIGID
        assert binding_value(sha512, 48) == sha512[:48]
        assert binding_value(sha512, 32) == sha512[:32]  # HOST_DATA truncates
        assert binding_value(sha256, 32) == sha256

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            (b"algorithm = 'sha256'\n", "`version` is None"),
            (b"version = '0.1.0'\nalgorithm = 'md5'\n", "`algorithm` is 'md5'"),
            (b"version = '0.1.0'\nalgorithm = 'sm3'\n", "'sm3', which this agent does not support"),
            (b"version = '0.1.0'\nalgorithm = 'sha256'\n[data]\nx = 1\n", "`[data]` must map names to strings"),
            (b"version = \n", "not valid UTF-8 TOML"),
            (b"\xff\xfe", "not valid UTF-8 TOML"),
        ],
    )
    def test_invalid(self, raw: bytes, message: str) -> None:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_initdata(raw)

    def test_digest_argument(self) -> None:
        assert decode_digest_argument(base64.b64encode(b"\x07" * 48).decode()) == b"\x07" * 48
        with pytest.raises(ConfigError, match="not standard base64"):
            decode_digest_argument("a-b_")
        with pytest.raises(ConfigError, match="expected 1 to 64"):
            decode_digest_argument(base64.b64encode(b"x" * 65).decode())


class TestAaConfig:
    def test_reference_keys(self) -> None:
        raw = b"""
[token_configs.kbs]
url = "https://kbs.example:8080/"
cert = "-----BEGIN CERTIFICATE-----\\nMII...\\n-----END CERTIFICATE-----"
tee_key_algorithm = "ECDH-ES+A256KW-P521"
[token_configs.coco_as]
url = "http://as.example:50004"
[eventlog_config]
init_pcr = 17
enable_eventlog = false
[log]
level = "warn"
"""
        settings = parse_aa_config(raw, source="aa.toml")
        assert settings.kbs_url == "https://kbs.example:8080"
        assert settings.kbs_cert is not None
        assert settings.tee_key_algorithm is KeyAlgorithm.EC_P521
        assert settings.coco_as_url == "http://as.example:50004"
        assert settings.log_level == "warning"
        assert settings.tee is None

    def test_empty_file_is_valid(self) -> None:
        assert parse_aa_config(b"", source="aa.toml").kbs_url is None

    def test_json_config(self) -> None:
        settings = parse_aa_config(b'{"token_configs": {"kbs": {"url": "http://k:1"}}}', source="aa.json")
        assert settings.kbs_url == "http://k:1"

    def test_own_tee_key(self) -> None:
        assert parse_aa_config(b'[cvm_agent]\ntee = "sample"\n', source="aa.toml").tee == "sample"

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            (b"[token_configs.kbs]\ncert = 'x'\n", "`token_configs.kbs.url` is required"),
            (b"[token_configs.kbs]\nurl = 'ftp://x'\n", "`token_configs.kbs.url` is 'ftp://x'"),
            (b"[token_configs.kbs]\nurl = 'http://x'\ntee_key_algorithm = 'RSA1_5'\n", "tee_key_algorithm"),
            (b"[eventlog_config]\ninit_pcr = 99\n", "`eventlog_config.init_pcr` is 99"),
            (b"[eventlog_config]\nenable_eventlog = 'yes'\n", "enable_eventlog"),
            (b"[cvm_agent]\ntee = 'fallback'\n", "`cvm_agent.tee` is 'fallback'"),
            (b"[log]\nlevel = 'loud'\n", "`log.level` is 'loud'"),
        ],
    )
    def test_invalid(self, raw: bytes, message: str) -> None:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            parse_aa_config(raw, source="aa.toml")


class TestCdhConfig:
    def test_reference_keys(self) -> None:
        raw = b"""
socket = "unix:///run/confidential-containers/cdh.sock"
skip_sealed_secret_verification = true
[aa]
aa_socket = "unix:///run/aa.sock"
[kbc]
name = "cc_kbc"
url = "http://1.2.3.4:8080"
kbs_cert = "PEM"
[[credentials]]
resource_uri = "kbs:///default/credential/test"
path = "/run/confidential-containers/cdh/kbs/test"
[image]
max_concurrent_layer_downloads_per_image = 5
"""
        settings = parse_cdh_config(raw, source="cdh.toml")
        assert settings.kbc is not None
        assert (settings.kbc.name, settings.kbc.url) == ("cc_kbc", "http://1.2.3.4:8080")
        assert settings.aa_socket == "unix:///run/aa.sock"
        assert settings.credentials[0].path == "/run/confidential-containers/cdh/kbs/test"
        assert settings.skip_sealed_secret_verification
        assert settings.ignored == ()
        assert settings.image is not None
        assert settings.image.max_concurrent_layer_downloads_per_image == 5

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            (b"[kbc]\nname = 'eaa_kbc'\n", "`kbc.name` is 'eaa_kbc'"),
            (b"[kbc]\nname = 'cc_kbc'\n", "`kbc.url` is required"),
            (b"socket = 'tcp://x'\n", "`socket` is 'tcp://x'"),
            (b"[[credentials]]\nresource_uri = 'kbs:///a/b/c'\npath = '/etc/shadow'\n", "must be under"),
            (
                b"[[credentials]]\nresource_uri = 'kbs:///a/b/c'\npath = '/run/confidential-containers/cdh/kbs/../x'\n",
                "must be under",
            ),
            (b"skip_sealed_secret_verification = 'yes'\n", "skip_sealed_secret_verification"),
        ],
    )
    def test_invalid(self, raw: bytes, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            parse_cdh_config(raw, source="cdh.toml")


class TestDiscovery:
    def test_cmdline_value_last_wins(self) -> None:
        line = "quiet agent.aa_kbc_params=cc_kbc::http://a:1 x=y agent.aa_kbc_params=cc_kbc::http://b:2"
        assert cmdline_value(line, "agent.aa_kbc_params") == "cc_kbc::http://b:2"
        assert cmdline_value(line, "missing") is None

    @pytest.mark.parametrize(
        ("text", "name", "url"),
        [
            ("cc_kbc::http://10.0.0.1:8080", "cc_kbc", "http://10.0.0.1:8080"),
            ("offline_fs_kbc::", "offline_fs_kbc", None),
        ],
    )
    def test_kbc_params(self, text: str, name: str, url: str | None) -> None:
        params = parse_kbc_params(text, source="AA_KBC_PARAMS")
        assert (params.name, params.url) == (name, url)

    @pytest.mark.parametrize("text", ["cc_kbc", "cc_kbc::", "eaa_kbc::x", "cc_kbc::10.0.0.1:8080"])
    def test_bad_kbc_params(self, text: str) -> None:
        with pytest.raises(ConfigError, match="AA_KBC_PARAMS"):
            parse_kbc_params(text, source="AA_KBC_PARAMS")

    def test_order_config_env_cmdline(self, monkeypatch: pytest.MonkeyPatch) -> None:
        line = "agent.aa_kbc_params=cc_kbc::http://cmdline:1"
        monkeypatch.setenv("AA_KBC_PARAMS", "cc_kbc::http://env:1")
        assert common.discover_kbc("http://config:1", line)[0].url == "http://config:1"  # type: ignore[union-attr]
        assert common.discover_kbc(None, line)[0].url == "http://env:1"  # type: ignore[union-attr]
        monkeypatch.delenv("AA_KBC_PARAMS")
        assert common.discover_kbc(None, line) == (
            parse_kbc_params("cc_kbc::http://cmdline:1", source="x"),
            "kernel command line",
        )
        assert common.discover_kbc(None, "quiet") == (None, "none")

    def test_cdh_resources_from_cmdline(self) -> None:
        line = "cdh.kbs_resources=kbs:///a/b/c::/run/confidential-containers/cdh/kbs/c,kbs:///d/e/f::/run/confidential-containers/cdh/kbs/f"
        assert [c.resource_uri for c in credentials_from_cmdline(line)] == ["kbs:///a/b/c", "kbs:///d/e/f"]
        with pytest.raises(ConfigError, match="not <uri>::<path>"):
            credentials_from_cmdline("cdh.kbs_resources=kbs:///a/b/c")

    @pytest.mark.parametrize(
        ("address", "path"),
        [("unix:///run/x.sock", "/run/x.sock"), ("unix:/run/x.sock", "/run/x.sock"), ("/run/x.sock", "/run/x.sock")],
    )
    def test_unix_path(self, address: str, path: str) -> None:
        assert unix_path(address, key="k") == path

    def test_kernel_cmdline_file(self, tmp_path: Path) -> None:
        (tmp_path / "cmdline").write_text("a=b\n")
        assert common.read_kernel_cmdline(str(tmp_path / "cmdline")) == "a=b\n"
        with pytest.raises(ConfigError, match="--kernel-cmdline"):
            common.read_kernel_cmdline(str(tmp_path / "missing"))
