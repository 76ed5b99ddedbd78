"""What a source session tracks while the guest keeps running: which BAR
areas the VMM may map (the device's sparse-mmap capability, re-read after
every state change), and which guest pages the device's DMA dirtied.

Trap switching (the founding problem): a device may take BAR areas out of
the mappable set when it enters a migration state, typically the registers
that start DMA, so that it sees (and logs) every DMA request. A vCPU that
still reaches such an area through a mapping after the change bypasses the
device's logging, and the pages that DMA writes are lost to the memory
migration. The capability only says what the device needs in the state it
is in now, so the order is: the VMM unmaps every area (acknowledged), the
state changes, the capability is re-read, and the VMM maps back only what
is mappable now (acknowledged). ``SessionManager.start_pre_copy`` returns
after the second acknowledgement.

Dirty pages: the union of the device's DMA log
(``VFIO_DEVICE_FEATURE_DMA_LOGGING``, over the guest IOVA ranges the VMM
registered, or a simulated device's whole guest memory) and, for a
simulated device, the pages it logged through trapped DMA requests. Both
reads clear what they return, so every read is fanned out to every
consumer (each WatchDirtyPages call, the VMM's pull), each with its own
pending bitmap, and to the cumulative set a new consumer starts from.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import devmig_native

log = logging.getLogger(__name__)

# Guest pages dirty tracking counts in, bytes: the x86 page, the simulated
# device's page, and the smallest DMA-logging granularity the uAPI allows.
PAGE_SIZE = 4096

# VFIO_PCI_BAR0_REGION_INDEX .. VFIO_PCI_BAR5_REGION_INDEX: the regions a
# VMM maps into a guest.
BAR_REGIONS = range(6)
# VFIO_REGION_INFO_FLAG_MMAP: the region (or its sparse areas) may be mmapped.
REGION_INFO_FLAG_MMAP = 1 << 2


@dataclasses.dataclass(frozen=True, order=True)
class Area:
    """A part of a BAR region a VMM may mmap (offset and size in bytes)."""

    region: int
    offset: int
    size: int

    def to_wire(self) -> dict[str, int]:
        return {"region": self.region, "offset": self.offset, "size": self.size}


def mappable_areas(handle: devmig_native.Device) -> list[Area]:
    """Every BAR area the device lets a VMM map in its state now, read from
    the device (region info and its sparse-mmap capability), never cached:
    a region with a sparse capability is mappable only in its areas, one
    without is mappable whole, one without the MMAP flag not at all."""
    out: list[Area] = []
    for index in BAR_REGIONS:
        try:
            ri = handle.region_info(index)
        except (devmig_native.DevmigError, OSError):
            continue  # no such region on this device
        if not ri.size or not ri.flags & REGION_INFO_FLAG_MMAP:
            continue
        if ri.has_sparse:
            out.extend(Area(index, off, size) for off, size in ri.sparse if size)
        else:
            out.append(Area(index, 0, ri.size))
    return sorted(out)


def _npages(ranges: list[tuple[int, int]]) -> int:
    return max((iova + length + PAGE_SIZE - 1) // PAGE_SIZE for iova, length in ranges)


def _or_at(dst: bytearray, src: bytes | bytearray, first_page: int) -> None:
    """dst |= src shifted to start at page ``first_page``; bits past dst's
    end are dropped."""
    if first_page == 0 and len(src) == len(dst):
        devmig_native.bitmap_or(dst, src)  # the usual case, in C
        return
    merged = int.from_bytes(dst, "little") | (int.from_bytes(src, "little") << first_page)
    width = max(len(dst), (merged.bit_length() + 7) // 8)
    dst[:] = merged.to_bytes(width, "little")[: len(dst)]


class DirtyTracker:
    """A source device's dirty guest pages, from ``start`` until ``stop``."""

    def __init__(self, handle: devmig_native.Device, ranges: list[tuple[int, int]]) -> None:
        self.handle = handle
        self.sim = handle if isinstance(handle, devmig_native.SimDevice) else None
        if not ranges and self.sim is not None:
            ranges = [(0, self.sim.guest_size)]
        self.ranges = sorted(ranges)
        self.npages = _npages(self.ranges) if self.ranges else 0
        if self.sim is not None:
            self.npages = max(self.npages, self.sim.guest_size // PAGE_SIZE)
        self.logging = False
        # The simulated device's missed-trap count at start (see missed_traps).
        self._missed_base = 0
        self._lock = threading.Lock()
        # Whole 64-bit words, as the kernel's bitmaps and the native core's.
        nbytes = (self.npages + 63) // 64 * 8
        self.seen = bytearray(nbytes)  # every page reported since start
        self._pending: dict[object, bytearray] = {}
        self._nbytes = nbytes

    @property
    def available(self) -> bool:
        """Whether anything tracks this device's DMA at all."""
        return self.logging or self.sim is not None

    def start(self) -> None:
        """Start tracking: the simulated device's trap log and missed-trap
        count from now on, and the device's DMA logging when it has ranges
        to log. A device without the feature (ENOTTY, EOPNOTSUPP) is tracked
        by what else there is; the caller checks ``available``."""
        if self.sim is not None:
            self._missed_base = self.sim.bar_stats().missed_traps
            self.sim.dirty_take(devmig_native.DirtySource.LOGGED)  # what came before
        if not self.ranges or self.logging:
            return
        try:
            page = self.handle.dma_log_start(self.ranges, PAGE_SIZE)
        except devmig_native.DevmigError as e:
            log.warning("%s: no device DMA logging: %s", self.handle.desc[2] or "device", e)
            return
        if page != PAGE_SIZE:
            # Coarser than a page: every bit stands for several pages; the
            # export counts in PAGE_SIZE, so stop rather than misreport.
            self.handle.dma_log_stop()
            log.warning("device DMA logging granularity %d B is not %d B: unused", page, PAGE_SIZE)
            return
        self.logging = True

    def stop(self) -> None:
        """Stop the device's DMA logging, keeping what it logged last for
        the consumers' next take (the final pages)."""
        try:
            self.collect()
        except devmig_native.DevmigError as e:
            log.warning("reading the device's last dirty pages: %s", e)
        if self.logging:
            self.logging = False
            try:
                self.handle.dma_log_stop()
            except devmig_native.DevmigError as e:
                log.warning("stopping device DMA logging: %s", e)

    def missed_traps(self) -> int:
        """Accesses that bypassed a trap the device required since start:
        only a simulated device counts them (0 for others)."""
        if self.sim is None:
            return 0
        return self.sim.bar_stats().missed_traps - self._missed_base

    def subscribe(self, key: object) -> None:
        """A new consumer: its first take returns every page seen so far."""
        with self._lock:
            self._pending[key] = bytearray(self.seen)

    def unsubscribe(self, key: object) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def collect(self) -> None:
        """Read (and clear) what the device logged since the last read, and
        hand it to every consumer."""
        fresh = bytearray(self._nbytes)
        if self.logging:
            for iova, length in self.ranges:
                got = self.handle.dma_log_report(iova, length, PAGE_SIZE)
                _or_at(fresh, got, iova // PAGE_SIZE)
        if self.sim is not None:
            logged = self.sim.dirty_take(devmig_native.DirtySource.LOGGED)
            _or_at(fresh, logged, 0)
        with self._lock:
            devmig_native.bitmap_or(self.seen, fresh)
            for pending in self._pending.values():
                devmig_native.bitmap_or(pending, fresh)

    def take(self, key: object) -> bytes:
        """The consumer's pages since its previous take (collect first)."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = bytearray(self.seen)
            out = bytes(pending)
            pending[:] = bytes(len(pending))
        return out
