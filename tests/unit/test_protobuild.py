"""`agent.api.protobuild` builds each generated module as protobuf's own builder would (the independent reference),
and loads none of protobuf's Python descriptor machinery doing so."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.internal import builder

MODULES = ["api_pb2", "attestation_agent_pb2", "keyprovider_pb2", "ttrpc_pb2"]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", MODULES)
def test_same_names_descriptors_and_classes_as_protobufs_builder(name: str) -> None:
    module = importlib.import_module(f"agent.api._gen.{name}")
    reference: dict[str, Any] = {}
    builder.BuildMessageAndEnumDescriptors(module.DESCRIPTOR, reference)
    builder.BuildTopDescriptorsAndMessages(module.DESCRIPTOR, module.__name__, reference)
    built = {k: v for k, v in vars(module).items() if not k.startswith("__") and k not in ("DESCRIPTOR", "_build")}
    built.pop("_runtime_version")
    assert sorted(built) == sorted(reference)
    for key, value in reference.items():
        if isinstance(value, type):  # upb keeps one class per descriptor: the reference gets the same class
            assert built[key] is value, key
            assert built[key].__qualname__ == value.__qualname__
        elif hasattr(value, "full_name"):
            assert built[key].full_name == value.full_name, key
        elif isinstance(value, int):
            assert built[key] == value, key
        else:  # an enum's wrapper
            assert built[key].DESCRIPTOR.full_name == value.DESCRIPTOR.full_name, key
            assert built[key].items() == value.items(), key


def test_messages_round_trip_on_the_wire() -> None:
    from agent.api._gen import api_pb2, attestation_agent_pb2, ttrpc_pb2

    mount = api_pb2.SecureMountRequest(options={"a": "b"}, flags=["ro"])
    assert api_pb2.SecureMountRequest.FromString(mount.SerializeToString()) == mount
    request = ttrpc_pb2.Request(service="s", method="m", payload=b"\x00", metadata=[ttrpc_pb2.KeyValue(key="k")])
    assert request.SerializeToString() == bytes.fromhex("0a0173 12016d 1a0100 2a030a016b")  # known answer
    assert ttrpc_pb2.Request.FromString(request.SerializeToString()) == request
    evidence = attestation_agent_pb2.GetEvidenceRequest(RuntimeData=b"abc")
    assert evidence.SerializeToString() == b"\n\x03abc"  # known answer: field 1, length 3
    assert attestation_agent_pb2.RuntimeMeasurementResult.Name(attestation_agent_pb2.OK) == "OK"
    assert attestation_agent_pb2.NOT_SUPPORTED == 1


def test_loads_no_descriptor_machinery() -> None:
    code = (
        "import json, sys\n"
        "from agent.api._gen import api_pb2, attestation_agent_pb2, keyprovider_pb2, ttrpc_pb2\n"
        "api_pb2.GetResourceRequest(ResourcePath='x').SerializeToString()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    modules = set(json.loads(out.stdout))
    heavy = {
        "google.protobuf.descriptor_pool",
        "google.protobuf.internal.python_message",
        "google.protobuf.text_format",
        "google.protobuf.symbol_database",
        "google.protobuf.internal.builder",
    }
    assert modules & heavy == set()
