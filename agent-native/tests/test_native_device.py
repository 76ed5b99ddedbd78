"""The data fd through the Python binding: PRE_COPY rounds and their
temporary ends, PRE_COPY info, the STOP_COPY size estimate, resuming
validation, poisoning, and the log."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from devmig_native import Device, DevmigError, MigFlags, MigState, SimDevice

PAGE = 4096
REC = 16 + PAGE  # the simulated device's record per page
HDR, END = 32, 16


def drain(dev: SimDevice) -> tuple[bytes, bool]:
    """Read to the next end: (data, True at the permanent end)."""
    out: list[bytes] = []
    while True:
        chunk = dev.read(1 << 16)
        if chunk is None:
            return b"".join(out), False
        if chunk == b"":
            return b"".join(out), True
        out.append(chunk)


def quiet(dev: SimDevice) -> SimDevice:
    dev.set_log(lambda line: None)
    return dev


def test_pre_copy_streams_initial_data_then_dirty_rounds_until_stop_copy() -> None:
    src = quiet(SimDevice(mem_size=32 * PAGE, dirty_pages_per_mib=64, seed=1))
    dst = quiet(SimDevice(mem_size=32 * PAGE, seed=2))
    dst.set_state(MigState.RESUMING, MigState.RUNNING)
    assert src.data_size() == HDR + 32 * REC + END
    fd = src.set_state(MigState.PRE_COPY, MigState.RUNNING)
    assert fd == src.data_fd >= 0
    assert src.precopy_info() == (HDR + 32 * REC, 0)

    first = src.read(1000)
    assert first is not None and len(first) == 1000
    assert src.precopy_info()[0] == HDR + 32 * REC - 1000  # counts down
    dst.write(first)
    data, done = drain(src)
    assert not done  # PRE_COPY's temporary end, not the end of the stream
    dst.write(data)
    initial, dirty = src.precopy_info()
    assert initial == 0
    assert dirty > 0  # the workload dirtied pages while we read
    rounds = 0
    while dirty and rounds < 20:
        data, done = drain(src)
        assert not done and len(data) % REC == 0
        dst.write(data)
        initial, dirty = src.precopy_info()
        rounds += 1
    src.touch(5)
    assert src.precopy_info()[1] >= REC
    assert src.stats().pages_dirtied > 0

    assert src.set_state(MigState.STOP_COPY, MigState.RUNNING) == fd  # same session
    with pytest.raises(DevmigError) as ei:
        src.touch(1)
    assert ei.value.errno == errno.EBUSY
    with pytest.raises(DevmigError) as ei:
        src.precopy_info()
    assert ei.value.errno == errno.EINVAL
    data, done = drain(src)
    assert done
    dst.write(data)
    assert src.read(10) == b""
    dst.set_state(MigState.RUNNING, MigState.ERROR)
    assert dst.stats().mem_digest == src.stats().mem_digest
    assert dst.stats().loads == 1
    src.set_state(MigState.STOP, MigState.RUNNING)
    assert src.data_fd == -1


def test_the_data_fd_is_a_real_fd_that_reads_zero_at_the_temporary_end() -> None:
    with quiet(SimDevice(mem_size=4 * PAGE)) as dev:
        fd = dev.set_state(MigState.PRE_COPY, MigState.RUNNING)
        data = b""
        while chunk := os.read(fd, 1000):
            data += chunk
        assert len(data) == HDR + 4 * REC
        assert os.read(fd, 10) == b""
        assert dev.read(10) is None


def test_a_refused_resuming_write_poisons_the_device_until_reset() -> None:
    with (
        quiet(SimDevice(mem_size=4 * PAGE, seed=3)) as src,
        quiet(SimDevice(mem_size=4 * PAGE)) as dst,
    ):
        src.set_state(MigState.STOP_COPY, MigState.RUNNING)
        image, _ = drain(src)
        dst.set_state(MigState.RESUMING, MigState.RUNNING)
        dst.fail_write(100, errno.ENOSPC)
        with pytest.raises(DevmigError) as ei:
            dst.write(image)
        assert ei.value.errno == errno.ENOSPC
        assert dst.poisoned
        calls = dst.stats().set_state_calls
        for to in (MigState.STOP, MigState.RUNNING):
            with pytest.raises(DevmigError) as ei:
                dst.set_state(to, MigState.RUNNING)
            assert ei.value.errno == errno.EIO
        assert dst.stats().set_state_calls == calls
        assert dst.get_state() == MigState.RESUMING
        dst.reset()
        assert not dst.poisoned and dst.get_state() == MigState.RUNNING


def test_resuming_refuses_short_or_corrupt_data_and_the_device_is_reset() -> None:
    with (
        quiet(SimDevice(mem_size=4 * PAGE, seed=3)) as src,
        quiet(SimDevice(mem_size=4 * PAGE)) as dst,
    ):
        src.set_state(MigState.STOP_COPY, MigState.RUNNING)
        image, _ = drain(src)
        for bad, err in (
            (image[:-1], errno.EINVAL),
            (image[:200] + b"\0" + image[201:], errno.EIO),
        ):
            dst.set_state(MigState.RESUMING, MigState.RUNNING)
            dst.write(bad)
            with pytest.raises(DevmigError) as ei:
                dst.set_state(MigState.RUNNING, MigState.RUNNING)
            assert ei.value.errno == err
            assert dst.get_state() == MigState.RUNNING
            assert dst.stats().loads == 0
            assert dst.stats().mem_digest != src.stats().mem_digest


def test_the_resuming_device_loads_as_data_arrives_whatever_the_write_boundaries() -> None:
    """Records split across writes of any size are assembled; RESUMING ->
    STOP then only checks the end (the load happened as the data came)."""
    with (
        quiet(SimDevice(mem_size=8 * PAGE, seed=4)) as src,
        quiet(SimDevice(mem_size=8 * PAGE)) as dst,
    ):
        src.set_state(MigState.STOP_COPY, MigState.RUNNING)
        image, _ = drain(src)
        for sizes in ((1,), (3, 4111, 7), (REC + 1, 5), (len(image),)):
            dst.set_state(MigState.RESUMING, MigState.RUNNING)
            at, i = 0, 0
            while at < len(image):
                n = sizes[i % len(sizes)]
                dst.write(image[at : at + n])
                at, i = at + n, i + 1
            dst.set_state(MigState.STOP, MigState.RUNNING)
            assert dst.stats().mem_digest == src.stats().mem_digest
            dst.set_state(MigState.RUNNING, MigState.RUNNING)
            dst.reset()
        assert dst.stats().loads == 4


def test_resuming_refuses_a_missing_page_an_unknown_record_or_bytes_after_the_end() -> None:
    with (
        quiet(SimDevice(mem_size=4 * PAGE, seed=3)) as src,
        quiet(SimDevice(mem_size=4 * PAGE)) as dst,
    ):
        src.set_state(MigState.STOP_COPY, MigState.RUNNING)
        image, _ = drain(src)
        body, end = image[HDR:-END], image[-END:]
        unknown = (7).to_bytes(4, "little") + body[4:REC]
        for bad in (
            image[:HDR] + body[REC:] + end,  # page 0 never sent
            image[:HDR] + unknown + body[REC:] + end,
            image + b"\0",
            image[:HDR] + body + body[:REC] + end,  # a page twice: fine, loads
        ):
            dst.set_state(MigState.RESUMING, MigState.RUNNING)
            dst.write(bad)
            if bad.endswith(end) and len(bad) == len(image) + REC:
                dst.set_state(MigState.STOP, MigState.RUNNING)
                assert dst.stats().mem_digest == src.stats().mem_digest
                dst.reset()
                continue
            with pytest.raises(DevmigError) as ei:
                dst.set_state(MigState.STOP, MigState.RUNNING)
            assert ei.value.errno == errno.EIO
            # Refused into ERROR, then reset: nothing of the stream stays.
            assert dst.get_state() == MigState.RUNNING
            assert dst.stats().mem_digest != src.stats().mem_digest


def test_a_device_without_pre_copy_reports_its_flags_and_refuses_pre_copy() -> None:
    with quiet(SimDevice(flags=MigFlags.STOP_COPY)) as dev:
        assert dev.flags == dev.probe() == MigFlags.STOP_COPY
        with pytest.raises(DevmigError) as ei:
            dev.set_state(MigState.PRE_COPY, MigState.RUNNING)
        assert ei.value.errno == errno.EINVAL
        assert dev.stats().set_state_calls == 0


def test_log_lines_use_kernel_state_names_and_reach_the_callback() -> None:
    lines: list[str] = []
    with SimDevice() as dev:
        dev.set_log(lines.append)
        dev.set_state(MigState.STOP_COPY, MigState.RUNNING)
        dev.set_state(MigState.RUNNING, MigState.RUNNING)
        assert lines == [
            "RUNNING -> STOP_COPY (via RUNNING_P2P, STOP)",
            "STOP_COPY -> RUNNING (via STOP, RUNNING_P2P)",
        ]


def test_calls_from_another_thread_are_serialised_and_see_the_same_device() -> None:
    with quiet(SimDevice(mem_size=64 * PAGE)) as dev:
        dev.set_state(MigState.STOP_COPY, MigState.RUNNING)
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(drain(dev)[0]))
        t.start()
        t.join()
        assert len(got[0]) == HDR + 64 * REC + END


def test_a_closed_device_refuses_every_call() -> None:
    dev = SimDevice()
    dev.close()
    with pytest.raises(ValueError):
        dev.get_state()
    dev.close()  # idempotent


def test_a_fd_that_is_not_a_vfio_device_is_refused_with_the_kernels_errno() -> None:
    with open(os.devnull, "rb") as f, pytest.raises(DevmigError) as ei:
        Device.open_vfio(f.fileno())
    assert ei.value.errno == errno.ENOTTY


@pytest.mark.parametrize("enomsg", [False, True], ids=["read-0", "ENOMSG"])
def test_both_spellings_of_the_pre_copy_temporary_end_read_as_none(enomsg: bool) -> None:
    with quiet(SimDevice(mem_size=2 * PAGE, precopy_end_enomsg=enomsg)) as dev:
        dev.set_state(MigState.PRE_COPY, MigState.RUNNING)
        data, done = drain(dev)
        assert len(data) == HDR + 2 * REC and not done
        assert dev.read(10) is None
        dev.set_state(MigState.STOP_COPY, MigState.RUNNING)
        rest, done = drain(dev)
        assert len(rest) == END and done
