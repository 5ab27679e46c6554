"""The `cvm-agent` command as users run it: daemon process, signals, readiness, client commands, exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cvm_tools.devkbs.server import DevKbsServer

from agent.config import PLAIN_HTTP_RISK
from agent.tee.sample import WARNING as SAMPLE_WARNING
from tests.integration.conftest import SECRET
from tests.integration.hw_fixtures import HwDaemon

pytestmark = pytest.mark.integration


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, timeout=60, check=check)


def tools(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "cvm_tools.cli", *args], capture_output=True, timeout=60, check=False)


Daemon = HwDaemon  # `cvm-agent serve` in a subprocess, ready through NOTIFY_SOCKET


@pytest.fixture
def daemon(tmp_path: Path, dev_kbs: DevKbsServer) -> Iterator[Daemon]:
    running = Daemon(tmp_path, "--tee", "sample", "--kbs-url", dev_kbs.url, "--log-level", "info")
    running.wait_ready()
    yield running
    running.stop()


def test_ready_means_accepting_calls(daemon: Daemon) -> None:
    # READY=1 was received by the fixture; the very first call must succeed without any retry.
    result = cli("tee", "--socket", daemon.socket)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"sample\n"


def test_client_commands(daemon: Daemon, tmp_path: Path) -> None:
    evidence = cli("evidence", "--socket", daemon.socket, "--runtime-data", "aGVsbG8=")
    assert json.loads(evidence.stdout) == {"svn": "1", "report_data": "aGVsbG8="}
    resource = cli("resource", "kbs:///default/key/1", "--socket", daemon.socket)
    assert resource.returncode == 0
    assert resource.stdout == SECRET
    out = tmp_path / "secret.bin"
    out.write_bytes(b"an older, world-readable file")
    out.chmod(0o644)
    old_umask = os.umask(0)  # inherited by the CLI process
    try:
        assert cli("resource", "kbs:///default/key/1", "--socket", daemon.socket, "-o", str(out)).returncode == 0
    finally:
        os.umask(old_umask)
    assert out.read_bytes() == SECRET
    assert out.stat().st_mode & 0o777 == 0o600
    token = cli("token", "--socket", daemon.socket)
    assert set(json.loads(token.stdout)) == {"token", "tee_keypair"}


def test_exit_codes(daemon: Daemon, tmp_path: Path) -> None:
    missing = cli("resource", "kbs:///default/key/nope", "--socket", daemon.socket)
    assert missing.returncode == 1
    assert b"PluginInternalError" in missing.stderr
    malformed = cli("resource", "kbs:///a/../b", "--socket", daemon.socket)
    assert malformed.returncode == 1
    assert b"INVALID_ARGUMENT" in malformed.stderr
    unreachable = cli("tee", "--socket", str(tmp_path / "nobody.sock"))
    assert unreachable.returncode == 3
    assert b"not reachable" in unreachable.stderr
    assert cli("evidence", "--socket", daemon.socket, "--runtime-data", "!!").returncode == 2
    assert cli("no-such-command").returncode == 2


def test_kbs_down_is_not_reported_as_agent_unreachable(tmp_path: Path) -> None:
    from tests.integration.test_kata_dropin import free_port

    running = Daemon(tmp_path, "--tee", "sample", "--kbs-url", f"http://127.0.0.1:{free_port()}")
    try:
        running.wait_ready()
        result = cli("resource", "kbs:///default/key/1", "--socket", running.socket)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(b"cvm-agent: UNAVAILABLE: ")
        assert b"not reachable at" not in result.stderr
    finally:
        assert running.stop() == 0


@pytest.mark.parametrize("binary", ["cvm-agent", "attestation-agent", "confidential-data-hub", "api-server-rest"])
def test_every_binary_answers_version(binary: str) -> None:
    from agent import __version__

    for flag in ("--version", "-V"):
        result = subprocess.run(
            [Path(sys.executable).parent / binary, flag], capture_output=True, timeout=60, check=False
        )
        assert result.returncode == 0
        assert result.stdout.startswith(f"{binary} {__version__}".encode())


def test_a_bad_flag_shows_the_subcommand_usage() -> None:
    result = cli("resource", "kbs:///default/key/1", "--bogus")
    assert result.returncode == 2
    assert result.stderr.startswith(b"usage: cvm-agent resource ")
    assert result.stderr.endswith(b"error: unrecognized arguments: --bogus\n")


def test_a_missing_file_is_named_without_exception_text(tmp_path: Path) -> None:
    result = cli("unseal", f"@{tmp_path / 'nope.txt'}", "--socket", str(tmp_path / "x.sock"))
    assert result.returncode == 2
    assert result.stderr == f"cvm-agent: cannot use {tmp_path / 'nope.txt'}: No such file or directory\n".encode()


def test_an_unusable_listen_address_is_named(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("serve", "--tee", "sample", "--socket", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"cvm-agent: cannot listen on 127.0.0.1:{port}: Address already in use".encode() in result.stderr
    assert b"add_port" not in result.stderr
    assert b"Traceback" not in result.stderr
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = cli("serve", "--tee", "sample", "--socket", str(blocked / "agent.sock"))
    assert result.returncode == 2
    assert f"cannot listen on {blocked / 'agent.sock'}: Not a directory".encode() in result.stderr


def test_sigterm_stops_cleanly_and_removes_socket(tmp_path: Path, dev_kbs: DevKbsServer) -> None:
    running = Daemon(tmp_path, "--tee", "sample", "--kbs-url", dev_kbs.url)
    running.wait_ready()
    assert Path(running.socket).exists()
    assert running.stop() == 0
    assert not Path(running.socket).exists()
    assert "agent.stopped" in running.log


def test_sigint_also_stops(tmp_path: Path, dev_kbs: DevKbsServer) -> None:
    running = Daemon(tmp_path, "--tee", "sample", "--kbs-url", dev_kbs.url)
    running.wait_ready()
    running.process.send_signal(signal.SIGINT)
    assert running.stop() == 0
    assert not Path(running.socket).exists()


def test_startup_warnings_and_json_logs(daemon: Daemon) -> None:
    cli("tee", "--socket", daemon.socket)
    time.sleep(0.2)
    lines = [json.loads(line) for line in daemon.log.splitlines()]
    events = [line["event"] for line in lines]
    assert "tee.sample.insecure" in events
    assert "kbs.insecure_http" in events
    assert "rpc" in events


def test_no_tee_is_not_a_silent_fallback(tmp_path: Path) -> None:
    result = cli("serve", "--socket", str(tmp_path / "x.sock"), "--tee", "auto")
    assert result.returncode == 1
    assert b"--tee sample" in result.stderr
    assert not (tmp_path / "x.sock").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tee", "bogus"], b"`--tee` is 'bogus'"),
        (["--kbs-url", "ftp://x"], b"`--kbs-url` is 'ftp://x'"),
        (["--socket", "10.1.2.3:50002"], b"TCP listeners must be on loopback"),
        (["--config", "/nonexistent.toml"], b"cannot be read"),
    ],
)
def test_invalid_config_fails_at_start(args: list[str], message: bytes) -> None:
    result = cli("serve", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_check_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('tee = "sample"\n[kbs]\nurl = "http://127.0.0.1:1"\n')
    result = cli("check-config", "--config", str(config), "--kbs-url", "https://kbs.example")
    assert result.returncode == 0
    assert json.loads(result.stdout)["kbs"]["url"] == "https://kbs.example"
    assert result.stderr.splitlines() == [b"cvm-agent: warning: tee = sample: " + SAMPLE_WARNING.encode()]


def test_check_config_warns_of_plain_http_on_stderr(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[kbs]\nurl = "http://127.0.0.1:1"\n')
    result = cli("check-config", "--config", str(config))
    assert result.returncode == 0
    assert json.loads(result.stdout)["kbs"]["url"] == "http://127.0.0.1:1"  # stdout is the JSON alone
    assert result.stderr.splitlines() == [
        b"cvm-agent: warning: kbs.url http://127.0.0.1:1: " + PLAIN_HTTP_RISK.encode()
    ]


def test_help_mentions_every_command() -> None:
    result = cli("--help")
    for command in (b"serve", b"tee", b"evidence", b"token", b"resource", b"check-config", b"unwrap", b"unseal"):
        assert command in result.stdout
    assert b"exit codes" in result.stdout
    for owner_command in ("dev-kbs", "keyprovider", "seal"):  # the tools distribution's, never the guest's
        assert re.search(rf"^\s+{owner_command}\s".encode(), result.stdout, re.MULTILINE) is None
        refused = cli(owner_command)
        assert refused.returncode == 2
        assert b"invalid choice" in refused.stderr
    listed = tools("--help").stdout
    for command in (b"dev-kbs", b"keyprovider", b"seal"):
        assert command in listed


async def test_one_daemon_serves_ttrpc_on_the_reference_sockets_too(tmp_path: Path, dev_kbs: DevKbsServer) -> None:
    from agent.api._gen import api_pb2
    from agent.api._gen import attestation_agent_pb2 as aa
    from agent.api.ttrpc import TtrpcClient

    aa_sock, cdh_sock = tmp_path / "t" / "aa.sock", tmp_path / "t" / "cdh.sock"
    running = Daemon(
        tmp_path, "--tee", "sample", "--kbs-url", dev_kbs.url,
        "--ttrpc-aa-socket", f"unix://{aa_sock}", "--ttrpc-cdh-socket", str(cdh_sock),
    )  # fmt: skip
    try:
        running.wait_ready()
        async with TtrpcClient(str(aa_sock)) as client:
            reply = await client.call("attestation_agent.AttestationAgentService", "GetTeeType", b"", timeout=10)
            assert aa.GetTeeTypeResponse.FromString(reply).tee == "sample"
        async with TtrpcClient(str(cdh_sock)) as client:
            request = api_pb2.GetResourceRequest(ResourcePath="kbs:///default/key/1").SerializeToString()
            reply = await client.call("api.GetResourceService", "GetResource", request, timeout=30)
            assert api_pb2.GetResourceResponse.FromString(reply).Resource == SECRET
        assert cli("tee", "--socket", running.socket).stdout == b"sample\n"  # gRPC as before
        assert (aa_sock.stat().st_mode & 0o777) == 0o600
    finally:
        assert running.stop() == 0
    assert not aa_sock.exists()
    assert not cdh_sock.exists()


def test_ttrpc_socket_must_be_a_unix_path() -> None:
    result = cli("check-config", "--ttrpc-aa-socket", "127.0.0.1:9")
    assert result.returncode == 2
    assert b"expected an absolute unix socket path" in result.stderr


def test_seal_unseal_and_unwrap_commands(daemon: Daemon, tmp_path: Path, resources: Path) -> None:
    import base64

    from agent.keyprovider import annotation

    prefix = tmp_path / "sealing"
    assert tools("seal", "--generate-key", str(prefix)).returncode == 0
    assert (prefix.with_suffix(".pem").stat().st_mode & 0o777) == 0o600
    (resources / "default" / "sealing").mkdir()
    (resources / "default" / "sealing" / "pub").write_bytes(prefix.with_suffix(".jwk").read_bytes())
    sealed = tools(
        "seal", "--signing-key", str(prefix.with_suffix(".pem")), "--kid", "kbs:///default/sealing/pub",
        "--name", "kbs:///default/key/1",
    )  # fmt: skip
    assert sealed.returncode == 0, sealed.stderr
    assert sealed.stdout.startswith(b"sealed.")
    (tmp_path / "secret.txt").write_bytes(sealed.stdout)
    unsealed = cli("unseal", f"@{tmp_path / 'secret.txt'}", "--socket", daemon.socket)
    assert unsealed.returncode == 0, unsealed.stderr
    assert unsealed.stdout == SECRET
    assert tools("seal", "--kid", "x").returncode == 2

    kek = bytes(range(32))
    (resources / "default" / "image-kek").mkdir()
    (resources / "default" / "image-kek" / "k").write_bytes(kek)
    packet = annotation.wrap(kek, b'{"symkey":"c2VjcmV0"}', kid="kbs:///default/image-kek/k").to_v1_json()
    unwrapped = cli("unwrap", base64.b64encode(packet).decode(), "--socket", daemon.socket)
    assert unwrapped.returncode == 0, unwrapped.stderr
    assert unwrapped.stdout == b'{"symkey":"c2VjcmV0"}\n'
    assert cli("unwrap", "not base64!", "--socket", daemon.socket).returncode == 2


def test_keyprovider_command_serves_wrapkey(tmp_path: Path) -> None:
    import json

    import grpc

    from agent.api._gen import keyprovider_pb2 as kp
    from tests.integration.test_kata_dropin import free_port
    from tests.unit.keyprovider.test_service import OPTSDATA, go_wrap_request

    (tmp_path / "kek").write_bytes(bytes(32))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cvm_tools.cli", "keyprovider", "--listen", f"127.0.0.1:{port}", "--kek-file",
         str(tmp_path / "kek"), "--kid", "kbs:///default/image-kek/fixed", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert b'"attestation-agent": {"grpc": "127.0.0.1:' in banner
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wrap: Any = channel.unary_unary(
                "/keyprovider.KeyProviderService/WrapKey",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=kp.KeyProviderKeyWrapProtocolOutput.FromString,
            )
            reply = wrap(
                kp.KeyProviderKeyWrapProtocolInput(KeyProviderKeyWrapProtocolInput=go_wrap_request({})), timeout=30
            )
        packet = bytes(json.loads(reply.KeyProviderKeyWrapProtocolOutput)["keywrapresults"]["annotation"])
        from agent.keyprovider import annotation

        assert annotation.unwrap(bytes(32), annotation.parse_packet(packet)) == OPTSDATA
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        assert process.stdout is not None
        process.stdout.close()
