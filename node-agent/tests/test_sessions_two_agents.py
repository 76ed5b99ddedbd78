"""Two agents on loopback migrate a simulated device through the API, as the
operator drives them: the target resumes with exactly the source's state;
rollbacks leave the device RUNNING on exactly one node; bad tokens and bad
streams change nothing."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import local_agent
import pytest

import devmig_native
from devmig.agent.v1alpha1 import agent_pb2 as pb
from devmig.agent.v1alpha1 import agent_pb2_grpc
from devmig_agent import datapath, devices, journal, server, sessions
from devmig_native import MigState


@dataclass
class Agent:
    name: str
    registry: devices.DeviceRegistry
    manager: sessions.SessionManager
    stub: agent_pb2_grpc.NodeAgentStub
    grpc_server: grpc.Server
    data: datapath.DataPath


def start_agent(name: str, state: pathlib.Path, size: int = 4 << 20, dirty: int = 32) -> Agent:
    reg = devices.simulated(name, devices.SimSpec(count=2, size=size, dirty=dirty))
    manager, dp = local_agent.wire(reg, state / name)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_to_server(srv, name, reg, manager)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Agent(name, reg, manager, agent_pb2_grpc.NodeAgentStub(ch), srv, dp)


@pytest.fixture
def agents(tmp_path: pathlib.Path) -> Iterator[tuple[Agent, Agent]]:
    a, b = start_agent("node-a", tmp_path), start_agent("node-b", tmp_path)
    yield a, b
    for x in (a, b):
        x.grpc_server.stop(None)
        x.data.shutdown()


REF = pb.SessionRef(session_id="dm-1-0", token="secret-token")
SRC_DEV, DST_DEV = "sim-node-a-0", "sim-node-b-0"


def prepare(a: Agent, b: Agent, ref: pb.SessionRef = REF) -> str:
    a.stub.PrepareSource(pb.PrepareSourceRequest(session=ref, device_id=SRC_DEV), timeout=10)
    pt = b.stub.PrepareTarget(pb.PrepareTargetRequest(session=ref, device_id=DST_DEV), timeout=10)
    assert pt.status.device_state == pb.VFIO_DEVICE_STATE_RESUMING
    assert pt.data_endpoint.startswith("127.0.0.1:")
    return pt.data_endpoint


def until_rounds(a: Agent, n: int) -> pb.SessionStatus:
    w = a.stub.WatchSession(
        pb.WatchSessionRequest(session=REF, progress_interval_ms=10), timeout=30
    )
    for msg in w:
        if msg.status.progress.pre_copy_iterations >= n:
            w.cancel()
            return msg.status
    raise AssertionError("pre-copy never reached the rounds")


def target_final(b: Agent, ref: pb.SessionRef = REF) -> pb.SessionStatus:
    last = None
    for msg in b.stub.WatchSession(pb.WatchSessionRequest(session=ref), timeout=30):
        last = msg.status
        if last.phase in (pb.SESSION_PHASE_TRANSFERRED, pb.SESSION_PHASE_FAILED):
            break
    assert last is not None
    return last


def test_a_resume_asked_before_the_stop_runs_the_target_the_moment_its_stream_verifies(
    agents: tuple[Agent, Agent],
) -> None:
    a, b = agents
    endpoint = prepare(a, b)
    a.stub.StartPreCopy(pb.StartPreCopyRequest(session=REF, target_data_endpoint=endpoint))
    until_rounds(a, 1)
    # Still streaming and nobody stops it: the wait ends before the
    # caller's deadline with an answer, not a timeout, and changes nothing.
    with pytest.raises(grpc.RpcError) as e:
        b.stub.Resume(pb.ResumeRequest(session=REF, wait_for_stream=True), timeout=1.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert e.value.details().startswith("StreamNotVerified")
    assert b.stub.GetSession(pb.GetSessionRequest(session=REF)).status.device_state == (
        pb.VFIO_DEVICE_STATE_RESUMING
    )
    # Without waiting: refused at once, as before.
    with pytest.raises(grpc.RpcError) as e:
        b.stub.Resume(pb.ResumeRequest(session=REF), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    waiting = b.stub.Resume.future(pb.ResumeRequest(session=REF, wait_for_stream=True), timeout=30)
    stop = a.stub.StopAndCopy(pb.StopAndCopyRequest(session=REF, vm_sessions=[REF])).status
    r = waiting.result().status
    assert r.device_state == pb.VFIO_DEVICE_STATE_RUNNING
    assert r.running_at_unix_nanos > stop.stopped_at_unix_nanos > 0
    src_digest = a.registry.get(SRC_DEV).handle.stats().mem_digest  # type: ignore[attr-defined]
    assert b.registry.get(DST_DEV).handle.stats().mem_digest == src_digest  # type: ignore[attr-defined]
    # Idempotent: asked again, the same answer at once.
    again = b.stub.Resume(pb.ResumeRequest(session=REF, wait_for_stream=True), timeout=10).status
    assert again.running_at_unix_nanos == r.running_at_unix_nanos


def _on_disk(agent: Agent) -> dict[str, object]:
    """The target session's journal record as a restarted agent would read it."""
    rec = journal.Journal(agent.manager.journal.directory).load()[REF.session_id]
    return rec.extra


def test_a_waiting_resume_is_journaled_before_it_waits_and_forgotten_when_it_gives_up(
    agents: tuple[Agent, Agent],
) -> None:
    a, b = agents
    endpoint = prepare(a, b)
    assert _on_disk(b)["resumeOnVerify"] is False
    a.stub.StartPreCopy(pb.StartPreCopyRequest(session=REF, target_data_endpoint=endpoint))
    until_rounds(a, 1)
    waiting = b.stub.Resume.future(pb.ResumeRequest(session=REF, wait_for_stream=True), timeout=1.5)
    # While it waits, the intent is on disk: written before the device action.
    assert b.manager.wait_until(lambda: _on_disk(b)["resumeOnVerify"] is True or None, 5)
    with pytest.raises(grpc.RpcError) as e:
        waiting.result()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _on_disk(b)["resumeOnVerify"] is False
    # Given up: the stream verifies, and the device waits for a Resume again.
    a.stub.StopAndCopy(pb.StopAndCopyRequest(session=REF, vm_sessions=[REF]))
    st = target_final(b)
    assert st.phase == pb.SESSION_PHASE_TRANSFERRED
    assert st.device_state == pb.VFIO_DEVICE_STATE_STOP and st.running_at_unix_nanos == 0
    r = b.stub.Resume(pb.ResumeRequest(session=REF), timeout=10).status
    assert r.device_state == pb.VFIO_DEVICE_STATE_RUNNING


def test_a_device_migrates_from_one_agent_to_the_other(agents: tuple[Agent, Agent]) -> None:
    a, b = agents
    endpoint = prepare(a, b)
    st = a.stub.StartPreCopy(
        pb.StartPreCopyRequest(session=REF, target_data_endpoint=endpoint)
    ).status
    assert st.phase == pb.SESSION_PHASE_PRE_COPY
    assert st.device_state == pb.VFIO_DEVICE_STATE_PRE_COPY
    st = until_rounds(a, 2)
    assert st.progress.bytes_sent >= 4 << 20  # the initial state streamed while running
    st = a.stub.StopAndCopy(pb.StopAndCopyRequest(session=REF, vm_sessions=[REF])).status
    assert st.phase == pb.SESSION_PHASE_STOP_COPY and st.stopped_at_unix_nanos > 0
    tgt = target_final(b)
    assert tgt.phase == pb.SESSION_PHASE_TRANSFERRED
    # The target counts what it loaded: every payload byte the source sent.
    sent = a.stub.GetSession(pb.GetSessionRequest(session=REF)).status.progress.bytes_sent
    assert tgt.progress.bytes_received == sent > 0
    src_digest = a.registry.get(SRC_DEV).handle.stats().mem_digest  # type: ignore[attr-defined]
    r = b.stub.Resume(pb.ResumeRequest(session=REF)).status
    assert r.device_state == pb.VFIO_DEVICE_STATE_RUNNING and r.running_at_unix_nanos > 0
    dst = b.registry.get(DST_DEV).handle
    assert dst.stats().mem_digest == src_digest  # type: ignore[attr-defined]
    # Idempotent repeats answer with the same state.
    assert b.stub.Resume(pb.ResumeRequest(session=REF)).status.device_state == r.device_state
    assert (
        b.stub.FinishSession(pb.FinishSessionRequest(session=REF)).status.phase
        == pb.SESSION_PHASE_SUCCEEDED
    )
    s = a.stub.FinishSession(pb.FinishSessionRequest(session=REF)).status
    assert s.phase == pb.SESSION_PHASE_SUCCEEDED and s.device_state == pb.VFIO_DEVICE_STATE_STOP
    # Exactly one node runs it now, and both devices are free again.
    assert a.registry.get(SRC_DEV).handle.state is MigState.STOP
    assert dst.state is MigState.RUNNING
    assert not a.registry.get(SRC_DEV).session_id and not b.registry.get(DST_DEV).session_id
    # A finished session cannot be rolled back on the target.
    with pytest.raises(grpc.RpcError) as e:
        b.stub.Abort(pb.AbortRequest(session=REF))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details().startswith("PastCommitPoint")
    # The journal recorded the outcome on both sides.
    assert a.manager.journal.get("dm-1-0").phase == "SUCCEEDED"  # type: ignore[union-attr]
    assert b.manager.journal.get("dm-1-0").phase == "SUCCEEDED"  # type: ignore[union-attr]


def test_a_vm_s_two_devices_all_reach_running_p2p_on_the_target_before_any_runs(
    agents: tuple[Agent, Agent],
) -> None:
    """The target's side of the P2P rule: as on the source no device
    stopped while a peer still initiated P2P DMA, on the target no device
    runs (and may initiate P2P DMA) while a peer is not yet running."""
    a, b = agents
    refs = [pb.SessionRef(session_id=f"dm-2-{i}", token="secret-token") for i in range(2)]
    arcs: list[tuple[int, str]] = []
    for i in range(2):
        # Before any transfer: the device's native threads log too.
        b.registry.get(f"sim-node-b-{i}").handle.set_log(lambda line, i=i: arcs.append((i, line)))
    for i, ref in enumerate(refs):
        dev = f"sim-node-a-{i}"
        a.stub.PrepareSource(pb.PrepareSourceRequest(session=ref, device_id=dev), timeout=10)
        pt = b.stub.PrepareTarget(
            pb.PrepareTargetRequest(session=ref, device_id=f"sim-node-b-{i}"), timeout=10
        )
        a.stub.StartPreCopy(
            pb.StartPreCopyRequest(session=ref, target_data_endpoint=pt.data_endpoint)
        )
    for ref in refs:
        a.stub.StopAndCopy(pb.StopAndCopyRequest(session=ref, vm_sessions=refs))
    assert [target_final(b, r).phase for r in refs] == [pb.SESSION_PHASE_TRANSFERRED] * 2
    # A group naming a session this agent does not have moves no device.
    stray = pb.SessionRef(session_id="dm-2-x", token="secret-token")
    with pytest.raises(grpc.RpcError) as e:
        b.stub.Resume(pb.ResumeRequest(session=refs[0], vm_sessions=[*refs, stray]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert [b.registry.get(f"sim-node-b-{i}").handle.state for i in range(2)] == [MigState.STOP] * 2
    r = b.stub.Resume(pb.ResumeRequest(session=refs[0], vm_sessions=refs)).status
    assert r.device_state == pb.VFIO_DEVICE_STATE_RUNNING and r.running_at_unix_nanos > 0
    # Both devices run, each with its source's state.
    for i, ref in enumerate(refs):
        st = b.stub.GetSession(pb.GetSessionRequest(session=ref)).status
        assert st.device_state == pb.VFIO_DEVICE_STATE_RUNNING and st.running_at_unix_nanos > 0
        src = a.registry.get(f"sim-node-a-{i}").handle.stats().mem_digest  # type: ignore[attr-defined]
        assert b.registry.get(f"sim-node-b-{i}").handle.stats().mem_digest == src  # type: ignore[attr-defined]
    # The order the devices took: both into RUNNING_P2P, then both to RUNNING.
    into_p2p = [n for n, (_, line) in enumerate(arcs) if line.startswith("STOP -> RUNNING_P2P")]
    into_running = [
        n
        for n, (_, line) in enumerate(arcs)
        if "-> RUNNING" in line and line.split(" -> ")[1].split()[0] == "RUNNING"
    ]
    assert sorted(arcs[n][0] for n in into_p2p) == [0, 1], arcs
    assert sorted(arcs[n][0] for n in into_running) == [0, 1], arcs
    assert max(into_p2p) < min(into_running), arcs
    # Repeats, with or without the group, answer with the state.
    again = b.stub.Resume(pb.ResumeRequest(session=refs[1], vm_sessions=refs)).status
    assert again.device_state == pb.VFIO_DEVICE_STATE_RUNNING
    assert len(arcs) == into_running[-1] + 1  # nothing moved again


def test_abort_during_pre_copy_leaves_the_source_running_and_resets_the_target(
    agents: tuple[Agent, Agent],
) -> None:
    a, b = agents
    endpoint = prepare(a, b)
    a.stub.StartPreCopy(pb.StartPreCopyRequest(session=REF, target_data_endpoint=endpoint))
    until_rounds(a, 1)
    s = a.stub.Abort(pb.AbortRequest(session=REF, reason="test")).status
    assert s.phase == pb.SESSION_PHASE_ABORTED and s.device_state == pb.VFIO_DEVICE_STATE_RUNNING
    t = b.stub.Abort(pb.AbortRequest(session=REF, reason="test")).status
    assert t.phase == pb.SESSION_PHASE_ABORTED
    assert b.registry.get(DST_DEV).handle.state is MigState.RUNNING  # reset, its own state
    assert a.registry.get(SRC_DEV).handle.state is MigState.RUNNING
    # Abort is idempotent, and an unknown session has nothing to roll back.
    assert a.stub.Abort(pb.AbortRequest(session=REF)).status.phase == pb.SESSION_PHASE_ABORTED
    other = pb.SessionRef(session_id="never", token="x")
    assert not a.stub.Abort(pb.AbortRequest(session=other)).HasField("status")


def test_a_wrong_token_is_refused_and_changes_nothing(agents: tuple[Agent, Agent]) -> None:
    a, b = agents
    prepare(a, b)
    bad = pb.SessionRef(session_id=REF.session_id, token="guess")
    for call in (
        lambda: a.stub.GetSession(pb.GetSessionRequest(session=bad)),
        lambda: a.stub.StartPreCopy(
            pb.StartPreCopyRequest(session=bad, target_data_endpoint="x:1")
        ),
        lambda: b.stub.Abort(pb.AbortRequest(session=bad)),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details().startswith("BadSessionToken")
    assert a.registry.get(SRC_DEV).handle.state is MigState.RUNNING
    assert b.registry.get(DST_DEV).handle.state is MigState.RESUMING


def test_a_device_held_by_one_session_is_busy_for_another(agents: tuple[Agent, Agent]) -> None:
    a, b = agents
    prepare(a, b)
    other = pb.SessionRef(session_id="dm-2-0", token="t2")
    with pytest.raises(grpc.RpcError) as e:
        a.stub.PrepareSource(pb.PrepareSourceRequest(session=other, device_id=SRC_DEV))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details().startswith("DeviceBusy")
    with pytest.raises(grpc.RpcError) as e:
        a.stub.PrepareSource(pb.PrepareSourceRequest(session=other, device_id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_stranger_on_the_data_port_is_refused_and_the_target_waits_on(
    agents: tuple[Agent, Agent],
) -> None:
    import socket

    a, b = agents
    endpoint = prepare(a, b)
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b'{"v": 1, "session": "dm-1-0", "token": "guess"}\n')
        assert s.recv(100).startswith(b"ERR ")
    # The real source still gets in afterwards.
    a.stub.StartPreCopy(pb.StartPreCopyRequest(session=REF, target_data_endpoint=endpoint))
    a.stub.StopAndCopy(pb.StopAndCopyRequest(session=REF))
    assert target_final(b).phase == pb.SESSION_PHASE_TRANSFERRED


def test_a_corrupted_stream_fails_the_target_which_never_runs(agents: tuple[Agent, Agent]) -> None:
    a, b = agents
    endpoint = prepare(a, b)
    # The source device corrupts one byte of what it produces.
    a.registry.get(SRC_DEV).handle.corrupt(1000)  # type: ignore[attr-defined]
    a.stub.StartPreCopy(pb.StartPreCopyRequest(session=REF, target_data_endpoint=endpoint))
    a.stub.StopAndCopy(pb.StopAndCopyRequest(session=REF))
    t = target_final(b)
    assert t.phase == pb.SESSION_PHASE_FAILED and t.reason == "StreamFailed"
    assert b.registry.get(DST_DEV).handle.state is MigState.RUNNING  # reset: its own state
    with pytest.raises(grpc.RpcError) as e:
        b.stub.Resume(pb.ResumeRequest(session=REF))
    assert e.value.details().startswith("StreamNotVerified")


def _pages(msgs: list[pb.WatchDirtyPagesResponse]) -> set[int]:
    out: set[int] = set()
    for m in msgs:
        assert m.page_size == 4096
        npages, _, bm = devmig_native.bitmap_decode(m.encoded_ranges)
        for first, count in devmig_native.bitmap_ranges(bm, npages):
            out.update(range(first, first + count))
    return out


def _dma(dev: devmig_native.SimDevice, page: int) -> None:
    # A vCPU's DMA request, trapped (the registers are trapped in PRE_COPY).
    dev.bar_write(dev.BAR_DMA_ADDR, page * 4096)
    dev.bar_write(dev.BAR_DMA_LEN, 4096)
    dev.bar_write(dev.BAR_DMA_GO, 1)


def test_the_source_exports_the_guest_pages_its_device_dirtied(
    agents: tuple[Agent, Agent],
) -> None:
    a, b = agents
    endpoint = prepare(a, b)
    req = pb.WatchDirtyPagesRequest(session=REF)
    with pytest.raises(grpc.RpcError) as e:
        list(a.stub.WatchDirtyPages(req, timeout=10))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # not started
    a.stub.StartPreCopy(pb.StartPreCopyRequest(session=REF, target_data_endpoint=endpoint))
    src = a.registry.get(SRC_DEV).handle
    assert isinstance(src, devmig_native.SimDevice)
    for page in (3, 4, 100):
        _dma(src, page)
    w = a.stub.WatchDirtyPages(req, timeout=30)
    first = next(w)
    assert not first.final and _pages([first]) == {3, 4, 100}
    _dma(src, 200)
    a.stub.StopAndCopy(pb.StopAndCopyRequest(session=REF, vm_sessions=[REF]))
    rest = []
    for m in w:
        rest.append(m)
        if m.final:
            break
    assert rest and rest[-1].final
    assert _pages([first, *rest]) == {3, 4, 100, 200}
    # A second call starts from everything reported so far: nothing lost.
    again = list(a.stub.WatchDirtyPages(req, timeout=30))
    assert again[-1].final and _pages(again) == {3, 4, 100, 200}
    # Dirty pages come from the source only.
    with pytest.raises(grpc.RpcError) as e:
        list(b.stub.WatchDirtyPages(req, timeout=10))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert target_final(b).phase == pb.SESSION_PHASE_TRANSFERRED
