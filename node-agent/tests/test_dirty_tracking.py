"""The agent's dirty-page tracking and BAR-area reading against the
simulated device: every reader gets every page even though device reads
clear what they return, DMA logging and trap logging are both read, and
the mappable areas follow the device's state."""

from __future__ import annotations

import pathlib

import local_agent
import pytest

import devmig_native
from devmig_agent import devices, tracking
from devmig_agent.sessions import Phase, SessionError
from devmig_agent.tracking import Area, DirtyTracker
from devmig_native import MigState, SimDevice


def _dma(dev: SimDevice, page: int, trapped: bool = True) -> None:
    dev.bar_write(dev.BAR_DMA_ADDR, page * 4096, mapped=not trapped)
    dev.bar_write(dev.BAR_DMA_LEN, 4096, mapped=not trapped)
    dev.bar_write(dev.BAR_DMA_GO, 1, mapped=not trapped)


def _pages(bitmap: bytes) -> set[int]:
    out: set[int] = set()
    for first, n in devmig_native.bitmap_ranges(bitmap, len(bitmap) * 8):
        out.update(range(first, first + n))
    return out


def test_the_mappable_areas_are_re_read_from_the_device_in_each_state() -> None:
    dev = SimDevice()
    running = tracking.mappable_areas(dev)
    assert running == [Area(0, 4096, 61440)]
    dev.set_state(MigState.PRE_COPY, MigState.RUNNING)
    assert tracking.mappable_areas(dev) == [Area(0, 8192, 57344)]  # DMA page trapped
    dev.set_state(MigState.RUNNING, MigState.ERROR)
    assert tracking.mappable_areas(dev) == running


def test_every_reader_gets_every_page_although_reads_clear_the_device() -> None:
    dev = SimDevice(guest_mem_size=1 << 20)
    t = DirtyTracker(dev, [])
    assert t.ranges == [(0, 1 << 20)] and t.npages == 256
    t.start()
    assert t.logging
    dev.set_state(MigState.PRE_COPY, MigState.RUNNING)
    t.subscribe("watch")
    _dma(dev, 3)
    t.collect()
    assert _pages(t.take("watch")) == {3}
    _dma(dev, 7)
    t.collect()
    # A reader that never read before starts from everything seen.
    assert _pages(t.take("vmm")) == {3, 7}
    assert _pages(t.take("watch")) == {7}
    assert _pages(t.take("watch")) == set()  # taken is taken
    t.stop()
    assert not t.logging


def test_a_dma_through_a_bypassed_trap_is_still_caught_by_the_dma_log() -> None:
    dev = SimDevice()
    t = DirtyTracker(dev, [])
    t.start()
    dev.set_state(MigState.PRE_COPY, MigState.RUNNING)
    # The DMA registers through a stale mapping: the trap log misses it.
    _dma(dev, 42, trapped=False)
    assert dev.bar_stats().missed_traps == 3
    t.collect()
    assert _pages(t.take("x")) == {42}


def test_ranges_away_from_zero_land_on_their_own_pages() -> None:
    dev = SimDevice(guest_mem_size=1 << 20)
    # Only guest pages 5..36 are logged: 32 pages starting off a byte edge.
    t = DirtyTracker(dev, [(5 * 4096, 32 * 4096)])
    t.start()
    _dma(dev, 9)
    _dma(dev, 100)  # outside the logged range, and not in a migration state
    t.collect()
    assert _pages(t.take("x")) == {9}


def test_stopping_keeps_the_last_logged_pages_for_the_next_take() -> None:
    dev = SimDevice()
    t = DirtyTracker(dev, [])
    t.start()
    dev.set_state(MigState.PRE_COPY, MigState.RUNNING)
    _dma(dev, 5)
    t.stop()  # no collect in between: stop reads the log one last time
    assert _pages(t.take("vmm")) == {5}


def test_the_vmm_pulls_the_last_pages_once_after_the_migration_committed(
    tmp_path: pathlib.Path,
) -> None:
    src_reg = devices.simulated("a", devices.SimSpec(count=1, size=1 << 20))
    dst_reg = devices.simulated("b", devices.SimSpec(count=1, size=1 << 20))
    a, adp = local_agent.wire(src_reg, tmp_path / "a")
    b, bdp = local_agent.wire(dst_reg, tmp_path / "b")
    sim = src_reg.get("sim-a-0").handle
    assert isinstance(sim, SimDevice)
    try:
        a.prepare_source("s", "t", "sim-a-0", 0)
        endpoint = b.prepare_target("s", "t", "sim-b-0").data_endpoint
        a.start_pre_copy("s", "t", endpoint)
        _dma(sim, 9)  # the guest's DMA while pre-copy runs
        a.stop_and_copy("s", "t", [])
        for snap in a.watch("s", "t", 10, lambda: True):
            if snap.phase is Phase.TRANSFERRED:
                break
        b.resume("s", "t")
        a.finish("s", "t")
        # The commit came first; the paused VMM's final pull still gets
        # every page since pre-copy began, once.
        page_size, npages, bitmap, final = a.vmm_dirty("sim-a-0")
        assert npages == 256  # the 1 MiB guest, in 4 KiB pages
        assert final and page_size == 4096 and 9 in _pages(bitmap)
        with pytest.raises(SessionError) as e:
            a.vmm_dirty("sim-a-0")
        assert e.value.reason == "NotMigrating"
    finally:
        adp.shutdown()
        bdp.shutdown()
