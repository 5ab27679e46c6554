"""KBS admin API: register a resource (an image KEK) with a bearer JWT. Edge (network) + token minting.

Trustee's resource admin endpoint is `POST /kbs/v0/resource/<repo>/<type>/<tag>` with the raw bytes as
`application/octet-stream` and `Authorization: Bearer <admin JWT>`. How Trustee verifies the JWT depends on its
`[admin]` configuration (a PEM public key in older releases; identity providers with issuer, audience and a
`role` claim at HEAD), so the token is either minted here from the admin private key, with any extra claims the
deployment needs, or supplied ready-made.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent import jws
from agent.errors import ConfigError, KbsTransportError
from agent.kbs import protocol
from agent.kbs.client import build_ssl_context
from agent.kbs.resource import parse_resource_uri
from cvm_tools import sign as jws_sign

__all__ = ["load_admin_key", "mint_admin_token", "register_resource"]

ADMIN_TOKEN_LIFETIME_S = 2 * 3600


def load_admin_key(private_key_pem: bytes) -> jws.PrivateKey:
    """Parse the admin private key; `ConfigError` (never the key's bytes) when it is not an unencrypted PEM key of
    a supported type."""
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError):
        msg = "--admin-key is not an unencrypted PEM private key"
        raise ConfigError(msg, key="--admin-key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        msg = "--admin-key must be an Ed25519, EC P-256 or RSA key"
        raise ConfigError(msg, key="--admin-key")
    try:
        jws.algorithm(key)
    except TypeError:
        msg = "--admin-key must be an Ed25519, EC P-256 or RSA key"
        raise ConfigError(msg, key="--admin-key") from None
    return key


def mint_admin_token(
    key: jws.PrivateKey, *, extra_claims: dict[str, Any] | None = None, now: float | None = None
) -> str:
    """A compact JWT (`EdDSA` for Ed25519, `ES256` for P-256, `RS256` for RSA) valid for two hours."""
    issued = int(time.time() if now is None else now)
    claims = {"iat": issued, "exp": issued + ADMIN_TOKEN_LIFETIME_S, **(extra_claims or {})}
    return jws_sign.encode_compact(key, {"typ": "JWT"}, claims)


async def register_resource(
    url: str,
    kid: str,
    data: bytes,
    *,
    token: str,
    cert_path: str | None = None,
    timeout_s: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Store `data` at the KBS resource `kid`.

    Raises:
        AttestationRejected: the KBS refused (its `type` and `detail` are in the message).
        KbsTransportError: the KBS could not be reached.
    """
    uri = parse_resource_uri(kid)
    verify: Any = build_ssl_context(cert_path) if url.startswith("https://") else False
    async with httpx.AsyncClient(
        transport=transport, verify=verify, trust_env=False, timeout=httpx.Timeout(timeout_s)
    ) as client:
        try:
            response = await client.post(
                url.rstrip("/") + f"/kbs/v0/resource/{uri.path}",
                content=data,
                headers={"Content-Type": "application/octet-stream", "Authorization": f"Bearer {token}"},
            )
        except httpx.HTTPError as exc:
            msg = f"KBS at {url} is unreachable for resource registration: {type(exc).__name__}"
            raise KbsTransportError(msg) from exc
    if response.status_code // 100 != 2:
        raise protocol.error_from_response(response.status_code, response.content[:4096], step=f"register {uri.path}")
