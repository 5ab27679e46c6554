"""`cvm-tools keyprovider`: the image owner's wrap-only key provider for skopeo/ocicrypt. Orchestrator.

Serves `keyprovider.KeyProviderService/WrapKey` over gRPC on a loopback `host:port` or a unix socket (the Go
ocicrypt client dials `host:port` or `unix://` targets). Runs outside the TEE; it never unwraps.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.api.grpc_server import GrpcServer
from agent.api.methods import keyprovider_methods
from agent.config import ListenAddress, read_input
from agent.errors import ConfigError, InvalidResourceUri
from agent.kbs.resource import parse_resource_uri
from agent.keyprovider.annotation import WrapType
from cvm_tools.admin import load_admin_key, mint_admin_token, register_resource
from cvm_tools.keyprovider.wrap import KekStore, WrapKeyProvider

__all__ = ["OwnerOptions", "build_provider", "serve"]

log = structlog.get_logger("cvm_tools.keyprovider")

DEFAULT_REGISTER_PREFIX = "kbs:///default/image-kek/"


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnerOptions:
    listen: ListenAddress
    provider_name: str = "attestation-agent"
    kek_file: str | None = None
    kid: str | None = None
    kek_dir: str | None = None
    algorithm: WrapType = WrapType.A256GCM
    kbs_url: str | None = None
    kbs_cert: str | None = None
    admin_key_file: str | None = None
    admin_token_file: str | None = None
    admin_claims: str | None = None
    keypath_dir: str | None = None
    register_prefix: str = DEFAULT_REGISTER_PREFIX


def build_provider(options: OwnerOptions) -> WrapKeyProvider:
    """Validate the options and build the provider (KEK file, generated KEKs, KBS registration)."""
    kek = read_input(options.kek_file, key="--kek-file") if options.kek_file else None
    if kek is not None and len(kek) != 32:
        msg = f"--kek-file holds {len(kek)} bytes, expected 32 (an AES-256 key)"
        raise ConfigError(msg, key="--kek-file")
    if options.kid is not None:
        _check_kid(options.kid, "--kid")
    prefix = _check_prefix(options.register_prefix)
    if options.kid is not None and kek is None and not options.kid.startswith(prefix):
        msg = f"--kid {options.kid!r} is outside --register-prefix {prefix!r}; generated KEKs are only stored there"
        raise ConfigError(msg, key="--kid")
    keypath_dir = _keypath_dir(options.keypath_dir)
    if kek is None and options.kek_dir is None and options.kbs_url is None and keypath_dir is None:
        msg = (
            "no KEK source: pass --kek-file, --kek-dir, --kbs-url with admin credentials (to register generated "
            "KEKs), or --keypath-dir (to allow keypath= from callers)"
        )
        raise ConfigError(msg, key="--kek-file")
    register = None
    if options.kbs_url is not None:
        if (options.admin_key_file is None) == (options.admin_token_file is None):
            msg = "--kbs-url needs exactly one of --admin-key or --admin-token-file to register KEKs"
            raise ConfigError(msg, key="--kbs-url")
        extra: dict[str, object] = {}
        if options.admin_claims:
            try:
                parsed: object = json.loads(options.admin_claims)
            except ValueError as exc:
                msg = "--admin-claims is not a JSON object"
                raise ConfigError(msg, key="--admin-claims") from exc
            if isinstance(parsed, dict):
                extra = parsed
            else:
                msg = "--admin-claims is not a JSON object"
                raise ConfigError(msg, key="--admin-claims")
        admin_key = (
            load_admin_key(read_input(options.admin_key_file, key="--admin-key")) if options.admin_key_file else None
        )
        admin_token = (
            read_input(options.admin_token_file, key="--admin-token-file").decode().strip()
            if options.admin_token_file
            else None
        )
        url, cert = options.kbs_url, options.kbs_cert

        async def register_kek(kid: str, data: bytes) -> None:
            if admin_token is not None:
                token = admin_token
            else:
                assert admin_key is not None  # exactly one of the two was checked above
                token = mint_admin_token(admin_key, extra_claims=extra)
            await register_resource(url, kid, data, token=token, cert_path=cert)
            log.info("keyprovider.kek_registered", kid=kid, kbs=url)

        register = register_kek
    directory = Path(options.kek_dir) if options.kek_dir else None
    if directory is not None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return WrapKeyProvider(
        provider_name=options.provider_name,
        kek=kek,
        kid=options.kid,
        store=KekStore(register=register, directory=directory, prefix=prefix),
        default_algorithm=options.algorithm,
        keypath_dir=keypath_dir,
    )


def _check_kid(kid: str, flag: str) -> None:
    try:
        parse_resource_uri(kid)
    except InvalidResourceUri as exc:
        msg = f"{flag} {kid!r} is not a resource URI, expected kbs:///<repo>/<type>/<tag>"
        raise ConfigError(msg, key=flag) from exc


def _check_prefix(prefix: str) -> str:
    if not prefix.startswith("kbs:///") or not prefix.endswith("/") or prefix.count("/") not in (4, 5):
        msg = f"--register-prefix {prefix!r} is not kbs:///<repo>/ or kbs:///<repo>/<type>/"
        raise ConfigError(msg, key="--register-prefix")
    return prefix


def _keypath_dir(path: str | None) -> Path | None:
    if path is None:
        return None
    directory = Path(path).resolve()
    if not directory.is_dir():
        msg = f"--keypath-dir {path!r} is not a directory"
        raise ConfigError(msg, key="--keypath-dir")
    return directory


async def serve(options: OwnerOptions, *, ready: asyncio.Event | None = None) -> int:
    provider = build_provider(options)
    server = GrpcServer(keyprovider_methods(wrap=provider.wrap_key, unwrap=None), [options.listen])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    config = {"key-providers": {options.provider_name: {"grpc": _ocicrypt_target(options.listen)}}}
    log.info("keyprovider.ready", listen=str(options.listen), ocicrypt_config=config)
    print(f"keyprovider listening on {options.listen}; OCICRYPT_KEYPROVIDER_CONFIG: {json.dumps(config)}", flush=True)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await server.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def _ocicrypt_target(address: ListenAddress) -> str:
    if address.unix_path is not None:
        return f"unix://{address.unix_path}"
    return address.grpc_target()
