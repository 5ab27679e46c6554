"""The dev KBS's fault switches: the plan's semantics, the CLI spec, and that each JWE mutation really breaks it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from cvm_tools.devkbs.faults import CORE_KINDS, JWE_KINDS, TRANSPORT_KINDS, FaultPlan, mutate_jwe, parse_fault_spec

from agent.errors import DecryptionError
from agent.kbs.jwe import KeyAlgorithm, TeeKeyPair, decrypt, encrypt


def test_times_then_gone_and_forever_until_cleared() -> None:
    plan = FaultPlan().add("auth", "status", 503, times=2).add("auth", "slow", 0.1, times=-1)
    assert plan.take("resource", TRANSPORT_KINDS) is None
    assert plan.take("auth", CORE_KINDS) is None  # the head of the queue is a transport fault
    assert [plan.take("auth", TRANSPORT_KINDS).kind for _ in range(2)] == ["status", "status"]  # type: ignore[union-attr]
    assert all(plan.take("auth", TRANSPORT_KINDS).kind == "slow" for _ in range(5))  # type: ignore[union-attr]
    assert plan.applied == {"status": 2, "slow": 5}
    plan.clear()
    assert plan.take("auth", TRANSPORT_KINDS) is None


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("auth:status:503:2", ("auth", "status", 503.0, 2)),
        ("resource:tamper-tag", ("resource", "tamper-tag", None, -1)),
        ("auth:version:0.2.0", ("auth", "version", "0.2.0", -1)),
        ("attest:slow:1.5", ("attest", "slow", 1.5, -1)),
    ],
)
def test_cli_spec(spec: str, parsed: tuple[object, ...]) -> None:
    assert parse_fault_spec(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("auth", "--fault is 'auth', expected STEP:KIND[:ARG[:TIMES]]"),
        ("token:status", "--fault step is 'token', expected one of auth, attest, resource"),
        ("auth:explode", "--fault kind is 'explode', expected one of"),
        ("auth:status:500:0", "--fault times is '0', expected a positive integer"),
        ("auth:status:500:x", "--fault times is 'x', expected a positive integer"),
    ],
)
def test_cli_spec_rejected(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        parse_fault_spec(spec)


def test_cli_refuses_a_bad_fault_with_usage_status(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "cvm_tools.cli", "dev-kbs", "--resources", str(tmp_path), "--fault", "auth:nope"]
    result = subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert result.returncode == 2
    assert b"--fault kind is 'nope'" in result.stderr


@pytest.mark.parametrize("kind", sorted(JWE_KINDS))
@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_OAEP_256], ids=["ec", "rsa"])
def test_each_jwe_mutation_breaks_decryption(kind: str, algorithm: KeyAlgorithm) -> None:
    keypair = TeeKeyPair.generate(algorithm)
    good = encrypt(keypair.public_jwk(), b"secret")
    assert decrypt(keypair, good) == b"secret"
    if kind == "epk-curve" and algorithm is KeyAlgorithm.RSA_OAEP_256:
        with pytest.raises(ValueError, match="no epk"):
            mutate_jwe(good, kind)
        return
    with pytest.raises(DecryptionError):
        decrypt(keypair, mutate_jwe(good, kind))
