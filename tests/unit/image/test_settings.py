"""The `[image]` keys: cvm-agent's config, the reference CDH config (also as initdata), the kernel command line."""

from __future__ import annotations

import re
import tomllib

import pytest

from agent.compat.refconfig import image_config_from_cmdline, parse_cdh_config
from agent.config import from_mapping
from agent.errors import ConfigError
from agent.image.settings import DEFAULT_WORK_DIR, ImageConfig, parse_image_table
from agent.initdata import parse_initdata

CDH_TOML = """
socket = "unix:///run/confidential-containers/cdh.sock"
[kbc]
name = "cc_kbc"
url = "http://10.0.0.1:8080"
[image]
work_dir = "/run/image-work/"
image_security_policy_uri = "kbs:///default/security-policy/test"
image_security_policy = '{"default": [], "transports": {}}'
authenticated_registry_credentials_uri = "kbs:///default/credential/auth"
max_concurrent_layer_downloads_per_image = 2
extra_root_certificates = ["-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n"]
some_future_key = 1
[image.image_pull_proxy]
https_proxy = "http://proxy:3128"
no_proxy = "localhost"
[image.registry_config]
unqualified-search-registries = ["docker.io"]
[[image.registry_config.registry]]
location = "localhost:5000"
insecure = true
"""


class TestImageTable:
    def test_reference_cdh_keys(self) -> None:
        image = parse_cdh_config(CDH_TOML.encode(), source="cdh.toml").image
        assert image is not None
        assert image.work_dir == "/run/image-work"
        assert image.image_security_policy_uri == "kbs:///default/security-policy/test"
        assert image.authenticated_registry_credentials_uri == "kbs:///default/credential/auth"
        assert image.max_concurrent_layer_downloads_per_image == 2
        assert (image.https_proxy, image.http_proxy, image.no_proxy) == ("http://proxy:3128", None, "localhost")
        assert image.registry_config is not None
        assert image.registry_config["registry"][0]["location"] == "localhost:5000"
        assert len(image.extra_root_certificates) == 1

    def test_delivered_through_initdata(self) -> None:
        initdata = f"version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"cdh.toml\" = '''{CDH_TOML}'''\n"
        document = tomllib.loads(parse_initdata(initdata.encode()).text)
        image = parse_cdh_config(document["data"]["cdh.toml"].encode(), source="cdh.toml").image
        assert image is not None
        assert image.image_security_policy == '{"default": [], "transports": {}}'

    def test_agent_config_is_strict(self) -> None:
        assert from_mapping({"image": {"work_dir": "/w"}}).image.work_dir == "/w"
        assert from_mapping({}).image == ImageConfig()
        with pytest.raises(ConfigError, match=re.escape("`image.some_future_key` is not a known key")):
            from_mapping({"image": {"some_future_key": 1}})

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            ({"work_dir": "relative"}, "`image.work_dir` is 'relative', expected an absolute path"),
            ({"max_concurrent_layer_downloads_per_image": 0}, "expected 1 to 64"),
            ({"image_pull_proxy": {"https_proxy": "proxy:1"}}, "expected an http(s):// or socks5:// URL"),
            ({"extra_root_certificates": ["nope"]}, "is not a list of PEM certificates"),
            ({"registry_config": {"registry": [{"blocked": True}]}}, "has neither `prefix` nor `location`"),
            ({"pull_timeout_s": 0}, "`image.pull_timeout_s` is 0"),
            ({"image_security_policy_uri": 3}, "`image.image_security_policy_uri` is 3"),
        ],
    )
    def test_rejects(self, table: dict[str, object], message: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_image_table(table, strict=False)


class TestKernelCmdline:
    def test_fallbacks(self) -> None:
        cmdline = (
            "console=ttyS0 agent.https_proxy=http://p:1 agent.no_proxy=a,b agent.image_registry_auth=kbs:///r/c/auth "
            "agent.image_policy_file=kbs:///r/p/policy agent.enable_signature_verification=true"
        )
        image = image_config_from_cmdline(cmdline)
        assert image.https_proxy == "http://p:1"
        assert image.no_proxy == "a,b"
        assert image.authenticated_registry_credentials_uri == "kbs:///r/c/auth"
        assert image.image_security_policy_uri == "kbs:///r/p/policy"
        assert image.work_dir == DEFAULT_WORK_DIR

    def test_policy_only_with_signature_verification(self) -> None:
        assert image_config_from_cmdline("agent.image_policy_file=/p.json").image_security_policy_uri is None
