"""rootfs/extension/components.toml read as kata-agent reads it (tests/integration/kata_extension.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.kata_extension import LEVELS, kata_context, plan, substitute

REPO = Path(__file__).resolve().parents[2]
AA_SOCKET = "/run/confidential-containers/attestation-agent/attestation-agent.sock"


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    """An extension root holding only the manifest, as kata sees it under /run/kata-extensions/coco."""
    (tmp_path / "etc/kata-extensions").mkdir(parents=True)
    shutil.copy(REPO / "rootfs/extension/components.toml", tmp_path / "etc/kata-extensions/components.toml")
    return tmp_path


def test_full_plan_with_initdata(mount: Path) -> None:
    ctx = kata_context(extension="coco", initdata=True, rest_features="resource")
    aa, cdh, rest = plan(mount, "coco", LEVELS["api-server-rest"], ctx)
    assert aa.id == "attestation-agent"
    assert aa.path == "/run/kata-extensions/coco/usr/local/bin/attestation-agent"
    assert aa.args == [
        "--attestation_sock",
        f"unix://{AA_SOCKET}",
        "--initdata-toml",
        "/run/confidential-containers/initdata/initdata.toml",
    ]
    assert aa.config == "/run/confidential-containers/initdata/aa.toml"
    assert aa.wait_socket == AA_SOCKET
    assert aa.timeout_secs == 6
    assert aa.env == []
    assert cdh.path == "/run/kata-extensions/coco/usr/local/bin/confidential-data-hub"
    assert cdh.args == []
    assert cdh.config == "/run/confidential-containers/initdata/cdh.toml"
    assert cdh.env == [("OCICRYPT_KEYPROVIDER_CONFIG", "/run/kata-extensions/coco/etc/ocicrypt_config.json")]
    assert cdh.wait_socket == "/run/confidential-containers/cdh.sock"
    assert rest.path == "/run/kata-extensions/coco/usr/local/bin/api-server-rest"
    assert rest.args == ["--features", "resource"]
    assert rest.wait_socket is None
    assert rest.timeout_secs == 0


def test_no_initdata_no_initdata_flag(mount: Path) -> None:
    ctx = kata_context(extension="coco", initdata=False, rest_features="all")
    aa = plan(mount, "coco", LEVELS["attestation-agent"], ctx)[0]
    assert aa.args == ["--attestation_sock", f"unix://{AA_SOCKET}"]


@pytest.mark.parametrize(("procs", "ids"), [
    ("none", []),
    ("attestation-agent", ["attestation-agent"]),
    ("confidential-data-hub", ["attestation-agent", "confidential-data-hub"]),
    ("api-server-rest", ["attestation-agent", "confidential-data-hub", "api-server-rest"]),
])  # fmt: skip
def test_guest_components_procs_levels(mount: Path, procs: str, ids: list[str]) -> None:
    ctx = kata_context(extension="coco", initdata=False, rest_features="resource")
    assert [s.id for s in plan(mount, "coco", LEVELS[procs], ctx)] == ids


def test_launch_timeout_follows_kata_config(mount: Path) -> None:
    ctx = kata_context(extension="coco", initdata=False, rest_features="resource", launch_timeout=15)
    assert [s.timeout_secs for s in plan(mount, "coco", 3, ctx)] == [15, 15, 0]


def test_nvidia_variant_fails_loudly(mount: Path) -> None:
    ctx = kata_context(extension="coco", initdata=False, rest_features="resource") | {"attester_variant": "nvidia"}
    with pytest.raises(ValueError, match="no variant 'nvidia'"):
        plan(mount, "coco", 1, ctx)
    ctx["attester_variant"] = ""  # empty selects the default variant
    assert plan(mount, "coco", 1, ctx)[0].path.endswith("/usr/local/bin/attestation-agent")


def test_substitution_is_fail_closed() -> None:
    assert substitute("a${x}b", {"x": "1"}) == "a1b"
    with pytest.raises(ValueError, match="unknown substitution variable"):
        substitute("${nope}", {})
    with pytest.raises(ValueError, match="unterminated"):
        substitute("${open", {"open": "x"})
