"""The pump from Python: pre-copy rounds while the device runs, then
stop-and-copy; the target's memory equals the source's at the stop."""

from __future__ import annotations

import errno
import hashlib
import hmac
import socket
import threading

import pytest

import devmig_native
from devmig_native import MigState, Pump, SimDevice


def _pair(seed: int) -> tuple[SimDevice, SimDevice]:
    src = SimDevice(mem_size=4 << 20, dirty_pages_per_mib=64, seed=seed, driver="devmig-sim")
    dst = SimDevice(mem_size=4 << 20, seed=seed + 1, driver="devmig-sim")
    return src, dst


def _receive(
    dst: SimDevice,
    sock: socket.socket,
    out: dict[str, object],
    key: bytes | None = None,
    seal: bool = False,
) -> threading.Thread:
    def run() -> None:
        try:
            dst.receive_stream(sock.fileno(), None, key, seal)
            out["ok"] = True
        except devmig_native.StreamError as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def _until_rounds(p: Pump, n: int) -> None:
    # Waits on the pump itself (it ends early only on failure), in short
    # slices, bounded: a broken pump fails the test instead of hanging it.
    for _ in range(2000):
        if p.progress().rounds >= n or p.wait(0.005):
            break
    assert p.progress().rounds >= n, p.progress()


def test_pre_copy_rounds_run_while_the_device_runs_and_stop_copy_finishes() -> None:
    src, dst = _pair(11)
    a, b = socket.socketpair()
    got: dict[str, object] = {}
    dst.set_state(MigState.RESUMING, MigState.RUNNING)
    t = _receive(dst, b, got)
    src.set_state(MigState.PRE_COPY, MigState.RUNNING)
    p = Pump(src, a.fileno(), round_interval_ms=2)
    # Known from the start: the device's whole state is still to send.
    assert p.progress().remaining_bytes >= 4 << 20 or p.progress().rounds > 0
    _until_rounds(p, 3)
    pr = p.progress()
    assert pr.state is MigState.PRE_COPY and pr.stopped_at_ns == 0
    assert pr.bytes_sent >= 4 << 20  # the initial state went out while running
    p.stop_copy()
    assert src.state is MigState.STOP_COPY
    assert p.wait(None)
    sent = p.result()
    assert sent == p.progress().bytes_sent and p.progress().stopped_at_ns > 0
    a.close()
    t.join(30)
    assert got.get("ok") is True, got
    assert dst.state is MigState.STOP
    assert dst.stats().mem_digest == src.stats().mem_digest
    p.close()


def test_a_cancelled_pump_leaves_the_source_to_roll_back_and_the_target_reset() -> None:
    src, dst = _pair(21)
    a, b = socket.socketpair()
    got: dict[str, object] = {}
    dst.set_state(MigState.RESUMING, MigState.RUNNING)
    t = _receive(dst, b, got)
    src.set_state(MigState.PRE_COPY, MigState.RUNNING)
    p = Pump(src, a.fileno(), round_interval_ms=2)
    _until_rounds(p, 1)
    p.cancel()
    a.shutdown(socket.SHUT_RDWR)
    assert p.wait(None)
    with pytest.raises(devmig_native.DevmigError):
        p.result()
    t.join(30)
    assert isinstance(got.get("error"), devmig_native.StreamError)
    assert dst.state is MigState.RUNNING  # reset, never STOP with partial state
    assert src.state is MigState.PRE_COPY
    src.set_state(MigState.RUNNING, MigState.ERROR)
    p.close()


def test_a_pump_needs_a_saving_device() -> None:
    src, _ = _pair(31)
    a, _b = socket.socketpair()
    with pytest.raises(devmig_native.DevmigError) as e:
        Pump(src, a.fileno())
    assert e.value.errno == 22  # EINVAL: RUNNING has no data to pump
    assert src.get_state() is MigState.RUNNING  # the device lock was released


K, J = b"k" * 32, b"j" * 32
needs_aes = pytest.mark.skipif(
    devmig_native.aes_impl() == "none", reason="sealed streams need AES-NI, which this CPU lacks"
)


@pytest.mark.parametrize(
    ("send_key", "send_seal", "receive_key", "receive_seal", "ok"),
    [
        (K, False, K, False, True),
        (K, False, J, False, False),  # another session's key
        (K, False, None, False, False),  # a keyed stream to a receiver without a key
        (None, False, K, False, False),  # a SHA-256 stream to a receiver that needs the MAC
        pytest.param(K, True, K, True, True, marks=needs_aes),
        pytest.param(K, True, J, True, False, marks=needs_aes),  # sealed under another key
        pytest.param(K, False, K, True, False, marks=needs_aes),  # MAC only, to a sealed receiver
        pytest.param(K, True, K, False, False, marks=needs_aes),  # sealed, to a MAC receiver
        pytest.param(K, True, None, False, False, marks=needs_aes),  # sealed, to no key at all
    ],
)
def test_a_keyed_stream_loads_only_under_its_own_key_and_kind(
    send_key: bytes | None,
    send_seal: bool,
    receive_key: bytes | None,
    receive_seal: bool,
    ok: bool,
) -> None:
    src, dst = _pair(31)
    a, b = socket.socketpair()
    got: dict[str, object] = {}
    dst.set_state(MigState.RESUMING, MigState.RUNNING)
    t = _receive(dst, b, got, receive_key, receive_seal)
    src.set_state(MigState.STOP_COPY, MigState.RUNNING)
    p = Pump(src, a.fileno(), mac_key=send_key, seal=send_seal)
    for _ in range(600):  # 30 s at most
        if p.wait(0.05):
            break
        if not t.is_alive():
            b.close()  # as the agent's sink does: a refusing target hangs up
    assert p.wait(0)
    a.close()  # the end of the stream, for a target still reading
    t.join(30)
    p.close()
    if ok:
        assert got.get("ok") is True, got
        assert dst.stats().mem_digest == src.stats().mem_digest
        return
    err = got.get("error")
    assert isinstance(err, devmig_native.StreamError), got
    assert err.errno == errno.EBADMSG
    # Refused, and reset: the target never holds the source's state.
    assert dst.state is MigState.RUNNING and dst.stats().reset_calls >= 1
    assert dst.stats().mem_digest != src.stats().mem_digest


def test_a_key_of_the_wrong_length_is_refused_before_anything_starts() -> None:
    src, _ = _pair(41)
    src.set_state(MigState.STOP_COPY, MigState.RUNNING)
    a, _b = socket.socketpair()
    with pytest.raises(ValueError, match="mac_key: 32 bytes"):
        Pump(src, a.fileno(), mac_key=b"short")


def _capture(dev: SimDevice, key: bytes | None, seal: bool) -> bytes:
    """The whole stream a pump writes for ``dev`` (in STOP_COPY)."""
    a, b = socket.socketpair()
    chunks: list[bytes] = []

    def read() -> None:
        while data := b.recv(1 << 20):
            chunks.append(data)

    t = threading.Thread(target=read)
    t.start()
    p = Pump(dev, a.fileno(), mac_key=key, seal=seal)
    assert p.wait(30)
    p.result()
    p.close()
    a.close()
    t.join(30)
    b.close()
    return b"".join(chunks)


def _payload(stream: bytes) -> bytes:
    """The DATA frames' payload of a stream (header 96 bytes; frames of a
    20-byte header: type, length, sequence, CRC32C)."""
    out, at = [], 96
    while at < len(stream):
        kind = int.from_bytes(stream[at : at + 4], "little")
        n = int.from_bytes(stream[at + 4 : at + 8], "little")
        if kind == 1:
            out.append(stream[at + 20 : at + 20 + n])
        at += 20 + n
    return b"".join(out)


@needs_aes
def test_a_sealed_stream_carries_the_payload_encrypted_under_the_documented_key() -> None:
    # Two devices of the same seed hold the same state: one streams with the
    # MAC only, the other sealed.
    plain_dev, sealed_dev = (SimDevice(mem_size=1 << 20, seed=7, driver="devmig-sim") for _ in "ab")
    for d in (plain_dev, sealed_dev):
        d.set_state(MigState.STOP_COPY, MigState.RUNNING)
    plain = _capture(plain_dev, K, seal=False)
    sealed = _capture(sealed_dev, K, seal=True)
    assert int.from_bytes(sealed[56:58], "little") == 3  # the header says sealed
    clear, cipher = _payload(plain), _payload(sealed)
    assert len(clear) == len(cipher) >= 1 << 20
    assert clear[:4096] not in sealed and cipher != clear
    # stream.c: the cipher key is HMAC-SHA-256(key, "devmig stream enc v1" ||
    # nonce), the counter blocks a zero IV and the block index.
    nonce = sealed[60:76]
    ck = hmac.new(K, b"devmig stream enc v1" + nonce, hashlib.sha256).digest()
    assert devmig_native.aes256_ctr(ck, bytes(8), 0, cipher) == clear
