"""`cvm-agent serve`: build the services from the config, serve them, stop cleanly. Orchestrator.

Order matters for kata-agent, which waits for the socket file: the socket is bound first; slow work (evidence,
KBS contact) happens only when a caller asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

import structlog

from agent import __version__
from agent.api.grpc_server import GrpcServer
from agent.api.methods import build_methods
from agent.api.ttrpc import TtrpcServer
from agent.api.ttrpc_service import build_ttrpc_server
from agent.config import Config
from agent.kbs.client import KbsClient
from agent.service import AttestationAgent, DataHub
from agent.tee.select import make_attester

__all__ = ["run"]

log = structlog.get_logger("agent.daemon")


def _notify_ready() -> None:
    """systemd `Type=notify` readiness, when started by systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)


async def run(config: Config) -> int:
    attester = await asyncio.to_thread(make_attester, config)  # detection probes configfs and sysfs
    kbs: KbsClient | None = None
    if config.kbs.url is None:
        log.warning("kbs.unconfigured", hint="GetToken and GetResource fail until kbs.url / --kbs-url is set")
    else:
        if config.kbs.insecure_http:
            log.warning(
                "kbs.insecure_http",
                url=config.kbs.url,
                warning="plain HTTP: the session cookie travels in clear",
            )
        kbs = KbsClient(
            url=config.kbs.url,
            attester=attester,
            key_algorithm=config.kbs.tee_key_algorithm,
            cert_path=config.kbs.cert_path,
            timeout_s=config.kbs.timeout_s,
            max_response_bytes=config.kbs.max_response_bytes,
            refresh_margin_s=config.kbs.token_refresh_margin_s,
        )
    aa = AttestationAgent(attester, kbs)
    hub = DataHub(
        kbs,
        kek_cache_s=config.data_hub.kek_cache_s,
        skip_sealed_secret_verification=config.data_hub.skip_sealed_secret_verification,
        sealed_secret_key_dir=config.data_hub.sealed_secret_key_dir,
    )
    if config.data_hub.skip_sealed_secret_verification:
        log.warning("sealed_secret.verification_disabled", warning="INSECURE: sealed secrets are not verified")
    server = GrpcServer(build_methods(aa, hub), [config.socket, *config.grpc_listen])
    ttrpc_servers: list[tuple[str, TtrpcServer]] = []
    if config.ttrpc_aa_socket:
        ttrpc_servers.append((config.ttrpc_aa_socket, build_ttrpc_server(build_methods(aa, None))))
    if config.ttrpc_cdh_socket:
        ttrpc_servers.append((config.ttrpc_cdh_socket, build_ttrpc_server(build_methods(None, hub))))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    for path, ttrpc in ttrpc_servers:
        await ttrpc.start(path)
    _notify_ready()
    log.info(
        "agent.ready",
        version=__version__,
        tee=attester.tee,
        socket=str(config.socket),
        grpc_listen=[str(a) for a in config.grpc_listen],
        ttrpc=[path for path, _ in ttrpc_servers],
        kbs=config.kbs.url,
    )
    try:
        await stop.wait()
    finally:
        log.info("agent.stopping")
        await server.stop()
        for _, ttrpc in ttrpc_servers:
            await ttrpc.close(grace_s=2.0)
        if kbs is not None:
            await kbs.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("agent.stopped")
    return 0
