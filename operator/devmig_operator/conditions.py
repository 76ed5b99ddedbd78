"""The DeviceMigration status contract: condition types, reasons, phases.

Every reason devmig writes is defined here, once, in CamelCase, so that
users can match on them (``kubectl wait --for=condition=Succeeded``) and the
chart's alert rules and the docs can list them.
"""

from __future__ import annotations

import calendar
import datetime
import enum
import time
from collections.abc import Mapping, Sequence
from typing import Any


class Phase(enum.StrEnum):
    """DeviceMigration ``status.phase``, for display; conditions carry the contract."""

    PENDING = "Pending"
    VALIDATING = "Validating"
    PREPARING_TARGET = "PreparingTarget"
    PRE_COPY = "PreCopy"
    STOP_AND_COPY = "StopAndCopy"
    RESUMING = "Resuming"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ABORTED = "Aborted"

    @property
    def final(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.ABORTED)


class ConditionType(enum.StrEnum):
    READY = "Ready"  # validated: a compatible target is chosen and claimed
    PROGRESSING = "Progressing"  # a phase is running
    SUCCEEDED = "Succeeded"  # the devices run on the target; final
    FAILED = "Failed"  # rolled back or lost; final


class Reason(enum.StrEnum):
    # Progressing
    CREATED = "Created"
    VALIDATING = "Validating"
    PREPARING_TARGET = "PreparingTarget"
    PRE_COPYING = "PreCopying"
    STOPPING_AND_COPYING = "StoppingAndCopying"
    RESUMING = "Resuming"
    # Ready
    TARGET_CLAIMED = "TargetClaimed"
    NO_COMPATIBLE_TARGET = "NoCompatibleTarget"
    # Succeeded
    MIGRATED = "Migrated"
    # Failed / Aborted
    VMI_NOT_FOUND = "VMINotFound"
    VMI_NOT_RUNNING = "VMINotRunning"
    NO_MIGRATABLE_DEVICES = "NoMigratableDevices"
    DEVICE_NOT_MIGRATABLE = "DeviceNotMigratable"
    INVALID_SPEC = "InvalidSpec"
    AGENT_UNAVAILABLE = "AgentUnavailable"
    AGENT_ERROR = "AgentError"
    NOT_CONVERGED = "PreCopyNotConverged"
    COMPLETION_TIMEOUT = "CompletionTimeout"
    CANCELLED = "Cancelled"
    ROLLED_BACK = "RolledBack"
    MISSED_TRAPS = "MissedTraps"
    UNSUPPORTED_PHASE = "UnsupportedPhase"


def now() -> str:
    """Kubernetes time format, seconds precision, UTC."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(ts: str) -> float:
    """Seconds since the epoch of a time written by ``now``."""
    return float(calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")))


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: ConditionType,
    status: bool,
    reason: Reason,
    message: str,
    generation: int,
    at: str,
) -> list[dict[str, Any]]:
    """Return ``conditions`` with ``type_`` set. ``lastTransitionTime``
    changes only when the status changes, as Kubernetes conventions require."""
    want = "True" if status else "False"
    out: list[dict[str, Any]] = []
    found = False
    for c in conditions or ():
        if c.get("type") != type_.value:
            out.append(dict(c))
            continue
        found = True
        out.append(
            {
                "type": type_.value,
                "status": want,
                "reason": reason.value,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": c.get("lastTransitionTime", at)
                if c.get("status") == want
                else at,
            }
        )
    if not found:
        out.append(
            {
                "type": type_.value,
                "status": want,
                "reason": reason.value,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": at,
            }
        )
    return out


# What each phase says through the conditions: (Progressing?, its reason).
_PROGRESSING_REASON = {
    Phase.PENDING: Reason.CREATED,
    Phase.VALIDATING: Reason.VALIDATING,
    Phase.PREPARING_TARGET: Reason.PREPARING_TARGET,
    Phase.PRE_COPY: Reason.PRE_COPYING,
    Phase.STOP_AND_COPY: Reason.STOPPING_AND_COPYING,
    Phase.RESUMING: Reason.RESUMING,
}


def phase_status(
    status: Mapping[str, Any],
    phase: Phase,
    generation: int,
    at: str,
    reason: Reason | None = None,
    message: str = "",
) -> dict[str, Any]:
    """The status patch that moves a DeviceMigration to ``phase``: phase,
    a transition record with its time, and the conditions that go with it.
    Idempotent: re-entering the current phase changes nothing but the
    message."""
    out: dict[str, Any] = {"phase": phase.value, "observedGeneration": generation}
    transitions = list(status.get("phaseTransitions") or [])
    if status.get("phase") != phase.value:
        transitions.append({"phase": phase.value, "time": at})
        out["phaseTransitions"] = transitions[-32:]  # the CRD's maxItems
    if message:
        out["message"] = message
    conds = status.get("conditions")
    if phase in _PROGRESSING_REASON:
        conds = set_condition(
            conds,
            ConditionType.PROGRESSING,
            True,
            reason or _PROGRESSING_REASON[phase],
            message or f"{phase.value}",
            generation,
            at,
        )
    else:
        conds = set_condition(
            conds,
            ConditionType.PROGRESSING,
            False,
            reason or Reason.MIGRATED,
            message,
            generation,
            at,
        )
        conds = set_condition(
            conds,
            ConditionType.SUCCEEDED,
            phase is Phase.SUCCEEDED,
            Reason.MIGRATED if phase is Phase.SUCCEEDED else (reason or Reason.ROLLED_BACK),
            message or phase.value,
            generation,
            at,
        )
        conds = set_condition(
            conds,
            ConditionType.FAILED,
            phase is not Phase.SUCCEEDED,
            reason or (Reason.MIGRATED if phase is Phase.SUCCEEDED else Reason.ROLLED_BACK),
            message or phase.value,
            generation,
            at,
        )
        if "completionTime" not in status:
            out["completionTime"] = at
    if "startTime" not in status:
        out["startTime"] = at
    out["conditions"] = conds
    return out
