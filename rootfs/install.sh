#!/usr/bin/env bash
# Install cvm-agent into a guest rootfs so that it replaces the reference guest components.
#
#   rootfs/install.sh ROOTFS_DIR [PYTHON]
#
# Installs the package and its five runtime dependencies under ROOTFS_DIR/usr/local (console scripts
# attestation-agent, confidential-data-hub, api-server-rest and cvm-agent in ROOTFS_DIR/usr/local/bin), plus
# /etc/ocicrypt_config.json and /etc/cvm-agent/agent.toml if they are not there yet. PYTHON must match the
# interpreter the guest image runs (default python3), since wheels with C extensions (grpcio, cryptography) are
# specific to it.
set -euo pipefail
root=${1:?usage: rootfs/install.sh ROOTFS_DIR [PYTHON]}
python=${2:-python3}
here=$(cd "$(dirname "$0")" && pwd)
"$python" -m pip install --quiet --ignore-installed --no-warn-script-location --root "$root" --prefix /usr/local "$here/.."
install -d -m 0755 "$root/etc/cvm-agent"
[ -e "$root/etc/ocicrypt_config.json" ] || install -m 0644 "$here/etc/ocicrypt_config.json" "$root/etc/ocicrypt_config.json"
[ -e "$root/etc/cvm-agent/agent.toml" ] || install -m 0644 "$here/etc/cvm-agent/agent.toml" "$root/etc/cvm-agent/agent.toml"
echo "installed cvm-agent into $root/usr/local (bin: attestation-agent confidential-data-hub api-server-rest cvm-agent)"
du -sh "$root/usr/local" 2>/dev/null | sed 's/^/size: /'
