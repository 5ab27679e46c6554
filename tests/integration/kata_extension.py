"""What kata-agent does with a mounted extension image: read its components.toml, build the launch plan, launch.

Follows kata-containers `src/agent/src/guest_extension_image.rs` and `main.rs` (guest-api.md §3.0): manifest order is
launch order; processes with level 0 or above the configured level are skipped; `${var}` tokens are substituted from
kata's context (an unknown one is an error); a `select` picks a variant (empty selects "default"); `optional_args`
apply when their `when` variable is non-empty; `config` becomes a trailing `-c <path>` only when that file exists;
the environment is kata's own plus the process's `env`; a stale socket is removed before the spawn and kata then
checks once a second, up to `timeout_secs`, that the socket path exists (0: no wait).

Processes run chrooted into `root`, the test's stand-in for the guest root file system.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

EXTENSIONS_ROOT = "/run/kata-extensions"
MANIFEST = "etc/kata-extensions/components.toml"
KATA_PATH = "/bin:/sbin/:/usr/bin/:/usr/sbin/"  # kata-agent as init sets this PATH for itself and its children
LEVELS = {"none": 0, "attestation-agent": 1, "confidential-data-hub": 2, "api-server-rest": 3}


def kata_context(*, extension: str, initdata: bool, rest_features: str, launch_timeout: int = 6) -> dict[str, str]:
    """The substitution variables kata-agent publishes (main.rs build_substitution_ctx)."""
    root = f"{EXTENSIONS_ROOT}/{extension}"
    return {
        "aa_attestation_uri": "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock",
        "aa_attestation_socket": "/run/confidential-containers/attestation-agent/attestation-agent.sock",
        "aa_config_path": "/run/confidential-containers/initdata/aa.toml",
        "cdh_config_path": "/run/confidential-containers/initdata/cdh.toml",
        "cdh_socket": "/run/confidential-containers/cdh.sock",
        "ocicrypt_config_path": "",  # filled from the manifest's [paths] by plan()
        "rest_api_features": rest_features,
        "launch_process_timeout": str(launch_timeout),
        "initdata_toml_path": "/run/confidential-containers/initdata/initdata.toml" if initdata else "",
        "extension_root": root,
        "attester_variant": "default",
    }


def substitute(template: str, ctx: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in ctx:
            msg = f"unknown substitution variable {name!r}"
            raise ValueError(msg)
        return ctx[name]

    if "${" in re.sub(r"\$\{([^}]*)\}", "", template):
        msg = f"unterminated '${{' in {template!r}"
        raise ValueError(msg)
    return re.sub(r"\$\{([^}]*)\}", one, template)


def resolve_rel(root: str, rel: str, what: str) -> str:
    rel = rel.strip()
    if not rel or ".." in PurePosixPath(rel).parts:
        msg = f"invalid path {rel!r} for {what}"
        raise ValueError(msg)
    return f"{root}/{rel.lstrip('/')}"


@dataclass(frozen=True)
class LaunchSpec:
    id: str
    path: str
    args: list[str]
    config: str | None
    env: list[tuple[str, str]]
    wait_socket: str | None
    timeout_secs: int


def read_manifest(mount: Path) -> dict[str, object]:
    manifest = tomllib.loads((mount / MANIFEST).read_text())
    if manifest.get("schema_version") != 1:
        msg = f"schema_version is {manifest.get('schema_version')!r}, expected 1"
        raise ValueError(msg)
    return manifest


def plan(mount: Path, extension: str, max_level: int, ctx: dict[str, str]) -> list[LaunchSpec]:
    """The launch plan from the manifest of the extension mounted (on the host) at `mount`."""
    manifest = read_manifest(mount)
    root = f"{EXTENSIONS_ROOT}/{extension}"
    paths = manifest.get("paths", {})
    assert isinstance(paths, dict)
    ctx = {**ctx, "ocicrypt_config_path": resolve_rel(root, paths["ocicrypt-config"], "ocicrypt-config")}
    specs = []
    processes = manifest.get("process", [])
    assert isinstance(processes, list)
    for raw in processes:
        level = raw.get("level", 0)
        if level == 0 or level > max_level:
            continue
        variant = None
        if raw.get("variants"):
            selector = substitute(raw.get("select", ""), ctx) or "default"
            variant = raw["variants"].get(selector)
            if variant is None:
                msg = f"process {raw['id']!r} has no variant {selector!r}"
                raise ValueError(msg)
        template = (variant or {}).get("path") or raw.get("path")
        if not template:
            msg = f"process {raw['id']!r} declares neither 'path' nor a variant path"
            raise ValueError(msg)
        args = [substitute(a, ctx) for a in raw.get("args", [])]
        for group in raw.get("optional_args", []):
            if ctx.get(group["when"]):
                args += [substitute(a, ctx) for a in group["args"]]
        args += [substitute(a, ctx) for a in (variant or {}).get("args", [])]
        env = {k: substitute(v, ctx) for k, v in raw.get("env", {}).items()}
        env.update({k: substitute(v, ctx) for k, v in (variant or {}).get("env", {}).items()})
        config = substitute(raw["config"], ctx) if "config" in raw else ""
        wait = substitute(raw["wait_socket"], ctx) if "wait_socket" in raw else ""
        timeout = substitute(raw["timeout_secs"], ctx) if "timeout_secs" in raw else ""
        specs.append(
            LaunchSpec(
                id=raw["id"],
                path=resolve_rel(root, substitute(template, ctx), f"process {raw['id']!r}"),
                args=args,
                config=config or None,
                env=sorted(env.items()),
                wait_socket=wait or None,
                timeout_secs=int(timeout) if timeout else 0,
            )
        )
    return specs


@dataclass
class Launched:
    spec: LaunchSpec
    argv: list[str]
    process: subprocess.Popen[bytes]
    socket_after_s: float | None
    log: Path


@dataclass
class ChrootLauncher:
    """kata-agent's launch_process, with the guest root at `root` (processes run under chroot)."""

    root: Path
    logs: Path
    launched: list[Launched] = field(default_factory=list)

    def host(self, guest_path: str) -> Path:
        return self.root / guest_path.lstrip("/")

    def launch(self, spec: LaunchSpec) -> Launched:
        if not self.host(spec.path).exists():
            msg = f"path {spec.path} does not exist."
            raise FileNotFoundError(msg)
        args = list(spec.args)
        if spec.config is not None and self.host(spec.config).exists():
            args += ["-c", spec.config]
        if spec.wait_socket:
            with contextlib.suppress(FileNotFoundError):
                self.host(spec.wait_socket).unlink()
        log = self.logs / f"{spec.id}.log"
        env = {"PATH": KATA_PATH, **dict(spec.env)}
        started = time.monotonic()
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["chroot", str(self.root), spec.path, *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        after: float | None = None
        if spec.wait_socket and spec.timeout_secs > 0:
            # kata polls once a second for up to timeout_secs (+1 for its first sleep); polling finer measures the
            # real start-up and accepts exactly what kata accepts or less.
            deadline = started + spec.timeout_secs + 1
            while time.monotonic() < deadline and process.poll() is None:
                if self.host(spec.wait_socket).exists():
                    after = time.monotonic() - started
                    break
                time.sleep(0.01)
        launched = Launched(spec, ["chroot", str(self.root), spec.path, *args], process, after, log)
        self.launched.append(launched)
        if spec.wait_socket and spec.timeout_secs > 0 and after is None:
            msg = f"wait for {spec.wait_socket} to exist timeout.\n{log.read_text(errors='replace')}"
            raise TimeoutError(msg)
        return launched

    def stop_all(self) -> list[int]:
        for launched in reversed(self.launched):
            if launched.process.poll() is None:
                launched.process.send_signal(signal.SIGTERM)
        codes = []
        for launched in self.launched:
            try:
                codes.append(launched.process.wait(timeout=10))
            except subprocess.TimeoutExpired:
                launched.process.kill()
                codes.append(launched.process.wait())
        return codes


def snapshot(root: Path, skip: tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of everything under root except the `skip` top-level entries."""
    out: dict[str, tuple[int, int, int]] = {}
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        if rel == Path():
            dirs[:] = [d for d in dirs if d not in skip]
        for name in [*dirs, *files]:
            info = (Path(folder) / name).lstat()
            out[str(rel / name)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return out
