"""Docker v2 and OCI manifests, indexes and image configs; platform selection; the bundle's config.json. Pure.

What is verified here: structure, media types, sizes, digests of bytes handed in. What is not: anything about the
registry (digest headers are compared by the client) or the layers' contents (the layer store checks those).
Every document is bounded in size before it is parsed; index and layer counts are bounded too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ImageFormatError, InvalidImageReference
from agent.image.reference import parse_digest
from agent.strictjson import dump_json, json_type, load_json_object

__all__ = [
    "ACCEPT",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Descriptor",
    "ImageConfig",
    "Index",
    "MAX_CONFIG_BYTES",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "Platform",
    "digest_of",
    "parse_image_config",
    "parse_manifest",
    "platform_for_machine",
    "runtime_spec",
    "select_platform",
    "verify_digest",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_MANIFEST_LIST, OCI_INDEX)
ACCEPT = ", ".join((DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX))
CONFIG_TYPES = ("application/vnd.docker.container.image.v1+json", "application/vnd.oci.image.config.v1+json")

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution registry's own manifest limit
MAX_CONFIG_BYTES = 8 * 1024 * 1024
MAX_LAYERS = 256
MAX_INDEX_ENTRIES = 1024
MAX_BLOB_BYTES = 1 << 40
MAX_ANNOTATIONS_BYTES = 256 * 1024

# `uname -m` → OCI architecture and the variant a platform of that machine expects (OS `Arch::default`).
_MACHINES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "s390x": ("s390x", None),
    "ppc64le": ("ppc64le", None),
    "riscv64": ("riscv64", None),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def platform_for_machine(machine: str, os_name: str = "linux") -> Platform:
    """The platform a puller on this machine selects (`machine` as `platform.machine()` reports it)."""
    arch, variant = _MACHINES.get(machine.lower(), (machine.lower(), None))
    return Platform(os=os_name, architecture=arch, variant=variant)


@dataclass(frozen=True, slots=True, kw_only=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def verify_digest(data: bytes, expected: str, *, what: str) -> None:
    """Raise `ImageFormatError` unless `data` hashes to `expected` (`<algorithm>:<hex>`)."""
    algorithm = expected.partition(":")[0]
    got = digest_of(data, algorithm)
    if got != expected:
        msg = f"{what} digest is {got}, expected {expected}"
        raise ImageFormatError(msg)


def _load(data: bytes, what: str, limit: int) -> dict[str, object]:
    return load_json_object(data, what, error=ImageFormatError, max_bytes=limit)


def _str(obj: Mapping[str, object], key: str, what: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        msg = f"{what} `{key}` is {json_type(value)}, expected a string"
        raise ImageFormatError(msg)
    return value


def _str_map(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        msg = f"{what} is {json_type(value)}, expected an object of strings"
        raise ImageFormatError(msg)
    if sum(len(k) + len(v) for k, v in value.items()) > MAX_ANNOTATIONS_BYTES:
        msg = f"{what} are larger than {MAX_ANNOTATIONS_BYTES} bytes"
        raise ImageFormatError(msg)
    return dict(value)


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str):
        msg = f"{what} is {json_type(value)}, expected a digest string"
        raise ImageFormatError(msg)
    try:
        return parse_digest(value, what=what)
    except InvalidImageReference as exc:
        raise ImageFormatError(str(exc)) from None


def _platform(value: object, what: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        msg = f"{what} is {json_type(value)}, expected an object"
        raise ImageFormatError(msg)
    os_name = _str(value, "os", what)
    arch = _str(value, "architecture", what)
    variant = _str(value, "variant", what, required=False)
    assert os_name is not None
    assert arch is not None
    return Platform(os=os_name, architecture=arch, variant=variant or None)


def _descriptor(value: object, what: str) -> Descriptor:
    if not isinstance(value, dict):
        msg = f"{what} is {json_type(value)}, expected an object"
        raise ImageFormatError(msg)
    media_type = _str(value, "mediaType", what)
    size = value.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_BYTES:
        msg = f"{what} `size` is {size!r}, expected a whole number from 0 to {MAX_BLOB_BYTES}"
        raise ImageFormatError(msg)
    urls = value.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        msg = f"{what} `urls` is {json_type(urls)}, expected an array of strings"
        raise ImageFormatError(msg)
    assert media_type is not None
    return Descriptor(
        media_type=media_type,
        digest=_digest(value.get("digest"), f"{what} `digest`"),
        size=size,
        annotations=_str_map(value.get("annotations"), f"{what} annotations"),
        platform=_platform(value.get("platform"), f"{what} `platform`"),
        urls=tuple(urls),
    )


def _list(value: object, what: str, limit: int) -> list[object]:
    if not isinstance(value, list):
        msg = f"{what} is {json_type(value)}, expected an array"
        raise ImageFormatError(msg)
    if len(value) > limit:
        msg = f"{what} has {len(value)} entries, expected at most {limit}"
        raise ImageFormatError(msg)
    return value


def parse_manifest(data: bytes, content_type: str | None = None) -> Manifest | Index:
    """An image manifest or an index / manifest list (schema 2 only; schema 1 is rejected as the reference does).

    The kind comes from the body's `mediaType`, else from the response `Content-Type`, else from the shape.
    """
    doc = _load(data, "manifest", MAX_MANIFEST_BYTES)
    if doc.get("schemaVersion") != 2:
        msg = f"manifest `schemaVersion` is {doc.get('schemaVersion')!r}, expected 2"
        raise ImageFormatError(msg)
    declared = _str(doc, "mediaType", "manifest", required=False)
    header = (content_type or "").partition(";")[0].strip() or None
    kind = declared or (header if header in MANIFEST_TYPES + INDEX_TYPES else None)
    if kind is None:
        kind = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if kind not in MANIFEST_TYPES + INDEX_TYPES:
        msg = f"manifest `mediaType` is {kind[:100]!r}, expected one of: {ACCEPT}"
        raise ImageFormatError(msg)
    if kind in INDEX_TYPES:
        entries = _list(doc.get("manifests"), "index `manifests`", MAX_INDEX_ENTRIES)
        return Index(
            media_type=kind,
            manifests=tuple(_descriptor(e, f"index entry {i}") for i, e in enumerate(entries)),
        )
    layers = _list(doc.get("layers"), "manifest `layers`", MAX_LAYERS)
    config = _descriptor(doc.get("config"), "manifest `config`")
    if config.media_type not in CONFIG_TYPES:
        msg = f"manifest config `mediaType` is {config.media_type[:100]!r}, expected one of: {', '.join(CONFIG_TYPES)}"
        raise ImageFormatError(msg)
    if config.size > MAX_CONFIG_BYTES:
        msg = f"image config is {config.size} bytes, expected at most {MAX_CONFIG_BYTES}"
        raise ImageFormatError(msg)
    return Manifest(
        media_type=kind,
        config=config,
        layers=tuple(_descriptor(e, f"layer {i}") for i, e in enumerate(layers)),
    )


def select_platform(index: Index, target: Platform) -> Descriptor:
    """The index entry for `target`: an entry whose os, architecture and variant all match wins; otherwise the
    first whose os and architecture match (the reference ignores the variant). Entries that are not image
    manifests (attestation manifests, nested indexes) are skipped."""
    candidates = [
        d
        for d in index.manifests
        if d.platform is not None
        and d.media_type in MANIFEST_TYPES
        and d.platform.os == target.os
        and d.platform.architecture == target.architecture
    ]
    if target.variant is not None:
        for d in candidates:
            assert d.platform is not None
            if d.platform.variant == target.variant:
                return d
    if not candidates:
        msg = f"no entry found in image index manifest matching client's default platform ({target})"
        raise ImageFormatError(msg)
    return candidates[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageConfig:
    os: str
    architecture: str
    diff_ids: tuple[str, ...]
    document: Mapping[str, Any]


def parse_image_config(data: bytes) -> ImageConfig:
    """The image config blob: `os`, `architecture`, `rootfs.diff_ids` (checked), and the document for config.json."""
    doc = _load(data, "image config", MAX_CONFIG_BYTES)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict):
        msg = f"image config `rootfs` is {json_type(rootfs)}, expected an object"
        raise ImageFormatError(msg)
    diff_ids = _list(rootfs.get("diff_ids"), "image config `rootfs.diff_ids`", MAX_LAYERS)
    os_name = _str(doc, "os", "image config")
    arch = _str(doc, "architecture", "image config")
    assert os_name is not None
    assert arch is not None
    inner = doc.get("config")
    if inner is not None and not isinstance(inner, dict):
        msg = f"image config `config` is {json_type(inner)}, expected an object"
        raise ImageFormatError(msg)
    return ImageConfig(
        os=os_name,
        architecture=arch,
        diff_ids=tuple(_digest(d, f"image config diff_id {i}") for i, d in enumerate(diff_ids)),
        document=doc,
    )


_ANNOTATION_FIELDS = (
    ("org.opencontainers.image.os", "os"),
    ("org.opencontainers.image.os.version", "os.version"),
    ("org.opencontainers.image.architecture", "architecture"),
    ("org.opencontainers.image.variant", "variant"),
    ("org.opencontainers.image.author", "author"),
    ("org.opencontainers.image.created", "created"),
)
_DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"]
_VOLUME_OPTIONS = ["nosuid", "noexec", "nodev", "relatime", "rw"]


def _strings(value: object) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def runtime_spec(config: ImageConfig) -> bytes:
    """The OCI runtime spec the reference writes to `<bundle>/config.json` (image-pull.md §2.9): hostname
    `image-rs`, process from WorkingDir / Env / Entrypoint+Cmd (User not converted), Volumes as tmpfs mounts,
    annotations from Labels plus the image's os/architecture/... unless a Label sets them."""
    doc = config.document
    inner = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    assert isinstance(inner, dict)
    process: dict[str, Any] = {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"}
    process["env"] = _strings(inner.get("Env")) or list(_DEFAULT_ENV)
    if isinstance(inner.get("WorkingDir"), str) and inner["WorkingDir"]:
        process["cwd"] = inner["WorkingDir"]
    args = (_strings(inner.get("Entrypoint")) or []) + (_strings(inner.get("Cmd")) or [])
    if args:
        process["args"] = args
    labels = _str_map(inner.get("Labels"), "image config labels") if isinstance(inner.get("Labels"), dict) else {}
    annotations = dict(labels)
    stop_signal = inner.get("StopSignal")
    if isinstance(stop_signal, str) and "org.opencontainers.image.stopSignal" not in labels:
        annotations["org.opencontainers.image.stopSignal"] = stop_signal
    ports = inner.get("ExposedPorts")
    if isinstance(ports, dict) and ports:
        annotations["org.opencontainers.image.exposedPorts"] = ",".join(sorted(ports))
    for key, name in _ANNOTATION_FIELDS:
        value = doc.get(name)
        if isinstance(value, str) and key not in labels:
            annotations[key] = value
    features = doc.get("os.features")
    if isinstance(features, list) and "org.opencontainers.image.os.features" not in labels:
        annotations["org.opencontainers.image.os.features"] = dump_json(features).decode()
    mounts: list[dict[str, Any]] = []
    volumes = inner.get("Volumes")
    if isinstance(volumes, dict):
        mounts = [{"destination": v, "type": "tmpfs", "options": list(_VOLUME_OPTIONS)} for v in sorted(volumes)]
    mounts += [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    spec = {
        "ociVersion": "1.0.2-dev",
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "image-rs",
        "process": process,
        "mounts": mounts,
        "annotations": annotations,
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }
    return dump_json(spec)
