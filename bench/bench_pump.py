"""The native pump over loopback TCP against a plain kernel copy of the same bytes.

Figures (payload bytes per second, see docs/benchmarks.md):

pump_stop_copy_loopback
    A simulated device of 1 GiB in STOP_COPY pumped by the native pump into a
    second simulated device in RESUMING (``Device.receive_stream``) over a
    loopback TCP connection; the target's memory digest must equal the
    source's.
pump_pre_copy_loopback
    The same from PRE_COPY with a running workload: a few pre-copy rounds,
    then stop-and-copy. The time and CPU the stop-and-copy request itself
    takes (the simulated device builds its final data then, device work and
    no part of the data path) are left out.

Baseline, in the same run (the issue's figure): a plain C socket copy of the
same number of bytes between the same kinds of endpoints (bench/rawcopy.c):
read() from a memfd into a 1 MiB buffer, send() over loopback TCP, recv()
into a buffer, write() into a second memfd reserved beforehand. A second
reference is reported beside it: ``os.sendfile`` from a memfd into the
socket, received by Python into one reused buffer and dropped.

Each repeat measures the pump and both baselines back to back and takes
their ratios; the figure is the median ratio over the repeats. This machine
is a VM whose freed guest memory goes back to the host, so a run that lands
on pages the host must fault in again is slower for a while; pairing each
pump run with its own baselines keeps that noise out of the ratio.

Timing runs from the pump's start to its end (every byte handed to the
socket; at most a socket buffer is then still in flight, under 1% of 1 GiB).
The device's own work before (building the saving data) and after (checking
and installing the resumed data) is outside the timed part. CPU time is the
whole process's (both ends), per GiB of payload.

    uv run --no-sync python bench/bench_pump.py [--mib N] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import threading
import time
from collections.abc import Callable

import rawcopy

from devmig_native import MigState, Pump, SimDevice

GIB = 1 << 30


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


def _baseline(nbytes: int) -> tuple[float, float]:
    """(bytes/s, CPU s) for nbytes via sendfile from a memfd into loopback TCP."""
    mfd = os.memfd_create("bench-baseline")
    try:
        os.ftruncate(mfd, nbytes)
        # Real pages, not holes: write a pattern once, outside the timing.
        chunk = bytes(range(256)) * 4096
        off = 0
        while off < nbytes:
            off += os.pwrite(mfd, chunk[: min(len(chunk), nbytes - off)], off)
        a, b = _tcp_pair()
        got = [0]

        def sink() -> None:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            n = 0
            while True:
                k = b.recv_into(view)
                if not k:
                    break
                n += k
            got[0] = n

        t = threading.Thread(target=sink)
        c0, t0 = _cpu(), time.perf_counter()
        t.start()
        off = 0
        while off < nbytes:
            off += os.sendfile(a.fileno(), mfd, off, nbytes - off)
        a.shutdown(socket.SHUT_WR)
        t.join()
        dt, dc = time.perf_counter() - t0, _cpu() - c0
        a.close()
        b.close()
        assert got[0] == nbytes, (got[0], nbytes)
        return nbytes / dt, dc
    finally:
        os.close(mfd)


# The stream key the agents use (any 32 bytes: the figure is the MAC's
# cost, not the key's).
KEY = bytes(range(32))


def _receiver(
    dst: SimDevice, sock: socket.socket, out: dict[str, object], key: bytes | None
) -> threading.Thread:
    def run() -> None:
        try:
            dst.receive_stream(sock.fileno(), None, key)
            out["ok"] = True
        except Exception as e:  # reported by the caller
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def _pump(mem: int, pre_copy: bool, key: bytes | None = KEY) -> tuple[int, float, float]:
    """(payload bytes, timed seconds, CPU s) for one verified migration;
    keyed as between agents, or with ``key`` None the SHA-256 trailer."""
    src = SimDevice(
        mem_size=mem, dirty_pages_per_mib=16 if pre_copy else 0, seed=1, driver="devmig-sim"
    )
    dst = SimDevice(mem_size=mem, seed=2, driver="devmig-sim")
    for d in (src, dst):
        d.set_log(lambda _line: None)
    a, b = _tcp_pair()
    got: dict[str, object] = {}
    dst.set_state(MigState.RESUMING, MigState.RUNNING)
    src.set_state(MigState.PRE_COPY if pre_copy else MigState.STOP_COPY, MigState.RUNNING)
    t = _receiver(dst, b, got, key)
    stop_s = stop_cpu = 0.0
    c0, t0 = _cpu(), time.perf_counter()
    p = Pump(src, a.fileno(), round_interval_ms=1, mac_key=key)
    if pre_copy:
        while p.progress().rounds < 3 and not p.wait(0.001):
            pass
        s0, sc0 = time.perf_counter(), _cpu()
        p.stop_copy()
        stop_s, stop_cpu = time.perf_counter() - s0, _cpu() - sc0
    p.wait(None)
    dt, dc = time.perf_counter() - t0 - stop_s, _cpu() - c0 - stop_cpu
    sent = p.result()
    p.close()
    a.shutdown(socket.SHUT_WR)
    t.join()
    a.close()
    b.close()
    assert got.get("ok") is True, got
    assert dst.state is MigState.STOP
    assert dst.stats().mem_digest == src.stats().mem_digest, "target memory differs"
    src.close()
    dst.close()
    return sent, dt, dc


def _figure(
    name: str, run: Callable[[], tuple[int, float, float]], repeat: int
) -> dict[str, object]:
    rates, cpus, raw_rates, raw_cpus, sf_rates, ratios, sf_ratios = [], [], [], [], [], [], []
    for _ in range(repeat):
        n, dt, dc = run()
        rate = n / dt
        raw, raw_cpu = rawcopy.measure(n)
        sf, _ = _baseline(n)
        rates.append(rate)
        cpus.append(dc * GIB / n)
        raw_rates.append(raw)
        raw_cpus.append(raw_cpu * GIB / n)
        sf_rates.append(sf)
        ratios.append(rate / raw)
        sf_ratios.append(rate / sf)
    med = statistics.median
    return {
        "name": name,
        "value": round(med(rates)),
        "baseline": round(med(raw_rates)),
        "unit": "B/s",
        "ratio": round(med(ratios), 3),
        "cpu_s_per_gib": round(med(cpus), 3),
        "baseline_cpu_s_per_gib": round(med(raw_cpus), 3),
        "sendfile_baseline": round(med(sf_rates)),
        "sendfile_ratio": round(med(sf_ratios), 3),
        "repeats": repeat,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="simulated device memory, MiB")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the median counts")
    args = ap.parse_args()
    mem = args.mib << 20
    figs = [
        _figure("pump_stop_copy_loopback", lambda: _pump(mem, False), args.repeat),
        _figure("pump_pre_copy_loopback", lambda: _pump(mem, True), args.repeat),
        # For reference, no goal: the unkeyed SHA-256 trailer (files).
        _figure("pump_stop_copy_loopback_sha256", lambda: _pump(mem, False, None), args.repeat),
    ]
    for f in figs:
        print(json.dumps(f))


if __name__ == "__main__":
    main()
