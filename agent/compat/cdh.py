"""`confidential-data-hub`: the reference CDH's command line, config and ttRPC socket. Orchestrator.

    confidential-data-hub [-c cdh.toml] [--kernel-cmdline PATH] [--log-level LEVEL]

Serves `api.GetResourceService`, `api.SealedSecretService`, `keyprovider.KeyProviderService/UnWrapKey`, and
answers `SecureMount` / `PullImage` with UNIMPLEMENTED, all on `cdh.sock`. In `cc_kbc` mode it works as the
reference does: the token and TEE key pair come from the attestation agent over ttRPC (`GetToken("kbs")`) and
resources are fetched with `Authorization: Bearer`. `offline_fs_kbc` reads the reference's local files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agent.compat import common
from agent.compat.refconfig import CdhSettings, Credential, credentials_from_cmdline, parse_cdh_config, unix_path
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.api.ttrpc import TtrpcClient
    from agent.service import DataHub, ResourceBackend

__all__ = ["DEFAULT_OCICRYPT_CONFIG", "main"]

log = structlog.get_logger("agent.cdh")

DEFAULT_OCICRYPT_CONFIG = "/run/confidential-containers/cdh/ocicrypt_config.json"
AA_SERVICE = "attestation_agent.AttestationAgentService"
AA_TOKEN_TIMEOUT_S = 50.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="confidential-data-hub", description="cvm-agent's drop-in for the reference confidential data hub."
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="reference CDH config (TOML or .json)")
    parser.add_argument("--kernel-cmdline", metavar="PATH", help="read kernel parameters here (default /proc/cmdline)")
    parser.add_argument(
        "--ocicrypt-config",
        metavar="PATH",
        default=DEFAULT_OCICRYPT_CONFIG,
        help="where to write the guest ocicrypt config when OCICRYPT_KEYPROVIDER_CONFIG is unset",
    )
    parser.add_argument("--log-level", help="debug, info, warning or error (default: RUST_LOG, then [log] level)")
    return parser


def _ocicrypt(socket: str, out_path: str) -> None:
    """Honour OCICRYPT_KEYPROVIDER_CONFIG: check the configured file, or write the guest's default one."""
    configured = os.environ.get("OCICRYPT_KEYPROVIDER_CONFIG")
    if configured:
        try:
            providers = json.loads(Path(configured).read_text()).get("key-providers", {})
        except (OSError, ValueError, AttributeError):
            log.warning("ocicrypt.config_unreadable", path=configured)
            return
        if "attestation-agent" not in providers:
            log.warning("ocicrypt.no_attestation_agent_provider", path=configured, providers=sorted(providers))
        else:
            log.info("ocicrypt.config", path=configured, provider=providers["attestation-agent"])
        return
    document = {"key-providers": {"attestation-agent": {"ttrpc": socket}}}
    try:
        target = Path(out_path)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.write_text(json.dumps(document))
    except OSError as exc:
        log.warning("ocicrypt.config_not_written", path=out_path, error=exc.strerror)
        return
    os.environ["OCICRYPT_KEYPROVIDER_CONFIG"] = out_path
    log.info("ocicrypt.config_written", path=out_path)


async def _download_credentials(hub: DataHub, credentials: Sequence[Credential]) -> None:
    for credential in credentials:
        data = await hub.get_resource(credential.resource_uri)
        path = Path(credential.path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        log.info("cdh.credential", resource=credential.resource_uri, path=credential.path)


def _load_settings(path: str | None) -> CdhSettings:
    if not path:
        return CdhSettings()
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        msg = f"-c {path!r} cannot be read: {exc.strerror}"
        raise ConfigError(msg, key="-c") from exc
    return parse_cdh_config(raw, source=path)


def _backend(settings: CdhSettings, cmdline: str) -> tuple[ResourceBackend, TtrpcClient | None]:
    """cc_kbc: passport mode with tokens from the AA over ttRPC; otherwise offline_fs_kbc."""
    from agent.api._gen import attestation_agent_pb2 as aa
    from agent.api.ttrpc import TtrpcClient
    from agent.kbs.client import KbsHttp
    from agent.kbs.offline import DEFAULT_FILES, OfflineFsKbc
    from agent.kbs.passport import PassportClient, TokenPair, parse_token_reply

    kbc, source = (settings.kbc, "config file") if settings.kbc else common.discover_kbc(None, cmdline)
    if kbc is not None and kbc.name == "cc_kbc" and kbc.url:
        client = TtrpcClient(unix_path(settings.aa_socket, key="aa.aa_socket"))

        async def token_source() -> TokenPair:
            request = aa.GetTokenRequest(TokenType="kbs").SerializeToString()
            reply = await client.call(AA_SERVICE, "GetToken", request, timeout=AA_TOKEN_TIMEOUT_S)
            return parse_token_reply(aa.GetTokenResponse.FromString(reply).Token)

        log.info("cdh.kbc", kbc="cc_kbc", url=kbc.url, source=source, aa_socket=settings.aa_socket)
        if kbc.url.startswith("http://"):
            log.warning("kbs.insecure_http", url=kbc.url, warning="plain HTTP to the KBS")
        return PassportClient(KbsHttp(kbc.url, cert_pem=settings.kbs_cert), token_source), client
    extra = os.environ.get("OFFLINE_FS_KBC_EXTRA_FILE_PATH")
    log.info("cdh.kbc", kbc="offline_fs_kbc", source=source)
    return OfflineFsKbc([*DEFAULT_FILES, *([extra] if extra else [])]), None


async def run(args: argparse.Namespace) -> int:
    from agent.api.methods import build_methods
    from agent.api.ttrpc_service import build_ttrpc_server
    from agent.service import DataHub

    settings = await asyncio.to_thread(_load_settings, args.config)
    common.configure_logging(settings.log_level, args.log_level)
    if settings.ignored:
        log.info("cdh.config_ignored", tables=list(settings.ignored), reason="not used by cvm-agent")
    socket_path = unix_path(settings.socket, key="socket")
    cmdline = common.read_kernel_cmdline(args.kernel_cmdline)
    credentials = (*settings.credentials, *credentials_from_cmdline(cmdline))
    backend, aa_client = _backend(settings, cmdline)
    if settings.skip_sealed_secret_verification:
        log.warning("sealed_secret.verification_disabled", warning="INSECURE: sealed secrets are not verified")
    hub = DataHub(backend, skip_sealed_secret_verification=settings.skip_sealed_secret_verification)
    server = build_ttrpc_server(build_methods(None, hub))
    await server.start(socket_path)
    log.info("cdh.listening", socket=socket_path)
    try:
        _ocicrypt(settings.socket, args.ocicrypt_config)
        await _download_credentials(hub, credentials)
        log.info("cdh.ready")
        await common.wait_for_stop()
        return 0
    finally:
        await server.close(grace_s=2.0)
        if aa_client is not None:
            await aa_client.close()
        aclose = getattr(backend, "aclose", None)
        if aclose is not None:
            await aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_command("confidential-data-hub", lambda: run(args))
