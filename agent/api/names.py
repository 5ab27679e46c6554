"""The reference services' wire names, shared by servers, clients and the REST front. Pure."""

from __future__ import annotations

__all__ = [
    "AA_SERVICE",
    "CDH_SERVICES",
    "IMAGE_PULL_SERVICE",
    "KEYPROVIDER_SERVICE",
    "RESOURCE_SERVICE",
    "SEALED_SECRET_SERVICE",
    "SECURE_MOUNT_SERVICE",
]

AA_SERVICE = "attestation_agent.AttestationAgentService"
KEYPROVIDER_SERVICE = "keyprovider.KeyProviderService"
RESOURCE_SERVICE = "api.GetResourceService"
SEALED_SECRET_SERVICE = "api.SealedSecretService"
SECURE_MOUNT_SERVICE = "api.SecureMountService"
IMAGE_PULL_SERVICE = "api.ImagePullService"
CDH_SERVICES = (SEALED_SECRET_SERVICE, RESOURCE_SERVICE, SECURE_MOUNT_SERVICE, IMAGE_PULL_SERVICE)
