#!/usr/bin/env bash
# Installs the host packages the test suite needs (gcc for the ioctl shim, FUSE for the configfs-tsm emulation).
# Idempotent; does nothing when everything is present. Runs as root in CI and on developer machines here.
set -euo pipefail
need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: missing ${need[*]}; install them (needs root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
