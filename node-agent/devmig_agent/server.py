"""gRPC servicer: translates between the proto API and the agent's domain.

Only this module knows the generated proto classes; session logic lives in
``sessions`` and takes plain Python values. Errors leave as gRPC status
codes whose details begin with a CamelCase reason ("UnknownSession: ...").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar, cast

import grpc

import devmig_agent
import devmig_native
from devmig.agent.v1alpha1 import agent_pb2, agent_pb2_grpc
from devmig_agent.devices import DeviceRegistry, ManagedDevice, UnknownDevice
from devmig_agent.inventory import InventoryDevice
from devmig_agent.sessions import (
    RESUME_DEADLINE_MARGIN_S,
    Code,
    Role,
    SessionError,
    SessionManager,
    Snapshot,
)

T = TypeVar("T")

# API versions this agent serves, newest first.
API_VERSIONS = ("v1alpha1",)

_CODES = {
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}
_FLAGS = {
    "STOP_COPY": agent_pb2.MIGRATION_FLAG_STOP_COPY,
    "P2P": agent_pb2.MIGRATION_FLAG_P2P,
    "PRE_COPY": agent_pb2.MIGRATION_FLAG_PRE_COPY,
}
_TRACKING = {
    "TYPE1": agent_pb2.DIRTY_TRACKING_TYPE1,
    "DMA_LOGGING": agent_pb2.DIRTY_TRACKING_DMA_LOGGING,
    "IOMMUFD_HWPT": agent_pb2.DIRTY_TRACKING_IOMMUFD_HWPT,
    "TRAPS": agent_pb2.DIRTY_TRACKING_TRAPS,
}


def state_enum(name: str) -> int:
    """A kernel state name as the proto's VfioDeviceState value."""
    return int(agent_pb2.VfioDeviceState.Value(f"VFIO_DEVICE_STATE_{name}"))


def device_message(d: ManagedDevice | InventoryDevice) -> agent_pb2.Device:
    """A device for ListDevices: one the agent holds open (with its state
    and session), or one it only found on the node (state unspecified)."""
    i = d.info if isinstance(d, ManagedDevice) else d
    managed = d if isinstance(d, ManagedDevice) else None
    return agent_pb2.Device(
        id=i.id,
        resource_name=i.resource_name,
        vendor_id=i.vendor_id,
        device_id=i.device_id,
        subsystem_vendor_id=i.subsystem_vendor_id,
        subsystem_device_id=i.subsystem_device_id,
        driver=i.driver,
        driver_version=i.driver_version,
        mdev_type=i.mdev_type,
        iommu_group=i.iommu_group,
        migration_flags=[_FLAGS[f] for f in i.migration_flags if f in _FLAGS],
        dirty_tracking=[_TRACKING[t] for t in i.dirty_tracking if t in _TRACKING],
        estimated_state_bytes=i.estimated_state_bytes,
        migratable=i.migratable,
        not_migratable_reason=i.not_migratable_reason,
        pod=i.pod,
        vmi=i.vmi,
        state=state_enum(managed.handle.state.name) if managed else 0,
        session_id=managed.session_id if managed else "",
    )


def status_message(s: Snapshot) -> agent_pb2.SessionStatus:
    p = s.progress
    return agent_pb2.SessionStatus(
        session_id=s.session_id,
        role=agent_pb2.SESSION_ROLE_SOURCE
        if s.role is Role.SOURCE
        else agent_pb2.SESSION_ROLE_TARGET,
        device_id=s.device_id,
        phase=agent_pb2.SessionPhase.Value(f"SESSION_PHASE_{s.phase.value}"),
        device_state=state_enum(s.device_state),
        progress=agent_pb2.SessionProgress(
            bytes_sent=p.bytes_sent,
            bytes_received=p.bytes_received,
            remaining_bytes=p.remaining_bytes,
            dirty_rate_bytes_per_second=p.dirty_rate_bytes_per_second,
            throughput_bytes_per_second=p.throughput_bytes_per_second,
            pre_copy_iterations=p.pre_copy_iterations,
            missed_traps=p.missed_traps,
        ),
        message=s.message,
        reason=s.reason,
        stopped_at_unix_nanos=s.stopped_at_unix_nanos,
        running_at_unix_nanos=s.running_at_unix_nanos,
    )


def _abort(context: grpc.ServicerContext, e: SessionError) -> None:
    context.abort(_CODES[e.code], f"{e.reason}: {e.message}")


class NodeAgentServicer(agent_pb2_grpc.NodeAgentServicer):
    def __init__(
        self,
        node_name: str,
        registry: DeviceRegistry | None = None,
        sessions: SessionManager | None = None,
        operator_identities: frozenset[str] = frozenset(),
    ) -> None:
        self.node_name = node_name
        self.registry = registry or DeviceRegistry([])
        self.sessions = sessions
        # The names (certificate CN or SAN) a client must carry to drive
        # sessions; empty: any client the transport admitted. With mutual
        # TLS every agent also holds a certificate from the installation's
        # CA, and a peer agent has no business preparing, stopping or
        # resuming this node's devices.
        self.operator_identities = operator_identities

    def _require_operator(self, context: grpc.ServicerContext) -> None:
        if not self.operator_identities:
            return
        # grpc gives each property as a list of bytes (its stubs say bytes).
        auth = cast(Mapping[str, list[bytes]], context.auth_context())
        names = {
            v.decode(errors="replace")
            for k in ("x509_common_name", "x509_subject_alternative_name")
            for v in auth.get(k, [])
        }
        if not names & self.operator_identities:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"NotOperator: session RPCs are for the operator "
                f"({', '.join(sorted(self.operator_identities))}); the client is "
                f"{', '.join(sorted(names)) or 'unidentified'}",
            )

    def _sessions(self, context: grpc.ServicerContext) -> SessionManager:
        if self.sessions is None:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "NoSessions: this agent runs without a device backend and cannot migrate",
            )
        assert self.sessions is not None
        return self.sessions

    def _call(
        self,
        context: grpc.ServicerContext,
        fn: Callable[[SessionManager], T],
        control: bool = True,
    ) -> T:
        """Run one session verb (``control``: one that changes a session,
        for the operator alone); a SessionError leaves as its gRPC status."""
        if control:
            self._require_operator(context)
        m = self._sessions(context)
        try:
            return fn(m)
        except SessionError as e:
            _abort(context, e)
            raise  # context.abort raised already; this line is not reached

    def GetVersion(
        self, request: agent_pb2.GetVersionRequest, context: grpc.ServicerContext
    ) -> agent_pb2.GetVersionResponse:
        if request.api_version and request.api_version not in API_VERSIONS:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"UnsupportedApiVersion: this agent serves {', '.join(API_VERSIONS)}, "
                f"not {request.api_version!r}",
            )
        return agent_pb2.GetVersionResponse(
            api_versions=list(API_VERSIONS),
            agent_version=devmig_agent.__version__,
            native_version=devmig_native.version(),
            node_name=self.node_name,
        )

    def ListDevices(
        self, request: agent_pb2.ListDevicesRequest, context: grpc.ServicerContext
    ) -> agent_pb2.ListDevicesResponse:
        return agent_pb2.ListDevicesResponse(devices=self._device_messages())

    def _device_messages(self) -> list[agent_pb2.Device]:
        found: list[ManagedDevice | InventoryDevice] = [*self.registry.all()]
        found += self.registry.discovered()
        return [device_message(d) for d in found]

    def WatchDevices(
        self, request: agent_pb2.WatchDevicesRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.WatchDevicesResponse]:
        seen = -1
        while context.is_active():
            with self.registry.changed:
                if self.registry.generation == seen:
                    # Wake at least every 5 s to notice a client that went
                    # away without a message.
                    self.registry.changed.wait(5.0)
                gen = self.registry.generation
            if gen != seen:
                seen = gen
                yield agent_pb2.WatchDevicesResponse(devices=self._device_messages())

    def PrepareSource(
        self, request: agent_pb2.PrepareSourceRequest, context: grpc.ServicerContext
    ) -> agent_pb2.PrepareSourceResponse:
        snap = self._call(
            context,
            lambda m: m.prepare_source(
                request.session.session_id,
                request.session.token,
                request.device_id,
                request.bandwidth_bytes_per_second,
            ),
        )
        return agent_pb2.PrepareSourceResponse(
            status=status_message(snap),
            descriptor=device_message(self.registry.get(request.device_id)),
        )

    def PrepareTarget(
        self, request: agent_pb2.PrepareTargetRequest, context: grpc.ServicerContext
    ) -> agent_pb2.PrepareTargetResponse:
        if request.HasField("source_descriptor"):
            try:
                mine = self.registry.get(request.device_id).info
            except UnknownDevice:
                mine = None  # prepare_target answers NOT_FOUND below
            src = request.source_descriptor
            if mine is not None and (
                (src.vendor_id, src.device_id, src.driver, src.driver_version, src.mdev_type)
                != (
                    mine.vendor_id,
                    mine.device_id,
                    mine.driver,
                    mine.driver_version,
                    mine.mdev_type,
                )
            ):
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"IncompatibleDevice: {request.device_id} does not match the source "
                    f"({src.vendor_id:04x}:{src.device_id:04x} {src.driver} {src.driver_version})",
                )
        snap = self._call(
            context,
            lambda m: m.prepare_target(
                request.session.session_id, request.session.token, request.device_id
            ),
        )
        return agent_pb2.PrepareTargetResponse(
            status=status_message(snap), data_endpoint=snap.data_endpoint
        )

    def StartPreCopy(
        self, request: agent_pb2.StartPreCopyRequest, context: grpc.ServicerContext
    ) -> agent_pb2.StartPreCopyResponse:
        snap = self._call(
            context,
            lambda m: m.start_pre_copy(
                request.session.session_id, request.session.token, request.target_data_endpoint
            ),
        )
        return agent_pb2.StartPreCopyResponse(status=status_message(snap))

    def StopAndCopy(
        self, request: agent_pb2.StopAndCopyRequest, context: grpc.ServicerContext
    ) -> agent_pb2.StopAndCopyResponse:
        snap = self._call(
            context,
            lambda m: m.stop_and_copy(
                request.session.session_id,
                request.session.token,
                [(r.session_id, r.token) for r in request.vm_sessions],
            ),
        )
        return agent_pb2.StopAndCopyResponse(status=status_message(snap))

    def Resume(
        self, request: agent_pb2.ResumeRequest, context: grpc.ServicerContext
    ) -> agent_pb2.ResumeResponse:
        wait_s = 0.0
        if request.wait_for_stream:
            left = context.time_remaining()
            # No deadline: wait as a WatchSession would, a minute at most.
            left = 60.0 if left is None else left
            wait_s = max(left - RESUME_DEADLINE_MARGIN_S, 0.001)
        snap = self._call(
            context,
            lambda m: m.resume(
                request.session.session_id,
                request.session.token,
                wait_s,
                context.is_active,
                [(r.session_id, r.token) for r in request.vm_sessions],
            ),
        )
        return agent_pb2.ResumeResponse(status=status_message(snap))

    def FinishSession(
        self, request: agent_pb2.FinishSessionRequest, context: grpc.ServicerContext
    ) -> agent_pb2.FinishSessionResponse:
        snap = self._call(
            context, lambda m: m.finish(request.session.session_id, request.session.token)
        )
        return agent_pb2.FinishSessionResponse(status=status_message(snap))

    def Abort(
        self, request: agent_pb2.AbortRequest, context: grpc.ServicerContext
    ) -> agent_pb2.AbortResponse:
        snap = self._call(
            context,
            lambda m: m.abort(request.session.session_id, request.session.token, request.reason),
        )
        if snap is None:
            return agent_pb2.AbortResponse()
        return agent_pb2.AbortResponse(status=status_message(snap))

    def GetSession(
        self, request: agent_pb2.GetSessionRequest, context: grpc.ServicerContext
    ) -> agent_pb2.GetSessionResponse:
        # A read, with the session's token: peers and tools may ask too.
        snap = self._call(
            context,
            lambda m: m.get(request.session.session_id, request.session.token),
            control=False,
        )
        return agent_pb2.GetSessionResponse(status=status_message(snap))

    def WatchSession(
        self, request: agent_pb2.WatchSessionRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.WatchSessionResponse]:
        m = self._sessions(context)
        try:
            for snap in m.watch(
                request.session.session_id,
                request.session.token,
                request.progress_interval_ms,
                context.is_active,
            ):
                yield agent_pb2.WatchSessionResponse(status=status_message(snap))
        except SessionError as e:
            _abort(context, e)

    def WatchDirtyPages(
        self, request: agent_pb2.WatchDirtyPagesRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.WatchDirtyPagesResponse]:
        m = self._sessions(context)
        try:
            for page_size, data, final in m.dirty_pages(
                request.session.session_id, request.session.token, 0, context.is_active
            ):
                yield _dirty_response(page_size, data, final)
        except SessionError as e:
            _abort(context, e)


def _dirty_response(page_size: int, data: bytes, final: bool) -> agent_pb2.WatchDirtyPagesResponse:
    return agent_pb2.WatchDirtyPagesResponse(page_size=page_size, encoded_ranges=data, final=final)


def add_to_server(
    server: grpc.Server,
    node_name: str,
    registry: DeviceRegistry | None = None,
    sessions: SessionManager | None = None,
    operator_identities: frozenset[str] = frozenset(),
) -> NodeAgentServicer:
    servicer = NodeAgentServicer(node_name, registry, sessions, operator_identities)
    agent_pb2_grpc.add_NodeAgentServicer_to_server(servicer, server)
    return servicer
