"""The composition root: one `Config` in, the running program out. Orchestrator.

Every program that serves the agent is built here and nowhere else: `cvm-agent serve`, the drop-in
`attestation-agent` and `confidential-data-hub` (their `agent.compat` modules only translate the reference's
flags, config files, environment and kernel command line into a `Config`), the test fixtures and the benchmarks.

    app = App(config)
    await app.start()          # binds every listener first: kata-agent waits for the socket files
    await app.complete_startup()   # initdata binding, credentials, ocicrypt config; then TEE/KBS calls proceed
    ...
    await app.close()

What is served follows from the config: `socket` (gRPC: the attestation agent and the data hub),
`ttrpc_aa_socket` (the attestation agent over ttRPC), `ttrpc_cdh_socket` (the data hub over ttRPC). The
attestation agent exists when one of its listeners does; so does the data hub. `data_hub.backend` says where
resources come from: this process's own attested KBS session (`kbs`), tokens from an attestation agent in another
process (`passport`, the reference CDH's `cc_kbc`), or local files (`offline`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from agent import __version__, sdnotify
from agent.config import PLAIN_HTTP_RISK, Config, CredentialFile, read_input
from agent.errors import ConfigError, EvidenceMismatch, NotSupported
from agent.files import private_dirs, write_private
from agent.lifecycle import resume_gc, stop_signals
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.api.grpc_server import GrpcServer
    from agent.api.ttrpc import TtrpcClient, TtrpcServer
    from agent.image.measure import AaMeasurementClient
    from agent.initdata import InitData
    from agent.kbs.client import KbsClient
    from agent.kbs.passport import TokenPair
    from agent.measurement import RuntimeMeasurement
    from agent.service import AttestationAgent, DataHub, Measure, ResourceBackend
    from agent.tee.base import Attester

__all__ = ["App", "InitdataMismatch", "run"]

log = get_logger("agent.app")

AA_TOKEN_TIMEOUT_S = 50.0
PRELOAD_DELAY_S = 0.2  # after start-up completes: kata-agent's first calls come first
INSECURE_HTTP_WARNING = PLAIN_HTTP_RISK


class InitdataMismatch(Exception):
    """The initdata digest differs from the platform's binding; the program must not serve (already reported)."""


class App:
    """The running program for one `Config`: services, listeners, and their start/stop lifecycle."""

    def __init__(
        self, config: Config, *, attester: Attester | None = None, kbs_seams: Mapping[str, Any] | None = None
    ) -> None:
        """`attester` replaces TEE selection and `kbs_seams` (clock, sleep, transport) the KBS client's time and
        network: seams for tests and benchmarks, never set by an entry point."""
        self.config = config
        self._attester = attester
        self._kbs_seams = dict(kbs_seams or {})
        self.aa: AttestationAgent | None = None
        self.hub: DataHub | None = None
        self.kbs: KbsClient | None = None
        self.measurement: RuntimeMeasurement | None = None
        self._backend: ResourceBackend | None = None
        self._aa_client: TtrpcClient | None = None
        self._initdata: InitData | None = None
        self._initdata_digest: bytes | None = None
        self._ready = asyncio.Event()
        self._aa_measure_client: AaMeasurementClient | None = None
        self._grpc: GrpcServer | None = None
        self._ttrpc: list[tuple[str, TtrpcServer]] = []
        self._started = False
        self._preload: asyncio.Task[None] | None = None

    @property
    def serves_aa(self) -> bool:
        return self.config.socket is not None or self.config.ttrpc_aa_socket is not None

    @property
    def serves_hub(self) -> bool:
        return self.config.socket is not None or self.config.ttrpc_cdh_socket is not None

    @property
    def tee(self) -> str | None:
        return self._attester.tee if self._attester is not None else None

    async def start(self) -> None:
        """Build the services and bind every listener. Calls that use the TEE or the KBS wait for
        `complete_startup`; GetTeeType and the like answer at once."""
        if self._started:
            msg = "App.start() was already called"
            raise RuntimeError(msg)
        self._started = True
        config = self.config
        if config.initdata.toml is not None:  # a file to read and parse; otherwise no thread to start
            self._initdata = await asyncio.to_thread(_load_initdata, config)
        self._initdata_digest = self._initdata.digest if self._initdata is not None else _digest_argument(config)
        if self.serves_aa or config.data_hub.backend == "kbs":
            if self._attester is None:
                from agent.tee.kinds import AUTO
                from agent.tee.select import make_attester

                if config.tee == AUTO:  # detection probes configfs and sysfs: in a thread
                    self._attester = await asyncio.to_thread(make_attester, config)
                else:  # a TEE asked for by name: its attester is built without touching the hardware
                    self._attester = make_attester(config)
            self.kbs = self._kbs_client(self._attester)
        if self.serves_aa:
            from agent.service import AttestationAgent

            assert self._attester is not None
            from agent.measurement import build_measurement

            # recovers the event log; refuses (MeasurementError) when log and registers cannot be reconciled
            if config.eventlog.enabled:  # opens and recovers the journal: in a thread
                self.measurement = await asyncio.to_thread(build_measurement, config, self._attester)
            else:
                self.measurement = build_measurement(config, self._attester)
            self.aa = AttestationAgent(self._attester, self.kbs, ready=self._ready, measurement=self.measurement)
        if self.serves_hub:
            from agent.service import DataHub

            self._backend = self._resource_backend()
            if config.data_hub.skip_sealed_secret_verification:
                log.warning("sealed_secret.verification_disabled", warning="INSECURE: sealed secrets are not verified")
            self.hub = DataHub(
                self._backend,
                kek_cache_s=config.data_hub.kek_cache_s,
                skip_sealed_secret_verification=config.data_hub.skip_sealed_secret_verification,
                sealed_secret_key_dir=config.data_hub.sealed_secret_key_dir,
                image=config.image,
                measure=self._pull_measurement(),
            )
        await self._listen()

    def _pull_measurement(self) -> Measure:
        """The `PullImage` event: this process's own attestation agent if it serves one, else the AA socket."""
        from agent.service import pull_image_measurement

        aa = self.aa
        if aa is not None:
            return pull_image_measurement(lambda d, o, c: aa.extend_runtime_measurement(d, o, c, None))
        from agent.image.measure import AaMeasurementClient

        self._aa_measure_client = AaMeasurementClient(self.config.data_hub.aa_socket)
        return pull_image_measurement(self._aa_measure_client.extend)

    def _kbs_client(self, attester: Attester) -> KbsClient | None:
        kbs = self.config.kbs
        if kbs.url is None:
            if self.serves_aa or self.config.data_hub.backend == "kbs":
                log.warning("kbs.unconfigured", hint="GetToken and GetResource fail until a KBS URL is configured")
            return None
        if kbs.insecure_http:
            log.warning("kbs.insecure_http", url=kbs.url, warning=INSECURE_HTTP_WARNING)
        init_data_toml = self._initdata.text if self._initdata is not None else None

        def build() -> KbsClient:
            from agent.kbs.client import KbsClient

            return KbsClient(kbs, attester, init_data_toml=init_data_toml, **self._kbs_seams)

        return cast("KbsClient", _OnFirstUse(build))

    def _resource_backend(self) -> ResourceBackend | None:
        hub = self.config.data_hub
        if hub.backend == "kbs":
            return self.kbs
        if hub.backend == "offline":
            from agent.kbs.offline import OfflineFsKbc

            log.info("cdh.kbc", kbc="offline_fs_kbc", files=list(hub.offline_files))
            return OfflineFsKbc(list(hub.offline_files))
        # passport: the token and TEE key come from the attestation agent over ttRPC (the reference CDH's cc_kbc)
        kbs = self.config.kbs
        if kbs.url is None:
            msg = "data_hub.backend = 'passport' needs a KBS URL"
            raise ConfigError(msg, key="kbs.url")
        from agent.api._gen import attestation_agent_pb2 as aa_pb2
        from agent.api.names import AA_SERVICE
        from agent.api.ttrpc import TtrpcClient

        client = TtrpcClient(hub.aa_socket)
        self._aa_client = client

        async def token_source() -> TokenPair:
            from agent.api.status import RpcError, StatusCode
            from agent.errors import AttestationRejected, KbsTransportError
            from agent.kbs.passport import parse_token_reply

            request = aa_pb2.GetTokenRequest(TokenType="kbs").SerializeToString()
            try:
                reply = await client.call(AA_SERVICE, "GetToken", request, timeout=AA_TOKEN_TIMEOUT_S)
            except RpcError as exc:  # the AA is down, or its KBS failed or refused: upstream, never INTERNAL here
                why = f"{exc.code.name}: {exc.message[:300]}"
                msg = f"the attestation agent at {hub.aa_socket} gave no KBS token: {why}"
                if exc.code is StatusCode.PERMISSION_DENIED:
                    raise AttestationRejected(msg, status=401) from None
                raise KbsTransportError(msg) from None
            return parse_token_reply(aa_pb2.GetTokenResponse.FromString(reply).Token)

        if kbs.insecure_http:
            log.warning("kbs.insecure_http", url=kbs.url, warning=INSECURE_HTTP_WARNING)
        log.info("cdh.kbc", kbc="cc_kbc", url=kbs.url, aa_socket=hub.aa_socket)

        def build() -> ResourceBackend:
            from agent.kbs.passport import PassportClient

            return PassportClient(kbs, token_source, transport=self._kbs_seams.get("transport"))

        return cast("ResourceBackend", _OnFirstUse(build))

    async def _listen(self) -> None:
        from agent.api.methods import build_methods

        config = self.config
        from agent.api.sockets import check_listen

        for address in [*([config.socket, *config.grpc_listen] if config.socket else [])]:
            host_port = (address.host or "", address.port or 0)
            check_listen(address.unix_path if address.unix_path is not None else host_port)
        for path in (config.ttrpc_aa_socket, config.ttrpc_cdh_socket):
            if path is not None:
                check_listen(path)
        from agent.api.budget import ReplyBudget

        budget = ReplyBudget(config.reply_budget_mib * 1024 * 1024)  # one for every transport: replies held for peers
        try:
            if config.socket is not None:
                from agent.api.grpc_server import GrpcServer

                methods = build_methods(self.aa, self.hub, extensions=True)  # + cvm-agent's own (pull progress)
                self._grpc = GrpcServer(methods, [config.socket, *config.grpc_listen], reply_budget=budget)
                await self._grpc.start()
            for path, aa, hub in ((config.ttrpc_aa_socket, self.aa, None), (config.ttrpc_cdh_socket, None, self.hub)):
                if path is not None:
                    from agent.api.ttrpc_service import build_ttrpc_server  # only where ttRPC is served

                    server = build_ttrpc_server(build_methods(aa, hub), reply_budget=budget)
                    await server.start(path)
                    self._ttrpc.append((path, server))
        except BaseException:
            await self.close()
            raise

    async def complete_startup(self) -> None:
        """Start-up checks, then open the gate for TEE and KBS calls.

        Raises `InitdataMismatch` when the initdata binding does not match the platform (reported here, with the
        reference's message on stderr), and `AgentError` when a credential cannot be fetched.
        """
        config = self.config
        if self.aa is not None and self._attester is not None and self._initdata_digest is not None:
            await _bind_initdata(self._attester, self._initdata_digest)
        if self.hub is not None:
            if config.data_hub.ocicrypt_config is not None:
                await asyncio.to_thread(_ocicrypt_config, config.ttrpc_cdh_socket, config.data_hub.ocicrypt_config)
            await self._download_credentials(config.data_hub.credentials)
        self._ready.set()
        if self.kbs is not None and self._backend is self.kbs and config.kbs.preload:
            self._preload = asyncio.get_running_loop().create_task(self._preload_kbs())

    async def _preload_kbs(self) -> None:
        """Load the KBS client's modules in a thread once serving: the first GetResource then does not wait for
        them, and the first calls after start (kata-agent's) are not slowed by an import holding the GIL."""
        from agent.kbs.client import preload

        await asyncio.sleep(PRELOAD_DELAY_S)
        try:
            await asyncio.to_thread(preload)
        except Exception as exc:  # an optimisation: the first KBS call does the same work, and reports its failure
            log.warning("kbs.preload.failed", error=type(exc).__name__)

    async def _download_credentials(self, credentials: Sequence[CredentialFile]) -> None:
        assert self.hub is not None
        for credential in credentials:
            data = await self.hub.get_resource(credential.resource_uri)
            await asyncio.to_thread(_write_private_file, Path(credential.path), data)
            log.info("cdh.credential", resource=credential.resource_uri, path=credential.path)

    def describe(self) -> dict[str, object]:
        return {
            "version": __version__,
            "tee": self.tee,
            "grpc": [str(a) for a in ([self.config.socket, *self.config.grpc_listen] if self.config.socket else [])],
            "ttrpc": [path for path, _ in self._ttrpc],
            "kbs": self.config.kbs.url,
            "data_hub_backend": self.config.data_hub.backend if self.hub is not None else None,
        }

    async def close(self) -> None:
        """Stop accepting, let in-flight calls finish briefly, and release every client."""
        if self._preload is not None:
            self._preload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._preload
            self._preload = None
        if self._grpc is not None:
            await self._grpc.stop()
            self._grpc = None
        for _, server in self._ttrpc:
            await server.close(grace_s=2.0)
        self._ttrpc = []
        if self.hub is not None:
            await self.hub.aclose()
        if self._aa_measure_client is not None:
            await self._aa_measure_client.close()
            self._aa_measure_client = None
        if self._aa_client is not None:
            await self._aa_client.close()
            self._aa_client = None
        aclose: Callable[[], Awaitable[None]] | None = getattr(self._backend, "aclose", None)
        if aclose is not None and self._backend is not self.kbs:
            await aclose()
        if self.kbs is not None:
            await self.kbs.aclose()
            self.kbs = None
        if self.measurement is not None:
            self.measurement.close()
            self.measurement = None


class _OnFirstUse:
    """A KBS client built at its first use: a process loads the KBS client's modules (~1 MiB, ~5 ms) when a call
    first needs the KBS, not at start (decision 18). Attribute reads go to the built object; `aclose` of one that
    was never built does nothing."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._built: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._built is None:
            self._built = self._build()
        return getattr(self._built, name)

    async def aclose(self) -> None:
        if self._built is not None:
            await self._built.aclose()


def _load_initdata(config: Config) -> InitData | None:
    if config.initdata.toml is None:
        return None
    from agent.initdata import MAX_INITDATA_BYTES, parse_initdata

    path = config.initdata.toml
    return parse_initdata(read_input(path, key="initdata", max_bytes=MAX_INITDATA_BYTES), source=path)


def _digest_argument(config: Config) -> bytes | None:
    if config.initdata.digest is None:
        return None
    from agent.initdata import decode_digest_argument

    return decode_digest_argument(config.initdata.digest)


async def _bind_initdata(attester: Attester, digest: bytes) -> None:
    from agent.initdata import MISMATCH_MESSAGE

    try:
        await attester.bind_init_data(digest)
    except NotSupported:
        log.warning("initdata.unbound", tee=attester.tee, reason="this TEE has no initdata binding; ignored")
    except EvidenceMismatch as exc:
        print(f"{MISMATCH_MESSAGE} {exc}", file=sys.stderr)
        log.error("initdata.mismatch", detail=str(exc))  # noqa: TRY400 - an expected outcome, no traceback
        raise InitdataMismatch(str(exc)) from None
    else:
        log.info("initdata.bound", tee=attester.tee)


def _ocicrypt_config(cdh_socket: str | None, out_path: str) -> None:
    """Honour OCICRYPT_KEYPROVIDER_CONFIG: check the configured file, or write the guest's default one."""
    configured = os.environ.get("OCICRYPT_KEYPROVIDER_CONFIG")
    if configured:
        try:
            providers = json.loads(Path(configured).read_text()).get("key-providers", {})
        except (OSError, ValueError, AttributeError):
            log.warning("ocicrypt.config_unreadable", path=configured)
            return
        if "attestation-agent" not in providers:
            log.warning("ocicrypt.no_attestation_agent_provider", path=configured, providers=sorted(providers))
        else:
            log.info("ocicrypt.config", path=configured, provider=providers["attestation-agent"])
        return
    if cdh_socket is None:
        return
    document = {"key-providers": {"attestation-agent": {"ttrpc": f"unix://{cdh_socket}"}}}
    try:
        target = Path(out_path)
        private_dirs(target.parent)
        target.write_text(json.dumps(document))
    except OSError as exc:
        log.warning("ocicrypt.config_not_written", path=out_path, error=exc.strerror)
        return
    os.environ["OCICRYPT_KEYPROVIDER_CONFIG"] = out_path
    log.info("ocicrypt.config_written", path=out_path)


def _write_private_file(path: Path, data: bytes) -> None:
    """A secret file: 0700 directories, a 0600 temporary file renamed over the target (agent.files)."""
    private_dirs(path.parent)
    write_private(path, data)


async def run(config: Config, *, name: str = "cvm-agent") -> int:
    """Serve `config` until a stop signal: 0 on a clean stop, 1 when the initdata binding does not match."""
    app = App(config)
    with stop_signals() as stop:
        await app.start()
        try:
            log.info(f"{name}.listening", **app.describe())
            try:
                await app.complete_startup()
            except InitdataMismatch:
                return 1
            sdnotify.ready(status=f"{name} serving")
            log.info(f"{name}.ready")
            resume_gc()  # start-up is over (agent.lifecycle)
            await stop.wait()
            sdnotify.stopping()
            log.info(f"{name}.stopping")
            return 0
        finally:
            await app.close()
            log.info(f"{name}.stopped")
