"""`cvm-agent pull IMAGE BUNDLE_DIR` through a running agent, and the progress method it polls."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent import cli
from agent.api._gen import api_pb2
from agent.api.grpc_server import GrpcServer
from agent.api.methods import build_methods
from agent.config import ListenAddress
from agent.image.command import PROGRESS_PATH, progress_line
from agent.image.settings import ImageConfig
from agent.service import DataHub
from tests.fakes.registry import (
    Entry,
    FlakyProxy,
    Pusher,
    Registry,
    build_image,
    gzip_layer,
    tar_layer,
)
from tests.integration.image_support import cleanup_mount, image_test_marks, snapshot

pytestmark = image_test_marks(overlay=True)

IMAGE = build_image([gzip_layer(tar_layer([Entry("hello", b"hello from the registry\n")]))])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry")) as running:
        pusher = Pusher(running.url)
        pusher.image("cli/app", "v1", IMAGE)
        pusher.close()
        yield running


@pytest.fixture
async def agent(tmp_path: Path, registry: Registry) -> AsyncIterator[tuple[str, FlakyProxy]]:
    with FlakyProxy(registry.port) as proxy:
        config = ImageConfig(
            work_dir=str(tmp_path / "work"),
            registry_config={"registry": [{"location": proxy.host, "insecure": True}]},
            pull_timeout_s=60,
        )
        hub = DataHub(None, image=config)
        socket = str(tmp_path / "agent.sock")
        server = GrpcServer(build_methods(None, hub, extensions=True), [ListenAddress(unix_path=socket)])
        await server.start()
        try:
            yield socket, proxy
        finally:
            await server.stop(0.5)
            for rootfs in tmp_path.rglob("rootfs"):
                cleanup_mount(rootfs.parent, tmp_path / "work" / "overlay")
            await hub.aclose()


async def test_pull_command(agent: tuple[str, FlakyProxy], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    socket, proxy = agent
    bundle = tmp_path / "bundle"  # created by the command
    code = await asyncio.to_thread(cli.main, ["pull", "--socket", socket, f"{proxy.host}/cli/app:v1", str(bundle)])
    out, _err = capsys.readouterr()
    assert code == 0
    assert out.splitlines()[-1] == IMAGE.digest  # (the in-process agent's own log lines come first)
    assert os.path.ismount(bundle / "rootfs")
    assert snapshot(bundle / "rootfs")["hello"][3] == b"hello from the registry\n"


async def test_pull_command_failure_exit_code(
    agent: tuple[str, FlakyProxy], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    socket, proxy = agent
    code = await asyncio.to_thread(
        cli.main, ["pull", "--socket", socket, f"{proxy.host}/cli/missing:v1", str(tmp_path / "b")]
    )
    _out, err = capsys.readouterr()
    assert code == 1
    assert "Image Pull error: manifest" in err
    assert "MANIFEST_UNKNOWN" in err


async def test_progress_during_a_pull(agent: tuple[str, FlakyProxy], tmp_path: Path) -> None:
    from agent.client import call

    socket, proxy = agent
    proxy.faults = {"/blobs/": ["delay"] * 3}
    bundle = tmp_path / "slow"
    bundle.mkdir()
    pull = asyncio.create_task(
        asyncio.to_thread(
            cli.main, ["pull", "--no-progress", "--socket", socket, f"{proxy.host}/cli/app:v1", str(bundle)]
        )
    )
    request = api_pb2.GetResourceRequest(ResourcePath=str(bundle))
    states = []
    while not pull.done():
        reply = await asyncio.to_thread(call, socket, PROGRESS_PATH, request, api_pb2.GetResourceResponse)
        if reply.Resource:
            states.append(json.loads(reply.Resource))
        await asyncio.sleep(0.1)
    assert await pull == 0
    assert states, "no progress was reported while the pull ran"
    assert states[0]["image"] == f"{proxy.host}/cli/app:v1"
    assert {"phase", "layers_total", "layers_done", "bytes_total", "bytes_done", "rate_bytes_s"} <= set(states[-1])
    idle = await asyncio.to_thread(call, socket, PROGRESS_PATH, request, api_pb2.GetResourceResponse)
    assert idle.Resource == b""  # nothing in flight any more


def test_progress_line() -> None:
    line = progress_line(
        {
            "phase": "pulling layers",
            "layers_done": 1,
            "layers_total": 3,
            "bytes_done": 3 * 1024 * 1024,
            "bytes_total": 10 * 1024 * 1024,
            "rate_bytes_s": 1536 * 1024,
            "elapsed_s": 2.2,
        }
    )
    assert line == "pulling layers: layers 1/3, 3.0 MiB of 10.0 MiB, 1.5 MiB/s, 2 s"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_line_on_a_tty(
    agent: tuple[str, FlakyProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    socket, proxy = agent
    proxy.faults = {"/blobs/": ["delay"] * 3}
    terminal = FakeTty()
    monkeypatch.setattr("sys.stderr", terminal)
    code = await asyncio.to_thread(
        cli.main, ["pull", "--socket", socket, f"{proxy.host}/cli/app:v1", str(tmp_path / "t")]
    )
    assert code == 0
    drawn = terminal.getvalue()
    assert "\r\x1b[2K" in drawn  # the line is redrawn in place
    assert re.search(r"(resolving|checking policy|pulling layers|mounting): layers \d/1, ", drawn), drawn
    assert drawn.endswith("\r\x1b[2K")  # and cleared at the end
