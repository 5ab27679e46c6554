"""The `cvm-agent` command. Orchestrator.

Exit codes: 0 success; 1 the agent, the TEE or the KBS reported a failure; 2 usage or configuration error;
3 the agent is not reachable on its socket.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["EXIT_FAILURE", "EXIT_UNREACHABLE", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_EPILOG = "exit codes: 0 success, 1 agent/TEE/KBS failure, 2 usage or configuration error, 3 agent not reachable"


def _socket_default() -> str:
    from agent.config import DEFAULT_SOCKET

    return os.environ.get("CVM_AGENT_SOCKET", DEFAULT_SOCKET)


def _add_daemon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--socket", metavar="PATH", help="listen address: PATH, unix:PATH or loopback HOST:PORT")
    p.add_argument("--kbs-url", metavar="URL", help="Key Broker Service URL (overrides kbs.url)")
    p.add_argument("--kbs-cert", metavar="PEM_FILE", help="extra CA certificate for HTTPS to the KBS")
    p.add_argument("--tee", metavar="NAME", help="TEE to use: auto (default) or sample (mock, insecure)")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")


def _add_client_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="agent socket (default $CVM_AGENT_SOCKET or /run/confidential-containers/cvm-agent/agent.sock)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvm-agent",
        description="Guest attestation agent for confidential VMs (TDX, SEV-SNP, sample mock TEE).",
        epilog=_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the agent daemon", epilog=_EPILOG)
    _add_daemon_flags(p)
    p = sub.add_parser("check-config", help="print the configuration the daemon would use", epilog=_EPILOG)
    _add_daemon_flags(p)

    p = sub.add_parser("tee", help="print the TEE type the running agent uses", epilog=_EPILOG)
    _add_client_socket(p)
    p = sub.add_parser("evidence", help="print evidence from the running agent", epilog=_EPILOG)
    _add_client_socket(p)
    p.add_argument("--runtime-data", metavar="B64", default="", help="report data, standard base64 (default empty)")
    p = sub.add_parser("token", help="print a KBS token and TEE key pair (JSON) from the agent", epilog=_EPILOG)
    _add_client_socket(p)
    p.add_argument("--type", default="kbs", dest="token_type", help="token type (default kbs)")
    p = sub.add_parser("resource", help="fetch a KBS resource through the agent", epilog=_EPILOG)
    _add_client_socket(p)
    p.add_argument("uri", metavar="URI", help="resource URI, e.g. kbs:///default/key/1")
    p.add_argument("-o", "--output", metavar="FILE", help="write the raw bytes to FILE (mode 0600) instead of stdout")

    p = sub.add_parser(
        "dev-kbs", help="run the development KBS (mock-TEE work only; not for production)", epilog=_EPILOG
    )
    p.add_argument("--resources", metavar="DIR", required=True, help="serve DIR/<repo>/<type>/<tag>")
    p.add_argument("--host", default="127.0.0.1", help="listen host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="listen port (default 8080; 0 picks a free port)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    p.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    p.add_argument("--token-minutes", type=float, default=5.0, help="token lifetime (default 5)")
    p.add_argument("--session-minutes", type=float, default=5.0, help="session cookie lifetime (default 5)")

    sub.add_parser("version", help="print the version")
    return parser


def _error(text: str) -> None:
    print(f"cvm-agent: {text}", file=sys.stderr)


def _load_config(args: argparse.Namespace) -> Any:
    from agent import config

    return config.load(args.config).with_overrides(
        tee=args.tee,
        socket=args.socket,
        kbs_url=args.kbs_url,
        kbs_cert=args.kbs_cert,
        log_level=args.log_level,
    )


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from agent import log
    from agent.daemon import run
    from agent.errors import AgentError

    cfg = _load_config(args)
    log.configure(cfg.log.level, cfg.log.format)
    try:
        return asyncio.run(run(cfg))
    except AgentError as exc:
        _error(exc.diagnostics())
        return EXIT_FAILURE
    except OSError as exc:
        _error(f"cannot start: {exc}")
        return EXIT_FAILURE


def _call(socket: str | None, path: str, request: Any, response_type: Any) -> Any:
    from agent.client import call

    return call(socket or _socket_default(), path, request, response_type)


def _client(args: argparse.Namespace) -> int:
    from agent.api._gen import api_pb2
    from agent.api._gen import attestation_agent_pb2 as aa

    service = "/attestation_agent.AttestationAgentService/"
    if args.command == "tee":
        reply = _call(args.socket, service + "GetTeeType", aa.GetTeeTypeRequest(), aa.GetTeeTypeResponse)
        print(reply.tee)
    elif args.command == "evidence":
        try:
            runtime_data = base64.b64decode(args.runtime_data, validate=True)
        except binascii.Error:
            _error("--runtime-data is not valid standard base64")
            return EXIT_USAGE
        reply = _call(
            args.socket,
            service + "GetEvidence",
            aa.GetEvidenceRequest(RuntimeData=runtime_data),
            aa.GetEvidenceResponse,
        )
        sys.stdout.write(reply.Evidence.decode("utf-8", "replace") + "\n")
    elif args.command == "token":
        reply = _call(
            args.socket,
            service + "GetToken",
            aa.GetTokenRequest(TokenType=args.token_type),
            aa.GetTokenResponse,
        )
        sys.stdout.write(reply.Token.decode("utf-8", "replace") + "\n")
    elif args.command == "resource":
        reply = _call(
            args.socket,
            "/api.GetResourceService/GetResource",
            api_pb2.GetResourceRequest(ResourcePath=args.uri),
            api_pb2.GetResourceResponse,
        )
        if args.output:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(reply.Resource)
        else:
            sys.stdout.buffer.write(reply.Resource)
            sys.stdout.buffer.flush()
    return EXIT_OK


def _dev_kbs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent import log
    from agent.devkbs.server import DevKbsServer

    log.configure("info")
    resources = Path(args.resources)
    if not resources.is_dir():
        _error(f"--resources {args.resources!r} is not a directory")
        return EXIT_USAGE
    if (args.tls_cert is None) != (args.tls_key is None):
        _error("--tls-cert and --tls-key go together")
        return EXIT_USAGE
    server = DevKbsServer(
        resources,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token_minutes=args.token_minutes,
        session_minutes=args.session_minutes,
    )
    import structlog

    structlog.get_logger("agent.devkbs").warning(
        "devkbs.started",
        url=server.url,
        resources=str(resources),
        warning="development KBS: accepts the mock sample TEE and signs tokens with an ephemeral key; never use it "
        "to protect real secrets",
    )
    print(f"dev-kbs listening on {server.url}", flush=True)
    import signal
    import threading

    # SIGTERM shuts the server down from another thread (serve_forever blocks this one), then exit 0
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from agent.errors import ConfigError

    try:
        if args.command == "version":
            from agent import __version__

            print(f"cvm-agent {__version__}")
            return EXIT_OK
        if args.command == "serve":
            return _serve(args)
        if args.command == "check-config":
            print(json.dumps(_load_config(args).describe(), indent=2))
            return EXIT_OK
        if args.command == "dev-kbs":
            return _dev_kbs(args)
        return _client(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except _client_errors() as exc:
        return _report_client_error(exc)


def _client_errors() -> tuple[type[BaseException], ...]:
    from agent.client import AgentUnreachable, CallFailed

    return (AgentUnreachable, CallFailed)


def _report_client_error(exc: BaseException) -> int:
    from agent.client import AgentUnreachable

    _error(str(exc))
    return EXIT_UNREACHABLE if isinstance(exc, AgentUnreachable) else EXIT_FAILURE
