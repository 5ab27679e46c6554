"""`cvm-agent pull IMAGE BUNDLE_DIR`: PullImage through the running agent, with progress on a TTY. Orchestrator.

The pull is one unary `api.ImagePullService/PullImage` call; while it runs, the command polls the agent's
`cvm_agent.ImagePull/Progress` method (gRPC socket only) and redraws one status line on stderr when stderr is a
terminal: phase, layers done, bytes and rate. The manifest digest is printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["PROGRESS_PATH", "add_parser", "run"]

PROGRESS_PATH = "/cvm_agent.ImagePull/Progress"
PULL_PATH = "/api.ImagePullService/PullImage"


def add_parser(sub: Any, epilog: str) -> None:
    p = sub.add_parser("pull", help="pull and mount an image through the agent (guest image pull)", epilog=epilog)
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="agent socket (default $CVM_AGENT_SOCKET or /run/confidential-containers/cvm-agent/agent.sock)",
    )
    p.add_argument(
        "--timeout", type=float, default=1260.0, metavar="SECONDS", help="give up after (default %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line, even on a terminal")
    p.add_argument("image", metavar="IMAGE", help="image reference, e.g. busybox or quay.io/org/app@sha256:…")
    p.add_argument("bundle", metavar="BUNDLE_DIR", help="bundle directory; the rootfs is mounted at BUNDLE_DIR/rootfs")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


def progress_line(state: dict[str, Any]) -> str:
    """One status line from the agent's progress JSON."""
    return (
        f"{state.get('phase', '?')}: layers {state.get('layers_done', 0)}/{state.get('layers_total', 0)}, "
        f"{_size(state.get('bytes_done', 0))} of {_size(state.get('bytes_total', 0))}, "
        f"{_size(state.get('rate_bytes_s', 0))}/s, {state.get('elapsed_s', 0):.0f} s"
    )


def run(args: argparse.Namespace, socket: str) -> int:
    """Returns an exit code; client errors propagate to the CLI's common handler."""
    from agent.api._gen import api_pb2
    from agent.client import CallFailed, call

    bundle = Path(args.bundle).absolute()
    bundle.mkdir(parents=True, exist_ok=True)
    request = api_pb2.ImagePullRequest(image_url=args.image, bundle_path=str(bundle))
    outcome: dict[str, Any] = {}

    def pull() -> None:
        try:
            outcome["reply"] = call(socket, PULL_PATH, request, api_pb2.ImagePullResponse, timeout_s=args.timeout)
        except Exception as exc:  # handed to the main thread, which re-raises it
            outcome["error"] = exc

    worker = threading.Thread(target=pull, daemon=True)
    worker.start()
    show = sys.stderr.isatty() and not args.no_progress
    while worker.is_alive():
        worker.join(0.5)
        if show and worker.is_alive():
            try:
                reply = call(
                    socket,
                    PROGRESS_PATH,
                    api_pb2.GetResourceRequest(ResourcePath=str(bundle)),
                    api_pb2.GetResourceResponse,
                    timeout_s=5,
                )
                state = json.loads(reply.Resource) if reply.Resource else {"phase": "waiting"}
                sys.stderr.write("\r\x1b[2K" + progress_line(state))
                sys.stderr.flush()
            except (CallFailed, ValueError):
                show = False
    if show:
        sys.stderr.write("\r\x1b[2K")
    if "error" in outcome:
        raise outcome["error"]
    sys.stdout.write(outcome["reply"].manifest_digest + "\n")
    return 0
