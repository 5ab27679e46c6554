"""`make demo`: the development KBS and the agent in mock-TEE mode, on temporary sockets, doing the main job.

Starts `cvm-agent dev-kbs` with a demo secret and `cvm-agent serve --tee sample`, then uses the client commands
exactly as a user would: the TEE type, decoded evidence, and the secret fetched through attestation. Stops both.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_SECRET = b"demo secret: released only after attestation"


def cvm_agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def run(*args: str) -> bytes:
    result = subprocess.run(cvm_agent(*args), capture_output=True, timeout=60, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stderr.decode())
        msg = f"`cvm-agent {' '.join(args)}` exited {result.returncode}"
        raise SystemExit(msg)
    return result.stdout


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def stop(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print(f"    {name} stopped (exit {process.returncode})")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="cvm-agent-demo-") as tmp:
        root = Path(tmp)
        secret_dir = root / "resources" / "default" / "demo"
        secret_dir.mkdir(parents=True)
        (secret_dir / "secret").write_bytes(DEMO_SECRET)
        agent_socket = str(root / "run" / "agent.sock")

        step("starting the development KBS (loopback, random port)")
        kbs = subprocess.Popen(
            cvm_agent("dev-kbs", "--resources", str(root / "resources"), "--port", "0"),
            stdout=subprocess.PIPE,
            stderr=(root / "kbs.log").open("wb"),
        )
        agent: subprocess.Popen[bytes] | None = None
        try:
            assert kbs.stdout is not None
            banner = kbs.stdout.readline().decode().strip()
            if not banner.startswith("dev-kbs listening on "):
                msg = f"dev KBS did not start: {banner!r}"
                raise SystemExit(msg)
            kbs_url = banner.rsplit(" ", 1)[1]
            print(f"    {banner}")

            step("starting the agent in mock-TEE mode (--tee sample)")
            notify_path = str(root / "notify")
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(notify_path)
            notify.settimeout(30)
            agent = subprocess.Popen(
                cvm_agent("serve", "--tee", "sample", "--kbs-url", kbs_url, "--socket", agent_socket),
                stderr=(root / "agent.log").open("wb"),
                env={**os.environ, "NOTIFY_SOCKET": notify_path},
            )
            started = time.monotonic()
            if notify.recv(64) != b"READY=1":
                msg = "agent did not signal readiness"
                raise SystemExit(msg)
            print(f"    agent ready on {agent_socket} after {time.monotonic() - started:.2f} s")
            for line in (root / "agent.log").read_text().splitlines():
                if "insecure" in line:
                    print(f"    log: {json.loads(line)['event']}: {json.loads(line).get('warning', '')}")

            step("cvm-agent tee")
            print("    " + run("tee", "--socket", agent_socket).decode().strip())

            step("cvm-agent evidence --runtime-data <base64 of 'hello from the demo'>")
            runtime = base64.b64encode(b"hello from the demo").decode()
            evidence = json.loads(run("evidence", "--socket", agent_socket, "--runtime-data", runtime))
            print(f"    evidence: {json.dumps(evidence)}")
            print(f"    decoded report_data: {base64.b64decode(evidence['report_data'])!r}")

            step("cvm-agent resource kbs:///default/demo/secret  (auth -> attest -> JWE resource)")
            secret = run("resource", "kbs:///default/demo/secret", "--socket", agent_socket)
            print(f"    fetched secret: {secret.decode()!r}")
            if secret != DEMO_SECRET:
                msg = "the fetched secret does not match the one the KBS holds"
                raise SystemExit(msg)
            kbs_log = (root / "kbs.log").read_text()
            print(f"    KBS requests: {kbs_log.count('devkbs.request')} (auth, attest, resource)")
        finally:
            step("stopping")
            if agent is not None:
                stop(agent, "agent")
            stop(kbs, "dev KBS")
        if Path(agent_socket).exists():
            msg = "the agent left its socket behind"
            raise SystemExit(msg)
    print("\ndemo OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
