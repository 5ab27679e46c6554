"""The agent's error tree. Pure: no I/O.

Domain errors mean the world is wrong (bad data, hardware, peers); misuse by a caller raises builtins
(`RuntimeError`, `TypeError`, `ValueError`) instead.

    AgentError
    ├── ConfigError                 bad configuration value or file
    ├── TeeError
    │   ├── TeeUnavailable          no such TEE here / interface missing
    │   ├── DeviceError             an ioctl or configfs operation failed (errno, firmware, VMM status)
    │   ├── TsmGenerationError      configfs-tsm entry changed under us
    │   ├── EvidenceParseError      bytes do not form a valid quote / report / table / log
    │   ├── EvidenceMismatch        produced evidence does not carry what was asked for
    │   └── MeasurementError        the runtime event log and the measurement registers cannot be reconciled
    ├── KbsError
    │   ├── KbsTransportError       connection, TLS, timeout, 5xx, oversized body
    │   ├── KbsProtocolError        the KBS answered something that does not follow the protocol
    │   ├── AttestationRejected     the KBS answered with an error status (carries `status`, `kbs_type`, `detail`)
    │   └── ResourceNotFound        a 404 from the KBS (unknown plugin or path)
    ├── InvalidResourceUri          a `kbs:///repo/type/tag` URI that does not parse
    ├── DecryptionError             JWE / key unwrap / tag failure; deliberately says nothing more
    ├── InvalidRequest              a local caller sent something malformed
    │   └── InvalidImageReference   an image reference that does not parse
    ├── NotSupported                the request is valid but this agent/TEE cannot serve it
    ├── ImageError                  guest image pull (carries the reference's "Image Pull error" wording)
    │   ├── RegistryError           the registry is unreachable or answered an error status (`status`)
    │   ├── ImageFormatError        a manifest, index, config or blob is malformed, oversized or fails its digest
    │   └── ImageRejected           the signature policy or a registry rule refused the image
    ├── LayerError                  an image layer blob is malformed: compression, tar, digest, unsafe entry
    └── MountError                  the rootfs overlay cannot be mounted or unmounted (carries `errno`)

Every error's `str()` is safe to show to an RPC caller: it never contains secret material. Every class names its
own RPC status (`rpc_status`, the same code on gRPC and ttRPC); a test checks that none inherits it silently.
`diagnostics()` adds operator advice for the CLI.
"""

from __future__ import annotations

from typing import ClassVar

from agent.api.status import StatusCode

__all__ = [
    "AgentError",
    "AttestationRejected",
    "ConfigError",
    "DecryptionError",
    "DeviceError",
    "EvidenceMismatch",
    "EvidenceParseError",
    "ImageError",
    "ImageFormatError",
    "ImageRejected",
    "InvalidImageReference",
    "InvalidRequest",
    "InvalidResourceUri",
    "KbsError",
    "KbsProtocolError",
    "KbsTransportError",
    "MeasurementError",
    "LayerError",
    "MountError",
    "NotSupported",
    "RegistryError",
    "ResourceNotFound",
    "TeeError",
    "TeeUnavailable",
    "TsmGenerationError",
]


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INTERNAL

    advice: str = ""

    def diagnostics(self) -> str:
        """Operator-facing text: the message plus what to check."""
        return f"{self}\n{self.advice}" if self.advice else str(self)


class ConfigError(AgentError):
    """A configuration key has a bad value, or the file cannot be read."""

    rpc_status: ClassVar[StatusCode] = StatusCode.FAILED_PRECONDITION

    advice = "Check the configuration file and command-line flags (`cvm-agent check-config`)."

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class TeeError(AgentError):
    """Base for TEE and hardware-evidence failures."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INTERNAL


class TeeUnavailable(TeeError):
    """The requested TEE, device or kernel interface is not present."""

    rpc_status: ClassVar[StatusCode] = StatusCode.UNAVAILABLE


class DeviceError(TeeError):
    """A guest-device operation failed; carries every status layer that was reported."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        errno: int | None = None,
        fw_error: int | None = None,
        vmm_error: int | None = None,
    ) -> None:
        super().__init__(message)
        self.errno = errno
        self.fw_error = fw_error
        self.vmm_error = vmm_error


class TsmGenerationError(TeeError):
    """A configfs-tsm report entry was written by someone else while we used it."""

    rpc_status: ClassVar[StatusCode] = StatusCode.ABORTED

    def __init__(self, message: str, *, attribute: str, got: int, want: int) -> None:
        super().__init__(message)
        self.attribute = attribute
        self.got = got
        self.want = want


class EvidenceParseError(TeeError):
    """Bytes that should be a quote, report, certificate table or event log are not valid."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INTERNAL

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class EvidenceMismatch(TeeError):
    """Evidence produced by the TEE does not carry the requested report data (or init data)."""

    rpc_status: ClassVar[StatusCode] = StatusCode.FAILED_PRECONDITION


class MeasurementError(TeeError):
    """The runtime event log, its journal and the measurement registers disagree, or the log cannot be used."""

    rpc_status: ClassVar[StatusCode] = StatusCode.FAILED_PRECONDITION
    advice = (
        "The agent's event log no longer replays to the RTMRs, so every attestation would fail. Check for another "
        "process extending the registers, and keep the log on tmpfs (/run) so that it does not outlive a reboot."
    )


class KbsError(AgentError):
    """Base for Key Broker Service failures."""

    rpc_status: ClassVar[StatusCode] = StatusCode.UNAVAILABLE

    advice = "Check the KBS URL, its certificate, and the KBS log for the cause."


class KbsTransportError(KbsError):
    """The KBS could not be reached, timed out, failed to serve (5xx) or sent an oversized body."""

    rpc_status: ClassVar[StatusCode] = StatusCode.UNAVAILABLE


class KbsProtocolError(KbsError):
    """The KBS answered with something the protocol does not allow."""

    rpc_status: ClassVar[StatusCode] = StatusCode.UNAVAILABLE


class AttestationRejected(KbsError):
    """The KBS answered with an error status; `kbs_type` and `detail` come from its error body."""

    rpc_status: ClassVar[StatusCode] = StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, *, status: int, kbs_type: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.kbs_type = kbs_type
        self.detail = detail


class ResourceNotFound(KbsError):
    """The KBS answered 404: unknown plugin or invalid request path."""

    rpc_status: ClassVar[StatusCode] = StatusCode.NOT_FOUND


class InvalidResourceUri(AgentError):
    """A resource URI that does not have the form `kbs:///<repo>/<type>/<tag>`."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INVALID_ARGUMENT


class DecryptionError(AgentError):
    """Decryption or key unwrapping failed. Deliberately carries no detail (no oracle)."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INTERNAL

    def __init__(self, message: str = "decryption failed") -> None:
        super().__init__(message)


class InvalidRequest(AgentError):
    """A local caller sent a malformed request."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INVALID_ARGUMENT


class NotSupported(AgentError):
    """A valid request that this agent or TEE does not support."""

    rpc_status: ClassVar[StatusCode] = StatusCode.UNIMPLEMENTED


class LayerError(AgentError):
    """An image layer is not what its descriptor says: bad compression or tar, a digest mismatch, an entry
    that cannot be unpacked safely. Nothing of the layer is kept."""

    rpc_status: ClassVar[StatusCode] = StatusCode.UNAVAILABLE  # the registry's data: an upstream failure
    advice = "The image or its registry served a malformed layer; check the image with `skopeo inspect`."


class MountError(AgentError):
    """The rootfs overlay could not be mounted or unmounted; `errno` is the kernel's answer."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INTERNAL  # this guest's kernel or permissions
    advice = "Mounting needs root (CAP_SYS_ADMIN) and a kernel with overlayfs."

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class InvalidImageReference(InvalidRequest):
    """An image reference that is not `[registry/]repository[:tag][@digest]` (the reference's "Illegal image
    reference")."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INVALID_ARGUMENT


class ImageError(AgentError):
    """Base for guest image pull failures."""

    rpc_status: ClassVar[StatusCode] = StatusCode.INTERNAL

    advice = "Check the image reference, the registry configuration ([image] keys) and the registry's log."


class RegistryError(ImageError):
    """The registry could not be reached, timed out, or answered an error status (`status`, 0 when none)."""

    rpc_status: ClassVar[StatusCode] = StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ImageFormatError(ImageError):
    """A manifest, index, image config or blob is malformed, oversized, or does not match its digest."""

    rpc_status: ClassVar[StatusCode] = StatusCode.UNAVAILABLE  # the registry's data: an upstream failure


class ImageRejected(ImageError):
    """The image security policy or a registry `blocked` rule refused the image."""

    rpc_status: ClassVar[StatusCode] = StatusCode.PERMISSION_DENIED
