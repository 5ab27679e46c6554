"""`cvm-agent keyprovider`: the image owner's wrap-only key provider for skopeo/ocicrypt. Orchestrator.

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
from agent.config import ListenAddress
from agent.errors import ConfigError
from agent.kbs.admin import mint_admin_token, register_resource
from agent.keyprovider.annotation import WrapType
from agent.keyprovider.service import KekStore, WrapKeyProvider

__all__ = ["OwnerOptions", "build_provider", "serve"]

log = structlog.get_logger("agent.keyprovider")


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


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        msg = f"{what} {path!r} cannot be read: {exc.strerror}"
        raise ConfigError(msg, key=what) from exc


def build_provider(options: OwnerOptions) -> WrapKeyProvider:
    """Validate the options and build the provider (KEK file, generated KEKs, KBS registration)."""
    kek = _read(options.kek_file, "--kek-file") if options.kek_file else None
    if kek is not None and len(kek) != 32:
        msg = f"--kek-file holds {len(kek)} bytes, expected 32 (an AES-256 key)"
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
        admin_key = _read(options.admin_key_file, "--admin-key") if options.admin_key_file else None
        admin_token = (
            _read(options.admin_token_file, "--admin-token-file").decode().strip() if options.admin_token_file else None
        )
        url, cert = options.kbs_url, options.kbs_cert

        async def register_kek(kid: str, data: bytes) -> None:
            token = admin_token if admin_token is not None else mint_admin_token(admin_key or b"", extra_claims=extra)
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
        store=KekStore(register=register, directory=directory),
        default_algorithm=options.algorithm,
    )


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
