"""registries.conf rules → ordered pull tasks (image-pull.md §2.3)."""

from __future__ import annotations

import re
import tomllib

import pytest

from agent.errors import ConfigError, ImageRejected
from agent.image.reference import parse_reference
from agent.image.registries import parse_registry_config, parse_registry_config_toml, pull_tasks


def tasks(conf: str | None, image: str) -> list[str]:
    config = parse_registry_config(tomllib.loads(conf)) if conf is not None else None
    return [str(t) for t in pull_tasks(parse_reference(image), config)]


class TestPullTasks:
    def test_no_config_is_one_https_task(self) -> None:
        assert tasks(None, "busybox") == ["https://docker.io/library/busybox:latest"]

    def test_unqualified_search_expands_docker_hub(self) -> None:
        conf = 'unqualified-search-registries = ["mirror.local:5000", "docker.io"]'
        assert tasks(conf, "docker.io/library/busybox:1") == [
            "https://mirror.local:5000/busybox:1",  # `library/` dropped for non-docker.io entries
            "https://docker.io/library/busybox:1",
        ]
        assert tasks(conf, "quay.io/a/b") == ["https://quay.io/a/b:latest"]

    def test_mirrors_then_location(self) -> None:
        conf = """
[[registry]]
prefix = "quay.io/org"
location = "remap.local/other"
insecure = true
[[registry.mirror]]
location = "m1.local/org"
[[registry.mirror]]
location = "m2.local:5000/org"
insecure = true
"""
        assert tasks(conf, "quay.io/org/app:v1") == [
            "https://m1.local/org/app:v1",
            "http://m2.local:5000/org/app:v1",
            "http://remap.local/other/app:v1",
        ]

    def test_longest_prefix_wins_and_boundary(self) -> None:
        conf = """
[[registry]]
prefix = "quay.io"
location = "a.local"
[[registry]]
prefix = "quay.io/org/app"
location = "b.local/x"
"""
        assert tasks(conf, "quay.io/org/app:v1") == ["https://b.local/x:v1"]
        assert tasks(conf, "quay.io/org/application") == ["https://a.local/org/application:latest"]

    def test_empty_prefix_takes_location_and_insecure(self) -> None:
        conf = '[[registry]]\nlocation = "localhost:5000"\ninsecure = true'
        assert tasks(conf, "localhost:5000/app") == ["http://localhost:5000/app:latest"]
        assert tasks(conf, "localhost:50001/app") == ["https://localhost:50001/app:latest"]

    def test_wildcard_host(self) -> None:
        conf = '[[registry]]\nprefix = "*.example.com"\nblocked = true'
        with pytest.raises(ImageRejected, match=re.escape("image a.example.com/x:latest is blocked by registry rule")):
            tasks(conf, "a.example.com/x")
        assert tasks(conf, "example.com/x") == ["https://example.com/x:latest"]

    def test_blocked_search_entry_dropped(self) -> None:
        conf = """
unqualified-search-registries = ["blocked.local", "docker.io"]
[[registry]]
prefix = "blocked.local"
blocked = true
"""
        assert tasks(conf, "busybox") == ["https://docker.io/library/busybox:latest"]

    def test_digest_kept_through_rewrite(self) -> None:
        digest = "sha256:" + "c" * 64
        conf = '[[registry]]\nprefix = "quay.io/org"\nlocation = "m.local/org"'
        assert tasks(conf, f"quay.io/org/app@{digest}") == [f"https://m.local/org/app@{digest}"]


class TestParse:
    @pytest.mark.parametrize(
        ("conf", "message"),
        [
            ("unqualified-search-registries = 3", "`unqualified-search-registries` is 3"),
            ('[[registry]]\ninsecure = "yes"\nlocation = "a"', "`registry[0].insecure` is 'yes'"),
            ("[[registry]]\nblocked = true", "`registry[0]` has neither `prefix` nor `location`"),
            ('[[registry]]\nprefix = "a.*.com"', "expected `*.` only at the start"),
            ('[[registry]]\nprefix = "x"\n[[registry.mirror]]\ninsecure = true', "entries need a `location`"),
            ('[[registry]]\nlocation = "bad location"', "expected a registry location without spaces"),
        ],
    )
    def test_rejects(self, conf: str, message: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_registry_config(tomllib.loads(conf))

    def test_toml_errors(self) -> None:
        with pytest.raises(ConfigError, match="is not valid TOML"):
            parse_registry_config_toml(b"[[registry", source="registries.conf")

    def test_bad_rewrite_is_config_error(self) -> None:
        conf = '[[registry]]\nprefix = "quay.io"\nlocation = "UPPER/Case"'
        with pytest.raises(ConfigError, match="does not form a valid image reference"):
            tasks(conf, "quay.io/a")
