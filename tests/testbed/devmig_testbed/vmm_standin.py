"""A VMM stand-in for tests: speaks the agent's VMM socket protocol, holds
the device fd it is given, and runs a "vCPU" thread that keeps using the
device, as a real VMM must:

- It maps exactly the BAR areas the agent last called mappable and sends
  every other access through the trap path; it acknowledges a ``traps``
  change only once the vCPU has seen it (two passes of its loop, or
  parked), and a pause only once the vCPU is parked.
- ``hammer``: the vCPU's accesses go to the simulated device's BAR over the
  socket (``bar``), each marked mapped or trapped by the areas it has
  mapped at that moment, and they program the device's DMA into guest
  memory, so a trap switch that lets a mapped access through shows up in
  the device's missed-trap count. Without ``hammer`` the vCPU writes the
  device's memory (``SimDevice.touch``) while passthrough is on.
- The memory migration: ``copy_guest`` reads the whole guest memory,
  ``copy_dirty`` pulls the pages the device dirtied since the last pull
  and re-reads them; the copy must equal the guest's memory at the end.

``keep_mappings`` makes it a broken VMM that acknowledges trap changes
without unmapping anything.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import queue
import socket
import threading
from typing import Any

import devmig_native
from devmig_agent import vmm
from devmig_native import SimDevice

# The simulated BAR (see include/devmig/sim.h): region 0, 4 KiB pages.
BAR_PAGE = 4096
DMA_PAGE = SimDevice.BAR_DMA_ADDR // BAR_PAGE
# Guest memory reads per request, bytes (the agent's MAX_GUEST_READ).
GUEST_CHUNK = vmm.MAX_GUEST_READ


class VmmStandIn:
    def __init__(
        self,
        path: str,
        device_id: str,
        sim: SimDevice | None = None,
        *,
        start_paused: bool = False,
        refuse_traps: bool = False,
        never_ack: bool = False,
        hammer: bool = False,
        keep_mappings: bool = False,
        iova_ranges: list[list[int]] | None = None,
    ) -> None:
        self.sim = sim
        self.refuse_traps = refuse_traps
        self.never_ack = never_ack
        self.hammer = hammer
        self.keep_mappings = keep_mappings
        self.device_id = device_id
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = vmm.LineReader(self.sock, vmm.MAX_REPLY)
        reg: dict[str, Any] = {"op": "register", "id": 1, "device": device_id}
        if iova_ranges is not None:
            reg["iova_ranges"] = iova_ranges
        vmm.send_line(self.sock, reg)
        self.registration = self.reader.read() or {}
        self.fd = self.reader.fds.pop() if self.reader.fds else -1
        self._cond = threading.Condition()
        self._want_traps = False
        # What the vCPU reaches directly: (region, offset, size). At start,
        # the whole BAR as a freshly started guest maps it.
        self._mapped: list[tuple[int, int, int]] = [(0, BAR_PAGE, 15 * BAR_PAGE)]
        self._paused = start_paused
        self._parked = False
        self._seen = 0  # vCPU loop passes since a change was asked
        self._stop = False
        self.direct = 0
        self.trapped = 0
        self.direct_by_page: dict[int, int] = {}
        self.dma_programmed = 0
        self.requests: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        # Our own requests: id -> (event, reply).
        self._ids = itertools.count(1000)
        self._calls: dict[int, list[Any]] = {}
        self._calls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._work: queue.Queue[dict[str, Any] | None] = queue.Queue()
        # The guest memory the device's DMA writes: its size from the
        # device object in this process, or asked of the agent (``sim``)
        # when the device lives in another process (the demo).
        self.memory = bytearray(sim.guest_size if sim is not None else self._ask_guest_size())
        self._vcpu = threading.Thread(target=self._run_vcpu, daemon=True, name="vcpu")
        self._reader = threading.Thread(target=self._read, daemon=True, name="vmm-reader")
        self._worker = threading.Thread(target=self._serve_agent, daemon=True, name="vmm-worker")
        self._vcpu.start()
        self._reader.start()
        self._worker.start()

    # -------------------------------------------------------------- vCPU

    def _is_mapped(self, offset: int) -> bool:
        return any(r == 0 and o <= offset < o + n for r, o, n in self._mapped)

    def _run_vcpu(self) -> None:
        for n in itertools.count():
            with self._cond:
                while self._paused and not self._stop:
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait()
                self._parked = False
                if self._stop:
                    return
                self._seen += 1
                self._cond.notify_all()
                if self.hammer:
                    # One guest "instruction" at a time, each deciding from
                    # the mappings as they are now.
                    self._cond.release()
                    try:
                        self._hammer_once(n)
                    finally:
                        self._cond.acquire()
                    continue
                trapped = self._want_traps
                if trapped:
                    self.trapped += 1
            if not trapped:
                if self.sim is not None:
                    self.sim.touch(n % 16)
                with self._cond:
                    self.direct += 1
                    self._cond.notify_all()

    def _access(self, offset: int, value: int) -> None:
        with self._cond:
            mapped = self._is_mapped(offset)
        try:
            self.call(
                {"op": "bar", "offset": offset, "write": True, "value": value, "mapped": mapped}
            )
        except ConnectionError:
            return  # the agent went away; the guest carries on
        with self._cond:
            if mapped:
                self.direct += 1
                page = offset // BAR_PAGE
                self.direct_by_page[page] = self.direct_by_page.get(page, 0) + 1
            else:
                self.trapped += 1
            self._cond.notify_all()

    def _hammer_once(self, n: int) -> None:
        if n % 2:
            self._access(SimDevice.BAR_SCRATCH, n)
            return
        # Program one DMA into a guest page that moves around memory.
        pages = max(len(self.memory) // BAR_PAGE, 1)
        page = (n * 7919) % pages
        self._access(SimDevice.BAR_DMA_ADDR, page * BAR_PAGE)
        self._access(SimDevice.BAR_DMA_LEN, BAR_PAGE)
        self._access(SimDevice.BAR_DMA_GO, 1)
        with self._cond:
            self.dma_programmed += 1

    def wait_direct(self, n: int, timeout_s: float = 10, page: int | None = None) -> bool:
        """Until the vCPU made ``n`` more direct accesses (to BAR ``page``)."""

        def count() -> int:
            return self.direct if page is None else self.direct_by_page.get(page, 0)

        with self._cond:
            want = count() + n
            return self._cond.wait_for(lambda: count() >= want, timeout_s)

    def counts(self) -> tuple[int, int]:
        with self._cond:
            return self.direct, self.trapped

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused and self._parked

    @property
    def traps_on(self) -> bool:
        with self._cond:
            return self._want_traps

    @property
    def mapped(self) -> list[tuple[int, int, int]]:
        with self._cond:
            return list(self._mapped)

    def _ask_guest_size(self) -> int:
        """Before the threads start, so the reply is read here."""
        vmm.send_line(self.sock, {"op": "sim", "id": 2, "device": self.device_id})
        reply = self.reader.read() or {}
        return int(reply.get("guest_size", 0))

    def sim_info(self) -> dict[str, Any]:
        """The simulated device's guest size, memory digest and missed-trap
        count, from the agent."""
        return self.call({"op": "sim"})

    # -------------------------------------------------- memory migration

    def guest(self, offset: int, length: int) -> bytes:
        r = self.call({"op": "guest", "offset": offset, "length": length})
        return base64.b64decode(r["data"])

    def copy_guest(self) -> None:
        """The first pass: every guest page."""
        for off in range(0, len(self.memory), GUEST_CHUNK):
            n = min(GUEST_CHUNK, len(self.memory) - off)
            self.memory[off : off + n] = self.guest(off, n)

    def copy_dirty(self) -> tuple[int, bool]:
        """Pull the dirty pages and copy them: (pages copied, final)."""
        r = self.call({"op": "dirty"})
        npages, page_size, bitmap = devmig_native.bitmap_decode(base64.b64decode(r["bitmap"]))
        assert page_size == r["page_size"] == BAR_PAGE and npages == r["npages"]
        copied = 0
        for first, count in devmig_native.bitmap_ranges(bitmap, npages):
            for p in range(first, first + count, GUEST_CHUNK // BAR_PAGE):
                n = min(GUEST_CHUNK // BAR_PAGE, first + count - p) * BAR_PAGE
                self.memory[p * BAR_PAGE : p * BAR_PAGE + n] = self.guest(p * BAR_PAGE, n)
            copied += count
        return copied, bool(r["final"])

    # -------------------------------------------------------- the socket

    def call(self, msg: dict[str, Any], timeout_s: float = 30) -> dict[str, Any]:
        """One request of ours; its reply (``error`` raises)."""
        rid = next(self._ids)
        slot: list[Any] = [threading.Event(), None]
        with self._calls_lock:
            self._calls[rid] = slot
        try:
            self._send({"device": self.device_id, **msg, "id": rid})
            if not slot[0].wait(timeout_s) or slot[1] is None:
                raise ConnectionError(f"no answer to {msg['op']}")
        finally:
            with self._calls_lock:
                self._calls.pop(rid, None)
        reply: dict[str, Any] = slot[1]
        if reply.get("op") == "error":
            raise RuntimeError(f"{reply.get('reason')}: {reply.get('message')}")
        return reply

    def reattach(self, path: str, kind: str) -> dict[str, Any]:
        """After the agent restarted: register again, handing the fd back
        as ``kind``; keeps serving requests on the new connection."""
        old = self.sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        reader = vmm.LineReader(sock, vmm.MAX_REPLY)
        msg = {
            "op": "register",
            "id": 2,
            "device": self.device_id,
            "incarnation": self.registration["incarnation"],
            "fd": kind,
        }
        vmm.send_line(sock, msg, self.fd)
        reply = reader.read() or {}
        self._reader.join(10)  # the old connection's reader has seen its end
        old.close()
        self.sock, self.reader = sock, reader
        self._reader = threading.Thread(target=self._read, daemon=True, name="vmm-reader")
        self._reader.start()
        return reply

    def _read(self) -> None:
        reader = self.reader
        while True:
            try:
                msg = reader.read()
            except (OSError, ValueError):
                msg = None
            if msg is None:
                with self._calls_lock:
                    for waiting in self._calls.values():
                        waiting[0].set()  # reply None: gone
                return
            op = msg.get("op")
            if op in ("traps", "pause", "resume"):
                self.requests.append(msg)
                if not self.never_ack:
                    self._work.put(msg)
                continue
            with self._calls_lock:
                slot = self._calls.get(int(msg.get("id", -1)))
            if slot is None:
                self.errors.append(msg)
                continue
            slot[1] = msg
            slot[0].set()

    def _serve_agent(self) -> None:
        """The agent's requests, in order, off the reader thread (the vCPU
        may be waiting for a reply the reader has to deliver)."""
        while (msg := self._work.get()) is not None:
            op, rid = msg.get("op"), msg.get("id")
            if op == "traps":
                if self.refuse_traps:
                    self._send({"op": "nack", "id": rid, "reason": "CannotUnmap", "message": "no"})
                    continue
                with self._cond:
                    self._want_traps = bool(msg.get("on"))
                    if not self.keep_mappings:
                        self._mapped = [
                            (a["region"], a["offset"], a["size"]) for a in msg.get("mappable", [])
                        ]
                    self._seen = 0
                    # Two passes of the loop: one may have read the old
                    # mappings just before the change.
                    self._cond.wait_for(lambda: self._parked or self._seen >= 2 or self._stop)
            elif op == "pause":
                with self._cond:
                    self._paused = True
                    self._cond.wait_for(lambda: self._parked or self._stop)
            elif op == "resume":
                with self._cond:
                    self._paused = False
                    self._cond.notify_all()
            with contextlib.suppress(OSError):
                self._send({"op": "ack", "id": rid})

    def _send(self, msg: dict[str, Any]) -> None:
        with self._send_lock:
            vmm.send_line(self.sock, msg)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._vcpu.join(10)
        # shutdown wakes the reader blocked in recvmsg; close alone does not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(10)
        self._work.put(None)
        self._worker.join(10)
        self.sock.close()
