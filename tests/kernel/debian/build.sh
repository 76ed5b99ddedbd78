#!/usr/bin/env bash
# Debian's own 6.12 kernel for the real-kernel test: the unsigned image
# (linux-image-<abi>-unsigned, unpacked, never installed), its modules
# vfio, vfio_iommu_type1, mdev, irqbypass, vfio-pci-core and vfio-pci, and
# mtty.ko built out of tree from
# linux-source-6.12's samples/vfio-mdev/mtty.c against the matching
# linux-headers. The ABI follows the installed linux-source-6.12
# (6.12.117-1~deb12u1 -> 6.12.117+deb12-amd64), so source, headers and
# image always match.
#
#   build.sh   prints two lines: the kernel image, and a directory with the
#              modules to load (decompressed) in load order, listed in
#              load-order.txt
#
# Cached under ${DEVMIG_CACHE:-~/.cache/devmig}/debian-kernel/<abi>/. Exit 3
# when packages are missing and DEVMIG_NO_INSTALL=1 forbids installing.
set -euo pipefail

cache=${DEVMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devmig}
log() { printf '[debian-kernel] %s\n' "$*" >&2; }

srcver=$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null || true)
if [ -z "$srcver" ]; then
  log "linux-source-6.12 missing (apt-get install linux-source-6.12)"
  exit 3
fi
upstream=${srcver%%-*}          # 6.12.117
abi="$upstream+deb12-amd64"     # Debian's kernel ABI name for it
# The layout version: bump it when the module set changes, so a cache
# built for an older set is rebuilt.
layout=2
out="$cache/debian-kernel/$abi-v$layout"
if [ -f "$out/done" ]; then
  echo "$out/vmlinuz"
  echo "$out/modules"
  exit 0
fi

headers="linux-headers-$abi"
. "$(dirname "$0")/../../lib/ensure-debs.sh"
ensure_debs "$headers" xz-utils

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/deb" "$work/root" "$work/mtty" "$work/out/modules"
# apt-get download drops to the _apt user: let it write there.
chmod 755 "$work"
chmod 777 "$work/deb"

# The image, unpacked only: nothing lands in /boot or /lib/modules.
log "downloading linux-image-$abi-unsigned"
(cd "$work/deb" && apt-get download -q "linux-image-$abi-unsigned" >&2)
dpkg-deb -x "$work"/deb/*.deb "$work/root"
cp "$work/root/boot/vmlinuz-$abi" "$work/out/vmlinuz"
moddir="$work/root/lib/modules/$abi/kernel"

# mtty, out of tree, from the source package of the same version.
tarball=/usr/src/linux-source-6.12.tar.xz
log "building mtty.ko against $headers"
tar -xJf "$tarball" -C "$work/mtty" --strip-components=3 linux-source-6.12/samples/vfio-mdev/mtty.c
echo 'obj-m := mtty.o' >"$work/mtty/Makefile"
make -s -C "/usr/src/$headers" M="$work/mtty" modules >&2
cp "$work/mtty/mtty.ko" "$work/out/modules/"

# The VFIO modules, in load order (each after what it uses): vfio, the
# type1 IOMMU backend and mdev for mtty; irqbypass, vfio-pci-core and
# vfio-pci for a PCI function bound to vfio-pci.
order=()
for m in drivers/vfio/vfio drivers/vfio/vfio_iommu_type1 drivers/vfio/mdev/mdev \
  virt/lib/irqbypass drivers/vfio/pci/vfio-pci-core drivers/vfio/pci/vfio-pci; do
  f=$(ls "$moddir/$m".ko* 2>/dev/null | head -1)
  [ -n "$f" ] || { log "no $m in linux-image-$abi-unsigned"; exit 1; }
  case $f in
    *.xz) xz -dc "$f" >"$work/out/modules/$(basename "$m").ko" ;;
    *.zst) zstd -dcq "$f" >"$work/out/modules/$(basename "$m").ko" ;;
    *) cp "$f" "$work/out/modules/$(basename "$m").ko" ;;
  esac
  order+=("$(basename "$m").ko")
done
order+=(mtty.ko)
printf '%s\n' "${order[@]}" >"$work/out/modules/load-order.txt"

rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$work/out" "$out"
# Older layouts of this ABI are dead weight now.
find "$cache/debian-kernel" -mindepth 1 -maxdepth 1 -name "$abi*" ! -name "$abi-v$layout" -exec rm -rf {} +
touch "$out/done"
log "ready: $out"
echo "$out/vmlinuz"
echo "$out/modules"
