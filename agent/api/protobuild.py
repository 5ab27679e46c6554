"""Builds a generated `_pb2` module's descriptors and message classes: what protobuf's generated code does with
`google.protobuf.internal.builder`, without loading protobuf's Python descriptor machinery. Edge (protobuf runtime).

protoc's Python output adds its file to the default descriptor pool through `google.protobuf.descriptor_pool` and
builds classes through `builder`, which import `symbol_database`, `python_message` and `text_format`: ~1.5 MiB and
~12 ms in every process, of which the upb backend (the one protobuf's wheels ship) needs nothing. With upb the
classes come from `google._upb._message` directly: the same default pool, the same metaclass, and upb keeps one
class per descriptor, so a class built here is the class any other route builds for it. Any other backend (the
pure-Python one) gets protobuf's own builder, exactly as generated code runs it.

`scripts/gen_protos.py` rewrites each generated `_pb2.py` to call `build` (and `make check-gen` keeps it so);
`tests/unit/test_protobuild.py` checks the result against protobuf's builder name by name.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import message as _message
from google.protobuf.internal import api_implementation, enum_type_wrapper

__all__ = ["build"]


def build(serialized: bytes, module_name: str, namespace: dict[str, Any]) -> Any:
    """Add the serialized `FileDescriptorProto` to the default pool and fill `namespace` (a generated module's
    globals) as protobuf's builder does: `_NAME` descriptors, message classes, enums and their values, services.
    Returns the `FileDescriptor`."""
    if api_implementation.Type() != "upb":
        return _build_with_protobuf(serialized, module_name, namespace)
    from google._upb import _message as upb

    file: Any = upb.default_pool.AddSerializedFile(serialized)  # upb's descriptor types: typed as protobuf's
    for name, descriptor in file.message_types_by_name.items():
        _nested_descriptors(namespace, descriptor, f"_{name.upper()}")
    for name, enum in file.enum_types_by_name.items():
        namespace[f"_{name.upper()}"] = enum
        namespace[name] = enum_type_wrapper.EnumTypeWrapper(enum)
        for value in enum.values:
            namespace[value.name] = value.number
    for name, extension in file.extensions_by_name.items():
        namespace[f"{name.upper()}_FIELD_NUMBER"] = extension.number
        namespace[name] = extension
    for name, service in file.services_by_name.items():
        namespace[f"_{name.upper()}"] = service
    for name, descriptor in file.message_types_by_name.items():
        namespace[name] = _message_class(upb.MessageMeta, module_name, descriptor, "")
    return file


def _nested_descriptors(namespace: dict[str, Any], descriptor: Any, key: str) -> None:
    namespace[key] = descriptor
    for name, nested in descriptor.nested_types_by_name.items():
        _nested_descriptors(namespace, nested, f"{key}_{name.upper()}")
    for enum in descriptor.enum_types:
        namespace[f"{key}_{enum.name.upper()}"] = enum


def _message_class(meta: Any, module_name: str, descriptor: Any, prefix: str) -> Any:
    members: dict[str, Any] = {
        name: _message_class(meta, module_name, nested, f"{prefix}{descriptor.name}.")
        for name, nested in descriptor.nested_types_by_name.items()
    }
    members.update(DESCRIPTOR=descriptor, __module__=module_name, __qualname__=prefix + descriptor.name)
    return meta(descriptor.name, (_message.Message,), members)


def _build_with_protobuf(serialized: bytes, module_name: str, namespace: dict[str, Any]) -> Any:
    from google.protobuf import descriptor_pool
    from google.protobuf.internal import builder

    file = descriptor_pool.Default().AddSerializedFile(serialized)
    builder.BuildMessageAndEnumDescriptors(file, namespace)
    builder.BuildTopDescriptorsAndMessages(file, module_name, namespace)
    return file
