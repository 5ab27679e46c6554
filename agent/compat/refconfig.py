"""The reference components' configuration, and where they find the KBS. Pure.

AA config (`attestation-agent -c`, guest-api.md §4): `[token_configs.kbs] url, cert, tee_key_algorithm`,
`[token_configs.coco_as] url`, `[eventlog_config] init_pcr, enable_eventlog`, `[log] level`. cvm-agent adds one
table of its own, `[cvm_agent] tee = "sample"`, so a Kata guest without a TEE can ask for the mock TEE through
the AA config delivered by initdata (it is never chosen silently).

CDH config (`confidential-data-hub -c`, §9): `socket`, `[aa] aa_socket`, `[kbc] name, url, kbs_cert`,
`[[credentials]] resource_uri, path`, `skip_sealed_secret_verification`, `[log] level`, and image-rs's `[image]`
(`agent.image.settings`; unknown keys there are ignored, as the reference). Without an `[image]` section the
image settings come from the kernel command line (`agent.https_proxy`, `agent.http_proxy`, `agent.no_proxy`,
`agent.image_registry_auth`, and `agent.image_policy_file` when `agent.enable_signature_verification=true`).

KBS discovery, as the reference: the config file first, then the `AA_KBC_PARAMS` environment variable, then the
kernel command line `agent.aa_kbc_params=cc_kbc::<url>`. CDH credentials may also come from the kernel command
line `cdh.kbs_resources=<uri>::<path>,...`. The mock TEE may be asked for on the kernel command line with
`cvm_agent.tee=sample`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError
from agent.kbs.keyalg import KeyAlgorithm
from agent.tee.kinds import TEE_CHOICES

if TYPE_CHECKING:  # api-server-rest needs only the socket paths: no config, TOML or image modules
    from agent.config import EventlogConfig
    from agent.image.settings import ImageConfig

__all__ = [
    "DEFAULT_AA_SOCKET",
    "DEFAULT_CDH_SOCKET",
    "AaSettings",
    "CdhSettings",
    "Credential",
    "KbcParams",
    "cmdline_value",
    "credentials_from_cmdline",
    "image_config_from_cmdline",
    "parse_aa_config",
    "parse_cdh_config",
    "parse_kbc_params",
    "unix_path",
]

DEFAULT_AA_SOCKET = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"
DEFAULT_CDH_SOCKET = "unix:///run/confidential-containers/cdh.sock"
CREDENTIALS_DIR = "/run/confidential-containers/cdh/kbs"
MAX_CONFIG_BYTES = 1024 * 1024
TEES = TEE_CHOICES


def unix_path(address: str, *, key: str) -> str:
    """`unix:///abs/path` (the reference form), `unix:/abs/path` or a bare absolute path → the path."""
    if address.startswith("unix://"):
        path = address[len("unix://") :]
    elif address.startswith("unix:"):
        path = address[len("unix:") :]
    else:
        path = address
    if not path.startswith("/") or "\0" in path or len(path.encode()) > 107:
        msg = f"`{key}` is {address!r}, expected unix:///<absolute path> (at most 107 bytes)"
        raise ConfigError(msg, key=key)
    return path


@dataclass(frozen=True, slots=True, kw_only=True)
class KbcParams:
    name: str
    url: str | None


def parse_kbc_params(text: str, *, source: str) -> KbcParams:
    """`<kbc>::<url>`, e.g. `cc_kbc::http://10.0.0.1:8080`; `offline_fs_kbc::` has no URL."""
    name, sep, url = text.strip().partition("::")
    if not sep or name not in ("cc_kbc", "offline_fs_kbc", "sample_kbc"):
        msg = f"{source} is {text!r}, expected cc_kbc::<KBS URL> or offline_fs_kbc::"
        raise ConfigError(msg, key=source)
    if name == "cc_kbc" and not url.startswith(("http://", "https://")):
        msg = f"{source} is {text!r}: cc_kbc needs an http(s) KBS URL"
        raise ConfigError(msg, key=source)
    return KbcParams(name=name, url=url or None)


def cmdline_value(cmdline: str, key: str) -> str | None:
    """The last `key=value` on a kernel command line (later parameters override earlier ones)."""
    value = None
    for word in cmdline.split():
        name, sep, rest = word.partition("=")
        if sep and name == key:
            value = rest
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    resource_uri: str
    path: str


def _credential(uri: object, path: object, *, source: str) -> Credential:
    if not isinstance(uri, str) or not isinstance(path, str):
        msg = f"{source}: credentials need string `resource_uri` and `path`"
        raise ConfigError(msg, key=source)
    if not path.startswith(CREDENTIALS_DIR + "/") or "/../" in path or path.endswith("/.."):
        msg = f"{source}: credential path {path!r} must be under {CREDENTIALS_DIR}"
        raise ConfigError(msg, key=source)
    return Credential(resource_uri=uri, path=path)


def credentials_from_cmdline(cmdline: str) -> list[Credential]:
    """`cdh.kbs_resources=<uri>::<path>,<uri>::<path>`."""
    value = cmdline_value(cmdline, "cdh.kbs_resources")
    if not value:
        return []
    result = []
    for item in value.split(","):
        uri, sep, path = item.partition("::")
        if not sep:
            msg = f"cdh.kbs_resources entry {item!r} is not <uri>::<path>"
            raise ConfigError(msg, key="cdh.kbs_resources")
        result.append(_credential(uri, path, source="cdh.kbs_resources"))
    return result


def _load(raw: bytes, source: str) -> dict[str, Any]:
    if len(raw) > MAX_CONFIG_BYTES:
        msg = f"{source} is {len(raw)} bytes, expected at most {MAX_CONFIG_BYTES}"
        raise ConfigError(msg, key=source)
    try:
        text = raw.decode("utf-8")
        import tomllib

        data: object = json.loads(text) if source.endswith(".json") else tomllib.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        msg = f"{source} is not valid {'JSON' if source.endswith('.json') else 'TOML'}: {exc}"
        raise ConfigError(msg, key=source) from exc
    if not isinstance(data, dict):
        msg = f"{source} is not a table"
        raise ConfigError(msg, key=source)
    return data


def _table(data: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        msg = f"{source}: `{name}` is {value!r}, expected a table"
        raise ConfigError(msg, key=name)
    return value


def _str(table: dict[str, Any], name: str, where: str) -> str | None:
    value = table.get(name)
    if value is not None and not isinstance(value, str):
        msg = f"`{where}.{name}` is {value!r}, expected a string"
        raise ConfigError(msg, key=f"{where}.{name}")
    return value


def _url(value: str | None, key: str) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        msg = f"`{key}` is {value!r}, expected an http:// or https:// URL"
        raise ConfigError(msg, key=key)
    return value.rstrip("/") if value else value


def _log_level(data: dict[str, Any], source: str) -> str | None:
    level = _str(_table(data, "log", source), "level", "log")
    if level is None:
        return None
    level = level.lower()
    mapping = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "warning": "warning"}
    if level not in {**mapping, "error": "error"}:
        msg = f"`log.level` is {level!r}, expected trace, debug, info, warn or error"
        raise ConfigError(msg, key="log.level")
    return mapping.get(level, "error")


@dataclass(frozen=True, slots=True, kw_only=True)
class AaSettings:
    kbs_url: str | None = None
    kbs_cert: str | None = None  # PEM text, as the reference's `cert`
    tee_key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    coco_as_url: str | None = None
    enable_eventlog: bool = False
    init_pcr: int = 17
    log_level: str | None = None
    tee: str | None = None

    def eventlog(self) -> EventlogConfig:
        """`[eventlog_config]` as cvm-agent's `[eventlog]`; the log path stays `$AAEL_PATH` or the default."""
        from agent.config import EventlogConfig

        return EventlogConfig(enabled=self.enable_eventlog, init_pcr=self.init_pcr)


def parse_aa_config(raw: bytes, *, source: str) -> AaSettings:
    data = _load(raw, source)
    tokens = _table(data, "token_configs", source)
    kbs = tokens.get("kbs")
    settings: dict[str, Any] = {}
    if kbs is not None:
        if not isinstance(kbs, dict):
            msg = "`token_configs.kbs` is not a table"
            raise ConfigError(msg, key="token_configs.kbs")
        url = _str(kbs, "url", "token_configs.kbs")
        if url is None:
            msg = "`token_configs.kbs.url` is required when [token_configs.kbs] is present"
            raise ConfigError(msg, key="token_configs.kbs.url")
        settings["kbs_url"] = _url(url, "token_configs.kbs.url")
        settings["kbs_cert"] = _str(kbs, "cert", "token_configs.kbs")
        algorithm = _str(kbs, "tee_key_algorithm", "token_configs.kbs")
        if algorithm is not None:
            names = [a.value for a in KeyAlgorithm]
            if algorithm not in names:
                msg = f"`token_configs.kbs.tee_key_algorithm` is {algorithm!r}, expected one of: {', '.join(names)}"
                raise ConfigError(msg, key="token_configs.kbs.tee_key_algorithm")
            settings["tee_key_algorithm"] = KeyAlgorithm(algorithm)
    coco_as = tokens.get("coco_as")
    if isinstance(coco_as, dict):
        settings["coco_as_url"] = _url(_str(coco_as, "url", "token_configs.coco_as"), "token_configs.coco_as.url")
    eventlog = _table(data, "eventlog_config", source)
    if "enable_eventlog" in eventlog:
        if not isinstance(eventlog["enable_eventlog"], bool):
            msg = f"`eventlog_config.enable_eventlog` is {eventlog['enable_eventlog']!r}, expected true or false"
            raise ConfigError(msg, key="eventlog_config.enable_eventlog")
        settings["enable_eventlog"] = eventlog["enable_eventlog"]
    if "init_pcr" in eventlog:
        pcr = eventlog["init_pcr"]
        if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr <= 23:
            msg = f"`eventlog_config.init_pcr` is {pcr!r}, expected a PCR index 0..23"
            raise ConfigError(msg, key="eventlog_config.init_pcr")
        settings["init_pcr"] = pcr
    settings["log_level"] = _log_level(data, source)
    own = _table(data, "cvm_agent", source)
    tee = _str(own, "tee", "cvm_agent")
    if tee is not None and tee not in TEES:
        msg = f"`cvm_agent.tee` is {tee!r}, expected one of: {', '.join(TEES)}"
        raise ConfigError(msg, key="cvm_agent.tee")
    settings["tee"] = tee
    return AaSettings(**settings)


@dataclass(frozen=True, slots=True, kw_only=True)
class CdhSettings:
    socket: str = DEFAULT_CDH_SOCKET
    aa_socket: str = DEFAULT_AA_SOCKET
    kbc: KbcParams | None = None
    kbs_cert: str | None = None  # PEM text
    credentials: tuple[Credential, ...] = ()
    skip_sealed_secret_verification: bool = False
    log_level: str | None = None
    image: ImageConfig | None = None  # None: no [image] section (the kernel command line then applies)
    ignored: tuple[str, ...] = field(default=())


def image_config_from_cmdline(cmdline: str) -> ImageConfig:
    """image-rs `ImageConfig::from_kernel_cmdline`: proxies, registry auth, and the policy file only when
    `agent.enable_signature_verification=true`."""
    policy = None
    if (cmdline_value(cmdline, "agent.enable_signature_verification") or "").lower() == "true":
        policy = cmdline_value(cmdline, "agent.image_policy_file") or None
    from agent.image.settings import ImageConfig

    return ImageConfig(
        https_proxy=cmdline_value(cmdline, "agent.https_proxy") or None,
        http_proxy=cmdline_value(cmdline, "agent.http_proxy") or None,
        no_proxy=cmdline_value(cmdline, "agent.no_proxy") or None,
        authenticated_registry_credentials_uri=cmdline_value(cmdline, "agent.image_registry_auth") or None,
        image_security_policy_uri=policy,
    )


def parse_cdh_config(raw: bytes, *, source: str) -> CdhSettings:
    data = _load(raw, source)
    settings: dict[str, Any] = {}
    known = {"socket", "aa", "kbc", "credentials", "skip_sealed_secret_verification", "log", "image"}
    settings["ignored"] = tuple(sorted(set(data) - known))
    socket = _str(data, "socket", "cdh")
    if socket is not None:
        unix_path(socket, key="socket")
        settings["socket"] = socket
    aa_socket = _str(_table(data, "aa", source), "aa_socket", "aa")
    if aa_socket is not None:
        unix_path(aa_socket, key="aa.aa_socket")
        settings["aa_socket"] = aa_socket
    kbc = _table(data, "kbc", source)
    if kbc:
        name = _str(kbc, "name", "kbc")
        url = _str(kbc, "url", "kbc")
        if name not in ("cc_kbc", "offline_fs_kbc"):
            msg = f"`kbc.name` is {name!r}, expected cc_kbc or offline_fs_kbc"
            raise ConfigError(msg, key="kbc.name")
        if name == "cc_kbc" and url is None:
            msg = "`kbc.url` is required for cc_kbc"
            raise ConfigError(msg, key="kbc.url")
        settings["kbc"] = KbcParams(name=name, url=_url(url, "kbc.url"))
        settings["kbs_cert"] = _str(kbc, "kbs_cert", "kbc")
    credentials = data.get("credentials", [])
    if not isinstance(credentials, list):
        msg = "`credentials` must be an array of tables ([[credentials]])"
        raise ConfigError(msg, key="credentials")
    settings["credentials"] = tuple(
        _credential(c.get("resource_uri"), c.get("path"), source=source) if isinstance(c, dict) else _bad_cred(source)
        for c in credentials
    )
    skip = data.get("skip_sealed_secret_verification", False)
    if not isinstance(skip, bool):
        msg = f"`skip_sealed_secret_verification` is {skip!r}, expected true or false"
        raise ConfigError(msg, key="skip_sealed_secret_verification")
    settings["skip_sealed_secret_verification"] = skip
    settings["log_level"] = _log_level(data, source)
    if "image" in data:
        from agent.image.settings import parse_image_table

        settings["image"] = parse_image_table(_table(data, "image", source), strict=False)
    return CdhSettings(**settings)


def _bad_cred(source: str) -> Credential:
    msg = f"{source}: each [[credentials]] entry must be a table"
    raise ConfigError(msg, key="credentials")
