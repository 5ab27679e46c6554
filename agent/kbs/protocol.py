"""KBS RCAR protocol 0.4.0: messages, the runtime-data binding, token claims and the session. Pure (sans-I/O).

Message shapes follow Trustee's code (kbs-protocol.md §3-§8). Functions take and return bytes or plain objects;
the HTTP edge (`agent.kbs.client`) moves them. `RcarSession` is the state machine both clients drive
(auth -> attest -> resource, or a token obtained elsewhere -> resource), including the one rule for a 401 on a
resource: renew the credential once, unless the KBS said why it refused.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import (
    AttestationRejected,
    KbsError,
    KbsProtocolError,
    KbsTransportError,
    ResourceNotFound,
)
from agent.kbs.jcs import canonicalize
from agent.strictjson import dump_json, load_json, load_json_object, split_compact

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_HASH_ALGORITHMS",
    "Challenge",
    "HttpRequest",
    "RcarSession",
    "Renew",
    "Step",
    "Token",
    "token_pubkeys",
    "attestation_body",
    "binding_digest",
    "error_from_response",
    "parse_attest_response",
    "parse_challenge",
    "parse_token",
    "request_body",
    "runtime_data",
    "same_pubkey",
]

PROTOCOL_VERSION = "0.4.0"
SUPPORTED_HASH_ALGORITHMS = ("sha256", "sha384", "sha512")
DEFAULT_HASH_ALGORITHM = "sha384"
MAX_ERROR_DETAIL = 512
# The KBS reads a token back in the `Authorization` header and actix caps request heads at 128 KiB (trustee#1563):
# a longer token can never be used, and it would be handed to GetToken callers and sent on every request.
MAX_TOKEN_BYTES = 128 * 1024


def request_body(tee: str) -> bytes:
    """The `/auth` Request. `extra-params` advertises the hash algorithms we can bind with."""
    return dump_json(
        {
            "version": PROTOCOL_VERSION,
            "tee": tee,
            "extra-params": {"supported-hash-algorithms": list(SUPPORTED_HASH_ALGORITHMS)},
        }
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """The `/auth` response: the nonce (opaque, used verbatim) and the hash to bind with."""

    nonce: str
    hash_algorithm: str


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    return load_json_object(body, f"KBS {what}", error=KbsProtocolError)


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
            extra = load_json(extra, "KBS challenge extra-params", error=KbsProtocolError)
        except KbsProtocolError:
            extra = {}  # a bare string (e.g. an Intel TA hash name) is not a selection
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
    return dump_json(body)


@dataclass(frozen=True, slots=True, kw_only=True)
class Token:
    """An attestation token. `claims` are decoded but NOT signature-verified: the KBS verifies them."""

    raw: str
    claims: dict[str, Any]

    @property
    def exp(self) -> float | None:
        return _number(self.claims.get("exp"))

    @property
    def nbf(self) -> float | None:
        return _number(self.claims.get("nbf"))

    @property
    def iat(self) -> float | None:
        return _number(self.claims.get("iat"))

    def validity(self, received_at: float, wall_now: float) -> tuple[float | None, float | None]:
        """`(not_before, expires)` on the local clock that read `received_at` when the token arrived.

        The KBS's clock and the guest's may disagree (kbs-protocol.md §12 trap 12), so the token's own
        `iat` anchors its lifetime: it expires `exp - iat` seconds after it arrived. Without `iat`, the
        guest's wall clock at arrival (`wall_now`) is the anchor. None: no such bound.
        """
        anchor = self.iat if self.iat is not None else wall_now
        expires = None if self.exp is None else received_at + (self.exp - anchor)
        not_before = None if self.nbf is None else received_at + (self.nbf - anchor)
        return not_before, expires

    def __repr__(self) -> str:
        return f"Token(<redacted>, exp={self.exp})"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_token(raw: str) -> Token:
    """Decode a compact JWT's claims (no signature check; the agent reads `iat`/`exp`/`nbf` and `tee-pubkey`)."""
    return Token(raw=raw, claims=split_compact(raw, "KBS token", error=KbsProtocolError)[1])


# Where a token carries the key the KBS will encrypt to (kbs-protocol.md §7.1), besides EAR's per-submodule path.
_PUBKEY_PATHS = (
    ("tee-pubkey",),
    ("customized_claims", "runtime_data", "tee-pubkey"),
    ("tdx", "attester_runtime_data", "tee-pubkey"),
    ("tdx", "attester_user_data", "tee-pubkey"),
)
_EAR_EVIDENCE = "ear.veraison.annotated-evidence"
_JWK_MEMBERS = {"RSA": ("kty", "alg", "n", "e"), "EC": ("kty", "crv", "alg", "x", "y"), "AKP": ("kty", "alg", "pub")}


def token_pubkeys(claims: Mapping[str, Any]) -> list[object]:
    """Every `tee-pubkey` a token carries: the known claim paths and `submods.<name>[ear...].runtime_data_claims`."""
    found: list[object] = []
    for path in _PUBKEY_PATHS:
        node: object = claims
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        if node is not None:
            found.append(node)
    submods = claims.get("submods")
    if isinstance(submods, dict):
        for submod in submods.values():
            evidence = submod.get(_EAR_EVIDENCE) if isinstance(submod, dict) else None
            runtime = evidence.get("runtime_data_claims") if isinstance(evidence, dict) else None
            if isinstance(runtime, dict) and "tee-pubkey" in runtime:
                found.append(runtime["tee-pubkey"])
    return found


def same_pubkey(claimed: object, ours: Mapping[str, str]) -> bool:
    """True if a token's `tee-pubkey` is our JWK, compared on the members the KBS keeps (§5.2)."""
    members = _JWK_MEMBERS.get(str(ours.get("kty")))
    if members is None or not isinstance(claimed, dict):
        return False
    return all(claimed.get(m) == ours.get(m) for m in members)


def check_binding(token: Token, tee_pubkey: Mapping[str, str], kbs: str) -> None:
    """A token bound to another key is refused: the KBS would encrypt every secret to that key, not ours."""
    for claimed in token_pubkeys(token.claims):
        if not same_pubkey(claimed, tee_pubkey):
            msg = f"KBS at {kbs} issued a token whose tee-pubkey is another key, expected the agent's own key"
            raise KbsProtocolError(msg)


def parse_attest_response(body: bytes) -> Token:
    """The `/attest` response `{"token": "<JWT>"}`."""
    value = _json_object(body, "attest response")
    raw = value.get("token")
    if not isinstance(raw, str) or not raw:
        msg = "KBS attest response has no `token`"
        raise KbsProtocolError(msg)
    if len(raw) > MAX_TOKEN_BYTES:
        msg = f"KBS token is {len(raw)} bytes, expected at most {MAX_TOKEN_BYTES} (the KBS's own request-head limit)"
        raise KbsProtocolError(msg)
    return parse_token(raw)


def _clean(text: str) -> str:
    printable = "".join(c if c.isprintable() else " " for c in text[: MAX_ERROR_DETAIL * 2])
    return printable[:MAX_ERROR_DETAIL]


# What a 401 `type` adds for the operator (kbs-protocol.md §8: Trustee cannot tell these apart by status).
_ADVICE = {
    "PluginInternalError": "the resource may not exist, or the KBS resource policy refused it",
    "JweError": "the KBS cannot encrypt to this key algorithm (try kbs.tee_key_algorithm)",
}
# 401 types a new credential cannot change: the KBS already accepted the token and said why it refused.
_FINAL_401 = frozenset({"PluginInternalError", "JweError"})
_RETRYABLE_STATUS = frozenset({502, 503, 504})


def _kbs_error_body(body: bytes) -> tuple[str, str]:
    try:
        value = load_json_object(body[: 64 * 1024], "KBS error body", error=KbsProtocolError)
    except KbsProtocolError:
        return "", ""
    kind, text = value.get("type"), value.get("detail")
    kbs_type = _clean(kind.rsplit("/", 1)[-1]) if isinstance(kind, str) else ""
    detail = _clean(text) if isinstance(text, str) else ""
    return kbs_type, detail


def error_from_response(status: int, body: bytes, *, step: str, kbs: str | None = None) -> KbsError:
    """Turn a non-200 KBS answer into an error carrying the KBS `type` and `detail`.

    401 (Trustee's refusal for almost everything) is `AttestationRejected`; 404 `ResourceNotFound`; any other
    status (5xx, 413, a redirect...) means the KBS could not serve: `KbsTransportError`, naming the KBS.
    The KBS error body is `{"type": ".../errors/<Variant>", "detail": "<text>"}`; anything else is reported by
    status alone. `detail` is KBS-chosen text about the failure, not resource content.
    """
    kbs_type, detail = _kbs_error_body(body)
    where = f"KBS at {kbs}" if kbs and status not in (401, 404) else "KBS"
    summary = f"{where} {step} failed with HTTP {status}"
    if kbs_type or detail:
        summary += f": {kbs_type or 'error'}: {detail}" if detail else f": {kbs_type}"
    if status == 401 and kbs_type in _ADVICE and step.startswith("resource"):
        summary += f" ({_ADVICE[kbs_type]})"
    if status == 404:
        return ResourceNotFound(summary)
    if status == 401:
        return AttestationRejected(summary, status=status, kbs_type=kbs_type, detail=detail)
    return KbsTransportError(summary)


def retryable_status(status: int) -> bool:
    """Statuses worth another try of the same request: a gateway or an overloaded KBS (502, 503, 504)."""
    return status in _RETRYABLE_STATUS


# -- the session state machine -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request for the HTTP edge to send; `path` starts with `/kbs/v0/`."""

    method: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] | None = None

    def __repr__(self) -> str:  # headers carry the cookie and the token
        return f"HttpRequest({self.method} {self.path})"


class Step(enum.Enum):
    NEW = "new"
    AUTH_SENT = "auth sent"
    CHALLENGED = "challenged"
    ATTEST_SENT = "attest sent"
    ATTESTED = "attested"
    FAILED = "failed"


class Renew(enum.Enum):
    """`receive_resource` outcome: the credential was refused (401); get a new one and retry once."""

    CREDENTIAL = "credential"


_COOKIE = re.compile(r"(?:^|[;,]\s*)kbs-session-id=([A-Za-z0-9_-]{1,128})")


class RcarSession:
    """One KBS session, driven by a client: auth -> attest -> resource requests. Refuses steps out of order.

    Background check (`KbsClient`): `auth_request`, `receive_auth`, `binding_digest`, `attest_request(evidence)`,
    `receive_attest`, then `resource_request`/`receive_resource` any number of times. Passport
    (`PassportClient`): `RcarSession.with_token(...)` starts attested. A step called in the wrong state raises
    RuntimeError (a bug in the caller, not a KBS failure); any KBS error moves the session to FAILED.
    """

    def __init__(self, *, tee: str, tee_pubkey: Mapping[str, str], kbs: str, init_data_toml: str | None = None):
        self.tee = tee
        self.tee_pubkey = dict(tee_pubkey)
        self.kbs = kbs
        self._init_data = init_data_toml
        self.step = Step.NEW
        self.challenge: Challenge | None = None
        self.cookie: str | None = None
        self.token: Token | None = None

    @classmethod
    def with_token(cls, token: Token, tee_pubkey: Mapping[str, str], *, kbs: str) -> RcarSession:
        """A session for a token obtained elsewhere (passport mode): checked for its key binding, then attested."""
        session = cls(tee="", tee_pubkey=tee_pubkey, kbs=kbs)
        check_binding(token, session.tee_pubkey, kbs)
        session.token = token
        session.step = Step.ATTESTED
        return session

    def __repr__(self) -> str:
        return f"RcarSession({self.kbs}, {self.step.value})"

    def _expect(self, step: Step, action: str) -> None:
        if self.step is not step:
            msg = f"RCAR {action} called in state {self.step.value!r}, expected {step.value!r}"
            raise RuntimeError(msg)

    def _fail(self, error: KbsError) -> KbsError:
        self.step = Step.FAILED
        return error

    # auth
    def auth_request(self) -> HttpRequest:
        self._expect(Step.NEW, "auth")
        self.step = Step.AUTH_SENT
        return HttpRequest("POST", "/kbs/v0/auth", request_body(self.tee), {"Content-Type": "application/json"})

    def receive_auth(self, status: int, body: bytes, set_cookies: Iterable[str]) -> Challenge:
        self._expect(Step.AUTH_SENT, "auth response")
        if status != 200:
            raise self._fail(error_from_response(status, body, step="auth", kbs=self.kbs))
        try:
            challenge = parse_challenge(body)
        except KbsProtocolError as exc:
            raise self._fail(KbsProtocolError(f"{exc} (KBS at {self.kbs})")) from None
        for value in set_cookies:
            match = _COOKIE.search(value)
            if match:
                self.cookie = match.group(1)
        if self.cookie is None:
            msg = f"KBS at {self.kbs}: the auth response did not set the kbs-session-id cookie"
            raise self._fail(KbsProtocolError(msg))
        self.challenge = challenge
        self.step = Step.CHALLENGED
        return challenge

    def binding_digest(self) -> bytes:
        """The digest to bind into the TEE evidence for this session's challenge and key."""
        self._expect(Step.CHALLENGED, "binding")
        assert self.challenge is not None
        return binding_digest(runtime_data(self.challenge.nonce, self.tee_pubkey), self.challenge.hash_algorithm)

    # attest
    def attest_request(self, evidence: bytes) -> HttpRequest:
        """The `/attest` request carrying the attester's evidence JSON (bound to `binding_digest()`)."""
        self._expect(Step.CHALLENGED, "attest")
        assert self.challenge is not None
        assert self.cookie is not None
        body = attestation_body(
            nonce=self.challenge.nonce,
            tee_pubkey=self.tee_pubkey,
            evidence=load_json(evidence, "evidence", error=ValueError),
            init_data_toml=self._init_data,
        )
        self.step = Step.ATTEST_SENT
        headers = {"Content-Type": "application/json", "Cookie": f"kbs-session-id={self.cookie}"}
        return HttpRequest("POST", "/kbs/v0/attest", body, headers)

    def receive_attest(self, status: int, body: bytes) -> Token:
        self._expect(Step.ATTEST_SENT, "attest response")
        if status != 200:
            raise self._fail(error_from_response(status, body, step="attest", kbs=self.kbs))
        try:
            token = parse_attest_response(body)
            check_binding(token, self.tee_pubkey, self.kbs)
        except KbsProtocolError as exc:
            raise self._fail(exc if self.kbs in str(exc) else KbsProtocolError(f"{exc} (KBS at {self.kbs})")) from None
        self.token = token
        self.step = Step.ATTESTED
        return token

    # resource
    def resource_request(self, path: str) -> HttpRequest:
        """`GET <path>` with the token as Bearer and, in background-check mode, the session cookie."""
        self._expect(Step.ATTESTED, "resource")
        assert self.token is not None
        headers = {"Authorization": f"Bearer {self.token.raw}"}
        if self.cookie:
            headers["Cookie"] = f"kbs-session-id={self.cookie}"
        return HttpRequest("GET", path, None, headers)

    def receive_resource(self, status: int, body: bytes, *, what: str, may_renew: bool) -> bytes | Renew:
        """The JWE body of a 200; `Renew` for a 401 a new credential may cure (when `may_renew`); else raise."""
        self._expect(Step.ATTESTED, "resource response")
        if status == 200:
            return body
        error = error_from_response(status, body, step=f"resource {what}", kbs=self.kbs)
        if may_renew and isinstance(error, AttestationRejected) and error.kbs_type not in _FINAL_401:
            return Renew.CREDENTIAL
        raise error
