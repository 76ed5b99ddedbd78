"""devmig streams through the Python binding: a save/load round trip, and
every damaged stream refused with the target reset, never RUNNING on it."""

from __future__ import annotations

import errno
import pathlib
import socket
import struct
import threading

import pytest

from devmig_native import DevmigError, LoadCounter, MigState, SimDevice, StreamError

PAGE = 4096
HEADER, FRAME_HDR = 96, 20  # stream format 2


def quiet(dev: SimDevice) -> SimDevice:
    dev.set_log(lambda line: None)
    return dev


def frames(blob: bytes) -> list[tuple[int, int]]:
    """(offset, total length) of every frame after the header."""
    out, off = [], HEADER
    while off < len(blob):
        (length,) = struct.unpack_from("<I", blob, off + 4)
        out.append((off, FRAME_HDR + length))
        off += FRAME_HDR + length
    return out


@pytest.fixture
def saved(tmp_path: pathlib.Path) -> tuple[pathlib.Path, int]:
    """A stream saved from PRE_COPY (two data frames: the initial data and
    the STOP_COPY rest), and the source's memory digest."""
    with quiet(SimDevice(mem_size=16 * PAGE, dirty_pages_per_mib=256, seed=7)) as src:
        src.set_state(MigState.PRE_COPY, MigState.RUNNING)
        path = tmp_path / "dev.stream"
        assert src.save_stream(path) > 16 * PAGE
        assert src.state == MigState.STOP_COPY
        return path, src.stats().mem_digest


def target(**kw: object) -> SimDevice:
    dst = quiet(SimDevice(mem_size=16 * PAGE, seed=8, **kw))  # type: ignore[arg-type]
    dst.set_state(MigState.RESUMING, MigState.RUNNING)
    return dst


def assert_refused_and_reset(
    dst: SimDevice, path: pathlib.Path, err: int, source_digest: int
) -> None:
    with pytest.raises(StreamError) as ei:
        dst.load_stream(path)
    assert ei.value.errno == err
    assert isinstance(ei.value, DevmigError) and isinstance(ei.value, OSError)
    st = dst.stats()
    assert st.reset_calls == 1 and st.loads == 0
    assert dst.get_state() == MigState.RUNNING and not dst.poisoned
    assert st.mem_digest != source_digest  # nothing of the stream runs


def test_a_saved_stream_loads_and_the_target_runs_with_the_source_memory(
    saved: tuple[pathlib.Path, int],
) -> None:
    path, digest = saved
    assert len(frames(path.read_bytes())) == 3  # initial, rest, trailer
    with target() as dst:
        dst.load_stream(path)
        assert dst.state == MigState.STOP
        dst.set_state(MigState.RUNNING, MigState.ERROR)
        assert dst.stats().mem_digest == digest


@pytest.mark.parametrize("where", ["magic", "header", "frame header", "payload", "trailer"])
def test_a_corrupted_byte_is_refused_and_the_target_is_reset(
    saved: tuple[pathlib.Path, int], tmp_path: pathlib.Path, where: str
) -> None:
    path, digest = saved
    blob = bytearray(path.read_bytes())
    at = {
        "magic": 0,
        "header": 20,
        "frame header": HEADER + 2,
        "payload": HEADER + 5000,
        "trailer": len(blob) - 3,
    }
    blob[at[where]] ^= 0x80
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(blob))
    with target() as dst:
        assert_refused_and_reset(
            dst, bad, errno.EPROTO if where == "magic" else errno.EBADMSG, digest
        )


@pytest.mark.parametrize("cut", [10, HEADER, HEADER + 100, -60, -1])
def test_a_truncated_stream_is_refused_and_the_target_is_reset(
    saved: tuple[pathlib.Path, int], tmp_path: pathlib.Path, cut: int
) -> None:
    path, digest = saved
    bad = tmp_path / "short"
    bad.write_bytes(path.read_bytes()[:cut])
    with target() as dst:
        assert_refused_and_reset(dst, bad, errno.ENODATA, digest)


def test_reordered_and_replayed_frames_are_refused(
    saved: tuple[pathlib.Path, int], tmp_path: pathlib.Path
) -> None:
    path, digest = saved
    blob = path.read_bytes()
    (a, alen), (b, blen), (t, _) = frames(blob)
    swapped = blob[:HEADER] + blob[b : b + blen] + blob[a : a + alen] + blob[t:]
    replayed = blob[: a + alen] + blob[a : a + alen] + blob[b:]
    for name, data in (("swapped", swapped), ("replayed", replayed)):
        bad = tmp_path / name
        bad.write_bytes(data)
        with target() as dst:
            assert_refused_and_reset(dst, bad, errno.EILSEQ, digest)


def test_a_trailer_that_does_not_match_the_payload_is_refused(
    saved: tuple[pathlib.Path, int], tmp_path: pathlib.Path
) -> None:
    path, digest = saved
    blob = path.read_bytes()
    (a, alen), _, (t, tlen) = frames(blob)
    # Drop the second data frame and renumber the trailer: every frame
    # checks, the sequence is whole, only the trailer can tell.
    trailer = bytearray(blob[t : t + tlen])
    struct.pack_into("<Q", trailer, 8, 1)

    trailer[16:20] = struct.pack("<I", crc32c(bytes(trailer[:16]) + bytes(trailer[20:])))
    bad = tmp_path / "lying-trailer"
    bad.write_bytes(blob[: a + alen] + bytes(trailer))
    with target() as dst:
        assert_refused_and_reset(dst, bad, errno.EBADMSG, digest)


def test_a_stream_from_another_kind_of_device_is_refused(saved: tuple[pathlib.Path, int]) -> None:
    path, digest = saved
    with target(device_id=0x0002, vendor_id=0x1B36, driver="devmig-sim") as dst:
        assert_refused_and_reset(dst, path, errno.EXDEV, digest)


def test_data_the_device_itself_rejects_resets_it_even_if_the_stream_verified(
    tmp_path: pathlib.Path,
) -> None:
    with quiet(SimDevice(mem_size=16 * PAGE, seed=7)) as src:
        src.corrupt(5000)  # the source device emits a bad byte
        src.set_state(MigState.STOP_COPY, MigState.RUNNING)
        path = tmp_path / "s"
        src.save_stream(path)
        with target() as dst:
            assert_refused_and_reset(dst, path, errno.EIO, src.stats().mem_digest)


def crc32c(data: bytes) -> int:
    """Bitwise CRC32C, independent of the C tables."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_the_independent_crc32c_matches_the_standard_vector() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def test_a_device_migrates_over_a_socket_with_sender_and_receiver_in_parallel() -> None:
    # 4 MiB of state is far more than a socket buffer holds: the sender can
    # only finish while the receiver runs at the same time, without the GIL.
    with (
        quiet(SimDevice(mem_size=1024 * PAGE, dirty_pages_per_mib=32, seed=11)) as src,
        quiet(SimDevice(mem_size=1024 * PAGE, seed=12)) as dst,
    ):
        dst.set_state(MigState.RESUMING, MigState.RUNNING)
        src.set_state(MigState.PRE_COPY, MigState.RUNNING)
        a, b = socket.socketpair()
        errors: list[BaseException] = []

        sent: list[int] = []

        def send() -> None:
            try:
                sent.append(src.send_stream(a.fileno()))
            except BaseException as e:  # reported by the main thread
                errors.append(e)
            finally:
                a.shutdown(socket.SHUT_WR)

        counter = LoadCounter()

        def receive() -> None:
            try:
                dst.receive_stream(b.fileno(), counter)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=send), threading.Thread(target=receive)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a.close()
        b.close()
        assert errors == []
        assert src.state == MigState.STOP_COPY and dst.state == MigState.STOP
        # The counter ends at exactly the payload the source sent.
        assert counter.value == sent[0] > 1024 * PAGE
        dst.set_state(MigState.RUNNING, MigState.ERROR)
        assert dst.stats().mem_digest == src.stats().mem_digest


def test_a_connection_lost_midway_resets_the_target(saved: tuple[pathlib.Path, int]) -> None:
    path, digest = saved
    blob = path.read_bytes()
    a, b = socket.socketpair()
    with target() as dst:
        a.sendall(blob[: len(blob) // 2])
        a.close()  # the peer is gone
        with pytest.raises(StreamError) as ei:
            dst.receive_stream(b.fileno())
        b.close()
        assert ei.value.errno == errno.ENODATA
        assert dst.get_state() == MigState.RUNNING
        assert dst.stats().reset_calls == 1 and dst.stats().mem_digest != digest
