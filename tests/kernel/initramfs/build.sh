#!/usr/bin/env bash
# Pack the test guest's initramfs: busybox (static, from Debian's
# busybox-static), ./init and the given programs at the root.
#
#   build.sh PROGRAM...     prints the path of the cached initramfs.cpio.gz
#
# Cached under ${DEVMIG_CACHE:-~/.cache/devmig}/kernel-initramfs/<hash>/,
# keyed by busybox, init and the programs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${DEVMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devmig}
busybox=/bin/busybox

if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  if [ "${DEVMIG_NO_INSTALL:-0}" = 1 ]; then
    echo "[initramfs] busybox-static missing (apt-get install busybox-static)" >&2
    exit 3
  fi
  echo "[initramfs] installing busybox-static" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends busybox-static cpio >&2
fi
busybox=$(dpkg -L busybox-static | grep -m1 '/bin/busybox$')

key=$(cat "$busybox" "$here/init" "$@" | sha256sum | cut -c1-16)
out="$cache/kernel-initramfs/$key/initramfs.cpio.gz"
if [ -f "$out" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$(dirname "$out")"
stage=$(mktemp -d)
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -rf "$stage" "$tmp"' EXIT
mkdir -p "$stage/bin" "$stage/dev" "$stage/proc" "$stage/sys" "$stage/tmp"
cp "$busybox" "$stage/bin/busybox"
cp "$here/init" "$stage/init"
chmod 755 "$stage/init"
for p in "$@"; do cp "$p" "$stage/$(basename "$p")"; chmod 755 "$stage/$(basename "$p")"; done
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -6 >"$tmp")
chmod 644 "$tmp"
mv "$tmp" "$out"
# Each change to the sources makes a new entry: keep the 8 newest.
ls -1dt "$cache/kernel-initramfs"/*/ | tail -n +9 | xargs -r rm -rf
echo "[initramfs] packed $out ($(du -k "$out" | cut -f1) KiB)" >&2
echo "$out"
