"""The VMM contract over a real Unix socket: registration hands the VMM a
device fd (a memfd placeholder for a simulated device), only root or the
configured uid is served, StartPreCopy returns only after the VMM trapped
the BARs, the VMM is paused before stop-and-copy and resumed on the target
after the commit point, and a rollback gives passthrough back."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import local_agent
import pytest

import devmig_native
from devmig_agent import datapath, devices, tracking, vmm
from devmig_agent import main as agent_main
from devmig_agent.sessions import Phase, SessionError, SessionManager
from devmig_native import MigState
from devmig_testbed.vmm_standin import VmmStandIn

SID, TOKEN = "dm-v-0", "vmm-token"


@dataclass
class Node:
    name: str
    registry: devices.DeviceRegistry
    hub: vmm.VmmHub
    manager: SessionManager
    data: datapath.DataPath

    @property
    def device(self) -> devices.ManagedDevice:
        return self.registry.get(f"sim-{self.name}-0")

    def standin(self, **kw: bool) -> VmmStandIn:
        return VmmStandIn(self.hub.path, self.device.id, self.device.handle, **kw)  # type: ignore[arg-type]


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; tmp_path can exceed it.
    d = tempfile.mkdtemp(prefix="dm-vmm-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start(name: str, state: pathlib.Path, sock_dir: str, ack_timeout_s: float = 30) -> Node:
    reg = devices.simulated(name, devices.SimSpec(count=1, size=1 << 20, dirty=16))
    hub = vmm.VmmHub(f"{sock_dir}/{name}/vmm.sock", reg, ack_timeout_s=ack_timeout_s)
    manager, dp = local_agent.wire(reg, state / name, vmm=hub)
    return Node(name, reg, hub, manager, dp)


@pytest.fixture
def nodes(tmp_path: pathlib.Path, sock_dir: str) -> Iterator[tuple[Node, Node]]:
    a, b = start("a", tmp_path, sock_dir), start("b", tmp_path, sock_dir)
    yield a, b
    for n in (a, b):
        n.hub.close()
        n.data.shutdown()


def test_a_registered_vmm_holds_a_placeholder_fd_for_a_simulated_device(
    nodes: tuple[Node, Node],
) -> None:
    a, _ = nodes
    v = a.standin()
    try:
        r = v.registration
        assert (r["v"], r["op"], r["device"], r["fd"]) == (
            1,
            "registered",
            "sim-a-0",
            "placeholder",
        )
        assert r["incarnation"] == a.device.incarnation
        assert os.readlink(f"/proc/self/fd/{v.fd}").startswith("/memfd:devmig-sim:sim-a-0")
        assert a.hub.registered("sim-a-0")
    finally:
        v.close()
        os.close(v.fd)


def test_bad_registrations_get_typed_errors(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    for msg, reason in (
        ({"op": "register", "id": 1, "device": "nope"}, "UnknownDevice"),
        ({"op": "dance", "id": 2}, "UnknownOp"),
    ):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(a.hub.path)
            vmm.send_line(s, msg)
            reply = vmm.LineReader(s).read()
            assert reply is not None and reply["reason"] == reason
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(a.hub.path)
        s.sendall(b'{"v": 2, "op": "register", "id": 1}\n')
        r = vmm.LineReader(s)
        reply = r.read()
        assert reply is not None and reply["reason"] == "UnsupportedVersion"
        assert r.read() is None  # and closed


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def _register_as(uid: int, path: str, device: str) -> bytes:
    """A child process that drops to ``uid``, registers for ``device`` on
    the VMM socket at ``path`` and reports the agent's first line."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(path)
                vmm.send_line(s, {"op": "register", "id": 1, "device": device})
                os.write(w, s.makefile("rb").readline())
        except BaseException as e:  # shown in the caller's assertion, not lost
            os.write(w, f"child failed: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        reply = f.read()
    os.waitpid(pid, 0)
    return reply


def test_a_peer_that_is_neither_root_nor_the_allowed_uid_is_refused(
    nodes: tuple[Node, Node],
) -> None:
    a, _ = nodes
    for p in (
        a.hub.path,
        os.path.dirname(a.hub.path),
        os.path.dirname(os.path.dirname(a.hub.path)),
    ):
        os.chmod(p, 0o777)  # let the stranger reach the SO_PEERCRED check
    reply = _register_as(65534, a.hub.path, "sim-a-0")  # a stranger: nobody
    assert b'"reason":"PermissionDenied"' in reply, reply
    assert not a.hub.registered("sim-a-0")


def test_the_vmm_traps_before_pre_copy_pauses_before_stop_copy_and_resumes_on_the_target(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    src, dst = a.standin(), b.standin(start_paused=True)
    try:
        assert src.wait_direct(10)  # the guest uses its device
        a.manager.prepare_source(SID, TOKEN, a.device.id, 0)
        endpoint = b.manager.prepare_target(SID, TOKEN, b.device.id).data_endpoint
        a.manager.start_pre_copy(SID, TOKEN, endpoint)
        # StartPreCopy returned: the VMM had trapped; no direct access since.
        assert src.traps_on
        direct, _ = src.counts()
        a.manager.stop_and_copy(SID, TOKEN, [])
        assert src.paused
        assert src.counts()[0] == direct
        frozen = src.counts()
        for snap in b.manager.watch(SID, TOKEN, 10, lambda: True):
            if snap.phase is Phase.TRANSFERRED:
                break
        b.manager.resume(SID, TOKEN)
        assert dst.paused  # the device runs; the guest waits for the commit
        b.manager.finish(SID, TOKEN)
        assert not dst.paused and dst.wait_direct(10)  # the guest runs on the target
        assert src.counts() == frozen  # the source guest never ran again
        assert [r["op"] for r in src.requests] == ["traps", "traps", "pause"]
        assert [r["op"] for r in dst.requests] == ["resume"]
    finally:
        src.close()
        dst.close()


def test_a_rollback_gives_passthrough_back_and_resumes_the_source_vmm(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    src = a.standin()
    try:
        a.manager.prepare_source(SID, TOKEN, a.device.id, 0)
        endpoint = b.manager.prepare_target(SID, TOKEN, b.device.id).data_endpoint
        a.manager.start_pre_copy(SID, TOKEN, endpoint)
        a.manager.stop_and_copy(SID, TOKEN, [])
        assert src.paused
        a.manager.abort(SID, TOKEN, "operator")
        assert a.device.handle.state is MigState.RUNNING
        assert not src.traps_on and not src.paused
        assert [r["op"] for r in src.requests] == ["traps", "traps", "pause", "traps", "resume"]
        assert src.requests[3]["on"] is False
    finally:
        src.close()


def test_a_vmm_that_refuses_traps_keeps_the_device_running_untouched(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    src = a.standin(refuse_traps=True)
    try:
        a.manager.prepare_source(SID, TOKEN, a.device.id, 0)
        endpoint = b.manager.prepare_target(SID, TOKEN, b.device.id).data_endpoint
        with pytest.raises(SessionError) as e:
            a.manager.start_pre_copy(SID, TOKEN, endpoint)
        assert e.value.reason == "CannotUnmap"
        assert a.device.handle.state is MigState.RUNNING
        assert a.manager.get(SID, TOKEN).phase is Phase.PREPARED
    finally:
        src.close()


def test_a_vmm_that_never_acknowledges_fails_pre_copy_after_the_timeout(
    tmp_path: pathlib.Path, sock_dir: str
) -> None:
    a, b = start("a", tmp_path, sock_dir, ack_timeout_s=0.2), start("b", tmp_path, sock_dir)
    src = a.standin(never_ack=True)
    try:
        a.manager.prepare_source(SID, TOKEN, a.device.id, 0)
        endpoint = b.manager.prepare_target(SID, TOKEN, b.device.id).data_endpoint
        with pytest.raises(SessionError) as e:
            a.manager.start_pre_copy(SID, TOKEN, endpoint)
        assert e.value.reason == "VmmAckTimeout"
        assert a.device.handle.state is MigState.RUNNING
    finally:
        src.close()
        for n in (a, b):
            n.hub.close()
            n.data.shutdown()


def test_without_a_registered_vmm_pre_copy_does_not_wait(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    a.manager.prepare_source(SID, TOKEN, a.device.id, 0)
    endpoint = b.manager.prepare_target(SID, TOKEN, b.device.id).data_endpoint
    assert a.manager.start_pre_copy(SID, TOKEN, endpoint).phase is Phase.PRE_COPY


def test_a_restarted_agent_takes_the_device_back_from_its_vmm_and_rolls_back_from_there(
    tmp_path: pathlib.Path, sock_dir: str
) -> None:
    a, b = start("a", tmp_path, sock_dir), start("b", tmp_path, sock_dir)
    src = a.standin()
    kept = a.device  # what the VMM's fd keeps alive on a real node
    try:
        a.manager.prepare_source(SID, TOKEN, kept.id, 0)
        endpoint = b.manager.prepare_target(SID, TOKEN, b.device.id).data_endpoint
        a.manager.start_pre_copy(SID, TOKEN, endpoint)
        # The agent dies: its pump and sockets go, the journal stays.
        for s in list(a.manager._sessions.values()):
            a.data.close(s)
        a.data.shutdown()
        a.hub.close()
        # A new process: devices opened afresh (new incarnations), a new hub.
        fresh = start("a", tmp_path, sock_dir)
        assert fresh.device.incarnation != kept.incarnation
        opened: list[int] = []

        def open_device(fd: int) -> devmig_native.Device:
            # A real node re-opens the VFIO device from the fd; the stand-in's
            # fd is a memfd, so this hands back the device object it stands for.
            opened.append(fd)
            os.close(fd)
            return kept.handle

        reply = src.reattach(fresh.hub.path, "vfio")
        assert (reply["op"], reply["fd"]) == ("registered", "kept")
        reacquirer = vmm.VmmReacquirer(fresh.hub, fresh.registry, open_device=open_device)
        (found,) = fresh.manager.recover(reacquirer)
        assert opened and found.phase is Phase.PRE_COPY and found.device_state == "PRE_COPY"
        assert fresh.device.handle is kept.handle
        assert fresh.device.incarnation == kept.incarnation
        # The operator rolls back: device RUNNING, the VMM untrapped.
        fresh.manager.abort(SID, TOKEN, "operator")
        assert kept.handle.state is MigState.RUNNING
        assert not src.traps_on
        fresh.hub.close()
        fresh.data.shutdown()
    finally:
        src.close()
        b.hub.close()
        b.data.shutdown()


def test_a_placeholder_handed_back_means_the_simulated_device_was_reset(
    tmp_path: pathlib.Path, sock_dir: str
) -> None:
    a, b = start("a", tmp_path, sock_dir), start("b", tmp_path, sock_dir)
    src = a.standin()
    try:
        a.manager.prepare_source(SID, TOKEN, a.device.id, 0)
        endpoint = b.manager.prepare_target(SID, TOKEN, b.device.id).data_endpoint
        a.manager.start_pre_copy(SID, TOKEN, endpoint)
        for s in list(a.manager._sessions.values()):
            a.data.close(s)
        a.data.shutdown()
        a.hub.close()
        fresh = start("a", tmp_path, sock_dir)
        src.reattach(fresh.hub.path, "placeholder")
        reacquirer = vmm.VmmReacquirer(fresh.hub, fresh.registry, wait_s=10)
        (found,) = fresh.manager.recover(reacquirer)
        assert (found.phase, found.reason) == (Phase.FAILED, "DeviceReset")
        fresh.hub.close()
        fresh.data.shutdown()
    finally:
        src.close()
        b.hub.close()
        b.data.shutdown()


def test_the_allowed_uid_owns_the_socket_and_may_register(sock_dir: str) -> None:
    reg = devices.simulated("q", devices.SimSpec(count=1, size=1 << 20))
    qemu = 107  # virt-launcher's qemu user, the chart's agent.vmmUid
    hub = vmm.VmmHub(f"{sock_dir}/q/vmm.sock", reg, allowed_uid=qemu)
    try:
        st = os.stat(hub.path)
        assert (st.st_uid, st.st_mode & 0o777) == (qemu, 0o660)
        os.chmod(sock_dir, 0o755)  # mkdtemp's 0700 would stop any non-root peer
        reply = _register_as(qemu, hub.path, "sim-q-0")  # the hypervisor, as qemu
        assert b'"op":"registered"' in reply, reply
    finally:
        hub.close()


def test_a_devices_re_evaluate_hint_reaches_its_vmm_as_what_is_mappable_now(
    nodes: tuple[Node, Node],
) -> None:
    a, _ = nodes
    src = a.standin()
    stop = threading.Event()
    watcher = threading.Thread(
        target=agent_main.watch_reevaluate_hints, args=(a.registry, a.manager, stop), daemon=True
    )
    watcher.start()
    try:
        handle = a.device.handle
        assert isinstance(handle, devmig_native.SimDevice)
        before = len(src.requests)
        # The device signals on its own (no state change, no session): the
        # VMM hears what RUNNING allows, passthrough on.
        os.write(handle.reeval_eventfd(), (1).to_bytes(8, "little"))
        deadline = time.monotonic() + 10
        while len(src.requests) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        (msg,) = src.requests[before:]
        assert (msg["op"], msg["on"]) == ("traps", False)
        assert msg["mappable"] == [x.to_wire() for x in tracking.mappable_areas(handle)]
    finally:
        stop.set()
        watcher.join(5)
        src.close()
