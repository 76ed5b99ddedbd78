"""The phase machine: runs the current phase's step, writes its result to
status before the next step begins (so a restart resumes where it stopped),
and turns failures, cancellation and timeouts into a rollback.

Called by the kopf handlers; free of kopf itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from devmig_operator import agents as agentsmod
from devmig_operator import metrics
from devmig_operator.conditions import (
    ConditionType,
    Phase,
    Reason,
    epoch,
    now,
    phase_status,
    set_condition,
)
from devmig_operator.context import Context
from devmig_operator.phases import (
    pre_copy,
    preparing_target,
    resuming,
    rollback,
    stop_and_copy,
    validating,
)
from devmig_operator.results import Done, Failed, Result, Wait

log = logging.getLogger("devmig_operator")

# (event type, reason, message) -> None; kopf's event posting in production.
Emit = Callable[[str, str, str], None]

# Steps per phase. A phase without a step here cannot be driven by this
# operator version (e.g. status written by a newer one): the migration fails
# with UnsupportedPhase rather than hanging.
Step = Callable[[Context, agentsmod.Agents, Callable[[], bytes]], Result]
STEPS: dict[Phase, Step] = {
    Phase.PENDING: lambda ctx, a, k: Done(Phase.VALIDATING),
    Phase.VALIDATING: lambda ctx, a, k: validating.target_claimed(ctx),
    Phase.PREPARING_TARGET: lambda ctx, a, k: preparing_target.targets_resuming(ctx, a, k()),
    Phase.PRE_COPY: lambda ctx, a, k: pre_copy.converged(ctx, a, k()),
    Phase.STOP_AND_COPY: lambda ctx, a, k: stop_and_copy.streams_verified(ctx, a, k()),
    Phase.RESUMING: lambda ctx, a, k: resuming.finished(ctx, a, k()),
}


# Seconds between retries of forward steps after the commit point.
COMMITTED_RETRY_S = 5.0


def _progressing_message(status: dict[str, Any]) -> str:
    for c in status.get("conditions") or []:
        if c.get("type") == ConditionType.PROGRESSING.value:
            return str(c.get("message", ""))
    return ""


def _write(ctx: Context, patch: dict[str, Any]) -> None:
    obj = ctx.cluster.patch_dm_status(ctx.namespace, ctx.name, patch)
    ctx.status = dict(obj.get("status") or {})


def _start_rollback(ctx: Context, final: Phase, reason: Reason, message: str, emit: Emit) -> None:
    if ctx.status.get("rollback"):
        return
    emit("Warning", reason.value, f"rolling back: {message}")
    log.info("%s/%s: rolling back (%s): %s", ctx.namespace, ctx.name, reason.value, message)
    _write(ctx, {"rollback": {"phase": final.value, "reason": reason.value, "message": message}})


def reconcile(
    ctx: Context, agents: agentsmod.Agents, key: Callable[[], bytes], emit: Emit
) -> float | None:
    """Drive the migration as far as it can go now. Returns the delay in
    seconds before it should be called again, or None when it is final."""
    while True:
        phase = Phase(ctx.status.get("phase") or Phase.PENDING.value)
        if phase.final:
            return None
        committed = bool(ctx.status.get("committed"))
        if not committed and not ctx.status.get("rollback"):
            if ctx.spec.get("cancel"):
                _start_rollback(
                    ctx, Phase.ABORTED, Reason.CANCELLED, "cancelled by spec.cancel", emit
                )
            elif ctx.status.get("startTime"):
                limit = int(ctx.policy.get("completionTimeoutSeconds", 900))
                if ctx.clock() - epoch(ctx.status["startTime"]) > limit:
                    _start_rollback(
                        ctx,
                        Phase.FAILED,
                        Reason.COMPLETION_TIMEOUT,
                        f"not completed within completionTimeoutSeconds={limit}",
                        emit,
                    )
            since = ctx.status.get("agentUnavailableSince")
            limit = int(ctx.policy.get("agentTimeoutSeconds", rollback.DEFAULT_AGENT_TIMEOUT_S))
            if since and not ctx.status.get("rollback") and ctx.clock() - epoch(since) > limit:
                _start_rollback(
                    ctx,
                    Phase.FAILED,
                    Reason.AGENT_UNAVAILABLE,
                    f"an agent was unreachable for more than agentTimeoutSeconds={limit}: "
                    + _progressing_message(ctx.status),
                    emit,
                )
        if ctx.status.get("rollback") and not committed:
            result = rollback.rolled_back(ctx, agents, key())
        elif phase in STEPS:
            result = STEPS[phase](ctx, agents, key)
        else:
            result = Failed(
                Reason.UNSUPPORTED_PHASE, f"this operator version cannot drive phase {phase.value}"
            )

        at = now()
        if isinstance(result, Done):
            rb = ctx.status.get("rollback") or {}
            reason = Reason(rb["reason"]) if rb and result.next_phase.final else None
            patch = phase_status(
                ctx.status, result.next_phase, ctx.generation, at, reason, result.message
            )
            patch.update(result.status)
            if phase is Phase.VALIDATING and result.next_phase is Phase.PREPARING_TARGET:
                patch["conditions"] = set_condition(
                    patch["conditions"],
                    ConditionType.READY,
                    True,
                    Reason.TARGET_CLAIMED,
                    result.message,
                    ctx.generation,
                    at,
                )
            _write(ctx, patch)
            us = ctx.status.get("downtimeMicroseconds")
            if us is None and ctx.status.get("downtimeMs") is not None:
                us = int(ctx.status["downtimeMs"]) * 1000  # recorded before microseconds were
            metrics.record_phase(ctx.namespace, ctx.name, result.next_phase, us)
            kind = "Warning" if result.next_phase in (Phase.FAILED, Phase.ABORTED) else "Normal"
            emit(kind, result.next_phase.value, result.message or result.next_phase.value)
            log.info(
                "%s/%s: %s -> %s", ctx.namespace, ctx.name, phase.value, result.next_phase.value
            )
            continue
        if isinstance(result, Wait):
            patch = phase_status(
                ctx.status, phase, ctx.generation, at, result.reason, result.message
            )
            patch.update(result.status)
            # How long agents have been unreachable, for agentTimeoutSeconds
            # (and for a rollback that cannot reach the target).
            if result.reason is Reason.AGENT_UNAVAILABLE:
                patch["agentUnavailableSince"] = ctx.status.get("agentUnavailableSince") or at
            elif ctx.status.get("agentUnavailableSince"):
                patch["agentUnavailableSince"] = None
            if result.reason is Reason.NO_COMPATIBLE_TARGET:
                patch["conditions"] = set_condition(
                    patch["conditions"],
                    ConditionType.READY,
                    False,
                    result.reason,
                    result.message,
                    ctx.generation,
                    at,
                )
            _write(ctx, patch)
            if result.delay <= 0:
                continue  # recorded; go on at once (e.g. past the commit point)
            return result.delay
        if committed:
            # Past the commit point there is no rollback: the target runs.
            # Record the problem and retry the remaining forward steps.
            _write(
                ctx,
                phase_status(
                    ctx.status,
                    phase,
                    ctx.generation,
                    at,
                    result.reason,
                    f"retrying after the commit point: {result.message}",
                ),
            )
            return COMMITTED_RETRY_S
        _start_rollback(ctx, Phase.FAILED, result.reason, result.message, emit)
