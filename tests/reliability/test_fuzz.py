"""Fuzzing (issue 9): random and structured payloads to every RPC on gRPC, ttRPC and REST, and to the parsers.

What must hold for every example: no crash (no `*.crash` log line, no exception other than the documented
`AgentError`s from a parser), no hang (every call answers within `CALL_TIMEOUT_S`), and no INTERNAL or UNKNOWN
status. Bad input is INVALID_ARGUMENT (or the specific status of a valid request the KBS refuses).

`make test` runs a slice (`FUZZ_SCALE` = 1: 5 000 examples in all); `make fuzz` runs `FUZZ_SCALE=20`
(100 000). The number of examples run is printed at the end of the session.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from cvm_tools.devkbs.server import DevKbsServer
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api.methods import Method
from agent.errors import AgentError
from agent.keyprovider import annotation, messages
from agent.secrets import sealed
from tests.reliability.harness import FUZZ_COUNTS as COUNTS
from tests.reliability.harness import InProcessAgent

pytestmark = pytest.mark.integration

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
EXAMPLES = {"grpc": 900, "ttrpc": 900, "rest": 450, "packet": 700, "keyprovider": 700, "sealed": 700, "frames": 650}
assert sum(EXAMPLES.values()) == 5000
COUNTS.update(dict.fromkeys(EXAMPLES, 0))
KEK = bytes(range(100, 132))
KEK_URI = "kbs:///default/fuzz/kek"
BAD_CODES = {"INTERNAL", "UNKNOWN"}


def fuzz_settings(name: str) -> settings:
    return settings(
        max_examples=EXAMPLES[name] * SCALE,
        derandomize=SCALE == 1,  # the CI slice is reproducible; `make fuzz` explores anew each run
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --- strategies --------------------------------------------------------------------------------------------

b64 = st.binary(max_size=96).map(lambda b: base64.b64encode(b).decode())
kids = st.one_of(
    st.just(KEK_URI),
    st.just("kbs:///default/key/1"),  # exists, but is not 32 bytes
    st.just("kbs:///default/fuzz/missing"),
    st.from_regex(r"kbs:///[a-z]{1,8}/[a-z]{1,8}/[a-z0-9]{1,8}", fullmatch=True),
    st.text(max_size=300),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    """Annotation packets: valid ones under the fuzz KEK, then any member changed, removed or retyped."""
    wrap_type = draw(st.sampled_from(list(annotation.WrapType)))
    optsdata = draw(st.binary(min_size=1, max_size=64))
    good = json.loads(annotation.wrap(KEK, optsdata, kid=KEK_URI, wrap_type=wrap_type).to_v1_json())
    choice = draw(st.integers(0, 8))
    if choice == 0:
        return json.dumps(good).encode()
    if choice >= 6:  # the edges: empty or short ciphertext, each IV length, for both ciphers
        good["wrap_type"] = draw(st.sampled_from(["A256GCM", "A256CTR"]))
        good["iv"] = base64.b64encode(bytes(draw(st.sampled_from([0, 11, 12, 16, 17])))).decode()
        data = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=1), st.binary(max_size=20)))
        good["wrapped_data"] = base64.b64encode(data).decode()
        return json.dumps(good).encode()
    if choice == 1:
        key = draw(st.sampled_from([*good, "version", "provider", "provider_settings", "annotations"]))
        good[key] = draw(st.one_of(b64, kids, json_values, st.sampled_from(["A256GCM", "A256CTR", "", "A128KW"])))
        return json.dumps(good).encode()
    if choice == 2:
        good.pop(draw(st.sampled_from(sorted(good))))
        return json.dumps(good).encode()
    if choice == 3:
        raw = bytearray(base64.b64decode(good["wrapped_data"]))
        index = draw(st.integers(0, len(raw) - 1))
        raw[index] ^= draw(st.integers(1, 255))
        good["wrapped_data"] = base64.b64encode(bytes(raw[: draw(st.integers(0, len(raw)))])).decode()
        good["kid"] = draw(kids)
        return json.dumps(good).encode()
    if choice == 4:
        text = json.dumps(good)
        cut = draw(st.integers(0, len(text)))
        return (text[:cut] + draw(st.text(max_size=8)) + text[cut:]).encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=200))


@st.composite
def keyprovider_requests(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(-2, 3))
    if choice <= 0:
        return messages.unwrap_request(draw(packets()))
    if choice == 1:
        doc = json.loads(messages.unwrap_request(draw(packets())))
        path = draw(st.sampled_from(["op", "keywrapparams", "keyunwrapparams"]))
        doc[path] = draw(json_values)
        return json.dumps(doc).encode()
    if choice == 2:
        return json.dumps(draw(json_values)).encode()
    return draw(st.binary(max_size=200))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def sealed_secrets(draw: st.DrawFn) -> bytes:
    header = draw(
        st.one_of(
            st.fixed_dictionaries({"alg": st.just("ES256"), "kid": kids}),
            st.dictionaries(st.sampled_from(["alg", "kid", "crit", "typ"]), json_values, max_size=4),
        )
    )
    payload = draw(
        st.one_of(
            st.fixed_dictionaries(
                {
                    "version": st.just("0.1.0"),
                    "type": st.sampled_from(["vault", "envelope", "x"]),
                    "name": kids,
                    "provider": st.sampled_from(["kbs", "aliyun", ""]),
                    "provider_settings": st.just({}),
                    "annotations": st.just({}),
                }
            ),
            json_values,
        )
    )
    parts = [_b64url(json.dumps(header).encode()), _b64url(json.dumps(payload).encode())]
    parts.append(_b64url(draw(st.binary(min_size=60, max_size=68))))
    text = "sealed." + ".".join(parts)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(alphabet="._-=A/+ \n", max_size=4)) + text[cut + 1 :]
    return text.encode()


def _is_map(field: Any) -> bool:
    return bool(field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry)


def _field_strategy(message: str, field: Any) -> st.SearchStrategy[Any]:
    if message == "UnsealSecretInput" and field.name == "secret":
        return st.one_of(sealed_secrets(), st.binary(max_size=300))
    if message == "KeyProviderKeyWrapProtocolInput":
        return keyprovider_requests()
    if message == "GetResourceRequest":
        return st.one_of(kids, st.text(max_size=50).map(lambda t: "kbs:///" + t))
    if message == "GetTokenRequest":
        return st.one_of(st.sampled_from(["kbs", "coco_as", ""]), st.text(max_size=300))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if _is_map(field):
            return st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4)
        return st.nothing()
    if field.is_repeated:
        return st.lists(_scalar_strategy(field), max_size=4)
    return _scalar_strategy(field)


def _scalar_strategy(field: Any) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=300)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=2048)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_UINT32):
        return st.integers(0, 2**32 - 1)
    return st.integers(-(2**31), 2**31 - 1)


@st.composite
def payloads(draw: st.DrawFn, request_type: type[Message]) -> bytes:
    """A request of `request_type` with fuzzed fields, random bytes, or a valid request with bytes flipped."""
    fields = {
        f.name: draw(_field_strategy(request_type.DESCRIPTOR.name, f))
        for f in request_type.DESCRIPTOR.fields
        if f.type != FieldDescriptor.TYPE_MESSAGE or _is_map(f)
        if draw(st.integers(0, 4)) > 0
    }
    try:
        data = request_type(**fields).SerializeToString()
    except ValueError:  # e.g. an int out of range for an enum-like field
        data = b""
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return draw(st.binary(max_size=300))
    if choice == 1 and data:
        raw = bytearray(data)
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        return bytes(raw)
    return data


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessAgent]:
    root = tmp_path_factory.mktemp("fuzz")
    resources = root / "resources"
    (resources / "default" / "key").mkdir(parents=True)
    (resources / "default" / "key" / "1").write_bytes(b"a resource that is not a KEK")
    (resources / "default" / "fuzz").mkdir(parents=True)
    (resources / "default" / "fuzz" / "kek").write_bytes(KEK)
    with DevKbsServer(resources) as kbs, InProcessAgent(root / "run", kbs.url) as agent:
        yield agent
    assert agent.bad_lines() == []


def methods_of(agent: InProcessAgent) -> list[Method]:
    return sorted(agent.methods, key=lambda m: m.path)


_DEEP = ("UnWrapKey", "UnsealSecret", "GetResource")  # the methods that parse caller documents


def draw_method(agent: InProcessAgent, data: st.DataObject) -> Method:
    every = methods_of(agent)
    deep = [m for m in every if m.name in _DEEP]
    return data.draw(st.one_of(st.sampled_from(every), st.sampled_from(deep)))


def check(agent: InProcessAgent, since: int, code: str, message: str, where: str) -> None:
    assert code not in BAD_CODES, (where, code, message)
    assert len(message) <= 600, (where, len(message))
    bad = agent.bad_lines(since)
    assert bad == [], bad[:3]


# --- RPC transports ----------------------------------------------------------------------------------------


@fuzz_settings("grpc")
@given(data=st.data())
def test_grpc_every_method(served: InProcessAgent, data: st.DataObject) -> None:
    method = draw_method(served, data)
    payload = data.draw(payloads(method.request_type))
    since = served.log_position()
    code, message = served.run(served.grpc_call(method.path, payload))
    COUNTS["grpc"] += 1
    check(served, since, code, message, method.path)


@fuzz_settings("ttrpc")
@given(data=st.data())
def test_ttrpc_every_method(served: InProcessAgent, data: st.DataObject) -> None:
    method = draw_method(served, data)
    payload = data.draw(payloads(method.request_type))
    since = served.log_position()
    code, message = served.run(served.ttrpc_call(method.service, method.name, payload))
    COUNTS["ttrpc"] += 1
    check(served, since, code, message, method.path)


@fuzz_settings("frames")
@given(
    service=st.one_of(st.sampled_from(["attestation_agent.AttestationAgentService", "api.GetResourceService"]),
                      st.text(max_size=400)),
    method=st.one_of(st.sampled_from(["GetTeeType", "GetResource", "BindInitData"]), st.text(max_size=400)),
    payload=st.binary(max_size=100),
)  # fmt: skip
def test_ttrpc_any_route(served: InProcessAgent, service: str, method: str, payload: bytes) -> None:
    since = served.log_position()
    code, message = served.run(served.ttrpc_call(service, method, payload, socket=served.aa_socket))
    COUNTS["frames"] += 1
    check(served, since, code, message, f"/{service[:40]}/{method[:40]}")
    assert len(message) <= 250  # caller names are quoted up to 200 characters


_REST_PATHS = [
    "/info",
    "/aa/token",
    "/aa/evidence",
    "/aa/additional-evidence",
    "/aa/aael",
    "/cdh/resource/default/key/1",
    "/cdh/resource/default/fuzz/kek",
    "/cdh/resource/a/b",
    "/x",
]


@st.composite
def rest_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "get", "GET GET", ""]))
    path = draw(st.one_of(st.sampled_from(_REST_PATHS), st.text(max_size=60).map(lambda t: "/" + t)))
    query = draw(
        st.one_of(
            st.just(""),
            st.sampled_from(["token_type=kbs", "runtime_data=abc", "runtime_data=YWJj&encoding=base64"]),
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz_=&%+/.-0123456789", max_size=60),
        )
    )
    body = draw(
        st.one_of(
            st.just(b""),
            st.builds(
                lambda d: json.dumps(d).encode(),
                st.fixed_dictionaries({"domain": st.text(max_size=20), "operation": st.text(max_size=20),
                                       "content": st.text(max_size=40)}),
            ),
            st.binary(max_size=200),
        )
    )  # fmt: skip
    target = f"{path}?{query}" if query else path
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
    raw = head.encode("utf-8", "surrogatepass") + body
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300)) + b"\r\n\r\n"
    return raw


@fuzz_settings("rest")
@given(request=rest_requests())
def test_rest_every_route(served: InProcessAgent, request: bytes) -> None:
    since = served.log_position()
    reply = served.run(served.rest_call(request))
    COUNTS["rest"] += 1
    assert reply.status in (200, 400, 404, 405, 500), reply.status
    if reply.status == 500:
        assert reply.body != b"internal error", request[:80]
    check(served, since, "", "", "rest")


# --- parsers -----------------------------------------------------------------------------------------------


def parse_or_agent_error(function: Any, data: Any) -> None:
    with contextlib.suppress(AgentError):
        function(data)


@fuzz_settings("packet")
@given(data=st.one_of(packets(), st.binary(max_size=300)))
def test_annotation_parser(data: bytes) -> None:
    COUNTS["packet"] += 1
    try:
        packet = annotation.parse_packet(data)
    except AgentError:
        return
    if packet.provider == "kbs":
        parse_or_agent_error(lambda p: annotation.unwrap(KEK, p), packet)


@fuzz_settings("keyprovider")
@given(data=keyprovider_requests())
def test_keyprovider_request_parser(data: bytes) -> None:
    COUNTS["keyprovider"] += 1
    parse_or_agent_error(messages.parse_request, data)


@fuzz_settings("sealed")
@given(data=st.one_of(sealed_secrets(), st.binary(max_size=300)))
def test_sealed_secret_parsers(data: bytes) -> None:
    COUNTS["sealed"] += 1
    parse_or_agent_error(sealed.parse, data)
    parse_or_agent_error(sealed.parse_unverified, data)
