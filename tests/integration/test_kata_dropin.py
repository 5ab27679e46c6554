"""A launcher that behaves like kata-agent starts the three drop-in binaries and drives them as a guest does.

kata-agent removes stale socket files, spawns `attestation-agent`, then `confidential-data-hub`, then
`api-server-rest` with its exact flags and environment, and checks once per second whether each socket path
exists, for up to 6 s (guest-api.md §3). Everything runs against the dev KBS on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cvm_tools.devkbs.server import DevKbsServer

from agent.api._gen import api_pb2
from agent.api._gen import attestation_agent_pb2 as aa
from agent.api._gen import keyprovider_pb2 as kp
from agent.api.status import RpcError, StatusCode
from agent.api.ttrpc import TtrpcClient
from agent.keyprovider import annotation
from tests.integration.conftest import SECRET

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
KATA_LAUNCH_TIMEOUT_S = 6
KEK = bytes(range(32))
OPTSDATA = b'{"symkey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","digest":"","cipheroptions":{}}'


@dataclass
class Launched:
    name: str
    process: subprocess.Popen[bytes]
    socket_after_s: float | None
    log: Path


@dataclass
class KataLauncher:
    root: Path
    launched: dict[str, Launched] = field(default_factory=dict)

    def spawn(
        self, name: str, argv: list[str], *, socket_path: Path | None, env: dict[str, str] | None = None
    ) -> Launched:
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()  # kata removes a stale socket file before spawning
        log = self.root / f"{name}.log"
        started = time.monotonic()
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                [str(BIN / name), *argv], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        after: float | None = None
        if socket_path is not None:
            for _ in range(KATA_LAUNCH_TIMEOUT_S + 1):  # kata: check, then sleep one second, up to the timeout
                if socket_path.exists():
                    after = time.monotonic() - started
                    break
                if process.poll() is not None:
                    break
                time.sleep(1)
        launched = Launched(name, process, after, log)
        self.launched[name] = launched
        return launched

    def stop_all(self) -> None:
        for launched in self.launched.values():
            if launched.process.poll() is None:
                launched.process.send_signal(signal.SIGTERM)
        for launched in self.launched.values():
            try:
                launched.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                launched.process.kill()
                launched.process.wait()


@dataclass
class Guest:
    root: Path
    aa_socket: Path
    cdh_socket: Path
    rest_port: int
    launcher: KataLauncher

    def http(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.rest_port}{path}", timeout=30) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_initdata(folder: Path, kbs_url: str, cdh_socket: Path, aa_socket: Path) -> None:
    """What kata-agent writes from the initdata device: initdata.toml byte for byte, plus aa.toml and cdh.toml."""
    aa_toml = f'[token_configs.kbs]\nurl = "{kbs_url}"\n\n[cvm_agent]\ntee = "sample"\n'
    cdh_toml = (
        f'socket = "unix://{cdh_socket}"\n\n[aa]\naa_socket = "unix://{aa_socket}"\n\n'
        f'[kbc]\nname = "cc_kbc"\nurl = "{kbs_url}"\n\n[image]\nmax_concurrent_layer_downloads_per_image = 3\n'
    )
    initdata = (
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f'"aa.toml" = {json.dumps(aa_toml)}\n"cdh.toml" = {json.dumps(cdh_toml)}\n'
    )
    folder.mkdir(parents=True)
    (folder / "initdata.toml").write_text(initdata)
    (folder / "aa.toml").write_text(aa_toml)
    (folder / "cdh.toml").write_text(cdh_toml)


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A short folder for sockets: tmp_path can exceed the 107-byte unix socket path limit."""
    with tempfile.TemporaryDirectory(prefix="cvm-", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture
def guest(tmp_path: Path, short_root: Path, dev_kbs: DevKbsServer, resources: Path) -> Iterator[Guest]:
    (resources / "default" / "image-kek").mkdir(parents=True)
    (resources / "default" / "image-kek" / "layer").write_bytes(KEK)
    run = short_root / "run" / "confidential-containers"
    aa_socket = run / "attestation-agent" / "attestation-agent.sock"
    cdh_socket = run / "cdh.sock"
    initdata_dir = run / "initdata"
    write_initdata(initdata_dir, dev_kbs.url, cdh_socket, aa_socket)
    ocicrypt = tmp_path / "ocicrypt_config.json"
    ocicrypt.write_text(json.dumps({"key-providers": {"attestation-agent": {"ttrpc": f"unix://{cdh_socket}"}}}))
    launcher = KataLauncher(tmp_path)
    port = free_port()
    guest = Guest(tmp_path, aa_socket, cdh_socket, port, launcher)
    try:
        aa_run = launcher.spawn(
            "attestation-agent",
            [
                "--attestation_sock",
                f"unix://{aa_socket}",
                "--initdata-toml",
                str(initdata_dir / "initdata.toml"),
                "-c",
                str(initdata_dir / "aa.toml"),
            ],
            socket_path=aa_socket,
        )
        assert aa_run.socket_after_s is not None, aa_run.log.read_text()
        cdh_run = launcher.spawn(
            "confidential-data-hub",
            ["-c", str(initdata_dir / "cdh.toml")],
            socket_path=cdh_socket,
            env={"OCICRYPT_KEYPROVIDER_CONFIG": str(ocicrypt)},
        )
        assert cdh_run.socket_after_s is not None, cdh_run.log.read_text()
        launcher.spawn(
            "api-server-rest",
            ["--features", "all", "-a", f"unix://{aa_socket}", "-c", f"unix://{cdh_socket}", "-b", f"127.0.0.1:{port}"],
            socket_path=None,  # kata does not wait for it
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        yield guest
    finally:
        launcher.stop_all()


def image_rs_unwrap_request(kid: str) -> bytes:
    """UnWrapKey input as image-rs/ocicrypt-rs sends it to the CDH over ttRPC (guest-api.md §9.3)."""
    packet = annotation.wrap(KEK, OPTSDATA, kid=kid).to_v1_json()
    body = {
        "op": "keyunwrap",
        "keywrapparams": {"ec": None, "optsdata": None},
        "keyunwrapparams": {"dc": None, "annotation": base64.b64encode(packet).decode()},
    }
    return kp.KeyProviderKeyWrapProtocolInput(
        KeyProviderKeyWrapProtocolInput=json.dumps(body).encode()
    ).SerializeToString()


async def cdh_unwrap(socket: Path | str, kid: str) -> bytes:
    """UnWrapKey over ttRPC on cdh.sock as image-rs sends it; the optsdata of the reply."""
    async with TtrpcClient(str(socket)) as client:
        reply = await client.call(
            "keyprovider.KeyProviderService", "UnWrapKey", image_rs_unwrap_request(kid), timeout=50
        )
    output = kp.KeyProviderKeyWrapProtocolOutput.FromString(reply).KeyProviderKeyWrapProtocolOutput
    return bytes(json.loads(output)["keyunwrapresults"]["optsdata"])


async def cdh_get_resource(socket_path: Path, uri: str) -> bytes:
    async with TtrpcClient(str(socket_path)) as client:
        reply = await client.call(
            "api.GetResourceService",
            "GetResource",
            api_pb2.GetResourceRequest(ResourcePath=uri).SerializeToString(),
            timeout=50,
        )
    data: bytes = api_pb2.GetResourceResponse.FromString(reply).Resource
    return data


async def test_kata_launch_and_guest_calls(guest: Guest, dev_kbs: DevKbsServer) -> None:
    for name in ("attestation-agent", "confidential-data-hub"):
        after = guest.launcher.launched[name].socket_after_s
        assert after is not None
        assert after < KATA_LAUNCH_TIMEOUT_S
    assert await cdh_unwrap(guest.cdh_socket, "kbs:///default/image-kek/layer") == OPTSDATA  # image-rs's call
    # GetResource over ttRPC
    assert await cdh_get_resource(guest.cdh_socket, "kbs:///default/key/1") == SECRET
    # the REST API
    assert guest.http("/cdh/resource/default/key/1") == (200, SECRET)
    status, evidence = guest.http("/aa/evidence?runtime_data=hello")
    assert status == 200
    assert json.loads(evidence) == {"svn": "1", "report_data": base64.b64encode(b"hello").decode()}
    status, evidence = guest.http("/aa/evidence?runtime_data=aGk&encoding=base64")
    assert json.loads(evidence)["report_data"] == base64.b64encode(b"hi").decode()
    assert guest.http("/aa/evidence?runtime_data=aGk=&encoding=base64")[0] == 400
    assert guest.http("/aa/evidence?runtime_data=x&encoding=hex")[0] == 400
    status, token = guest.http("/aa/token?token_type=kbs")
    assert status == 200
    assert set(json.loads(token)) == {"token", "tee_keypair"}
    status, info = guest.http("/info")
    assert status == 200
    assert json.loads(info) == {
        "version": json.loads(info)["version"],
        "tee": "sample",
        "additional_tees": [],
        "feature": "all",
    }
    assert guest.http("/nope") == (404, b"URL NOT FOUND")
    # the AA sent the initdata TOML to the KBS: the token carries its init_data claim
    claims = dev_kbs.core.verify_token(json.loads(token)["token"])
    assert claims is not None
    assert "init_data" in claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]


async def test_data_hub_restart_without_restarting_the_agent(guest: Guest) -> None:
    assert await cdh_get_resource(guest.cdh_socket, "kbs:///default/key/1") == SECRET
    aa_pid = guest.launcher.launched["attestation-agent"].process.pid
    cdh = guest.launcher.launched["confidential-data-hub"].process
    cdh.kill()  # no cleanup: the stale socket file stays behind
    cdh.wait()
    assert guest.cdh_socket.exists()
    initdata = guest.cdh_socket.parent / "initdata"
    relaunched = guest.launcher.spawn(
        "confidential-data-hub", ["-c", str(initdata / "cdh.toml")], socket_path=guest.cdh_socket
    )
    assert relaunched.socket_after_s is not None
    assert await cdh_get_resource(guest.cdh_socket, "kbs:///default/key/1") == SECRET
    assert guest.launcher.launched["attestation-agent"].process.pid == aa_pid
    assert guest.launcher.launched["attestation-agent"].process.poll() is None


async def test_reference_statuses_over_ttrpc(guest: Guest) -> None:
    async with TtrpcClient(str(guest.cdh_socket)) as client:
        with pytest.raises(RpcError) as info:
            await client.call("api.SecureMountService", "SecureMount", b"", timeout=10)
        assert info.value.code is StatusCode.UNIMPLEMENTED
        with pytest.raises(RpcError) as info:
            await client.call("api.NoSuchService", "X", b"", timeout=10)
        assert info.value.code is StatusCode.INVALID_ARGUMENT
        assert info.value.message == "api.NoSuchService service does not exist"
        with pytest.raises(RpcError) as info:
            await client.call("api.GetResourceService", "Nope", b"", timeout=10)
        assert info.value.code is StatusCode.UNIMPLEMENTED
        assert info.value.message == "Nope method"
    async with TtrpcClient(str(guest.aa_socket)) as client:
        reply = await client.call("attestation_agent.AttestationAgentService", "GetTeeType", b"", timeout=10)
        assert aa.GetTeeTypeResponse.FromString(reply).tee == "sample"


def run_binary(
    name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / name), *args], capture_output=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False
    )


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("attestation-agent", ["--bogus"], b"unrecognized arguments: --bogus"),
        ("confidential-data-hub", ["--nope", "1"], b"unrecognized arguments: --nope 1"),
        ("api-server-rest", ["--features", "everything"], b"invalid choice: 'everything'"),
        ("attestation-agent", ["--attestation_sock", "tcp://1.2.3.4:5"], b"expected unix:///<absolute path>"),
        ("attestation-agent", ["--initdata-digest", "!!"], b"not standard base64"),
    ],
)
def test_usage_errors_name_the_flag(name: str, args: list[str], message: bytes) -> None:
    result = run_binary(name, *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_no_tee_is_not_a_silent_fallback(short_root: Path) -> None:
    cmdline = short_root / "cmdline"
    cmdline.write_text("console=ttyS0 agent.aa_kbc_params=cc_kbc::http://127.0.0.1:1\n")
    result = run_binary(
        "attestation-agent", "--attestation_sock", f"unix://{short_root}/aa.sock", "--kernel-cmdline", str(cmdline)
    )
    assert result.returncode == 1
    assert b"--tee sample" in result.stderr
    assert not (short_root / "aa.sock").exists()


@pytest.mark.parametrize("source", ["cmdline", "env"])
async def test_kbs_and_tee_from_kernel_cmdline_or_env(short_root: Path, dev_kbs: DevKbsServer, source: str) -> None:
    tmp_path = short_root
    cmdline = tmp_path / "cmdline"
    env: dict[str, str] = {}
    if source == "cmdline":
        cmdline.write_text(f"quiet agent.aa_kbc_params=cc_kbc::{dev_kbs.url} cvm_agent.tee=sample\n")
    else:
        cmdline.write_text("quiet cvm_agent.tee=sample\n")
        env["AA_KBC_PARAMS"] = f"cc_kbc::{dev_kbs.url}"
    sock = tmp_path / "aa.sock"
    launcher = KataLauncher(tmp_path)
    try:
        run = launcher.spawn(
            "attestation-agent",
            ["--attestation_sock", f"unix://{sock}", "--kernel-cmdline", str(cmdline)],
            socket_path=sock,
            env=env,
        )
        assert run.socket_after_s is not None, run.log.read_text()
        async with TtrpcClient(str(sock)) as client:
            reply = await client.call(
                "attestation_agent.AttestationAgentService",
                "GetToken",
                aa.GetTokenRequest(TokenType="kbs").SerializeToString(),
                timeout=30,
            )
        assert set(json.loads(aa.GetTokenResponse.FromString(reply).Token)) == {"token", "tee_keypair"}
    finally:
        launcher.stop_all()
