"""The TEE key algorithms a KBS can encrypt resources to. Pure.

Its own module, without cryptography, so that `agent.config` (imported by every entry point) can name the
configured algorithm without loading the crypto library: that happens at the first KBS call (`agent.kbs.jwe`).
"""

from __future__ import annotations

import enum

__all__ = ["ECDH_ES_A256KW", "RSA_OAEP_256", "KeyAlgorithm"]

ECDH_ES_A256KW = "ECDH-ES+A256KW"
RSA_OAEP_256 = "RSA-OAEP-256"


class KeyAlgorithm(enum.Enum):
    """TEE key algorithms, named as the reference AA config key `tee_key_algorithm` names them."""

    EC_P256 = "ECDH-ES+A256KW-P256"
    EC_P521 = "ECDH-ES+A256KW-P521"
    RSA_OAEP_256 = "RSA-OAEP-256"

    @property
    def jwe_alg(self) -> str:
        return RSA_OAEP_256 if self is KeyAlgorithm.RSA_OAEP_256 else ECDH_ES_A256KW
