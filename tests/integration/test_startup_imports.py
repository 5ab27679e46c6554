"""Each entry point starts, answers its first call and stops without loading what that call does not need.

Kata gives each guest component a few seconds for its socket and a pod VM a few GiB: cryptography, the HTTP client
and the KBS client load at the first KBS call, grpc only where gRPC is served, the image-pull modules at the first
PullImage, structlog at the first line logged, and only the chosen TEE's attester. Each case runs the real
console-script `main` in a subprocess (`tests/startup_probe.py`) with a KBS configured, makes the first call, stops
the process with SIGTERM and walks its `sys.modules`. Not timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import libcrypto

REPO = Path(__file__).resolve().parents[2]
KBS_URL = "http://127.0.0.1:9"  # configured but never contacted: nothing in these runs calls the KBS

NEVER_AT_START = (
    *("cryptography", "httpx", "httpcore", "h11"),
    *("agent.kbs.http", "agent.kbs.jwe", "agent.jws", "agent.image.pull"),
    # protobuf's Python descriptor machinery: generated modules build through agent.api.protobuild
    *("google.protobuf.descriptor_pool", "google.protobuf.internal.python_message", "google.protobuf.text_format"),
)
# at --log-level error nothing is logged: structlog never loads (agent.log); the KBS client loads at the first KBS
# call; argparse's terminal measuring (shutil) is not used (agent.argparsing)
NOT_BEFORE_USE = ("structlog", "agent.kbs.client", "agent.kbs.protocol", "agent.kbs.passport", "shutil", "uuid")
IMAGE_WORLD = ("agent.image.registries", "agent.image.reference", "agent.image.store", "agent.image.registry")
NOT_FOR_SAMPLE = ("agent.tee.tdx_attester", "agent.tee.snp_attester", "agent.tee.tdx", "agent.tee.snp")
EVENT_LOG = ("agent.tee.ccel", "agent.tee.eventlog", "agent.tee.journal")  # only where runtime measurement is on


def _probe(tmp_path: Path, address: str, kind: str, argv: list[str], *, linger_s: float = 0) -> set[str]:
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.startup_probe", str(out), address, kind, "--", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "STARTUP_PROBE_LINGER_S": str(linger_s)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["answered"], f"{argv[0]} never answered its first call: {result.stderr[-2000:]}"
    return set(report["modules"])


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve_argv(tmp_path: Path, *, preload: bool) -> tuple[str, list[str]]:
    sock = str(tmp_path / "agent.sock")
    config = tmp_path / "agent.toml"
    config.write_text(f'[kbs]\nurl = "{KBS_URL}"\npreload = {str(preload).lower()}\n')
    return sock, [
        "cvm-agent",
        "serve",
        "--config",
        str(config),
        "--tee",
        "sample",
        "--socket",
        sock,
        "--log-level",
        "error",
    ]


def test_serve_loads_no_kbs_crypto_or_http_before_a_kbs_call(tmp_path: Path) -> None:
    sock, argv = _serve_argv(tmp_path, preload=False)
    modules = _probe(tmp_path, sock, "grpc", argv, linger_s=1.0)
    assert "grpc" in modules  # it serves gRPC: the walk sees what the process loaded
    unwanted = NEVER_AT_START + NOT_FOR_SAMPLE + EVENT_LOG + NOT_BEFORE_USE + IMAGE_WORLD + ("agent.api.ttrpc",)
    assert _loaded(modules, unwanted) == []


def test_serve_preloads_the_kbs_client_once_serving(tmp_path: Path) -> None:
    """`kbs.preload` (the default): the KBS client's HTTP (h11) and JWE crypto load in the background after
    start-up, so the first GetResource does not wait for them (the same walk, while the agent idles). The crypto is
    the platform libcrypto's where Python's is OpenSSL 3, pyca/cryptography elsewhere; nothing verifies a signature
    (agent.jws). httpx is the image pull's (registries), not the KBS client's: it stays unloaded."""
    sock, argv = _serve_argv(tmp_path, preload=True)
    modules = _probe(tmp_path, sock, "grpc", argv, linger_s=5.0)
    assert {"h11", "agent.kbs.http", "agent.kbs.jwe", "agent.libcrypto"} <= modules
    unwanted: tuple[str, ...] = ("agent.image.pull", "httpx", "httpcore", "anyio", "agent.jws", *NOT_FOR_SAMPLE)
    if libcrypto.load() is not None:
        unwanted += ("cryptography",)
    else:
        assert "cryptography" in modules
    assert _loaded(modules, unwanted) == []


def test_attestation_agent_loads_no_grpc_crypto_or_http(tmp_path: Path) -> None:
    sock = str(tmp_path / "aa.sock")
    config = tmp_path / "aa.toml"
    config.write_text(f'[token_configs.kbs]\nurl = "{KBS_URL}"\n[cvm_agent]\ntee = "sample"\n')
    argv = ["attestation-agent", "-a", f"unix://{sock}", "-c", str(config), "--log-level", "error"]
    modules = _probe(tmp_path, sock, "ttrpc-aa", argv)
    assert "agent.tee.sample" in modules
    unwanted = ("grpc", *NEVER_AT_START, *NOT_FOR_SAMPLE, *EVENT_LOG, *NOT_BEFORE_USE, *IMAGE_WORLD)
    assert _loaded(modules, (*unwanted, "agent.keyprovider", "agent.api._gen.api_pb2")) == []


def test_data_hub_loads_no_grpc_crypto_http_or_image_pull(tmp_path: Path) -> None:
    cdh_sock, aa_sock = tmp_path / "cdh.sock", tmp_path / "aa.sock"
    config = tmp_path / "cdh.toml"
    config.write_text(
        f'socket = "unix://{cdh_sock}"\n[aa]\naa_socket = "unix://{aa_sock}"\n'
        f'[kbc]\nname = "cc_kbc"\nurl = "{KBS_URL}"\n'
    )
    argv = ["confidential-data-hub", "-c", str(config), "--log-level", "error"]
    argv += ["--ocicrypt-config", str(tmp_path / "ocicrypt.json")]
    modules = _probe(tmp_path, str(cdh_sock), "ttrpc-cdh", argv)
    assert "agent.api.ttrpc" in modules  # the passport backend's client of the AA socket was built
    unwanted = ("grpc", *NEVER_AT_START, *NOT_BEFORE_USE, *IMAGE_WORLD, "agent.tee.registry", "agent.tee.select")
    assert _loaded(modules, (*unwanted, "agent.keyprovider.service", "agent.keyprovider.annotation")) == []


@pytest.mark.parametrize("features", ["resource", "all"])
def test_api_server_rest_loads_no_grpc_crypto_or_http(tmp_path: Path, features: str) -> None:
    address = f"127.0.0.1:{_free_port()}"
    argv = ["api-server-rest", "-b", address, "-f", features, "--log-level", "error"]
    argv += ["-a", f"unix://{tmp_path / 'aa.sock'}", "-c", f"unix://{tmp_path / 'cdh.sock'}"]
    modules = _probe(tmp_path, address, "rest", argv)
    unwanted = ("grpc", *NEVER_AT_START, *NOT_BEFORE_USE, "agent.tee.registry", "agent.service")
    assert _loaded(modules, (*unwanted, "agent.app", "agent.config", "tomllib")) == []
