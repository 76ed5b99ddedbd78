#!/usr/bin/env bash
# Build devmig-native as ONE statically linked binary (no shared library,
# not even libc's loader), from the CLI and the native core's C sources:
# copy it onto a node or into a minimal guest and it runs. Cached under
# ${DEVMIG_CACHE:-~/.cache/devmig}/cli/<hash of the sources>/; prints the
# binary's path on stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
native=$(cd "$here/.." && pwd)
cache=${DEVMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devmig}
CC=${CC:-gcc}

# The same sources as libdevmig: the list in agent-native/meson.build.
mapfile -t srcs < <(sed -n '/^libdevmig_sources = files(/,/)/p' "$native/meson.build" | grep -o "'src/[^']*\.c'" | tr -d "'")
[ ${#srcs[@]} -gt 0 ] || { echo "[build-cli] no libdevmig_sources in $native/meson.build" >&2; exit 1; }
files=("$here/devmig-native.c")
for s in "${srcs[@]}"; do files+=("$native/$s"); done
flags=(-static -pthread -O2 -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Werror -I"$native/include" -I"$native/src")

key=$( { "$CC" --version | head -1; printf '%s\n' "${flags[@]}"; cat "${files[@]}" $(find "$native/src" "$native/include" -name "*.h" | LC_ALL=C sort); } | sha256sum | cut -c1-16)
out="$cache/cli/$key/devmig-native"
if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$(dirname "$out")"
printf '[build-cli] compiling %s\n' "$out" >&2
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
"$CC" "${flags[@]}" -o "$tmp" "${files[@]}"
chmod 755 "$tmp"
mv "$tmp" "$out"
ls -1dt "$cache/cli"/*/ | tail -n +9 | xargs -r rm -rf
echo "$out"
