"""The RPC method table: wire paths and the one error → status mapping."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from google.protobuf.message import Message
from structlog.testing import capture_logs

from agent import errors
from agent.api import methods
from agent.api.status import ReplyRefused, RpcError, StatusCode
from agent.service import AttestationAgent, DataHub
from agent.tee.sample import SampleAttester


def all_error_classes() -> list[type[errors.AgentError]]:
    found = [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.AgentError)]
    assert sorted(c.__name__ for c in found) == sorted(errors.__all__)  # every class is public and walked here
    return found


# What each error means to a caller. A new class must be added here with the status it was given.
EXPECTED_STATUS = {
    "AgentError": StatusCode.INTERNAL,
    "ConfigError": StatusCode.FAILED_PRECONDITION,
    "TeeError": StatusCode.INTERNAL,
    "TeeUnavailable": StatusCode.UNAVAILABLE,
    "DeviceError": StatusCode.INTERNAL,
    "TsmGenerationError": StatusCode.ABORTED,
    "EvidenceParseError": StatusCode.INTERNAL,
    "EvidenceMismatch": StatusCode.FAILED_PRECONDITION,
    "MeasurementError": StatusCode.FAILED_PRECONDITION,  # the event log no longer replays: nothing to retry
    "KbsError": StatusCode.UNAVAILABLE,
    "KbsTransportError": StatusCode.UNAVAILABLE,
    "KbsProtocolError": StatusCode.UNAVAILABLE,  # a KBS that answers garbage is an upstream failure
    "AttestationRejected": StatusCode.PERMISSION_DENIED,
    "ResourceNotFound": StatusCode.NOT_FOUND,
    "InvalidResourceUri": StatusCode.INVALID_ARGUMENT,
    "DecryptionError": StatusCode.INTERNAL,
    "InvalidRequest": StatusCode.INVALID_ARGUMENT,
    "NotSupported": StatusCode.UNIMPLEMENTED,
    "LayerError": StatusCode.UNAVAILABLE,  # a malformed or hostile layer is the registry's data: upstream
    "MountError": StatusCode.INTERNAL,
    "InvalidImageReference": StatusCode.INVALID_ARGUMENT,
    "ImageError": StatusCode.INTERNAL,
    "RegistryError": StatusCode.UNAVAILABLE,  # unreachable, timed out or an error status: upstream
    "ImageFormatError": StatusCode.UNAVAILABLE,  # a manifest/blob that fails its digest or shape: upstream data
    "ImageRejected": StatusCode.PERMISSION_DENIED,  # the policy or a registry rule refused the image
}


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_declares_its_own_status(cls: type[errors.AgentError]) -> None:
    assert "rpc_status" in vars(cls), f"{cls.__name__} inherits its RPC status; declare it in the class"
    error = cls.__new__(cls)
    assert methods.status_for(error) is EXPECTED_STATUS[cls.__name__]


def test_reference_method_paths() -> None:
    table = methods.build_methods(AttestationAgent(SampleAttester(), None), DataHub(None))
    paths = {m.path for m in table}
    assert paths == {
        "/attestation_agent.AttestationAgentService/GetEvidence",
        "/attestation_agent.AttestationAgentService/GetAdditionalEvidence",
        "/attestation_agent.AttestationAgentService/GetToken",
        "/attestation_agent.AttestationAgentService/ExtendRuntimeMeasurement",
        "/attestation_agent.AttestationAgentService/BindInitData",
        "/attestation_agent.AttestationAgentService/GetTeeType",
        "/attestation_agent.AttestationAgentService/GetAdditionalTees",
        "/api.GetResourceService/GetResource",
        "/api.SealedSecretService/UnsealSecret",
        "/api.SecureMountService/SecureMount",
        "/api.ImagePullService/PullImage",
        "/keyprovider.KeyProviderService/WrapKey",
        "/keyprovider.KeyProviderService/UnWrapKey",
    }


async def test_undecodable_request_is_invalid_argument() -> None:
    table = {m.name: m for m in methods.build_methods(AttestationAgent(SampleAttester(), None), None)}
    with pytest.raises(RpcError) as info:
        await table["GetEvidence"].invoke(b"\xff\xff\xff", transport="test")
    assert info.value.code is StatusCode.INVALID_ARGUMENT


async def test_unexpected_exception_hides_its_text() -> None:
    async def crash(_request: object) -> object:
        msg = "secret-material-in-exception"
        raise RuntimeError(msg)

    from agent.api._gen import attestation_agent_pb2 as pb

    method = methods.Method("svc", "Crash", pb.GetTeeTypeRequest, crash)  # type: ignore[arg-type]  # test handler
    with pytest.raises(RpcError) as info:
        await method.invoke(b"", transport="test")
    assert info.value.code is StatusCode.INTERNAL
    assert "secret" not in info.value.message


async def test_runtime_measurement_answers() -> None:
    from agent.config import Config, EventlogConfig
    from agent.measurement import MeasurementResult, build_measurement

    disabled = AttestationAgent(SampleAttester(), None)
    sample_measurement = build_measurement(Config(eventlog=EventlogConfig(enabled=True)), SampleAttester())
    enabled = AttestationAgent(SampleAttester(), None, measurement=sample_measurement)
    assert await disabled.extend_runtime_measurement("d", "o", "c", None) is MeasurementResult.NOT_ENABLED
    assert await enabled.extend_runtime_measurement("d", "o", "c", 17) is MeasurementResult.NOT_SUPPORTED
    with pytest.raises(errors.InvalidRequest, match="must not contain a newline"):
        await disabled.extend_runtime_measurement("d", "o", "two\nlines", None)
    with pytest.raises(errors.InvalidRequest):
        await disabled.extend_runtime_measurement("a domain", "o", "c", None)


class TestReplyAdmission:
    """`Method.invoke` asks the transport to admit the reply before it writes the call's one line."""

    @staticmethod
    def method(size: int) -> methods.Method:
        from agent.api._gen import api_pb2

        async def resource(_request: object) -> Message:
            return api_pb2.GetResourceResponse(Resource=b"r" * size)

        return methods.Method("svc", "Get", api_pb2.GetResourceRequest, resource)

    async def test_an_admitted_reply_is_one_ok_line(self) -> None:
        admitted: list[int] = []

        async def admit(size: int) -> None:
            admitted.append(size)

        with capture_logs() as logs:
            reply = await self.method(100).invoke(b"", transport="test", admit=admit)
        assert admitted == [len(reply)]
        assert [(e["event"], e["log_level"], e["code"]) for e in logs] == [("rpc", "info", "OK")]

    async def test_a_refused_reply_is_one_line_with_the_code_the_caller_gets(self) -> None:
        refusal = ReplyRefused(StatusCode.RESOURCE_EXHAUSTED, "no room", length=105, limit=4096, held=4000)

        async def admit(_size: int) -> None:
            raise refusal

        with capture_logs() as logs, pytest.raises(ReplyRefused) as info:
            await self.method(100).invoke(b"", transport="test", admit=admit)
        assert info.value is refusal
        [line] = logs
        del line["duration_ms"]
        assert line == {
            "event": "rpc",
            "log_level": "warning",
            "code": "RESOURCE_EXHAUSTED",
            "message": "no room",
            "length": 105,
            "limit": 4096,
            "held": 4000,
        }

    async def test_a_reply_over_the_limit_is_refused_before_admission(self) -> None:
        async def admit(_size: int) -> None:
            pytest.fail("a reply over the message limit was offered to the transport")

        limit = methods.ReplyLimit(64, lambda size: RpcError(StatusCode.RESOURCE_EXHAUSTED, f"{size} > 64"))
        with capture_logs() as logs, pytest.raises(ReplyRefused) as info:
            await self.method(100).invoke(b"", transport="test", reply_limit=limit, admit=admit)
        assert (info.value.code, info.value.message) == (StatusCode.RESOURCE_EXHAUSTED, "102 > 64")
        assert [(e["event"], e["code"], e["length"], e["limit"]) for e in logs] == [
            ("rpc", "RESOURCE_EXHAUSTED", 102, 64)
        ]

    async def test_a_cancelled_admission_is_one_cancelled_line(self) -> None:
        async def admit(_size: int) -> None:
            await asyncio.sleep(30)

        with capture_logs() as logs:
            task = asyncio.create_task(self.method(100).invoke(b"", transport="test", admit=admit))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert [(e["event"], e["code"]) for e in logs] == [("rpc", "CANCELLED")]

    async def test_a_failing_admission_is_one_crash_line(self) -> None:
        async def admit(_size: int) -> None:
            raise KeyError

        with capture_logs() as logs, pytest.raises(KeyError):
            await self.method(100).invoke(b"", transport="test", admit=admit)
        assert [(e["event"], e["log_level"], e["code"]) for e in logs] == [("rpc.crash", "error", "UNKNOWN")]

    def test_a_call_refused_before_its_handler_ran_is_one_line(self) -> None:
        refusal = ReplyRefused(StatusCode.RESOURCE_EXHAUSTED, "no room", length=105, limit=4096, held=4000)
        with capture_logs() as logs:
            self.method(100).refused(refusal, transport="test", duration_s=0.25)
        assert logs == [
            {
                "event": "rpc",
                "log_level": "warning",
                "code": "RESOURCE_EXHAUSTED",
                "duration_ms": 250.0,
                "message": "no room",
                "length": 105,
                "limit": 4096,
                "held": 4000,
            }
        ]
