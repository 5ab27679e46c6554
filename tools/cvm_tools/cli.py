"""The `cvm-tools` command: developer and image-owner tools that never run inside a TEE. Orchestrator.

    cvm-tools dev-kbs --resources DIR [--port N]        a development KBS for the mock TEE and emulated hardware
    cvm-tools keyprovider --listen ADDR [...]            the image owner's wrap-only ocicrypt key provider
    cvm-tools seal --generate-key PREFIX | --signing-key PEM --kid KID --name URI

Exit codes: 0 success, 1 failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_EPILOG = "exit codes: 0 success, 1 failure, 2 usage or configuration error"


def _version() -> str:
    from agent import __version__

    return f"cvm-tools {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvm-tools",
        description="cvm-agent's developer and image-owner tools (outside the TEE): dev KBS, key provider, sealing.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    p.add_argument("--admin-public-key", metavar="PEM", help="accept admin resource uploads signed by this key")
    p.add_argument("--insecure-admin", action="store_true", help="accept admin resource uploads from anyone")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="STEP:KIND[:ARG[:TIMES]]",
        help="misbehave on purpose (repeatable), e.g. auth:status:503:2, resource:drip:0.5, attest:foreign-pubkey; "
        "kinds are listed in cvm_tools/devkbs/faults.py",
    )

    p = sub.add_parser(
        "keyprovider",
        help="run the image owner's wrap-only key provider for skopeo/ocicrypt (outside the TEE)",
        epilog=_EPILOG,
    )
    p.add_argument("--listen", required=True, metavar="ADDR", help="loopback HOST:PORT, or unix:PATH / PATH")
    p.add_argument("--provider-name", default="attestation-agent", help="ocicrypt provider name (default %(default)s)")
    p.add_argument("--kek-file", metavar="FILE", help="wrap every layer under this 32-byte key")
    p.add_argument("--kid", metavar="URI", help="KBS resource URI of the KEK (default: keyid= or a generated one)")
    p.add_argument("--kek-dir", metavar="DIR", help="save generated KEKs under DIR/<repo>/<type>/<tag> (0600)")
    p.add_argument("--keypath-dir", metavar="DIR", help="allow callers' keypath= only for files inside DIR")
    p.add_argument(
        "--register-prefix",
        metavar="URI",
        default="kbs:///default/image-kek/",
        help="generated KEKs are stored and registered only under this prefix (default %(default)s)",
    )
    p.add_argument("--algorithm", default="A256GCM", choices=["A256GCM", "A256CTR"], help="default %(default)s")
    p.add_argument("--kbs-url", metavar="URL", help="register generated KEKs with this KBS (admin resource API)")
    p.add_argument("--kbs-cert", metavar="PEM_FILE", help="extra CA certificate for HTTPS to the KBS")
    p.add_argument("--admin-key", metavar="PEM_FILE", help="admin private key (Ed25519, P-256, RSA) to sign tokens")
    p.add_argument("--admin-token-file", metavar="FILE", help="a ready-made admin bearer token")
    p.add_argument("--admin-claims", metavar="JSON", help='extra admin token claims, e.g. \'{"role":"admin"}\'')
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")

    p = sub.add_parser("seal", help="create a sealed secret, or a signing key for sealed secrets", epilog=_EPILOG)
    p.add_argument("--generate-key", metavar="PREFIX", help="write PREFIX.pem (private, 0600) and PREFIX.jwk (public)")
    p.add_argument("--signing-key", metavar="PEM_FILE", help="P-256 private key that signs the secret")
    p.add_argument("--kid", metavar="KID", help="verification key id: a resource URI (kbs:///r/t/tag) or a key name")
    p.add_argument("--name", metavar="URI", help="the KBS resource holding the secret (vault secret)")
    return parser


def _error(text: str) -> None:
    print(f"cvm-tools: {text}", file=sys.stderr)


def _keyprovider(args: argparse.Namespace) -> int:
    import asyncio

    from agent import config, log
    from agent.keyprovider.annotation import WrapType
    from cvm_tools.keyprovider.owner import OwnerOptions, serve

    log.configure(args.log_level)
    options = OwnerOptions(
        listen=config.parse_listen_address(args.listen, key="--listen"),
        provider_name=args.provider_name,
        kek_file=args.kek_file,
        kid=args.kid,
        kek_dir=args.kek_dir,
        algorithm=WrapType(args.algorithm),
        kbs_url=args.kbs_url,
        kbs_cert=args.kbs_cert,
        admin_key_file=args.admin_key,
        admin_token_file=args.admin_token_file,
        admin_claims=args.admin_claims,
        keypath_dir=args.keypath_dir,
        register_prefix=args.register_prefix,
    )
    return asyncio.run(serve(options))


def _seal(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.secrets import sealed
    from cvm_tools import sign

    if args.generate_key:
        private_pem, public_jwk = sign.generate_signing_key()
        fd = os.open(f"{args.generate_key}.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(private_pem)
        Path(f"{args.generate_key}.jwk").write_bytes(public_jwk)
        print(f"wrote {args.generate_key}.pem (private, keep it safe) and {args.generate_key}.jwk (upload to the KBS)")
        return EXIT_OK
    if not (args.signing_key and args.kid and args.name):
        _error("seal needs --signing-key, --kid and --name (or --generate-key PREFIX)")
        return EXIT_USAGE
    try:
        key = serialization.load_pem_private_key(Path(args.signing_key).read_bytes(), password=None)
    except ValueError:
        _error("--signing-key is not an unencrypted PEM private key")
        return EXIT_USAGE
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        _error("--signing-key must be an EC P-256 private key")
        return EXIT_USAGE
    print(sign.seal(sealed.VaultSecret(name=args.name, provider="kbs"), key, args.kid))
    return EXIT_OK


def _dev_kbs(args: argparse.Namespace) -> int:
    import signal
    import threading
    from pathlib import Path

    import structlog

    from agent import log
    from cvm_tools.devkbs.server import DevKbsServer

    log.configure("info")
    resources = Path(args.resources)
    if not resources.is_dir():
        _error(f"--resources {args.resources!r} is not a directory")
        return EXIT_USAGE
    if (args.tls_cert is None) != (args.tls_key is None):
        _error("--tls-cert and --tls-key go together")
        return EXIT_USAGE
    from cvm_tools.devkbs.faults import parse_fault_spec

    try:
        faults = [parse_fault_spec(spec) for spec in args.fault]
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    server = DevKbsServer(
        resources,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token_minutes=args.token_minutes,
        session_minutes=args.session_minutes,
        admin_public_key=Path(args.admin_public_key).read_bytes() if args.admin_public_key else None,
        insecure_admin=args.insecure_admin,
    )
    structlog.get_logger("cvm_tools.devkbs").warning(
        "devkbs.started",
        url=server.url,
        resources=str(resources),
        warning="development KBS: accepts the mock sample TEE and signs tokens with an ephemeral key; never use it "
        "to protect real secrets",
    )
    for step, kind, arg, times in faults:
        server.core.faults.add(step, kind, arg, times=times)
    if faults:
        structlog.get_logger("cvm_tools.devkbs").warning("devkbs.faults", faults=args.fault)
    print(f"dev-kbs listening on {server.url}", flush=True)
    # SIGTERM shuts the server down from another thread (serve_forever blocks this one), then exit 0
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent.errors import AgentError, ConfigError

    try:
        if args.command == "dev-kbs":
            return _dev_kbs(args)
        if args.command == "keyprovider":
            return _keyprovider(args)
        return _seal(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except AgentError as exc:
        _error(exc.diagnostics())
        return EXIT_FAILURE
    except OSError as exc:
        name = f" {exc.filename}" if exc.filename else ""
        _error(f"cannot use{name}: {exc.strerror or 'I/O error'}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
