"""Initdata bound at start-up on emulated TDX (MRCONFIGID) and SNP (HOST_DATA), checked again by the KBS.

`attestation-agent --initdata-toml` hashes the raw TOML with its `algorithm`, compares it with the platform
field, and refuses to start on a mismatch (socket removed, reference message plus both values). On a match the
TOML travels to the KBS as `init-data`, whose verifier compares the same digest with the field inside the
quote or report.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cvm_tools.devkbs.server import DevKbsServer

from agent.api._gen import attestation_agent_pb2 as aa
from agent.api.ttrpc import TtrpcClient
from agent.initdata import MISMATCH_MESSAGE
from tests.fakes.tsmfs import DEFAULT_SNP_TEMPLATE, TsmFsOptions, mounted_tsm
from tests.integration.hw_fixtures import path_flags
from tests.integration.test_kata_dropin import KataLauncher
from tests.paths import VECTORS_DIR as VECTORS

pytestmark = pytest.mark.integration

TDX_QUOTE = VECTORS / "hw" / "tdx" / "ccel_gcp_cos113" / "quote_v4_padded8000.dat"
QUOTE_MRCONFIGID = slice(48 + 184, 48 + 184 + 48)  # quote v4 header + TD quote body offset of MRCONFIGID
SNP_HOST_DATA = slice(0xC0, 0xE0)


def initdata(algorithm: str) -> bytes:
    return (
        f'version = "0.1.0"\nalgorithm = "{algorithm}"\n\n[data]\n'
        '"policy.rego" = "package agent_policy\\ndefault AllowRequestsFailingPolicy := true\\n"\n'
    ).encode()


@pytest.fixture
def short_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cvm-", dir="/tmp") as folder:
        yield Path(folder)


def start_aa(root: Path, tmp_path: Path, flags: list[str], toml: bytes, kbs_url: str) -> tuple[KataLauncher, Path]:
    (root / "initdata.toml").write_bytes(toml)
    (root / "aa.toml").write_text(f'[token_configs.kbs]\nurl = "{kbs_url}"\n')
    sock = root / "aa.sock"
    launcher = KataLauncher(tmp_path)
    launcher.spawn(
        "attestation-agent",
        [
            "--attestation_sock",
            f"unix://{sock}",
            "--initdata-toml",
            str(root / "initdata.toml"),
            "-c",
            str(root / "aa.toml"),
            *flags,
        ],
        socket_path=sock,
    )
    return launcher, sock


async def get_token(sock: Path) -> dict[str, str]:
    async with TtrpcClient(str(sock)) as client:
        reply = await client.call(
            "attestation_agent.AttestationAgentService",
            "GetToken",
            aa.GetTokenRequest(TokenType="kbs").SerializeToString(),
            timeout=30,
        )
    token: dict[str, str] = json.loads(aa.GetTokenResponse.FromString(reply).Token)
    return token


def tdx_measurements(folder: Path, mrconfigid: bytes) -> Path:
    folder.mkdir()
    (folder / "mrconfigid").write_bytes(mrconfigid)
    (folder / "mrtd:sha384").write_bytes(bytes(48))
    for i in range(4):
        (folder / f"rtmr{i}:sha384").write_bytes(bytes(48))
    return folder


@pytest.mark.parametrize("matches", [True, False], ids=["match", "mismatch"])
async def test_tdx_mrconfigid(tmp_path: Path, short_root: Path, dev_kbs: DevKbsServer, matches: bool) -> None:
    toml = initdata("sha384")
    digest = hashlib.sha384(toml).digest()
    quote = bytearray(TDX_QUOTE.read_bytes())
    quote[QUOTE_MRCONFIGID] = digest  # the TD was launched with this initdata
    (tmp_path / "quote.dat").write_bytes(bytes(quote))
    platform = digest if matches else bytes(48)
    folder = tdx_measurements(tmp_path / "measurements", platform)
    options = TsmFsOptions(provider="tdx_guest", tdx_template=str(tmp_path / "quote.dat"))
    with mounted_tsm(options, workdir=tmp_path) as tsm:
        flags = [*path_flags(tmp_path, tsm_root=tsm.root), "--tdx-measurements-dir", str(folder)]
        launcher, sock = start_aa(short_root, tmp_path, flags, toml, dev_kbs.url)
        try:
            run = launcher.launched["attestation-agent"]
            if matches:
                assert run.socket_after_s is not None, run.log.read_text()
                token = await get_token(sock)  # the dev KBS checks init-data against MRCONFIGID in the quote
                claims = dev_kbs.core.verify_token(token["token"])
                assert claims is not None
                tdx_claims = claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
                assert tdx_claims["init_data"] == base64.b64encode(digest).decode()
            else:
                assert run.process.wait(timeout=20) == 1
                log = run.log.read_text()
                assert MISMATCH_MESSAGE in log
                assert bytes(48).hex() in log
                assert digest.hex() in log
                assert not sock.exists()
        finally:
            launcher.stop_all()


@pytest.mark.parametrize("matches", [True, False], ids=["match", "mismatch"])
async def test_snp_host_data(tmp_path: Path, short_root: Path, dev_kbs: DevKbsServer, matches: bool) -> None:
    toml = initdata("sha512")
    digest = hashlib.sha512(toml).digest()  # HOST_DATA holds the first 32 bytes of a longer digest
    report = bytearray(DEFAULT_SNP_TEMPLATE.read_bytes())
    report[SNP_HOST_DATA] = digest[:32] if matches else b"\x5a" * 32
    (tmp_path / "report.bin").write_bytes(bytes(report))
    options = TsmFsOptions(provider="sev_guest", snp_template=str(tmp_path / "report.bin"))
    with mounted_tsm(options, workdir=tmp_path) as tsm:
        flags = path_flags(tmp_path, tsm_root=tsm.root, sev_platform=True)
        launcher, sock = start_aa(short_root, tmp_path, flags, toml, dev_kbs.url)
        try:
            run = launcher.launched["attestation-agent"]
            if matches:
                assert run.socket_after_s is not None, run.log.read_text()
                token = await get_token(sock)
                assert dev_kbs.core.verify_token(token["token"]) is not None
            else:
                assert run.process.wait(timeout=20) == 1
                log = run.log.read_text()
                assert MISMATCH_MESSAGE in log
                assert ("5a" * 32) in log
                assert not sock.exists()
        finally:
            launcher.stop_all()


async def test_sample_tee_ignores_initdata_with_a_log_line(
    tmp_path: Path, short_root: Path, dev_kbs: DevKbsServer
) -> None:
    launcher, sock = start_aa(short_root, tmp_path, ["--tee", "sample"], initdata("sha256"), dev_kbs.url)
    try:
        run = launcher.launched["attestation-agent"]
        assert run.socket_after_s is not None
        token = await get_token(sock)  # init-data is still sent; the sample verifier only records a claim
        assert dev_kbs.core.verify_token(token["token"]) is not None
        assert "initdata.unbound" in run.log.read_text()
    finally:
        launcher.stop_all()


@pytest.mark.parametrize("matches", [True, False], ids=["match", "mismatch"])
async def test_serve_binds_initdata_like_the_drop_in(
    tmp_path: Path, short_root: Path, dev_kbs: DevKbsServer, matches: bool
) -> None:
    """`cvm-agent serve --initdata-toml` goes through the same composition root as the drop-in: the binding is
    checked before READY=1, a mismatch exits 1 with the reference's message, and the KBS sees the document."""
    import grpc

    from tests.integration.hw_fixtures import HwDaemon

    toml = initdata("sha384")
    digest = hashlib.sha384(toml).digest()
    quote = bytearray(TDX_QUOTE.read_bytes())
    quote[QUOTE_MRCONFIGID] = digest
    (tmp_path / "quote.dat").write_bytes(bytes(quote))
    (short_root / "initdata.toml").write_bytes(toml)
    folder = tdx_measurements(tmp_path / "measurements", digest if matches else bytes(48))
    options = TsmFsOptions(provider="tdx_guest", tdx_template=str(tmp_path / "quote.dat"))
    with mounted_tsm(options, workdir=tmp_path) as tsm:
        flags = [*path_flags(tmp_path, tsm_root=tsm.root), "--tdx-measurements-dir", str(folder)]
        daemon = HwDaemon(
            short_root, "--kbs-url", dev_kbs.url, "--initdata-toml", str(short_root / "initdata.toml"), *flags
        )
        if not matches:
            assert daemon.process.wait(timeout=30) == 1
            assert daemon.stop() == 1
            assert MISMATCH_MESSAGE in daemon.log
            assert digest.hex() in daemon.log
            assert not Path(daemon.socket).exists()
            return
        try:
            daemon.wait_ready()
            async with grpc.aio.insecure_channel(f"unix:{daemon.socket}") as channel:
                get_token = channel.unary_unary(
                    "/attestation_agent.AttestationAgentService/GetToken",
                    request_serializer=aa.GetTokenRequest.SerializeToString,
                    response_deserializer=aa.GetTokenResponse.FromString,
                )
                reply = await get_token(aa.GetTokenRequest(TokenType="kbs"), timeout=30)
            claims = dev_kbs.core.verify_token(json.loads(reply.Token)["token"])
            assert claims is not None
            tdx_claims = claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
            assert tdx_claims["init_data"] == base64.b64encode(digest).decode()
        finally:
            assert daemon.stop() == 0
