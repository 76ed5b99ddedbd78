"""Connections made as another uid, for tests of the Unix sockets that check
their callers' kernel credentials (needs root to change uid)."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
from collections.abc import Iterator

from devmig_agent import uds_gate


def connect_as(uid: int, path: str) -> socket.socket:
    """A connection to ``path`` made by a child process running as ``uid``
    and handed back over SCM_RIGHTS: the kernel keeps the child's
    credentials on it (SO_PEERCRED is fixed at connect)."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            parent.close()
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                socket.send_fds(child, [b"x"], [s.fileno()])
        finally:
            os._exit(0)
    child.close()
    with parent:
        _msg, fds, _flags, _addr = socket.recv_fds(parent, 1, 1)
    os.waitpid(pid, 0)
    assert fds, "the child could not connect"
    return socket.socket(fileno=fds[0])


@contextlib.contextmanager
def relayed(conn: socket.socket, sock_dir: str) -> Iterator[str]:
    """A local socket path whose first connection is relayed onto ``conn``
    (gRPC in Python dials its own connections, so a call meant to travel on
    ``conn`` is made to this path)."""
    local = tempfile.mktemp(prefix="relay-", suffix=".sock", dir=sock_dir)
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(local)
    lst.listen(1)

    def relay() -> None:
        c, _ = lst.accept()
        back = threading.Thread(target=uds_gate.pipe, args=(conn, c), daemon=True)
        back.start()
        uds_gate.pipe(c, conn)
        back.join()
        c.close()
        conn.close()

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    try:
        yield local
    finally:
        lst.close()
