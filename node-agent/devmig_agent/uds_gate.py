"""A Unix socket whose callers are checked by their kernel credentials.

gRPC in Python serves Unix sockets but tells a handler nothing about the
peer's uid, so a gRPC service cannot check who called it. The gate owns the
public socket instead: it accepts each connection, reads the peer's
credentials from the kernel (``SO_PEERCRED``, fixed at ``connect()``: the
caller cannot forge them), and relays the connection byte for byte to one of
two gRPC servers listening in a private directory (mode 0700):

- an allowed uid reaches the real service;
- any other uid reaches a server that answers every call with
  ``PERMISSION_DENIED`` and a ``PeerNotAllowed`` reason, so the caller gets a
  gRPC status naming the rule rather than a dropped connection.

Each relayed connection costs two threads, one per direction, for its
lifetime. Node hooks are a handful of short calls per migration; the gate
bounds how many connections it relays at once, so a local process opening
connections in a loop cannot exhaust the agent's threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc

log = logging.getLogger(__name__)

# Connections relayed at once. virt-handler opens one per hook call and a
# node runs a few migrations at a time, each a few calls: 32 is far above
# that, and 64 threads is a small price for a bound.
MAX_CONNECTIONS = 32
# Bytes moved per recv(): hook messages are a VMI's JSON, a few KiB to a few
# hundred KiB; 64 KiB keeps a large one to a few system calls.
CHUNK = 64 * 1024
# Listen backlog: connections the kernel queues before accept() runs.
BACKLOG = 16
# Threads of the refusing server: it only aborts calls.
DENY_WORKERS = 2
REASON = "PeerNotAllowed"


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, from the kernel."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return int(pid), int(uid), int(gid)


class _Deny(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Every method, every call: PERMISSION_DENIED with the rule."""

    def __init__(self, message: str) -> None:
        self._message = message

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        def deny(_request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, self._message)
            raise AssertionError("abort returns only by raising")  # pragma: no cover

        return grpc.unary_unary_rpc_method_handler(deny)


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until src ends, then end dst's sending side."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass  # either side closed: the other direction notices too
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class PeerGate:
    """Serve ``public_path``; relay allowed peers to a gRPC server built by
    ``add_services`` and refuse the others with PERMISSION_DENIED.

    ``allowed_uids`` always includes 0 (root). ``on_refused(pid, uid)`` is
    called for each refused connection (logging and metrics).
    """

    def __init__(
        self,
        public_path: str,
        add_services: Callable[[grpc.Server], object],
        allowed_uids: Iterable[int] = (),
        *,
        max_workers: int = 8,
        on_refused: Callable[[int, int], None] | None = None,
    ) -> None:
        self.public_path = public_path
        self.allowed_uids = frozenset({0, *allowed_uids})
        self._on_refused = on_refused
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._private = ""  # made by start(): mode 0700
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        # Connections holding a slot, and a condition to wait for it to drop.
        self._active = 0
        self._idle = threading.Condition(self._lock)
        self.allowed = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        add_services(self.allowed)
        uids = ", ".join(str(u) for u in sorted(self.allowed_uids))
        self.denied = grpc.server(futures.ThreadPoolExecutor(max_workers=DENY_WORKERS))
        self.denied.add_generic_rpc_handlers(
            (_Deny(f"{REASON}: this socket serves uid {uids} only"),)
        )
        self._allowed_path = self._denied_path = ""
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self, mode: int | None = None) -> None:
        """Start both servers, then listen on the public path with ``mode``
        (the socket's existence is what tells callers it is ready). By
        default the mode the allowed uids call for, the file mode being a
        first fence: 0600 when only root may call, else 0666 and the
        credential check alone decides."""
        if mode is None:
            mode = 0o600 if self.allowed_uids == {0} else 0o666
        self._private = tempfile.mkdtemp(prefix="devmig-gate-")  # mode 0700
        self._allowed_path = os.path.join(self._private, "allowed.sock")
        self._denied_path = os.path.join(self._private, "denied.sock")
        for server, path in ((self.allowed, self._allowed_path), (self.denied, self._denied_path)):
            if server.add_insecure_port(f"unix://{path}") == 0:
                self.stop()
                raise OSError(f"cannot listen on {path}")
            server.start()
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            lst.bind(self.public_path)
            # Who may connect at all is the file mode; who is served is the uid.
            os.chmod(self.public_path, mode)
            lst.listen(BACKLOG)
        except OSError:
            lst.close()
            self.stop()
            raise
        self._listener = lst
        self._thread = threading.Thread(target=self._accept_loop, name="uds-gate", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed by stop()
            if not self._slots.acquire(blocking=False):
                log.warning(
                    "%s: %d connections open, closing a new one", self.public_path, MAX_CONNECTIONS
                )
                conn.close()
                continue
            with self._lock:
                self._active += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            pid, uid, _gid = peer_credentials(conn)
            allowed = uid in self.allowed_uids
            if not allowed:
                log.warning("%s: refused pid %d uid %d", self.public_path, pid, uid)
                if self._on_refused:
                    self._on_refused(pid, uid)
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                up.connect(self._allowed_path if allowed else self._denied_path)
            except OSError as e:
                log.warning("%s: cannot reach the service: %s", self.public_path, e)
                up.close()
                conn.close()
                return
            with self._lock:
                if self._stopping.is_set():
                    up.close()
                    conn.close()
                    return
                self._conns.update((conn, up))
            back = threading.Thread(target=pipe, args=(up, conn), daemon=True)
            back.start()
            pipe(conn, up)
            back.join()
            with self._lock:
                self._conns.difference_update((conn, up))
            up.close()
            conn.close()
        finally:
            self._slots.release()  # before the count drops: a waiter may connect at once
            with self._lock:
                self._active -= 1
                self._idle.notify_all()

    def active_connections(self) -> int:
        """Connections relayed right now (each holds one of MAX_CONNECTIONS)."""
        with self._lock:
            return self._active

    def wait_active_at_most(self, n: int, timeout: float) -> bool:
        """Wait until at most ``n`` connections are relayed; False on timeout.
        A closed caller frees its slot only once both relay directions have
        seen the end, a moment after the caller's close() returns."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active <= n, timeout)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop listening, end relayed connections, stop both servers and
        remove the public socket and the private directory. Returns a set
        event, as ``grpc.Server.stop`` returns one to wait on."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.public_path)
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        for server in (self.allowed, self.denied):
            server.stop(grace).wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._private:
            shutil.rmtree(self._private, ignore_errors=True)
        done = threading.Event()
        done.set()
        return done
