"""`confidential-data-hub`: the reference CDH's command line, config and ttRPC socket. Orchestrator.

    confidential-data-hub [-c cdh.toml] [--kernel-cmdline PATH] [--log-level LEVEL]

Serves `api.GetResourceService`, `api.SealedSecretService`, `api.ImagePullService/PullImage`,
`keyprovider.KeyProviderService/UnWrapKey`, and answers `SecureMount` with UNIMPLEMENTED, all on `cdh.sock`.
Image settings come from `[image]`, else the kernel command line;
`CDH_DEFAULT_IMAGE_AUTHENTICATED_REGISTRY_CREDENTIALS` overrides the credentials URI in every case. The
`PullImage` event goes to the attestation agent over ttRPC. In `cc_kbc` mode it works as the
reference does: the token and TEE key pair come from the attestation agent over ttRPC (`GetToken("kbs")`) and
resources are fetched with `Authorization: Bearer`. `offline_fs_kbc` reads the reference's local files.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.compat.refconfig import CdhSettings
    from agent.config import Config
    from agent.image.settings import ImageConfig

__all__ = ["DEFAULT_OCICRYPT_CONFIG", "main", "to_config"]

# Imports are made where they are used: `main` pauses the collector before the program loads (agent.lifecycle).

DEFAULT_OCICRYPT_CONFIG = "/run/confidential-containers/cdh/ocicrypt_config.json"
CREDENTIALS_ENV = "CDH_DEFAULT_IMAGE_AUTHENTICATED_REGISTRY_CREDENTIALS"


def build_parser() -> argparse.ArgumentParser:
    from agent.argparsing import ArgumentParser

    parser = ArgumentParser(
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
    from agent.compat import common

    common.add_version_flag(parser)
    return parser


def _load_settings(path: str | None) -> CdhSettings:
    from agent.compat.refconfig import CdhSettings, parse_cdh_config
    from agent.config import read_input

    if not path:
        return CdhSettings()
    return parse_cdh_config(read_input(path, key="-c"), source=path)


def _image_config(settings: CdhSettings, cmdline: str) -> ImageConfig:
    """`[image]` if present, else the kernel command line; the credentials env variable wins over both."""
    from dataclasses import replace

    from agent.compat.refconfig import image_config_from_cmdline

    image = settings.image if settings.image is not None else image_config_from_cmdline(cmdline)
    override = os.environ.get(CREDENTIALS_ENV)
    if override:
        image = replace(image, authenticated_registry_credentials_uri=override)
    return image


def to_config(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The reference CDH's inputs (`-c` config, `AA_KBC_PARAMS`, kernel command line, environment) as a
    `Config`, and the log level they ask for."""
    from agent.compat import common
    from agent.compat.refconfig import credentials_from_cmdline, unix_path
    from agent.config import Config, CredentialFile, DataHubConfig, KbsConfig
    from agent.log import get_logger

    log = get_logger("agent.cdh")
    settings = _load_settings(args.config)
    if settings.ignored:
        log.info("cdh.config_ignored", tables=list(settings.ignored), reason="not used by cvm-agent")
    cmdline = common.read_kernel_cmdline(args.kernel_cmdline)
    credentials = (*settings.credentials, *credentials_from_cmdline(cmdline))
    kbc, source = (settings.kbc, "config file") if settings.kbc else common.discover_kbc(None, cmdline)
    passport = kbc is not None and kbc.name == "cc_kbc" and kbc.url is not None
    extra = os.environ.get("OFFLINE_FS_KBC_EXTRA_FILE_PATH")
    log.info("cdh.settings", kbc=kbc.name if kbc else None, source=source)
    offline_files: tuple[str, ...] = ()
    if not passport:
        from agent.kbs.offline import DEFAULT_FILES

        offline_files = (*DEFAULT_FILES, *([extra] if extra else []))
    hub = DataHubConfig(
        backend="passport" if passport else "offline",
        aa_socket=unix_path(settings.aa_socket, key="aa.aa_socket"),
        offline_files=offline_files,
        credentials=tuple(CredentialFile(resource_uri=c.resource_uri, path=c.path) for c in credentials),
        ocicrypt_config=args.ocicrypt_config,
        skip_sealed_secret_verification=settings.skip_sealed_secret_verification,
    )
    config = Config(
        socket=None,
        ttrpc_cdh_socket=unix_path(settings.socket, key="socket"),
        kbs=KbsConfig(url=kbc.url if passport and kbc else None, cert_pem=settings.kbs_cert),
        data_hub=hub,
        image=_image_config(settings, cmdline),
    )
    return config, settings.log_level


def main(argv: Sequence[str] | None = None) -> int:
    from agent.lifecycle import gc_paused

    with gc_paused():
        from agent.compat import common

        return common.serve_translated("confidential-data-hub", "cdh", build_parser().parse_args(argv), to_config)
