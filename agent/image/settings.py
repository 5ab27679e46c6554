"""The `[image]` configuration table: the reference CDH keys (image-pull.md §4) plus cvm-agent's deadline. Pure.

    [image]
    work_dir = "/run/kata-containers/image"
    image_security_policy_uri = "kbs:///default/security-policy/test"   # or file:///…; wins over the inline one
    image_security_policy = '{"default": [{"type": "insecureAcceptAnything"}], "transports": {}}'
    authenticated_registry_credentials_uri = "kbs:///default/credential/test"   # auth.json
    registry_configuration_uri = "file:///etc/containers/registries.conf"
    max_concurrent_layer_downloads_per_image = 3
    extra_root_certificates = ["-----BEGIN CERTIFICATE-----…"]
    pull_timeout_s = 1200.0             # cvm-agent: the per-pull deadline (kata-agent's image_pull_timeout)
    [image.registry_config]             # inline registries.conf; wins over registry_configuration_uri
    unqualified-search-registries = ["docker.io"]
    [image.image_pull_proxy]
    https_proxy = "http://proxy:3128"
    no_proxy = "localhost,.svc"

`sigstore_config_uri` / `sigstore_config` are accepted and unused: they serve `signedBy`, which cvm-agent refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError

__all__ = ["DEFAULT_WORK_DIR", "ImageConfig", "parse_image_table"]

DEFAULT_WORK_DIR = "/run/kata-containers/image"
_STRINGS = (
    "image_security_policy_uri",
    "image_security_policy",
    "sigstore_config_uri",
    "sigstore_config",
    "authenticated_registry_credentials_uri",
    "registry_configuration_uri",
)
_PROXY_KEYS = ("https_proxy", "http_proxy", "no_proxy")
KNOWN = {
    "work_dir",
    *_STRINGS,
    "registry_config",
    "max_concurrent_layer_downloads_per_image",
    "image_pull_proxy",
    "extra_root_certificates",
    "pull_timeout_s",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageConfig:
    work_dir: str = DEFAULT_WORK_DIR
    image_security_policy_uri: str | None = None
    image_security_policy: str | None = None
    sigstore_config_uri: str | None = None
    sigstore_config: str | None = None
    authenticated_registry_credentials_uri: str | None = None
    registry_configuration_uri: str | None = None
    registry_config: Mapping[str, Any] | None = None
    max_concurrent_layer_downloads_per_image: int = 3
    https_proxy: str | None = None
    http_proxy: str | None = None
    no_proxy: str | None = None
    extra_root_certificates: tuple[str, ...] = ()
    pull_timeout_s: float = 1200.0

    def describe(self) -> dict[str, Any]:
        """A JSON-able view (inline policy and certificates shown by size only)."""
        return {
            "work_dir": self.work_dir,
            "image_security_policy_uri": self.image_security_policy_uri,
            "image_security_policy": f"<{len(self.image_security_policy)} characters>"
            if self.image_security_policy
            else None,
            "authenticated_registry_credentials_uri": self.authenticated_registry_credentials_uri,
            "registry_configuration_uri": self.registry_configuration_uri,
            "registry_config": "<inline>" if self.registry_config is not None else None,
            "max_concurrent_layer_downloads_per_image": self.max_concurrent_layer_downloads_per_image,
            "image_pull_proxy": {
                "https_proxy": self.https_proxy,
                "http_proxy": self.http_proxy,
                "no_proxy": self.no_proxy,
            },
            "extra_root_certificates": len(self.extra_root_certificates),
            "pull_timeout_s": self.pull_timeout_s,
        }


def _string(table: Mapping[str, object], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is not None and (not isinstance(value, str) or "\0" in value):
        msg = f"`{where}.{key}` is {value!r:.80}, expected a string"
        raise ConfigError(msg, key=f"{where}.{key}")
    return value or None


def parse_image_table(table: Mapping[str, object], *, where: str = "image", strict: bool) -> ImageConfig:
    """Validate an `[image]` table. `strict`: unknown keys are errors (cvm-agent's own config); the reference CDH
    ignores them, so the drop-in passes False."""
    if strict:
        unknown = sorted(set(table) - KNOWN)
        if unknown:
            msg = f"`{where}.{unknown[0]}` is not a known key (known: {', '.join(sorted(KNOWN))})"
            raise ConfigError(msg, key=f"{where}.{unknown[0]}")
    values: dict[str, Any] = {key: _string(table, key, where) for key in _STRINGS}
    work_dir = table.get("work_dir", DEFAULT_WORK_DIR)
    if not isinstance(work_dir, str) or not work_dir.startswith("/") or "\0" in work_dir or ":" in work_dir:
        msg = f"`{where}.work_dir` is {work_dir!r:.80}, expected an absolute path without ':'"
        raise ConfigError(msg, key=f"{where}.work_dir")
    values["work_dir"] = work_dir.rstrip("/") or "/"
    registry_config = table.get("registry_config")
    if registry_config is not None:
        if not isinstance(registry_config, dict):
            msg = f"`{where}.registry_config` is {registry_config!r:.80}, expected a table"
            raise ConfigError(msg, key=f"{where}.registry_config")
        from agent.image.registries import parse_registry_config  # the image modules load at the first pull

        parse_registry_config(registry_config)  # validated now, so check-config reports it
        values["registry_config"] = registry_config
    concurrency = table.get("max_concurrent_layer_downloads_per_image", 3)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 64:
        msg = f"`{where}.max_concurrent_layer_downloads_per_image` is {concurrency!r}, expected 1 to 64"
        raise ConfigError(msg, key=f"{where}.max_concurrent_layer_downloads_per_image")
    values["max_concurrent_layer_downloads_per_image"] = concurrency
    proxy = table.get("image_pull_proxy", {})
    if not isinstance(proxy, dict):
        msg = f"`{where}.image_pull_proxy` is {proxy!r:.80}, expected a table"
        raise ConfigError(msg, key=f"{where}.image_pull_proxy")
    for key in _PROXY_KEYS:
        values[key] = _string(proxy, key, f"{where}.image_pull_proxy")
    for key in ("https_proxy", "http_proxy"):
        if values[key] is not None and not values[key].startswith(("http://", "https://", "socks5://")):
            msg = f"`{where}.image_pull_proxy.{key}` is {values[key]!r:.80}, expected an http(s):// or socks5:// URL"
            raise ConfigError(msg, key=f"{where}.image_pull_proxy.{key}")
    roots = table.get("extra_root_certificates", [])
    if not isinstance(roots, list) or not all(isinstance(r, str) and "BEGIN CERTIFICATE" in r for r in roots):
        msg = f"`{where}.extra_root_certificates` is not a list of PEM certificates"
        raise ConfigError(msg, key=f"{where}.extra_root_certificates")
    values["extra_root_certificates"] = tuple(roots)
    timeout = table.get("pull_timeout_s", 1200.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= 86400:
        msg = f"`{where}.pull_timeout_s` is {timeout!r}, expected a number from 1 to 86400"
        raise ConfigError(msg, key=f"{where}.pull_timeout_s")
    values["pull_timeout_s"] = float(timeout)
    return ImageConfig(**values)
