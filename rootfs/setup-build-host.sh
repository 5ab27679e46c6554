#!/usr/bin/env bash
# Installs the Debian/Ubuntu host packages `make guest-image` and the guest-image tests need. Idempotent: does
# nothing when everything is present. Needs root only when something is missing.
#
#   rootfs/setup-build-host.sh            # image build: erofs-utils, cryptsetup-bin, fdisk, gcc, patchelf, ...
#   rootfs/setup-build-host.sh --boot     # also debootstrap and systemd-nspawn for the boot test
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have mkfs.erofs || need+=(erofs-utils)
have veritysetup || need+=(cryptsetup-bin)
have sfdisk || need+=(fdisk)
have gcc || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
have patchelf || need+=(patchelf)
have readelf || need+=(binutils)
have file || need+=(file)
have dpkg-deb || need+=(dpkg)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)  # pip download fetches the pinned wheels
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
if [ "${1:-}" = "--boot" ]; then
  have debootstrap || need+=(debootstrap)
  have systemd-nspawn || need+=(systemd-container)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-build-host: missing ${need[*]}; install them (needs root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
