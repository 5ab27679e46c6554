"""`PullImage`: resolve, check policy, fetch and verify, unpack, mount, write config.json, measure. Orchestrator.

The flow for one call (image-pull.md §2), for each pull task from the registry configuration in order until one
succeeds: fetch the manifest (an index is resolved to the platform manifest), fetch and verify the image config,
evaluate the signature policy for the task's reference, fetch missing layers with bounded concurrency into the
layer store (verified, decrypted through the data hub's own key provider, unpacked once), mount the overlay at
`<bundle>/rootfs`, write `<bundle>/config.json`, and extend the `PullImage` measurement event. It returns the
platform manifest's digest.

Failure rules: a rejected or failed image leaves nothing mounted and no config.json; layers already unpacked stay
in the store for the next pull. Differences from the reference, on purpose: the policy is evaluated on every pull,
cache hits included; `os` is checked before mounting, not after; a failing measurement unmounts the rootfs again.

Key lookups during a pull (`kbs:///` policy, credentials, layer KEKs) call the data hub's own methods directly, so
they never queue behind the pull: nothing here holds a lock while awaiting the KBS except the one-time set-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform as platform_module
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import (
    AgentError,
    ConfigError,
    ImageError,
    ImageFormatError,
    ImageRejected,
    InvalidRequest,
    LayerError,
    RegistryError,
)
from agent.image import manifest as mf
from agent.image import policy as pol
from agent.image.auth import AuthConfig, parse_auth_json
from agent.image.mount import mount_rootfs, unmount
from agent.image.reference import ImageReference, parse_reference
from agent.image.registries import (
    PullTask,
    RegistryConfig,
    parse_registry_config,
    parse_registry_config_toml,
    pull_tasks,
)
from agent.image.registry import Deadline, ProxyConfig, RegistryClient, RegistrySession
from agent.image.settings import ImageConfig as PullSettings
from agent.image.store import Layer, LayerStore
from agent.log import get_logger

__all__ = ["ImagePuller", "PullProgress", "PullSettings", "measurement_content"]

log = get_logger("agent.image.pull")

GetResource = Callable[[str], Awaitable[bytes]]
Unwrap = Callable[[bytes], Awaitable[bytes]]
Measure = Callable[[str, str], Awaitable[None]]
MAX_LOCAL_RESOURCE = 1024 * 1024
MAX_BUNDLE_PATH = 4096
DOWNLOADS = "downloads"


@dataclass
class PullProgress:
    """What a pull has done so far; read by `cvm-agent pull` for its progress line."""

    image: str
    started: float = field(default_factory=time.monotonic)
    layers_total: int = 0
    layers_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    phase: str = "resolving"

    def describe(self) -> dict[str, object]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return {
            "image": self.image,
            "phase": self.phase,
            "layers_total": self.layers_total,
            "layers_done": self.layers_done,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "elapsed_s": round(elapsed, 3),
            "rate_bytes_s": int(self.bytes_done / elapsed),
        }


def measurement_content(image_url: str, digest: str) -> str:
    """The `PullImage` event content exactly as the reference formats it (a space after the comma, the caller's
    string verbatim: not normalised, not JSON-escaped; image-pull.md §5)."""
    return f'{{"image":"{image_url}", "digest":"{digest}"}}'


@dataclass(frozen=True, slots=True)
class _Setup:
    auth: AuthConfig
    policy: pol.Policy | None
    registries: RegistryConfig | None
    store: LayerStore
    client: RegistryClient


class ImagePuller:
    """Pulls images for the data hub. Build once; the registry client, policy and layer store are set up lazily on
    the first pull (as the reference) and a failed set-up is retried on the next call."""

    def __init__(
        self,
        settings: PullSettings,
        *,
        get_resource: GetResource,
        unwrap: Unwrap | None,
        measure: Measure | None,
        machine: str | None = None,
        client_factory: Callable[[PullSettings], RegistryClient] | None = None,
    ) -> None:
        self._settings = settings
        self._get_resource = get_resource
        self._unwrap = unwrap
        self._measure = measure
        self._platform = mf.platform_for_machine(machine or platform_module.machine())
        self._client_factory = client_factory or _default_client
        self._setup: _Setup | None = None
        self._setup_lock = asyncio.Lock()
        self.in_flight: dict[str, PullProgress] = {}
        # one download of a missing layer at a time across concurrent pulls (an entry lives while a pull holds it)
        self._layer_gates: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _layer_gate(self, digest: str) -> asyncio.Lock:
        gate = self._layer_gates.get(digest)
        if gate is None:
            gate = self._layer_gates[digest] = asyncio.Lock()
        return gate

    @property
    def work_dir(self) -> Path:
        return Path(self._settings.work_dir)

    async def aclose(self) -> None:
        if self._setup is not None:
            await self._setup.client.aclose()

    # -- set-up --------------------------------------------------------------------------------------------
    async def _fetch(self, uri: str, what: str) -> bytes:
        """A resource URI as the reference resolves it: `kbs://…` through the data hub, `file://` or a path."""
        if uri.startswith(("kbs:", "kbs+")):
            return await self._get_resource("kbs" + uri[uri.index(":") :])
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        if not path.startswith("/"):
            msg = f"{what} URI is {uri[:200]!r}, expected kbs:///…, file:///… or an absolute path"
            raise ConfigError(msg, key=what)
        try:
            data = await asyncio.to_thread(_read_bounded, Path(path))
        except OSError as exc:
            msg = f"{what} {path!r} cannot be read: {exc.strerror}"
            raise ConfigError(msg, key=what) from exc
        return data

    async def _ensure_setup(self) -> _Setup:
        if self._setup is not None:
            return self._setup
        async with self._setup_lock:
            if self._setup is None:
                self._setup = await self._build_setup()
            return self._setup

    async def _build_setup(self) -> _Setup:
        s = self._settings
        auth = AuthConfig()
        if s.authenticated_registry_credentials_uri:
            raw = await self._fetch(s.authenticated_registry_credentials_uri, "authenticated_registry_credentials_uri")
            auth = parse_auth_json(raw)
        policy = None
        if s.image_security_policy_uri:
            policy = pol.parse_policy(await self._fetch(s.image_security_policy_uri, "image_security_policy_uri"))
        elif s.image_security_policy:
            policy = pol.parse_policy(s.image_security_policy.encode())
        else:
            log.warning("image.policy.none", warning="no image security policy: signatures are not checked")
        registries = None
        if s.registry_config is not None:
            registries = parse_registry_config(s.registry_config)
        elif s.registry_configuration_uri:
            raw = await self._fetch(s.registry_configuration_uri, "registry_configuration_uri")
            registries = parse_registry_config_toml(raw, source="registry_configuration_uri")
        store = await asyncio.to_thread(LayerStore, self.work_dir)
        await asyncio.to_thread(_sweep_downloads, self.work_dir / DOWNLOADS)
        return _Setup(auth, policy, registries, store, self._client_factory(s))

    # -- the pull ------------------------------------------------------------------------------------------
    async def pull(self, image_url: str, bundle_path: str) -> str:
        """Pull `image_url` and mount it at `<bundle_path>/rootfs`; return the platform manifest digest."""
        bundle = _bundle(bundle_path)
        reference = parse_reference(image_url)
        if await asyncio.to_thread((bundle / "config.json").exists):
            msg = f"OCI config file already exists: {bundle / 'config.json'}"
            raise InvalidRequest(msg)
        progress = PullProgress(image=image_url)
        self.in_flight[str(bundle)] = progress
        started = time.monotonic()
        log.info("image.pull.started", image=image_url, bundle=str(bundle))
        try:
            setup = await self._ensure_setup()
            digest = await self._pull_any(setup, image_url, reference, bundle, progress)
        except AgentError as exc:
            log.warning("image.pull.failed", image=image_url, error=type(exc).__name__, message=str(exc))
            raise
        finally:
            self.in_flight.pop(str(bundle), None)
        log.info("image.pull.complete", image=image_url, digest=digest, seconds=round(time.monotonic() - started, 3))
        return digest

    async def _pull_any(
        self, setup: _Setup, image_url: str, reference: ImageReference, bundle: Path, progress: PullProgress
    ) -> str:
        tasks = pull_tasks(reference, setup.registries)
        failures: list[tuple[PullTask, AgentError]] = []
        for task in tasks:
            try:
                return await self._pull_task(setup, task, image_url, bundle, progress)
            except (ImageError, LayerError) as exc:
                # Location-specific: a mirror may be down or serve bad data; try the next one.
                log.info("image.pull.task_failed", task=str(task), error=type(exc).__name__, message=str(exc))
                failures.append((task, exc))
        if len(failures) == 1:
            raise failures[0][1]
        detail = "; ".join(f"image: {task}, error: {exc}" for task, exc in failures)
        msg = f"Failed to pull image {image_url} from all mirror/mapping locations or original location: {detail}"
        last = failures[-1][1]
        raise (type(last)(msg) if isinstance(last, ImageError) else ImageError(msg)) from last

    async def _pull_task(
        self, setup: _Setup, task: PullTask, image_url: str, bundle: Path, progress: PullProgress
    ) -> str:
        deadline = Deadline(self._settings.pull_timeout_s)
        session = setup.client.session(task, setup.auth.credentials_for(task.reference), deadline)
        body, content_type, resolved = await session.get_manifest(task.reference.manifest_reference)
        document = mf.parse_manifest(body, content_type)
        index_digest = None
        manifest_digest = resolved
        if isinstance(document, mf.Index):
            index_digest = resolved
            entry = mf.select_platform(document, self._platform)
            body, content_type, manifest_digest = await session.get_manifest(entry.digest)
            document = mf.parse_manifest(body, content_type)
            if not isinstance(document, mf.Manifest):
                msg = f"index entry {entry.digest} is an index, expected an image manifest"
                raise ImageFormatError(msg)
        manifest = document
        config = mf.parse_image_config(await session.get_blob(manifest.config, limit=mf.MAX_CONFIG_BYTES))
        if len(config.diff_ids) != len(manifest.layers):
            msg = f"image config has {len(config.diff_ids)} diff_ids, expected {len(manifest.layers)} (one per layer)"
            raise ImageFormatError(msg)
        if config.os != "linux":
            msg = f"image config `os` is {config.os!r}, expected 'linux'"
            raise ImageFormatError(msg)
        progress.phase = "checking policy"
        await self._check_policy(setup, session, task.reference, manifest_digest, index_digest)
        progress.phase = "pulling layers"
        layers = await self._layers(setup, session, manifest, config, progress)
        await setup.store.record_image(
            manifest.config.digest,
            {
                "manifest_digest": manifest_digest,
                "reference": task.reference.whole(),
                "layers": [layer.digest for layer in layers],
            },
        )
        progress.phase = "mounting"
        return await self._mount_and_finish(setup, bundle, layers, config, image_url=image_url, digest=manifest_digest)

    async def _check_policy(
        self,
        setup: _Setup,
        session: RegistrySession,
        reference: ImageReference,
        manifest_digest: str,
        index_digest: str | None,
    ) -> None:
        if setup.policy is None:
            return
        for requirement in setup.policy.requirements_for(reference):
            if requirement.type == "insecureAcceptAnything":
                continue
            if requirement.type == "reject":
                msg = f"Image policy rejected: Denied by policy: {reference} is rejected by a `reject` requirement"
                raise ImageRejected(msg)
            if requirement.type == "signedBy":
                raise pol.not_supported(requirement)
            if requirement.key_data is not None:
                key = requirement.key_data.encode()
            else:
                assert requirement.key_path is not None
                key = await self._fetch(requirement.key_path, "image_security_policy keyPath")
            signatures = await self._cosign_signatures(session, index_digest or manifest_digest)
            pol.verify_cosign(
                requirement, key, signatures, reference, manifest_digest=manifest_digest, index_digest=index_digest
            )
            log.info("image.policy.signature_verified", image=str(reference), digest=manifest_digest)

    @staticmethod
    async def _cosign_signatures(session: RegistrySession, digest: str) -> list[pol.CosignSignature]:
        try:
            body, content_type, _ = await session.get_manifest(pol.cosign_signature_tag(digest))
        except RegistryError as exc:
            if exc.status == 404:
                return []
            raise
        document = mf.parse_manifest(body, content_type)
        if not isinstance(document, mf.Manifest):
            return []
        found = []
        for layer in document.layers[: pol.MAX_SIGNATURES]:
            signature = layer.annotations.get(pol.COSIGN_SIGNATURE_ANNOTATION)
            if layer.media_type != pol.COSIGN_SIMPLESIGNING or signature is None:
                continue
            payload = await session.get_blob(layer, limit=pol.MAX_PAYLOAD_BYTES)
            found.append(pol.CosignSignature(payload=payload, signature_b64=signature))
        return found

    async def _layers(
        self,
        setup: _Setup,
        session: RegistrySession,
        manifest: mf.Manifest,
        config: mf.ImageConfig,
        progress: PullProgress,
    ) -> list[Layer]:
        """Every distinct layer (first occurrence of a digest), in manifest order."""
        unique: dict[str, tuple[mf.Descriptor, str]] = {}
        for descriptor, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            unique.setdefault(descriptor.digest, (descriptor, diff_id))
        progress.layers_total = len(unique)
        progress.bytes_total = sum(d.size for d, _ in unique.values())
        downloads = self.work_dir / DOWNLOADS
        await asyncio.to_thread(downloads.mkdir, mode=0o700, parents=True, exist_ok=True)
        # `max_concurrent_layer_downloads_per_image` bounds downloads; layers that have arrived unpack while the
        # next ones download, one per CPU. At most downloads + CPUs blob files exist at once (the work dir is often
        # a tmpfs: blobs there are guest memory).
        downloads_max = max(1, self._settings.max_concurrent_layer_downloads_per_image)
        cpus = os.cpu_count() or 1
        download_slots = asyncio.Semaphore(downloads_max)
        unpack_slots = asyncio.Semaphore(cpus)
        layer_slots = asyncio.Semaphore(downloads_max + cpus)

        def count(n: int) -> None:
            progress.bytes_done += n

        async def fetch(descriptor: mf.Descriptor) -> Path:
            target = downloads / f"blob-{secrets.token_hex(8)}"
            async with download_slots:
                await session.download_blob(descriptor, target, count)
            return target

        async def one(descriptor: mf.Descriptor, diff_id: str) -> Layer:
            # A pull that needs a layer another pull is downloading waits for that pull's layer, then reuses it
            # (or downloads it itself if that pull failed): one GET per missing blob, not one per pull.
            async with layer_slots, self._layer_gate(descriptor.digest):
                # Download before queueing for an unpack slot, so downloads overlap unpacking; the store still
                # decides (under its per-digest lock) whether the blob is needed at all.
                blob: Path | None = None
                if setup.store.layer(descriptor.digest) is not None:
                    count(descriptor.size)  # reused: counts as done for the progress line
                else:
                    blob = await fetch(descriptor)

                async def open_blob() -> Path:
                    nonlocal blob
                    path, blob = blob, None
                    return path if path is not None else await fetch(descriptor)

                try:
                    async with unpack_slots:
                        layer = await setup.store.ensure_layer(
                            descriptor.digest,
                            descriptor.media_type,
                            descriptor.annotations,
                            open_blob,
                            self._unwrap,
                            diff_id=diff_id,
                        )
                finally:
                    if blob is not None:  # another pull stored the layer first: this download is not needed
                        await asyncio.to_thread(blob.unlink, missing_ok=True)
            progress.layers_done += 1
            return layer

        try:
            async with asyncio.TaskGroup() as group:
                jobs = [group.create_task(one(d, diff)) for d, diff in unique.values()]
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
        return [job.result() for job in jobs]

    async def _mount_and_finish(
        self, setup: _Setup, bundle: Path, layers: list[Layer], config: mf.ImageConfig, *, image_url: str, digest: str
    ) -> str:
        rootfs = await asyncio.to_thread(
            mount_rootfs, [layer.path for layer in layers], bundle, setup.store.overlay_dir
        )
        try:
            await asyncio.to_thread(_write_new, bundle / "config.json", mf.runtime_spec(config))
            if self._measure is not None:
                await self._measure(image_url, digest)
        except BaseException:
            with contextlib.suppress(AgentError):
                await asyncio.to_thread(unmount, rootfs, scratch=setup.store.overlay_dir)
            await asyncio.to_thread((bundle / "config.json").unlink, missing_ok=True)
            raise
        return digest


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first domain error inside a task group's failure (a cancellation of siblings is not the cause)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


def _bundle(bundle_path: str) -> Path:
    if not bundle_path.startswith("/") or "\0" in bundle_path or len(bundle_path) > MAX_BUNDLE_PATH:
        msg = f"bundle path is {bundle_path[:200]!r}, expected an absolute path"
        raise InvalidRequest(msg)
    if any(part == ".." for part in bundle_path.split("/")):
        msg = f"bundle path is {bundle_path[:200]!r}, expected no '..' components"
        raise InvalidRequest(msg)
    return Path(bundle_path)


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_LOCAL_RESOURCE + 1)
    if len(data) > MAX_LOCAL_RESOURCE:
        msg = f"{path} is larger than {MAX_LOCAL_RESOURCE} bytes"
        raise ConfigError(msg, key=str(path))
    return data


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _sweep_downloads(directory: Path) -> None:
    """Blob files left by a pull that was interrupted (a crash or a restart) are never reused."""
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith("blob-"):
                entry.unlink(missing_ok=True)


def _default_client(settings: PullSettings) -> RegistryClient:
    return RegistryClient(
        extra_roots=settings.extra_root_certificates,
        proxies=ProxyConfig(
            https_proxy=settings.https_proxy, http_proxy=settings.http_proxy, no_proxy=settings.no_proxy
        ),
    )
