"""KubeVirt's migration node hooks, answered from this agent's sessions.

The operator drives a device migration (``DeviceMigration``) through both
agents; KubeVirt drives the VM's memory migration through virt-handler.
These hooks are where KubeVirt waits for devmig. The agent does not talk to
the operator here: it looks at its own sessions on the VMI's devices (the
devices the VMI's pod holds on this node, named by ``devmig.io/devices``)
and answers when they are far enough, or tells virt-handler to come back.

Semantics (each hook waits up to ``wait_seconds`` for a session change,
then answers; virt-handler retries a failed hook with rate limiting):

- ``PreMigrationTarget`` (target node): OK once every device has a target
  session that is prepared (RESUMING with its data endpoint open) or
  further. Before that ``UNAVAILABLE TargetNotPrepared``. The sessions
  found are bound to this migration (VMI UID, migration UID) for
  ``PostMigrationTarget``.
- ``PreMigrationSource`` (source node, just before libvirt starts copying
  memory): OK once every device's source session is in PRE_COPY or later.
  Pre-copy is when dirty tracking and traps are on; memory copied before
  that could miss pages the device writes by DMA, so the memory migration
  must not start earlier. Before that ``UNAVAILABLE SourceNotInPreCopy``.
- ``PostMigrationTarget`` (target node, the domain active there, before
  KubeVirt marks the migration completed): OK once every bound target
  session's device is RUNNING (Resume, the commit point). Before that
  ``UNAVAILABLE TargetNotResumed``.

A session this migration was waiting for that ends ABORTED or FAILED
answers ``ABORTED DeviceMigrationRolledBack``: the device stays (or went
back) on the source, so KubeVirt's migration must not go on; cancelling the
VirtualMachineInstanceMigration is the operator's part. All checks read
session state only, so repeats are harmless.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from devmig_agent.devices import DeviceRegistry
from devmig_agent.hooks_kubevirt import HookError, HookErrorKind, HookVmi, select_devices
from devmig_agent.podresources import Holder
from devmig_agent.sessions import Phase, Role, SessionManager, Snapshot

log = logging.getLogger(__name__)

# How long one hook call waits for the sessions before answering
# UNAVAILABLE, seconds: virt-handler's default node-hook deadline is 30 s
# (nodeHooks[].timeout); 20 s leaves 10 s for the dial and the answer, so
# virt-handler sees our reason instead of DeadlineExceeded.
DEFAULT_WAIT_SECONDS = 20.0

DevicesOf = Callable[[HookVmi], list[str]]

_SOURCE_READY = (Phase.PRE_COPY, Phase.STOP_COPY, Phase.TRANSFERRED)
_TARGET_READY = (Phase.PREPARED, Phase.TRANSFERRED, Phase.SUCCEEDED)


def registry_devices(registry: DeviceRegistry) -> DevicesOf:
    """The VMI's devices from who holds what in the registry (filled from
    the kubelet's pod resources, or ``--sim-holder``)."""

    def devices_of(vmi: HookVmi) -> list[str]:
        held = [
            Holder(
                device_id=d.id,
                resource_name=d.info.resource_name,
                pod=d.info.pod,
                container="",
                vmi=d.info.vmi,
            )
            for d in registry.all()
            if d.info.vmi
        ]
        return select_devices(vmi.devices, held, vmi.key)

    return devices_of


@dataclasses.dataclass
class _Bound:
    """The sessions one migration's hooks saw, per device."""

    sessions: dict[str, str] = dataclasses.field(default_factory=dict)


class SessionHooks:
    """``hooks_kubevirt.MigrationHooks`` over a ``SessionManager``."""

    def __init__(
        self,
        manager: SessionManager,
        devices_of: DevicesOf,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
    ) -> None:
        self.manager = manager
        self.devices_of = devices_of
        self.wait_seconds = wait_seconds
        self._lock = threading.Lock()
        # (VMI UID, migration UID, role) -> sessions seen in progress.
        self._bound: dict[tuple[str, str, Role], _Bound] = {}

    # ----------------------------------------------------------- helpers

    def _bound_for(self, vmi: HookVmi, role: Role) -> _Bound:
        with self._lock:
            return self._bound.setdefault((vmi.uid, vmi.migration_uid, role), _Bound())

    def _pick(self, device_id: str, role: Role, bound: _Bound) -> Snapshot | None:
        """The session of this migration on the device: the one seen
        before, else the newest one of the role still in progress."""
        snaps = [s for s in self.manager.sessions_for_device(device_id) if s.role is role]
        sid = bound.sessions.get(device_id)
        if sid:
            for s in snaps:
                if s.session_id == sid:
                    return s
        live = [s for s in snaps if not s.phase.final]
        if live:
            return live[-1]
        # A repeat after this agent restarted (nothing bound): a target
        # that already finished is running here.
        done = [s for s in snaps if s.phase is Phase.SUCCEEDED and role is Role.TARGET]
        return done[-1] if done else None

    def _wait(
        self,
        vmi: HookVmi,
        role: Role,
        ready: Callable[[Snapshot], bool],
        reason: str,
        what: str,
    ) -> None:
        devices = self.devices_of(vmi)
        bound = self._bound_for(vmi, role)

        def check() -> list[Snapshot] | None:
            found: list[Snapshot] = []
            for d in devices:
                s = self._pick(d, role, bound)
                if s is None:
                    return None
                bound.sessions[d] = s.session_id
                if s.phase in (Phase.ABORTED, Phase.FAILED):
                    raise HookError(
                        HookErrorKind.ABORTED,
                        "DeviceMigrationRolledBack",
                        f"session {s.session_id} of {d} ended {s.phase.value}"
                        f" ({s.reason or '-'}: {s.message}); VMI {vmi.key} keeps its device",
                    )
                if not ready(s):
                    return None
                found.append(s)
            return found

        if self.manager.wait_until(check, self.wait_seconds) is None:
            have = ", ".join(f"{d}: {bound.sessions.get(d) or 'no session'}" for d in devices)
            raise HookError(
                HookErrorKind.UNAVAILABLE,
                reason,
                f"VMI {vmi.key}: {what} not yet for every device ({have})",
            )
        log.info("VMI %s: %s for %s", vmi.key, what, ", ".join(devices))

    # ------------------------------------------------------------- hooks

    def pre_migration_target(self, vmi: HookVmi) -> None:
        self._wait(
            vmi,
            Role.TARGET,
            lambda s: s.phase in _TARGET_READY,
            "TargetNotPrepared",
            "target device prepared",
        )

    def pre_migration_source(self, vmi: HookVmi) -> None:
        self._wait(
            vmi,
            Role.SOURCE,
            lambda s: s.phase in _SOURCE_READY,
            "SourceNotInPreCopy",
            "device pre-copy started",
        )

    def post_migration_target(self, vmi: HookVmi) -> None:
        self._wait(
            vmi,
            Role.TARGET,
            lambda s: s.device_state == "RUNNING" and s.running_at_unix_nanos > 0,
            "TargetNotResumed",
            "target device running",
        )
