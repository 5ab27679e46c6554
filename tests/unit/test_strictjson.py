"""agent.strictjson: the JSON limits every external document goes through, and the one base64url decoder."""

from __future__ import annotations

import base64
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import InvalidRequest, KbsProtocolError
from agent.strictjson import MAX_DEPTH, b64url_decode, b64url_encode, dump_json, load_json, load_json_object

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


class TestDepth:
    @given(st.integers(min_value=1, max_value=3 * MAX_DEPTH))
    def test_arrays_accepted_up_to_the_limit(self, depth: int) -> None:
        if depth <= MAX_DEPTH:
            assert depth_of(load_json(nested(depth), "doc")) == depth
        else:
            with pytest.raises(
                InvalidRequest, match=r"^doc is nested more than 64 levels deep, expected at most 64\.$"
            ):
                load_json(nested(depth), "doc")

    @pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 1_000_000])
    def test_objects_and_deep_input_give_the_same_clean_error(self, depth: int) -> None:
        data = b'{"a":' * depth + b"1" + b"}" * depth
        with pytest.raises(KbsProtocolError, match=r"^KBS token claims is nested more than 64 levels deep"):
            load_json(data, "KBS token claims", error=KbsProtocolError)

    def test_custom_limit(self) -> None:
        assert load_json(nested(3), "doc", max_depth=3) == [[[]]]
        with pytest.raises(InvalidRequest, match="expected at most 2"):
            load_json(nested(3), "doc", max_depth=2)


class TestOddities:
    @pytest.mark.parametrize(
        ("data", "message"),
        [
            (b'"\\ud800"', "doc has a lone surrogate \\ud800, expected valid Unicode."),
            (b'{"\\udfff":1}', "doc has a lone surrogate \\udfff, expected valid Unicode."),
            (b"[NaN]", "doc is not valid JSON."),
            (b"[-Infinity]", "doc is not valid JSON."),
            (b"[1e999]", "doc is not valid JSON."),
            (b"[" + b"9" * 5000 + b"]", "doc is not valid JSON."),
            (b'{"a":1,"a":2}', "doc has the key 'a' more than once."),
            (b"\xef\xbb\xbf{}", "doc is not valid JSON."),
            (b"\xff", "doc is not UTF-8."),
            (b"{} {}", "doc is not valid JSON."),
            (b"", "doc is not valid JSON."),
        ],
    )
    def test_rejected_with_a_clean_message(self, data: bytes, message: str) -> None:
        with pytest.raises(KbsProtocolError, match=f"^{re.escape(message)}$"):
            load_json(data, "doc", error=KbsProtocolError)

    def test_object_required(self) -> None:
        with pytest.raises(InvalidRequest, match=r"^doc is an array, expected a JSON object\.$"):
            load_json_object(b"[]", "doc")

    def test_valid_unicode_passes(self) -> None:
        assert load_json('{"k":"\\ud83d\\ude00 ü"}'.encode(), "doc") == {"k": "😀 ü"}


@given(JSON_VALUES)
def test_round_trip(value: object) -> None:
    assert load_json(dump_json(value), "doc") == value


@given(st.binary(max_size=300))
def test_any_bytes_raise_only_the_chosen_error(data: bytes) -> None:
    messages: list[str] = []
    try:
        load_json(data, "doc", error=KbsProtocolError)
    except KbsProtocolError as exc:
        messages.append(str(exc))
    assert all(m.startswith("doc ") and len(m) < 120 for m in messages)


@given(st.text(alphabet='[]{}":,1a \\', max_size=400))
def test_bracket_soup_never_escapes(text: str) -> None:
    try:
        value = load_json(text, "doc")
    except InvalidRequest:
        return
    assert depth_of(value) <= MAX_DEPTH
    assert json.loads(text) == value


class TestBase64Url:
    @given(st.binary(max_size=100))
    def test_round_trip_and_agreement_with_stdlib(self, data: bytes) -> None:
        text = b64url_encode(data)
        assert b64url_decode(text, "v") == data
        assert base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) == data
        padded = base64.urlsafe_b64encode(data).decode()
        assert b64url_decode(padded, "v", padded=True) == data
        if padded != text:
            with pytest.raises(InvalidRequest, match=r"^v is not unpadded base64url\.$"):
                b64url_decode(padded, "v")

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("YR", "v is not canonical base64url (nonzero trailing bits)."),
            ("a+b/", "v is not unpadded base64url."),
            ("YQ\n", "v is not unpadded base64url."),
            ("Y", "v is not unpadded base64url."),
            ("YQ=", "v is not base64url (wrong padding)."),
            ("YQ===", "v is not base64url (wrong padding)."),
        ],
    )
    def test_rejected(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            b64url_decode(text, "v", error=ValueError, padded=True)

    def test_not_a_string(self) -> None:
        with pytest.raises(KbsProtocolError, match=r"^v is a number, expected a base64url string\.$"):
            b64url_decode(7, "v", error=KbsProtocolError)


def test_max_bytes_is_checked_before_parsing_with_the_callers_error() -> None:
    from agent.strictjson import load_json_object

    assert load_json_object(b'{"a":1}', "doc", max_bytes=7) == {"a": 1}
    with pytest.raises(ValueError, match=r"^doc is 8 bytes, expected at most 7$"):
        load_json_object(b'{"a":12}', "doc", error=ValueError, max_bytes=7)
