"""`make demo`: the development KBS and the agent in mock-TEE mode, on temporary sockets, doing the main job.

Starts `cvm-tools dev-kbs` with a demo secret and `cvm-agent serve --tee sample`, then uses the client commands
exactly as a user would: the TEE type, decoded evidence, and the secret fetched through attestation. Stops both.

`python scripts/demo.py --emulate tdx` (or `snp`) runs the same with emulated hardware instead of the mock: a FUSE
emulation of the kernel's configfs-tsm (tests/fakes/tsmfs.py; needs /dev/fuse, libfuse 3 and mfusepy) serves real
TD quote / SNP report templates with the agent's report data spliced in, the agent finds the TEE with `--tee auto`,
and the dev KBS checks the binding inside the quote or report (it does not verify signatures).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.api._gen import keyprovider_pb2 as kp

DEMO_SECRET = b"demo secret: released only after attestation"


def cvm_agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def cvm_tools(*args: str) -> list[str]:
    """The developer and image-owner tools (a separate distribution, never installed into a guest)."""
    return [sys.executable, "-m", "cvm_tools.cli", *args]


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def image_layer_key(root: Path, kbs_url: str, agent_socket: str) -> None:
    """The image owner wraps a layer key (as skopeo's ocicrypt would ask); the agent unwraps it after attestation."""
    step("cvm-tools keyprovider: the image owner's wrap-only provider, registering KEKs with the KBS")
    port = free_port()
    owner = subprocess.Popen(
        cvm_tools(
            "keyprovider",
            "--listen",
            f"127.0.0.1:{port}",
            "--kbs-url",
            kbs_url,
            "--admin-key",
            str(root / "admin.pem"),
            "--log-level",
            "warning",
        ),
        stdout=subprocess.PIPE,
        stderr=(root / "keyprovider.log").open("wb"),
    )
    try:
        assert owner.stdout is not None
        print("    " + owner.stdout.readline().decode().strip())
        layer_options = json.dumps(
            {"symkey": base64.b64encode(os.urandom(32)).decode(), "digest": "", "cipheroptions": {"nonce": "AAAA"}}
        ).encode()
        request = json.dumps(
            {
                "op": "keywrap",
                "keywrapparams": {
                    "ec": {
                        "Parameters": {
                            "attestation-agent": [base64.b64encode(b"keyid=kbs:///default/image-kek/demo").decode()]
                        },
                        "DecryptConfig": {"Parameters": {}},
                    },
                    "optsdata": base64.b64encode(layer_options).decode(),
                },
                "keyunwrapparams": {"dc": None, "annotation": None},
            }
        ).encode()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wrap: Any = channel.unary_unary(
                "/keyprovider.KeyProviderService/WrapKey",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=kp.KeyProviderKeyWrapProtocolOutput.FromString,
            )
            reply = wrap(kp.KeyProviderKeyWrapProtocolInput(KeyProviderKeyWrapProtocolInput=request), timeout=30)
        packet = bytes(json.loads(reply.KeyProviderKeyWrapProtocolOutput)["keywrapresults"]["annotation"])
        print(f"    WrapKey (as skopeo sends it) -> annotation packet: {packet.decode()}")
        annotation = base64.b64encode(packet).decode()
        print(
            f"    layer annotation org.opencontainers.image.enc.keys.provider.attestation-agent = {annotation[:48]}..."
        )

        step("cvm-agent unwrap <annotation>  (the agent fetches the KEK through attestation and unwraps)")
        unwrapped = run("unwrap", annotation, "--socket", agent_socket).strip()
        print(f"    unwrapped layer options: {unwrapped.decode()[:60]}...")
        if unwrapped != layer_options:
            msg = "the unwrapped layer options differ from the wrapped ones"
            raise SystemExit(msg)
        print("    layer key round trip OK")
    finally:
        stop(owner, "keyprovider")


@contextlib.contextmanager
def emulated_tee(kind: str | None, root: Path) -> Iterator[list[str]]:
    """The `serve` flags for the TEE: `--tee sample`, or `--tee auto` and paths into an emulated configfs-tsm."""
    if kind is None:
        yield ["--tee", "sample"]
        return
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from tests.fakes import tsmfs

    problem = tsmfs.fuse_unavailable_reason()
    if problem is not None:
        msg = f"--emulate needs FUSE: {problem}"
        raise SystemExit(msg)
    provider: Literal["tdx_guest", "sev_guest"] = "tdx_guest" if kind == "tdx" else "sev_guest"
    absent = root / "absent"
    platform = root / "platform" / "sev-guest"
    if kind == "snp":
        platform.mkdir(parents=True)
    step(f"mounting the configfs-tsm emulation (provider {provider})")
    with tsmfs.mounted_tsm(tsmfs.TsmFsOptions(provider=provider), workdir=root) as mount:
        print(f"    {mount.root}")
        yield [
            "--tee",
            "auto",
            "--tsm-report-dir",
            str(mount.root),
            "--tdx-guest-device",
            str(absent / "tdx_guest"),
            "--sev-guest-device",
            str(absent / "sev-guest"),
            "--sev-guest-platform-dir",
            str(platform),
            "--tdx-measurements-dir",
            str(absent / "measurements"),
            "--ccel-data",
            str(absent / "CCEL"),
        ]


def show_evidence(agent_socket: str, tee_flags: list[str], emulated: bool) -> None:
    runtime = base64.b64encode(b"hello from the demo").decode()
    if not emulated:
        step("cvm-agent evidence --runtime-data <base64 of 'hello from the demo'>")
        evidence = json.loads(run("evidence", "--socket", agent_socket, "--runtime-data", runtime))
        print(f"    evidence: {json.dumps(evidence)}")
        print(f"    decoded report_data: {base64.b64decode(evidence['report_data'])!r}")
        return
    step("cvm-agent tee --probe  (detection, run here with the same paths)")
    probe_flags = [f for f in tee_flags if f not in ("--tee", "auto")]
    for line in run("tee", "--probe", *probe_flags).decode().splitlines():
        print(f"    {line}")
    step("cvm-agent evidence --decode --runtime-data <base64 of 'hello from the demo'>")
    decoded = run("evidence", "--decode", "--socket", agent_socket, "--runtime-data", runtime).decode()
    for line in decoded.splitlines()[:24]:
        print(f"    {line}")
    print("    ...")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--emulate", choices=["tdx", "snp"], help="emulated hardware instead of the mock TEE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cvm-agent-demo-") as tmp, emulated_tee(args.emulate, Path(tmp)) as tee:
        root = Path(tmp)
        secret_dir = root / "resources" / "default" / "demo"
        secret_dir.mkdir(parents=True)
        (secret_dir / "secret").write_bytes(DEMO_SECRET)
        agent_socket = str(root / "run" / "agent.sock")

        admin_key = ed25519.Ed25519PrivateKey.generate()
        (root / "admin.pem").write_bytes(
            admin_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (root / "admin.pub").write_bytes(
            admin_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

        step("starting the development KBS (loopback, random port)")
        kbs = subprocess.Popen(
            cvm_tools(
                "dev-kbs",
                "--resources",
                str(root / "resources"),
                "--port",
                "0",
                "--admin-public-key",
                str(root / "admin.pub"),
            ),
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

            mode = "mock-TEE mode (--tee sample)" if args.emulate is None else f"emulated {args.emulate} (--tee auto)"
            step(f"starting the agent in {mode}")
            notify_path = str(root / "notify")
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(notify_path)
            notify.settimeout(30)
            agent = subprocess.Popen(
                cvm_agent("serve", *tee, "--kbs-url", kbs_url, "--socket", agent_socket),
                stderr=(root / "agent.log").open("wb"),
                env={**os.environ, "NOTIFY_SOCKET": notify_path},
            )
            started = time.monotonic()
            if b"READY=1" not in notify.recv(4096).split(b"\n"):  # sd_notify: READY=1 among other fields
                msg = "agent did not signal readiness"
                raise SystemExit(msg)
            print(f"    agent ready on {agent_socket} after {time.monotonic() - started:.2f} s")
            for line in (root / "agent.log").read_text().splitlines():
                if "insecure" in line:
                    print(f"    log: {json.loads(line)['event']}: {json.loads(line).get('warning', '')}")

            step("cvm-agent tee")
            print("    " + run("tee", "--socket", agent_socket).decode().strip())

            show_evidence(agent_socket, tee, args.emulate is not None)

            step("cvm-agent resource kbs:///default/demo/secret  (auth -> attest -> JWE resource)")
            secret = run("resource", "kbs:///default/demo/secret", "--socket", agent_socket)
            print(f"    fetched secret: {secret.decode()!r}")
            if secret != DEMO_SECRET:
                msg = "the fetched secret does not match the one the KBS holds"
                raise SystemExit(msg)
            kbs_log = (root / "kbs.log").read_text()
            print(f"    KBS requests: {kbs_log.count('devkbs.request')} (auth, attest, resource)")

            image_layer_key(root, kbs_url, agent_socket)
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
