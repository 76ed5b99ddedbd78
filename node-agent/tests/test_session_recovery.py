"""Crash safety at the session manager: a restarted agent knows every
session from its journal, never leaves a device silently mid-migration,
waits for the operator until a deadline, and never rolls back a source
whose stream may have let the target commit. "Restart" here re-creates the
manager over the same journal directory; keeping the registry (and so the
simulated devices) is a restart whose devices kept their state, a new
registry one whose devices were reset."""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from devmig_agent import datapath, devices, journal, sessions
from devmig_agent.sessions import Phase, Role, SessionError, SessionManager
from devmig_native import MigState

TOKEN = "recovery-token"
SID = "dm-r-0"
START_NS = 1_800_000_000 * 10**9


@dataclass
class Clock:
    now: int = START_NS

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


@dataclass
class Node:
    name: str
    state: pathlib.Path
    clock: Clock
    registry: devices.DeviceRegistry
    manager: SessionManager = field(init=False)
    data: datapath.DataPath = field(init=False)

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        j = journal.Journal(self.state / self.name, clock=self.clock)
        j.load()
        holder: list[SessionManager] = []
        self.data = datapath.DataPath("127.0.0.1", 0, lambda s, e: holder[0].on_transfer_done(s, e))
        self.manager = SessionManager(self.registry, j, self.data, clock_ns=self.clock)
        holder.append(self.manager)

    def crash(self) -> None:
        """What a killed process leaves: the journal as last written, no
        pump or sink, and (here) devices whose state some other holder kept."""
        for s in list(self.manager._sessions.values()):
            self.data.close(s)
        self.data.shutdown()

    @property
    def device(self) -> devices.ManagedDevice:
        return self.registry.get(f"sim-{self.name}-0")


def sim(name: str) -> devices.DeviceRegistry:
    return devices.simulated(name, devices.SimSpec(count=1, size=1 << 20, dirty=32))


@pytest.fixture
def nodes(tmp_path: pathlib.Path) -> Iterator[tuple[Node, Node]]:
    clock = Clock()
    a, b = Node("a", tmp_path, clock, sim("a")), Node("b", tmp_path, clock, sim("b"))
    yield a, b
    for n in (a, b):
        n.data.shutdown()


def wait_phase(m: SessionManager, want: set[Phase]) -> sessions.Snapshot:
    for snap in m.watch(SID, TOKEN, 10, lambda: True):
        if snap.phase in want:
            return snap
    raise AssertionError(f"session ended without reaching {want}")


def to_pre_copy(a: Node, b: Node) -> None:
    a.manager.prepare_source(SID, TOKEN, a.device.id, 0)
    endpoint = b.manager.prepare_target(SID, TOKEN, b.device.id).data_endpoint
    a.manager.start_pre_copy(SID, TOKEN, endpoint)
    for snap in a.manager.watch(SID, TOKEN, 10, lambda: True):
        if snap.progress.pre_copy_iterations >= 1:
            break


def to_transferred(a: Node, b: Node) -> None:
    to_pre_copy(a, b)
    a.manager.stop_and_copy(SID, TOKEN, [])
    assert wait_phase(b.manager, {Phase.TRANSFERRED, Phase.FAILED}).phase is Phase.TRANSFERRED
    assert wait_phase(a.manager, {Phase.TRANSFERRED, Phase.FAILED}).phase is Phase.TRANSFERRED


def restart(n: Node, *, reset_devices: bool = False) -> list[sessions.Snapshot]:
    n.crash()
    if reset_devices:
        n.registry = sim(n.name)
    n.start()
    return n.manager.recover(deadline_s=300)


def test_a_restarted_agent_answers_for_every_journaled_session_with_the_same_token(
    nodes: tuple[Node, Node],
) -> None:
    a, _ = nodes
    a.manager.prepare_source(SID, TOKEN, a.device.id, 0)
    open_ = restart(a)
    assert [s.session_id for s in open_] == [SID]
    snap = a.manager.get(SID, TOKEN)
    assert (snap.role, snap.phase, snap.device_state) == (Role.SOURCE, Phase.PREPARED, "RUNNING")
    with pytest.raises(SessionError) as e:
        a.manager.get(SID, "guess")
    assert e.value.reason == "BadSessionToken"
    # A PREPARED source has nothing in flight: no deadline, still claimed.
    assert a.manager.next_recovery_deadline() == 0
    assert a.device.session_id == SID


def test_a_simulated_device_lost_in_a_process_restart_fails_its_session_as_device_reset(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    to_pre_copy(a, b)
    restart(a, reset_devices=True)
    snap = a.manager.get(SID, TOKEN)
    assert snap.phase is Phase.FAILED and snap.reason == "DeviceReset"
    assert "lost" in snap.message
    # The fresh device is not claimed by a session that no longer owns it.
    assert not a.device.session_id and a.device.handle.state is MigState.RUNNING
    assert a.manager.journal.get(SID).reason == "DeviceReset"  # type: ignore[union-attr]
    # The operator's Abort settles it.
    assert a.manager.abort(SID, TOKEN, "rollback").phase is Phase.ABORTED  # type: ignore[union-attr]


def test_a_source_found_in_pre_copy_waits_for_the_operator_then_rolls_back_at_the_deadline(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    to_pre_copy(a, b)
    (found,) = restart(a)
    assert found.phase is Phase.PRE_COPY and found.device_state == "PRE_COPY"
    assert "waiting for the operator" in found.message
    assert a.manager.next_recovery_deadline() == a.clock.now + 300 * 10**9
    a.clock.advance(299)
    assert a.manager.expire_recovery() == []
    assert a.device.handle.state is MigState.PRE_COPY
    a.clock.advance(1)
    assert a.manager.expire_recovery() == [SID]
    snap = a.manager.get(SID, TOKEN)
    assert (snap.phase, snap.reason) == (Phase.ABORTED, "RecoveryDeadlineExpired")
    assert a.device.handle.state is MigState.RUNNING and not a.device.session_id
    rec = a.manager.journal.get(SID)
    assert rec is not None and rec.reason == "RecoveryDeadlineExpired"


def test_the_operators_abort_before_the_deadline_rolls_a_recovered_source_back(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    to_pre_copy(a, b)
    restart(a)
    snap = a.manager.abort(SID, TOKEN, "operator")
    assert snap is not None and snap.phase is Phase.ABORTED
    assert a.device.handle.state is MigState.RUNNING
    assert a.manager.next_recovery_deadline() == 0


def test_a_target_found_resuming_is_reset_at_the_deadline(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    to_pre_copy(a, b)
    (found,) = restart(b)  # mid-stream
    assert (found.role, found.phase, found.reason) == (
        Role.TARGET,
        Phase.PREPARED,
        "StreamInterrupted",
    )
    b.clock.advance(300)
    assert b.manager.expire_recovery() == [SID]
    assert b.manager.get(SID, TOKEN).phase is Phase.ABORTED
    assert b.device.handle.state is MigState.RUNNING and not b.device.session_id


def test_a_source_found_after_stop_and_copy_is_parked_and_never_rolled_back_alone(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    to_transferred(a, b)
    (found,) = restart(a)
    assert found.phase is Phase.TRANSFERRED and found.reason == "AwaitingCommitDecision"
    assert found.device_state == "STOP"
    assert a.manager.next_recovery_deadline() == 0
    a.clock.advance(10 * 3600)
    assert a.manager.expire_recovery() == []
    assert a.device.handle.state is MigState.STOP and a.device.session_id == SID
    # The operator recorded the commit: the target runs, the source ends.
    b.manager.resume(SID, TOKEN)
    b.manager.finish(SID, TOKEN)
    assert a.manager.finish(SID, TOKEN).phase is Phase.SUCCEEDED
    assert a.device.handle.state is MigState.STOP and not a.device.session_id


def test_a_parked_source_rolls_back_when_the_operator_aborts(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    to_transferred(a, b)
    restart(a)
    assert a.manager.abort(SID, TOKEN, "target never ran").phase is Phase.ABORTED  # type: ignore[union-attr]
    assert a.device.handle.state is MigState.RUNNING


def test_a_verified_target_found_after_a_restart_can_still_be_resumed(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    to_transferred(a, b)
    digest = a.device.handle.stats().mem_digest  # type: ignore[attr-defined]
    (found,) = restart(b)
    assert found.phase is Phase.TRANSFERRED
    snap = b.manager.resume(SID, TOKEN)
    assert snap.device_state == "RUNNING" and snap.running_at_unix_nanos
    assert b.device.handle.stats().mem_digest == digest  # type: ignore[attr-defined]
    # Past the commit point the deadline no longer applies.
    b.clock.advance(3600)
    assert b.manager.expire_recovery() == []
    assert b.manager.finish(SID, TOKEN).phase is Phase.SUCCEEDED


def test_shutdown_rolls_back_what_is_in_flight_and_refuses_new_sessions(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    to_pre_copy(a, b)
    # The target first: while the source is in PRE_COPY its stream cannot
    # end, so the target is surely still receiving.
    assert b.manager.shutdown("SIGTERM") == [SID]
    sb = b.manager.get(SID, TOKEN)
    assert (sb.phase, sb.reason) == (Phase.ABORTED, "AgentShutdown")
    # The source's pump may have seen its peer vanish (FAILED) or not yet
    # (rolled back here): either way the device runs on the source.
    a.manager.shutdown("SIGTERM")
    sa = a.manager.get(SID, TOKEN)
    assert sa.phase.final and sa.device_state == "RUNNING"
    if sa.phase is Phase.FAILED:
        a.manager.abort(SID, TOKEN, "operator")
    assert a.device.handle.state is MigState.RUNNING and b.device.handle.state is MigState.RUNNING
    with pytest.raises(SessionError) as e:
        a.manager.prepare_source("dm-new", TOKEN, a.device.id, 0)
    assert e.value.reason == "AgentShuttingDown"
    # After a restart the journal says it all: nothing left to settle.
    assert restart(a) == []


def test_shutdown_parks_a_source_whose_stream_completed(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    to_transferred(a, b)
    assert a.manager.shutdown("SIGTERM") == [SID]
    snap = a.manager.get(SID, TOKEN)
    assert (snap.phase, snap.reason, snap.device_state) == (
        Phase.TRANSFERRED,
        "AwaitingCommitDecision",
        "STOP",
    )
    # A restarted agent keeps it parked and claimed.
    (found,) = restart(a)
    assert found.reason == "AwaitingCommitDecision" and a.device.session_id == SID


def test_the_deadline_loop_wakes_at_the_deadline_and_stops_when_told(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    to_pre_copy(a, b)
    restart(a)
    a.clock.advance(300)
    stop = threading.Event()
    expired = threading.Event()
    real = a.manager.expire_recovery

    def expire() -> list[str]:
        out = real()
        if out:
            expired.set()
            stop.set()
        return out

    a.manager.expire_recovery = expire  # type: ignore[method-assign]
    t = threading.Thread(target=a.manager.run_recovery_deadlines, args=(stop,))
    t.start()
    assert expired.wait(10)
    t.join(10)
    assert not t.is_alive()
    assert a.manager.get(SID, TOKEN).reason == "RecoveryDeadlineExpired"


def test_a_stream_accepted_while_its_session_is_closed_is_cancelled_not_left_loading(
    nodes: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target answers a stream's hello before its sink (the loading
    thread) exists. A close in that gap, as a crash or an abort makes, found
    no sink to cancel, and the loader then held the device, waiting for more
    of a stream nobody would end. Here the sink is made only after the
    close: it must be cancelled, its loader must end and free the device."""
    a, b = nodes
    accepted, closed, sink_made = threading.Event(), threading.Event(), threading.Event()
    made: list[datapath._Sink] = []
    real = datapath._Sink

    def sink_after_the_close(*args: Any, **kwargs: Any) -> datapath._Sink:
        accepted.set()
        assert closed.wait(10)
        sink = real(*args, **kwargs)
        made.append(sink)
        sink_made.set()
        return sink

    monkeypatch.setattr(datapath, "_Sink", sink_after_the_close)
    a.manager.prepare_source(SID, TOKEN, a.device.id, 0)
    endpoint = b.manager.prepare_target(SID, TOKEN, b.device.id).data_endpoint
    a.manager.start_pre_copy(SID, TOKEN, endpoint)
    assert accepted.wait(10)
    b.crash()
    closed.set()
    assert sink_made.wait(10)
    (sink,) = made
    sink._thread.join(10)
    assert not sink._thread.is_alive(), "the loader still holds the device"
    assert b.device.handle.state is MigState.RUNNING  # the cut stream reset it
