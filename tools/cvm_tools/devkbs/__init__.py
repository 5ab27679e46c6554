"""cvm_tools.devkbs: a development KBS for mock-TEE and emulated-hardware work (never in a guest)."""
