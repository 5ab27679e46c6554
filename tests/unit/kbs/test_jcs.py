"""RFC 8785 canonicalisation: known answers and agreement with the independent `rfc8785` package."""

from __future__ import annotations

import hashlib
import math

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.kbs.jcs import canonicalize

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text() | st.floats(allow_nan=False)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


class TestKnownAnswers:
    def test_trustee_as_example(self) -> None:
        # Trustee's AS test: JCS of {"b":1,"a":"test","c":{"d":"e"}} hashed with SHA-384 (kbs-protocol.md §5.1)
        data = canonicalize({"b": 1, "a": "test", "c": {"d": "e"}})
        assert data == b'{"a":"test","b":1,"c":{"d":"e"}}'
        assert hashlib.sha384(data).hexdigest() == (
            "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c4597480a186427c813ca941da78870c3"
        )

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (1e21, b"1e+21"),
            (1e20, b"100000000000000000000"),
            (1e-7, b"1e-7"),
            (0.000001, b"0.000001"),
            (-0.0, b"0"),
            (5e-324, b"5e-324"),
            ("\u20ac\n\x1f", '"\u20ac\\n\\u001f"'.encode()),
            ({"\u20ac": 1, "\r": 2, "1": 3}, b'{"\\r":2,"1":3,"\xe2\x82\xac":1}'),
        ],
    )
    def test_rfc8785_examples(self, value: object, expected: bytes) -> None:
        assert canonicalize(value) == expected

    def test_utf16_key_order(self) -> None:
        # U+10000 (surrogate pair D800 DC00) sorts before U+FB33 in UTF-16 code units, unlike code points.
        assert canonicalize({"\ufb33": 1, "\U00010000": 2}) == '{"\U00010000":2,"\ufb33":1}'.encode()

    @pytest.mark.parametrize("bad", [math.nan, math.inf, 2**53 + 1, "\ud800", b"bytes", {1: 2}, object()])
    def test_rejects_non_json(self, bad: object) -> None:
        with pytest.raises((ValueError, TypeError)):
            canonicalize(bad)


@settings(max_examples=300)
@given(json_values)
def test_matches_independent_implementation(value: object) -> None:
    try:
        expected = rfc8785.dumps(value)  # type: ignore[arg-type]  # hypothesis builds JSON values
    except (rfc8785.CanonicalizationError, ValueError, TypeError):
        with pytest.raises((ValueError, TypeError)):
            canonicalize(value)
        return
    assert canonicalize(value) == expected
