"""Image security policy (containers-policy.json subset) and cosign signature checks. Pure.

As the reference (image-pull.md §3): top-level `default` and `transports` are required; only transport `docker`
is consulted; scopes are tried from the most specific (the whole reference) through each parent path, the host,
`*.` domain wildcards and `""`, then `default`. Every requirement in the chosen list must pass; an empty list
accepts. Requirement types: `insecureAcceptAnything`, `reject`, `sigstoreSigned` (public key only: cosign
signatures verified with the key; no Rekor, Fulcio or transparency log, as the reference), and `signedBy`, which
cvm-agent does not implement: an image whose scope needs it is refused with a "not supported" error.

What is verified here: cosign signature bytes against the public key, and the signed payload's manifest digest and
identity. Fetching the key and the signature image is the orchestrator's job.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from agent.errors import ConfigError, ImageRejected, InvalidImageReference, InvalidRequest, NotSupported
from agent.image.reference import ImageReference, parse_reference
from agent.strictjson import json_type, load_json_object

__all__ = [
    "COSIGN_SIGNATURE_ANNOTATION",
    "COSIGN_SIMPLESIGNING",
    "CosignSignature",
    "Policy",
    "Requirement",
    "cosign_signature_tag",
    "parse_policy",
    "verify_cosign",
]

MAX_POLICY_BYTES = 1024 * 1024
MAX_SIGNATURES = 64
MAX_PAYLOAD_BYTES = 64 * 1024
COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
REQUIREMENT_TYPES = ("insecureAcceptAnything", "reject", "signedBy", "sigstoreSigned")
COSIGN_IDENTITIES = ("matchRepository", "exactRepository")


@dataclass(frozen=True, slots=True, kw_only=True)
class Requirement:
    type: str
    key_path: str | None = None
    key_data: str | None = None
    identity: str | None = None
    identity_repository: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    default: tuple[Requirement, ...]
    docker: Mapping[str, tuple[Requirement, ...]]

    def requirements_for(self, reference: ImageReference) -> tuple[Requirement, ...]:
        """The requirement list of the most specific matching `docker` scope, else `default`."""
        for scope in _scopes(reference):
            if scope in self.docker:
                return self.docker[scope]
        return self.default


def _scopes(reference: ImageReference) -> list[str]:
    scopes = [reference.whole()]
    parts = reference.name.split("/")
    scopes += ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]
    host = reference.registry
    if not host.startswith("["):
        host = host.partition(":")[0]
        labels = host.split(".")
        scopes += ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]
    scopes.append("")
    return list(dict.fromkeys(scopes))


def _requirement(value: object, where: str) -> Requirement:
    if not isinstance(value, dict):
        msg = f"policy {where} is {json_type(value)}, expected an object"
        raise ConfigError(msg, key="image_security_policy")
    kind = value.get("type")
    if kind not in REQUIREMENT_TYPES:
        msg = f"policy {where} `type` is {kind!r:.60}, expected one of: {', '.join(REQUIREMENT_TYPES)}"
        raise ConfigError(msg, key="image_security_policy")
    if kind != "sigstoreSigned":
        return Requirement(type=str(kind))
    key_path, key_data = value.get("keyPath"), value.get("keyData")
    if (key_path is None) == (key_data is None) or not isinstance(key_path or key_data, str):
        msg = f"policy {where}: sigstoreSigned needs exactly one of `keyPath` and `keyData` (strings)"
        raise ConfigError(msg, key="image_security_policy")
    if "fulcio" in value or "rekorPublicKeyPath" in value or "rekorPublicKeyData" in value:
        msg = f"policy {where}: sigstoreSigned with Fulcio or Rekor is not supported; use a public key"
        raise ConfigError(msg, key="image_security_policy")
    identity = value.get("signedIdentity")
    identity_type = None
    repository = None
    if identity is not None:
        identity_type = identity.get("type") if isinstance(identity, dict) else None
        if identity_type not in COSIGN_IDENTITIES:
            msg = (
                f"policy {where} `signedIdentity` type is {identity_type!r:.60}, "
                "expected matchRepository or exactRepository"
            )
            raise ConfigError(msg, key="image_security_policy")
        if identity_type == "exactRepository":
            assert isinstance(identity, dict)
            repository = identity.get("dockerRepository")
            if not isinstance(repository, str):
                msg = f"policy {where}: exactRepository needs a `dockerRepository` string"
                raise ConfigError(msg, key="image_security_policy")
    return Requirement(
        type="sigstoreSigned",
        key_path=key_path if isinstance(key_path, str) else None,
        key_data=key_data if isinstance(key_data, str) else None,
        identity=identity_type if isinstance(identity_type, str) else None,
        identity_repository=repository,
    )


def _requirements(value: object, where: str) -> tuple[Requirement, ...]:
    if not isinstance(value, list):
        msg = f"policy {where} is {json_type(value)}, expected an array of requirements"
        raise ConfigError(msg, key="image_security_policy")
    return tuple(_requirement(r, f"{where}[{i}]") for i, r in enumerate(value))


def parse_policy(raw: bytes) -> Policy:
    """Parse policy.json. Raises `ConfigError` (the reference's `InvalidPolicyFile`) on any fault."""
    error = functools.partial(ConfigError, key="image_security_policy")
    doc = load_json_object(raw, "image security policy", error=error, max_bytes=MAX_POLICY_BYTES)
    if "default" not in doc or "transports" not in doc:
        msg = "image security policy needs both `default` and `transports`"
        raise ConfigError(msg, key="image_security_policy")
    transports = doc["transports"]
    if not isinstance(transports, dict):
        msg = f"policy `transports` is {json_type(transports)}, expected an object"
        raise ConfigError(msg, key="image_security_policy")
    docker = transports.get("docker", {})
    if not isinstance(docker, dict):
        msg = f"policy `transports.docker` is {json_type(docker)}, expected an object"
        raise ConfigError(msg, key="image_security_policy")
    return Policy(
        default=_requirements(doc["default"], "`default`"),
        docker={scope: _requirements(v, f"scope {scope[:100]!r}") for scope, v in docker.items()},
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CosignSignature:
    """One layer of a cosign signature image: the payload bytes (digest already checked) and its annotation."""

    payload: bytes
    signature_b64: str


def cosign_signature_tag(digest: str) -> str:
    """`sha256:<hex>` → the cosign signature tag `sha256-<hex>.sig`."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}-{hex_part}.sig"


def _verify_raw(key: object, signature: bytes, payload: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256()
            key.verify(signature, payload, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, payload)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _identity_ok(requirement: Requirement, signed: str, image: ImageReference) -> bool:
    if requirement.identity is None:
        return True
    try:
        signed_name = parse_reference(signed).name
    except InvalidImageReference:
        return False
    if requirement.identity == "matchRepository":
        return signed_name == image.name
    assert requirement.identity_repository is not None
    try:
        wanted = parse_reference(requirement.identity_repository).name
    except InvalidImageReference:
        return False
    return signed_name == wanted


def verify_cosign(
    requirement: Requirement,
    key_pem: bytes,
    signatures: Sequence[CosignSignature],
    image: ImageReference,
    *,
    manifest_digest: str,
    index_digest: str | None,
) -> None:
    """Accept if at least one signature verifies with the key and signs `manifest_digest` (or the index digest)
    with an allowed identity; otherwise raise `ImageRejected` without saying which check failed for which layer."""
    try:
        key = serialization.load_pem_public_key(key_pem)
    except (ValueError, UnsupportedAlgorithm):
        msg = "the sigstoreSigned public key is not a PEM public key"
        raise ConfigError(msg, key="image_security_policy") from None
    accepted_digests = {manifest_digest} | ({index_digest} if index_digest else set())
    for sig in signatures[:MAX_SIGNATURES]:
        if len(sig.payload) > MAX_PAYLOAD_BYTES:
            continue
        try:
            raw_sig = base64.b64decode(sig.signature_b64, validate=True)
        except binascii.Error:
            continue
        if not _verify_raw(key, raw_sig, sig.payload):
            continue
        try:
            payload = load_json_object(sig.payload, "cosign payload")
        except InvalidRequest:
            continue
        critical = payload.get("critical")
        if not isinstance(critical, dict):
            continue
        signed_image = critical.get("image")
        signed_identity = critical.get("identity")
        digest = signed_image.get("docker-manifest-digest") if isinstance(signed_image, dict) else None
        reference = signed_identity.get("docker-reference") if isinstance(signed_identity, dict) else None
        if digest in accepted_digests and isinstance(reference, str) and _identity_ok(requirement, reference, image):
            return
    msg = f"Image policy rejected: Denied by policy: no valid cosign signature for {image} ({manifest_digest})"
    raise ImageRejected(msg)


def not_supported(requirement: Requirement) -> NotSupported:
    msg = (
        f"policy requirement type {requirement.type!r} (GPG simple signing) is not supported by cvm-agent; "
        "use sigstoreSigned"
    )
    return NotSupported(msg)
