"""Runtime measurement through the reference drop-ins: `attestation-agent` over ttRPC (AA config
`[eventlog_config]`, `AAEL_PATH`, the `tee_paths` flags of `serve`) and `api-server-rest`'s `POST /aa/aael`,
on emulated TDX and on the sample TEE (NOT_SUPPORTED / NOT_ENABLED)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.api._gen import attestation_agent_pb2 as aa
from agent.api.ttrpc import TtrpcClient
from agent.tee import ccel, tdx
from tests.fakes.tsmfs import MountedTsm, TsmFsOptions, mounted_tsm
from tests.integration.test_measurement import CCEL, GCP, entry_bytes, extend_value

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
AA = "attestation_agent.AttestationAgentService"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def running(argv: list[str], log: Path, *, env: dict[str, str] | None = None, ready: object = None) -> Iterator[None]:
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 20
        while not _ready(ready):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=20)


def _ready(ready: object) -> bool:
    if isinstance(ready, Path):
        return ready.exists()
    assert isinstance(ready, int)
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", ready)) == 0


@contextmanager
def guest(
    tmp_path: Path, aa_toml: str, tee_args: list[str], env: dict[str, str] | None = None
) -> Iterator[tuple[Path, int]]:
    """attestation-agent and api-server-rest (features `all`) as kata-agent starts them."""
    config = tmp_path / "aa.toml"
    config.write_text(aa_toml)
    aa_socket = tmp_path / "aa" / "attestation-agent.sock"
    port = free_port()
    aa_argv = [
        str(BIN / "attestation-agent"),
        "--attestation_sock",
        f"unix://{aa_socket}",
        *tee_args,
        "-c",
        str(config),
    ]
    rest_argv = [str(BIN / "api-server-rest"), "--features", "all", "--bind", f"127.0.0.1:{port}"]
    rest_argv += ["--aa_addr", f"unix://{aa_socket}"]
    with (
        running(aa_argv, tmp_path / "aa.log", env=env, ready=aa_socket),
        running(rest_argv, tmp_path / "rest.log", ready=port),
    ):
        yield aa_socket, port


def ttrpc_extend(sock: Path, domain: str, operation: str, content: str, index: int | None = None) -> int:
    import asyncio

    request = aa.ExtendRuntimeMeasurementRequest(Domain=domain, Operation=operation, Content=content)
    if index is not None:
        request.RegisterIndex = index

    async def go() -> bytes:
        async with TtrpcClient(str(sock)) as client:
            return await client.call(AA, "ExtendRuntimeMeasurement", request.SerializeToString(), timeout=10)

    result: int = aa.ExtendRuntimeMeasurementResponse.FromString(asyncio.run(go())).Result
    return result


def ttrpc_evidence(sock: Path) -> dict[str, str]:
    import asyncio

    async def go() -> bytes:
        async with TtrpcClient(str(sock)) as client:
            payload = aa.GetEvidenceRequest(RuntimeData=b"n" * 32).SerializeToString()
            return await client.call(AA, "GetEvidence", payload, timeout=30)

    evidence: dict[str, str] = json.loads(aa.GetEvidenceResponse.FromString(asyncio.run(go())).Evidence)
    return evidence


def post_aael(port: int, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/aa/aael", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def tdx_mount(tmp_path: Path) -> Iterator[MountedTsm]:
    options = TsmFsOptions(measurements=True, tdx_template=str(GCP / "quote_v4_padded8000.dat"))
    with mounted_tsm(options, workdir=tmp_path) as mount:
        yield mount


def test_tdx_dropin_ttrpc_and_rest(tmp_path: Path, tdx_mount: MountedTsm) -> None:
    aael_path = tmp_path / "run" / "attestation-agent" / "eventlog"
    tee_args = [
        "--tee",
        "tdx",
        "--tsm-report-dir",
        str(tdx_mount.root),
        "--tdx-measurements-dir",
        str(tdx_mount.measurements),
        "--ccel-data",
        str(CCEL),
    ]
    toml = "[eventlog_config]\nenable_eventlog = true\ninit_pcr = 17\n"
    registers = tdx_mount.rtmrs()
    with guest(tmp_path, toml, tee_args, env={"AAEL_PATH": str(aael_path)}) as (sock, port):
        assert ttrpc_extend(sock, "github.com/confidential-containers", "PullImage", '{"image":"x", "digest":"y"}') == 0
        assert ttrpc_extend(sock, "d", "o", "pcr eight", 8) == 0
        status, body = post_aael(port, json.dumps({"domain": "w", "operation": "Start", "content": "a b"}).encode())
        assert (status, json.loads(body)) == (200, {"success": "true"})
        assert post_aael(port, b'{"domain": "w"}')[0] == 400
        evidence = ttrpc_evidence(sock)
    texts = [
        (3, 'github.com/confidential-containers PullImage {"image":"x", "digest":"y"}'),
        (2, "d o pcr eight"),
        (3, "w Start a b"),
    ]
    for rtmr, text in texts:
        registers[rtmr] = extend_value(registers[rtmr], text)
    assert tdx_mount.rtmrs() == registers
    entries = b"".join(entry_bytes(rtmr, text) for rtmr, text in texts)
    assert aael_path.read_bytes() == entries
    quote = tdx.parse_quote(base64.b64decode(evidence["quote"]))
    cc_eventlog = base64.b64decode(evidence["cc_eventlog"])
    assert cc_eventlog == ccel.trim_ccel(CCEL.read_bytes()) + entries + b"\xff" * 8
    assert list(quote.body.rtmrs) == registers


@pytest.mark.parametrize(
    ("toml", "result", "message"),
    [
        (
            "[eventlog_config]\nenable_eventlog = true\n",
            aa.NOT_SUPPORTED,
            "The platform does not support runtime measurement",
        ),
        ("", aa.NOT_ENABLED, "Attestation Agent does not enable eventlog recording"),
    ],
)
def test_sample_dropin_answers(tmp_path: Path, toml: str, result: int, message: str) -> None:
    with guest(tmp_path, toml, ["--tee", "sample"], env={"AAEL_PATH": str(tmp_path / "eventlog")}) as (sock, port):
        assert ttrpc_extend(sock, "d", "o", "c") == result
        assert ttrpc_extend(sock, "d", "o", "c", 3) == result
        status, body = post_aael(port, b'{"domain":"d","operation":"o","content":"c"}')
    assert (status, json.loads(body)) == (200, {"success": "false", "message": message})
    assert not (tmp_path / "eventlog").exists()
