"""The key-provider JSON protocol: requests as Go ocicrypt and ocicrypt-rs send them, and the replies.

The Go requests are written out exactly as `encoding/json` marshals ocicrypt v1.1.7's structs (field order as
declared, map keys sorted, nil pointers and nil slices as `null`), in the shapes captured from skopeo v1.11.2 in
reference/keyprovider.md §3.1 and §3.4 (the captures elide the long base64 values; full values are filled in).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import InvalidRequest
from agent.keyprovider.messages import (
    MAX_REQUEST_SIZE,
    UnwrapRequest,
    WrapRequest,
    parse_request,
    unwrap_reply,
    wrap_reply,
)

OPTSDATA = (
    b'{"symkey":"kZuMxk0o8Kj3xU0b3lH0fyvJ1NqYkCXh9C1Z8vW2xLQ=","digest":"sha256:'
    b'18be1897f9402f27c8c0eba7c86e0c00f5656db62961b5949d55f9565c42c6e7","cipheroptions":{"nonce":"r10F9oaCu+nWFXfod3l83g=="}}'
)
OPTSDATA_B64 = base64.b64encode(OPTSDATA).decode()
ANNOTATION = b'{"kid": "kid-tcp", "w": "abcxx"}'  # what a test provider returned at wrap time
ANNOTATION_B64 = base64.b64encode(ANNOTATION).decode()

# keyprovider.md §3.1: `--encryption-key provider:grpckp:kid-tcp`.
GO_WRAP = (
    '{"op":"keywrap",'
    '"keywrapparams":{"ec":{"Parameters":{"grpckp":["a2lkLXRjcA=="]},"DecryptConfig":{"Parameters":{}}},'
    f'"optsdata":"{OPTSDATA_B64}"}},'
    '"keyunwrapparams":{"dc":null,"annotation":null}}'
).encode()

# keyprovider.md §3.1: `provider:grpckp:a` plus `provider:grpcunix`; both providers receive both entries.
GO_WRAP_TWO_PROVIDERS = (
    '{"op":"keywrap",'
    '"keywrapparams":{"ec":{"Parameters":{"grpckp":["YQ=="],"grpcunix":["RW5hYmxlZA=="]},'
    '"DecryptConfig":{"Parameters":{}}},'
    f'"optsdata":"{OPTSDATA_B64}"}},'
    '"keyunwrapparams":{"dc":null,"annotation":null}}'
).encode()

# keyprovider.md §3.4: `--decryption-key provider:grpckp`.
GO_UNWRAP = (
    '{"op":"keyunwrap",'
    '"keywrapparams":{"ec":null,"optsdata":null},'
    '"keyunwrapparams":{"dc":{"Parameters":{"grpckp":["RW5hYmxlZA=="]}},'
    f'"annotation":"{ANNOTATION_B64}"}}}}'
).encode()

# ocicrypt-rs (serde field order), the guest's annotation provider, a KBC parameter.
RUST_UNWRAP = (
    '{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},'
    '"keyunwrapparams":{"dc":{"Parameters":{"attestation-agent":["Y2Nfa2JjOjpudWxs"]}},'
    f'"annotation":"{ANNOTATION_B64}"}}}}'
).encode()


class TestCapturedGoRequests:
    def test_fixture_matches_the_capture(self) -> None:
        assert OPTSDATA_B64.startswith("eyJzeW1rZXkiOiJrWnVN")
        assert ANNOTATION_B64.startswith("eyJraWQiOiAia2lk")
        assert ANNOTATION_B64.endswith("In0=")

    def test_wrap(self) -> None:
        request = parse_request(GO_WRAP)
        assert request == WrapRequest(optsdata=OPTSDATA, params={"grpckp": (b"kid-tcp",)})

    def test_wrap_with_two_providers(self) -> None:
        request = parse_request(GO_WRAP_TWO_PROVIDERS)
        assert isinstance(request, WrapRequest)
        assert dict(request.params) == {"grpckp": (b"a",), "grpcunix": (b"Enabled",)}

    def test_wrap_with_the_same_provider_twice(self) -> None:
        data = GO_WRAP.replace(b'["a2lkLXRjcA=="]', b'["YQ==","Yj0x"]')
        request = parse_request(data)
        assert dict(request.params) == {"grpckp": (b"a", b"b=1")}

    def test_unwrap(self) -> None:
        request = parse_request(GO_UNWRAP)
        assert request == UnwrapRequest(annotation=ANNOTATION, params={"grpckp": (b"Enabled",)})

    def test_unwrap_from_cmd_provider(self) -> None:
        data = GO_UNWRAP.replace(b'"grpckp":["RW5hYmxlZA=="]', b'"cmdkp":["ZGtleS00NTY="]')
        assert dict(parse_request(data).params) == {"cmdkp": (b"dkey-456",)}

    def test_go_nil_maps_and_slices(self) -> None:
        data = (
            b'{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"p":null,"q":[null,"YQ=="]},'
            b'"DecryptConfig":{"Parameters":null}},"optsdata":"' + OPTSDATA_B64.encode() + b'"},'
            b'"keyunwrapparams":{"dc":null,"annotation":null}}'
        )
        assert dict(parse_request(data).params) == {"p": (), "q": (b"", b"a")}

    def test_nil_parameters_map(self) -> None:
        data = GO_UNWRAP.replace(b'{"Parameters":{"grpckp":["RW5hYmxlZA=="]}}', b'{"Parameters":null}')
        assert dict(parse_request(data).params) == {}


class TestOcicryptRsRequests:
    def test_unwrap(self) -> None:
        request = parse_request(RUST_UNWRAP)
        assert request == UnwrapRequest(annotation=ANNOTATION, params={"attestation-agent": (b"cc_kbc::null",)})

    def test_unwrap_with_null_dc(self) -> None:
        data = RUST_UNWRAP.replace(b'{"Parameters":{"attestation-agent":["Y2Nfa2JjOjpudWxs"]}}', b"null")
        assert parse_request(data) == UnwrapRequest(annotation=ANNOTATION, params={})

    def test_integer_list_byte_fields(self) -> None:
        data = json.dumps(
            {
                "op": "keyunwrap",
                "keywrapparams": {"ec": None, "optsdata": None},
                "keyunwrapparams": {"dc": {"Parameters": {"aa": [list(b"x::y")]}}, "annotation": list(ANNOTATION)},
            }
        ).encode()
        assert parse_request(data) == UnwrapRequest(annotation=ANNOTATION, params={"aa": (b"x::y",)})

    def test_integer_list_optsdata(self) -> None:
        data = json.dumps(
            {"op": "keywrap", "keywrapparams": {"ec": None, "optsdata": list(OPTSDATA)}, "keyunwrapparams": {}}
        ).encode()
        assert parse_request(data) == WrapRequest(optsdata=OPTSDATA, params={})

    def test_absent_blocks(self) -> None:
        data = json.dumps({"op": "keyunwrap", "keyunwrapparams": {"annotation": ANNOTATION_B64}}).encode()
        assert parse_request(data) == UnwrapRequest(annotation=ANNOTATION, params={})

    def test_null_blocks(self) -> None:
        data = json.dumps({"op": "keyunwrap", "keywrapparams": None, "keyunwrapparams": {"annotation": [1]}})
        assert parse_request(data.encode()) == UnwrapRequest(annotation=b"\x01", params={})

    def test_unknown_members_are_ignored(self) -> None:
        data = GO_UNWRAP[:-1] + b',"future":{"x":1}}'
        assert isinstance(parse_request(data), UnwrapRequest)


def unwrap_with(params: str, extra: str = "") -> bytes:
    """A `keyunwrap` request whose `keyunwrapparams` is `params` (JSON text), plus extra top-level members."""
    return f'{{"op":"keyunwrap","keyunwrapparams":{params}{extra}}}'.encode()


def wrap_with(params: str, extra: str = "") -> bytes:
    """A `keywrap` request whose `keywrapparams` is `params` (JSON text), plus extra top-level members."""
    return f'{{"op":"keywrap","keywrapparams":{params}{extra}}}'.encode()


ANN = '{"annotation":"YQ=="'  # the start of a valid `keyunwrapparams`
NOT_B64 = "is not padded standard base64."
NOT_BYTES = "is an array holding something other than integers 0..255."
NOT_BYTE_FIELD = "expected a base64 string or an array of bytes."
NO_OP = "expected 'keywrap' or 'keyunwrap'."
NO_OPTSDATA = "`keywrapparams.optsdata` is empty or missing, expected data to wrap."
EC_DC = "`keywrapparams.ec.DecryptConfig.Parameters['x'][0]`"


class TestMalformedRequests:
    @pytest.mark.parametrize(
        ("data", "message"),
        [
            (b"", "is not valid JSON."),
            (b"null", "is null, expected a JSON object."),
            (b"[]", "is an array, expected a JSON object."),
            (b"\xfe\xff", "is not UTF-8."),
            (b'{"op":"keywrap","op":"keyunwrap"}', "has the key 'op' more than once."),
            (b"{}", f"`op` is missing, {NO_OP}"),
            (b'{"op":null}', f"`op` is null, {NO_OP}"),
            (b'{"op":"KeyWrap"}', f"`op` is 'KeyWrap', {NO_OP}"),
            (b'{"op":"keywrap"}', NO_OPTSDATA),
            (wrap_with('{"optsdata":""}'), NO_OPTSDATA),
            (wrap_with('{"optsdata":[]}'), NO_OPTSDATA),
            (wrap_with('{"optsdata":null}'), NO_OPTSDATA),
            (b'{"op":"keyunwrap"}', "`keyunwrapparams.annotation` is empty or missing, expected an annotation."),
            (unwrap_with("[]"), "`keyunwrapparams` is an array, expected an object or null."),
            (
                unwrap_with(ANN + "}", ',"keywrapparams":"x"'),
                "`keywrapparams` is a string, expected an object or null.",
            ),
            (unwrap_with('{"annotation":"YQ"}'), f"`keyunwrapparams.annotation` {NOT_B64}"),
            (unwrap_with('{"annotation":"_-8="}'), f"`keyunwrapparams.annotation` {NOT_B64}"),
            (unwrap_with('{"annotation":"YQ==\\n"}'), f"`keyunwrapparams.annotation` {NOT_B64}"),
            (
                unwrap_with('{"annotation":"YR=="}'),
                "`keyunwrapparams.annotation` is not canonical base64 (nonzero trailing bits).",
            ),
            (unwrap_with('{"annotation":{}}'), f"`keyunwrapparams.annotation` is an object, {NOT_BYTE_FIELD}"),
            (unwrap_with('{"annotation":7}'), f"`keyunwrapparams.annotation` is a number, {NOT_BYTE_FIELD}"),
            (unwrap_with('{"annotation":[256]}'), f"`keyunwrapparams.annotation` {NOT_BYTES}"),
            (unwrap_with('{"annotation":[-1]}'), f"`keyunwrapparams.annotation` {NOT_BYTES}"),
            (unwrap_with('{"annotation":[1.0]}'), f"`keyunwrapparams.annotation` {NOT_BYTES}"),
            (unwrap_with('{"annotation":[true]}'), f"`keyunwrapparams.annotation` {NOT_BYTES}"),
            (unwrap_with('{"annotation":["1"]}'), f"`keyunwrapparams.annotation` {NOT_BYTES}"),
            (unwrap_with('{"annotation":[null]}'), f"`keyunwrapparams.annotation` {NOT_BYTES}"),
            (
                unwrap_with(ANN + ',"dc":{"Parameters":[]}}'),
                "`keyunwrapparams.dc.Parameters` is an array, expected an object or null.",
            ),
            (
                unwrap_with(ANN + ',"dc":{"Parameters":{"p":"YQ=="}}}'),
                "`keyunwrapparams.dc.Parameters['p']` is a string, expected an array or null.",
            ),
            (
                unwrap_with(ANN + ',"dc":{"Parameters":{"p":["YQ"]}}}'),
                f"`keyunwrapparams.dc.Parameters['p'][0]` {NOT_B64}",
            ),
            (unwrap_with(ANN + ',"dc":true}'), "`keyunwrapparams.dc` is a boolean, expected an object or null."),
            (unwrap_with(ANN + "}", ',"keywrapparams":{"optsdata":"!"}'), f"`keywrapparams.optsdata` {NOT_B64}"),
            (
                unwrap_with(ANN + "}", ',"keywrapparams":{"ec":{"DecryptConfig":{"Parameters":{"x":[7]}}}}'),
                f"{EC_DC} is a number, {NOT_BYTE_FIELD}",
            ),
            (
                wrap_with('{"optsdata":"YQ==","ec":{"Parameters":{"x":[[1,2,300]]}}}'),
                f"`keywrapparams.ec.Parameters['x'][0]` {NOT_BYTES}",
            ),
            (wrap_with('{"optsdata":"YQ=="}', ',"x":Infinity'), "is not valid JSON."),
            (
                wrap_with('{"optsdata":"YQ=="}', ',"x":"\\udc00"'),
                "has a lone surrogate \\udc00, expected valid Unicode.",
            ),
            (
                b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"}",
                "is nested more than 64 levels deep, expected at most 64.",
            ),
        ],
    )
    def test_rejected(self, data: bytes, message: str) -> None:
        with pytest.raises(InvalidRequest, match=f"^{re.escape('key provider request ' + message)}$"):
            parse_request(data)

    def test_size_bound(self) -> None:
        padding = b" " * (MAX_REQUEST_SIZE - len(GO_UNWRAP))
        at_limit = GO_UNWRAP + padding
        assert isinstance(parse_request(at_limit), UnwrapRequest)
        message = "key provider request is 0x100001 bytes, expected at most 0x100000."
        with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):
            parse_request(at_limit + b" ")

    def test_messages_do_not_echo_secrets(self) -> None:
        secret = base64.b64encode(b"private-key-material").decode().rstrip("=")
        data = GO_UNWRAP.replace(b'"RW5hYmxlZA=="', f'"{secret}"'.encode())
        with pytest.raises(InvalidRequest) as info:
            parse_request(data)
        assert secret not in str(info.value)


class TestRequestObjects:
    def test_repr_hides_secrets(self) -> None:
        request = parse_request(GO_WRAP)
        assert "symkey" not in repr(request)
        assert "kid-tcp" not in repr(request)
        unwrap = parse_request(GO_UNWRAP.replace(b'"RW5hYmxlZA=="', b'"cHJpdmtleQ=="'))  # a `privkey` parameter
        assert "privkey" not in repr(unwrap)
        assert "kid-tcp" in repr(unwrap)  # the annotation is public: it is stored in the image manifest

    def test_params_are_read_only(self) -> None:
        request = parse_request(GO_WRAP)
        with pytest.raises(TypeError):
            request.params["x"] = ()  # type: ignore[index]


class TestReplies:
    def test_wrap_reply(self) -> None:
        assert wrap_reply(b'{"k":1}') == b'{"keywrapresults":{"annotation":[123,34,107,34,58,49,125]}}'

    def test_unwrap_reply_is_what_the_data_hub_sends(self) -> None:
        assert unwrap_reply(b"\x00\x7f\xff") == b'{"keyunwrapresults":{"optsdata":[0,127,255]}}'

    def test_replies_decode_as_go_and_rust_expect(self) -> None:
        # Both clients read a byte array from these exact members; an integer list is the common form.
        wrapped = json.loads(wrap_reply(ANNOTATION))
        assert bytes(wrapped["keywrapresults"]["annotation"]) == ANNOTATION
        assert "keyunwrapresults" not in wrapped
        unwrapped = json.loads(unwrap_reply(OPTSDATA))
        assert bytes(unwrapped["keyunwrapresults"]["optsdata"]) == OPTSDATA
        assert "keywrapresults" not in unwrapped

    @pytest.mark.parametrize("build", [wrap_reply, unwrap_reply])
    def test_empty_is_refused(self, build: object) -> None:
        assert callable(build)
        with pytest.raises(ValueError, match="refuse"):
            build(b"")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.text(max_size=8) | st.sampled_from(["YQ==", "e30="]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
MEMBERS = st.sampled_from(["ec", "dc", "optsdata", "annotation", "Parameters", "DecryptConfig"])


class TestProperties:
    @settings(max_examples=200, deadline=None)
    @given(data=st.binary(max_size=512))
    def test_random_bytes_parse_or_raise_invalid_request(self, data: bytes) -> None:
        with contextlib.suppress(InvalidRequest):
            parse_request(data)

    @settings(max_examples=300, deadline=None)
    @given(
        op=st.sampled_from(["keywrap", "keyunwrap"]),
        wrap_params=st.dictionaries(MEMBERS, JSON_VALUES, max_size=3),
        unwrap_params=st.dictionaries(MEMBERS, JSON_VALUES, max_size=3),
    )
    def test_random_structures_parse_or_raise_invalid_request(
        self, op: str, wrap_params: dict[str, object], unwrap_params: dict[str, object]
    ) -> None:
        data = json.dumps({"op": op, "keywrapparams": wrap_params, "keyunwrapparams": unwrap_params}).encode()
        try:
            request = parse_request(data)
        except InvalidRequest:
            return
        assert isinstance(request, WrapRequest if op == "keywrap" else UnwrapRequest)

    @settings(max_examples=100, deadline=None)
    @given(
        secret=st.binary(min_size=1, max_size=256),
        params=st.dictionaries(st.text(max_size=12), st.lists(st.binary(max_size=24), max_size=3), max_size=3),
        as_ints=st.booleans(),
    )
    def test_both_encodings_round_trip(self, secret: bytes, params: dict[str, list[bytes]], as_ints: bool) -> None:
        def enc(value: bytes) -> object:
            return list(value) if as_ints else base64.b64encode(value).decode()

        go_params = {name: [enc(v) for v in values] for name, values in params.items()}
        wrap = {
            "op": "keywrap",
            "keywrapparams": {
                "ec": {"Parameters": go_params, "DecryptConfig": {"Parameters": {}}},
                "optsdata": enc(secret),
            },
            "keyunwrapparams": {"dc": None, "annotation": None},
        }
        expected = {name: tuple(values) for name, values in params.items()}
        assert parse_request(json.dumps(wrap).encode()) == WrapRequest(optsdata=secret, params=expected)
        unwrap = {
            "op": "keyunwrap",
            "keywrapparams": {"ec": None, "optsdata": None},
            "keyunwrapparams": {"dc": {"Parameters": go_params}, "annotation": enc(secret)},
        }
        assert parse_request(json.dumps(unwrap).encode()) == UnwrapRequest(annotation=secret, params=expected)
