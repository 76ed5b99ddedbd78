#!/usr/bin/env bash
# Build the small test kernel for the real-kernel tests, once per config.
#
# Debian's linux-source-6.12, `make tinyconfig` plus the options below, all
# built in: a serial console, an initramfs, VFIO with group + type1 container
# and cdev + iommufd, the iommufd selftest mock domain, and the mtty sample
# (samples/vfio-mdev/mtty.c), the kernel's own migratable device that needs
# no hardware; and memfd (the simulated device's data fd, compared with
# mtty in the guest). tinyconfig silently drops an option whose parent is off, so
# every requested option is checked in the final .config.
#
# The result is cached as ${DEVMIG_CACHE:-~/.cache/devmig}/kernel/<key>/bzImage,
# where <key> hashes the source package version and the option list; a warm
# call only prints that path. Progress goes to stderr, the path to stdout.
#
# Installs (apt, only what is missing): linux-source-6.12 and the kernel's
# build dependencies. Set DEVMIG_NO_INSTALL=1 to fail instead of installing.
set -euo pipefail

cache=${DEVMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devmig}
jobs=${DEVMIG_KERNEL_JOBS:-2}
log() { printf '[build-kernel] %s\n' "$*" >&2; }

# Options turned on over tinyconfig (CONFIG_ prefix left off), all =y.
opts=(
  64BIT PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE
  BLK_DEV_INITRD RD_GZIP DEVTMPFS PROC_FS PROC_SYSCTL SYSFS
  BINFMT_ELF BINFMT_SCRIPT MULTIUSER FUTEX POSIX_TIMERS KERNEL_GZIP NET UNIX
  VFIO VFIO_GROUP VFIO_CONTAINER VFIO_IOMMU_TYPE1 VFIO_DEVICE_CDEV VFIO_MDEV
  IOMMU_SUPPORT IOMMUFD IOMMUFD_DRIVER
  DEBUG_KERNEL FAULT_INJECTION RUNTIME_TESTING_MENU IOMMUFD_TEST
  SAMPLES SAMPLE_VFIO_MDEV_MTTY
  SHMEM TMPFS MEMFD_CREATE
  # IRQ eventfds (VFIO_DEVICE_SET_IRQS) and the simulated device's
  # re-evaluate hint
  EVENTFD
  # The two-node test (tests/twonode) runs Python and the agent in the
  # guest: SMP needs ACPI under SeaBIOS; the userland needs epoll, signalfd,
  # timerfd, inotify, AIO and friends; the root filesystem is an erofs image
  # on virtio-blk (erofs sits under MISC_FILESYSTEMS); the guests talk over
  # virtio-net. One kernel serves both tests, so one cold build.
  SMP ACPI HIGH_RES_TIMERS PCI PCI_MSI UNIX98_PTYS RD_ZSTD EPOLL SIGNALFD
  TIMERFD INOTIFY_USER FHANDLE AIO ADVISE_SYSCALLS MEMBARRIER RSEQ
  FILE_LOCKING SYSVIPC POSIX_MQUEUE INET NETDEVICES VIRTIO_MENU VIRTIO_PCI
  VIRTIO_NET BLOCK VIRTIO_BLK MISC_FILESYSTEMS EROFS_FS
)
# Turned off: the other members of a choice an option above belongs to
# (tinyconfig picks KERNEL_XZ, and enabling KERNEL_GZIP alone leaves it).
off=(KERNEL_BZIP2 KERNEL_LZMA KERNEL_XZ KERNEL_LZO KERNEL_LZ4 KERNEL_ZSTD)

# 1. Packages ---------------------------------------------------------------
. "$(dirname "$0")/../lib/ensure-debs.sh"
ensure_debs linux-source-6.12 gcc make bc bison flex libelf-dev libssl-dev cpio xz-utils perl

ver=$(dpkg-query -W -f='${Version}' linux-source-6.12)
tarball=/usr/src/linux-source-6.12.tar.xz
[ -f "$tarball" ] || { log "$tarball missing (reinstall linux-source-6.12)"; exit 3; }

# 2. Cache key --------------------------------------------------------------
key=$(printf '%s\n' "linux-source-6.12=$ver" "${opts[@]}" -- "${off[@]}" | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
cached() {
  if [ -f "$out/bzImage" ] && [ -f "$out/config" ]; then
    log "cached: $out/bzImage (linux-source-6.12 $ver)"
    echo "$out/bzImage"
    exit 0
  fi
}
cached
# One build at a time on this machine (test runs may start together); a
# waiter finds the finished kernel in the cache.
mkdir -p "$cache/kernel"
exec 9>"$cache/kernel/.lock"
if ! flock -n 9; then
  log "another build is running; waiting for it"
  flock 9
fi
cached

# 3. Source, unpacked once per package version -------------------------------
src_root="$cache/kernel/src-$ver"
src="$src_root/linux-source-6.12"
if [ ! -f "$src_root/.unpacked" ]; then
  log "unpacking $tarball ($ver) into $src_root"
  rm -rf "$src_root"
  mkdir -p "$src_root"
  tar -C "$src_root" -xJf "$tarball"
  touch "$src_root/.unpacked"
fi

# 4. Configure and build out of tree -----------------------------------------
t0=$(date +%s)
build="$cache/kernel/build-$key"
rm -rf "$build"
trap 'rm -rf "$build" "$out.tmp"' EXIT
mkdir -p "$build"
log "configuring in $build: tinyconfig + ${#opts[@]} options"
make -s -C "$src" O="$build" tinyconfig >&2
args=()
for o in "${opts[@]}"; do args+=(--enable "$o"); done
for o in "${off[@]}"; do args+=(--disable "$o"); done
"$src/scripts/config" --file "$build/.config" "${args[@]}"
make -s -C "$src" O="$build" olddefconfig >&2

dropped=()
for o in "${opts[@]}"; do
  grep -qx "CONFIG_$o=y" "$build/.config" || dropped+=("$o")
done
if [ ${#dropped[@]} -gt 0 ]; then
  log "options dropped by Kconfig (a parent is off): ${dropped[*]}"
  exit 4
fi
log "all ${#opts[@]} options present in .config; building bzImage with -j$jobs"
make -s -C "$src" O="$build" -j"$jobs" bzImage >&2

mkdir -p "$out.tmp"
cp "$build/arch/x86/boot/bzImage" "$out.tmp/bzImage"
cp "$build/.config" "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
log "built $out/bzImage in $(($(date +%s) - t0)) s"
echo "$out/bzImage"
