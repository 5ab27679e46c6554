"""Resource URI validation: everything malformed is rejected before any network traffic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import InvalidResourceUri
from agent.kbs.resource import ResourceUri, parse_resource_uri


@pytest.mark.parametrize(
    ("uri", "path", "plugin"),
    [
        ("kbs:///default/key/1", "/kbs/v0/resource/default/key/1", "resource"),
        ("kbs://kbs.example:8080/default/key/1", "/kbs/v0/resource/default/key/1", "resource"),
        ("kbs://10.0.0.1/one/2/trois", "/kbs/v0/resource/one/2/trois", "resource"),
        ("kbs://[::1]:80/a/b/c", "/kbs/v0/resource/a/b/c", "resource"),
        ("kbs:///a-b/c_d/e.f", "/kbs/v0/resource/a-b/c_d/e.f", "resource"),
        ("kbs:///a/b/c?version=2", "/kbs/v0/resource/a/b/c?version=2", "resource"),
        ("kbs+sample:///a/b/c", "/kbs/v0/sample/a/b/c", "sample"),
    ],
)
def test_valid(uri: str, path: str, plugin: str) -> None:
    parsed = parse_resource_uri(uri)
    assert parsed.kbs_path() == path
    assert parsed.plugin == plugin


def test_str_drops_host() -> None:
    assert str(parse_resource_uri("kbs://host:1/a/b/c")) == "kbs:///a/b/c"
    assert parse_resource_uri("kbs:///a/b/c").path == "a/b/c"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("default/key/1", "no scheme"),
        ("http:///a/b/c", "scheme is 'http'"),
        ("kbs+UPPER:///a/b/c", "scheme"),
        ("kbs://", "no path"),
        ("kbs:///a/b", "2 segments"),
        ("kbs:///a/b/c/d", "4 segments"),
        ("kbs:///a/../c", "type segment '..'"),
        ("kbs:///../b/c", "repo segment '..'"),
        ("kbs:///a//c", "type segment ''"),
        ("kbs:///a/b/", "tag segment ''"),
        ("kbs:///a/b/.hidden", "tag segment '.hidden'"),
        ("kbs:///a/b/c%2f", "tag segment"),
        ("kbs:///a/b/c d", "tag segment"),
        ("kbs:///a/b/c\x00", "tag segment"),
        ("kbs:///a/b/c#frag", "fragment"),
        ("kbs:///a/b/c?x=<script>", "query"),
        ("kbs://user@host/a/b/c", "host"),
        ("kbs://host:port/a/b/c", "host"),
        ("kbs:///" + "a" * 3000 + "/b/c", "at most 2048"),
    ],
)
def test_invalid(uri: str, message: str) -> None:
    with pytest.raises(InvalidResourceUri, match=message.replace("?", r"\?").replace("+", r"\+")):
        parse_resource_uri(uri)


@given(st.text(max_size=80))
def test_random_text_parses_or_raises(text: str) -> None:
    try:
        parsed = parse_resource_uri(text)
    except InvalidResourceUri:
        return
    assert isinstance(parsed, ResourceUri)
    assert ".." not in parsed.path.split("/")
    assert parse_resource_uri(str(parsed)) == parsed
