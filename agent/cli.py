"""The `cvm-agent` command. Orchestrator.

Exit codes: 0 success; 1 the agent, the TEE or the KBS reported a failure; 2 usage or configuration error;
3 the agent is not reachable on its socket.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from agent.argparsing import ArgumentParser

__all__ = ["EXIT_FAILURE", "EXIT_UNREACHABLE", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_EPILOG = "exit codes: 0 success, 1 agent/TEE/KBS failure, 2 usage or configuration error, 3 agent not reachable"


def _socket_default() -> str:
    from agent.config import DEFAULT_SOCKET

    return os.environ.get("CVM_AGENT_SOCKET", DEFAULT_SOCKET)


_TEE_PATH_HELP = {  # what each path is; the defaults come from `agent.config.TeePaths`, their one home
    "tsm_report_dir": "configfs-tsm report directory",
    "tdx_guest_device": "TDX guest device",
    "sev_guest_device": "SEV-SNP guest device",
    "sev_guest_platform_dir": "SEV-SNP platform device directory",
    "tdx_measurements_dir": "TDX measurement registers, Linux >= 6.16",
    "ccel_data": "CCEL event log data",
}


def _add_tee_flags(p: argparse.ArgumentParser, *, config: bool = True) -> None:
    """--config, --tee, --snp-vmpl and one flag per `tee_paths` key."""
    from agent.config import TEE_PATH_FLAGS, TeePaths

    defaults = TeePaths()
    if config:
        p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--tee", metavar="NAME", help="TEE to use: auto (default: probe tdx, then snp), tdx, snp or sample")
    p.add_argument("--snp-vmpl", metavar="N", type=int, help="VMPL of SNP reports, 0..3 (overrides snp.vmpl)")
    for key, flag in TEE_PATH_FLAGS.items():
        help_text = f"{_TEE_PATH_HELP[key]} (default {getattr(defaults, key)})"
        p.add_argument(flag, metavar="PATH", dest=f"path_{key}", help=help_text)


def _add_daemon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", help="listen address: PATH, unix:PATH or loopback HOST:PORT")
    p.add_argument("--kbs-url", metavar="URL", help="Key Broker Service URL (overrides kbs.url)")
    p.add_argument("--ttrpc-aa-socket", metavar="PATH", help="also serve the AA over ttRPC here ('' = off)")
    p.add_argument("--ttrpc-cdh-socket", metavar="PATH", help="also serve the data hub over ttRPC here ('' = off)")
    p.add_argument("--kbs-cert", metavar="PEM_FILE", help="extra CA certificate for HTTPS to the KBS")
    p.add_argument(
        "--initdata-toml",
        metavar="FILE",
        help="initdata TOML: checked against MRCONFIGID/HOST_DATA at start (exit 1 on a mismatch), sent to the KBS",
    )
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    _add_tee_flags(p)


def _add_client_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="agent socket (default $CVM_AGENT_SOCKET or /run/confidential-containers/cvm-agent/agent.sock)",
    )


def _add_image_commands(sub: Any) -> None:
    """Image-layer keys and sealed secrets through the agent: unwrap, unseal."""
    p = sub.add_parser("unwrap", help="unwrap an image layer key through the agent (debug image pulls)", epilog=_EPILOG)
    _add_client_socket(p)
    p.add_argument(
        "annotation",
        metavar="ANNOTATION",
        help="the layer's org.opencontainers.image.enc.keys.provider.attestation-agent value (base64), or @FILE",
    )
    p = sub.add_parser("unseal", help="unseal a sealed secret through the agent", epilog=_EPILOG)
    _add_client_socket(p)
    p.add_argument("secret", metavar="SEALED", help="sealed.<header>.<payload>.<signature>, or @FILE")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cvm-agent",
        description="Guest attestation agent for confidential VMs (TDX, SEV-SNP, sample mock TEE).",
        epilog=_EPILOG,
    )
    parser.add_argument("-V", "--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the agent daemon", epilog=_EPILOG)
    _add_daemon_flags(p)
    p = sub.add_parser("check-config", help="print the configuration the daemon would use", epilog=_EPILOG)
    _add_daemon_flags(p)

    p = sub.add_parser("tee", help="print the TEE type the running agent uses, or --probe here", epilog=_EPILOG)
    _add_client_socket(p)
    p.add_argument(
        "--probe",
        action="store_true",
        help="run TEE detection here (no agent needed) and print the TEE and one line per interface checked",
    )
    _add_tee_flags(p)
    p = sub.add_parser("evidence", help="print evidence from the running agent", epilog=_EPILOG)
    _add_client_socket(p)
    p.add_argument("--runtime-data", metavar="B64", default="", help="report data, standard base64 (default empty)")
    p.add_argument(
        "--decode",
        nargs="?",
        const="",
        metavar="FILE",
        help="print the fields of the evidence (or of FILE: TDX quote, TD report, SNP report, evidence JSON; - for "
        "stdin) instead of the raw JSON",
    )
    p.add_argument("--json", action="store_true", help="with --decode: print the decoded fields as JSON")
    p.add_argument(
        "--local",
        action="store_true",
        help="with --decode: take evidence from the TEE directly (no agent), using --config/--tee/path flags",
    )
    _add_tee_flags(p)
    p = sub.add_parser("token", help="print a KBS token and TEE key pair (JSON) from the agent", epilog=_EPILOG)
    _add_client_socket(p)
    p.add_argument("--type", default="kbs", dest="token_type", help="token type (default kbs)")
    p = sub.add_parser("resource", help="fetch a KBS resource through the agent", epilog=_EPILOG)
    _add_client_socket(p)
    p.add_argument("uri", metavar="URI", help="resource URI, e.g. kbs:///default/key/1")
    p.add_argument("-o", "--output", metavar="FILE", help="write the raw bytes to FILE (mode 0600) instead of stdout")

    _add_image_commands(sub)
    from agent import measure_cli

    measure_cli.add_commands(sub, epilog=_EPILOG, client_socket=_add_client_socket, tee_flags=_add_tee_flags)

    from agent.image import command

    command.add_parser(sub, _EPILOG)
    sub.add_parser("version", help="print the version")
    for subparser in sub.choices.values():  # a bad flag is reported with the subcommand's own usage
        subparser.set_defaults(command_parser=subparser)
    return parser


def _error(text: str) -> None:
    print(f"cvm-agent: {text}", file=sys.stderr)


def _load_config(args: argparse.Namespace) -> Any:
    from agent import config

    return config.load(getattr(args, "config", None)).with_overrides(
        tee=getattr(args, "tee", None),
        socket=getattr(args, "socket", None),
        kbs_url=getattr(args, "kbs_url", None),
        kbs_cert=getattr(args, "kbs_cert", None),
        log_level=getattr(args, "log_level", None),
        snp_vmpl=getattr(args, "snp_vmpl", None),
        tee_paths={key: getattr(args, f"path_{key}", None) for key in config.TEE_PATH_FLAGS},
        ttrpc_aa_socket=getattr(args, "ttrpc_aa_socket", None),
        ttrpc_cdh_socket=getattr(args, "ttrpc_cdh_socket", None),
        initdata_toml=getattr(args, "initdata_toml", None),
    )


def _given(args: argparse.Namespace, flag: str) -> bool:
    from agent.config import TEE_PATH_FLAGS

    names = {"--config": "config", "--tee": "tee", "--snp-vmpl": "snp_vmpl"}
    names.update({f: f"path_{k}" for k, f in TEE_PATH_FLAGS.items()})
    return getattr(args, names[flag], None) is not None


def _insecure_modes(cfg: Any) -> list[str]:
    """The insecure modes a configuration asks for, each as `serve` warns about it."""
    warnings = []
    if cfg.tee == "sample":
        from agent.tee.sample import WARNING

        warnings.append(f"tee = sample: {WARNING}")
    if cfg.kbs.insecure_http:
        from agent.config import PLAIN_HTTP_RISK

        warnings.append(f"kbs.url {cfg.kbs.url}: {PLAIN_HTTP_RISK}")
    return warnings


def _probe(args: argparse.Namespace) -> int:
    """`cvm-agent tee --probe`: detection here, in this process; exit 0 when a TEE was found, 1 when none."""
    from agent import log
    from agent.tee.detect import detect

    cfg = _load_config(args)
    log.configure("warning", cfg.log.format)
    detection = detect(cfg.tee_paths)
    print(f"tee: {detection.tee or 'none'}")
    for check in detection.checks:
        print(f"  {check.line()}")
    if cfg.kbs.insecure_http:
        from agent.config import PLAIN_HTTP_RISK

        print(f"kbs: {cfg.kbs.url}\n  warning: {PLAIN_HTTP_RISK}")
    if detection.tee is None:
        print("  (no hardware TEE found; the mock TEE is used only when asked for by name: --tee sample)")
        return EXIT_FAILURE
    if cfg.tee not in ("auto", detection.tee):
        print(f"  (the configuration asks for tee {cfg.tee!r}, which is what `serve` would use)")
    return EXIT_OK


def _local_evidence(args: argparse.Namespace, runtime_data: bytes) -> bytes:
    import asyncio

    from agent import log
    from agent.tee.select import make_attester

    cfg = _load_config(args)
    log.configure("warning", cfg.log.format)
    attester = make_attester(cfg)
    return asyncio.run(attester.get_evidence(runtime_data))


def _decode(args: argparse.Namespace, runtime_data: bytes) -> int:
    """`cvm-agent evidence --decode [FILE]`: decoded fields of a file, of local evidence or of the agent's."""
    from pathlib import Path

    from agent.errors import AgentError
    from agent.tee.decode import decode, format_text

    flags = [f for f in ("--config", "--tee", "--snp-vmpl", *_path_flags()) if _given(args, f)]
    if args.decode and (args.local or runtime_data):
        _error("--decode FILE reads the file; it takes neither --local nor --runtime-data")
        return EXIT_USAGE
    if flags and not args.local:
        _error(f"{flags[0]} applies only with --decode --local (evidence straight from the TEE)")
        return EXIT_USAGE
    try:
        if args.decode == "-":
            data = sys.stdin.buffer.read()
        elif args.decode:
            data = Path(args.decode).read_bytes()
        elif args.local:
            data = _local_evidence(args, runtime_data)
        else:
            data = _agent_evidence(args.socket, runtime_data)
        decoded = decode(data)
    except AgentError as exc:
        _error(exc.diagnostics())
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(decoded, indent=2))
    else:
        sys.stdout.write(format_text(decoded))
    return EXIT_OK


def _path_flags() -> tuple[str, ...]:
    from agent.config import TEE_PATH_FLAGS

    return tuple(TEE_PATH_FLAGS.values())


def _agent_evidence(socket: str | None, runtime_data: bytes) -> bytes:
    from agent.api._gen import attestation_agent_pb2 as aa

    reply = _call(
        socket,
        "/attestation_agent.AttestationAgentService/GetEvidence",
        aa.GetEvidenceRequest(RuntimeData=runtime_data),
        aa.GetEvidenceResponse,
    )
    evidence: bytes = reply.Evidence
    return evidence


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from agent import log
    from agent.app import run
    from agent.errors import AgentError, ConfigError

    cfg = _load_config(args)
    log.configure(cfg.log.level, cfg.log.format, defer=True)  # structlog loads after serving (agent.log)
    try:
        try:
            return asyncio.run(run(cfg, name="agent"))
        finally:
            log.release()  # the lines logged so far come before any report of a failure
    except ConfigError:
        raise  # exit 2, reported by main
    except AgentError as exc:
        _error(exc.diagnostics())
        return EXIT_FAILURE
    except OSError as exc:
        _error(f"cannot start: {exc}")
        return EXIT_FAILURE


def _call(socket: str | None, path: str, request: Any, response_type: Any) -> Any:
    from agent.client import call

    return call(socket or _socket_default(), path, request, response_type)


def _tee_command(args: argparse.Namespace) -> int:
    from agent.api._gen import attestation_agent_pb2 as aa

    if args.probe:
        return _probe(args)
    flags = [f for f in ("--config", "--tee", "--snp-vmpl", *_path_flags()) if _given(args, f)]
    if flags:
        _error(f"{flags[0]} applies only with --probe (the running agent has its own configuration)")
        return EXIT_USAGE
    service = "/attestation_agent.AttestationAgentService/"
    reply = _call(args.socket, service + "GetTeeType", aa.GetTeeTypeRequest(), aa.GetTeeTypeResponse)
    print(reply.tee)
    return EXIT_OK


def _evidence_command(args: argparse.Namespace) -> int:
    try:
        runtime_data = base64.b64decode(args.runtime_data, validate=True)
    except binascii.Error:
        _error("--runtime-data is not valid standard base64")
        return EXIT_USAGE
    if args.decode is not None:
        return _decode(args, runtime_data)
    if args.json or args.local:
        _error("--json and --local apply only with --decode")
        return EXIT_USAGE
    flags = [f for f in ("--config", "--tee", "--snp-vmpl", *_path_flags()) if _given(args, f)]
    if flags:
        _error(f"{flags[0]} applies only with --decode --local")
        return EXIT_USAGE
    evidence = _agent_evidence(args.socket, runtime_data)
    sys.stdout.write(evidence.decode("utf-8", "replace") + "\n")
    return EXIT_OK


def _client(args: argparse.Namespace) -> int:
    from agent.api._gen import api_pb2
    from agent.api._gen import attestation_agent_pb2 as aa

    service = "/attestation_agent.AttestationAgentService/"
    if args.command == "tee":
        return _tee_command(args)
    if args.command == "evidence":
        return _evidence_command(args)
    if args.command == "token":
        reply = _call(
            args.socket,
            service + "GetToken",
            aa.GetTokenRequest(TokenType=args.token_type),
            aa.GetTokenResponse,
        )
        sys.stdout.write(reply.Token.decode("utf-8", "replace") + "\n")
    elif args.command == "unwrap":
        from agent.api._gen import keyprovider_pb2 as kp
        from agent.keyprovider import messages

        text = _text_arg(args.annotation)
        try:
            packet = base64.b64decode(text, validate=True)
        except binascii.Error:
            _error("ANNOTATION is not valid standard base64")
            return EXIT_USAGE
        request = kp.KeyProviderKeyWrapProtocolInput(KeyProviderKeyWrapProtocolInput=messages.unwrap_request(packet))
        reply = _call(
            args.socket, "/keyprovider.KeyProviderService/UnWrapKey", request, kp.KeyProviderKeyWrapProtocolOutput
        )
        optsdata = messages.parse_reply(reply.KeyProviderKeyWrapProtocolOutput)
        sys.stdout.write(optsdata.decode("utf-8", "replace") + "\n")
    elif args.command == "unseal":
        reply = _call(
            args.socket,
            "/api.SealedSecretService/UnsealSecret",
            api_pb2.UnsealSecretInput(secret=_text_arg(args.secret).encode()),
            api_pb2.UnsealSecretOutput,
        )
        sys.stdout.buffer.write(reply.plaintext)
        sys.stdout.buffer.flush()
    elif args.command == "resource":
        reply = _call(
            args.socket,
            "/api.GetResourceService/GetResource",
            api_pb2.GetResourceRequest(ResourcePath=args.uri),
            api_pb2.GetResourceResponse,
        )
        if args.output:
            from agent.files import write_private

            write_private(args.output, reply.Resource)  # a new 0600 file, whatever was there before
        else:
            sys.stdout.buffer.write(reply.Resource)
            sys.stdout.buffer.flush()
    return EXIT_OK


def _text_arg(value: str) -> str:
    """A command-line value, or the contents of @FILE."""
    if value.startswith("@"):
        from pathlib import Path

        return Path(value[1:]).read_text().strip()
    return value.strip()


def _version() -> str:
    from agent import __version__

    return f"cvm-agent {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    from agent.lifecycle import gc_paused

    with gc_paused():  # `serve` resumes it once serving (agent.lifecycle)
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from agent.errors import ConfigError

    try:
        if args.command == "version":
            print(_version())
            return EXIT_OK
        if args.command == "serve":
            return _serve(args)
        if args.command == "check-config":
            cfg = _load_config(args)
            print(json.dumps(cfg.describe(), indent=2))
            for warning in _insecure_modes(cfg):  # what `serve` would warn about, on stderr: stdout stays JSON
                print(f"cvm-agent: warning: {warning}", file=sys.stderr)
            return EXIT_OK
        if args.command in ("measure", "eventlog"):
            from agent import measure_cli

            return measure_cli.run(args, load_config=_load_config, call=_call)
        if args.command == "pull":
            from agent.image import command

            return command.run(args, args.socket or _socket_default())
        return _client(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except OSError as exc:  # a file named on the command line cannot be read or written
        where = f" {exc.filename}" if exc.filename else ""
        _error(f"cannot use{where}: {exc.strerror or 'input/output error'}")
        return EXIT_USAGE
    except _client_errors() as exc:
        return _report_client_error(exc)
    except Exception as exc:  # a bug: say so, with the place, never the values
        from agent.log import crash_summary

        _error(f"internal error: {crash_summary(exc)}; please report it")
        return EXIT_FAILURE


def _client_errors() -> tuple[type[BaseException], ...]:
    from agent.client import AgentUnreachable, CallFailed

    return (AgentUnreachable, CallFailed)


def _report_client_error(exc: BaseException) -> int:
    from agent.client import AgentUnreachable

    _error(str(exc))
    return EXIT_UNREACHABLE if isinstance(exc, AgentUnreachable) else EXIT_FAILURE
