"""agent.image: guest image pull (`api.ImagePullService/PullImage`), inside the TEE.

Map of the package (each module says what it verifies and what it does not):

Registry side (resolve, authenticate, download and verify blobs):

- `reference`   image references: parsing and docker.io normalisation. Pure.
- `registries`  registries.conf-style mirrors, remaps, blocked and insecure registries. Pure.
- `auth`        auth.json lookup, Basic and bearer-token flows.
- `manifest`    Docker v2 / OCI manifests and indexes, platform selection. Pure.
- `registry`    the httpx registry client: manifests, config and layer blobs streamed to digest-verified files.
- `policy`      containers-policy.json signature policy.
- `pull`        the `PullImage` orchestrator: resolve → policy → manifest → layers → mount → config.json → event.

Layer side (a verified blob file → a layer directory → a mounted rootfs):

- `compression` gzip (multi-member), zstd and identity decompression by media type; streaming, bounded. Pure.
- `ocicrypt`    ocicrypt's layer encryption (AES-256-CTR + HMAC-SHA256): annotations, pubopts, keyprovider
                unwrap, a streaming decryptor that authenticates at the end. (Encrypting is the image owner's
                job: `cvm_tools.keyprovider.encrypt`, outside the guest package.)
- `unpack`      safe tar extraction into a layer directory (every path resolved inside the root, as
                `openat2(RESOLVE_IN_ROOT)` does), overlayfs whiteouts, diff_id computed while reading.
- `store`       `LayerStore`: layers under `<work_dir>/layers/`, reused by compressed digest, unpacked once
                when pulls share a layer, crash-safe metadata in `<work_dir>/meta_store.json`.
- `mount`       the read-write overlay at `<bundle>/rootfs`, and its unmount.

Typical layer flow (what `pull` does per layer):

    store = LayerStore(work_dir)
    layer = await store.ensure_layer(digest, media_type, annotations, open_blob, unwrap, diff_id=diff_id)
    rootfs = mount_rootfs([top.path, ..., bottom.path], bundle, scratch=work_dir / "overlay")

The package imports nothing heavy here; import the modules you need.
"""
