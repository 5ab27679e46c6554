"""Drop-in compatibility with the reference guest components: their config files, flags, and binaries.

- `refconfig`: the reference AA and CDH config keys, KBS address discovery (`AA_KBC_PARAMS`, kernel cmdline).
- `aa`, `cdh`, `rest`: the `attestation-agent`, `confidential-data-hub` and `api-server-rest` commands.
"""
