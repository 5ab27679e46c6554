"""registries.conf-style registry configuration and the ordered pull tasks it yields. Pure.

Schema (the reference's `registry_config` / `registry_configuration_uri`, image-pull.md §2.3):

    unqualified-search-registries = ["docker.io"]
    [[registry]]
    prefix = "quay.io/org"          # optional: defaults to `location`; `*.example.com` matches sub-domains
    location = "mirror.local/org"   # remap target
    insecure = false                # plain HTTP for this location only; certificates are never relaxed
    blocked = false
    [[registry.mirror]]
    location = "mirror2.local/org"
    insecure = true

A reference is matched against every rule's prefix; the longest match wins and must end at `:`, `/`, `@` or the
end of the reference. The rewritten reference is the mirror or location followed by the text after the match.
Tasks come out in the order they are tried: each mirror, then the location (or the original reference).
Unknown keys are ignored, as containers-registries.conf has many the reference does not use.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.errors import ConfigError, ImageRejected, InvalidImageReference
from agent.image.reference import DOCKER_HUB, ImageReference, parse_reference

__all__ = [
    "Mirror",
    "PullTask",
    "RegistryConfig",
    "RegistryRule",
    "parse_registry_config",
    "parse_registry_config_toml",
    "pull_tasks",
]

MAX_RULES = 256
MAX_MIRRORS = 16
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Mirror:
    location: str
    insecure: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryRule:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig:
    unqualified_search_registries: tuple[str, ...] = (DOCKER_HUB,)
    rules: tuple[RegistryRule, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PullTask:
    """One place to try: the (possibly rewritten) reference, and whether to use plain HTTP."""

    reference: ImageReference
    insecure: bool = False

    def __str__(self) -> str:
        return f"{'http' if self.insecure else 'https'}://{self.reference}"


def _bool(table: Mapping[str, object], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        msg = f"`{where}.{key}` is {value!r}, expected true or false"
        raise ConfigError(msg, key=f"{where}.{key}")
    return value


def _text(table: Mapping[str, object], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str) or len(value) > 1024 or any(c.isspace() for c in value):
        msg = f"`{where}.{key}` is {value!r}, expected a registry location without spaces"
        raise ConfigError(msg, key=f"{where}.{key}")
    return value


def _tables(value: object, where: str, limit: int) -> list[Mapping[str, object]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        msg = f"`{where}` is {value!r:.80}, expected an array of tables"
        raise ConfigError(msg, key=where)
    if len(value) > limit:
        msg = f"`{where}` has {len(value)} entries, expected at most {limit}"
        raise ConfigError(msg, key=where)
    return value


def parse_registry_config(data: Mapping[str, object]) -> RegistryConfig:
    """Validate a registries.conf document (already decoded from TOML)."""
    search = data.get("unqualified-search-registries", [DOCKER_HUB])
    if not isinstance(search, list) or not all(isinstance(s, str) and s for s in search) or len(search) > MAX_RULES:
        msg = f"`unqualified-search-registries` is {search!r:.80}, expected an array of registry names"
        raise ConfigError(msg, key="unqualified-search-registries")
    rules = []
    for i, table in enumerate(_tables(data.get("registry", []), "registry", MAX_RULES)):
        where = f"registry[{i}]"
        location = _text(table, "location", where)
        prefix = _text(table, "prefix", where) or location
        blocked = _bool(table, "blocked", where)
        if not prefix:
            msg = f"`{where}` has neither `prefix` nor `location`"
            raise ConfigError(msg, key=where)
        if "*" in prefix and not (prefix.startswith("*.") and "*" not in prefix[1:] and "/" not in prefix):
            msg = f"`{where}.prefix` is {prefix!r}, expected `*.` only at the start of a host name"
            raise ConfigError(msg, key=f"{where}.prefix")
        mirrors = tuple(
            Mirror(location=_text(m, "location", f"{where}.mirror[{j}]"), insecure=_bool(m, "insecure", where))
            for j, m in enumerate(_tables(table.get("mirror", []), f"{where}.mirror", MAX_MIRRORS))
        )
        if any(not m.location for m in mirrors):
            msg = f"`{where}.mirror` entries need a `location`"
            raise ConfigError(msg, key=f"{where}.mirror")
        rules.append(
            RegistryRule(
                prefix=prefix,
                location=location,
                insecure=_bool(table, "insecure", where),
                blocked=blocked,
                mirrors=mirrors,
            )
        )
    return RegistryConfig(unqualified_search_registries=tuple(search), rules=tuple(rules))


def parse_registry_config_toml(raw: bytes, *, source: str) -> RegistryConfig:
    if len(raw) > MAX_CONFIG_BYTES:
        msg = f"{source} is {len(raw)} bytes, expected at most {MAX_CONFIG_BYTES}"
        raise ConfigError(msg, key=source)
    try:
        return parse_registry_config(tomllib.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        msg = f"{source} is not valid TOML: {exc}"
        raise ConfigError(msg, key=source) from None


def _match_length(rule: RegistryRule, text: str, registry: str) -> int:
    """How many leading characters of `text` the rule's prefix matches (0: no match)."""
    if rule.prefix.startswith("*."):
        suffix = rule.prefix[1:]
        host = registry.partition(":")[0] if not registry.startswith("[") else registry
        return len(registry) if host.endswith(suffix) and len(host) > len(suffix) else 0
    if not text.startswith(rule.prefix):
        return 0
    end = len(rule.prefix)
    return end if end == len(text) or text[end] in ":/@" else 0


def _rewrite(location: str, rest: str, *, what: str) -> ImageReference:
    try:
        return parse_reference(location + rest)
    except InvalidImageReference as exc:
        msg = f"{what} {location!r} does not form a valid image reference: {exc}"
        raise ConfigError(msg, key="registry") from None


def _expand(reference: ImageReference, search: Sequence[str]) -> list[ImageReference]:
    if reference.registry != DOCKER_HUB:
        return [reference]
    expanded = []
    for registry in search:
        repository = reference.repository
        if registry != DOCKER_HUB and repository.startswith("library/"):
            repository = repository[len("library/") :]
        expanded.append(reference.with_registry(registry, repository))
    return expanded


def pull_tasks(reference: ImageReference, config: RegistryConfig | None) -> list[PullTask]:
    """The ordered places to pull `reference` from. Raises `ImageRejected` if every one is blocked."""
    if config is None:
        return [PullTask(reference=reference)]
    tasks: list[PullTask] = []
    for candidate in _expand(reference, config.unqualified_search_registries):
        text = candidate.whole()
        best: RegistryRule | None = None
        best_length = 0
        for rule in config.rules:
            length = _match_length(rule, text, candidate.registry)
            if length > best_length:
                best, best_length = rule, length
        if best is None:
            tasks.append(PullTask(reference=candidate))
            continue
        if best.blocked:
            continue
        rest = text[best_length:]
        tasks += [
            PullTask(reference=_rewrite(m.location, rest, what="mirror"), insecure=m.insecure) for m in best.mirrors
        ]
        if best.location:
            tasks.append(PullTask(reference=_rewrite(best.location, rest, what="location"), insecure=best.insecure))
        else:
            tasks.append(PullTask(reference=candidate, insecure=best.insecure))
    if not tasks:
        msg = f"image {reference} is blocked by registry rule"
        raise ImageRejected(msg)
    return tasks
