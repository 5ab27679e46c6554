"""The RPC method table shared by every transport, and the one error → status mapping. Orchestrator.

Each `Method` decodes the request protobuf, calls a service object, and encodes the response. Transports only
move bytes: gRPC (`agent.api.grpc_server`) and ttRPC call `Method.invoke(request_bytes)`, and `Method.invoke`
writes the call's one log line. A transport that may still refuse to send a reply (its message limit, the reply
budget) says so before that line is written: through `reply_limit` and the `admit` callback, whose
`ReplyRefused` the line then reports with the code the caller gets.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError, Message

from agent import errors
from agent.api.names import (
    AA_SERVICE,
    IMAGE_PULL_SERVICE,
    KEYPROVIDER_SERVICE,
    RESOURCE_SERVICE,
    SEALED_SECRET_SERVICE,
    SECURE_MOUNT_SERVICE,
)
from agent.api.status import ReplyRefused, RpcError, StatusCode
from agent.log import bind_request, clear_request, get_logger
from agent.secret import MAX_MESSAGE_CHARS, clip

if TYPE_CHECKING:  # each transport loads the generated code of the services it serves, when it builds them
    from agent.api._gen import api_pb2
    from agent.service import AttestationAgent, DataHub

__all__ = [
    "MAX_ERROR_CHARS",
    "Method",
    "ReplyAdmission",
    "ReplyLimit",
    "build_methods",
    "keyprovider_methods",
    "status_for",
]

log = get_logger("agent.rpc")

MAX_ERROR_CHARS = 2 * MAX_MESSAGE_CHARS
"""An error reply's message is cut here; messages quote at most `MAX_MESSAGE_CHARS` of caller input."""


def status_for(error: errors.AgentError) -> StatusCode:
    """The RPC status for a domain error: the one its class declares (never UNKNOWN for an AgentError)."""
    return type(error).rpc_status


Handler = Callable[[Any], Awaitable[Message]]
ReplyAdmission = Callable[[int], Awaitable[None]]
"""`admit(size)`: the transport takes a serialized reply of `size` bytes for sending (e.g. charges it to the
reply budget, waiting for room), or raises `ReplyRefused` with what the caller gets instead."""


@dataclass(frozen=True, slots=True)
class Method:
    """One unary RPC: `/<service>/<name>` with its request type and handler."""

    service: str
    name: str
    request_type: type[Message]
    handler: Handler

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    async def invoke(
        self,
        request_bytes: bytes,
        *,
        transport: str,
        deadline: float | None = None,
        reply_limit: ReplyLimit | None = None,
        admit: ReplyAdmission | None = None,
    ) -> bytes:
        """Decode, run, encode; every failure becomes an `RpcError` with a caller-safe message.

        Logs exactly one line per call with the status the caller gets: `rpc` (OK or an expected error) or
        `rpc.crash` (an agent bug: type, safe message and positions only). `deadline` (`time.monotonic()`) tells
        a cancellation by the caller's deadline (DEADLINE_EXCEEDED) from any other (CANCELLED); `reply_limit`
        is the transport's largest reply and the error it answers for a larger one; `admit` is awaited with the
        size of a reply within that limit before the line is written, so that a reply the transport refuses
        (`ReplyRefused`) is logged once, as refused, with its `length` and what refused it.
        """
        bind_request(rpc=self.path, request_id=os.urandom(6).hex(), transport=transport)
        started = time.monotonic()
        code = StatusCode.OK
        fields: dict[str, object] = {}
        crash: BaseException | None = None
        try:
            try:
                request = self.request_type.FromString(request_bytes)
            except (DecodeError, RecursionError) as exc:
                msg = f"request is not a valid {self.request_type.DESCRIPTOR.full_name}"
                raise RpcError(StatusCode.INVALID_ARGUMENT, msg) from exc
            try:
                response = await self.handler(request)
            except errors.AgentError as exc:
                fields["error"] = type(exc).__name__
                raise RpcError(status_for(exc), clip(str(exc), MAX_ERROR_CHARS)) from exc
            except (RpcError, asyncio.CancelledError):
                raise
            except Exception as exc:
                crash = exc
                raise RpcError(StatusCode.INTERNAL, f"internal error in {self.name}") from exc
            reply = response.SerializeToString()
            if reply_limit is not None and len(reply) > reply_limit.max_bytes:
                error = reply_limit.error(len(reply))
                raise ReplyRefused(error.code, error.message, length=len(reply), limit=reply_limit.max_bytes)
            if admit is not None:
                await admit(len(reply))
        except RpcError as exc:
            code = exc.code
            for key, value in _error_fields(exc).items():
                fields.setdefault(key, value)
            raise
        except asyncio.CancelledError:
            late = deadline is not None and time.monotonic() >= deadline
            code = StatusCode.DEADLINE_EXCEEDED if late else StatusCode.CANCELLED
            raise
        except Exception as exc:  # a bug outside the handler (e.g. in `admit`): both transports answer UNKNOWN
            crash, code = exc, StatusCode.UNKNOWN
            raise
        else:
            return reply
        finally:
            _log_call(code, time.monotonic() - started, fields, crash)
            clear_request()

    def refused(self, error: RpcError, *, transport: str, duration_s: float) -> None:
        """Write the one line of a call the transport answered `error` before its handler ran (no work done:
        no handler slot in time, or no room in the reply budget for the reply this method makes)."""
        bind_request(rpc=self.path, request_id=os.urandom(6).hex(), transport=transport)
        try:
            _log_call(error.code, duration_s, _error_fields(error), None)
        finally:
            clear_request()


def _error_fields(error: RpcError) -> dict[str, object]:
    """What a call's line says of the error its caller got: the message, and a refused reply's figures."""
    fields: dict[str, object] = {"message": error.message}
    if isinstance(error, ReplyRefused):
        fields.update(error.fields)
    return fields


def _log_call(code: StatusCode, duration_s: float, fields: dict[str, object], crash: BaseException | None) -> None:
    """The one line of a call (its request fields are bound): `rpc` at info if OK, else at warning with `fields`;
    `rpc.crash` at error for an agent bug."""
    duration_ms = round(duration_s * 1000, 2)
    if crash is not None:
        log.error("rpc.crash", code=code.name, duration_ms=duration_ms, exc_info=crash)
    elif code is StatusCode.OK:
        log.info("rpc", code=code.name, duration_ms=duration_ms)
    else:
        log.warning("rpc", code=code.name, duration_ms=duration_ms, **fields)


@dataclass(frozen=True, slots=True)
class ReplyLimit:
    """A transport's largest reply, and the `RpcError` it answers instead of a larger one (given its size)."""

    max_bytes: int
    error: Callable[[int], RpcError]


def _aa_methods(aa: AttestationAgent) -> list[Method]:
    from agent.api._gen import attestation_agent_pb2 as pb

    async def get_evidence(req: pb.GetEvidenceRequest) -> Message:
        return pb.GetEvidenceResponse(Evidence=await aa.get_evidence(req.RuntimeData))

    async def get_additional_evidence(req: pb.GetAdditionalEvidenceRequest) -> Message:
        return pb.GetEvidenceResponse(Evidence=await aa.get_additional_evidence(req.RuntimeData))

    async def get_token(req: pb.GetTokenRequest) -> Message:
        return pb.GetTokenResponse(Token=await aa.get_token(req.TokenType))

    async def extend(req: pb.ExtendRuntimeMeasurementRequest) -> Message:
        index = req.RegisterIndex if req.HasField("RegisterIndex") else None
        result = await aa.extend_runtime_measurement(req.Domain, req.Operation, req.Content, index)
        return pb.ExtendRuntimeMeasurementResponse(Result=int(result))  # type: ignore[arg-type]  # enum value

    async def bind_init_data(req: pb.BindInitDataRequest) -> Message:
        await aa.bind_init_data(req.Digest)
        return pb.BindInitDataResponse()

    async def get_tee_type(_req: pb.GetTeeTypeRequest) -> Message:
        return pb.GetTeeTypeResponse(tee=aa.tee)

    async def get_additional_tees(_req: pb.GetAdditionalTeesRequest) -> Message:
        return pb.GetAdditionalTeesResponse(additional_tees=aa.additional_tees())

    return [
        Method(AA_SERVICE, "GetEvidence", pb.GetEvidenceRequest, get_evidence),
        Method(AA_SERVICE, "GetAdditionalEvidence", pb.GetAdditionalEvidenceRequest, get_additional_evidence),
        Method(AA_SERVICE, "GetToken", pb.GetTokenRequest, get_token),
        Method(AA_SERVICE, "ExtendRuntimeMeasurement", pb.ExtendRuntimeMeasurementRequest, extend),
        Method(AA_SERVICE, "BindInitData", pb.BindInitDataRequest, bind_init_data),
        Method(AA_SERVICE, "GetTeeType", pb.GetTeeTypeRequest, get_tee_type),
        Method(AA_SERVICE, "GetAdditionalTees", pb.GetAdditionalTeesRequest, get_additional_tees),
    ]


def _cdh_methods(hub: DataHub) -> list[Method]:
    from agent.api._gen import api_pb2

    async def get_resource(req: api_pb2.GetResourceRequest) -> Message:
        return api_pb2.GetResourceResponse(Resource=await hub.get_resource(req.ResourcePath))

    async def unseal_secret(req: api_pb2.UnsealSecretInput) -> Message:
        return api_pb2.UnsealSecretOutput(plaintext=await hub.unseal_secret(req.secret))

    async def secure_mount(_req: api_pb2.SecureMountRequest) -> Message:
        msg = "SecureMount is not supported by cvm-agent"
        raise errors.NotSupported(msg)

    async def pull_image(req: api_pb2.ImagePullRequest) -> Message:
        try:
            digest = await hub.pull_image(req.image_url, req.bundle_path)
        except errors.AgentError as exc:
            exc.args = (f"Image Pull error: {exc}",)  # the reference's wording, which operators search logs for
            raise
        return api_pb2.ImagePullResponse(manifest_digest=digest)

    return [
        Method(RESOURCE_SERVICE, "GetResource", api_pb2.GetResourceRequest, get_resource),
        Method(SEALED_SECRET_SERVICE, "UnsealSecret", api_pb2.UnsealSecretInput, unseal_secret),
        Method(SECURE_MOUNT_SERVICE, "SecureMount", api_pb2.SecureMountRequest, secure_mount),
        Method(IMAGE_PULL_SERVICE, "PullImage", api_pb2.ImagePullRequest, pull_image),
    ]


KeyProviderHandler = Callable[[bytes], Awaitable[bytes]]


def keyprovider_methods(*, wrap: KeyProviderHandler | None, unwrap: KeyProviderHandler | None) -> list[Method]:
    """WrapKey / UnWrapKey; a side that is not served answers UNIMPLEMENTED with the reason."""
    from agent.api._gen import keyprovider_pb2 as pb

    async def wrap_key(req: pb.KeyProviderKeyWrapProtocolInput) -> Message:
        if wrap is None:
            msg = "WrapKey is not served inside the guest; use `cvm-tools keyprovider` on the image owner's side"
            raise errors.NotSupported(msg)
        return pb.KeyProviderKeyWrapProtocolOutput(
            KeyProviderKeyWrapProtocolOutput=await wrap(req.KeyProviderKeyWrapProtocolInput)
        )

    async def unwrap_key(req: pb.KeyProviderKeyWrapProtocolInput) -> Message:
        if unwrap is None:
            msg = "UnWrapKey is not served by the image-owner provider; layers are unwrapped in the guest"
            raise errors.NotSupported(msg)
        return pb.KeyProviderKeyWrapProtocolOutput(
            KeyProviderKeyWrapProtocolOutput=await unwrap(req.KeyProviderKeyWrapProtocolInput)
        )

    return [
        Method(KEYPROVIDER_SERVICE, "WrapKey", pb.KeyProviderKeyWrapProtocolInput, wrap_key),
        Method(KEYPROVIDER_SERVICE, "UnWrapKey", pb.KeyProviderKeyWrapProtocolInput, unwrap_key),
    ]


def agent_methods(hub: DataHub) -> list[Method]:
    """cvm-agent's own methods (its gRPC socket only): `cvm_agent.ImagePull/Progress`, the progress of the pull
    into a bundle as JSON (`GetResourceRequest.ResourcePath` = bundle path; empty when no such pull runs)."""
    from agent.api._gen import api_pb2

    async def progress(req: api_pb2.GetResourceRequest) -> Message:
        state = hub.pull_progress(req.ResourcePath)
        return api_pb2.GetResourceResponse(Resource=json.dumps(state).encode() if state is not None else b"")

    return [Method("cvm_agent.ImagePull", "Progress", api_pb2.GetResourceRequest, progress)]


def build_methods(aa: AttestationAgent | None, hub: DataHub | None, *, extensions: bool = False) -> list[Method]:
    """Every method this process serves; `extensions` adds cvm-agent's own (not on the reference sockets)."""
    methods: list[Method] = []
    if aa is not None:
        methods += _aa_methods(aa)
    if hub is not None:
        methods += _cdh_methods(hub) + keyprovider_methods(wrap=None, unwrap=hub.unwrap_key)
        if extensions:
            methods += agent_methods(hub)
    return methods
