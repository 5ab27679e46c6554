"""KBS RCAR protocol 0.4.0 messages, the runtime-data binding, and token claims. Pure (sans-I/O).

Message shapes follow Trustee's code (kbs-protocol.md §3-§8). Functions take and return bytes or plain objects;
the HTTP edge (`agent.kbs.client`) moves them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from agent.errors import AttestationRejected, KbsProtocolError
from agent.jws import decode_compact
from agent.kbs.jcs import canonicalize

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_HASH_ALGORITHMS",
    "Challenge",
    "Token",
    "attestation_body",
    "binding_digest",
    "error_from_response",
    "parse_attest_response",
    "parse_challenge",
    "parse_token",
    "request_body",
    "runtime_data",
]

PROTOCOL_VERSION = "0.4.0"
SUPPORTED_HASH_ALGORITHMS = ("sha256", "sha384", "sha512")
DEFAULT_HASH_ALGORITHM = "sha384"
MAX_ERROR_DETAIL = 512


def request_body(tee: str) -> bytes:
    """The `/auth` Request. `extra-params` advertises the hash algorithms we can bind with."""
    return json.dumps(
        {
            "version": PROTOCOL_VERSION,
            "tee": tee,
            "extra-params": {"supported-hash-algorithms": list(SUPPORTED_HASH_ALGORITHMS)},
        },
        separators=(",", ":"),
    ).encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """The `/auth` response: the nonce (opaque, used verbatim) and the hash to bind with."""

    nonce: str
    hash_algorithm: str


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        msg = f"KBS {what} is not JSON"
        raise KbsProtocolError(msg) from exc
    if not isinstance(value, dict):
        msg = f"KBS {what} is {type(value).__name__}, expected a JSON object"
        raise KbsProtocolError(msg)
    return value


def parse_challenge(body: bytes) -> Challenge:
    """Parse the Challenge. `extra-params` is usually `""`; an object may select the hash algorithm."""
    value = _json_object(body, "challenge")
    nonce = value.get("nonce")
    if not isinstance(nonce, str) or not nonce or len(nonce) > 64 * 1024:
        msg = "KBS challenge has no usable `nonce`"
        raise KbsProtocolError(msg)
    hash_algorithm = DEFAULT_HASH_ALGORITHM
    extra = value.get("extra-params", "")
    if isinstance(extra, str) and extra:
        try:
            extra = json.loads(extra)
        except ValueError:
            extra = {}
    if isinstance(extra, dict) and "selected-hash-algorithm" in extra:
        selected = extra["selected-hash-algorithm"]
        if not isinstance(selected, str) or selected.lower() not in SUPPORTED_HASH_ALGORITHMS:
            msg = f"KBS selected hash algorithm {selected!r}, expected one of {', '.join(SUPPORTED_HASH_ALGORITHMS)}"
            raise KbsProtocolError(msg)
        hash_algorithm = selected.lower()
    return Challenge(nonce=nonce, hash_algorithm=hash_algorithm)


def runtime_data(nonce: str, tee_pubkey: dict[str, str], additional_evidence: str = "") -> dict[str, Any]:
    """The object the KBS rebuilds and hashes; `additional-evidence` is always present, `""` when none."""
    return {"additional-evidence": additional_evidence, "nonce": nonce, "tee-pubkey": tee_pubkey}


def binding_digest(data: dict[str, Any], hash_algorithm: str = DEFAULT_HASH_ALGORITHM) -> bytes:
    """Hash of the RFC 8785 canonical JSON of the runtime data: the value bound into the TEE report."""
    if hash_algorithm not in SUPPORTED_HASH_ALGORITHMS:
        msg = f"hash algorithm {hash_algorithm!r} is not supported"
        raise ValueError(msg)
    return hashlib.new(hash_algorithm, canonicalize(data)).digest()


def attestation_body(
    *,
    nonce: str,
    tee_pubkey: dict[str, str],
    evidence: object,
    additional_evidence: str = "",
    init_data_toml: str | None = None,
) -> bytes:
    """The `/attest` Attestation: kebab-case top level, snake_case inside `tee-evidence`."""
    body: dict[str, Any] = {
        "runtime-data": {"nonce": nonce, "tee-pubkey": tee_pubkey},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": additional_evidence},
    }
    if init_data_toml is not None:
        body["init-data"] = {"format": "toml", "body": init_data_toml}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class Token:
    """An attestation token. `claims` are decoded but NOT signature-verified: the KBS verifies them."""

    raw: str
    claims: dict[str, Any]

    @property
    def exp(self) -> float | None:
        value = self.claims.get("exp")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    @property
    def nbf(self) -> float | None:
        value = self.claims.get("nbf")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def __repr__(self) -> str:
        return f"Token(<redacted>, exp={self.exp})"


def parse_token(raw: str) -> Token:
    """Decode a compact JWT's claims (no signature check; the agent only reads `exp`/`nbf`)."""
    parts = decode_compact(raw)
    if parts is None:
        msg = "KBS token is not a compact JWT with a JSON header and JSON claims"
        raise KbsProtocolError(msg)
    return Token(raw=raw, claims=parts[1])


def parse_attest_response(body: bytes) -> Token:
    """The `/attest` response `{"token": "<JWT>"}`."""
    value = _json_object(body, "attest response")
    raw = value.get("token")
    if not isinstance(raw, str) or not raw:
        msg = "KBS attest response has no `token`"
        raise KbsProtocolError(msg)
    return parse_token(raw)


def _clean(text: str) -> str:
    printable = "".join(c if c.isprintable() else " " for c in text)
    return printable[:MAX_ERROR_DETAIL]


def error_from_response(status: int, body: bytes, *, step: str) -> AttestationRejected:
    """Turn a non-2xx KBS answer into an error carrying the KBS `type` and `detail`.

    The KBS error body is `{"type": ".../errors/<Variant>", "detail": "<text>"}`; anything else is reported by
    status alone. `detail` is KBS-chosen text about the failure, not resource content.
    """
    kbs_type = detail = ""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        value = None
    if isinstance(value, dict):
        if isinstance(value.get("type"), str):
            kbs_type = _clean(value["type"].rsplit("/", 1)[-1])
        if isinstance(value.get("detail"), str):
            detail = _clean(value["detail"])
    summary = f"KBS {step} failed with HTTP {status}"
    if kbs_type or detail:
        summary += f": {kbs_type or 'error'}: {detail}" if detail else f": {kbs_type}"
    return AttestationRejected(summary, status=status, kbs_type=kbs_type, detail=detail)
