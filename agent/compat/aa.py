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
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.compat.refconfig import AaSettings
    from agent.config import Config

__all__ = ["main"]

# Imports are made where they are used: `main` pauses the collector before the program loads (agent.lifecycle).


def build_parser() -> argparse.ArgumentParser:
    from agent.argparsing import ArgumentParser
    from agent.compat import common
    from agent.compat.refconfig import DEFAULT_AA_SOCKET
    from agent.config import TEE_PATH_FLAGS

    parser = ArgumentParser(
        prog="attestation-agent", description="cvm-agent's drop-in for the reference attestation agent (ttRPC)."
    )
    parser.add_argument("-a", "--attestation_sock", default=DEFAULT_AA_SOCKET, metavar="ADDR", help="unix:///path")
    parser.add_argument("-c", "--config-file", metavar="FILE", help="reference AA config (TOML or .json)")
    parser.add_argument("-i", "--initdata-digest", metavar="B64", help="expected initdata digest, standard base64")
    parser.add_argument("-t", "--initdata-toml", metavar="FILE", help="initdata TOML (wins over -i)")
    parser.add_argument("--tee", help="auto (default), tdx, snp, or sample (the mock TEE, insecure)")
    parser.add_argument("--kernel-cmdline", metavar="PATH", help="read kernel parameters here (default /proc/cmdline)")
    parser.add_argument("--log-level", help="debug, info, warning or error (default: RUST_LOG, then [log] level)")
    common.add_version_flag(parser)
    for key, flag in TEE_PATH_FLAGS.items():  # cvm-agent extensions: point the TEE interfaces at emulators
        parser.add_argument(flag, dest=key, metavar="PATH", help=argparse.SUPPRESS)
    return parser


def _choose_tee(flag: str | None, settings: AaSettings, cmdline: str) -> tuple[str, str]:
    from agent.compat.refconfig import cmdline_value

    if flag is not None:
        return flag, "--tee"
    if settings.tee is not None:
        return settings.tee, "AA config [cvm_agent] tee"
    value = cmdline_value(cmdline, "cvm_agent.tee")
    if value:
        return value, "kernel command line cvm_agent.tee"
    return "auto", "default"


def to_config(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The reference AA's inputs (flags, `-c` config, `AA_KBC_PARAMS`, kernel command line) as a `Config`, and
    the log level they ask for."""
    from agent.compat import common
    from agent.compat.refconfig import AaSettings, parse_aa_config, unix_path
    from agent.config import TEE_PATH_FLAGS, Config, InitdataConfig, KbsConfig, read_input
    from agent.log import get_logger

    log = get_logger("agent.aa")
    settings = AaSettings()
    if args.config_file:
        settings = parse_aa_config(read_input(args.config_file, key="--config-file"), source=args.config_file)
    socket_path = unix_path(args.attestation_sock, key="--attestation_sock")
    cmdline = common.read_kernel_cmdline(args.kernel_cmdline)
    tee, tee_source = _choose_tee(args.tee, settings, cmdline)
    kbc, kbc_source = common.discover_kbc(settings.kbs_url, cmdline)
    url = kbc.url if kbc is not None and kbc.name == "cc_kbc" else None
    if url is None:
        log.warning("kbs.unconfigured", found=kbc_source, hint="GetToken fails without a cc_kbc KBS URL")
    log.info("aa.settings", tee=tee, tee_source=tee_source, kbs=url, kbs_source=kbc_source)
    config = Config(
        socket=None,
        ttrpc_aa_socket=socket_path,
        kbs=KbsConfig(url=url, cert_pem=settings.kbs_cert, tee_key_algorithm=settings.tee_key_algorithm),
        initdata=InitdataConfig(toml=args.initdata_toml, digest=None if args.initdata_toml else args.initdata_digest),
        eventlog=settings.eventlog(),
    ).with_overrides(tee=tee, tee_paths={key: getattr(args, key) for key in TEE_PATH_FLAGS})
    return config, settings.log_level


def main(argv: Sequence[str] | None = None) -> int:
    from agent.lifecycle import gc_paused

    with gc_paused():
        from agent.compat import common

        return common.serve_translated("attestation-agent", "aa", build_parser().parse_args(argv), to_config)
