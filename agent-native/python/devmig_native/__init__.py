"""devmig native core: the VFIO migration uAPI v2, driven from C.

This module is the only door to the compiled library (``_native``); the rest
of devmig imports names from here, never from ``_native`` directly. It only
converts: every decision (the arc table, recovery, stream verification)
is made in C.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

from devmig_native import _native

__all__ = [
    "STREAM_KEY_LEN",
    "BarStats",
    "BitmapImpl",
    "ChecksumImpl",
    "Device",
    "DevmigError",
    "DirtySource",
    "FdKind",
    "FrameMode",
    "LoadCounter",
    "MigFlags",
    "MigState",
    "Pump",
    "PumpProgress",
    "RegionInfo",
    "SimDevice",
    "SimStats",
    "StreamError",
    "VfioHandle",
    "aes256_ctr",
    "aes_impl",
    "bitmap_count",
    "bitmap_decode",
    "bitmap_encode",
    "bitmap_encode_bound",
    "bitmap_encode_into",
    "bitmap_impl",
    "bitmap_or",
    "bitmap_ranges",
    "crc32c",
    "crypto_impls",
    "frame_pass",
    "fsm_path",
    "ghash",
    "hmac_sha256",
    "open_cdev",
    "open_group",
    "recv_fd",
    "send_fd",
    "sha256",
    "version",
]

if TYPE_CHECKING:

    class DevmigError(OSError):
        """A device operation failed. ``errno`` is the kernel's (or the
        simulated device's); ``from_state`` and ``to_state`` are the kernel
        state names (or None) of the request that failed."""

        from_state: str | None
        to_state: str | None

    class StreamError(DevmigError):
        """A devmig stream was refused (corrupt, truncated, reordered, from
        another device, or rejected by the device); the target was reset."""

else:
    # Both are made in C, so C raises them without calling back into Python.
    DevmigError = _native.DevmigError
    StreamError = _native.StreamError


class MigState(enum.IntEnum):
    """VFIO migration states, kernel values and kernel names."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigFlags(enum.IntFlag):
    """VFIO_DEVICE_FEATURE_MIGRATION flags."""

    STOP_COPY = 1
    P2P = 2
    PRE_COPY = 4


def version() -> str:
    """Version string of the compiled core."""
    return str(_native.version())


class ChecksumImpl(enum.IntEnum):
    """Implementations of the stream's checksums (C enum devmig_impl)."""

    AUTO = 0  # the CPU's own when it has one
    PORTABLE = 1  # plain C
    X86 = 2  # SSE4.2 crc32 / SHA extensions / PCLMULQDQ
    X86_512 = 3  # GHASH and CRC32C (not SHA-256): VPCLMULQDQ on AVX-512 registers


def crc32c(data: bytes | bytearray | memoryview, impl: int = ChecksumImpl.AUTO) -> int:
    """CRC32C of ``data`` as the stream computes it; OSError(ENOTSUP) when
    this CPU lacks ``impl``. Runs without the GIL."""
    return int(_native.crc32c(data, int(impl)))


def sha256(data: bytes | bytearray | memoryview, impl: int = ChecksumImpl.AUTO) -> bytes:
    """SHA-256 of ``data`` as the stream's trailer computes it; as crc32c."""
    return bytes(_native.sha256(data, int(impl)))


# Bytes of a stream key (DEVMIG_STREAM_KEY_LEN).
STREAM_KEY_LEN = 32


def ghash(h: bytes, data: bytes | bytearray | memoryview, impl: int = ChecksumImpl.AUTO) -> bytes:
    """GHASH_H of ``data`` followed by GCM's length block, the core of the
    stream's MAC (``X86``: carry-less multiplication); as crc32c."""
    return bytes(_native.ghash(h, data, int(impl)))


class FrameMode(enum.IntEnum):
    """What devmig_frame_pass does with a data frame's payload."""

    SEAL = 1  # encrypt in place, then CRC32C and MAC the ciphertext
    OPEN = 2  # CRC32C and MAC the ciphertext, then decrypt in place
    MAC = 3  # CRC32C and MAC only (streams without encryption)


def frame_pass(
    mode: FrameMode,
    key: bytes,
    nonce: bytes,
    data: bytearray | memoryview,
    frame: int = 1 << 20,
    one_pass: bool = True,
) -> tuple[bytes, list[int]]:
    """``data`` (writable; changed in place by SEAL and OPEN) taken as a
    stream's payload in frames of ``frame`` bytes, as the stream's encoder
    and decoder take each frame: the cipher under ``key`` (counter from 0),
    each frame's CRC32C, the MAC under ``key`` and ``nonce`` over all of it.
    Returns the MAC's tag and each frame's CRC32C. ``one_pass`` False runs
    the separate passes; both give the same result (tests and benchmarks
    compare them)."""
    tag, crcs = _native.frame_pass(int(mode), key, nonce, data, frame, one_pass)
    return bytes(tag), [int.from_bytes(crcs[i : i + 4], "little") for i in range(0, len(crcs), 4)]


def aes256_ctr(
    key: bytes,
    iv: bytes,
    offset: int,
    data: bytes | bytearray | memoryview,
    impl: int = ChecksumImpl.AUTO,
) -> bytes:
    """``data`` XOR AES-256-CTR's keystream from byte ``offset`` on, counter
    blocks ``iv`` (8 bytes) || the block index big-endian: how a sealed
    stream's payload is encrypted. OSError(ENOTSUP) without AES-NI (or,
    for ``X86_512``, VAES)."""
    return bytes(_native.aes256_ctr(key, iv, offset, data, int(impl)))


def aes_impl() -> str:
    """ "vaes", "aes-ni", or "none" (then streams cannot be sealed)."""
    return str(_native.aes_impl())


def hmac_sha256(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """HMAC-SHA-256, as the stream's MAC derives its one-time key."""
    return bytes(_native.hmac_sha256(key, data))


class FdKind(enum.IntEnum):
    """What a handed-over fd is (C enum devmig_fd_kind)."""

    UNSPECIFIED = 0
    VFIO_DEVICE = 1
    DATA = 2
    EVENTFD = 3


def send_fd(sock: int, fd: int, kind: FdKind, name: str) -> None:
    """Hand a duplicate of ``fd`` to the process at the other end of the
    Unix socket ``sock`` (SCM_RIGHTS, devmig's DMFD v1 message); the caller
    keeps ``fd``. OSError(EPIPE) when the peer is gone."""
    _native.send_fd(sock, fd, int(kind), name)


def recv_fd(sock: int) -> tuple[int, FdKind, str] | None:
    """Receive one handed-over fd: (fd, kind, name), the fd close-on-exec
    and owned by the caller; None when the peer closed first. OSError
    (EPROTO, EPROTONOSUPPORT, ECONNRESET) for a malformed or cut message,
    with every fd that came along closed."""
    got = _native.recv_fd(sock)
    if got is None:
        return None
    fd, kind, name = got
    return fd, FdKind(kind), name


# Dirty-page bitmaps (include/devmig/bitmap.h): little-endian 64-bit words,
# bit i standing for page i, as the kernel reports them.
Bitmap = bytes | bytearray | memoryview


def bitmap_count(bitmap: Bitmap, npages: int) -> int:
    """Dirty pages among the first ``npages``."""
    return int(_native.bitmap_count(bitmap, npages))


def bitmap_ranges(bitmap: Bitmap, npages: int) -> list[tuple[int, int]]:
    """The runs of dirty pages, in order, as (first_page, count)."""
    return _native.bitmap_ranges(bitmap, npages)


def bitmap_or(dst: bytearray | memoryview, src: Bitmap) -> None:
    """Merge ``src`` into ``dst`` (same length, whole 64-bit words)."""
    _native.bitmap_or(dst, src)


class BitmapImpl(enum.IntEnum):
    """Implementations of the bitmap encoder (C enum devmig_bitmap_impl);
    every one writes the same bytes."""

    AUTO = 0  # the fastest this CPU has
    PORTABLE = 1  # plain C
    X86 = 2  # POPCNT and BMI
    X86_512 = 3  # AVX-512 with VBMI2, BITALG and VPOPCNTDQ


def bitmap_encode(
    bitmap: Bitmap, npages: int, page_size: int = 4096, impl: int = BitmapImpl.AUTO
) -> bytes:
    """devmig's compact, versioned encoding (DMDB v1) of a dirty bitmap.
    ValueError for a bad page size or a bit set at or beyond ``npages``;
    OSError(ENOTSUP) when this CPU lacks ``impl``."""
    return _native.bitmap_encode(bitmap, npages, page_size, int(impl))


def bitmap_impl() -> str:
    """The encoder implementation this CPU uses (for logs and benchmarks)."""
    return str(_native.bitmap_impl())


def bitmap_encode_bound(npages: int) -> int:
    """The largest encoding of any bitmap of ``npages``: a buffer this big
    always suffices for bitmap_encode_into."""
    return int(_native.bitmap_encode_bound(npages))


def bitmap_encode_into(
    bitmap: Bitmap,
    npages: int,
    out: bytearray | memoryview,
    page_size: int = 4096,
    impl: int = BitmapImpl.AUTO,
) -> int:
    """bitmap_encode into a caller's buffer (reused across reports, no
    allocation); returns the encoded length. ValueError when ``out`` is
    short (bitmap_encode_bound always suffices)."""
    return int(_native.bitmap_encode_into(bitmap, npages, out, page_size, int(impl)))


def bitmap_decode(
    data: Bitmap, into: bytearray | memoryview | None = None
) -> tuple[int, int, bytearray | memoryview]:
    """(npages, page_size, bitmap) of an encoding, OR-ing its pages into
    ``into`` when given (merging several reports) or into a new zeroed
    bitmap. ValueError for anything malformed, with ``into`` untouched."""
    return _native.bitmap_decode(data, into)


def crypto_impls() -> str:
    """What AUTO uses here, e.g. "crc32c=sse4.2 sha256=sha-ni"."""
    return str(_native.crypto_impls())


def fsm_path(flags: int, from_state: int, to_state: int) -> list[MigState]:
    """States the kernel enters going from ``from_state`` to ``to_state`` on
    a device with ``flags``; raises DevmigError(EINVAL) when it refuses."""
    return [MigState(s) for s in _native.fsm_path(int(flags), int(from_state), int(to_state))]


@dataclasses.dataclass(frozen=True)
class RegionInfo:
    """A device region as the device states it now (VFIO_DEVICE_GET_REGION_INFO
    with its capability chain): ``sparse`` lists the (offset, size) areas
    that may be mmapped; the rest of the region must be trapped."""

    index: int
    flags: int
    size: int
    offset: int
    has_sparse: bool
    sparse: list[tuple[int, int]]
    has_type: bool
    type: int
    subtype: int


@dataclasses.dataclass
class VfioHandle:
    """An opened VFIO device and what keeps its IOMMU context alive: a
    group and type1 container, or an iommufd with an IOAS. The caller owns
    every fd; close() closes them, the device first."""

    device_fd: int
    container_fd: int = -1
    group_fd: int = -1
    iommufd: int = -1
    ioas_id: int = 0
    devid: int = 0

    def close(self) -> None:
        for name in ("device_fd", "group_fd", "container_fd", "iommufd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def open_group(group_path: str, name: str) -> VfioHandle:
    """Open device ``name`` (PCI address or mdev UUID) through its VFIO group
    (``/dev/vfio/N``) and a new type1v2 container. DevmigError names the
    step that failed."""
    dev, container, group = _native.vfio_open_group(group_path, name)
    return VfioHandle(device_fd=dev, container_fd=container, group_fd=group)


def open_cdev(cdev_path: str, iommufd_path: str = "/dev/iommu") -> VfioHandle:
    """Open a device through its cdev (``/dev/vfio/devices/vfioN``), bound to
    a new iommufd and attached to a new IOAS."""
    dev, iommufd, ioas, devid = _native.vfio_open_cdev(cdev_path, iommufd_path)
    return VfioHandle(device_fd=dev, iommufd=iommufd, ioas_id=ioas, devid=devid)


class LoadCounter:
    """Payload bytes a receive_stream has written into its device so far,
    updated by the native loader after each frame and read atomically."""

    def __init__(self) -> None:
        self.buf = bytearray(8)

    @property
    def value(self) -> int:
        return int(_native.read_counter(self.buf))


class DirtySource(enum.IntEnum):
    """What SimDevice.dirty_take reads (C DEVMIG_SIM_DIRTY_*)."""

    DMA = 0  # every guest page the device's DMA wrote: the ground truth
    LOGGED = 1  # the pages the device logged through traps


class Device:
    """A migratable device: a VFIO device fd, or the simulated device.

    State changes go through :meth:`set_state` only. Use from one thread at a
    time (calls from several threads are serialised).
    """

    def __init__(self, handle: _native.Device) -> None:
        self._h = handle

    @classmethod
    def open_vfio(cls, fd: int, vendor_id: int = 0, device_id: int = 0, driver: str = "") -> Device:
        """Take a VFIO device fd (duplicated: the caller keeps its own)."""
        return cls(_native.open_vfio(fd, vendor_id, device_id, driver))

    def close(self) -> None:
        self._h.close()

    def region_info(self, index: int) -> RegionInfo:
        """Region ``index`` as the device states it now: the sparse-mmap
        areas can change with the migration state (trap switching)."""
        d = self._h.region_info(index)
        return RegionInfo(**d)  # type: ignore[arg-type]

    def dma_log_start(self, ranges: list[tuple[int, int]], page_size: int = 4096) -> int:
        """Start the device's DMA logging over (iova, length) ranges;
        returns the page size the device chose (``page_size`` is a hint).
        DevmigError(ENOTTY) when the device has no DMA logging."""
        return int(self._h.dma_log_start(ranges, page_size))

    def dma_log_stop(self) -> None:
        self._h.dma_log_stop()

    def dma_log_report(self, iova: int, length: int, page_size: int = 4096) -> bytearray:
        """The pages DMA wrote in [iova, iova + length) since the last report,
        read and cleared, as a bitmap (bit i = page i from ``iova``).
        DevmigError(ENODATA) while logging is off: never a false "clean"."""
        return self._h.dma_log_report(iova, length, page_size)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def flags(self) -> MigFlags:
        return MigFlags(self._h.flags)

    @property
    def state(self) -> MigState:
        """The state the device last confirmed (no ioctl)."""
        return MigState(self._h.state)

    @property
    def data_fd(self) -> int:
        """The open data session's fd (owned by the device), or -1."""
        return int(self._h.data_fd)

    @property
    def poisoned(self) -> bool:
        return bool(self._h.poisoned)

    @property
    def desc(self) -> tuple[int, int, str]:
        """(vendor_id, device_id, driver) a stream from this device carries."""
        return self._h.desc

    def set_log(self, fn: Callable[[str], object] | None) -> None:
        """Send log lines ("RUNNING -> STOP_COPY ...") to ``fn(line)``;
        None restores stderr. Takes the device's lock, which a stream
        loading into the device holds until the stream ends: set it before
        a transfer starts (the call waits for that stream otherwise)."""
        self._h.set_log(fn)

    def probe(self) -> MigFlags:
        return MigFlags(self._h.probe())

    def get_state(self) -> MigState:
        return MigState(self._h.get_state())

    def set_state(self, to: MigState, recover_to: MigState) -> int:
        """Move to ``to``; on failure try ``recover_to`` (ERROR: reset
        directly), resetting if that fails too. Returns the data fd of the
        session, or -1."""
        return int(self._h.set_state(int(to), int(recover_to)))

    def reset(self) -> None:
        self._h.reset()

    def read(self, n: int) -> bytes | None:
        """Up to ``n`` bytes of device data; b"" at the end of the stream
        (STOP_COPY), None at a temporary end (PRE_COPY)."""
        return self._h.read(n)

    def write(self, data: bytes) -> int:
        """Write all of ``data`` into a RESUMING device; a failure poisons it."""
        return int(self._h.write(data))

    def precopy_info(self) -> tuple[int, int]:
        """(initial_bytes, dirty_bytes)."""
        return self._h.precopy_info()

    def data_size(self) -> int:
        return int(self._h.data_size())

    def save_stream(self, path: str | os.PathLike[str]) -> int:
        """Write this device's data as a devmig stream (from PRE_COPY or
        STOP_COPY; leaves the device in STOP_COPY). Returns payload bytes."""
        return int(self._h.save_stream(os.fspath(path)))

    def load_stream(self, path: str | os.PathLike[str]) -> None:
        """Load a devmig stream into this RESUMING device; it ends in STOP.
        Raises StreamError (the device reset) unless it all verified."""
        self._h.load_stream(os.fspath(path))

    def send_stream(self, fd: int) -> int:
        """As save_stream, onto an open fd (a socket to the target). The
        caller ends the stream with shutdown/close. Runs without the GIL."""
        return self._h.send_stream(fd)

    def receive_stream(
        self,
        fd: int,
        counter: LoadCounter | None = None,
        mac_key: bytes | None = None,
        seal: bool = False,
    ) -> None:
        """As load_stream, from an open fd, until its end of file. With a
        ``counter``, the payload bytes loaded so far can be read from another
        thread while this runs (the target's progress). With ``mac_key``
        (STREAM_KEY_LEN bytes) only a stream keyed with it verifies, and with
        ``seal`` too only a sealed (encrypted) one; without, only a SHA-256
        stream (see stream.h)."""
        self._h.receive_stream(fd, counter.buf if counter is not None else None, mac_key, seal)


@dataclasses.dataclass(frozen=True)
class PumpProgress:
    bytes_sent: int
    rounds: int
    initial_bytes: int
    dirty_bytes: int
    throughput_bps: int
    dirty_rate_bps: int
    stopped_at_ns: int  # CLOCK_REALTIME when STOP_COPY was entered, or 0
    state: MigState
    done: bool
    error: int  # -errno the pump ended with, or 0

    @property
    def remaining_bytes(self) -> int:
        return self.initial_bytes + self.dirty_bytes


class Pump:
    """Streams a saving device (PRE_COPY or STOP_COPY) to ``fd`` in devmig's
    stream format, on a native thread: pre-copy rounds while the device
    runs, then, on :meth:`stop_copy`, STOP_COPY and the rest.

    The pump owns the device while it runs: other calls on the device wait
    until :meth:`wait` has seen the pump end. ``bandwidth_bps`` caps payload
    bytes per second (0: no cap); ``round_interval_ms`` is the wait at a
    pre-copy temporary end before asking the device again. A pump blocked
    on a full socket is freed by shutting the socket down after
    :meth:`cancel`. ``mac_key`` (STREAM_KEY_LEN bytes) keys the stream's
    MAC; without one the trailer carries SHA-256 (see stream.h). ``seal``
    also encrypts the payload (AES-256-CTR under a key derived from
    ``mac_key``); OSError(ENOTSUP) without AES-NI (see :func:`aes_impl`).
    """

    def __init__(
        self,
        device: Device,
        fd: int,
        bandwidth_bps: int = 0,
        round_interval_ms: int = 50,
        mac_key: bytes | None = None,
        seal: bool = False,
    ) -> None:
        self._p = _native.Pump(device._h, fd, bandwidth_bps, round_interval_ms, mac_key, seal)

    def progress(self) -> PumpProgress:
        d = dict(self._p.progress())
        d["state"] = MigState[str(d["state"])]
        return PumpProgress(**d)  # type: ignore[arg-type]

    def stop_copy(self) -> None:
        """Move the device to STOP_COPY and send the rest; returns once the
        device stopped (DevmigError if it could not; it is RUNNING again)."""
        self._p.stop_copy()

    def quiesce_p2p(self) -> None:
        """PRE_COPY -> PRE_COPY_P2P (all devices of a VM, before any stops)."""
        self._p.quiesce_p2p()

    def cancel(self) -> None:
        self._p.cancel()

    def wait(self, timeout_s: float | None = None) -> bool:
        return bool(self._p.wait(timeout_s))

    def result(self) -> int:
        """Payload bytes sent; DevmigError if the pump failed."""
        return int(self._p.result())

    def close(self) -> None:
        self._p.close()


@dataclasses.dataclass(frozen=True)
class SimStats:
    set_state_calls: int
    reset_calls: int
    last_path: list[MigState]
    pages_dirtied: int
    loads: int
    mem_digest: int
    missed_traps: int
    dma_ops: int
    dma_pages: int
    dma_deferred: int


@dataclasses.dataclass(frozen=True)
class BarStats:
    """The simulated BAR's counters since open (see SimStats)."""

    missed_traps: int
    dma_ops: int
    dma_pages: int
    dma_deferred: int


class SimDevice(Device):
    """The simulated migratable device (kernel semantics, no hardware)."""

    def __init__(
        self,
        flags: int = MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY,
        mem_size: int = 1 << 20,
        dirty_pages_per_mib: int = 0,
        seed: int = 0,
        vendor_id: int = 0,
        device_id: int = 0,
        driver: str | None = None,
        precopy_end_enomsg: bool = False,
        guest_mem_size: int = 1 << 20,
    ) -> None:
        # precopy_end_enomsg: PRE_COPY's temporary end as -ENOMSG (mlx5's
        # way) instead of a read of 0 (mtty's); read() gives None for both.
        handle = _native.open_sim(
            int(flags),
            mem_size,
            dirty_pages_per_mib,
            seed,
            vendor_id,
            device_id,
            driver,
            precopy_end_enomsg,
            guest_mem_size,
        )
        super().__init__(handle)
        # Bytes of guest memory the device's DMA engine writes (IOVA 0 on),
        # as the C side sizes it: whole 4 KiB pages, 0 meaning 1 MiB.
        self.guest_size = max((guest_mem_size or 1 << 20) // 4096, 1) * 4096

    def fail_arc(
        self, from_state: MigState, to_state: MigState, err: int, end_in_error: bool = False
    ) -> None:
        """Make one arc of any path fail with ``err`` until clear_faults()."""
        self._h.sim_fail_arc(int(from_state), int(to_state), err, end_in_error)

    def fail_write(self, offset: int, err: int) -> None:
        """Resuming writes reaching stream byte ``offset`` fail with ``err``."""
        self._h.sim_fail_write(offset, err)

    def corrupt(self, offset: int) -> None:
        """Flip byte ``offset`` of the next saving stream the device makes."""
        self._h.sim_corrupt(offset)

    def clear_faults(self) -> None:
        self._h.sim_clear_faults()

    def touch(self, page: int) -> None:
        """The running workload writes page ``page`` (4 KiB pages)."""
        self._h.sim_touch(page)

    # The BAR (region 0, 64 KiB): see include/devmig/sim.h. Register offsets:
    BAR_DMA_ADDR = 0x1000
    BAR_DMA_LEN = 0x1008
    BAR_DMA_GO = 0x1010
    BAR_SCRATCH = 0x2000

    def bar_write(self, offset: int, value: int, mapped: bool = False) -> None:
        """An 8-byte register store: ``mapped`` through the VMM's mmap (a
        vCPU), else trapped through the device. Safe from any thread, even
        while a Pump holds the device."""
        self._h.sim_bar_access(mapped, True, offset, value)

    def bar_read(self, offset: int, mapped: bool = False) -> int:
        return int(self._h.sim_bar_access(mapped, False, offset))

    def reeval_eventfd(self) -> int:
        """The eventfd the device signals when its sparse-mmap areas change."""
        return int(self._h.sim_reeval_eventfd())

    def guest_read(self, offset: int, length: int) -> bytes:
        """Guest memory the device's DMA writes (a copy)."""
        return self._h.sim_guest_read(offset, length)

    def dirty_take(self, source: DirtySource) -> bytearray:
        """Take and clear the guest pages DMA wrote, or the device logged."""
        return self._h.sim_dirty_take(int(source))

    def bar_stats(self) -> BarStats:
        """The BAR's counters only; never waits for a pump holding the device."""
        return BarStats(**self._h.sim_bar_stats())

    def stats(self) -> SimStats:
        st = self._h.sim_stats()
        path = st.pop("last_path")
        assert isinstance(path, list)
        return SimStats(last_path=[MigState(s) for s in path], **st)  # type: ignore[arg-type]


# The enum above must agree with the C table; checked at import so a drift
# can never ship.
for _s in MigState:
    if _native.state_name(int(_s)) != _s.name:  # pragma: no cover - drift guard
        raise ImportError(f"devmig_native: state {_s.value} is {_native.state_name(int(_s))} in C")
