"""cvm-agent: guest-side attestation agent for confidential VMs.

Package map:

- `agent.errors`: the error tree (pure).
- `agent.config`: configuration dataclasses, TOML loading and validation.
- `agent.tee`: attesters (sample, TDX, SNP), hardware-evidence parsers, kernel interfaces.
- `agent.kbs`: the KBS RCAR 0.4.0 client: protocol messages, JCS binding, JWE, resource URIs, HTTP edge.
- `agent.keyprovider`: ocicrypt key-provider protocol and annotation packets.
- `agent.service`: transport-agnostic service objects (attestation agent, data hub, key provider).
- `agent.api`: gRPC and ttRPC transports over those service objects; generated code in `agent.api._gen`.
- `agent.devkbs`: a development KBS for mock-TEE work (not needed in a guest).
- `agent.cli`: the `cvm-agent` command.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
