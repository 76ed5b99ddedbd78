"""The founding problem, end to end through the agents' APIs: two agents on
loopback migrate a 256 MiB simulated device whose state keeps changing,
while the source VMM's vCPU hammers the device's BAR and programs DMA into
guest memory the whole time, until the guest is paused for stop-and-copy.

What must hold: the target's device memory equals the source's at stop;
StartPreCopy returns with the DMA registers unmapped in the VMM, so the
hammering vCPU records no missed trap; and the guest memory the VMM copies
using the pages the agent exports (device DMA logging and trap logging)
equals the guest's memory at the end: no dirty page lost. A VMM that
acknowledges trap changes without unmapping is caught: the device counts
the accesses that bypassed its traps and the session reports them.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import local_agent
import pytest

import devmig_native
from devmig.agent.v1alpha1 import agent_pb2 as pb
from devmig.agent.v1alpha1 import agent_pb2_grpc
from devmig_agent import datapath, devices, server, vmm
from devmig_testbed.vmm_standin import DMA_PAGE, VmmStandIn

# The device state the issue names, bytes.
STATE_SIZE = 256 << 20
REF = pb.SessionRef(session_id="dm-load-0", token="load-token")


@dataclass
class Node:
    name: str
    registry: devices.DeviceRegistry
    hub: vmm.VmmHub
    stub: agent_pb2_grpc.NodeAgentStub
    grpc_server: grpc.Server
    data: datapath.DataPath

    @property
    def device(self) -> devices.ManagedDevice:
        return self.registry.get(f"sim-{self.name}-0")

    @property
    def sim(self) -> devmig_native.SimDevice:
        h = self.device.handle
        assert isinstance(h, devmig_native.SimDevice)
        return h

    def close(self) -> None:
        self.grpc_server.stop(None)
        self.hub.close()
        self.data.shutdown()


def start(name: str, state: pathlib.Path, sock_dir: str, size: int) -> Node:
    # 16 pages per MiB between pre-copy rounds: 4096 pages (16 MiB) of the
    # 256 MiB re-sent each round, so pre-copy iterates and converges.
    reg = devices.simulated(name, devices.SimSpec(count=1, size=size, dirty=16))
    hub = vmm.VmmHub(f"{sock_dir}/{name}.sock", reg)
    manager, dp = local_agent.wire(reg, state / name, vmm=hub)
    hub.dirty_source = manager.vmm_dirty
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_to_server(srv, name, reg, manager)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    stub = agent_pb2_grpc.NodeAgentStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    return Node(name, reg, hub, stub, srv, dp)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; tmp_path can exceed it.
    d = tempfile.mkdtemp(prefix="dm-load-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def status(n: Node) -> pb.SessionStatus:
    return n.stub.GetSession(pb.GetSessionRequest(session=REF), timeout=10).status


def migrate(
    a: Node, b: Node, src: VmmStandIn, dst: VmmStandIn
) -> tuple[pb.SessionStatus, int, int]:
    """Every phase through the API, the VMM copying guest memory along;
    returns the source's status at the end and the digests of the source's
    device memory at stop and the target's before it resumed."""
    a.stub.PrepareSource(pb.PrepareSourceRequest(session=REF, device_id=a.device.id), timeout=10)
    pt = b.stub.PrepareTarget(pb.PrepareTargetRequest(session=REF, device_id=b.device.id))
    a.stub.StartPreCopy(
        pb.StartPreCopyRequest(session=REF, target_data_endpoint=pt.data_endpoint), timeout=30
    )
    # The memory migration: everything once, then what the device dirtied,
    # while the device state streams and the vCPU keeps programming DMA.
    src.copy_guest()
    dma_before = src.dma_programmed
    while status(a).progress.pre_copy_iterations < 3 or src.dma_programmed < dma_before + 20:
        _, final = src.copy_dirty()
        assert not final
    a.stub.StopAndCopy(pb.StopAndCopyRequest(session=REF, vm_sessions=[REF]), timeout=60)
    assert src.paused
    _, final = src.copy_dirty()
    assert final  # the device stopped: nothing more will be written
    for msg in b.stub.WatchSession(pb.WatchSessionRequest(session=REF), timeout=120):
        if msg.status.phase in (pb.SESSION_PHASE_TRANSFERRED, pb.SESSION_PHASE_FAILED):
            assert msg.status.phase == pb.SESSION_PHASE_TRANSFERRED, msg.status.message
            break
    digests = a.sim.stats().mem_digest, b.sim.stats().mem_digest
    b.stub.Resume(pb.ResumeRequest(session=REF), timeout=10)
    b.stub.FinishSession(pb.FinishSessionRequest(session=REF), timeout=10)
    a.stub.FinishSession(pb.FinishSessionRequest(session=REF), timeout=10)
    assert dst.wait_direct(1)  # the guest runs on the target
    return status(a), *digests


def test_a_256_mib_device_migrates_under_load_with_no_missed_trap_and_no_lost_page(
    tmp_path: pathlib.Path, sock_dir: str
) -> None:
    a = start("a", tmp_path, sock_dir, STATE_SIZE)
    b = start("b", tmp_path, sock_dir, STATE_SIZE)
    guest = [[0, a.sim.guest_size]]
    src = VmmStandIn(a.hub.path, a.device.id, a.sim, hammer=True, iova_ranges=guest)
    dst = VmmStandIn(b.hub.path, b.device.id, b.sim, start_paused=True)
    try:
        # The guest programs DMA through its mapping while nothing migrates.
        assert src.wait_direct(5, page=DMA_PAGE)
        end, src_digest, dst_digest = migrate(a, b, src, dst)
        # The agent unmapped everything, then mapped back what PRE_COPY
        # allows: the DMA page stays trapped until the end.
        traps = [r for r in src.requests if r["op"] == "traps"]
        assert traps[0]["on"] and traps[0]["mappable"] == []
        assert traps[1]["on"] and all(
            not m["offset"] <= DMA_PAGE * 4096 < m["offset"] + m["size"]
            for m in traps[1]["mappable"]
        )
        assert traps[1]["mappable"], "the rest of the BAR is passthrough again"
        assert [r["op"] for r in src.requests] == ["traps", "traps", "pause"]
        # Nothing bypassed a trap, and the device saw DMA requests trapped.
        assert end.progress.missed_traps == 0
        assert a.sim.bar_stats().missed_traps == 0
        assert src.trapped > 0 and a.sim.bar_stats().dma_ops > 20
        # The target's device holds the source's state at stop.
        assert dst_digest == src_digest
        # No dirty page lost: the VMM's copy is the guest's memory.
        assert bytes(src.memory) == a.sim.guest_read(0, a.sim.guest_size)
        assert src.errors == []
    finally:
        src.close()
        dst.close()
        a.close()
        b.close()


def test_a_vmm_that_acks_traps_without_unmapping_is_caught_by_the_device(
    tmp_path: pathlib.Path, sock_dir: str
) -> None:
    a = start("a", tmp_path, sock_dir, 4 << 20)
    b = start("b", tmp_path, sock_dir, 4 << 20)
    src = VmmStandIn(a.hub.path, a.device.id, a.sim, hammer=True, keep_mappings=True)
    dst = VmmStandIn(b.hub.path, b.device.id, b.sim, start_paused=True)
    try:
        end, src_digest, dst_digest = migrate(a, b, src, dst)
        assert end.progress.missed_traps > 0
        assert end.progress.missed_traps == a.sim.bar_stats().missed_traps
        # The device's own DMA logging still saw every page (tracking both
        # ways is what saves the guest here), and the state moved intact.
        assert bytes(src.memory) == a.sim.guest_read(0, a.sim.guest_size)
        assert dst_digest == src_digest
    finally:
        src.close()
        dst.close()
        a.close()
        b.close()


def test_the_vmm_pull_is_refused_for_a_device_it_did_not_register_or_not_migrating(
    tmp_path: pathlib.Path, sock_dir: str
) -> None:
    a = start("a", tmp_path, sock_dir, 1 << 20)
    v = VmmStandIn(a.hub.path, a.device.id, a.sim)
    try:
        with pytest.raises(RuntimeError, match="NotMigrating"):
            v.call({"op": "dirty"})
        with pytest.raises(RuntimeError, match="NotRegistered"):
            v.call({"op": "dirty", "device": "sim-a-9"})
        with pytest.raises(RuntimeError, match="BadAccess"):
            v.call({"op": "guest", "offset": 0, "length": 1 << 30})
        with pytest.raises(RuntimeError, match="BadAccess"):
            v.call({"op": "bar", "offset": 3, "write": False})
        assert v.call({"op": "bar", "offset": 0x2000, "write": False})["value"] == 0
    finally:
        v.close()
        a.close()
