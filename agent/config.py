"""Configuration: one frozen dataclass tree, loaded from one TOML file plus command-line overrides.

Pure except for `load()`, which reads the file. Every value is validated here, at start-up, and a bad value
raises `ConfigError` naming the key and the value.

Example (`cvm-agent serve --config agent.toml`):

    tee = "sample"                      # "auto" (default) probes tdx, then snp; "tdx", "snp"; "sample" is the mock
    socket = "/run/confidential-containers/cvm-agent/agent.sock"
    grpc_listen = ["127.0.0.1:50002"]   # optional extra loopback TCP listeners
    # optional: also serve ttRPC on the reference sockets (one daemon for every role; "" or absent = off)
    ttrpc_aa_socket = "/run/confidential-containers/attestation-agent/attestation-agent.sock"
    ttrpc_cdh_socket = "/run/confidential-containers/cdh.sock"
    reply_budget_mib = 32               # replies (over 64 KiB) held for local peers not reading yet, all transports

    [initdata]
    toml = "/run/cvm-agent/initdata.toml"   # check its digest against MRCONFIGID/HOST_DATA at start, send it to the KBS

    [kbs]
    url = "https://kbs.example:8080"
    cert = "/etc/cvm-agent/kbs-ca.pem"  # extra CA certificate (PEM file) for HTTPS
    tee_key_algorithm = "ECDH-ES+A256KW-P256"
    timeout_s = 60.0
    max_response_bytes = 16777216
    token_refresh_margin_s = 30.0
    preload = true                      # serve: load the KBS client in the background once ready (~15 MiB), so
                                        # the first GetResource does not wait for it; false: at the first KBS call

    [data_hub]
    kek_cache_s = 300.0                 # keep image-layer KEKs in memory this long; 0 disables the cache
    skip_sealed_secret_verification = false   # INSECURE: accept unsigned sealed secrets
    sealed_secret_key_dir = "/run/confidential-containers/cdh/sealed-secret"

    [log]
    level = "info"                      # debug, info, warning, error
    format = "auto"                     # auto (console on a TTY, JSON otherwise), json, console

    [eventlog]                          # runtime measurement (ExtendRuntimeMeasurement, AAEL); TDX only
    enabled = false                     # off: ExtendRuntimeMeasurement answers NOT_ENABLED
    path = "/run/attestation-agent/eventlog"   # default: $AAEL_PATH, else this (keep it on tmpfs)
    init_pcr = 17                       # PCR index used when a request has no RegisterIndex (17 -> RTMR3)

    [snp]
    vmpl = 0                            # VMPL of SNP reports (configfs `privlevel`, ioctl `vmpl`); Trustee needs 0

    [image]                             # guest image pull: the reference CDH keys, see agent/image/settings.py
    work_dir = "/run/kata-containers/image"

    [tee_paths]                         # kernel interfaces; change them only for emulators and tests
    tsm_report_dir = "/sys/kernel/config/tsm/report"               # configfs-tsm reports (TDX quotes, SNP)
    tdx_guest_device = "/dev/tdx_guest"                            # TDX_CMD_GET_REPORT0 (MRCONFIGID, RTMRs)
    sev_guest_device = "/dev/sev-guest"                            # SNP_GET_EXT_REPORT / SNP_GET_REPORT
    sev_guest_platform_dir = "/sys/devices/platform/sev-guest"     # SNP detection (as the reference)
    tdx_measurements_dir = "/sys/devices/virtual/misc/tdx_guest/measurements"   # Linux >= 6.16 registers
    ccel_data = "/sys/firmware/acpi/tables/data/CCEL"              # the CCEL event log (TDX `cc_eventlog`)

Every `tee_paths` key is also a command-line flag of `serve`, `check-config`, `tee --probe` and
`evidence --decode --local` (`--tsm-report-dir`, `--tdx-guest-device`, ...), as is `snp.vmpl` (`--snp-vmpl`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.image.settings import ImageConfig, parse_image_table
from agent.kbs.keyalg import KeyAlgorithm
from agent.tee.kinds import TEE_CHOICES

__all__ = [
    "DEFAULT_AA_TTRPC_SOCKET",
    "PLAIN_HTTP_RISK",
    "DEFAULT_SOCKET",
    "CredentialFile",
    "InitdataConfig",
    "TEE_NAMES",
    "Config",
    "DataHubConfig",
    "EventlogConfig",
    "KbsConfig",
    "ListenAddress",
    "LogConfig",
    "SnpConfig",
    "TEE_PATH_FLAGS",
    "TeePaths",
    "from_mapping",
    "load",
    "parse_listen_address",
    "read_input",
]

DEFAULT_SOCKET = "/run/confidential-containers/cvm-agent/agent.sock"
DEFAULT_AA_TTRPC_SOCKET = "/run/confidential-containers/attestation-agent/attestation-agent.sock"
DATA_HUB_BACKENDS = ("kbs", "passport", "offline")
TEE_NAMES = TEE_CHOICES
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenAddress:
    """A unix socket path or a loopback TCP `host:port`."""

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    def grpc_target(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.unix_path if self.unix_path is not None else self.grpc_target()


def parse_listen_address(text: object, *, key: str = "socket") -> ListenAddress:
    """Accept `PATH`, `unix:PATH`, `unix://PATH` (`unix:///abs`), or a loopback `host:port`."""
    if not isinstance(text, str) or not text:
        msg = f"`{key}` is {text!r}, expected a socket path or loopback host:port"
        raise ConfigError(msg, key=key)
    if text.startswith("unix://"):
        path = text[len("unix://") :]
    elif text.startswith("unix:"):
        path = text[len("unix:") :]
    elif text.startswith(("/", ".")) or ":" not in text:
        path = text
    else:
        host, _, port_text = text.rpartition(":")
        host = host.strip("[]")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            msg = f"`{key}` is {text!r}: port {port_text!r} is not in 1..65535"
            raise ConfigError(msg, key=key)
        if host != "localhost":
            import ipaddress  # TCP listeners are rare: the drop-ins never load it

            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                msg = f"`{key}` is {text!r}: TCP listeners must be on loopback (127.0.0.0/8, ::1, localhost)"
                raise ConfigError(msg, key=key)
        return ListenAddress(host="127.0.0.1" if host == "localhost" else host, port=int(port_text))
    if not path or "\x00" in path:
        msg = f"`{key}` is {text!r}, expected a socket path"
        raise ConfigError(msg, key=key)
    if len(path.encode()) > 107:
        msg = f"`{key}` path is {len(path.encode())} bytes, expected at most 107 (the unix socket limit)"
        raise ConfigError(msg, key=key)
    return ListenAddress(unix_path=path)


PLAIN_HTTP_RISK = (
    "plain HTTP to the KBS: anyone on the path, the host included, can answer the handshake and substitute any "
    "secret; JWE protects only against passive readers of the response. Use https:// outside development."
)


@dataclass(frozen=True, slots=True, kw_only=True)
class KbsConfig:
    """The KBS and how to talk to it. The one home of the KBS client's defaults."""

    url: str | None = None
    cert_path: str | None = None  # extra CA certificate, a PEM file
    cert_pem: str | None = None  # or the certificate itself (the reference AA/CDH configs carry PEM text)
    tee_key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    timeout_s: float = 60.0
    max_response_bytes: int = 16 * 1024 * 1024
    token_refresh_margin_s: float = 30.0
    # load the KBS HTTP client and JWE crypto in the background once serving (only where this process runs the
    # handshake for its own data hub: `cvm-agent serve`); false: at the first KBS call, less memory until then
    preload: bool = True

    @property
    def insecure_http(self) -> bool:
        return self.url is not None and self.url.startswith("http://")


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialFile:
    """A KBS resource the data hub writes to a file at start (the reference CDH's `[[credentials]]`)."""

    resource_uri: str
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DataHubConfig:
    kek_cache_s: float = 300.0
    skip_sealed_secret_verification: bool = False
    sealed_secret_key_dir: str = "/run/confidential-containers/cdh/sealed-secret"
    # where resources come from: "kbs" = this process's own attested KBS session; "passport" = tokens from the
    # attestation agent on `aa_socket` (the reference CDH's cc_kbc); "offline" = local files (offline_fs_kbc)
    backend: str = "kbs"
    aa_socket: str = DEFAULT_AA_TTRPC_SOCKET
    offline_files: tuple[str, ...] = ()
    credentials: tuple[CredentialFile, ...] = ()
    # write the guest's ocicrypt config here at start unless OCICRYPT_KEYPROVIDER_CONFIG is set (None: never)
    ocicrypt_config: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InitdataConfig:
    """Initdata to bind at start: the TOML document (`toml`, a path) or only its digest (`digest`, base64)."""

    toml: str | None = None
    digest: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EventlogConfig:
    """Runtime measurement (`[eventlog]`; the AA's `[eventlog_config]`). `path` None: `$AAEL_PATH`, else
    /run/attestation-agent/eventlog (as the reference)."""

    enabled: bool = False
    path: str | None = None
    init_pcr: int = 17


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class TeePaths:
    """Where the kernel's TEE interfaces live. Defaults are the real locations; emulators point elsewhere."""

    tsm_report_dir: str = "/sys/kernel/config/tsm/report"
    tdx_guest_device: str = "/dev/tdx_guest"
    sev_guest_device: str = "/dev/sev-guest"
    sev_guest_platform_dir: str = "/sys/devices/platform/sev-guest"
    tdx_measurements_dir: str = "/sys/devices/virtual/misc/tdx_guest/measurements"
    ccel_data: str = "/sys/firmware/acpi/tables/data/CCEL"

    def describe(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in TEE_PATH_FLAGS}


# `tee_paths` key -> command-line flag
TEE_PATH_FLAGS: dict[str, str] = {
    "tsm_report_dir": "--tsm-report-dir",
    "tdx_guest_device": "--tdx-guest-device",
    "sev_guest_device": "--sev-guest-device",
    "sev_guest_platform_dir": "--sev-guest-platform-dir",
    "tdx_measurements_dir": "--tdx-measurements-dir",
    "ccel_data": "--ccel-data",
}
SNP_VMPL_MAX = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpConfig:
    vmpl: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    tee: str = "auto"
    # the gRPC listener (None: no gRPC, as in the ttRPC-only drop-ins)
    socket: ListenAddress | None = field(default_factory=lambda: ListenAddress(unix_path=DEFAULT_SOCKET))
    grpc_listen: tuple[ListenAddress, ...] = ()
    kbs: KbsConfig = field(default_factory=KbsConfig)
    data_hub: DataHubConfig = field(default_factory=DataHubConfig)
    eventlog: EventlogConfig = field(default_factory=EventlogConfig)
    log: LogConfig = field(default_factory=LogConfig)
    snp: SnpConfig = field(default_factory=SnpConfig)
    tee_paths: TeePaths = field(default_factory=TeePaths)
    initdata: InitdataConfig = field(default_factory=InitdataConfig)
    image: ImageConfig = field(default_factory=ImageConfig)  # guest image pull (agent.image.settings)
    # ttRPC on the reference sockets, so one `cvm-agent serve` can stand in for the AA and the data hub too
    ttrpc_aa_socket: str | None = None
    ttrpc_cdh_socket: str | None = None
    reply_budget_mib: int = 32  # agent.api.budget: replies held for local peers, all transports together

    def with_overrides(
        self,
        *,
        tee: str | None = None,
        socket: str | None = None,
        kbs_url: str | None = None,
        kbs_cert: str | None = None,
        log_level: str | None = None,
        snp_vmpl: int | None = None,
        tee_paths: Mapping[str, str | None] | None = None,
        ttrpc_aa_socket: str | None = None,
        ttrpc_cdh_socket: str | None = None,
        initdata_toml: str | None = None,
    ) -> Config:
        """Apply command-line overrides, validating each like its config key.

        `tee_paths` maps `tee_paths` keys to values (None: not given); unknown keys are a programming error.
        """
        cfg = self
        if tee is not None:
            cfg = replace(cfg, tee=_tee(tee, "--tee"))
        if socket is not None:
            cfg = replace(cfg, socket=parse_listen_address(socket, key="--socket"))
        if kbs_url is not None:
            cfg = replace(cfg, kbs=replace(cfg.kbs, url=_kbs_url(kbs_url, "--kbs-url")))
        if kbs_cert is not None:
            cfg = replace(cfg, kbs=replace(cfg.kbs, cert_path=_cert(kbs_cert, "--kbs-cert")))
        if log_level is not None:
            cfg = replace(cfg, log=replace(cfg.log, level=_choice(log_level, LOG_LEVELS, "--log-level")))
        if ttrpc_aa_socket is not None:
            cfg = replace(cfg, ttrpc_aa_socket=_ttrpc_socket(ttrpc_aa_socket, "--ttrpc-aa-socket"))
        if ttrpc_cdh_socket is not None:
            cfg = replace(cfg, ttrpc_cdh_socket=_ttrpc_socket(ttrpc_cdh_socket, "--ttrpc-cdh-socket"))
        if initdata_toml is not None:
            cfg = replace(cfg, initdata=InitdataConfig(toml=_abs_path(initdata_toml, "--initdata-toml")))
        if snp_vmpl is not None:
            cfg = replace(cfg, snp=SnpConfig(vmpl=_integer(snp_vmpl, "--snp-vmpl", low=0, high=SNP_VMPL_MAX)))
        for name, value in (tee_paths or {}).items():
            if name not in TEE_PATH_FLAGS:
                msg = f"unknown tee_paths key {name!r}"
                raise ValueError(msg)
            if value is not None:
                path = _abs_path(value, TEE_PATH_FLAGS[name])
                cfg = replace(cfg, tee_paths=replace(cfg.tee_paths, **{name: path}))
        return cfg

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for `check-config` (contains no secrets: the config holds none)."""
        return {
            "tee": self.tee,
            "socket": None if self.socket is None else str(self.socket),
            "grpc_listen": [str(a) for a in self.grpc_listen],
            "kbs": {
                "url": self.kbs.url,
                "cert": self.kbs.cert_path,
                "cert_pem": self.kbs.cert_pem is not None,
                "tee_key_algorithm": self.kbs.tee_key_algorithm.value,
                "timeout_s": self.kbs.timeout_s,
                "max_response_bytes": self.kbs.max_response_bytes,
                "token_refresh_margin_s": self.kbs.token_refresh_margin_s,
                "preload": self.kbs.preload,
            },
            "data_hub": {
                "kek_cache_s": self.data_hub.kek_cache_s,
                "skip_sealed_secret_verification": self.data_hub.skip_sealed_secret_verification,
                "sealed_secret_key_dir": self.data_hub.sealed_secret_key_dir,
                "backend": self.data_hub.backend,
                "aa_socket": self.data_hub.aa_socket,
                "offline_files": list(self.data_hub.offline_files),
                "credentials": [{"resource_uri": c.resource_uri, "path": c.path} for c in self.data_hub.credentials],
                "ocicrypt_config": self.data_hub.ocicrypt_config,
            },
            "initdata": {"toml": self.initdata.toml, "digest": self.initdata.digest},
            "eventlog": {
                "enabled": self.eventlog.enabled,
                "path": self.eventlog.path,
                "init_pcr": self.eventlog.init_pcr,
            },
            "log": {"level": self.log.level, "format": self.log.format},
            "snp": {"vmpl": self.snp.vmpl},
            "tee_paths": self.tee_paths.describe(),
            "ttrpc_aa_socket": self.ttrpc_aa_socket,
            "ttrpc_cdh_socket": self.ttrpc_cdh_socket,
            "reply_budget_mib": self.reply_budget_mib,
            "image": self.image.describe(),
        }


def _ttrpc_socket(value: object, key: str) -> str | None:
    """A ttRPC unix socket path (`unix:///path` or `/path`); the empty string turns the listener off."""
    if value == "":
        return None
    address = parse_listen_address(value, key=key)
    if address.unix_path is None or not address.unix_path.startswith("/"):
        msg = f"`{key}` is {value!r}, expected an absolute unix socket path (ttRPC is unix-only)"
        raise ConfigError(msg, key=key)
    return address.unix_path


def _choice(value: object, allowed: tuple[str, ...], key: str) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        msg = f"`{key}` is {value!r}, expected one of: {', '.join(allowed)}"
        raise ConfigError(msg, key=key)
    return value.lower()


def _tee(value: object, key: str) -> str:
    return _choice(value, TEE_NAMES, key)


def _kbs_url(value: object, key: str) -> str:
    if not isinstance(value, str):
        msg = f"`{key}` is {value!r}, expected an http(s) URL"
        raise ConfigError(msg, key=key)
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"`{key}` is {value!r}, expected an http:// or https:// URL with a host"
        raise ConfigError(msg, key=key)
    if parts.query or parts.fragment or parts.username or parts.password:
        msg = f"`{key}` is {value!r}: query, fragment and credentials are not allowed"
        raise ConfigError(msg, key=key)
    try:
        _ = parts.port
    except ValueError as exc:
        msg = f"`{key}` is {value!r}: the port is not valid"
        raise ConfigError(msg, key=key) from exc
    return value.rstrip("/")


def _cert(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        msg = f"`{key}` is {value!r}, expected the path of a PEM certificate file"
        raise ConfigError(msg, key=key)
    return value


def _abs_path(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        msg = f"`{key}` is {value!r}, expected an absolute path"
        raise ConfigError(msg, key=key)
    return value


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        msg = f"`{key}` is {value!r}, expected true or false"
        raise ConfigError(msg, key=key)
    return value


def _number(value: object, key: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        msg = f"`{key}` is {value!r}, expected a number from {low:g} to {high:g}"
        raise ConfigError(msg, key=key)
    return float(value)


def _integer(value: object, key: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        msg = f"`{key}` is {value!r}, expected a whole number from {low} to {high}"
        raise ConfigError(msg, key=key)
    return value


def _table(data: Mapping[str, Any], name: str, known: set[str]) -> Mapping[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, Mapping):
        msg = f"`{name}` is {table!r}, expected a table"
        raise ConfigError(msg, key=name)
    unknown = sorted(set(table) - known)
    if unknown:
        msg = f"`{name}.{unknown[0]}` is not a known key (known: {', '.join(sorted(known))})"
        raise ConfigError(msg, key=f"{name}.{unknown[0]}")
    return table


def _kbs(data: Mapping[str, Any]) -> KbsConfig:
    kbs_known = {
        "url",
        "cert",
        "tee_key_algorithm",
        "timeout_s",
        "max_response_bytes",
        "token_refresh_margin_s",
        "preload",
    }
    kbs = _table(data, "kbs", kbs_known)
    k = KbsConfig()
    if "url" in kbs:
        k = replace(k, url=_kbs_url(kbs["url"], "kbs.url"))
    if "cert" in kbs:
        k = replace(k, cert_path=_cert(kbs["cert"], "kbs.cert"))
    if "tee_key_algorithm" in kbs:
        names = tuple(a.value for a in KeyAlgorithm)
        value = kbs["tee_key_algorithm"]
        if value not in names:
            msg = f"`kbs.tee_key_algorithm` is {value!r}, expected one of: {', '.join(names)}"
            raise ConfigError(msg, key="kbs.tee_key_algorithm")
        k = replace(k, tee_key_algorithm=KeyAlgorithm(value))
    if "timeout_s" in kbs:
        k = replace(k, timeout_s=_number(kbs["timeout_s"], "kbs.timeout_s", low=0.1, high=600))
    if "max_response_bytes" in kbs:
        value = _integer(kbs["max_response_bytes"], "kbs.max_response_bytes", low=1024, high=1 << 30)
        k = replace(k, max_response_bytes=value)
    if "token_refresh_margin_s" in kbs:
        value_f = _number(kbs["token_refresh_margin_s"], "kbs.token_refresh_margin_s", low=0, high=3600)
        k = replace(k, token_refresh_margin_s=value_f)
    if "preload" in kbs:
        k = replace(k, preload=_bool(kbs["preload"], "kbs.preload"))
    return k


def _data_hub(data: Mapping[str, Any]) -> DataHubConfig:
    hub_known = {"kek_cache_s", "skip_sealed_secret_verification", "sealed_secret_key_dir"}
    hub = _table(data, "data_hub", hub_known)
    h = DataHubConfig()
    if "kek_cache_s" in hub:
        h = replace(h, kek_cache_s=_number(hub["kek_cache_s"], "data_hub.kek_cache_s", low=0, high=86400))
    if "skip_sealed_secret_verification" in hub:
        skip = _bool(hub["skip_sealed_secret_verification"], "data_hub.skip_sealed_secret_verification")
        h = replace(h, skip_sealed_secret_verification=skip)
    if "sealed_secret_key_dir" in hub:
        key_dir = hub["sealed_secret_key_dir"]
        if not isinstance(key_dir, str) or not key_dir.startswith("/"):
            msg = f"`data_hub.sealed_secret_key_dir` is {key_dir!r}, expected an absolute path"
            raise ConfigError(msg, key="data_hub.sealed_secret_key_dir")
        h = replace(h, sealed_secret_key_dir=key_dir)
    return h


PCR_MAX = 23


def _eventlog(data: Mapping[str, Any]) -> EventlogConfig:
    table = _table(data, "eventlog", {"enabled", "path", "init_pcr"})
    e = EventlogConfig()
    if "enabled" in table:
        e = replace(e, enabled=_bool(table["enabled"], "eventlog.enabled"))
    if "path" in table:
        e = replace(e, path=_abs_path(table["path"], "eventlog.path"))
    if "init_pcr" in table:
        e = replace(e, init_pcr=_integer(table["init_pcr"], "eventlog.init_pcr", low=0, high=PCR_MAX))
    return e


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Build a validated Config from parsed TOML. Unknown keys are errors (typos must not pass silently)."""
    top = {
        "tee",
        "socket",
        "grpc_listen",
        "kbs",
        "data_hub",
        "eventlog",
        "log",
        "snp",
        "tee_paths",
        "ttrpc_aa_socket",
        "ttrpc_cdh_socket",
        "initdata",
        "image",
        "reply_budget_mib",
    }
    unknown = sorted(set(data) - top)
    if unknown:
        msg = f"`{unknown[0]}` is not a known key (known: {', '.join(sorted(top))})"
        raise ConfigError(msg, key=unknown[0])
    cfg = Config()
    if "tee" in data:
        cfg = replace(cfg, tee=_tee(data["tee"], "tee"))
    if "socket" in data:
        cfg = replace(cfg, socket=parse_listen_address(data["socket"], key="socket"))
    if "ttrpc_aa_socket" in data:
        cfg = replace(cfg, ttrpc_aa_socket=_ttrpc_socket(data["ttrpc_aa_socket"], "ttrpc_aa_socket"))
    if "ttrpc_cdh_socket" in data:
        cfg = replace(cfg, ttrpc_cdh_socket=_ttrpc_socket(data["ttrpc_cdh_socket"], "ttrpc_cdh_socket"))
    if "grpc_listen" in data:
        listen = data["grpc_listen"]
        if not isinstance(listen, list):
            msg = f"`grpc_listen` is {listen!r}, expected a list of loopback host:port strings"
            raise ConfigError(msg, key="grpc_listen")
        cfg = replace(cfg, grpc_listen=tuple(parse_listen_address(a, key="grpc_listen") for a in listen))

    if "reply_budget_mib" in data:  # one largest reply (4 MiB and its framing) must fit
        cfg = replace(cfg, reply_budget_mib=_integer(data["reply_budget_mib"], "reply_budget_mib", low=5, high=4096))
    cfg = replace(cfg, kbs=_kbs(data))

    cfg = replace(cfg, data_hub=_data_hub(data))
    cfg = replace(cfg, eventlog=_eventlog(data))

    log = _table(data, "log", {"level", "format"})
    lg = cfg.log
    if "level" in log:
        lg = replace(lg, level=_choice(log["level"], LOG_LEVELS, "log.level"))
    if "format" in log:
        lg = replace(lg, format=_choice(log["format"], LOG_FORMATS, "log.format"))
    cfg = replace(cfg, log=lg)

    snp = _table(data, "snp", {"vmpl"})
    if "vmpl" in snp:
        cfg = replace(cfg, snp=SnpConfig(vmpl=_integer(snp["vmpl"], "snp.vmpl", low=0, high=SNP_VMPL_MAX)))

    initdata = _table(data, "initdata", {"toml"})
    if "toml" in initdata:
        cfg = replace(cfg, initdata=InitdataConfig(toml=_abs_path(initdata["toml"], "initdata.toml")))
    image = data.get("image", {})
    if not isinstance(image, Mapping):
        msg = f"`image` is {image!r:.80}, expected a table"
        raise ConfigError(msg, key="image")
    cfg = replace(cfg, image=parse_image_table(image, strict=True))

    paths = _table(data, "tee_paths", set(TEE_PATH_FLAGS))
    tp = cfg.tee_paths
    for name, value in paths.items():
        tp = replace(tp, **{name: _abs_path(value, f"tee_paths.{name}")})
    return replace(cfg, tee_paths=tp)


def read_input(path: str | Path, *, key: str, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a file named by configuration or a flag (`key`); `ConfigError` naming both when it cannot
    be read or is larger than `max_bytes`. The one way configuration inputs are read from disk."""
    try:
        with Path(path).open("rb") as file:
            raw = file.read(max_bytes + 1)
    except OSError as exc:
        msg = f"{key} {str(path)!r} cannot be read: {exc.strerror}"
        raise ConfigError(msg, key=key) from exc
    if len(raw) > max_bytes:
        msg = f"{key} {str(path)!r} is larger than {max_bytes} bytes"
        raise ConfigError(msg, key=key)
    return raw


def load(path: str | Path | None) -> Config:
    """Read and validate a TOML config file; `None` gives the defaults."""
    if path is None:
        return Config()
    import tomllib  # only a config file needs it

    raw = read_input(path, key="--config")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        msg = f"config file {str(path)!r} is not valid TOML: {exc}"
        raise ConfigError(msg, key="--config") from exc
    return from_mapping(data)
