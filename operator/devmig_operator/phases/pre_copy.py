"""PreCopy: the source devices enter PRE_COPY (traps switched on, dirty
tracking started) and stream their state to the target while the VM runs;
the step reports progress and decides when the rest fits the downtime
limit."""

from __future__ import annotations

from typing import Any

from devmig.agent.v1alpha1 import agent_pb2
from devmig_operator import agents as agentsmod
from devmig_operator.conditions import Phase, Reason, epoch
from devmig_operator.context import Context
from devmig_operator.convergence import Decision, decide
from devmig_operator.phases.preparing_target import state_name
from devmig_operator.results import Done, Failed, Result, Wait
from devmig_operator.sessions import agent_for, session_ref

# Seconds between progress reads while pre-copy runs: often enough for a
# progress bar and for catching convergence within a fraction of a typical
# pre-copy (seconds to minutes), rare enough to cost the API server nothing.
POLL_S = 1.0
RETRY_S = 3.0


def entered_at(status: dict[str, Any], phase: Phase) -> float | None:
    for t in reversed(status.get("phaseTransitions") or []):
        if t.get("phase") == phase.value:
            return epoch(t["time"])
    return None


def device_progress(d: dict[str, Any], s: Any) -> dict[str, Any]:
    """Merge one SessionStatus into a status.devices entry."""
    p = s.progress
    out = dict(d)
    out.update(
        {
            "sourceState": state_name(s.device_state),
            "bytesSent": int(p.bytes_sent),
            "remainingBytes": int(p.remaining_bytes),
            "preCopyIterations": int(p.pre_copy_iterations),
            "dirtyRateBytesPerSecond": int(p.dirty_rate_bytes_per_second),
            "throughputBytesPerSecond": int(p.throughput_bytes_per_second),
        }
    )
    return out


def progress_text(devices: list[dict[str, Any]]) -> str:
    sent = sum(d.get("bytesSent", 0) for d in devices)
    left = sum(d.get("remainingBytes", 0) for d in devices)
    return f"{sent * 100 // (sent + left)}%" if sent + left else "0%"


def converged(ctx: Context, agents: agentsmod.Agents, key: bytes) -> Result:
    st = ctx.status
    devices = [dict(d) for d in st.get("devices") or []]
    try:
        src = agent_for(ctx, agents, st["sourceNode"])
        statuses = []
        for i, d in enumerate(devices):
            ref = session_ref(ctx, key, i)
            s = agentsmod.call(src.stub.GetSession, agent_pb2.GetSessionRequest(session=ref)).status
            if s.phase in (agent_pb2.SESSION_PHASE_FAILED, agent_pb2.SESSION_PHASE_ABORTED):
                # Asked of the source first: a session that failed (its
                # stream to a dead target, say) or that its agent rolled
                # back (no decision in time after a restart) fails the
                # migration even while the target cannot be reached.
                what = "failed" if s.phase == agent_pb2.SESSION_PHASE_FAILED else "rolled back"
                return Failed(Reason.AGENT_ERROR, f"source session {what}: {s.message}")
            if s.phase == agent_pb2.SESSION_PHASE_PREPARED:
                # Not streaming yet, or no longer: an agent that restarted
                # mid-pre-copy answers StartPreCopy with DeviceNotRunning
                # (its stream died with it), which rolls back.
                # PrepareTarget is idempotent: it hands back the endpoint the
                # target opened for this session.
                dst = agent_for(ctx, agents, st["targetNode"])
                pt = agentsmod.call(
                    dst.stub.PrepareTarget,
                    agent_pb2.PrepareTargetRequest(session=ref, device_id=d["targetDevice"]),
                )
                agentsmod.call(
                    src.stub.StartPreCopy,
                    agent_pb2.StartPreCopyRequest(
                        session=ref, target_data_endpoint=pt.data_endpoint
                    ),
                )
                s = agentsmod.call(
                    src.stub.GetSession, agent_pb2.GetSessionRequest(session=ref)
                ).status
            statuses.append(s)
    except agentsmod.AgentUnavailable as e:
        return Wait(RETRY_S, Reason.AGENT_UNAVAILABLE, str(e))
    except agentsmod.AgentRefused as e:
        return Failed(Reason.AGENT_ERROR, str(e))

    devices = [device_progress(d, s) for d, s in zip(devices, statuses, strict=True)]
    update = {"devices": devices, "progress": progress_text(devices)}
    missed = sum(int(s.progress.missed_traps) for s in statuses)
    if missed:
        return Failed(
            Reason.MISSED_TRAPS,
            f"{missed} device access(es) bypassed a required trap: a dirty page may be lost",
        )
    failed = [s for s in statuses if s.phase == agent_pb2.SESSION_PHASE_FAILED]
    if failed:
        return Failed(Reason.AGENT_ERROR, f"source session failed: {failed[0].message}")
    start = entered_at(st, Phase.PRE_COPY) or ctx.clock()
    verdict = decide(
        remaining_bytes=sum(int(s.progress.remaining_bytes) for s in statuses),
        # Devices stream in parallel: their rates add up.
        throughput_bytes_per_s=float(sum(s.progress.throughput_bytes_per_second for s in statuses)),
        dirty_rate_bytes_per_s=float(sum(s.progress.dirty_rate_bytes_per_second for s in statuses)),
        iterations=max((int(s.progress.pre_copy_iterations) for s in statuses), default=0),
        elapsed_s=ctx.clock() - start,
        policy=ctx.policy,
    )
    if verdict.decision is Decision.CONTINUE:
        return Wait(POLL_S, Reason.PRE_COPYING, verdict.message, update)
    if verdict.decision is Decision.NOT_CONVERGED:
        return Failed(Reason.NOT_CONVERGED, verdict.message)
    return Done(Phase.STOP_AND_COPY, update, verdict.message)
