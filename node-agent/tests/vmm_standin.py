"""A VMM stand-in for tests: speaks the agent's VMM socket protocol, holds
the device fd it is given, and runs a "vCPU" thread that keeps accessing
the device's BAR: directly (``SimDevice.touch``, the guest writing device
memory) while passthrough is on, through the trap path while traps are on.
It acknowledges a trap change only once the vCPU has seen it, and a pause
only once the vCPU is parked, as a real VMM must.

A trapped access is counted here instead of being forwarded as a region
write: the native core holds a device's lock while its pump runs, so a
forwarded access would wait for the pump, which says nothing about traps.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from devmig_agent import vmm
from devmig_native import SimDevice


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
    ) -> None:
        self.sim = sim
        self.refuse_traps = refuse_traps
        self.never_ack = never_ack
        self.device_id = device_id
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = vmm.LineReader(self.sock)
        vmm.send_line(self.sock, {"op": "register", "id": 1, "device": device_id})
        self.registration = self.reader.read() or {}
        self.fd = self.reader.fds.pop() if self.reader.fds else -1
        self._cond = threading.Condition()
        self._want_traps = False
        self._paused = start_paused
        self._parked = False
        self._seen = 0  # vCPU loop passes since a change was asked
        self._stop = False
        self.direct = 0
        self.trapped = 0
        self.requests: list[dict[str, Any]] = []
        self._vcpu = threading.Thread(target=self._run_vcpu, daemon=True, name="vcpu")
        self._reader = threading.Thread(target=self._read, daemon=True, name="vmm-reader")
        self._vcpu.start()
        self._reader.start()

    # -------------------------------------------------------------- vCPU

    def _run_vcpu(self) -> None:
        page = 0
        while True:
            with self._cond:
                while self._paused and not self._stop:
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait()
                self._parked = False
                if self._stop:
                    return
                trapped = self._want_traps
                self._seen += 1
                self._cond.notify_all()
                if trapped:
                    self.trapped += 1
            if not trapped:
                if self.sim is not None:
                    self.sim.touch(page % 16)
                with self._cond:
                    self.direct += 1
                    self._cond.notify_all()
            page += 1

    def wait_direct(self, n: int, timeout_s: float = 10) -> bool:
        """Until the vCPU made ``n`` more direct accesses."""
        with self._cond:
            want = self.direct + n
            return self._cond.wait_for(lambda: self.direct >= want, timeout_s)

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

    # -------------------------------------------------------- the socket

    def reattach(self, path: str, kind: str) -> dict[str, Any]:
        """After the agent restarted: register again, handing the fd back
        as ``kind``; keeps serving requests on the new connection."""
        old = self.sock
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = vmm.LineReader(self.sock)
        msg = {
            "op": "register",
            "id": 2,
            "device": self.device_id,
            "incarnation": self.registration["incarnation"],
            "fd": kind,
        }
        vmm.send_line(self.sock, msg, self.fd)
        reply = self.reader.read() or {}
        self._reader.join(10)  # the old connection's reader has seen its end
        old.close()
        self._reader = threading.Thread(target=self._read, daemon=True, name="vmm-reader")
        self._reader.start()
        return reply

    def _read(self) -> None:
        while True:
            try:
                msg = self.reader.read()
            except OSError:
                return
            if msg is None:
                return
            self.requests.append(msg)
            if self.never_ack:
                continue
            op, rid = msg.get("op"), msg.get("id")
            if op == "traps":
                if self.refuse_traps:
                    self._send({"op": "nack", "id": rid, "reason": "CannotUnmap", "message": "no"})
                    continue
                with self._cond:
                    self._want_traps = bool(msg.get("on"))
                    self._seen = 0
                    # Two passes of the loop: one may have read the old mode
                    # just before the change.
                    self._cond.wait_for(lambda: self._parked or self._seen >= 2)
            elif op == "pause":
                with self._cond:
                    self._paused = True
                    self._cond.wait_for(lambda: self._parked)
            elif op == "resume":
                with self._cond:
                    self._paused = False
                    self._cond.notify_all()
            self._send({"op": "ack", "id": rid})

    def _send(self, msg: dict[str, Any]) -> None:
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
        self.sock.close()
