"""`make guest-image`: the Kata extension image, checked as kata builds, mounts and launches it.

The image is loop-mounted (kernel EROFS; dm-verity through `veritysetup open` where device-mapper exists, otherwise
the hash tree is verified in user space and the data partition mounted directly), a busybox-only root (no Python,
no libc) gets it at /run/kata-extensions/coco, and the three processes of its components.toml are started in that
root as kata-agent does. Then the guest's calls: GetResource and UnWrapKey over ttRPC, /info and /cdh/resource over
REST, against the dev KBS on loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cvm_tools.devkbs.server import DevKbsServer

from tests.integration.conftest import SECRET
from tests.integration.kata_extension import (
    LEVELS,
    ChrootLauncher,
    kata_context,
    plan,
    read_manifest,
    snapshot,
)
from tests.integration.test_kata_dropin import (
    KEK,
    OPTSDATA,
    cdh_get_resource,
    cdh_unwrap,
    write_initdata,
)
from tests.paths import GUEST_CACHE

pytestmark = [pytest.mark.integration, pytest.mark.guestimage]

REPO = Path(__file__).resolve().parents[2]
NAME = "cvm-agent-coco"
MIB = 1 << 20
REST_PORT = 8006  # api-server-rest's default; kata passes no -b


@dataclass(frozen=True)
class Image:
    out: Path
    build_s: float

    def path(self, suffix: str) -> Path:
        return self.out / f"{NAME}{suffix}"

    @property
    def params(self) -> dict[str, str]:
        line = (self.out / f"root_hash_{NAME}.txt").read_text().strip()
        return dict(item.split("=", 1) for item in line.split(","))


def build(out: Path) -> float:
    for tool in ("mkfs.erofs", "veritysetup", "sfdisk", "patchelf", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: run rootfs/setup-build-host.sh")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO / "rootfs/build_guest_image.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "CVM_AGENT_IMAGE_CACHE": str(GUEST_CACHE / "guest-image")},
    )
    assert result.returncode == 0, result.stderr
    return time.monotonic() - started


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    out = tmp_path_factory.mktemp("image")
    return Image(out, build(out))


def test_same_inputs_same_bytes(image: Image, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build(again)
    names = sorted(p.name for p in image.out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert len(names) == 6
    for name in names:
        assert (image.out / name).read_bytes() == (again / name).read_bytes(), name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partitions(img: Path) -> list[dict[str, object]]:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(img)], capture_output=True, check=True).stdout)
    assert table["partitiontable"]["label"] == "dos"
    parts: list[dict[str, object]] = table["partitiontable"]["partitions"]
    return parts


def test_kata_layout(image: Image) -> None:
    img = image.path(".img")
    parts = partitions(img)
    assert [(p["type"], p.get("bootable", False)) for p in parts] == [("83", True), ("83", False)]
    data = img.read_bytes()
    erofs, verity = image.path(".erofs").read_bytes(), image.path(".verity").read_bytes()
    p1 = data[int(parts[0]["start"]) * 512 : (int(parts[0]["start"]) + int(parts[0]["size"])) * 512]  # type: ignore[call-overload]
    p2 = data[int(parts[1]["start"]) * 512 : (int(parts[1]["start"]) + int(parts[1]["size"])) * 512]  # type: ignore[call-overload]
    assert p1 == erofs
    assert p2 == verity
    assert erofs[1024:1028] == bytes.fromhex("e2e1f5e0")  # EROFS superblock magic at 1 KiB
    line = (image.out / f"root_hash_{NAME}.txt").read_text()
    assert re.fullmatch(
        r"root_hash=[0-9a-f]{64},salt=[0-9a-f]{64},data_blocks=\d+,data_block_size=4096,hash_block_size=4096\n", line
    )
    params = image.params
    assert int(params["data_blocks"]) * 4096 == len(erofs)
    assert image.path(".roothash").read_text().strip() == params["root_hash"]
    subprocess.run(["fsck.erofs", str(image.path(".erofs"))], check=True, capture_output=True)
    verify = ["veritysetup", "verify", "--no-superblock", f"--salt={params['salt']}"]
    verify += [f"--data-blocks={params['data_blocks']}", str(image.path(".erofs")), str(image.path(".verity"))]
    subprocess.run([*verify, params["root_hash"]], check=True, capture_output=True)
    # a flipped byte in the file system fails verification
    tampered = bytearray(erofs)
    tampered[len(erofs) // 2] ^= 1
    bad = image.out.parent / "tampered.erofs"
    bad.write_bytes(bytes(tampered))
    result = subprocess.run(
        [*verify[:-2], str(bad), str(image.path(".verity")), params["root_hash"]], capture_output=True, check=False
    )
    assert result.returncode != 0
    bad.unlink()
    assert img.stat().st_size <= 40 * MIB, f"image is {img.stat().st_size / MIB:.1f} MiB"


def test_manifest_lists_every_component(image: Image) -> None:
    outer = json.loads(image.path(".manifest.json").read_text())
    components = {(c["kind"], c["name"]): c for c in outer["components"]}
    for line in (REPO / "rootfs/guest-debs.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            spec, digest = line.split()
            name, version = spec.split("=", 1)
            assert components[("deb", name)]["version"] == version
            assert components[("deb", name)]["sha256"] == digest
    for line in (REPO / "rootfs/guest-requirements.txt").read_text().splitlines():
        match = re.match(r"^(\S+)==(\S+) --hash=sha256:(\w+)", line)
        if match:
            assert components[("wheel", match.group(1))]["version"] == match.group(2)
            assert components[("wheel", match.group(1))]["sha256"] == match.group(3)
    assert (
        components[("python", "cvm-agent")]["version"]
        == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    )
    assert components[("binary", "pause")]["sha256"]
    for name, digest in outer["artifacts"].items():
        assert sha256(image.out / name) == digest
    assert outer["verity_params"] == (image.out / f"root_hash_{NAME}.txt").read_text().strip()


# -------------------------------------------------------------------------------------- mounted as kata mounts it


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout.strip()


@dataclass
class Mounted:
    root: Path  # the busybox guest root
    mount: Path  # root/run/kata-extensions/coco
    verity: str  # how the hash tree was checked


@pytest.fixture
def mounted(image: Image) -> Iterator[Mounted]:
    if os.geteuid() != 0:
        pytest.skip("loop-mounting the image needs root")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices (/dev/loop-control is missing)")
    if "erofs" not in Path("/proc/filesystems").read_text():
        subprocess.run(["modprobe", "erofs"], capture_output=True, check=False)
        if "erofs" not in Path("/proc/filesystems").read_text():
            pytest.skip("the kernel has no EROFS support")
    busybox = shutil.which("busybox")
    if busybox is None or "statically linked" not in run("file", "-L", busybox):
        pytest.skip("busybox-static is missing: run rootfs/setup-build-host.sh")
    params = image.params
    img = image.path(".img")
    parts = partitions(img)
    loops: list[str] = []
    mapped: str | None = None
    with tempfile.TemporaryDirectory(prefix="cvm-", dir="/tmp") as folder:
        root = Path(folder) / "root"
        mount = root / "run/kata-extensions/coco"
        try:
            # the disk's two partitions as block devices, as kata-extension-mount.sh uses <dev>1 and <dev>2
            for part in parts:
                loops.append(
                    run(
                        "losetup", "--find", "--show", "--read-only",
                        f"--offset={int(part['start']) * 512}",  # type: ignore[call-overload]
                        f"--sizelimit={int(part['size']) * 512}",  # type: ignore[call-overload]
                        str(img),
                    )
                )  # fmt: skip
            data_dev, hash_dev = loops
            verity_args = ["--no-superblock", f"--salt={params['salt']}", f"--data-blocks={params['data_blocks']}"]
            verity_args += [f"--data-block-size={params['data_block_size']}"]
            verity_args += [f"--hash-block-size={params['hash_block_size']}"]
            run("veritysetup", "verify", *verity_args, data_dev, hash_dev, params["root_hash"])
            source, how = data_dev, "veritysetup verify (user space); no device-mapper"
            name = f"cvm-test-{os.getpid()}"
            if Path("/dev/mapper/control").exists():
                opened = subprocess.run(
                    ["veritysetup", "open", *verity_args, data_dev, name, hash_dev, params["root_hash"]],
                    capture_output=True,
                    check=False,
                )
                if opened.returncode == 0:
                    mapped, source, how = name, f"/dev/mapper/{name}", "veritysetup open (dm-verity)"
            for sub in ("bin", "tmp", "etc", "run/kata-extensions/coco"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(busybox, root / "bin/busybox")
            (root / "bin/sh").symlink_to("busybox")
            run("mount", "-t", "erofs", "-o", "ro", source, str(mount))
            try:
                yield Mounted(root, mount, how)
            finally:
                subprocess.run(["umount", str(mount)], check=False)
        finally:
            if mapped is not None:
                subprocess.run(["veritysetup", "close", mapped], check=False)
            for loop in loops:
                subprocess.run(["losetup", "-d", loop], check=False)


def test_components_toml_is_kata_schema(mounted: Mounted) -> None:
    manifest = read_manifest(mounted.mount)
    assert manifest["paths"] == {"ocicrypt-config": "etc/ocicrypt_config.json", "pause-bundle": "pause_bundle"}
    processes = manifest["process"]
    assert isinstance(processes, list)
    assert [(p["id"], p["level"]) for p in processes] == [
        ("attestation-agent", 1),
        ("confidential-data-hub", 2),
        ("api-server-rest", 3),
    ]
    assert (mounted.mount / "etc/kata-extensions/components.toml").read_bytes() == (
        REPO / "rootfs/extension/components.toml"
    ).read_bytes()
    assert json.loads((mounted.mount / "etc/ocicrypt_config.json").read_text()) == {
        "key-providers": {"attestation-agent": {"ttrpc": "unix:///run/confidential-containers/cdh.sock"}}
    }
    bundle = mounted.mount / "pause_bundle"
    config = json.loads((bundle / "config.json").read_text())
    assert config["root"]["path"] == "rootfs"
    assert config["process"]["args"] == ["/pause"]
    assert "statically linked" in run("file", str(bundle / "rootfs/pause"))
    # what the guest never needs is not there: no dev KBS, no owner tools, no pip, no test suites
    site = mounted.mount / "usr/lib/python3/dist-packages"
    assert not (site / "agent/devkbs").exists()
    assert not (site / "cvm_tools").exists()
    assert not list(site.glob("pip*"))
    assert not (mounted.mount / "usr/lib/python3.11/test").exists()
    inner = json.loads((mounted.mount / "usr/share/cvm-agent/manifest.json").read_text())
    assert {c["name"] for c in inner["components"]} >= {"python3.11-minimal", "libc6", "grpcio", "cvm-agent", "pause"}


def test_pause_binary_runs_in_an_empty_root(mounted: Mounted) -> None:
    empty = mounted.root / "tmp/pause-root"
    empty.mkdir()
    shutil.copy(mounted.mount / "pause_bundle/rootfs/pause", empty / "pause")
    process = subprocess.Popen(["chroot", str(empty), "/pause"])
    try:
        time.sleep(0.2)
        assert process.poll() is None
        process.terminate()
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
        shutil.rmtree(empty)


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_port(port: int, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return time.monotonic() - started
        time.sleep(0.01)
    return None


def http(path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{REST_PORT}{path}", timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def test_kata_launches_the_extension_in_a_busybox_root(
    image: Image, mounted: Mounted, dev_kbs: DevKbsServer, resources: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not port_free(REST_PORT):
        pytest.skip(f"127.0.0.1:{REST_PORT} (api-server-rest's fixed default, kata passes no -b) is in use")
    (resources / "default" / "image-kek").mkdir(parents=True)
    (resources / "default" / "image-kek" / "layer").write_bytes(KEK)
    root = mounted.root
    # what kata-agent writes from the initdata device before launching the components
    run_dir = root / "run/confidential-containers"
    write_initdata(
        run_dir / "initdata",
        dev_kbs.url,
        Path("/run/confidential-containers/cdh.sock"),
        Path("/run/confidential-containers/attestation-agent/attestation-agent.sock"),
    )
    assert shutil.which("chroot") is not None
    assert not (root / "usr").exists()  # no Python,
    assert not (root / "lib").exists()  # no libc, no loader
    before = snapshot(root, skip=("run", "tmp"))
    ctx = kata_context(extension="coco", initdata=True, rest_features="all")
    specs = plan(mounted.mount, "coco", LEVELS["api-server-rest"], ctx)
    assert [s.id for s in specs] == ["attestation-agent", "confidential-data-hub", "api-server-rest"]
    assert specs[0].args == [
        "--attestation_sock",
        "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock",
        "--initdata-toml",
        "/run/confidential-containers/initdata/initdata.toml",
    ]
    assert specs[1].env == [("OCICRYPT_KEYPROVIDER_CONFIG", "/run/kata-extensions/coco/etc/ocicrypt_config.json")]
    assert specs[2].args == ["--features", "all"]
    assert specs[2].timeout_secs == 0
    logs = root.parent / "logs"
    logs.mkdir()
    launcher = ChrootLauncher(root, logs)
    startup: dict[str, float | None] = {}
    try:
        for spec in specs:
            launched = launcher.launch(spec)
            startup[spec.id] = launched.socket_after_s
        assert launcher.launched[0].argv[-2:] == ["-c", "/run/confidential-containers/initdata/aa.toml"]
        assert launcher.launched[1].argv[-2:] == ["-c", "/run/confidential-containers/initdata/cdh.toml"]
        startup["api-server-rest"] = wait_port(REST_PORT, timeout=30)
        assert startup["api-server-rest"] is not None, (logs / "api-server-rest.log").read_text()
        cdh_socket = run_dir / "cdh.sock"
        assert await cdh_unwrap(cdh_socket, "kbs:///default/image-kek/layer") == OPTSDATA  # image-rs's call
        assert await cdh_get_resource(cdh_socket, "kbs:///default/key/1") == SECRET
        assert http("/cdh/resource/default/key/1") == (200, SECRET)
        status, info = http("/info")
        assert status == 200
        assert json.loads(info)["tee"] == "sample"
        assert json.loads(info)["feature"] == "all"
    finally:
        codes = launcher.stop_all()
        logs_text = {p.name: p.read_text(errors="replace") for p in logs.iterdir()}
    assert codes == [0, 0, 0], logs_text
    # nothing was written outside /run and /tmp (the extension itself is read-only EROFS)
    assert snapshot(root, skip=("run", "tmp")) == before
    written = {str(p.relative_to(root)) for p in (root / "run").rglob("*") if not p.is_relative_to(mounted.mount)}
    written = {w for w in written if not w.startswith("run/confidential-containers/initdata")}  # the test's own
    assert written <= {
        "run/kata-extensions",
        "run/confidential-containers",
        "run/confidential-containers/attestation-agent",
    }
    with capsys.disabled():
        print(f"\n[guest-image] build {image.build_s:.0f} s; verity: {mounted.verity}")
        for name, seconds in startup.items():
            shown = f"{seconds:.2f} s" if seconds is not None else "n/a"
            print(f"[guest-image] {name}: exec -> socket {shown} (from the mounted image, busybox-only root)")


def test_install_sh_with_the_images_self_contained_interpreter(image: Image, tmp_path: Path) -> None:
    """install.sh into a root whose only Python is the extension image's (its own libc and loader), not Debian's."""
    if os.geteuid() != 0:
        pytest.skip("install.sh needs root (chroot)")
    busybox = shutil.which("busybox")
    if busybox is None or "statically linked" not in run("file", "-L", busybox):
        pytest.skip("busybox-static is missing: run rootfs/setup-build-host.sh")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    bundle = root / "run/kata-extensions/coco"
    bundle.parent.mkdir(parents=True)
    run("fsck.erofs", f"--extract={bundle}", str(image.path(".erofs")))
    python = "/run/kata-extensions/coco/usr/bin/python3.11"
    result = subprocess.run(
        ["bash", str(REPO / "rootfs/install.sh"), "--python", python, str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    site = bundle / "usr/local/lib/python3.11/dist-packages"
    assert (site / "agent/__init__.py").exists()
    for name in ("attestation-agent", "confidential-data-hub", "api-server-rest", "cvm-agent"):
        assert (root / "usr/local/bin" / name).read_text().splitlines()[0] == f"#!{python} -I"
    assert "usage: attestation-agent" in run("chroot", str(root), "/usr/local/bin/attestation-agent", "--help")
    # the TEE key's crypto is the image's own libssl3, reached through its _hashlib (docs/decisions.md, 22)
    probe = "from agent import libcrypto; from agent.kbs import jwe; jwe.self_test(); print(libcrypto.load() is None)"
    assert run("chroot", str(root), python, "-I", "-c", probe).strip() == "False"
