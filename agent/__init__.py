"""cvm-agent: guest-side attestation agent for confidential VMs.

This package is what runs in a TEE. The developer and image-owner tools (dev KBS, wrap-only key provider,
sealing) are the separate `cvm-agent-tools` distribution (`tools/`, package `cvm_tools`), which imports this one
and is never imported by it.

Package map:

- `agent.errors`: the error tree (pure).
- `agent.config`: configuration dataclasses, TOML loading and validation.
- `agent.tee`: attesters (sample, TDX, SNP), hardware-evidence parsers, kernel interfaces.
- `agent.kbs`: the KBS RCAR 0.4.0 client: protocol messages, JCS binding, JWE, resource URIs, HTTP edge.
- `agent.keyprovider`: ocicrypt key-provider protocol and annotation packets.
- `agent.service`: transport-agnostic service objects (attestation agent, data hub, key provider).
- `agent.api`: gRPC and ttRPC transports over those service objects; generated code in `agent.api._gen`.
- `agent.cli`: the `cvm-agent` command.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
