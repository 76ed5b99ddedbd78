#!/usr/bin/env bash
# Pack the Debian-kernel guest's initramfs: busybox, ./init, the static
# devmig-native and the modules directory from build.sh.
#
#   pack.sh CLI MODULES_DIR     prints the path of the cached initramfs
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${DEVMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devmig}
cli=$1 mods=$2
if ! busybox=$(dpkg -L busybox-static 2>/dev/null | grep -m1 '/bin/busybox$'); then
  echo "[debian-initramfs] busybox-static missing (apt-get install busybox-static)" >&2
  exit 3
fi
key=$(cat "$busybox" "$here/init" "$cli" "$mods"/* | sha256sum | cut -c1-16)
out="$cache/debian-initramfs/$key/initramfs.cpio.gz"
if [ -f "$out" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$(dirname "$out")"
stage=$(mktemp -d)
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -rf "$stage" "$tmp"' EXIT
mkdir -p "$stage/bin" "$stage/dev" "$stage/proc" "$stage/sys" "$stage/tmp" "$stage/modules"
cp "$busybox" "$stage/bin/busybox"
cp "$here/init" "$stage/init"
cp "$cli" "$stage/devmig-native"
cp "$mods"/* "$stage/modules/"
chmod 755 "$stage/init" "$stage/devmig-native"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -6 >"$tmp")
chmod 644 "$tmp"
mv "$tmp" "$out"
ls -1dt "$cache/debian-initramfs"/*/ | tail -n +9 | xargs -r rm -rf
echo "$out"
