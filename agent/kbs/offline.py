"""`offline_fs_kbc`: resources from local JSON files instead of a KBS (no attestation). Edge (files).

As the reference data hub: `/etc/aa-offline_fs_kbc-keys.json` and `/etc/aa-offline_fs_kbc-resources.json`
(plus `$OFFLINE_FS_KBC_EXTRA_FILE_PATH`) each map `<repo>/<type>/<tag>` to standard base64; a missing file is
skipped with a warning, a malformed one is an error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from pathlib import Path

from agent.errors import ConfigError, ResourceNotFound
from agent.kbs.resource import ResourceUri
from agent.log import get_logger
from agent.strictjson import load_json

__all__ = ["DEFAULT_FILES", "OfflineFsKbc", "parse_resource_file"]

log = get_logger("agent.kbs.offline")

DEFAULT_FILES = ("/etc/aa-offline_fs_kbc-keys.json", "/etc/aa-offline_fs_kbc-resources.json")
MAX_FILE_BYTES = 16 * 1024 * 1024


def parse_resource_file(raw: bytes, *, source: str) -> dict[str, bytes]:
    value = load_json(raw, f"offline_fs_kbc file {source}", error=ConfigError)
    if not isinstance(value, dict):
        msg = f"offline_fs_kbc file {source} is not a JSON object of <repo>/<type>/<tag> -> base64"
        raise ConfigError(msg, key=source)
    result: dict[str, bytes] = {}
    for key, item in value.items():
        if not isinstance(item, str):
            msg = f"offline_fs_kbc file {source}: the value of {key!r} is not a base64 string"
            raise ConfigError(msg, key=source)
        try:
            result[key] = base64.b64decode(item, validate=True)
        except binascii.Error as exc:
            msg = f"offline_fs_kbc file {source}: the value of {key!r} is not standard base64"
            raise ConfigError(msg, key=source) from exc
    return result


class OfflineFsKbc:
    """A resource backend that never contacts a KBS. Insecure for secrets that must follow attestation."""

    def __init__(self, files: Iterable[str]) -> None:
        self._resources: dict[str, bytes] = {}
        for name in files:
            path = Path(name)
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    msg = f"offline_fs_kbc file {name} is larger than {MAX_FILE_BYTES} bytes"
                    raise ConfigError(msg, key=name)
                raw = path.read_bytes()
            except FileNotFoundError:
                log.warning("offline_fs_kbc.file_missing", path=name)
                continue
            for key, data in parse_resource_file(raw, source=name).items():
                if key in self._resources:
                    log.warning("offline_fs_kbc.duplicate", resource=key, path=name)
                self._resources[key] = data
        log.warning("offline_fs_kbc.enabled", resources=len(self._resources), warning="no attestation: local files")

    async def get_resource(self, uri: ResourceUri) -> bytes:
        try:
            return self._resources[uri.path]
        except KeyError:
            msg = f"offline_fs_kbc has no resource {uri.path}"
            raise ResourceNotFound(msg) from None

    async def aclose(self) -> None:
        return None
