#!/usr/bin/env bash
# Installs the host packages the test suite needs (gcc for the ioctl shim, FUSE for the configfs-tsm emulation,
# Debian's docker-registry (the CNCF distribution registry) for the image-pull tests).
# Idempotent; does nothing when everything is present. Runs as root in CI and on developer machines here.
set -euo pipefail
need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
# tests/fakes/tsmfs.py (mfusepy) loads libfuse3 with ctypes; fusermount3 unmounts a mount whose server died.
ldconfig -p 2>/dev/null | grep 'libfuse3\.so\.3 ' >/dev/null || need+=(libfuse3-3)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
# The image-pull tests start their own registry on loopback; the package's systemd unit is not used.
[ -x /usr/bin/docker-registry ] || need+=(docker-registry)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: missing ${need[*]}; install them (needs root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The guest-image and boot tests (gated in tests/conftest.py) need the image tools, debootstrap and systemd-nspawn;
# install them only where those tests will run: in CI, or where their cache exists.
cache=${CVM_AGENT_TEST_CACHE:-/var/cache/cvm-agent-tests}
if [ "${CI:-}" = true ] || [ -d "$cache/guest-image" ] || [ -d "$cache/bookworm-minbase" ]; then
  bash "$(dirname "$0")/../rootfs/setup-build-host.sh" --boot
fi
