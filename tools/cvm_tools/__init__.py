"""cvm_tools: developer and image-owner tools for cvm-agent. Never installed into a TEE.

- `cvm_tools.cli`: the `cvm-tools` command (`dev-kbs`, `keyprovider`, `seal`).
- `cvm_tools.devkbs`: a development KBS speaking Trustee's RCAR protocol (mock TEE, emulated TDX/SNP).
- `cvm_tools.keyprovider`: the wrap-only ocicrypt key provider (`WrapKey`) and its KEK store.
- `cvm_tools.admin`: KBS admin API client (register a KEK as a resource) and admin-token minting.
- `cvm_tools.sign`: JWS signing, compact JWTs and sealed secrets.

This distribution depends on the guest package (`agent`); nothing in `agent` imports `cvm_tools`.
"""

__all__: list[str] = []
