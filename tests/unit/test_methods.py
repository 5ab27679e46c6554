"""The RPC method table: wire paths and the one error → status mapping."""

from __future__ import annotations

import inspect

import pytest

from agent import errors
from agent.api import methods
from agent.api.status import RpcError, StatusCode
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
