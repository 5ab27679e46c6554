#!/usr/bin/env bash
# Install cvm-agent into a guest root file system (Debian/Ubuntu guests, or any root with its own CPython >= 3.11),
# so that it replaces the reference guest components and/or runs under systemd.
#
#   rootfs/install.sh [--python PATH] [--enable UNIT[,UNIT...]] ROOTFS_DIR
#
#   --python PATH   the interpreter *inside the guest* that will run the agent (default /usr/bin/python3); a
#                   self-contained interpreter shipped in the root works the same way (e.g. /opt/python/bin/python3).
#   --enable UNITS  also enable these units in the root (attestation-agent, confidential-data-hub, api-server-rest,
#                   cvm-agent); kata-agent launches the drop-ins itself, so nothing is enabled by default.
#
# The guest's interpreter is asked (in a chroot, so this needs root and the guest's architecture) where its
# site-packages are: Debian and Ubuntu answer /usr/local/lib/python3.X/dist-packages (the posix_local scheme).
# Wheels are chosen for that interpreter's version and glibc; the console scripts go to /usr/local/bin (where
# kata-agent looks) with a shebang naming the guest's versioned interpreter; the units go to
# /usr/local/lib/systemd/system and the README they name to /usr/share/doc/cvm-agent. Every entry point is then
# imported and run (--help) inside the root; any failure exits non-zero.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
guest_python=/usr/bin/python3
enable=""
usage() { echo "usage: rootfs/install.sh [--python PATH] [--enable UNIT[,UNIT...]] ROOTFS_DIR" >&2; exit 2; }
fail() { echo "install.sh: ERROR: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python) guest_python=${2:?}; shift 2 ;;
    --enable) enable=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
root=$(cd "$1" 2>/dev/null && pwd) || fail "ROOTFS_DIR $1 is not a directory"
[ "$(id -u)" -eq 0 ] || fail "needs root: the guest's interpreter is run inside $root with chroot"
case "$guest_python" in /*) ;; *) fail "--python must be an absolute path inside the guest, got $guest_python" ;; esac
host_python=${HOST_PYTHON:-python3}
"$host_python" -m pip --version >/dev/null 2>&1 || fail "the host needs $host_python with pip to fetch wheels"

in_guest() { chroot "$root" "$@"; }
[ -x "$root$guest_python" ] || [ -L "$root$guest_python" ] || fail "$guest_python does not exist in $root"

# 1. What the guest interpreter is: its real path, version, glibc, architecture and where it imports packages from.
probe='
import os, platform, sys, sysconfig
purelib = sysconfig.get_path("purelib")
libc, libc_version = platform.libc_ver()
print(os.path.realpath(sys.executable))
print("%d.%d" % sys.version_info[:2])
print(libc or "-", libc_version or "-")
print(platform.machine())
print(purelib)
print("yes" if purelib in sys.path else "no")
'
ask() {
  facts=$(in_guest "$guest_python" -I -c "$probe") || fail "$guest_python does not run inside $root"
  { read -r py_real; read -r py_version; read -r libc libc_version; read -r machine; read -r purelib; read -r on_path; } <<<"$facts"
}
ask
if [ "$on_path" = no ] && [ -n "$purelib" ] && [ ! -e "$root$purelib" ]; then
  # site.py only lists package directories that exist (Debian's /usr/local/lib/python3.X/dist-packages, a bundled
  # interpreter's site-packages): create it and ask again.
  install -d -m 0755 "$root$purelib"
  ask
fi
case "$py_version" in 3.1[1-9]|3.[2-9][0-9]) ;; *) fail "the guest's Python is $py_version, expected >= 3.11" ;; esac
[ "$libc" = glibc ] || fail "the guest's C library is $libc, expected glibc (musl guests are not supported)"
[ "$on_path" = yes ] || fail "$purelib (sysconfig purelib of $py_real) is not on that interpreter's sys.path"
echo "install.sh: guest interpreter $py_real (Python $py_version, glibc $libc_version, $machine); packages -> $purelib"

# 2. Wheels for that interpreter: the package built from this repository, its dependencies from PyPI.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$host_python" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$scratch/wheel" "$repo" \
  || fail "building the cvm-agent wheel failed"
tag=${py_version/./}
platforms=()  # newest first: pip prefers the platform tags in the order given
for minor in $(seq "${libc_version#2.}" -1 17); do platforms+=(--platform "manylinux_2_${minor}_$machine"); done
platforms+=(--platform "manylinux2014_$machine")
"$host_python" -m pip install --quiet --disable-pip-version-check --no-compile --target "$scratch/site" \
  --only-binary=:all: --python-version "$py_version" --implementation cp --abi "cp$tag" --abi abi3 --abi none \
  "${platforms[@]}" "$scratch"/wheel/*.whl || fail "pip could not install cvm-agent's dependencies for Python $py_version"
rm -rf "$scratch/site/bin"
install -d -m 0755 "$root$purelib"
cp -a "$scratch/site/." "$root$purelib/"

# 3. Console scripts with the guest's interpreter, not the host's.
install -d -m 0755 "$root/usr/local/bin"
scripts=$("$host_python" - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    for name, target in sorted(tomllib.load(f)["project"]["scripts"].items()):
        print(name, target)
EOF
)
modules=()
while read -r name target; do
  module=${target%%:*}
  func=${target##*:}
  modules+=("$module")
  printf '#!%s -I\n# %s: installed by cvm-agent rootfs/install.sh\nimport sys\nfrom %s import %s\nsys.exit(%s())\n' \
    "$py_real" "$name" "$module" "$func" "$func" >"$root/usr/local/bin/$name"
  chmod 0755 "$root/usr/local/bin/$name"
done <<<"$scripts"

# 4. Bytecode (a guest root is often read-only: unchecked-hash .pyc need no source stat or rewrite), units, docs.
in_guest "$py_real" -I -m compileall -q --invalidation-mode unchecked-hash "$purelib" >/dev/null \
  || fail "compiling the installed packages with $py_real failed"
install -d -m 0755 "$root/usr/local/lib/systemd/system" "$root/usr/share/doc/cvm-agent" "$root/etc/cvm-agent"
install -m 0644 "$repo"/systemd/*.service "$root/usr/local/lib/systemd/system/"
install -m 0644 "$repo/README.md" "$root/usr/share/doc/cvm-agent/README.md"
install -m 0644 "$here/README.md" "$root/usr/share/doc/cvm-agent/rootfs.md"
[ -e "$root/etc/ocicrypt_config.json" ] || install -m 0644 "$here/etc/ocicrypt_config.json" "$root/etc/ocicrypt_config.json"
[ -e "$root/etc/cvm-agent/agent.toml" ] || install -m 0644 "$here/etc/cvm-agent/agent.toml" "$root/etc/cvm-agent/agent.toml"
if [ -n "$enable" ]; then
  for unit in ${enable//,/ }; do
    [ -e "$root/usr/local/lib/systemd/system/$unit.service" ] || fail "no unit $unit.service"
    systemctl --root="$root" enable "$unit.service" >/dev/null 2>&1 || fail "systemctl --root enable $unit failed"
  done
fi

# 5. Check what was installed, inside the root, as the guest will run it.
for module in "${modules[@]}"; do
  in_guest "$py_real" -I -c "import $module" || fail "$module does not import with $py_real inside $root"
done
while read -r name _; do
  in_guest "/usr/local/bin/$name" --help >/dev/null || fail "/usr/local/bin/$name --help fails inside $root"
done <<<"$scripts"
for unit in "$repo"/systemd/*.service; do
  doc=$(sed -n 's|^Documentation=file://||p' "$unit")
  [ -z "$doc" ] || [ -e "$root$doc" ] || fail "$(basename "$unit") names $doc, which is not installed"
done
echo "install.sh: installed cvm-agent into $root (bin: $(awk '{print $1}' <<<"$scripts" | tr '\n' ' ')) with $py_real"
du -sh "$root$purelib" | sed 's/^/install.sh: packages: /'
