"""Migration sessions: one device on this node, in one role, driven through
the phases the operator asks for.

Every request is idempotent by session id: a repeat with the same arguments
answers with the session as it stands. Each change is journaled before it is
answered, so a restarted agent knows every device it was migrating. State
changes go through the native core's one state setter; device state flows
through the native pump (source) and sink (target), never through Python.

Roles and phases (SessionPhase in the API):

- source: PREPARED (RUNNING) -> PRE_COPY (traps on, streaming) -> STOP_COPY
  (stopped, streaming the rest) -> TRANSFERRED (stream complete) ->
  SUCCEEDED (after the commit point: stopped for good, released).
- target: PREPARED (RESUMING, data endpoint open) -> TRANSFERRED (stream
  received and verified, device STOP) -> SUCCEEDED (RUNNING, VMM told).
- ABORTED: rolled back (source RUNNING again; target reset and released).
- FAILED: see the message; the device is left in a known state.

Crash safety (``recover``, ``shutdown``, ``expire_recovery``): the commit
point is the target device RUNNING. A session whose stream could not have
been complete (source PREPARED or PRE_COPY, target not yet RUNNING) may be
rolled back by the agent alone; a source whose stream may have completed
(STOP_COPY, TRANSFERRED) is never rolled back without the operator, who
alone knows whether the target committed: it is parked in STOP, keeping its
state, and waits for Abort or FinishSession.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import devmig_native
from devmig_agent import journal as journalmod
from devmig_agent import tracking
from devmig_agent.devices import DeviceBusy, DeviceRegistry, ManagedDevice, UnknownDevice
from devmig_native import MigState

log = logging.getLogger(__name__)

T = TypeVar("T")


# How long a session found unfinished at start waits for the operator's
# decision (Abort, Resume, FinishSession) before the agent rolls it back
# itself, seconds. The operator retries agent calls with backoff and a
# restarted operator re-reconciles within a minute or so; five minutes
# rides out both, and bounds how long a guest runs with its BARs trapped
# (slower, never wrong) or a target device stays claimed.
DEFAULT_RECOVERY_DEADLINE_SECONDS = 300.0


# Guest pages the dirty-page export counts in, bytes.
PAGE_SIZE = tracking.PAGE_SIZE


class Code(enum.Enum):
    """Error classes; server.py maps them to gRPC status codes."""

    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


class SessionError(Exception):
    def __init__(self, code: Code, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


class Role(enum.Enum):
    SOURCE = "SOURCE"
    TARGET = "TARGET"


class Phase(enum.Enum):
    PREPARED = "PREPARED"
    PRE_COPY = "PRE_COPY"
    STOP_COPY = "STOP_COPY"
    TRANSFERRED = "TRANSFERRED"
    SUCCEEDED = "SUCCEEDED"
    ABORTED = "ABORTED"
    FAILED = "FAILED"

    @property
    def final(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.ABORTED, Phase.FAILED)


@dataclasses.dataclass
class Progress:
    bytes_sent: int = 0
    bytes_received: int = 0
    remaining_bytes: int = 0
    dirty_rate_bytes_per_second: int = 0
    throughput_bytes_per_second: int = 0
    pre_copy_iterations: int = 0
    missed_traps: int = 0


@dataclasses.dataclass
class Snapshot:
    """A session as the API reports it (plain values, no handles)."""

    session_id: str
    role: Role
    device_id: str
    phase: Phase
    device_state: str
    progress: Progress
    message: str = ""
    reason: str = ""
    stopped_at_unix_nanos: int = 0
    running_at_unix_nanos: int = 0
    data_endpoint: str = ""


def token_matches(token: str, token_sha256: str) -> bool:
    return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), token_sha256)


@dataclasses.dataclass
class Session:
    id: str
    role: Role
    device: ManagedDevice
    token_sha256: str
    # The token itself, in memory only (the journal keeps its hash): a
    # source presents it to the target's data endpoint.
    token: str = ""
    phase: Phase = Phase.PREPARED
    message: str = ""
    reason: str = ""
    data_endpoint: str = ""
    stopped_at_ns: int = 0
    running_at_ns: int = 0
    transfer: Any = None  # the pump (source) or sink (target) while it runs
    progress: Progress = dataclasses.field(default_factory=Progress)
    # The VMM was paused for stop-and-copy (source) and not resumed yet.
    vmm_paused: bool = False
    # After a restart: when the agent rolls the session back unless the
    # operator decided first (unix ns; 0: no deadline).
    recovery_deadline_ns: int = 0
    # The phase last journaled, and since when (for phase durations).
    recorded_phase: Phase | None = None
    phase_since_ns: int = 0
    # Source, from pre-copy on: the guest pages the device's DMA dirtied.
    tracker: tracking.DirtyTracker | None = None
    # The VMM pulled its final dirty pages (after stop-and-copy).
    vmm_final_pulled: bool = False
    # Target: a Resume is waiting for the stream (journaled before it
    # waits), so the sink resumes the device the moment it verifies.
    resume_on_verify: bool = False


class VmmError(Exception):
    """The VMM did not do what it was asked (no ack in time, refused, gone)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class VmmControl(Protocol):
    """The hypervisor side of the VMM contract, per device. Every call
    returns once the VMM acknowledged, raises ``VmmError`` otherwise, and is
    a no-op when no VMM registered for the device."""

    def traps(self, device_id: str, on: bool, mappable: list[tracking.Area]) -> None:
        """``mappable``: the only BAR areas the VMM may map from now on;
        everything else must trap. ``on``: the device is migrating."""
        ...

    def pause(self, device_id: str) -> None: ...

    def resume(self, device_id: str) -> None: ...

    def dma_ranges(self, device_id: str) -> list[tuple[int, int]]:
        """The guest's IOVA ranges (iova, length) the VMM registered for the
        device's DMA logging; empty when it gave none."""
        ...


class NoVmm:
    """No VMM on this node (tests, labs): nothing to tell."""

    def traps(self, device_id: str, on: bool, mappable: list[tracking.Area]) -> None:
        return None

    def dma_ranges(self, device_id: str) -> list[tuple[int, int]]:
        return []

    def pause(self, device_id: str) -> None:
        return None

    def resume(self, device_id: str) -> None:
        return None


class Observer(Protocol):
    """What the manager reports for metrics."""

    def phase_ended(self, role: Role, phase: Phase, seconds: float) -> None: ...

    def error(self, reason: str) -> None: ...


class NoObserver:
    def phase_ended(self, role: Role, phase: Phase, seconds: float) -> None:
        return None

    def error(self, reason: str) -> None:
        return None


class DeviceReacquirer(Protocol):
    """Finds a journaled session's device again after a restart.

    Returns the device when it kept its state since the journal saw it (the
    same incarnation), or None when its state is gone (reset, or no longer
    on the node). ``RegistryReacquirer`` checks the registry's devices; on a
    real node a device whose every fd closed is reset by the kernel, and one
    whose VMM still holds a duplicate fd is handed back over the VMM socket
    with the incarnation the VMM was given (``vmm.VmmReacquirer``), so the same
    check applies; the device's state is then read from the device itself,
    never taken from the journal.
    """

    def reacquire(self, device_id: str, incarnation: str) -> ManagedDevice | None: ...


class RegistryReacquirer:
    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry

    def reacquire(self, device_id: str, incarnation: str) -> ManagedDevice | None:
        try:
            d = self.registry.get(device_id)
        except UnknownDevice:
            return None
        return d if incarnation and d.incarnation == incarnation else None


# How long a WatchSession waits for a change before sending progress anyway
# when the client gave no interval, milliseconds: often enough for a progress
# bar, rare enough to cost nothing.
DEFAULT_PROGRESS_INTERVAL_MS = 500
# A Resume waiting for its stream re-checks that its caller is still there
# this often, seconds: a caller gone frees the thread within a second.
RESUME_WAIT_SLICE_S = 1.0
# A waiting Resume answers this long before the caller's deadline, seconds,
# so its DEADLINE_EXCEEDED arrives as an answer rather than a timeout.
RESUME_DEADLINE_MARGIN_S = 0.5


class Transfers(Protocol):
    """How device state moves: the data path. Injected so the session logic
    is independent of sockets; ``datapath.DataPath`` provides it."""

    def open_receiver(self, session: Session) -> str:
        """Accept this session's stream; returns the endpoint (host:port)."""
        ...

    def start_sender(self, session: Session, endpoint: str, bandwidth: int) -> Any:
        """Connect to the target and start the pump; returns it."""
        ...

    def close(self, session: Session) -> None:
        """Stop accepting or sending for this session. Idempotent."""
        ...


class SessionManager:
    def __init__(
        self,
        registry: DeviceRegistry,
        journal: journalmod.Journal,
        transfers: Transfers,
        clock_ns: Callable[[], int] = time.time_ns,
        vmm: VmmControl | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.registry = registry
        self.journal = journal
        self.transfers = transfers
        self.clock_ns = clock_ns
        self.vmm: VmmControl = vmm or NoVmm()
        self.observer: Observer = observer or NoObserver()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, Session] = {}
        self._bandwidth: dict[str, int] = {}
        # Set by shutdown: no new session starts.
        self._closing = False

    # ------------------------------------------------------------- internals

    def _find(self, session_id: str, token: str) -> Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise SessionError(Code.NOT_FOUND, "UnknownSession", f"no session {session_id!r}")
        if not token_matches(token, s.token_sha256):
            raise SessionError(
                Code.PERMISSION_DENIED, "BadSessionToken", f"wrong token for session {session_id!r}"
            )
        # A session recovered from the journal knows only the token's hash;
        # the first request that proves it hands the token back (a source
        # presents it to the target's data endpoint).
        if not s.token:
            s.token = token
        return s

    def _record(self, s: Session) -> None:
        """Journal the session, then wake watchers."""
        now = self.clock_ns()
        if s.recorded_phase is not s.phase:
            if s.recorded_phase is not None:
                self.observer.phase_ended(
                    s.role, s.recorded_phase, max(0, now - s.phase_since_ns) / 1e9
                )
            if s.phase is Phase.FAILED:
                self.observer.error(s.reason or "Failed")
            s.recorded_phase, s.phase_since_ns = s.phase, now
        rec = journalmod.SessionRecord(
            session_id=s.id,
            role=s.role.value,
            device_id=s.device.id,
            phase=s.phase.value,
            device_state=s.device.handle.state.name,
            data_endpoint=s.data_endpoint,
            token_sha256=s.token_sha256,
            message=s.message,
            reason=s.reason,
            extra={
                "incarnation": s.device.incarnation,
                "stoppedAtUnixNanos": s.stopped_at_ns,
                "runningAtUnixNanos": s.running_at_ns,
                "vmmPaused": s.vmm_paused,
                "recoveryDeadlineUnixNanos": s.recovery_deadline_ns,
                "resumeOnVerify": s.resume_on_verify,
            },
        )
        self.journal.put(rec)
        self._changed.notify_all()

    def _set_state(self, s: Session, to: MigState, recover_to: MigState) -> None:
        try:
            s.device.handle.set_state(to, recover_to)
        except devmig_native.DevmigError as e:
            s.phase, s.reason = Phase.FAILED, "DeviceStateChangeFailed"
            s.message = (
                f"{e.from_state or '?'} -> {e.to_state or to.name} failed: {e.strerror}; "
                f"device now {s.device.handle.state.name}"
            )
            self._record(s)
            raise SessionError(Code.FAILED_PRECONDITION, s.reason, s.message) from e

    def _new(self, session_id: str, token: str, role: Role, device_id: str) -> Session | None:
        """The existing session (a repeat) or None; checks conflicts."""
        if not session_id or not token:
            raise SessionError(
                Code.INVALID_ARGUMENT, "MissingSession", "session id and token are required"
            )
        s = self._sessions.get(session_id)
        if s is None:
            if self._closing:
                raise SessionError(
                    Code.UNAVAILABLE, "AgentShuttingDown", "the agent is stopping; retry later"
                )
            return None
        if not token_matches(token, s.token_sha256):
            raise SessionError(
                Code.PERMISSION_DENIED, "BadSessionToken", f"wrong token for {session_id!r}"
            )
        if s.role is not role or s.device.id != device_id:
            raise SessionError(
                Code.FAILED_PRECONDITION,
                "SessionMismatch",
                f"session {session_id} is the {s.role.value} of {s.device.id}",
            )
        return s

    def _hold(self, session_id: str, device_id: str) -> ManagedDevice:
        try:
            return self.registry.hold(device_id, session_id)
        except UnknownDevice as e:
            raise SessionError(Code.NOT_FOUND, "UnknownDevice", str(e)) from e
        except DeviceBusy as e:
            raise SessionError(Code.FAILED_PRECONDITION, "DeviceBusy", str(e)) from e

    # ------------------------------------------------------------ the verbs

    def prepare_source(
        self, session_id: str, token: str, device_id: str, bandwidth: int
    ) -> Snapshot:
        with self._lock:
            s = self._new(session_id, token, Role.SOURCE, device_id)
            if s is None:
                dev = self._hold(session_id, device_id)
                if dev.handle.state is not MigState.RUNNING:
                    self.registry.release(device_id, session_id)
                    raise SessionError(
                        Code.FAILED_PRECONDITION,
                        "DeviceNotRunning",
                        f"{device_id} is {dev.handle.state.name}, not RUNNING",
                    )
                s = Session(
                    session_id, Role.SOURCE, dev, hashlib.sha256(token.encode()).hexdigest(), token
                )
                self._sessions[session_id] = s
                self._bandwidth[session_id] = bandwidth
                self._record(s)
                log.info("session %s: source of %s prepared", session_id, device_id)
            return self._snapshot(s)

    def prepare_target(self, session_id: str, token: str, device_id: str) -> Snapshot:
        with self._lock:
            s = self._new(session_id, token, Role.TARGET, device_id)
            if s is None:
                dev = self._hold(session_id, device_id)
                s = Session(
                    session_id, Role.TARGET, dev, hashlib.sha256(token.encode()).hexdigest(), token
                )
                self._sessions[session_id] = s
                try:
                    self._set_state(s, MigState.RESUMING, MigState.RUNNING)
                except SessionError:
                    self.registry.release(device_id, session_id)
                    raise
                s.data_endpoint = self.transfers.open_receiver(s)
                self._record(s)
                log.info(
                    "session %s: target %s RESUMING at %s", session_id, device_id, s.data_endpoint
                )
            return self._snapshot(s)

    def start_pre_copy(self, session_id: str, token: str, endpoint: str) -> Snapshot:
        with self._lock:
            s = self._find(session_id, token)
            if s.role is not Role.SOURCE:
                raise SessionError(
                    Code.FAILED_PRECONDITION, "WrongRole", "StartPreCopy is for sources"
                )
            if s.phase is Phase.PREPARED:
                if not endpoint:
                    raise SessionError(
                        Code.INVALID_ARGUMENT, "MissingEndpoint", "target_data_endpoint is required"
                    )
                if s.device.handle.state is not MigState.RUNNING:
                    raise SessionError(
                        Code.FAILED_PRECONDITION,
                        "DeviceNotRunning",
                        f"{s.device.id} is {s.device.handle.state.name}: {s.message}",
                    )
                self._switch_to_pre_copy(s)
                try:
                    s.transfer = self.transfers.start_sender(
                        s, endpoint, self._bandwidth.get(s.id, 0)
                    )
                except OSError as e:
                    self._set_state(s, MigState.RUNNING, MigState.RUNNING)
                    self._stop_tracking(s)
                    self._traps_off(s)
                    self.observer.error("TargetUnreachable")
                    raise SessionError(
                        Code.UNAVAILABLE, "TargetUnreachable", f"cannot reach {endpoint}: {e}"
                    ) from e
                s.phase = Phase.PRE_COPY
                self._record(s)
            return self._snapshot(s)

    def _switch_to_pre_copy(self, s: Session) -> None:
        """RUNNING -> PRE_COPY with the traps the device needs in place
        before any vCPU can bypass them (see tracking.py for why this
        order): the VMM unmaps every BAR area (ack), DMA tracking starts,
        the device enters PRE_COPY, its sparse-mmap capability is re-read,
        and the VMM maps back only what is mappable now (ack). A trapped
        access still reaches the device, so trapping too much for a moment
        is slower, never wrong. On failure the device is RUNNING with
        passthrough restored."""
        try:
            self.vmm.traps(s.device.id, True, [])
        except VmmError as e:
            self._traps_off(s)
            self.observer.error(e.reason)
            raise SessionError(Code.UNAVAILABLE, e.reason, e.message) from e
        s.tracker = tracking.DirtyTracker(s.device.handle, self.vmm.dma_ranges(s.device.id))
        s.tracker.start()
        try:
            self._set_state(s, MigState.PRE_COPY, MigState.RUNNING)
        except SessionError:
            self._stop_tracking(s)
            self._traps_off(s)
            raise
        areas = tracking.mappable_areas(s.device.handle)
        try:
            self.vmm.traps(s.device.id, True, areas)
        except VmmError as e:
            # Everything stays trapped (the first ack holds): correct, only
            # slower. The migration goes on.
            self.observer.error(e.reason)
            log.warning("session %s: the VMM keeps every BAR area trapped: %s", s.id, e)
        log.info(
            "session %s: %s in PRE_COPY, mappable %s",
            s.id,
            s.device.id,
            [(a.region, a.offset, a.size) for a in areas],
        )

    def _stop_tracking(self, s: Session) -> None:
        if s.tracker is not None:
            s.tracker.stop()
        elif s.role is Role.SOURCE and s.phase is not Phase.PREPARED:
            # Recovered after a restart: this process never started the
            # device's DMA logging, but the one before may have. Stopping
            # what is not started is harmless; a device without the
            # feature says so.
            with contextlib.suppress(devmig_native.DevmigError):
                s.device.handle.dma_log_stop()

    def _traps_off(self, s: Session) -> None:
        """Passthrough again, as far as the device allows in its state now
        (RUNNING: re-read, not assumed). A VMM that does not answer keeps
        trapping: slower, never wrong."""
        try:
            self.vmm.traps(s.device.id, False, tracking.mappable_areas(s.device.handle))
        except VmmError as e:
            self.observer.error(e.reason)
            log.warning("session %s: traps stay on: %s", s.id, e)

    def _vmm_resume(self, s: Session) -> None:
        if not s.vmm_paused:
            return
        try:
            self.vmm.resume(s.device.id)
            s.vmm_paused = False
        except VmmError as e:
            self.observer.error(e.reason)
            log.error("session %s: the VMM did not resume: %s", s.id, e)

    def stop_and_copy(
        self, session_id: str, token: str, vm_sessions: list[tuple[str, str]]
    ) -> Snapshot:
        with self._lock:
            s = self._find(session_id, token)
            if s.role is not Role.SOURCE:
                raise SessionError(
                    Code.FAILED_PRECONDITION, "WrongRole", "StopAndCopy is for sources"
                )
            if s.phase is Phase.PRE_COPY:
                group = [self._find(i, t) for i, t in vm_sessions] or [s]
                # The guest stops before its devices do: a vCPU must not
                # program a device that is leaving PRE_COPY.
                for g in group:
                    if g.phase is Phase.PRE_COPY and not g.vmm_paused:
                        try:
                            self.vmm.pause(g.device.id)
                        except VmmError as e:
                            self.observer.error(e.reason)
                            raise SessionError(Code.UNAVAILABLE, e.reason, e.message) from e
                        g.vmm_paused = True
                        self._record(g)
                try:
                    if len(group) > 1:
                        # Every device of the VM stops initiating P2P DMA
                        # before any of them stops: none may write into a
                        # peer that is already stopped.
                        for g in group:
                            if g.phase is Phase.PRE_COPY:
                                g.transfer.quiesce_p2p()
                    for g in group:
                        if g.phase is Phase.PRE_COPY:
                            # The pump moves the device to STOP_COPY and
                            # returns once it stopped (or recovered).
                            g.transfer.stop_copy()
                            g.stopped_at_ns = g.transfer.stopped_at_ns or self.clock_ns()
                            g.phase = Phase.STOP_COPY
                            self._record(g)
                except devmig_native.DevmigError as e:
                    raise SessionError(
                        Code.FAILED_PRECONDITION,
                        "DeviceStateChangeFailed",
                        f"stop-and-copy failed: {e}; the device is {s.device.handle.state.name}",
                    ) from e
            return self._snapshot(s)

    def resume(
        self,
        session_id: str,
        token: str,
        wait_s: float = 0.0,
        alive: Callable[[], bool] = lambda: True,
        vm_sessions: list[tuple[str, str]] | None = None,
    ) -> Snapshot:
        """Resume a verified target. ``wait_s`` > 0: wait that long for a
        stream still arriving (PREPARED), resuming as soon as it verifies;
        still arriving after that is DEADLINE_EXCEEDED StreamNotVerified.
        ``vm_sessions``: the VM's target sessions when it has several
        devices; all go to RUNNING_P2P before any goes to RUNNING."""
        with self._lock:
            s = self._find(session_id, token)
            if s.role is not Role.TARGET:
                raise SessionError(Code.FAILED_PRECONDITION, "WrongRole", "Resume is for targets")
            group = [self._find(i, t) for i, t in vm_sessions or []]
            if s not in group:
                group.insert(0, s)
            if len(group) > 1:
                self._resume_group(group)
                return self._snapshot(s)
            end = time.monotonic() + wait_s
            if s.phase is Phase.PREPARED and wait_s > 0 and not s.resume_on_verify:
                # Journaled before the wait, as before any device action:
                # the sink moves the device to RUNNING as soon as the
                # stream verifies (on_transfer_done), with no journal
                # write or thread hand-off in the guest's downtime.
                s.resume_on_verify = True
                self._record(s)
            while s.phase is Phase.PREPARED and wait_s > 0:
                left = end - time.monotonic()
                if left <= 0 or not alive():
                    # Nobody waits any more: a stream verified later waits
                    # for the operator's Resume again.
                    s.resume_on_verify = False
                    self._record(s)
                    raise SessionError(
                        Code.DEADLINE_EXCEEDED,
                        "StreamNotVerified",
                        f"session {session_id}: the stream is still arriving",
                    )
                # Woken by on_transfer_done; the slice bounds how long a
                # caller that went away keeps this thread.
                self._changed.wait(min(left, RESUME_WAIT_SLICE_S))
            if s.phase is Phase.TRANSFERRED and s.device.handle.state is not MigState.RUNNING:
                self._set_state(s, MigState.RUNNING, MigState.STOP)
                s.running_at_ns = self.clock_ns()
                self._record(s)
            elif s.phase not in (Phase.TRANSFERRED, Phase.SUCCEEDED):
                raise SessionError(
                    Code.FAILED_PRECONDITION,
                    "StreamNotVerified",
                    f"session {session_id} is {s.phase.value}: "
                    f"{s.message or 'stream not complete'}",
                )
            return self._snapshot(s)

    def _resume_group(self, group: list[Session]) -> None:
        """Several devices of one VM: every stream verified first, then each
        device RESUMING/STOP -> RUNNING_P2P (the kernel's own path to
        RUNNING passes there too, one device at a time), then each to
        RUNNING: no device initiates P2P DMA while a peer does not run yet,
        as on the source none stopped while a peer still initiated it.
        Repeats find the devices where they are and go on."""
        for g in group:
            if g.role is not Role.TARGET:
                raise SessionError(
                    Code.FAILED_PRECONDITION, "WrongRole", f"session {g.id} is not a target"
                )
            if g.phase not in (Phase.TRANSFERRED, Phase.SUCCEEDED):
                raise SessionError(
                    Code.FAILED_PRECONDITION,
                    "StreamNotVerified",
                    f"session {g.id} is {g.phase.value}: {g.message or 'stream not complete'}",
                )
        waiting = [g for g in group if g.device.handle.state is not MigState.RUNNING]
        for g in waiting:
            if (
                g.device.handle.state is not MigState.RUNNING_P2P
                and devmig_native.MigFlags.P2P in g.device.handle.flags
            ):
                self._set_state(g, MigState.RUNNING_P2P, MigState.STOP)
                self._record(g)
        for g in waiting:
            self._set_state(g, MigState.RUNNING, MigState.STOP)
            g.running_at_ns = self.clock_ns()
            self._record(g)

    def finish(self, session_id: str, token: str) -> Snapshot:
        with self._lock:
            s = self._find(session_id, token)
            if s.phase is Phase.SUCCEEDED:
                return self._snapshot(s)
            if s.role is Role.TARGET:
                if not s.running_at_ns or s.device.handle.state is not MigState.RUNNING:
                    raise SessionError(
                        Code.FAILED_PRECONDITION,
                        "NotCommitted",
                        f"target device is {s.device.handle.state.name}",
                    )
            else:
                if s.phase is not Phase.TRANSFERRED:
                    raise SessionError(
                        Code.FAILED_PRECONDITION,
                        "NotTransferred",
                        f"source session is {s.phase.value}",
                    )
                # The target runs: this device's state lives there now.
                self._set_state(s, MigState.STOP, MigState.STOP)
            self.transfers.close(s)
            if s.role is Role.TARGET:
                # The commit point is recorded: the guest may run here.
                try:
                    self.vmm.resume(s.device.id)
                except VmmError as e:
                    self.observer.error(e.reason)
                    raise SessionError(Code.UNAVAILABLE, e.reason, e.message) from e
            self._stop_tracking(s)
            s.phase = Phase.SUCCEEDED
            s.recovery_deadline_ns = 0
            self.registry.release(s.device.id, s.id)
            self._record(s)
            return self._snapshot(s)

    def abort(self, session_id: str, token: str, reason: str) -> Snapshot | None:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                return None  # nothing to roll back
            s = self._find(session_id, token)
            if s.phase in (Phase.ABORTED,):
                return self._snapshot(s)
            # A target past Resume runs the guest's device: only forward.
            # (A target reset after a failed stream is RUNNING too, with its
            # own state; that one may be aborted.)
            if s.role is Role.TARGET and (s.phase is Phase.SUCCEEDED or s.running_at_ns):
                raise SessionError(
                    Code.FAILED_PRECONDITION, "PastCommitPoint", "the target device already runs"
                )
            if s.role is Role.SOURCE and s.phase is Phase.SUCCEEDED:
                raise SessionError(
                    Code.FAILED_PRECONDITION, "PastCommitPoint", "the source device was released"
                )
            self._roll_back(s, "Aborted", reason or "aborted")
            return self._snapshot(s)

    def _roll_back(self, s: Session, reason: str, message: str) -> None:
        """Source RUNNING again with full passthrough and its VMM running;
        target reset and released. Caller holds the lock and checked that
        the session is before the commit point."""
        if s.phase is Phase.FAILED and s.reason == "DeviceReset":
            # Nothing of this session is left on the device.
            s.phase, s.reason, s.message = Phase.ABORTED, reason, message
            self._record(s)
            return
        # Stops a running pump and waits for it: the device is free.
        self.transfers.close(s)
        if s.role is Role.SOURCE:
            # Back to RUNNING: the guest keeps its device here.
            if s.device.handle.state is not MigState.RUNNING:
                self._set_state(s, MigState.RUNNING, MigState.ERROR)
            self._stop_tracking(s)
            self._traps_off(s)
            self._vmm_resume(s)
        else:
            # A target's partial state must never run: reset it.
            s.device.handle.reset()
        s.phase, s.reason, s.message = Phase.ABORTED, reason, message
        s.recovery_deadline_ns = 0
        self.registry.release(s.device.id, s.id)
        self._record(s)

    # ------------------------------------------------------ crash safety

    def shutdown(self, reason: str = "agent stopping") -> list[str]:
        """Leave no session half-done before the process exits; returns
        the ids of the sessions it changed.

        - source PRE_COPY, or STOP_COPY with the stream cut short: rolled
          back (RUNNING, traps off, VMM resumed), ABORTED "AgentShutdown".
        - source whose stream completed (STOP_COPY with the pump done,
          TRANSFERRED): the target may commit from it, so it is never rolled
          back here; the device is parked in STOP with its state and stays
          claimed, awaiting the operator (Abort or FinishSession).
        - target not yet RUNNING: reset and released, ABORTED "AgentShutdown".
        - source PREPARED and target RUNNING are left as they are: nothing of
          them is in flight.
        """
        changed: list[str] = []
        with self._lock:
            self._closing = True
            for s in list(self._sessions.values()):
                if s.phase.final:
                    continue
                try:
                    if self._shutdown_one(s, reason):
                        changed.append(s.id)
                except SessionError as e:
                    log.error("session %s: could not be settled at shutdown: %s", s.id, e)
        return changed

    def _shutdown_one(self, s: Session, reason: str) -> bool:
        if s.role is Role.TARGET:
            if s.running_at_ns:
                return False  # past the commit point: only forward
            self._roll_back(s, "AgentShutdown", f"rolled back: {reason}")
            return True
        if s.phase is Phase.PREPARED:
            return False
        complete = s.phase is Phase.TRANSFERRED
        if s.phase is Phase.STOP_COPY and s.transfer is not None:
            # Cancel first, then ask: a pump that sent its trailer before
            # the cancel may have given the target all it needs; asking
            # first would race with a pump finishing in between.
            self.transfers.close(s)
            complete = bool(s.transfer.stream_complete())
        if not complete:
            self._roll_back(s, "AgentShutdown", f"rolled back: {reason}")
            return True
        self.transfers.close(s)
        self._park(s, f"{reason}; the stream was complete")
        return True

    def _park(self, s: Session, why: str) -> None:
        """A source whose stream may have reached the target: keep its
        state in STOP (the design's "source keeps its state until the commit
        point is recorded") and wait for the operator, without a deadline."""
        if s.device.handle.state not in (MigState.STOP, MigState.RUNNING):
            self._set_state(s, MigState.STOP, MigState.ERROR)
        if s.phase is Phase.STOP_COPY:
            s.phase = Phase.TRANSFERRED
        s.reason = "AwaitingCommitDecision"
        s.message = (
            f"{why}: the target may have committed; the device waits in "
            f"{s.device.handle.state.name} for Abort (roll back) or FinishSession"
        )
        s.recovery_deadline_ns = 0
        self._record(s)

    def recover(
        self,
        reacquirer: DeviceReacquirer | None = None,
        deadline_s: float = DEFAULT_RECOVERY_DEADLINE_SECONDS,
    ) -> list[Snapshot]:
        """Take over the journal's sessions at start; returns those that
        were not final. Call once, before serving.

        Every session answers GetSession again (its token's hash is in the
        journal). A session whose device lost its state is FAILED
        "DeviceReset". One whose device kept it is re-adopted with the
        device's actual state; what must not stay as it is gets a deadline
        (``expire_recovery``): a source in PRE_COPY (rolled back), a target
        not yet RUNNING (reset). A source whose stream may have completed is
        parked in STOP for the operator, with no deadline (see ``shutdown``).
        """
        reacquirer = reacquirer or RegistryReacquirer(self.registry)
        now = self.clock_ns()
        deadline_ns = now + int(deadline_s * 1e9)
        open_: list[Snapshot] = []
        with self._lock:
            for rec in self.journal.all():
                if rec.session_id in self._sessions:
                    continue
                s = self._adopt(rec, reacquirer, deadline_ns)
                if s is None:
                    continue
                self._sessions[s.id] = s
                if not rec.final:
                    open_.append(self._snapshot(s))
        return open_

    def _adopt(
        self, rec: journalmod.SessionRecord, reacquirer: DeviceReacquirer, deadline_ns: int
    ) -> Session | None:
        extra = rec.extra
        incarnation = str(extra.get("incarnation", ""))
        dev = None if rec.final else reacquirer.reacquire(rec.device_id, incarnation)
        if dev is None:
            try:
                dev = self.registry.get(rec.device_id)
            except UnknownDevice:
                log.error(
                    "session %s: device %s is no longer on this node", rec.session_id, rec.device_id
                )
                return None
            lost = not rec.final
        else:
            lost = False
        s = Session(
            rec.session_id,
            Role(rec.role),
            dev,
            rec.token_sha256,
            phase=Phase(rec.phase),
            message=rec.message,
            reason=rec.reason,
            data_endpoint=rec.data_endpoint,
            stopped_at_ns=int(extra.get("stoppedAtUnixNanos", 0)),
            running_at_ns=int(extra.get("runningAtUnixNanos", 0)),
            vmm_paused=bool(extra.get("vmmPaused", False)),
        )
        s.recorded_phase, s.phase_since_ns = s.phase, rec.updated_at_unix_nanos
        if rec.final:
            return s
        if lost:
            # The device's last fd closed with the old process (always so
            # for a simulated device, which lives in the agent): its state,
            # and this session's part of it, is gone.
            s.phase, s.reason = Phase.FAILED, "DeviceReset"
            s.message = (
                f"the agent restarted in {rec.phase} and {rec.device_id} did not keep its "
                "state (no process held it open): "
                + (
                    "the guest's device state on this node is lost"
                    if s.role is Role.SOURCE and rec.device_state != "RUNNING"
                    else "nothing of this session is left on the device"
                )
            )
            self._record(s)
            log.error("session %s: %s", s.id, s.message)
            return s
        try:
            self.registry.hold(dev.id, s.id)
        except (UnknownDevice, DeviceBusy) as e:
            log.error("session %s: cannot take %s back: %s", s.id, dev.id, e)
        state = dev.handle.get_state()  # the device's own word, not the journal's
        log.warning(
            "session %s (%s of %s) found %s with the device %s",
            s.id,
            s.role.value,
            dev.id,
            s.phase.value,
            state.name,
        )
        if s.role is Role.SOURCE:
            if s.phase is Phase.PREPARED and state is MigState.RUNNING:
                pass  # nothing in flight
            elif s.phase in (Phase.STOP_COPY, Phase.TRANSFERRED):
                self._park(s, "the agent restarted after stop-and-copy")
                return s
            else:
                s.recovery_deadline_ns = deadline_ns
        elif not s.running_at_ns or state is not MigState.RUNNING:
            if s.phase is Phase.PREPARED:
                s.reason = "StreamInterrupted"
            s.recovery_deadline_ns = deadline_ns
        if s.recovery_deadline_ns:
            s.message = (
                f"the agent restarted in {s.phase.value} with the device {state.name}; "
                "waiting for the operator's decision until "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(deadline_ns / 1e9))}, "
                "then rolling back"
            )
        self._record(s)
        return s

    def next_recovery_deadline(self) -> int:
        """The earliest pending recovery deadline (unix ns), or 0."""
        with self._lock:
            due = [
                s.recovery_deadline_ns
                for s in self._sessions.values()
                if s.recovery_deadline_ns and not s.phase.final
            ]
        return min(due, default=0)

    def expire_recovery(self) -> list[str]:
        """Roll back every recovered session whose deadline passed; returns
        their ids."""
        now = self.clock_ns()
        done: list[str] = []
        with self._lock:
            for s in list(self._sessions.values()):
                if s.phase.final or not s.recovery_deadline_ns or s.recovery_deadline_ns > now:
                    continue
                if s.role is Role.TARGET and s.running_at_ns:
                    s.recovery_deadline_ns = 0
                    continue
                try:
                    self._roll_back(
                        s,
                        "RecoveryDeadlineExpired",
                        "no decision from the operator after the agent restarted; rolled back",
                    )
                    self.observer.error("RecoveryDeadlineExpired")
                    done.append(s.id)
                except SessionError as e:
                    log.error("session %s: rollback after the deadline failed: %s", s.id, e)
        return done

    def run_recovery_deadlines(self, stop: threading.Event, idle_s: float = 60.0) -> None:
        """Background loop for ``expire_recovery``; ``idle_s``: how often to
        look when nothing is due (a deadline set later, e.g. by another
        recovery, is seen within it)."""
        while not stop.is_set():
            self.expire_recovery()
            nxt = self.next_recovery_deadline()
            wait = idle_s if not nxt else max(0.0, (nxt - self.clock_ns()) / 1e9)
            stop.wait(min(wait, idle_s))

    def reevaluate(self, device_id: str) -> None:
        """The device signalled that its mappable BAR areas changed (its
        re-evaluate hint): tell the VMM what is mappable now. Only a hint:
        the synchronous switch in StartPreCopy and rollback is what keeps
        traps correct; this catches changes the device makes on its own.
        Under the manager's lock, so it never interleaves with a switch
        (a read taken mid-switch could hand the VMM a stale, larger set)."""
        with self._lock:
            live = [
                s
                for s in self._sessions.values()
                if s.device.id == device_id and not s.phase.final and s.role is Role.SOURCE
            ]
            try:
                dev = self.registry.get(device_id)
            except UnknownDevice:
                return
            migrating = any(s.phase is not Phase.PREPARED for s in live)
            try:
                self.vmm.traps(device_id, migrating, tracking.mappable_areas(dev.handle))
            except VmmError as e:
                log.warning("re-evaluate hint for %s: the VMM did not follow: %s", device_id, e)

    # --------------------------------------------------------- lookups

    def sessions_for_device(self, device_id: str) -> list[Snapshot]:
        """Every session this agent knows on a device, oldest first."""
        with self._lock:
            return [self._snapshot(s) for s in self._sessions.values() if s.device.id == device_id]

    def wait_until(self, check: Callable[[], T | None], timeout_s: float) -> T | None:
        """Evaluate ``check`` now and after every session change until it
        gives something other than None or ``timeout_s`` passed (wall time,
        as the caller's own deadline is); returns its last value."""
        end = time.monotonic() + timeout_s
        with self._lock:
            while True:
                got = check()
                left = end - time.monotonic()
                if got is not None or left <= 0:
                    return got
                self._changed.wait(left)

    def counts(self) -> tuple[dict[Role, int], int, int]:
        """Active sessions by role, and bytes sent and received by all
        sessions of this process (monotonic: sessions are kept)."""
        active = {Role.SOURCE: 0, Role.TARGET: 0}
        sent = received = 0
        with self._lock:
            for s in self._sessions.values():
                if s.transfer is not None:
                    s.progress = s.transfer.progress()
                if not s.phase.final:
                    active[s.role] += 1
                sent += s.progress.bytes_sent
                received += s.progress.bytes_received
        return active, sent, received

    # ------------------------------------------------------------ progress

    def on_transfer_done(self, s: Session, error: Exception | None) -> None:
        """Called by the data path when a pump or sink ends."""
        with self._lock:
            if s.phase in (Phase.ABORTED, Phase.SUCCEEDED):
                return
            # The final counters, whatever reads the session next.
            if s.transfer is not None:
                s.progress = s.transfer.progress()
            if error is None:
                s.phase = Phase.TRANSFERRED
                s.message = (
                    "stream complete" if s.role is Role.SOURCE else "stream received and verified"
                )
                if (
                    s.role is Role.TARGET
                    and s.resume_on_verify
                    and s.device.handle.state is MigState.STOP
                ):
                    # The waiting Resume, carried out here (its intent was
                    # journaled before it waited); it finds RUNNING and
                    # answers. A failure is recorded by _set_state, and the
                    # waiting Resume reports it.
                    s.resume_on_verify = False
                    try:
                        self._set_state(s, MigState.RUNNING, MigState.STOP)
                        s.running_at_ns = self.clock_ns()
                    except SessionError:
                        return
            else:
                s.phase = Phase.FAILED
                s.reason = "StreamFailed" if s.role is Role.TARGET else "SendFailed"
                s.message = str(error)
                # Never resume a device from a stream that failed: the
                # native sink already reset it; make sure.
                if s.role is Role.TARGET and s.device.handle.state is not MigState.RUNNING:
                    s.device.handle.reset()
                if s.role is Role.SOURCE and s.device.handle.state is not MigState.RUNNING:
                    # The pump leaves the device in its saving state. A
                    # stream that failed cannot be verified, so the target
                    # never runs from it: the device goes back to RUNNING
                    # (traps off) at once. The VMM stays paused if it was:
                    # resuming the guest is the operator's call (Abort),
                    # since other devices of the VM may still be stopping.
                    try:
                        s.device.handle.set_state(MigState.RUNNING, MigState.ERROR)
                        self._stop_tracking(s)
                        self._traps_off(s)
                        s.message += f"; the device is {s.device.handle.state.name} again"
                    except devmig_native.DevmigError as e:
                        s.message += f"; back to RUNNING failed: {e}"
            self._record(s)

    def _snapshot(self, s: Session) -> Snapshot:
        if s.transfer is not None:
            s.progress = s.transfer.progress()
        if s.tracker is not None:
            s.progress.missed_traps = s.tracker.missed_traps()
        return Snapshot(
            session_id=s.id,
            role=s.role,
            device_id=s.device.id,
            phase=s.phase,
            device_state=s.device.handle.state.name,
            progress=dataclasses.replace(s.progress),
            message=s.message,
            reason=s.reason,
            stopped_at_unix_nanos=s.stopped_at_ns,
            running_at_unix_nanos=s.running_at_ns,
            data_endpoint=s.data_endpoint,
        )

    def get(self, session_id: str, token: str) -> Snapshot:
        with self._lock:
            return self._snapshot(self._find(session_id, token))

    def dirty_pages(
        self, session_id: str, token: str, interval_ms: int, alive: Callable[[], bool]
    ) -> Iterator[tuple[int, bytes, bool]]:
        """(page_size, encoded bitmap, final) for the source's guest pages the
        device dirtied: first every page reported since pre-copy began, then
        what is new each interval, and a final sync once the device stopped
        (it starts no DMA after STOP_COPY). See tracking.DirtyTracker for
        where the pages come from."""
        interval = (interval_ms or DEFAULT_PROGRESS_INTERVAL_MS) / 1000.0
        key = object()
        with self._lock:
            s = self._find(session_id, token)
            tracker = self._tracker(s)
            tracker.subscribe(key)
        try:
            while True:
                with self._lock:
                    npages, out, final = self._take_dirty(s, tracker, key)
                yield PAGE_SIZE, devmig_native.bitmap_encode(out, npages, PAGE_SIZE), final
                if final or not alive():
                    return
                with self._lock:
                    self._changed.wait(interval)
        finally:
            tracker.unsubscribe(key)

    def _tracker(self, s: Session) -> tracking.DirtyTracker:
        if s.role is not Role.SOURCE:
            raise SessionError(
                Code.FAILED_PRECONDITION, "NotSource", "dirty pages come from the source"
            )
        if s.phase is Phase.PREPARED or s.tracker is None:
            raise SessionError(Code.FAILED_PRECONDITION, "NotStarted", "pre-copy has not started")
        if not s.tracker.available:
            raise SessionError(
                Code.FAILED_PRECONDITION,
                "NoDirtySource",
                f"device {s.device.id} offers no DMA dirty tracking "
                "(no DMA logging, or no guest IOVA ranges from its VMM)",
            )
        return s.tracker

    def _take_dirty(
        self, s: Session, tracker: tracking.DirtyTracker, key: object
    ) -> tuple[int, bytes, bool]:
        # Final once the device stopped for good in this session: it starts
        # no DMA after STOP_COPY, so this read holds the last pages.
        final = s.phase is not Phase.PRE_COPY
        if tracker.logging or tracker.sim is not None:
            try:
                tracker.collect()
            except devmig_native.DevmigError as e:
                raise SessionError(
                    Code.FAILED_PRECONDITION, "DirtyLogUnreadable", f"reading the DMA log: {e}"
                ) from e
        return tracker.npages, tracker.take(key), final

    def vmm_dirty(self, device_id: str) -> tuple[int, int, bytes, bool]:
        """The VMM's dirty-page pull: (page_size, npages, bitmap, final), the
        pages dirtied since this device's VMM pulled last (the first pull:
        since pre-copy began)."""
        with self._lock:
            sources = [
                s
                for s in self._sessions.values()
                if s.device.id == device_id and s.role is Role.SOURCE
            ]
            live = [s for s in sources if not s.phase.final]
            # A migration that succeeded keeps its last pages for the VMM
            # until it pulled them once: the commit may come before the
            # VMM's final pull (the VM is paused meanwhile, so nothing is
            # lost by waiting).
            done = [
                s
                for s in sources
                if s.phase is Phase.SUCCEEDED and s.tracker is not None and not s.vmm_final_pulled
            ]
            for s in live or done[-1:]:
                tracker = self._tracker(s)
                npages, out, final = self._take_dirty(s, tracker, ("vmm", device_id))
                s.vmm_final_pulled = final
                return PAGE_SIZE, npages, out, final
        raise SessionError(
            Code.FAILED_PRECONDITION, "NotMigrating", f"{device_id} is not a migration's source"
        )

    def watch(
        self, session_id: str, token: str, interval_ms: int, alive: Callable[[], bool]
    ) -> Iterator[Snapshot]:
        """Snapshots at once, on every change, and at least every
        ``interval_ms`` while the session runs; ends after a final phase."""
        interval = (interval_ms or DEFAULT_PROGRESS_INTERVAL_MS) / 1000.0
        with self._lock:
            snap = self._snapshot(self._find(session_id, token))
        while True:
            yield snap
            if snap.phase.final or not alive():
                return
            with self._lock:
                self._changed.wait(interval)
                snap = self._snapshot(self._find(session_id, token))
