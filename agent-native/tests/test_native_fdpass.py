"""The SCM_RIGHTS handoff across two real processes: the receiver gets the
same open file, both keep working on it, and the sender's copy lives on
after the receiver closes its own."""

from __future__ import annotations

import errno
import os
import socket

import pytest

import devmig_native as dn


def test_a_child_process_receives_the_same_open_file_and_both_use_it() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mfd = os.memfd_create("devmig-fdpass")
    pid = os.fork()
    if pid == 0:  # the "VMM": takes the fd, writes through it, exits
        try:
            parent.close()
            got = dn.recv_fd(child.fileno())
            assert got is not None
            fd, kind, name = got
            ok = kind is dn.FdKind.VFIO_DEVICE and name == "0000:3b:00.1"
            os.pwrite(fd, b"from the vmm", 0)
            os.close(fd)
            os._exit(0 if ok else 3)
        except BaseException:
            os._exit(2)
    child.close()
    dn.send_fd(parent.fileno(), mfd, dn.FdKind.VFIO_DEVICE, "0000:3b:00.1")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child's write landed in our file, and our fd is still good.
    assert os.pread(mfd, 12, 0) == b"from the vmm"
    os.pwrite(mfd, b"agent", 0)
    assert os.pread(mfd, 5, 0) == b"agent"
    os.close(mfd)
    parent.close()


def test_a_message_without_an_fd_is_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.send(b"DMFD\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    with pytest.raises(OSError) as e:
        dn.recv_fd(b.fileno())
    assert e.value.errno == errno.EPROTO
    a.close()
    assert dn.recv_fd(b.fileno()) is None  # then the peer's close
    b.close()
