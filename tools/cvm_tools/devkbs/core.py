"""The development KBS's request logic, without HTTP. Pure apart from the resource directory read.

Behaves as Trustee's KBS does for the sample TEE (kbs-protocol.md §2-§10): the same endpoints, the
`kbs-session-id` cookie with an `Expires` attribute, the report-data binding check, ES256 EAR-style tokens
carrying `tee-pubkey`, JWE responses, and Trustee's status codes and `{"type","detail"}` error bodies (almost
every error is 401). It is a development tool: its tokens are signed by an ephemeral key and it allows any
evidence that binds correctly, including the mock `sample` TEE. TDX and SNP evidence is checked for structure
and binding only (`cvm_tools.devkbs.verifiers`): no quote or report signature is verified.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent import jws
from agent.kbs import jwe
from agent.kbs.jcs import canonicalize
from agent.strictjson import b64url_encode, load_json_object
from cvm_tools import sign as jws_sign
from cvm_tools.devkbs.faults import CORE_KINDS, FaultPlan
from cvm_tools.devkbs.verifiers import HARDWARE_VERIFIERS, init_data_digest

__all__ = ["KNOWN_TEES", "DevKbsCore", "Response"]

PROTOCOL_VERSION = "0.4.0"
ERROR_PREFIX = "https://github.com/confidential-containers/kbs/errors/"
KNOWN_TEES = frozenset(
    {
        "az-snp-vtpm",
        "az-tdx-vtpm",
        "nvidia",
        "sgx",
        "snp",
        "tdx",
        "cca",
        "csv",
        "se",
        "hygondcu",
        "tpm",
        "sample",
        "sampledevice",
    }
)
MAX_BODY = 2 * 1024 * 1024
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_COOKIE = re.compile(r"(?:^|;\s*)kbs-session-id=([0-9a-f]{32})(?:;|$)")


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Session:
    nonce: str
    tee: str
    expires: float
    token: str | None = None


def _error(status: int, variant: str, detail: str) -> Response:
    body = json.dumps({"type": ERROR_PREFIX + variant, "detail": detail}).encode()
    return Response(status, body, {"Content-Type": "application/json"})


def _typed_pubkey(value: object) -> dict[str, str] | None:
    """Re-serialise a tee-pubkey the way the KBS's typed struct does: only the known members survive."""
    if not isinstance(value, dict):
        return None
    members = {"RSA": ("kty", "alg", "n", "e"), "EC": ("kty", "crv", "alg", "x", "y")}.get(value.get("kty", ""))
    if members is None or not all(isinstance(value.get(m), str) for m in members):
        return None
    return {m: value[m] for m in members}


Verifier = Callable[[str, object, bytes, str | None], dict[str, Any]]


def verify_sample(tee: str, evidence: object, digest: bytes, _init_data: str | None) -> dict[str, Any]:
    """Sample evidence: `report_data` must equal base64 std of the digest exactly (no padding)."""
    if not isinstance(evidence, dict) or not isinstance(evidence.get("svn"), str):
        msg = "sample evidence is not {svn, report_data}"
        raise TypeError(msg)
    if evidence.get("report_data", "") != base64.b64encode(digest).decode():
        msg = "sample report_data does not match the runtime data digest"
        raise ValueError(msg)
    return {
        "svn": evidence["svn"],
        "report_data": evidence["report_data"],
        "launch_digest": "abcde",
        "platform_version": {"major": 1, "minor": 4},
        "debug": False,
    }


class DevKbsCore:
    """Thread-safe request handler state: sessions, the token signer, the resource store, counters."""

    def __init__(
        self,
        resources: Path,
        *,
        session_minutes: float = 5.0,
        token_minutes: float = 5.0,
        clock: Callable[[], float] = time.time,
        verifiers: Mapping[str, Verifier] | None = None,
        admin_public_key: bytes | None = None,
        insecure_admin: bool = False,
    ) -> None:
        self.resources = resources
        self.admin_key = serialization.load_pem_public_key(admin_public_key) if admin_public_key else None
        self.insecure_admin = insecure_admin
        self.session_s = session_minutes * 60
        self.token_s = token_minutes * 60
        self.clock = clock
        self.verifiers: dict[str, Verifier] = {"sample": verify_sample, **HARDWARE_VERIFIERS, **(verifiers or {})}
        self._signer = ec.generate_private_key(ec.SECP256R1())
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"auth": 0, "attest": 0, "resource": 0, "rejected": 0}
        self.faults = FaultPlan()  # misbehaviour on purpose, for the reliability suite (`cvm_tools.devkbs.faults`)

    # -- tokens ------------------------------------------------------------------------------------------------

    def _signer_jwk(self) -> dict[str, str]:
        numbers = self._signer.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "alg": "ES256",
            "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big")),
        }

    def issue_token(self, tee: str, claims: dict[str, Any], runtime: dict[str, Any], init: str | None) -> str:
        now = int(self.clock())
        lifetime = int(self.token_s)
        fault = self.faults.take("attest", CORE_KINDS)
        if fault is not None and fault.kind == "foreign-pubkey":
            runtime = {**runtime, "tee-pubkey": jwe.TeeKeyPair.generate().public_jwk()}
        elif fault is not None and fault.kind == "expired-token":
            lifetime = -60
        annotated: dict[str, Any] = {
            tee: claims,
            "runtime_data_claims": runtime,
            "report_data": claims.get("report_data"),
        }
        if init is not None:
            annotated["init_data"] = init
        payload = {
            "eat_profile": "tag:github.com,2024:confidential-containers/Trustee",
            "iat": now,
            "exp": now + lifetime,
            "iss": "cvm-agent-dev-kbs",
            "ear.verifier-id": {"developer": "cvm-agent", "build": "dev-kbs"},
            "submods": {
                "cpu0": {
                    "ear.status": "affirming",
                    "ear.trustworthiness-vector": {},
                    "ear.appraisal-policy-id": "default_cpu",
                    "ear.veraison.annotated-evidence": annotated,
                }
            },
        }
        return jws_sign.encode_compact(self._signer, {"typ": "JWT", "jwk": self._signer_jwk()}, payload)

    def verify_token(self, token: str) -> dict[str, Any] | None:
        """Signature and `exp` check of a token this KBS issued; None when invalid."""
        parts = jws.decode_compact(token)
        if parts is None:
            return None
        header, claims, signing_input, signature = parts
        if not jws.verify(self._signer.public_key(), header.get("alg"), signing_input, signature):
            return None
        exp = claims.get("exp", 0)
        if not isinstance(exp, int | float) or exp < self.clock():
            return None
        return claims

    # -- endpoints ---------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request. `headers` keys are lower-case."""
        if len(body) > MAX_BODY:
            return Response(413, b"payload too large", {"Content-Type": "text/plain"})
        route, _, query = path.partition("?")
        if not route.startswith("/kbs/v0/"):
            return _error(404, "InvalidRequestPath", f"Invalid request path {route}")
        parts = route[len("/kbs/v0/") :].split("/")
        name = parts[0]
        if method == "POST" and route == "/kbs/v0/auth":
            return self._auth(body)
        if method == "POST" and route == "/kbs/v0/attest":
            return self._attest(headers, body)
        if name == "resource" and method == "GET":
            return self._resource(headers, parts[1:], query)
        if name == "resource" and method == "POST":
            return self._set_resource(headers, parts[1:], body)
        return _error(404, "PluginNotFound", f"Plugin {name} not found")

    def _reject_attest(self) -> Response:
        self.counters["rejected"] += 1
        return _error(401, "AttestationError", "Attestation error: RCAR handshake Attest failed")

    def _auth(self, body: bytes) -> Response:
        try:
            request = load_json_object(body, "Request", error=ValueError)
            version, tee = request["version"], request["tee"]
            if not isinstance(version, str) or not isinstance(tee, str) or tee not in KNOWN_TEES:
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return _error(401, "AttestationError", "Attestation error: RCAR handshake Auth failed: deserialize Request")
        if not re.fullmatch(r"\d+\.\d+\.\d+", version):
            return _error(
                401,
                "AttestationError",
                "Attestation error: RCAR handshake Auth failed: failed to parse KBS version",
            )
        fault = self.faults.take("auth", CORE_KINDS)
        expected = str(fault.arg) if fault is not None and fault.kind == "version" else PROTOCOL_VERSION
        if version != expected:
            detail = (
                "Attestation error: RCAR handshake Auth failed: KBS Client Protocol Version Mismatch: "
                f"expect ={expected} while the request is {version}"
            )
            return _error(401, "AttestationError", detail)
        session_id = uuid.uuid4().hex
        expires = self.clock() + self.session_s
        session = _Session(nonce=base64.b64encode(secrets.token_bytes(32)).decode(), tee=tee, expires=expires)
        with self._lock:
            self._sweep()
            self._sessions[session_id] = session
            self.counters["auth"] += 1
        cookie = f"kbs-session-id={session_id}; Expires={email.utils.formatdate(expires, usegmt=True)}"
        challenge = json.dumps({"nonce": session.nonce, "extra-params": ""}).encode()
        return Response(200, challenge, {"Content-Type": "application/json", "Set-Cookie": cookie})

    def _sweep(self) -> None:
        now = self.clock()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]

    def _session(self, headers: Mapping[str, str]) -> tuple[str, _Session] | None:
        match = _COOKIE.search(headers.get("cookie", ""))
        if not match:
            return None
        with self._lock:
            session = self._sessions.get(match.group(1))
            if session is None or session.expires <= self.clock():
                return None
            return match.group(1), session

    def _attest(self, headers: Mapping[str, str], body: bytes) -> Response:
        found = self._session(headers)
        if found is None:
            return self._reject_attest()
        session_id, session = found
        if session.token is not None:  # Trustee returns the old token without re-verifying
            return self._token_response(session_id, session)
        try:
            attestation: dict[str, Any] = load_json_object(body, "Attestation", error=ValueError)
            runtime = attestation["runtime-data"]
            evidence = attestation["tee-evidence"]
            nonce, pubkey = runtime["nonce"], _typed_pubkey(runtime["tee-pubkey"])
            additional = evidence.get("additional_evidence", "")
            primary = evidence["primary_evidence"]
            init = attestation.get("init-data")
            if nonce != session.nonce or pubkey is None or not isinstance(additional, str):
                return self._reject_attest()
            init_toml = None
            if init is not None:
                if not isinstance(init, dict) or init.get("format") != "toml" or not isinstance(init.get("body"), str):
                    return self._reject_attest()
                init_toml = init["body"]
            rd = {"additional-evidence": additional, "nonce": nonce, "tee-pubkey": pubkey}
            digest = hashlib.sha384(canonicalize(rd)).digest()
            verifier = self.verifiers.get(session.tee)
            if verifier is None:
                return self._reject_attest()
            claims = verifier(session.tee, primary, digest, init_toml)
            # Trustee hashes the init-data with its own `algorithm`; a malformed TOML fails /attest for every tee
            init_claim = base64.b64encode(init_data_digest(init_toml)).decode() if init_toml is not None else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return self._reject_attest()
        session.token = self.issue_token(session.tee, claims, {"nonce": nonce, "tee-pubkey": pubkey}, init_claim)
        with self._lock:
            self.counters["attest"] += 1
        return self._token_response(session_id, session)

    def _token_response(self, session_id: str, session: _Session) -> Response:
        cookie = f"kbs-session-id={session_id}; Expires={email.utils.formatdate(session.expires, usegmt=True)}"
        body = json.dumps({"token": session.token}).encode()
        return Response(200, body, {"Content-Type": "application/json", "Set-Cookie": cookie})

    def _resource(self, headers: Mapping[str, str], segments: list[str], _query: str) -> Response:
        token: str | None = None
        found = self._session(headers)
        if found is not None and found[1].token is not None:
            token = found[1].token
        else:
            auth = headers.get("authorization", "")
            if auth.startswith("Bearer "):
                token = auth[len("Bearer ") :].strip()
        if token is None:
            return _error(401, "TokenNotFound", "Attestation Token not found")
        claims = self.verify_token(token)
        if claims is None:
            return _error(401, "TokenVerifierError", "Token Verifier error")
        try:
            annotated = claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
            pubkey = annotated["runtime_data_claims"]["tee-pubkey"]
        except (KeyError, TypeError):
            return _error(401, "TokenVerifierError", "Token Verifier error")
        if len(segments) != 3 or not all(_SEGMENT.fullmatch(s) for s in segments):
            return _error(401, "PluginInternalError", "Plugin internal error")
        fault = self.faults.take("resource", CORE_KINDS)
        if fault is not None and fault.kind == "deny":
            return _error(401, "PolicyDeny", "Access denied by policy")
        path = self.resources.joinpath(*segments)
        try:
            data = path.read_bytes() if path.is_file() else None
        except OSError:
            data = None
        if data is None:
            return _error(401, "PluginInternalError", "Plugin internal error")
        try:
            encrypted = jwe.encrypt(pubkey, data)
        except (ValueError, KeyError, TypeError):
            return _error(401, "JweError", "JWE failed")
        with self._lock:
            self.counters["resource"] += 1
        return Response(200, encrypted, {"Content-Type": "application/json"})

    # -- admin ------------------------------------------------------------------------------------------------

    def _admin_allowed(self, headers: Mapping[str, str]) -> bool:
        """Trustee-style admin check: a bearer JWT signed by the admin key, not expired (EdDSA, ES256, RS256)."""
        if self.insecure_admin:
            return True
        auth = headers.get("authorization", "")
        if self.admin_key is None or not auth.startswith("Bearer "):
            return False
        parts = jws.decode_compact(auth[len("Bearer ") :].strip())
        if parts is None:
            return False
        header, claims, signing_input, signature = parts
        if not isinstance(self.admin_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            return False
        if not jws.verify(self.admin_key, header.get("alg"), signing_input, signature):
            return False
        return isinstance(claims.get("exp"), int) and claims["exp"] > self.clock()

    def _set_resource(self, headers: Mapping[str, str], segments: list[str], body: bytes) -> Response:
        if not self._admin_allowed(headers):
            return _error(
                401,
                "AdminAuthInitialization",
                "failed to initialize [admin] configuration: Admin access denied: invalid or missing admin token",
            )
        if len(segments) != 3 or not all(_SEGMENT.fullmatch(s) for s in segments):
            return _error(401, "PluginInternalError", "Plugin internal error")
        folder = self.resources.joinpath(*segments[:2])
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{segments[2]}.{secrets.token_hex(4)}.tmp"
        tmp.touch(mode=0o600)
        tmp.write_bytes(body)
        tmp.replace(folder / segments[2])
        with self._lock:
            self.counters["registered"] = self.counters.get("registered", 0) + 1
        return Response(200, b"", {})
