"""The VMM contract: a node-local Unix socket where a hypervisor (VMM)
registers for a device, receives a duplicate of its fd, and does what the
migration needs of it: trap BAR accesses, pause and resume its vCPUs.

Protocol, version 1: JSON lines (one UTF-8 JSON object per ``\\n``-ended
line, at most ``MAX_LINE`` bytes), every message carrying ``"v": 1``.
A message with another ``v`` is answered ``error UnsupportedVersion`` and
the connection closed, so a later version can be told apart.

VMM -> agent::

    {"v":1, "op":"register", "id":1, "device":"0000:3b:00.1",
     "iova_ranges":[[0, 8589934592]]}
    {"v":1, "op":"ack", "id":7}
    {"v":1, "op":"nack", "id":7, "reason":"CannotUnmap", "message":"..."}
    {"v":1, "op":"dirty", "id":2, "device":"..."}
    {"v":1, "op":"bar", "id":3, "device":"...", "offset":4112, "write":true,
     "value":1, "mapped":false}          (simulated devices only)
    {"v":1, "op":"guest", "id":4, "device":"...", "offset":0, "length":4096}
                                         (simulated devices only)
    {"v":1, "op":"sim", "id":5, "device":"..."}  (simulated devices only)

agent -> VMM::

    {"v":1, "op":"registered", "id":1, "device":"...", "incarnation":"9f..",
     "fd":"vfio"}                 + the device fd (SCM_RIGHTS, on this line)
    {"v":1, "op":"error", "id":1, "reason":"UnknownDevice", "message":"..."}
    {"v":1, "op":"traps", "id":7, "device":"...", "on":true,
     "mappable":[{"region":0, "offset":8192, "size":57344}]}
    {"v":1, "op":"pause", "id":8, "device":"..."}
    {"v":1, "op":"resume", "id":9, "device":"..."}
    {"v":1, "op":"dirty", "id":2, "device":"...", "page_size":4096,
     "npages":262144, "bitmap":"<base64 DMDB>", "final":false}
    {"v":1, "op":"bar", "id":3, "device":"...", "value":0}
    {"v":1, "op":"guest", "id":4, "device":"...", "offset":0, "data":"<base64>"}
    {"v":1, "op":"sim", "id":5, "device":"...", "guest_size":1048576,
     "mem_digest":123, "missed_traps":0}

Ids: the VMM numbers its requests, the agent numbers its own; replies carry
the id of the request they answer. Every agent request must be answered
``ack`` (done) or ``nack`` (refused, with a CamelCase reason). ``ack`` means:

- ``traps``: from the ack on, no vCPU reaches any BAR area outside
  ``mappable`` through a direct mapping (unmapped, every vCPU past the
  change); accesses there exit to the VMM and reach the device through
  region reads and writes. Areas in ``mappable`` may be mapped (again).
  ``on`` says whether the device is migrating. StartPreCopy sends two:
  ``on`` with nothing mappable before the device leaves RUNNING, then,
  once the device is in PRE_COPY and its sparse-mmap capability was
  re-read, ``on`` with what the device allows now; it returns after the
  second ack. After a rollback (device RUNNING again, capability re-read):
  ``on:false`` with what RUNNING allows. A VMM that ignores ``mappable``
  and keeps everything trapped while ``on`` is correct, only slower.
- ``pause``: no vCPU runs (sent before STOP_COPY). ``resume``: they run
  again (on the target after the commit point; on the source after a
  rollback).

``dirty`` (the memory migration's pull, on the source): the guest pages
the device's DMA wrote since this device's previous pull (the first pull:
since pre-copy began), as devmig's DMDB bitmap encoding (see
agent-native/include/devmig/bitmap.h; ``devmig_native.bitmap_decode``).
``final`` is true once the device stopped (STOP_COPY and after): it writes
no guest memory after that, so a final pull holds the last pages. After a
migration succeeded, its source's last pages can still be pulled, once
(``final``), until the device's next migration: the commit may come
before the VMM's final pull. The
pages come from the device's DMA logging over the ``iova_ranges`` given at
registration (at most ``MAX_IOVA_RANGES``) and, on a simulated device,
also from its trap-based logging. Errors: ``NotMigrating``,
``NoDirtySource``.

``bar``, ``guest`` and ``sim`` exist because a simulated device lives
inside the agent: they are a vCPU's 8-byte BAR access (``mapped``: through the VMM's
mapping, which the device checks against what it requires trapped, and
counts as a missed trap when it bypasses one) and a read of the guest
memory its DMA writes (at most ``MAX_GUEST_READ`` bytes); ``sim`` reports
the size of that memory, a digest of the device's own memory and its
missed-trap count, so a VMM in another process can check a migration end
to end. A real device's VMM uses its fd and its own memory instead
(``NotSimulated``).

Agent -> VMM lines may be up to ``MAX_REPLY`` bytes (a dirty bitmap of a
large guest); VMM -> agent lines up to ``MAX_LINE``.

``fd``: ``"vfio"`` is a duplicate of the device's VFIO fd. A simulated
device lives in the agent and has no fd, so it sends ``"placeholder"``
with an fd of an empty memfd named ``devmig-sim:<device id>``: the VMM
holds it as it would a real one, and holding it keeps nothing alive.

Who may connect: the peer's uid (SO_PEERCRED) must be 0 or the configured
``allowed_uid``; others get ``error PermissionDenied`` and are closed.

Handing the fd back: a device's state lives while some process holds its
fd, so the VMM's duplicate outlives an agent crash. When the agent's socket
comes back, the VMM registers again with the ``incarnation`` it was given
and its fd attached (``"fd":"vfio"``, or ``"placeholder"`` for a simulated
device)::

    {"v":1, "op":"register", "id":1, "device":"...", "incarnation":"9f..",
     "fd":"vfio"}                 + the VMM's device fd (SCM_RIGHTS)

and is answered ``registered`` with ``"fd":"kept"`` (no new fd: it keeps
its own). The restarted agent re-opens the device from that fd
(``VmmReacquirer``) and reads its state from the device. A placeholder
carries no device: a simulated device's state died with the old agent.

"""

from __future__ import annotations

import array
import base64
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import devmig_native
from devmig_agent.devices import DeviceRegistry, ManagedDevice, UnknownDevice
from devmig_agent.inventory import MIGRATION_FLAGS, InventoryDevice
from devmig_agent.sessions import Code, SessionError, VmmError
from devmig_agent.tracking import Area

log = logging.getLogger(__name__)

VERSION = 1
# The longest line either side accepts, bytes: messages are a few hundred
# bytes; 64 KiB leaves room for later fields and bounds a hostile peer.
MAX_LINE = 64 * 1024
# The longest agent -> VMM line, bytes: a dirty reply's DMDB encoding is at
# most about one bit per guest page, 4/3 larger in base64; 64 MiB covers a
# 1.5 TiB guest all dirty.
MAX_REPLY = 64 << 20
# Guest IOVA ranges one registration may give: what the kernel's DMA
# logging accepts in one start (a 4 KiB page of 16-byte ranges).
MAX_IOVA_RANGES = 256
# The largest ``guest`` read, bytes: 16 pages keep a reply well under
# MAX_LINE-sized buffers on either side.
MAX_GUEST_READ = 64 * 1024
# How long the agent waits for a VMM's ack, seconds. Trapping means
# unmapping BARs and kicking every vCPU out of the guest once, and pausing
# means stopping them: milliseconds for a healthy VMM. 10 s tells a hung
# VMM from a busy one without holding a migration step for long.
ACK_TIMEOUT_S = 10.0
# How long a restarting agent waits for VMMs to hand their device fds back,
# seconds, for all devices together: a VMM notices the agent's socket went
# away and redials within a second or two; 15 s rides out a slow node
# without delaying the agent's start by much.
RECLAIM_WAIT_S = 15.0

FdFor = Callable[[ManagedDevice], tuple[int, str]]
# The manager's VMM pull: device id -> (page_size, npages, bitmap, final).
DirtySource = Callable[[str], tuple[int, int, bytes, bool]]
OpenDevice = Callable[[int], devmig_native.Device]


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def send_line(conn: socket.socket, msg: dict[str, Any], fd: int = -1) -> None:
    data = json.dumps({"v": VERSION, **msg}, separators=(",", ":")).encode() + b"\n"
    if fd < 0:
        conn.sendall(data)
        return
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    sent = conn.sendmsg([data], anc)
    if sent < len(data):
        conn.sendall(data[sent:])


class LineReader:
    """JSON lines from a socket, with the fds that came along (SCM_RIGHTS)."""

    def __init__(self, conn: socket.socket, max_line: int = MAX_LINE) -> None:
        self.conn = conn
        self.max_line = max_line
        self.buf = bytearray()
        self.fds: list[int] = []

    def read(self) -> dict[str, Any] | None:
        """The next message, or None at the end of the connection."""
        scanned = 0  # bytes of buf known to hold no newline
        while (end := self.buf.find(b"\n", scanned)) < 0:
            scanned = len(self.buf)
            if scanned > self.max_line:
                raise ValueError("line too long")
            fds = array.array("i")
            data, anc, _flags, _addr = self.conn.recvmsg(
                MAX_LINE, socket.CMSG_LEN(4 * fds.itemsize)
            )
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            self.fds.extend(fds)
            if not data:
                return None
            self.buf += data
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("a message is a JSON object")
        return msg


def _iova_ranges(raw: Any) -> list[tuple[int, int]]:
    """A registration's ``iova_ranges``: [[iova, length], ...], page-aligned,
    non-empty, not overlapping, at most MAX_IOVA_RANGES."""
    if not isinstance(raw, list) or len(raw) > MAX_IOVA_RANGES:
        raise ValueError(f"iova_ranges: a list of at most {MAX_IOVA_RANGES} [iova, length]")
    out: list[tuple[int, int]] = []
    for r in raw:
        if (
            not isinstance(r, list)
            or len(r) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        ):
            raise ValueError(f"iova_ranges: {r!r} is not [iova, length]")
        iova, length = r
        if iova < 0 or length <= 0 or iova % 4096 or length % 4096 or iova + length > 1 << 64:
            raise ValueError(f"iova_ranges: [{iova}, {length}] is not a 4 KiB-aligned range")
        out.append((iova, length))
    out.sort()
    for (a, la), (b, _) in itertools.pairwise(out):
        if a + la > b:
            raise ValueError(f"iova_ranges: [{a}, {la}] overlaps the range at {b}")
    return out


def placeholder_fd(device: ManagedDevice) -> tuple[int, str]:
    """What a simulated device hands out instead of a VFIO fd."""
    return os.memfd_create(f"devmig-sim:{device.id}", os.MFD_CLOEXEC), "placeholder"


def device_fd(device: ManagedDevice) -> tuple[int, str]:
    """A duplicate of a real device's VFIO fd; a placeholder for a
    simulated one."""
    if device.vfio is not None:
        return os.dup(device.vfio.device_fd), "vfio"
    return placeholder_fd(device)


@dataclasses.dataclass
class _Pending:
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None


class _Conn:
    def __init__(self, hub: VmmHub, sock: socket.socket) -> None:
        self.hub = hub
        self.sock = sock
        self.send_lock = threading.Lock()
        self.devices: set[str] = set()
        self.pending: dict[int, _Pending] = {}
        self.closed = False

    def send(self, msg: dict[str, Any], fd: int = -1) -> None:
        with self.send_lock:
            send_line(self.sock, msg, fd)


class VmmHub:
    """Serves the VMM socket; a ``sessions.VmmControl`` for the manager."""

    def __init__(
        self,
        path: str,
        registry: DeviceRegistry,
        *,
        allowed_uid: int | None = None,
        fd_for: FdFor = device_fd,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        dirty_source: DirtySource | None = None,
    ) -> None:
        self.path = path
        self.registry = registry
        self.allowed_uid = allowed_uid
        self.fd_for = fd_for
        self.ack_timeout_s = ack_timeout_s
        # Set once the session manager exists (it takes the hub).
        self.dirty_source = dirty_source
        self._lock = threading.Lock()
        self._by_device: dict[str, _Conn] = {}
        # Guest IOVA ranges each device's VMM registered, for DMA logging.
        self._ranges: dict[str, list[tuple[int, int]]] = {}
        self._next_id = 0
        # Fds VMMs handed back after a restart: device -> (incarnation, kind, fd).
        self._returned: dict[str, tuple[str, str, int]] = {}
        self._returned_cond = threading.Condition(self._lock)
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        # Owner and group may connect; SO_PEERCRED decides who is served.
        # The allowed uid (virt-launcher's qemu) owns the socket so that it
        # can connect at all; root connects whatever the mode.
        os.chmod(path, 0o660)
        if allowed_uid is not None:
            os.chown(path, allowed_uid, -1)
        self._listener.listen()
        self._stopping = False
        threading.Thread(target=self._accept_loop, daemon=True, name="vmm-accept").start()

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = set(self._by_device.values())
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)

    def registered(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._by_device

    # -------------------------------------------------------------- serving

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True, name="vmm").start()

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(self, sock)
        try:
            uid = peer_uid(sock)
            if uid != 0 and uid != self.allowed_uid:
                conn.send(
                    {
                        "op": "error",
                        "id": 0,
                        "reason": "PermissionDenied",
                        "message": f"uid {uid} may not drive devices",
                    }
                )
                return
            reader = LineReader(sock)
            while True:
                msg = reader.read()
                fds, reader.fds = reader.fds, []
                if msg is None:
                    for fd in fds:
                        os.close(fd)
                    return
                if msg.get("v") != VERSION:
                    conn.send(
                        {
                            "op": "error",
                            "id": msg.get("id", 0),
                            "reason": "UnsupportedVersion",
                            "message": f"this agent speaks v{VERSION}",
                        }
                    )
                    return
                self._handle(conn, msg, fds)
        except (OSError, ValueError) as e:
            log.warning("VMM connection ended: %s", e)
        finally:
            self._drop(conn)
            sock.close()

    def _handle(self, conn: _Conn, msg: dict[str, Any], fds: list[int]) -> None:
        # Only a re-registration may carry an fd, and only one.
        handed_back = -1
        if msg.get("op") == "register" and msg.get("incarnation") and fds:
            handed_back = fds.pop(0)
        for fd in fds:
            os.close(fd)
        try:
            self._handle_message(conn, msg, handed_back)
        except BaseException:
            if handed_back >= 0:
                os.close(handed_back)
            raise

    def _handle_message(self, conn: _Conn, msg: dict[str, Any], handed_back: int) -> None:
        op = msg.get("op")
        if op in ("ack", "nack"):
            with self._lock:
                p = conn.pending.get(int(msg.get("id", -1)))
            if p is not None:
                p.reply = msg
                p.done.set()
            return
        if op in ("bar", "guest", "sim", "dirty"):
            self._serve_request(conn, msg)
            return
        if op != "register":
            conn.send(
                {
                    "op": "error",
                    "id": msg.get("id", 0),
                    "reason": "UnknownOp",
                    "message": f"unknown op {op!r}",
                }
            )
            return
        device_id = str(msg.get("device", ""))
        try:
            ranges = _iova_ranges(msg.get("iova_ranges", []))
        except ValueError as e:
            conn.send(
                {
                    "op": "error",
                    "id": msg.get("id", 0),
                    "reason": "BadIovaRanges",
                    "message": str(e),
                }
            )
            return
        dev: ManagedDevice | None
        try:
            dev = self.registry.get(device_id)
        except UnknownDevice as e:
            dev = None
            # A restarted agent may not have the device open (its VMM held
            # it, so discovery found it in use): the hand-back is what lets
            # the agent open it again.
            if handed_back < 0 or self.registry.found(device_id) is None:
                conn.send(
                    {
                        "op": "error",
                        "id": msg.get("id", 0),
                        "reason": "UnknownDevice",
                        "message": str(e),
                    }
                )
                return
        with self._lock:
            other = self._by_device.get(device_id)
            if other is not None and other is not conn:
                busy = True
            else:
                busy = False
                self._by_device[device_id] = conn
                conn.devices.add(device_id)
                self._ranges[device_id] = ranges
        if busy:
            if handed_back >= 0:
                os.close(handed_back)
            conn.send(
                {
                    "op": "error",
                    "id": msg.get("id", 0),
                    "reason": "DeviceBusy",
                    "message": f"another VMM registered for {device_id}",
                }
            )
            return
        if handed_back >= 0:
            with self._lock:
                prev = self._returned.pop(device_id, None)
                self._returned[device_id] = (
                    str(msg["incarnation"]),
                    str(msg.get("fd", "")),
                    handed_back,
                )
                self._returned_cond.notify_all()
            if prev is not None:
                os.close(prev[2])
            # The fd is the hub's now; a VMM gone before the answer changes
            # nothing about it.
            with contextlib.suppress(OSError):
                conn.send(
                    {
                        "op": "registered",
                        "id": msg.get("id", 0),
                        "device": device_id,
                        "incarnation": str(msg["incarnation"]),
                        "fd": "kept",
                    }
                )
            log.info("VMM handed %s back (incarnation %s)", device_id, msg["incarnation"])
            return
        assert dev is not None  # only a hand-back registers an unopened device
        fd, kind = self.fd_for(dev)
        try:
            conn.send(
                {
                    "op": "registered",
                    "id": msg.get("id", 0),
                    "device": device_id,
                    "incarnation": dev.incarnation,
                    "fd": kind,
                },
                fd,
            )
        finally:
            os.close(fd)  # the VMM has its own duplicate now
        log.info("VMM registered for %s", device_id)

    def _serve_request(self, conn: _Conn, msg: dict[str, Any]) -> None:
        """A VMM's own request, for a device it registered. ``dirty`` takes
        the session manager's lock, which a migration step holds while it
        waits for this very connection's ack: it runs on its own thread so
        this reader keeps reading."""
        rid, op, device_id = msg.get("id", 0), str(msg.get("op")), str(msg.get("device", ""))

        def fail(reason: str, message: str) -> None:
            with contextlib.suppress(OSError):
                conn.send({"op": "error", "id": rid, "reason": reason, "message": message})

        with self._lock:
            mine = device_id in conn.devices and self._by_device.get(device_id) is conn
        if not mine:
            fail("NotRegistered", f"this connection did not register {device_id!r}")
            return
        if op == "dirty":
            threading.Thread(
                target=self._serve_dirty, args=(conn, rid, device_id), daemon=True, name="vmm-dirty"
            ).start()
            return
        try:
            handle = self.registry.get(device_id).handle
        except UnknownDevice as e:
            fail("UnknownDevice", str(e))
            return
        if not isinstance(handle, devmig_native.SimDevice):
            fail("NotSimulated", f"{op} is for simulated devices; use the device fd")
            return
        try:
            if op == "bar":
                offset = int(msg.get("offset", -1))
                if msg.get("write"):
                    handle.bar_write(offset, int(msg.get("value", 0)), bool(msg.get("mapped")))
                    value = 0
                else:
                    value = handle.bar_read(offset, bool(msg.get("mapped")))
                reply: dict[str, Any] = {
                    "op": "bar",
                    "id": rid,
                    "device": device_id,
                    "value": value,
                }
            elif op == "sim":
                stats = handle.stats()
                reply = {
                    "op": "sim",
                    "id": rid,
                    "device": device_id,
                    "guest_size": handle.guest_size,
                    "mem_digest": stats.mem_digest,
                    "missed_traps": stats.missed_traps,
                }
            else:
                offset, length = int(msg.get("offset", -1)), int(msg.get("length", -1))
                if offset < 0 or not 0 < length <= MAX_GUEST_READ:
                    raise ValueError(f"offset >= 0 and 0 < length <= {MAX_GUEST_READ}")
                data = handle.guest_read(offset, length)
                reply = {
                    "op": "guest",
                    "id": rid,
                    "device": device_id,
                    "offset": offset,
                    "data": base64.b64encode(data).decode(),
                }
        except (OSError, ValueError, TypeError, OverflowError) as e:
            fail("BadAccess", str(e))
            return
        conn.send(reply)

    def _serve_dirty(self, conn: _Conn, rid: Any, device_id: str) -> None:
        try:
            if self.dirty_source is None:
                raise SessionError(Code.FAILED_PRECONDITION, "NotMigrating", "no sessions here")
            page_size, npages, bitmap, final = self.dirty_source(device_id)
            reply: dict[str, Any] = {
                "op": "dirty",
                "id": rid,
                "device": device_id,
                "page_size": page_size,
                "npages": npages,
                "bitmap": base64.b64encode(
                    devmig_native.bitmap_encode(bitmap, npages, page_size)
                ).decode(),
                "final": final,
            }
        except SessionError as e:
            reply = {"op": "error", "id": rid, "reason": e.reason, "message": e.message}
        with contextlib.suppress(OSError):
            conn.send(reply)

    def _drop(self, conn: _Conn) -> None:
        with self._lock:
            conn.closed = True
            for d in conn.devices:
                if self._by_device.get(d) is conn:
                    del self._by_device[d]
                    self._ranges.pop(d, None)
            pending = list(conn.pending.values())
        for p in pending:
            p.done.set()  # reply None: the VMM is gone

    # ------------------------------------------------------ VmmControl

    def _request(self, device_id: str, op: str, **fields: Any) -> None:
        with self._lock:
            conn = self._by_device.get(device_id)
            if conn is None:
                return  # no VMM for this device: nothing to tell
            self._next_id += 1
            rid = self._next_id
            p = conn.pending[rid] = _Pending()
        try:
            try:
                conn.send({"op": op, "id": rid, "device": device_id, **fields})
            except OSError as e:
                raise VmmError("VmmGone", f"the VMM of {device_id} is gone: {e}") from e
            if not p.done.wait(self.ack_timeout_s):
                raise VmmError(
                    "VmmAckTimeout",
                    f"the VMM of {device_id} did not acknowledge {op} "
                    f"within {self.ack_timeout_s:g} s",
                )
            if p.reply is None:
                raise VmmError("VmmGone", f"the VMM of {device_id} disconnected during {op}")
            if p.reply.get("op") != "ack":
                raise VmmError(
                    str(p.reply.get("reason") or "VmmRefused"),
                    str(p.reply.get("message") or f"the VMM refused {op}"),
                )
        finally:
            with self._lock:
                conn.pending.pop(rid, None)

    def traps(self, device_id: str, on: bool, mappable: list[Area]) -> None:
        self._request(device_id, "traps", on=on, mappable=[a.to_wire() for a in mappable])

    def dma_ranges(self, device_id: str) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._ranges.get(device_id, []))

    def pause(self, device_id: str) -> None:
        self._request(device_id, "pause")

    def resume(self, device_id: str) -> None:
        self._request(device_id, "resume")

    # ------------------------------------------------- after a restart

    def take_back(
        self, device_id: str, incarnation: str | None, until: float
    ) -> tuple[str, str, int] | None:
        """The fd a VMM handed back for this incarnation of the device (any
        incarnation for None), as (incarnation, kind, fd); waits until
        ``until`` (time.monotonic) for it. The caller owns the fd."""
        with self._lock:
            while True:
                got = self._returned.get(device_id)
                if got is not None and incarnation in (None, got[0]):
                    del self._returned[device_id]
                    return got
                left = until - time.monotonic()
                if left <= 0:
                    return None
                self._returned_cond.wait(left)

    def handed_back(self) -> list[str]:
        """Devices whose fd a VMM handed back and nobody took yet."""
        with self._lock:
            return sorted(self._returned)


class VmmReacquirer:
    """``sessions.DeviceReacquirer`` for real devices: a device kept its
    state exactly when a VMM hands back an fd of the journaled incarnation;
    the device is re-opened from that fd (``open_device``, by default the
    native core's ``Device.open_vfio``) and replaces the registry's entry.
    Without a hand-back in time, the registry's own device is checked
    (``RegistryReacquirer``: it matches only if this process opened it)."""

    def __init__(
        self,
        hub: VmmHub,
        registry: DeviceRegistry,
        *,
        open_device: OpenDevice = devmig_native.Device.open_vfio,
        wait_s: float = RECLAIM_WAIT_S,
    ) -> None:
        self.hub = hub
        self.registry = registry
        self.open_device = open_device
        self.until = time.monotonic() + wait_s

    def reacquire(self, device_id: str, incarnation: str) -> ManagedDevice | None:
        try:
            dev = self.registry.get(device_id)
        except UnknownDevice:
            # Not open in this process: discovery found it in use (its VMM
            # holds it), so only a hand-back can bring it.
            found = self.registry.found(device_id)
            if found is None:
                return None
            current = found
        else:
            if incarnation and dev.incarnation == incarnation:
                return dev
            current = dev.info
        got = self.hub.take_back(device_id, incarnation, self.until)
        if got is None:
            return None
        return self._open(device_id, current, *got)

    def adopt_handed_back(self) -> list[str]:
        """Open the devices VMMs handed back that no session claimed (the
        agent restarted while they were idle), so they can migrate again;
        returns their ids. Their state lives on: same incarnation."""
        out = []
        for device_id in self.hub.handed_back():
            if device_id in self.registry.ids():
                continue
            info = self.registry.found(device_id)
            got = self.hub.take_back(device_id, None, 0.0)
            if info is None or got is None:
                if got is not None:
                    os.close(got[2])
                continue
            if self._open(device_id, info, *got) is not None:
                out.append(device_id)
        return out

    def _open(
        self, device_id: str, info: InventoryDevice, incarnation: str, kind: str, fd: int
    ) -> ManagedDevice | None:
        if kind != "vfio":
            os.close(fd)  # a placeholder: nothing of the device lives in it
            return None
        try:
            handle = self.open_device(fd)
        except OSError as e:
            os.close(fd)
            log.error("cannot re-open %s from the VMM's fd: %s", device_id, e)
            return None
        # The VMM's fd is the agent's own reference now (open_device took a
        # duplicate): the one a VMM registering afresh is handed a copy of.
        vfio = devmig_native.VfioHandle(device_fd=fd)
        if not info.migratable:
            info = _probed(info, handle)
        dev = ManagedDevice(info, handle, incarnation=incarnation, vfio=vfio)
        if device_id in self.registry.ids():
            self.registry.replace(dev)
        else:
            self.registry.add(dev)
        log.info("re-opened %s from the fd its VMM handed back", device_id)
        return dev


def _probed(info: InventoryDevice, handle: devmig_native.Device) -> InventoryDevice:
    """A found-in-use device's entry, completed from the device itself."""
    try:
        flags = handle.probe()
    except OSError as e:
        log.warning("probe of %s: %s", info.id, e)
        return info
    names = tuple(f.name for f in devmig_native.MigFlags if f.name and flags & f)
    ok = bool(flags & devmig_native.MigFlags.STOP_COPY)
    return dataclasses.replace(
        info,
        migration_flags=tuple(x for x in names if x in MIGRATION_FLAGS),
        migratable=ok,
        not_migratable_reason="" if ok else "NoStopCopy: the device cannot save its state",
        health="Healthy",
    )
