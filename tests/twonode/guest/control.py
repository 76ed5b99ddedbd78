"""The two-node test's hands inside a guest (tests/twonode): runs this
node's devmig agent, plays the VMM for its mtty device, and answers the
host's test over a TCP port the host forwards to (JSON lines, one request,
one reply).

The VMM stand-in does what the VMM contract (devmig_agent/vmm.py) asks of
a hypervisor: it registers for the device on the agent's VMM socket and
keeps the duplicate fd it is handed (SCM_RIGHTS); it acknowledges trap
changes (mtty's BARs are never mmappable, so every access is trapped
anyway) and pauses and resumes its "vCPU", which writes the mtty UARTs
through that fd only while it runs. When the agent goes away it redials
and hands the fd back with the incarnation it was given, as a VMM must so
that a restarted agent can take the device back.

Requests (``op``):

- ``ping``: the node's name and whether the agent runs;
- ``agent_start`` / ``agent_kill``: start the agent, or SIGKILL it;
- ``agent_log``: the tail of the agent's log;
- ``vmm``: the stand-in's view (registered, incarnation, paused, what the
  agent asked of it);
- ``uart_write`` (``port``, ``data`` hex): the vCPU writes those bytes
  into a UART (mtty loops them into its receive FIFO); refused while
  paused;
- ``at_precopy`` (``port``, ``data`` hex, ``hold``): when the agent
  switches traps with the device in PRE_COPY, the vCPU writes those bytes
  first, and with ``hold`` the ack waits for ``release``; ``vmm`` says
  ``holding`` meanwhile;
- ``uart_read`` (``port``): pops the UART's FIFO until its line status
  says empty;
- ``set_clock`` (``unix_ns``): sets the guest's clock;
- ``kernel``: the kernel's taint flags.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from devmig_agent import vmm

CONTROL_PORT = 7000
AGENT_PORT = 50051
DATA_PORT = 50052
VMM_SOCKET = "/run/devmig/vmm.sock"
AGENT_LOG = "/tmp/agent.log"

# VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE ';', VFIO_BASE 100 + 8), and
# struct vfio_region_info {argsz, flags, index, cap_offset: u32; size,
# offset: u64} (include/uapi/linux/vfio.h).
VFIO_DEVICE_GET_REGION_INFO = (ord(";") << 8) | 108
REGION_INFO = struct.Struct("=IIIIQQ")
# 16550 registers mtty emulates: receive buffer at 0, line status at 5,
# whose bit 0 says the receive FIFO holds data. mtty's FIFO holds 16 bytes.
UART_RX, UART_LSR, LSR_DATA_READY, FIFO_BYTES = 0, 5, 0x01, 16


def env() -> dict[str, str]:
    out = {}
    with open("/config/node.env") as f:
        for line in f:
            k, _, v = line.strip().partition("=")
            if k and not k.startswith("#"):
                out[k] = v
    return out


CONF = env()


def log(msg: str) -> None:
    print(f"devmig-control: {msg}", flush=True)


class Agent:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()

    def args(self) -> list[str]:
        a = [
            sys.executable, "-m", "devmig_agent.main",
            "--listen", f"0.0.0.0:{AGENT_PORT}",
            "--data-listen", f"0.0.0.0:{DATA_PORT}",
            "--node-name", CONF["NODE"],
            "--tls-dir", "/config/tls",
            "--advertise-host", CONF["LINK_ADDR"].split("/")[0],
            "--advertise-endpoint", CONF["AGENT_ENDPOINT"],
            "--publish-inventory",
            "--state-dir", "/var/lib/devmig",
            "--vmm-socket", VMM_SOCKET,
            "--vfio-discovery", "on",
            "--recovery-deadline", CONF.get("RECOVERY_DEADLINE", "60"),
        ]  # fmt: skip
        if CONF.get("HOLDER"):
            a += ["--device-holder", f"{CONF['MDEV_UUID']}={CONF['HOLDER']}"]
        return a

    def start(self) -> int:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                return self.proc.pid
            with open(AGENT_LOG, "ab") as out:
                self.proc = subprocess.Popen(
                    self.args(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "KUBECONFIG": "/config/kubeconfig"},
                )
            log(f"agent started, pid {self.proc.pid}")
            return self.proc.pid

    def kill(self) -> bool:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                return False
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            log("agent killed")
            return True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Vmm:
    """The VMM stand-in for this node's one device."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.fd = -1
        self.incarnation = ""
        self.registered = False
        # A node the VM does not run on starts as a migration target's VMM
        # does: vCPUs paused until the agent says resume.
        self.paused = not CONF.get("HOLDER")
        self.events: list[list[Any]] = []  # [what, times]
        self.lock = threading.Lock()
        self.offsets: dict[int, int] = {}
        # Trap changes since the migration began: the second "on" comes
        # with the device in PRE_COPY (StartPreCopy's order, vmm.py).
        self.traps_on = 0
        # What the test armed for that moment: bytes for the vCPU to write
        # (port, data), and whether to hold the ack until ``release``.
        self.at_precopy: list[tuple[int, bytes]] = []
        self.hold = False
        self.holding = threading.Event()
        self.released = threading.Event()
        threading.Thread(target=self.run, daemon=True, name="vmm").start()

    def event(self, what: str) -> None:
        """Record what happened (the caller holds the lock); a repeat of the
        last event is counted, not appended."""
        if self.events and self.events[-1][0] == what:
            self.events[-1][1] += 1
        else:
            self.events.append([what, 1])

    def run(self) -> None:
        while True:
            try:
                self.serve_once()
            except (OSError, ValueError) as e:
                with self.lock:
                    self.event(f"disconnected: {e}")
            with self.lock:
                self.registered = False
            time.sleep(0.2)  # redial: the agent is (re)starting

    def serve_once(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(VMM_SOCKET)
            msg: dict[str, Any] = {"op": "register", "id": 1, "device": self.device}
            if self.fd >= 0:
                # Hand the fd back: the restarted agent re-opens the device
                # from it, its state intact.
                msg.update(incarnation=self.incarnation, fd="vfio")
            vmm.send_line(s, msg, self.fd)
            reader = vmm.LineReader(s, vmm.MAX_REPLY)
            while True:
                m = reader.read()
                fds, reader.fds = reader.fds, []
                if m is None:
                    raise OSError("the agent closed the VMM socket")
                self.handle(s, m, fds)
        finally:
            s.close()

    def handle(self, s: socket.socket, m: dict[str, Any], fds: list[int]) -> None:
        op = m.get("op")
        if op == "registered":
            with self.lock:
                if m.get("fd") == "vfio" and fds:
                    if self.fd >= 0:
                        os.close(self.fd)
                    self.fd = fds.pop(0)
                    self.offsets = {i: region_offset(self.fd, i) for i in (0, 1)}
                self.incarnation = str(m.get("incarnation", ""))
                self.registered = True
                self.event(f"registered fd={m.get('fd')}")
            log(f"VMM registered for {self.device} (fd {m.get('fd')})")
        elif op == "error":
            with self.lock:
                self.event(f"error {m.get('reason')}: {m.get('message')}")
            raise OSError(f"agent refused: {m.get('reason')}")
        elif op in ("traps", "pause", "resume"):
            in_precopy = False
            with self.lock:
                if op == "pause":
                    self.paused = True
                elif op == "resume":
                    self.paused = False
                elif m.get("on"):
                    self.traps_on += 1
                    in_precopy = self.traps_on == 2
                else:
                    self.traps_on = 0
                self.event(op if op != "traps" else f"traps on={m.get('on')}")
                writes, self.at_precopy = (
                    (self.at_precopy, []) if in_precopy else ([], self.at_precopy)
                )
                hold = self.hold and in_precopy
            for port, data in writes:
                self.uart_write(port, data)
                with self.lock:
                    self.event(f"wrote {len(data)} byte(s) to UART {port} in PRE_COPY")
            if hold:
                self.holding.set()
                self.released.wait()
                self.released.clear()
                self.holding.clear()
                with self.lock:
                    self.hold = False
            vmm.send_line(s, {"op": "ack", "id": m.get("id", 0)})
        for fd in fds:
            os.close(fd)

    def uart_write(self, port: int, data: bytes) -> None:
        with self.lock:
            if self.paused:
                raise RuntimeError("Paused: the VM's vCPUs do not run")
            if self.fd < 0:
                raise RuntimeError("NoDevice: the VMM holds no device fd")
            for b in data:
                os.pwrite(self.fd, bytes([b]), self.offsets[port] + UART_RX)

    def uart_read(self, port: int) -> bytes:
        with self.lock:
            if self.fd < 0:
                raise RuntimeError("NoDevice: the VMM holds no device fd")
            out = b""
            for _ in range(FIFO_BYTES + 1):
                lsr = os.pread(self.fd, 1, self.offsets[port] + UART_LSR)[0]
                if not lsr & LSR_DATA_READY:
                    break
                out += os.pread(self.fd, 1, self.offsets[port] + UART_RX)
            return out

    def view(self) -> dict[str, Any]:
        with self.lock:
            return {
                "registered": self.registered,
                "incarnation": self.incarnation,
                "paused": self.paused,
                "has_fd": self.fd >= 0,
                "events": [w if n == 1 else f"{w} (x{n})" for w, n in self.events],
                "holding": self.holding.is_set(),
            }


def region_offset(fd: int, index: int) -> int:
    buf = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
    fcntl.ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, buf)
    return int(REGION_INFO.unpack(buf)[5])


AGENT = Agent()
VMM: Vmm | None = None


def serve(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "ping":
        return {"node": CONF["NODE"], "agent": AGENT.running()}
    if op == "agent_start":
        return {"pid": AGENT.start()}
    if op == "agent_kill":
        return {"killed": AGENT.kill()}
    if op == "agent_log":
        with open(AGENT_LOG, "rb") as f:
            return {"log": f.read()[-int(req.get("bytes", 20000)) :].decode(errors="replace")}
    if op == "set_clock":
        # The host's time, as NTP would give a node: the operator measures
        # downtime from the source's stop and the target's start, stamped
        # by two different clocks.
        time.clock_settime_ns(time.CLOCK_REALTIME, int(req["unix_ns"]))
        return {}
    if op == "kernel":
        with open("/proc/sys/kernel/tainted") as f:
            return {"tainted": int(f.read())}
    assert VMM is not None
    if op == "vmm":
        return VMM.view()
    if op == "uart_write":
        VMM.uart_write(int(req["port"]), bytes.fromhex(req["data"]))
        return {}
    if op == "at_precopy":
        # Arm the moment the device is in PRE_COPY (the agent's second
        # trap change): write bytes then, and/or hold the ack.
        with VMM.lock:
            if req.get("data"):
                VMM.at_precopy.append((int(req["port"]), bytes.fromhex(req["data"])))
            VMM.hold = bool(req.get("hold", False))
        return {}
    if op == "release":
        VMM.released.set()
        return {}
    if op == "uart_read":
        return {"data": VMM.uart_read(int(req["port"])).hex()}
    raise ValueError(f"unknown op {op!r}")


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            try:
                reply = {"ok": True, **serve(json.loads(line))}
            except Exception as e:  # every failure goes back to the test
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    global VMM
    os.makedirs(os.path.dirname(VMM_SOCKET), exist_ok=True)
    AGENT.start()
    # The VMM dials until the agent's socket is there.
    VMM = Vmm(CONF["MDEV_UUID"])
    with contextlib.suppress(KeyboardInterrupt), Server(("0.0.0.0", CONTROL_PORT), Handler) as srv:
        log(f"control on :{CONTROL_PORT}")
        srv.serve_forever()


if __name__ == "__main__":
    main()
