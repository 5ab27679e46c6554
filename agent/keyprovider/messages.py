"""The ocicrypt key-provider JSON protocol, as Go ocicrypt (skopeo, containerd) and ocicrypt-rs send it. Pure.

The gRPC/ttRPC/`cmd` transports carry one JSON document each way. Requests (Go marshals every field, unused
blocks as `null`; map keys sorted):

    {"op":"keywrap",
     "keywrapparams":{"ec":{"Parameters":{"<name>":["<b64>",...]},"DecryptConfig":{"Parameters":{}}},
                      "optsdata":"<b64>"},
     "keyunwrapparams":{"dc":null,"annotation":null}}
    {"op":"keyunwrap",
     "keywrapparams":{"ec":null,"optsdata":null},
     "keyunwrapparams":{"dc":{"Parameters":{"<name>":["<b64>",...]}},"annotation":"<b64>"}}

Every byte field (`optsdata`, `annotation`, each parameter value) may be a padded standard base64 string
(Go `[]byte`, ocicrypt-rs `String`) or a JSON array of integers 0..255 (the `Vec<u8>` form, which Go's
decoder also accepts); `null` is an absent value, as Go decodes it. Unknown members are ignored, as both
clients' decoders do; known members are type-checked even in the block the operation does not use (Go would
fail to decode them too).

Replies use integer arrays, the one form both client families decode:

    {"keywrapresults":{"annotation":[<ints>]}}
    {"keyunwrapresults":{"optsdata":[<ints>]}}

The parameter maps hold the parameters of *every* key the user gave, other providers' and other schemes'
included (a JWE `privkeys` entry is a private key), so requests keep them out of `repr`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.errors import InvalidRequest
from agent.strictjson import b64decode_std as _b64decode_std
from agent.strictjson import json_type as _json_type
from agent.strictjson import load_json_object as _load_json_object
from agent.strictjson import shown as _shown

__all__ = [
    "WrapRequest",
    "UnwrapRequest",
    "parse_request",
    "wrap_reply",
    "unwrap_reply",
    "unwrap_request",
    "wrap_request",
    "parse_reply",
    "MAX_REQUEST_SIZE",
    "OP_WRAP",
    "OP_UNWRAP",
]

MAX_REQUEST_SIZE = 1024 * 1024
"""Largest request document accepted (Go ocicrypt's are a few KiB)."""
OP_WRAP = "keywrap"
OP_UNWRAP = "keyunwrap"

Params = Mapping[str, tuple[bytes, ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class WrapRequest:
    """A `keywrap` request: the secret to wrap and `keywrapparams.ec.Parameters` (empty if `ec` is null)."""

    optsdata: bytes = field(repr=False)
    params: Params = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


@dataclass(frozen=True, slots=True, kw_only=True)
class UnwrapRequest:
    """A `keyunwrap` request: the annotation bytes (base64 decoded) and `keyunwrapparams.dc.Parameters`."""

    annotation: bytes
    params: Params = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


def parse_request(data: bytes) -> WrapRequest | UnwrapRequest:
    """Parse one key-provider request document. Raises `InvalidRequest` naming the bad member.

    `keywrap` needs a non-empty `keywrapparams.optsdata`; `keyunwrap` a non-empty
    `keyunwrapparams.annotation`.
    """
    if len(data) > MAX_REQUEST_SIZE:
        msg = f"key provider request is {len(data):#x} bytes, expected at most {MAX_REQUEST_SIZE:#x}."
        raise InvalidRequest(msg)
    obj = _load_json_object(data, "key provider request")

    op = obj.get("op")
    if op not in (OP_WRAP, OP_UNWRAP):
        got = _shown(op) if isinstance(op, str) else _json_type(op) if "op" in obj else "missing"
        msg = f"key provider request `op` is {got}, expected 'keywrap' or 'keyunwrap'."
        raise InvalidRequest(msg)

    wrap_params = _object_or_null(obj, "keywrapparams", "keywrapparams")
    ec = _object_or_null(wrap_params, "ec", "keywrapparams.ec")
    ec_params = _params(ec, "keywrapparams.ec")
    ec_dc_path = "keywrapparams.ec.DecryptConfig"
    _params(_object_or_null(ec, "DecryptConfig", ec_dc_path), ec_dc_path)  # type-checked, not used
    optsdata = _bytes_member(wrap_params, "optsdata", "keywrapparams.optsdata")

    unwrap_params = _object_or_null(obj, "keyunwrapparams", "keyunwrapparams")
    dc_params = _params(_object_or_null(unwrap_params, "dc", "keyunwrapparams.dc"), "keyunwrapparams.dc")
    annotation = _bytes_member(unwrap_params, "annotation", "keyunwrapparams.annotation")

    if op == OP_WRAP:
        if not optsdata:
            msg = "key provider request `keywrapparams.optsdata` is empty or missing, expected data to wrap."
            raise InvalidRequest(msg)
        return WrapRequest(optsdata=optsdata, params=ec_params)
    if not annotation:
        msg = "key provider request `keyunwrapparams.annotation` is empty or missing, expected an annotation."
        raise InvalidRequest(msg)
    return UnwrapRequest(annotation=annotation, params=dc_params)


def wrap_reply(annotation: bytes) -> bytes:
    """The `WrapKey` reply `{"keywrapresults":{"annotation":[<ints>]}}` (the annotation packet's bytes)."""
    if not annotation:
        msg = "an empty annotation means 'not wrapped' to ocicrypt; refuse to send one"
        raise ValueError(msg)
    return _dump({"keywrapresults": {"annotation": list(annotation)}})


def unwrap_reply(optsdata: bytes) -> bytes:
    """The `UnWrapKey` reply `{"keyunwrapresults":{"optsdata":[<ints>]}}`."""
    if not optsdata:
        msg = "empty optsdata means 'no key' to ocicrypt; refuse to send it"
        raise ValueError(msg)
    return _dump({"keyunwrapresults": {"optsdata": list(optsdata)}})


def unwrap_request(annotation: bytes) -> bytes:
    """A `keyunwrap` request shaped as ocicrypt-rs sends it (for `cvm-agent unwrap` and tests)."""
    return _dump(
        {
            "op": OP_UNWRAP,
            "keywrapparams": {"ec": None, "optsdata": None},
            "keyunwrapparams": {"dc": None, "annotation": base64.b64encode(annotation).decode("ascii")},
        }
    )


def wrap_request(optsdata: bytes, params: Mapping[str, Sequence[bytes]]) -> bytes:
    """A `keywrap` request shaped as Go ocicrypt marshals it for `--encryption-key provider:NAME[:PARAM]`.

    `params` maps each provider name to its parameter values (`b"Enabled"` when skopeo is given no PARAM).
    """
    return _dump(
        {
            "op": OP_WRAP,
            "keywrapparams": {
                "ec": {
                    "Parameters": {
                        name: [base64.b64encode(v).decode("ascii") for v in vs] for name, vs in sorted(params.items())
                    },
                    "DecryptConfig": {"Parameters": {}},
                },
                "optsdata": base64.b64encode(optsdata).decode("ascii"),
            },
            "keyunwrapparams": {"dc": None, "annotation": None},
        }
    )


def parse_reply(data: bytes) -> bytes:
    """The bytes in a wrap or unwrap reply (integer-list or base64 form), for clients of the protocol."""
    obj = _load_json_object(data, "key-provider reply")
    for block, key in (("keywrapresults", "annotation"), ("keyunwrapresults", "optsdata")):
        inner = obj.get(block)
        if isinstance(inner, dict):
            value = _bytes_member(inner, key, f"{block}.{key}")
            if value:
                return value
    msg = "key-provider reply carries neither keywrapresults.annotation nor keyunwrapresults.optsdata"
    raise InvalidRequest(msg)


# --- helpers --------------------------------------------------------------------------------------------


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _object_or_null(obj: Mapping[str, object], key: str, path: str) -> Mapping[str, object]:
    """A member that is an object; absent or `null` reads as empty (Go: a nil pointer or zero struct)."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        msg = f"key provider request `{path}` is {_json_type(value)}, expected an object or null."
        raise InvalidRequest(msg)
    return value


def _params(config: Mapping[str, object], path: str) -> dict[str, tuple[bytes, ...]]:
    """`<config>.Parameters`: a map from name to a list of byte values; `null` map or list reads as empty."""
    value = config.get("Parameters")
    if value is None:
        return {}
    if not isinstance(value, dict):
        msg = f"key provider request `{path}.Parameters` is {_json_type(value)}, expected an object or null."
        raise InvalidRequest(msg)
    result: dict[str, tuple[bytes, ...]] = {}
    for name, entries in value.items():
        where = f"{path}.Parameters[{_shown(name)}]"
        if entries is None:
            result[name] = ()
            continue
        if not isinstance(entries, list):
            msg = f"key provider request `{where}` is {_json_type(entries)}, expected an array or null."
            raise InvalidRequest(msg)
        result[name] = tuple(_bytes_value(entry, f"{where}[{i}]") or b"" for i, entry in enumerate(entries))
    return result


def _bytes_member(obj: Mapping[str, object], key: str, path: str) -> bytes | None:
    return _bytes_value(obj.get(key), path)


def _bytes_value(value: object, path: str) -> bytes | None:
    """A Go `[]byte`: a padded standard base64 string, an array of integers 0..255, or `null` (None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _b64decode_std(value, f"key provider request `{path}`")
    if isinstance(value, list):
        if not all(type(item) is int and 0 <= item <= 0xFF for item in value):
            msg = f"key provider request `{path}` is an array holding something other than integers 0..255."
            raise InvalidRequest(msg)
        return bytes(value)
    got = _json_type(value)
    msg = f"key provider request `{path}` is {got}, expected a base64 string or an array of bytes."
    raise InvalidRequest(msg)
