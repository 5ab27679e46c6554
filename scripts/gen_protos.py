"""Generate agent/api/_gen from protos/ with grpcio-tools and mypy-protobuf.

Each `_pb2.py` protoc writes is then rewritten to build its classes with `agent.api.protobuild` instead of
protobuf's `builder` (same descriptors and classes, without protobuf's Python descriptor machinery: see that
module); everything else is protoc's output as it is.

`--check` regenerates into a temporary folder and fails when the committed code differs (stale or hand-edited).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = Path("agent/api/_gen")
HEADER = '"""Generated from protos/ by scripts/gen_protos.py. Do not edit."""\n'


def generate(out_root: Path) -> Path:
    out = out_root / PACKAGE
    out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    protos = sorted(PROTOS.glob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PACKAGE.as_posix()}={PROTOS}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p) for p in protos],
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    (out / "__init__.py").write_text(HEADER)
    for module in sorted(out.glob("*_pb2.py")):
        module.write_text(light_module(module.read_text(), module.name))
    return out


def light_module(text: str, name: str) -> str:
    """protoc's `_pb2.py` with its descriptor-pool and builder calls replaced by one `agent.api.protobuild.build`."""
    head, sep, _ = text.partition('"""Generated protocol buffer code."""\n')
    check = re.search(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n.*?^\)\n", text, re.S | re.M)
    data = re.search(r"^DESCRIPTOR = _descriptor_pool\.Default\(\)\.AddSerializedFile\((b'.*')\)$", text, re.M)
    module = re.search(r"^_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, '([\w.]+)', _globals\)$", text, re.M)
    if not sep or check is None or data is None or module is None or "_builder.BuildServices" in text:
        msg = f"{name}: protoc's output no longer has the shape scripts/gen_protos.py rewrites"
        raise SystemExit(msg)
    return (
        f"{head}{sep}"
        "# Classes built by agent.api.protobuild, not google.protobuf.internal.builder (scripts/gen_protos.py)\n"
        "from google.protobuf import runtime_version as _runtime_version\n\n"
        "from agent.api.protobuild import build as _build\n\n"
        f"{check.group(0)}\n"
        f"DESCRIPTOR = _build({data.group(1)}, {module.group(1)!r}, globals())\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if agent/api/_gen is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = ROOT / PACKAGE
        names = sorted(p.name for p in fresh.iterdir() if p.is_file())
        if args.check:
            have = sorted(p.name for p in committed.iterdir() if p.is_file()) if committed.is_dir() else []
            stale = [n for n in names if n not in have or not filecmp.cmp(fresh / n, committed / n, shallow=False)]
            extra = [n for n in have if n not in names]
            if stale or extra:
                print(f"generated protobuf code is stale: {stale + extra}; run `make gen`", file=sys.stderr)
                return 1
            print(f"generated protobuf code is up to date ({len(names)} files)")
            return 0
        if committed.exists():
            shutil.rmtree(committed)
        shutil.copytree(fresh, committed)
        print(f"wrote {len(names)} files to {PACKAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
