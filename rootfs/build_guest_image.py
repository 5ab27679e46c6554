#!/usr/bin/env python3
"""Build cvm-agent's Kata guest extension image (the `coco` extension): `make guest-image OUT=DIR`.

    rootfs/build_guest_image.py --out DIR [--cache DIR] [--stage DIR]
    rootfs/build_guest_image.py --update-lock        # re-pin guest-debs.txt and guest-requirements.txt

Writes into DIR, in the layout of kata's image builder (`image_builder.sh`) and extension mount
(`kata-extension-mount.sh`):

- `cvm-agent-coco.img`: msdos partition table; partition 1 the EROFS file system (lz4hc), partition 2 its
  dm-verity hash tree (`veritysetup format --no-superblock p1 p2`);
- `root_hash_cvm-agent-coco.txt`: `root_hash=…,salt=…,data_blocks=…,data_block_size=…,hash_block_size=…`, the
  value of `kata.extension.coco.verity_params=` / the hypervisor config's `verity_params`;
- `cvm-agent-coco.erofs`, `cvm-agent-coco.verity`, `cvm-agent-coco.roothash`: partition 1, partition 2 and the root
  hash as plain files;
- `cvm-agent-coco.manifest.json`: every component with version and sha256, plus the artifacts' sha256.

The image is meant to be mounted at /run/kata-extensions/coco. It holds a CPython 3.11 runtime from Debian packages
with its own glibc and dynamic loader (the interpreter's PT_INTERP and DT_RPATH point into the mount, so it runs on a
guest with another libc or none), the guest package and its dependencies as unchecked-hash .pyc, the four console
scripts in usr/local/bin, etc/kata-extensions/components.toml, etc/ocicrypt_config.json and a pause bundle.

Inputs are pinned (guest-debs.txt, guest-requirements.txt, the repository's files) and downloads are cached, so the
same inputs and SOURCE_DATE_EPOCH (default: the commit time of HEAD) give the same bytes and root hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXT_ROOT = "/run/kata-extensions/coco"
NAME = "cvm-agent-coco"
ARCH_TRIPLET = "x86_64-linux-gnu"
LIB_DIRS = (f"lib/{ARCH_TRIPLET}", f"usr/lib/{ARCH_TRIPLET}")
LOADER = f"lib/{ARCH_TRIPLET}/ld-linux-x86-64.so.2"
PYTHON = "usr/bin/python3.11"
STDLIB = "usr/lib/python3.11"
SITE = "usr/lib/python3/dist-packages"
PY_TAG = "cpython-311"
WHEEL_PLATFORMS = (
    "manylinux_2_36_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
# What a guest never uses: no terminal UI, no databases, no test suites, no build tools, no docs.
STDLIB_DROP = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "distutils",
    "sqlite3",
    "dbm",
    "curses",
    "unittest",
    "venv",
    "__phello__",
    "config-3.11-x86_64-linux-gnu",
)
# Extension modules whose libraries (ncurses, readline, sqlite, Berkeley DB, NIS, libcrypt) are not shipped, and the
# East Asian codecs.
DYNLOAD_DROP = (
    "_codecs_cn",
    "_codecs_hk",
    "_codecs_iso2022",
    "_codecs_jp",
    "_codecs_kr",
    "_codecs_tw",
    "_curses",
    "_curses_panel",
    "readline",
    "_sqlite3",
    "_dbm",
    "_gdbm",
    "nis",
    "_crypt",
    "_tkinter",
)
# Files a wheel installs that the guest never reads.
SITE_DROP_NAMES = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")
SITE_DROP_SUFFIXES = (".pyi", ".pxd", ".pyx", ".c", ".h.in")


class BuildError(Exception):
    """The build cannot continue; the message says why and what to do."""


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    version: str
    sha256: str
    source: str

    def as_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "source": self.source,
        }


def log(message: str) -> None:
    print(f"[guest-image] {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=900
    )
    if result.returncode != 0:
        msg = f"{' '.join(str(a) for a in argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        raise BuildError(msg)
    return result.stdout


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def need_tools(names: Iterable[str]) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        msg = f"missing build tools: {' '.join(missing)}; run rootfs/setup-build-host.sh (as root)"
        raise BuildError(msg)


# ---------------------------------------------------------------------------------------------------------- inputs


def read_deb_lock() -> list[tuple[str, str, str]]:
    entries = []
    for raw in (HERE / "guest-debs.txt").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        spec, digest = line.split()
        name, version = spec.split("=", 1)
        entries.append((name, version, digest))
    return entries


def fetch_debs(cache: Path) -> list[tuple[Path, Component]]:
    folder = cache / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, version, digest in read_deb_lock():
        path = folder / f"{name}_{version.replace(':', '%3a')}_amd64.deb"
        if not path.exists() or sha256_file(path) != digest:
            log(f"apt-get download {name}={version}")
            try:
                run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{name}={version}"], cwd=folder)
            except BuildError as exc:
                msg = (
                    f"{name}={version} cannot be downloaded through apt ({exc}); run `apt-get update`, or re-pin "
                    "rootfs/guest-debs.txt with rootfs/build_guest_image.py --update-lock"
                )
                raise BuildError(msg) from None
        got = sha256_file(path)
        if got != digest:
            msg = f"{path.name} sha256 is {got}, expected {digest} (rootfs/guest-debs.txt)"
            raise BuildError(msg)
        out.append((path, Component("deb", name, version, digest, "Debian bookworm (apt)")))
    return out


def pip_platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    args += ["--abi", "abi3", "--abi", "none"]
    for platform in WHEEL_PLATFORMS:
        args += ["--platform", platform]
    return args


def fetch_wheels(cache: Path, python: str) -> list[tuple[Path, Component]]:
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    lock = HERE / "guest-requirements.txt"
    base = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
    base += ["--require-hashes", "-r", str(lock), "-d", str(folder), *pip_platform_args()]
    try:
        run([*base, "--no-index", "--find-links", str(folder)])
    except BuildError:
        log("pip download (PyPI) for rootfs/guest-requirements.txt")
        run(base)
    pins: dict[str, tuple[str, str]] = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if match:
            pins[canonical(match.group(1))] = (match.group(2), match.group(3))
    out = []
    for path in sorted(folder.glob("*.whl")):
        name, version = path.name.split("-")[:2]
        pin = pins.get(canonical(name))
        if pin is None or pin[0] != version:
            continue
        digest = sha256_file(path)
        if digest != pin[1]:
            continue
        out.append((path, Component("wheel", canonical(name), version, digest, "PyPI")))
    if len(out) != len(pins):
        found = {c.name for _, c in out}
        msg = f"wheels missing from {folder}: {sorted(set(pins) - found)}"
        raise BuildError(msg)
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def update_lock(python: str) -> None:
    """Re-pin the Debian packages (apt's candidates) and the wheels (newest satisfying pyproject)."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        names = [name for name, _, _ in read_deb_lock()]
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *names], cwd=folder)
        lines = [line for line in (HERE / "guest-debs.txt").read_text().splitlines() if line.startswith("#")]
        for deb in sorted(folder.glob("*.deb")):
            package = run(["dpkg-deb", "-f", deb, "Package"]).strip()
            version = run(["dpkg-deb", "-f", deb, "Version"]).strip()
            lines.append(f"{package}={version} {sha256_file(deb)}")
        (HERE / "guest-debs.txt").write_text("\n".join(lines) + "\n")
        wheels = folder / "wheels"
        deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        run([python, "-m", "pip", "download", "--quiet", "-d", wheels, *pip_platform_args(), *deps])
        lines = [line for line in (HERE / "guest-requirements.txt").read_text().splitlines() if line.startswith("#")]
        for wheel in sorted(wheels.glob("*.whl")):
            name, version = wheel.name.split("-")[:2]
            lines.append(f"{canonical(name)}=={version} --hash=sha256:{sha256_file(wheel)}")
        (HERE / "guest-requirements.txt").write_text("\n".join(lines) + "\n")
    log("re-pinned rootfs/guest-debs.txt and rootfs/guest-requirements.txt")


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value:
        return int(value)
    try:
        return int(run(["git", "-C", REPO, "log", "-1", "--format=%ct"]).strip())
    except (BuildError, ValueError, OSError):
        msg = "SOURCE_DATE_EPOCH is unset and the repository has no git history to take it from"
        raise BuildError(msg) from None


def agent_files() -> list[str]:
    """The guest package's files as tracked by git (or found on disk in a source tree without .git)."""
    try:
        listed = run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--", "agent"]).split("\0")
        names = sorted(n for n in listed if n and (REPO / n).is_file())
    except (BuildError, OSError):
        names = sorted(str(p.relative_to(REPO)) for p in (REPO / "agent").rglob("*") if p.is_file())
    keep = []
    for name in names:
        if "__pycache__" in name or name.endswith((".pyc", ".pyi")):
            continue
        keep.append(name)
    return keep


# ----------------------------------------------------------------------------------------------------- assembly


def is_elf(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"\x7fELF"


def elf_dynamic(path: Path) -> tuple[list[str], list[str]]:
    """NEEDED entries and the RPATH/RUNPATH directories of an ELF object."""
    out = run(["readelf", "-dW", path])
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    paths: list[str] = []
    for value in re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library (?:rpath|runpath): \[([^\]]*)\]", out):
        paths.extend(p for p in value.split(":") if p)
    return needed, paths


def copy_resolved(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source.resolve(), target)


def resolve_libraries(stage: Path, debroot: Path) -> list[str]:
    """Copy every shared library the ELF objects in `stage` need from the extracted packages; return what was added."""
    added: list[str] = []
    done: set[Path] = set()
    while True:
        pending = sorted(p for p in stage.rglob("*") if p not in done and is_elf(p))
        if not pending:
            return added
        for obj in pending:
            done.add(obj)
            needed, rpaths = elf_dynamic(obj)
            own = [Path(r.replace("$ORIGIN", str(obj.parent))) for r in rpaths if "$ORIGIN" in r]
            for soname in needed:
                if any((d / soname).exists() for d in own) or any((stage / d / soname).exists() for d in LIB_DIRS):
                    continue
                for folder in LIB_DIRS:
                    candidate = debroot / folder / soname
                    if candidate.exists():
                        copy_resolved(candidate, stage / folder / soname)
                        added.append(f"{folder}/{soname}")
                        break
                else:
                    msg = f"{obj.relative_to(stage)} needs {soname}, which no package in rootfs/guest-debs.txt ships"
                    raise BuildError(msg)


def assemble(stage: Path, debs: list[tuple[Path, Component]], wheels: list[tuple[Path, Component]], work: Path) -> None:
    debroot = work / "debroot"
    for deb, _ in debs:
        run(["dpkg-deb", "-x", deb, debroot])
    # the interpreter and its standard library
    copy_resolved(debroot / PYTHON, stage / PYTHON)
    shutil.copytree(debroot / STDLIB, stage / STDLIB, symlinks=False)
    for name in STDLIB_DROP:
        target = stage / STDLIB / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for module in (stage / STDLIB / "lib-dynload").glob("*.so"):
        if module.name.split(".")[0] in DYNLOAD_DROP:
            module.unlink()
    for site_dir in (stage / STDLIB).glob("*-packages"):
        shutil.rmtree(site_dir)
    # licences of what is redistributed
    for _, component in debs:
        copyright_file = debroot / "usr/share/doc" / component.name / "copyright"
        if copyright_file.exists():
            copy_resolved(copyright_file, stage / "usr/share/doc" / component.name / "copyright")
    # the wheels, installed for the image's interpreter
    site = stage / SITE
    site.mkdir(parents=True)
    run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--no-index",
            "--no-compile", "--target", site, *pip_platform_args(), *[w for w, _ in wheels],
        ]
    )  # fmt: skip
    shutil.rmtree(site / "bin", ignore_errors=True)
    for path in sorted(site.rglob("*")):
        if path.is_file() and (path.name in SITE_DROP_NAMES or path.name.endswith(SITE_DROP_SUFFIXES)):
            path.unlink()
        elif path.is_dir() and path.name in ("__pycache__", "tests"):
            shutil.rmtree(path)
    # the guest package
    for name in agent_files():
        copy_resolved(REPO / name, site / name)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = site / f"cvm_agent-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        f"Summary: {project['description']}\nLicense: {project['license']}\n"
    )
    # wheels ship some extension modules with their symbol tables; a guest never needs them
    for obj in sorted(site.rglob("*.so")):
        if "not stripped" in run(["file", "--brief", obj]):
            run(["strip", "--strip-unneeded", obj])
    # shared libraries and the dynamic loader
    resolve_libraries(stage, debroot)
    copy_resolved(debroot / LOADER, stage / LOADER)
    lib_path = ":".join(f"{EXT_ROOT}/{d}" for d in LIB_DIRS)
    run(
        [
            "patchelf",
            "--set-interpreter",
            f"{EXT_ROOT}/{LOADER}",
            "--force-rpath",
            "--set-rpath",
            lib_path,
            stage / PYTHON,
        ]
    )


def console_scripts(stage: Path) -> list[str]:
    scripts: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    folder = stage / "usr/local/bin"
    folder.mkdir(parents=True)
    for name, target in sorted(scripts.items()):
        module, func = target.split(":")
        (folder / name).write_text(
            f"#!{EXT_ROOT}/{PYTHON} -IS\n"
            f"# {name}: cvm-agent from the kata extension image mounted at {EXT_ROOT}\n"
            "import sys\n"
            f"sys.path.append({f'{EXT_ROOT}/{SITE}'!r})\n"
            f"from {module} import {func}\n"
            f"sys.exit({func}())\n"
        )
    return sorted(scripts)


def host_python_cmd(stage: Path) -> list[str]:
    """Run the image's interpreter on the build host through its own loader and libraries."""
    lib_path = ":".join(str(stage / d) for d in LIB_DIRS)
    return [str(stage / LOADER), "--library-path", lib_path, str(stage / PYTHON)]


def compile_bytecode(stage: Path) -> None:
    python = host_python_cmd(stage)
    common = ["-I", "-m", "compileall", "-q", "-f", "-j", "1", "--invalidation-mode", "unchecked-hash"]
    common += ["-s", str(stage), "-p", EXT_ROOT]
    # stdlib and dependencies: sourceless (legacy .pyc next to where the .py was), to keep the image small
    agent_dir = stage / SITE / "agent"
    run([*python, *common, "-b", "-x", re.escape(f"{agent_dir}/"), str(stage / STDLIB), str(stage / SITE)])
    for source in sorted([*(stage / STDLIB).rglob("*.py"), *(stage / SITE).rglob("*.py")]):
        if source.is_relative_to(agent_dir):
            continue
        if source.with_suffix(".pyc").exists():
            source.unlink()
    for cache in sorted((stage / STDLIB).rglob("__pycache__")):
        shutil.rmtree(cache)
    # the guest package keeps its sources for readable tracebacks; its .pyc live in __pycache__
    run([*python, *common, str(stage / SITE / "agent")])


def check_imports(stage: Path, modules: Iterable[str]) -> None:
    code = f"import sys; sys.path.append({str(stage / SITE)!r})\n" + "".join(f"import {m}\n" for m in modules)
    run([*host_python_cmd(stage), "-I", "-S", "-B", "-c", code])


def pause_bundle(stage: Path, sde: int) -> Component:
    bundle = stage / "pause_bundle"
    (bundle / "rootfs").mkdir(parents=True)
    source = HERE / "pause" / "pause.c"
    binary = bundle / "rootfs" / "pause"
    run(
        [
            "gcc", "-static", "-Os", "-s", "-Wall", "-Werror", "-Wl,--build-id=sha1",
            f"-ffile-prefix-map={HERE}=.", "-o", binary, source,
        ],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(sde), "LC_ALL": "C"},
    )  # fmt: skip
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 65535, "gid": 65535},
            "args": ["/pause"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "permitted": []},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "pause",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    (bundle / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gcc = run(["gcc", "-dumpfullversion"]).strip()
    return Component("binary", "pause", f"gcc {gcc} -static", sha256_file(binary), "rootfs/pause/pause.c")


def guest_files(stage: Path) -> None:
    (stage / "etc/kata-extensions").mkdir(parents=True)
    shutil.copyfile(HERE / "extension" / "components.toml", stage / "etc/kata-extensions/components.toml")
    shutil.copyfile(HERE / "etc" / "ocicrypt_config.json", stage / "etc/ocicrypt_config.json")
    (stage / "usr/share/doc/cvm-agent").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "README.md", stage / "usr/share/doc/cvm-agent/README.md")


def normalise(stage: Path) -> None:
    """Modes independent of the builder's umask: directories 0755, executables 0755, other files 0644."""
    for path in sorted(stage.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
            continue
        executable = is_elf(path) and not path.name.endswith(".so") and ".so." not in path.name
        executable = executable or path.parent == stage / "usr/local/bin" or path.relative_to(stage) == Path(LOADER)
        path.chmod(0o755 if executable else 0o644)
    for folder in sorted((p for p in stage.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def tree_digest(stage: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(stage.rglob("*")):
        rel = path.relative_to(stage).as_posix()
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            digest.update(f"L {rel} {path.readlink()}\n".encode())
        elif path.is_dir():
            digest.update(f"D {rel} {mode:o}\n".encode())
        else:
            digest.update(f"F {rel} {mode:o} {sha256_file(path)}\n".encode())
    return digest.hexdigest()


def tree_size(stage: Path) -> int:
    return sum(p.lstat().st_size for p in stage.rglob("*") if p.is_file() and not p.is_symlink())


def agent_component() -> Component:
    digest = hashlib.sha256()
    for name in agent_files():
        digest.update(f"{name} {sha256_file(REPO / name)}\n".encode())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    try:
        commit = run(["git", "-C", REPO, "rev-parse", "HEAD"]).strip()
        dirty = bool(run(["git", "-C", REPO, "status", "--porcelain", "--", "agent", "pyproject.toml"]).strip())
        source = f"git {commit}{' (modified)' if dirty else ''}"
    except (BuildError, OSError):
        source = "source tree"
    return Component("python", "cvm-agent", version, digest.hexdigest(), source)


# ---------------------------------------------------------------------------------------------- image and verity

MIB = 1 << 20
SECTOR = 512
# kata's builder uses `-zlz4hc -Enoinline_data`; 64 KiB physical clusters at the highest lz4hc level make the image
# about 15 % smaller (43 -> 37 MiB) for the same kernel support (EROFS big pclusters, Linux >= 5.13).
PCLUSTER = 65536


def make_erofs(stage: Path, target: Path, sde: int, fs_uuid: str) -> None:
    run(
        [
            "mkfs.erofs", "--quiet", "-zlz4hc,12", f"-C{PCLUSTER}", "-Enoinline_data", f"-T{sde}", f"-U{fs_uuid}",
            "--all-root", target, stage,
        ],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(sde)},
    )  # fmt: skip
    size = target.stat().st_size
    with target.open("r+b") as handle:  # partition 1 is whole MiBs; the hash tree covers the padding too
        handle.truncate(-(-size // MIB) * MIB)


def parse_verity(output: str) -> dict[str, str]:
    fields = {}
    for label, key in (
        ("Root hash", "root_hash"),
        ("Salt", "salt"),
        ("Data blocks", "data_blocks"),
        ("Data block size", "data_block_size"),
        ("Hash block size", "hash_block_size"),
    ):
        match = re.search(rf"^{label}:\s*(\S+)", output, re.MULTILINE)
        if match is None:
            msg = f"veritysetup output lacks {label!r}:\n{output}"
            raise BuildError(msg)
        fields[key] = match.group(1)
    return fields


def make_verity(data: Path, hashes: Path) -> dict[str, str]:
    salt = hashlib.sha256(b"cvm-agent extension salt\0" + bytes.fromhex(sha256_file(data))).hexdigest()
    hashes.unlink(missing_ok=True)
    out = run(["veritysetup", "format", "--no-superblock", f"--salt={salt}", data, hashes])
    size = hashes.stat().st_size
    with hashes.open("r+b") as handle:
        handle.truncate(-(-size // MIB) * MIB)
    hashes.chmod(0o644)  # veritysetup creates it 0600; it holds nothing secret
    return parse_verity(out)


def make_disk(image: Path, data: Path, hashes: Path, label_id: str) -> None:
    p1, p2 = data.stat().st_size // SECTOR, hashes.stat().st_size // SECTOR
    start = MIB // SECTOR
    image.unlink(missing_ok=True)
    with image.open("wb") as handle:
        handle.truncate(MIB + data.stat().st_size + hashes.stat().st_size)
    layout = (
        f"label: dos\nlabel-id: 0x{label_id}\nunit: sectors\n\n"
        f"start={start}, size={p1}, type=83, bootable\nstart={start + p1}, size={p2}, type=83\n"
    )
    result = subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)],
        input=layout,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        msg = f"sfdisk failed: {result.stderr}"
        raise BuildError(msg)
    with image.open("r+b") as out:
        for offset, part in ((start * SECTOR, data), ((start + p1) * SECTOR, hashes)):
            out.seek(offset)
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)


# ------------------------------------------------------------------------------------------------------------ main


def build(out: Path, cache: Path, stage_arg: Path | None) -> dict[str, object]:
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=False).returncode != 0:
        msg = f"{sys.executable} has no pip (needed to fetch the wheels); install python3-pip or use another python3"
        raise BuildError(msg)
    need_tools(["apt-get", "dpkg-deb", "readelf", "patchelf", "gcc", "mkfs.erofs", "fsck.erofs", "veritysetup"])
    need_tools(["sfdisk", "strip", "file"])
    started = time.monotonic()
    sde = source_date_epoch()
    debs = fetch_debs(cache)
    wheels = fetch_wheels(cache, sys.executable)
    log(f"inputs ready ({time.monotonic() - started:.1f} s): {len(debs)} Debian packages, {len(wheels)} wheels")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cvm-guest-image-") as scratch:
        work = Path(scratch)
        stage = stage_arg if stage_arg is not None else work / "stage"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        assemble(stage, debs, wheels, work)
        scripts = console_scripts(stage)
        guest_files(stage)
        pause = pause_bundle(stage, sde)
        entry_modules = sorted(
            {
                t.split(":")[0]
                for t in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"].values()
            }
        )
        check_imports(stage, entry_modules)
        compile_bytecode(stage)
        check_imports(stage, entry_modules)
        components = sorted(
            [*(c for _, c in debs), *(c for _, c in wheels), agent_component(), pause],
            key=lambda c: (c.kind, c.name),
        )
        inner = {
            "name": NAME,
            "extension_root": EXT_ROOT,
            "source_date_epoch": sde,
            "components": [c.as_json() for c in components],
            "console_scripts": scripts,
        }
        (stage / "usr/share/cvm-agent").mkdir(parents=True, exist_ok=True)
        (stage / "usr/share/cvm-agent/manifest.json").write_text(json.dumps(inner, indent=2, sort_keys=True) + "\n")
        normalise(stage)
        digest = tree_digest(stage)
        size = tree_size(stage)
        log(f"tree assembled: {size / MIB:.1f} MiB in {time.monotonic() - started:.1f} s")
        fs_uuid = str(uuid.UUID(digest[:32]))
        erofs = out / f"{NAME}.erofs"
        verity = out / f"{NAME}.verity"
        make_erofs(stage, erofs, sde, fs_uuid)
        run(["fsck.erofs", erofs])
        params = make_verity(erofs, verity)
        run(
            ["veritysetup", "verify", "--no-superblock", f"--salt={params['salt']}", erofs, verity, params["root_hash"]]
        )
        kernel_params = ",".join(
            f"{k}={params[k]}" for k in ("root_hash", "salt", "data_blocks", "data_block_size", "hash_block_size")
        )
        (out / f"root_hash_{NAME}.txt").write_text(kernel_params + "\n")
        (out / f"{NAME}.roothash").write_text(params["root_hash"] + "\n")
        image = out / f"{NAME}.img"
        make_disk(image, erofs, verity, params["root_hash"][:8])
        artifacts = {p.name: sha256_file(p) for p in (image, erofs, verity)}
        outer = {
            **inner,
            "tree_sha256": digest,
            "tree_bytes": size,
            "verity_params": kernel_params,
            "artifacts": artifacts,
            "sizes": {p.name: p.stat().st_size for p in (image, erofs, verity)},
        }
        (out / f"{NAME}.manifest.json").write_text(json.dumps(outer, indent=2, sort_keys=True) + "\n")
    log(f"built {image} ({image.stat().st_size / MIB:.1f} MiB) in {time.monotonic() - started:.1f} s")
    log(f"verity: {kernel_params}")
    return outer


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cvm-agent" / "guest-image"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument(
        "--cache", type=Path, default=None, help="download cache (default ~/.cache/cvm-agent/guest-image)"
    )
    parser.add_argument("--stage", type=Path, help="keep the assembled tree here (for inspection)")
    parser.add_argument("--update-lock", action="store_true", help="re-pin guest-debs.txt and guest-requirements.txt")
    args = parser.parse_args(argv)
    try:
        if args.update_lock:
            update_lock(sys.executable)
            return 0
        if args.out is None:
            parser.error("--out DIR is required")
        cache = args.cache or Path(os.environ.get("CVM_AGENT_IMAGE_CACHE") or default_cache())
        build(args.out.resolve(), cache.resolve(), args.stage.resolve() if args.stage else None)
    except BuildError as exc:
        log(f"ERROR: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
