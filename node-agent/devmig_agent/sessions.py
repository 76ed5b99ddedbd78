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
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import devmig_native
from devmig_agent import journal as journalmod
from devmig_agent.devices import DeviceBusy, DeviceRegistry, ManagedDevice, UnknownDevice
from devmig_native import MigState

log = logging.getLogger(__name__)


class Code(enum.Enum):
    """Error classes; server.py maps them to gRPC status codes."""

    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAVAILABLE = "UNAVAILABLE"
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


# How long a WatchSession waits for a change before sending progress anyway
# when the client gave no interval, milliseconds: often enough for a progress
# bar, rare enough to cost nothing.
DEFAULT_PROGRESS_INTERVAL_MS = 500


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
    ) -> None:
        self.registry = registry
        self.journal = journal
        self.transfers = transfers
        self.clock_ns = clock_ns
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, Session] = {}
        self._bandwidth: dict[str, int] = {}

    # ------------------------------------------------------------- internals

    def _find(self, session_id: str, token: str) -> Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise SessionError(Code.NOT_FOUND, "UnknownSession", f"no session {session_id!r}")
        if not token_matches(token, s.token_sha256):
            raise SessionError(
                Code.PERMISSION_DENIED, "BadSessionToken", f"wrong token for session {session_id!r}"
            )
        return s

    def _record(self, s: Session) -> None:
        """Journal the session, then wake watchers."""
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
                self._set_state(s, MigState.PRE_COPY, MigState.RUNNING)
                try:
                    s.transfer = self.transfers.start_sender(
                        s, endpoint, self._bandwidth.get(s.id, 0)
                    )
                except OSError as e:
                    self._set_state(s, MigState.RUNNING, MigState.RUNNING)
                    raise SessionError(
                        Code.UNAVAILABLE, "TargetUnreachable", f"cannot reach {endpoint}: {e}"
                    ) from e
                s.phase = Phase.PRE_COPY
                self._record(s)
            return self._snapshot(s)

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

    def resume(self, session_id: str, token: str) -> Snapshot:
        with self._lock:
            s = self._find(session_id, token)
            if s.role is not Role.TARGET:
                raise SessionError(Code.FAILED_PRECONDITION, "WrongRole", "Resume is for targets")
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
            s.phase = Phase.SUCCEEDED
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
            # Stops a running pump and waits for it: the device is free.
            self.transfers.close(s)
            if s.role is Role.SOURCE:
                # Back to RUNNING: the guest keeps its device here.
                self._set_state(s, MigState.RUNNING, MigState.ERROR)
            else:
                # A target's partial state must never run: reset it.
                s.device.handle.reset()
            s.phase, s.reason, s.message = Phase.ABORTED, "Aborted", reason or "aborted"
            self.registry.release(s.device.id, s.id)
            self._record(s)
            return self._snapshot(s)

    # ------------------------------------------------------------ progress

    def on_transfer_done(self, s: Session, error: Exception | None) -> None:
        """Called by the data path when a pump or sink ends."""
        with self._lock:
            if s.phase in (Phase.ABORTED, Phase.SUCCEEDED):
                return
            if error is None:
                s.phase = Phase.TRANSFERRED
                s.message = (
                    "stream complete" if s.role is Role.SOURCE else "stream received and verified"
                )
            else:
                s.phase = Phase.FAILED
                s.reason = "StreamFailed" if s.role is Role.TARGET else "SendFailed"
                s.message = str(error)
                # Never resume a device from a stream that failed: the
                # native sink already reset it; make sure.
                if s.role is Role.TARGET and s.device.handle.state is not MigState.RUNNING:
                    s.device.handle.reset()
            self._record(s)

    def _snapshot(self, s: Session) -> Snapshot:
        if s.transfer is not None:
            s.progress = s.transfer.progress()
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
