"""The binding's trap-switching, DMA and dirty-logging surface on the
simulated device, and opening real devices (their failures, here)."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading

import pytest

import devmig_native as dn


def _dma(d: dn.SimDevice, page: int, pages: int, mapped: bool) -> None:
    d.bar_write(d.BAR_DMA_ADDR, page * 4096, mapped)
    d.bar_write(d.BAR_DMA_LEN, pages * 4096, mapped)
    d.bar_write(d.BAR_DMA_GO, 1, mapped)


def test_the_bar_sparse_areas_follow_the_state_with_a_reevaluate_hint() -> None:
    with dn.SimDevice() as d:
        d.set_log(lambda _line: None)
        ri = d.region_info(0)
        assert ri.size == 0x10000 and ri.sparse == [(0x1000, 0xF000)]
        efd = d.reeval_eventfd()
        d.set_state(dn.MigState.PRE_COPY, dn.MigState.RUNNING)
        assert select.select([efd], [], [], 0)[0] == [efd]
        os.read(efd, 8)
        assert d.region_info(0).sparse == [(0x2000, 0xE000)]
        d.set_state(dn.MigState.RUNNING, dn.MigState.ERROR)
        assert d.region_info(0).sparse == [(0x1000, 0xF000)]


def test_a_store_through_a_stale_mapping_is_a_missed_trap_and_a_lost_page() -> None:
    with dn.SimDevice() as d:
        d.set_log(lambda _line: None)
        d.set_state(dn.MigState.PRE_COPY, dn.MigState.RUNNING)
        _dma(d, 7, 1, mapped=False)  # trapped: logged
        _dma(d, 9, 1, mapped=True)  # through the old mapping of page 1: bypassed
        st = d.stats()
        assert st.missed_traps == 3 and st.dma_ops == 2
        written = dn.bitmap_ranges(d.dirty_take(dn.DirtySource.DMA), 256)
        logged = dn.bitmap_ranges(d.dirty_take(dn.DirtySource.LOGGED), 256)
        assert written == [(7, 1), (9, 1)] and logged == [(7, 1)]
        with pytest.raises(dn.DevmigError) as e:
            d.bar_write(0x0, 1, mapped=True)  # page 0 is never mappable
        assert e.value.errno == errno.EFAULT


def test_bar_access_works_while_a_pump_holds_the_device() -> None:
    with dn.SimDevice(mem_size=8 << 20, dirty_pages_per_mib=4) as d:
        d.set_log(lambda _line: None)
        d.set_state(dn.MigState.PRE_COPY, dn.MigState.RUNNING)
        a, b = socket.socketpair()

        def drain() -> None:
            while b.recv(1 << 20):
                pass

        t = threading.Thread(target=drain)
        t.start()
        p = dn.Pump(d, a.fileno(), round_interval_ms=1)
        for i in range(200):  # a vCPU's trapped DMA requests meanwhile
            _dma(d, i % 256, 1, mapped=False)
        p.stop_copy()
        p.wait(None)
        p.close()
        a.shutdown(socket.SHUT_WR)
        t.join()
        a.close()
        b.close()
        assert d.stats().missed_traps == 0
        assert len(dn.bitmap_ranges(d.dirty_take(dn.DirtySource.LOGGED), 256)) > 0


def test_dma_logging_through_the_binding() -> None:
    with dn.SimDevice() as d:
        d.set_log(lambda _line: None)
        with pytest.raises(dn.DevmigError) as e:
            d.dma_log_report(0, 1 << 20)
        assert e.value.errno == errno.ENODATA
        assert d.dma_log_start([(0, 1 << 20)], page_size=1 << 21) == 4096
        _dma(d, 3, 2, mapped=True)  # DMA logging sees it whatever the path
        bm = d.dma_log_report(0, 1 << 20)
        assert dn.bitmap_ranges(bm, 256) == [(3, 2)]
        assert dn.bitmap_ranges(d.dma_log_report(0, 1 << 20), 256) == []
        d.dma_log_stop()


def test_opening_a_missing_device_names_the_step() -> None:
    with pytest.raises(dn.DevmigError) as e:
        dn.open_cdev("/nonexistent/vfio7")
    assert e.value.errno == errno.ENOENT and "open /nonexistent/vfio7" in str(e.value)
    with pytest.raises(dn.DevmigError):
        dn.open_group("/nonexistent/12", "0000:00:01.0")
