"""No secret in any log line (issue 9, item 1): the crafted annotation over gRPC and ttRPC, and a real crash.

The crafted packet (A256CTR, empty `wrapped_data`, `kid` naming a 32-byte KBS resource) used to decrypt to
empty optsdata, crash the reply encoder and log the KEK from the frame locals. Here a daemon serves it over
both transports with debug logs, and every encoding of the KEK is searched for in what it logged.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import structlog
from cvm_tools.devkbs.server import DevKbsServer

from agent import log as agent_log
from agent.api import methods
from agent.api._gen import keyprovider_pb2 as kp
from agent.api.status import RpcError, StatusCode
from agent.api.ttrpc import TtrpcClient
from agent.keyprovider import annotation, messages
from agent.secret import Secret, describe_exception
from agent.service import DataHub
from tests.integration.hw_fixtures import HwDaemon
from tests.reliability.secrets_in_logs import find_leaks

pytestmark = pytest.mark.integration

KP = "keyprovider.KeyProviderService"
KID = "kbs:///default/image-kek/crafted"
OPTSDATA = b'{"symkey":"c2VjcmV0LWxheWVyLWtleS0wMTIzNDU2Nzg5YWJjZGVm","cipheroptions":{}}'


def packet(**members: object) -> bytes:
    base: dict[str, object] = {"kid": KID, "wrapped_data": "", "iv": base64.b64encode(bytes(16)).decode()}
    base["wrap_type"] = "A256CTR"
    return json.dumps({**base, **members}).encode()


def crafted_requests(kek: bytes) -> dict[str, bytes]:
    good = annotation.wrap(kek, OPTSDATA, kid=KID, wrap_type=annotation.WrapType.A256GCM)
    tampered = json.loads(good.to_v1_json())
    raw = bytearray(base64.b64decode(tampered["wrapped_data"]))
    raw[-1] ^= 1
    tampered["wrapped_data"] = base64.b64encode(bytes(raw)).decode()
    gcm_iv = base64.b64encode(bytes(12)).decode()
    return {
        "ctr-empty": packet(),
        "gcm-empty": packet(wrap_type="A256GCM", iv=gcm_iv),
        "gcm-tag-only": packet(wrap_type="A256GCM", iv=gcm_iv, wrapped_data=base64.b64encode(bytes(16)).decode()),
        "ctr-short-iv": packet(wrapped_data="AAAA", iv=gcm_iv),
        "unknown-wrap": packet(wrap_type="A128KW", wrapped_data="AAAA"),
        "tag-fails": json.dumps(tampered).encode(),
    }


@pytest.fixture
def kek(resources: Path) -> bytes:
    value = secrets.token_bytes(32)
    folder = resources / "default" / "image-kek"
    folder.mkdir(parents=True)
    (folder / "crafted").write_bytes(value)
    return value


async def test_crafted_annotations_over_grpc_and_ttrpc_leave_no_trace_of_the_kek(
    tmp_path: Path, dev_kbs: DevKbsServer, kek: bytes
) -> None:
    cdh_sock = tmp_path / "t" / "cdh.sock"
    daemon = HwDaemon(
        tmp_path, "--tee", "sample", "--kbs-url", dev_kbs.url, "--log-level", "debug",
        "--ttrpc-cdh-socket", str(cdh_sock),
    )  # fmt: skip
    answers: dict[str, tuple[str, str]] = {}
    try:
        daemon.wait_ready()
        async with grpc.aio.insecure_channel(f"unix:{daemon.socket}") as channel:
            unwrap: Any = channel.unary_unary(f"/{KP}/UnWrapKey")
            for name, data in crafted_requests(kek).items():
                request = kp.KeyProviderKeyWrapProtocolInput(
                    KeyProviderKeyWrapProtocolInput=messages.unwrap_request(data)
                ).SerializeToString()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unwrap(request, timeout=30)
                answers[f"grpc/{name}"] = (info.value.code().name, info.value.details() or "")
        async with TtrpcClient(str(cdh_sock)) as client:
            for name, data in crafted_requests(kek).items():
                request = kp.KeyProviderKeyWrapProtocolInput(
                    KeyProviderKeyWrapProtocolInput=messages.unwrap_request(data)
                ).SerializeToString()
                with pytest.raises(RpcError) as rpc_info:
                    await client.call(KP, "UnWrapKey", request, timeout=30)
                answers[f"ttrpc/{name}"] = (rpc_info.value.code.name, rpc_info.value.message)
            # the happy path logs nothing secret either
            good = annotation.wrap(kek, OPTSDATA, kid=KID).to_v1_json()
            request = kp.KeyProviderKeyWrapProtocolInput(
                KeyProviderKeyWrapProtocolInput=messages.unwrap_request(good)
            ).SerializeToString()
            reply = kp.KeyProviderKeyWrapProtocolOutput.FromString(
                await client.call(KP, "UnWrapKey", request, timeout=30)
            )
            assert messages.parse_reply(reply.KeyProviderKeyWrapProtocolOutput) == OPTSDATA
    finally:
        assert daemon.stop() == 0
    for where, (code, message) in answers.items():
        assert code == "INVALID_ARGUMENT", (where, code, message)
        assert "annotation packet" in message, (where, message)
    assert answers["grpc/ctr-empty"][1] == (
        "annotation packet `wrapped_data` is 0 bytes, expected at least 1 (one byte of optsdata)."
    )
    logs = daemon.log
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    rpc_lines = [line for line in lines if line["event"] in ("rpc", "rpc.crash")]
    assert len(rpc_lines) == len(answers) + 1  # one line per call: the crafted ones and the good unwrap
    assert not [line for line in lines if line["event"] == "rpc.crash"]
    assert find_leaks(logs, kek) == []
    assert find_leaks(logs, OPTSDATA) == []


async def test_a_crash_line_has_type_and_positions_only(
    kek: bytes, dev_kbs: DevKbsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent bug while the KEK is in scope: the line names the exception and where, nothing else."""
    from agent.config import KbsConfig
    from agent.kbs.client import KbsClient
    from agent.tee.sample import SampleAttester

    stream = io.StringIO()
    agent_log.configure("debug", "json", stream=stream)
    kbs = KbsClient(KbsConfig(url=dev_kbs.url), SampleAttester())
    hub = DataHub(kbs)

    def broken_reply(optsdata: bytes) -> bytes:
        key_material = kek  # a local holding the secret, as in the reported crash
        msg = f"bug while replying with {optsdata!r} under {key_material.hex()}"
        raise ValueError(msg)

    table = {m.name: m for m in methods.build_methods(None, hub)}
    good = annotation.wrap(kek, OPTSDATA, kid=KID).to_v1_json()
    request = kp.KeyProviderKeyWrapProtocolInput(KeyProviderKeyWrapProtocolInput=messages.unwrap_request(good))
    monkeypatch.setattr(messages, "unwrap_reply", broken_reply)  # the bug under test
    try:
        with pytest.raises(RpcError) as info:
            await table["UnWrapKey"].invoke(request.SerializeToString(), transport="test")
    finally:
        await kbs.aclose()
        structlog.reset_defaults()
    assert info.value.code is StatusCode.INTERNAL
    assert info.value.message == "internal error in UnWrapKey"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    crash = [line for line in lines if line["event"] == "rpc.crash"]
    assert len(crash) == 1
    assert crash[0]["exc_type"] == "ValueError"
    assert crash[0]["exc_message"] == "(message withheld: it may quote values)"
    assert crash[0]["code"] == "INTERNAL"
    assert crash[0]["stack"][-1].endswith(":broken_reply")
    assert all(entry.count(":") == 2 for entry in crash[0]["stack"])
    assert not [line for line in lines if line["event"] == "rpc"]  # one line for the call
    assert find_leaks(stream.getvalue(), kek) == []
    assert find_leaks(stream.getvalue(), OPTSDATA) == []


def test_secret_values_and_exceptions_render_without_values() -> None:
    stream = io.StringIO()
    agent_log.configure("debug", "json", stream=stream)
    value = secrets.token_bytes(32)
    try:
        try:
            raise KeyError(value.hex())
        except KeyError as exc:
            structlog.get_logger("t").error(
                "event", blob=value, wrapped=Secret(value), nested={"k": [value]}, error=exc, obj=object()
            )
            structlog.get_logger("t").exception("with.exc_info")
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    assert find_leaks(text, value) == []
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["blob"] == "<32 bytes>"
    assert first["wrapped"] == "<secret>"
    assert first["nested"] == {"k": ["<32 bytes>"]}
    assert first["error"]["exc_type"] == "KeyError"
    assert first["obj"] == "<object>"
    assert second["exc_type"] == "KeyError"
    assert repr(Secret(value)) == "<Secret 32 bytes>"
    assert describe_exception(OSError(2, "No such file or directory"))["exc_message"] == (
        "ENOENT: No such file or directory"
    )
