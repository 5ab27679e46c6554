"""Fault switches of the development KBS: how it misbehaves on purpose, for the reliability suite.

A `FaultPlan` holds, per endpoint (`auth`, `attest`, `resource`), a queue of faults, each applied to the next
`times` requests (`times=-1`: until cleared). The HTTP front (`server.py`) applies the transport faults; the
core (`core.py`) the protocol ones; `mutate_jwe` the resource-body tampering. Thread-safe.

Kinds (what the KBS does to the matched request):

| kind | effect |
|---|---|
| `status` | answers HTTP `arg` (e.g. 500, 503) with a Trustee-style error body |
| `reset` | closes the connection without answering (RST) |
| `slow` | waits `arg` seconds, then answers normally |
| `drip` | sends the headers, then the body one byte every `arg` seconds |
| `garbage` | 200 with bytes that are not JSON |
| `truncated` | 200 with the first half of the real body |
| `nested` | 200 with JSON nested `arg` levels deep |
| `gzip` | the real body, gzip-compressed, plus `arg` MiB of compressed zeros (a decompression bomb) |
| `oversized` | 200 with `arg` MiB of JSON whitespace |
| `tamper-tag`, `tamper-ciphertext`, `tamper-header`, `epk-curve` | a resource JWE with that part altered |
| `foreign-pubkey` | `/attest` issues a token bound to another key |
| `expired-token` | `/attest` issues a token that expired a minute ago |
| `version` | `/auth` expects protocol version `arg` (a version mismatch) |
| `deny` | resources are refused by policy (401 `PolicyDeny`) |
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from agent.strictjson import b64url_decode, b64url_encode

__all__ = ["KINDS", "Fault", "FaultPlan", "mutate_jwe", "parse_fault_spec"]

TRANSPORT_KINDS = frozenset({"status", "reset", "slow", "drip", "garbage", "truncated", "nested", "gzip", "oversized"})
JWE_KINDS = frozenset({"tamper-tag", "tamper-ciphertext", "tamper-header", "epk-curve"})
CORE_KINDS = frozenset({"foreign-pubkey", "expired-token", "version", "deny"})
KINDS = TRANSPORT_KINDS | JWE_KINDS | CORE_KINDS
STEPS = ("auth", "attest", "resource")


@dataclass(slots=True)
class Fault:
    kind: str
    arg: float | str | None = None
    times: int = 1  # -1: every request until cleared


class FaultPlan:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, list[Fault]] = {step: [] for step in STEPS}
        self.applied: dict[str, int] = {}

    def add(self, step: str, kind: str, arg: float | str | None = None, *, times: int = 1) -> FaultPlan:
        if step not in self._queues:
            msg = f"fault step is {step!r}, expected one of {', '.join(STEPS)}"
            raise ValueError(msg)
        if kind not in KINDS:
            msg = f"fault kind is {kind!r}, expected one of {', '.join(sorted(KINDS))}"
            raise ValueError(msg)
        with self._lock:
            self._queues[step].append(Fault(kind, arg, times))
        return self

    def clear(self) -> None:
        with self._lock:
            for queue in self._queues.values():
                queue.clear()

    def take(self, step: str, kinds: frozenset[str]) -> Fault | None:
        """The fault to apply to this request of `step`, if the next queued one is of `kinds` (consumes one use)."""
        with self._lock:
            queue = self._queues.get(step)
            if not queue or queue[0].kind not in kinds:
                return None
            fault = queue[0]
            if fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    queue.pop(0)
            self.applied[fault.kind] = self.applied.get(fault.kind, 0) + 1
            return fault


_b64 = b64url_encode


def parse_fault_spec(text: str) -> tuple[str, str, float | str | None, int]:
    """`STEP:KIND[:ARG[:TIMES]]` (`cvm-tools dev-kbs --fault`): e.g. `auth:status:503:2`, `resource:tamper-tag`.

    ARG is a number when it reads as one; TIMES defaults to every request for the whole run.
    """
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        msg = f"--fault is {text!r}, expected STEP:KIND[:ARG[:TIMES]]"
        raise ValueError(msg)
    step, kind = parts[0], parts[1]
    if step not in STEPS:
        msg = f"--fault step is {step!r}, expected one of {', '.join(STEPS)}"
        raise ValueError(msg)
    if kind not in KINDS:
        msg = f"--fault kind is {kind!r}, expected one of {', '.join(sorted(KINDS))}"
        raise ValueError(msg)
    arg: float | str | None = None
    if len(parts) > 2 and parts[2]:
        try:
            arg = float(parts[2])
        except ValueError:
            arg = parts[2]
    times = -1
    if len(parts) > 3:
        try:
            times = int(parts[3])
        except ValueError:
            times = 0
        if times < 1:
            msg = f"--fault times is {parts[3]!r}, expected a positive integer"
            raise ValueError(msg)
    return step, kind, arg, times


def _unb64(text: str) -> bytes:
    return b64url_decode(text, "JWE member", error=ValueError)


def mutate_jwe(body: bytes, kind: str) -> bytes:
    """A flattened JWE with one part altered as `kind` says."""
    jwe = json.loads(body)
    if kind in ("tamper-tag", "tamper-ciphertext"):
        field = kind.removeprefix("tamper-")
        raw = bytearray(_unb64(jwe[field]) or b"\x00")
        raw[0] ^= 0x01
        jwe[field] = _b64(bytes(raw))
    elif kind == "tamper-header":
        header = json.loads(_unb64(jwe["protected"]))
        header["kid"] = "tampered"
        jwe["protected"] = _b64(json.dumps(header, separators=(",", ":")).encode())
    elif kind == "epk-curve":
        header = json.loads(_unb64(jwe["protected"]))
        if "epk" not in header:
            msg = "the JWE has no epk (an RSA key): epk-curve does not apply"
            raise ValueError(msg)
        header["epk"]["crv"] = "P-384"
        jwe["protected"] = _b64(json.dumps(header, separators=(",", ":")).encode())
    return json.dumps(jwe, separators=(",", ":")).encode()
