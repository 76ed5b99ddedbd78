#!/usr/bin/env bash
# Build the two-node test's guest root filesystem, an uncompressed erofs
# image both QEMU guests share read-only on virtio-blk (faster to boot than
# an initramfs of the same size, and nothing is unpacked into RAM).
#
# What it holds: Debian bookworm `minbase` (debootstrap from the apt mirror
# this machine is configured with) plus python3, busybox and iproute2;
# /opt/devmig/site: the agent's third-party wheels at the versions uv.lock
# pins (`uv export`), and the project's own wheels (devmig-native, built
# here by meson with this machine's gcc, devmig-api, devmig-agent); and the
# guest's programs from tests/twonode/guest/ (its init, the VMM stand-in,
# the test's control service).
#
# Three cached layers under ${DEVMIG_CACHE:-~/.cache/devmig}/twonode/, so a
# change to the project's code only repeats the last, cheap one:
#   base-<key>/      debootstrap output, keyed by suite + package list
#   site-<key>.tar   third-party packages, keyed by the base + requirements
#   rootfs-<key>.erofs  the image, keyed by all of the above + the sources
# Progress goes to stderr; the image's path to stdout.
#
# Installs (apt, only what is missing): debootstrap, erofs-utils. Set
# DEVMIG_NO_INSTALL=1 to fail instead (exit 3, naming the packages).
set -euo pipefail

cache=${DEVMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devmig}/twonode
repo=$(cd "$(dirname "$0")/../.." && pwd)
log() { printf '[twonode-rootfs] %s\n' "$*" >&2; }
export PATH="${DEVMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devmig}/path:$PATH"

suite=bookworm
include=python3,python3-venv,busybox,iproute2,ca-certificates

# 1. Packages ---------------------------------------------------------------
. "$(dirname "$0")/../lib/ensure-debs.sh"
ensure_debs debootstrap erofs-utils
[ "$(id -u)" -eq 0 ] || { log "debootstrap needs root"; exit 3; }

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# The mirror this machine's apt uses (deb822 sources first, then the
# one-line format); no other address is ever used.
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | grep -v security | head -n1 || true)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { log "no apt mirror configured"; exit 3; }

# 2. Base --------------------------------------------------------------------
base_key=$(printf '%s\n' "$suite" "$include" v1 | sha256sum | cut -c1-16)
base="$cache/base-$base_key"
if [ ! -f "$base/.done" ]; then
  log "debootstrap $suite (minbase + $include) from $mirror"
  t0=$(date +%s)
  rm -rf "$base"
  debootstrap --variant=minbase --include="$include" "$suite" "$base" "$mirror" >&2
  # Trim what a guest that only runs the agent never reads.
  rm -rf "$base"/usr/share/{doc,man,info,locale,i18n} "$base"/var/cache/apt/* \
    "$base"/var/lib/apt/lists/* "$base"/usr/share/zoneinfo
  touch "$base/.done"
  log "base ready in $(( $(date +%s) - t0 )) s"
fi

# 3. Third-party packages ----------------------------------------------------
req=$(cd "$repo" && uv export --package devmig-agent --no-dev --no-hashes \
  --no-emit-workspace --frozen --no-header 2>/dev/null | grep -v '^ *#')
site_key=$(printf '%s\n' "$base_key" "$req" | sha256sum | cut -c1-16)
site="$cache/site-$site_key.tar"
if [ ! -f "$site" ]; then
  log "installing the agent's third-party packages (uv.lock's versions)"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  printf '%s\n' "$req" > "$tmp/requirements.txt"
  # Binary wheels for the guest's Python (bookworm's 3.11, glibc 2.36).
  uv pip install -q --no-deps --only-binary :all: --python-version 3.11 \
    --python-platform x86_64-manylinux_2_36 --target "$tmp/site" \
    -r "$tmp/requirements.txt" >&2
  tar -C "$tmp/site" -cf "$site.tmp" .
  mv "$site.tmp" "$site"
  rm -rf "$tmp"; trap - EXIT
fi

# 4. The image ---------------------------------------------------------------
src_hash=$(cd "$repo" && git ls-files -z --cached --others --exclude-standard agent-native proto node-agent tests/twonode/guest \
  | xargs -0 sha256sum | sha256sum | cut -c1-16)
key=$(printf '%s\n' "$site_key" "$src_hash" v1 | sha256sum | cut -c1-16)
img="$cache/rootfs-$key.erofs"
if [ -f "$img" ]; then
  log "cached: $img"
  echo "$img"
  exit 0
fi
t0=$(date +%s)
tmp=$(mktemp -d "$cache/build.XXXXXX"); trap 'rm -rf "$tmp"' EXIT
log "building the project's wheels"
for pkg in devmig-native devmig-api devmig-agent; do
  (cd "$repo" && uv build -q --wheel --package "$pkg" -o "$tmp/wheels") >&2
done
log "assembling the root filesystem"
cp -a "$base" "$tmp/root"
rm -f "$tmp/root/.done"
mkdir -p "$tmp/root/opt/devmig/site"
tar -C "$tmp/root/opt/devmig/site" -xf "$site"
uv pip install -q --no-deps --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
  --target "$tmp/root/opt/devmig/site" "$tmp"/wheels/*.whl >&2
cp -r "$repo/tests/twonode/guest" "$tmp/root/opt/devmig/guest"
install -m 0755 "$repo/tests/twonode/guest/init" "$tmp/root/devmig-init"
# Mount points the init fills at boot (the image itself is read-only).
mkdir -p "$tmp/root/config" "$tmp/root/run" "$tmp/root/tmp" "$tmp/root/var/lib/devmig"
find "$tmp/root" -name __pycache__ -prune -exec rm -rf {} +
mkfs.erofs --quiet "$img.tmp" "$tmp/root" >&2
mv "$img.tmp" "$img"
# Older images of this cache are superseded by this one.
find "$cache" -maxdepth 1 -name 'rootfs-*.erofs' ! -name "rootfs-$key.erofs" -delete
log "image ready in $(( $(date +%s) - t0 )) s: $img ($(du -m "$img" | cut -f1) MiB)"
echo "$img"
