"""`attestation-agent`: the reference AA's command line, config and ttRPC socket. Orchestrator.

    attestation-agent [-a unix:///run/.../attestation-agent.sock] [-c aa.toml] [-i <b64 digest> | -t initdata.toml]
                      [--tee sample|tdx|snp|auto] [--kernel-cmdline PATH] [--log-level LEVEL]

The socket is bound before any slow work, so kata-agent sees it inside its launch window; calls that touch the
TEE or the KBS wait until the initdata binding was checked. A mismatch removes the socket and exits 1 with the
reference's message. There is no silent fallback to the mock TEE: it must be asked for with `--tee sample`,
`[cvm_agent] tee = "sample"` in the AA config (delivered by initdata), or `cvm_agent.tee=sample` on the kernel
command line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from agent.compat import common
from agent.compat.refconfig import DEFAULT_AA_SOCKET, AaSettings, cmdline_value, parse_aa_config, unix_path
from agent.errors import ConfigError, EvidenceMismatch, NotSupported
from agent.tee.base import Attester

__all__ = ["main"]

log = structlog.get_logger("agent.aa")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attestation-agent", description="cvm-agent's drop-in for the reference attestation agent (ttRPC)."
    )
    parser.add_argument("-a", "--attestation_sock", default=DEFAULT_AA_SOCKET, metavar="ADDR", help="unix:///path")
    parser.add_argument("-c", "--config-file", metavar="FILE", help="reference AA config (TOML or .json)")
    parser.add_argument("-i", "--initdata-digest", metavar="B64", help="expected initdata digest, standard base64")
    parser.add_argument("-t", "--initdata-toml", metavar="FILE", help="initdata TOML (wins over -i)")
    parser.add_argument("--tee", help="auto (default), tdx, snp, or sample (the mock TEE, insecure)")
    parser.add_argument("--kernel-cmdline", metavar="PATH", help="read kernel parameters here (default /proc/cmdline)")
    parser.add_argument("--log-level", help="debug, info, warning or error (default: RUST_LOG, then [log] level)")
    from agent.config import TEE_PATH_FLAGS

    for key, flag in TEE_PATH_FLAGS.items():  # cvm-agent extensions: point the TEE interfaces at emulators
        parser.add_argument(flag, dest=key, metavar="PATH", help=argparse.SUPPRESS)
    return parser


def _choose_tee(flag: str | None, settings: AaSettings, cmdline: str) -> tuple[str, str]:
    if flag is not None:
        return flag, "--tee"
    if settings.tee is not None:
        return settings.tee, "AA config [cvm_agent] tee"
    value = cmdline_value(cmdline, "cvm_agent.tee")
    if value:
        return value, "kernel command line cvm_agent.tee"
    return "auto", "default"


async def run(args: argparse.Namespace) -> int:
    from agent.api.methods import build_methods
    from agent.api.ttrpc_service import build_ttrpc_server
    from agent.config import TEE_PATH_FLAGS, Config
    from agent.initdata import decode_digest_argument, parse_initdata
    from agent.kbs.client import KbsClient
    from agent.service import AttestationAgent
    from agent.tee.select import make_attester

    settings = AaSettings()
    if args.config_file:
        settings = parse_aa_config(_read(args.config_file, "--config-file"), source=args.config_file)
    common.configure_logging(settings.log_level, args.log_level)
    socket_path = unix_path(args.attestation_sock, key="--attestation_sock")
    initdata = (
        parse_initdata(_read(args.initdata_toml, "--initdata-toml"), source=args.initdata_toml)
        if args.initdata_toml
        else None
    )
    digest = (
        initdata.digest
        if initdata
        else (decode_digest_argument(args.initdata_digest) if args.initdata_digest else None)
    )
    cmdline = common.read_kernel_cmdline(args.kernel_cmdline)
    tee, tee_source = _choose_tee(args.tee, settings, cmdline)
    config = Config().with_overrides(tee=tee, tee_paths={key: getattr(args, key) for key in TEE_PATH_FLAGS})

    attester = make_attester(config)
    kbc, kbc_source = common.discover_kbc(settings.kbs_url, cmdline)
    kbs = None
    if kbc is not None and kbc.name == "cc_kbc" and kbc.url:
        kbs = KbsClient(
            url=kbc.url,
            attester=attester,
            key_algorithm=settings.tee_key_algorithm,
            cert_pem=settings.kbs_cert,
            init_data_toml=initdata.text if initdata else None,
        )
        if kbc.url.startswith("http://"):
            log.warning("kbs.insecure_http", url=kbc.url, warning="plain HTTP: the session cookie travels in clear")
    else:
        log.warning("kbs.unconfigured", found=kbc_source, hint="GetToken fails without a cc_kbc KBS URL")
    ready = asyncio.Event()
    if settings.enable_eventlog:
        log.warning("eventlog.unsupported", reason="runtime measurement is not implemented; answering NOT_SUPPORTED")
    agent = AttestationAgent(attester, kbs, ready=ready, eventlog_enabled=settings.enable_eventlog)
    server = build_ttrpc_server(build_methods(agent, None))
    await server.start(socket_path)
    log.info("aa.listening", socket=socket_path, tee=attester.tee, tee_source=tee_source, kbs=kbc.url if kbc else None)
    try:
        if digest is not None and not await _bind_initdata(attester, digest, initdata.algorithm if initdata else None):
            return 1
        ready.set()
        log.info("aa.ready")
        await common.wait_for_stop()
        return 0
    finally:
        await server.close(grace_s=2.0)
        if kbs is not None:
            await kbs.aclose()


async def _bind_initdata(attester: Attester, digest: bytes, algorithm: str | None) -> bool:
    """Compare the initdata digest with the platform's binding; False on a mismatch (already reported)."""
    from agent.initdata import MISMATCH_MESSAGE

    try:
        await attester.bind_init_data(digest)
    except NotSupported:
        log.warning("initdata.unbound", tee=attester.tee, reason="this TEE has no initdata binding; ignored")
    except EvidenceMismatch as exc:
        print(f"attestation-agent: {MISMATCH_MESSAGE} {exc}", file=sys.stderr)
        log.error("initdata.mismatch", detail=str(exc))  # noqa: TRY400 - an expected outcome, no traceback
        return False
    else:
        log.info("initdata.bound", tee=attester.tee, algorithm=algorithm or "digest")
    return True


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        msg = f"{flag} {path!r} cannot be read: {exc.strerror}"
        raise ConfigError(msg, key=flag) from exc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_command("attestation-agent", lambda: run(args))
