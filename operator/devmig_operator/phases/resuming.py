"""Resuming: each target device goes RESUMING -> STOP -> RUNNING; once all
run, the commit point is recorded in status; then the target VMM may resume
and the source devices are stopped for good and released. After the commit
point every step only moves forward: a failure is retried, never rolled
back, so the device ends RUNNING on exactly one node."""

from __future__ import annotations

from typing import Any

from devmig.agent.v1alpha1 import agent_pb2
from devmig_operator import agents as agentsmod
from devmig_operator import placement
from devmig_operator.conditions import Phase, Reason
from devmig_operator.context import Context
from devmig_operator.phases.preparing_target import state_name
from devmig_operator.results import Done, Failed, Result, Wait
from devmig_operator.sessions import agent_for, session_ref

RETRY_S = 2.0


def downtime_us(src: list[Any], dst: list[Any]) -> int | None:
    """Device downtime, microseconds: first source leaving RUNNING to last
    target RUNNING (the agents' own clocks, nanoseconds)."""
    stopped = [s.stopped_at_unix_nanos for s in src if s.stopped_at_unix_nanos]
    running = [s.running_at_unix_nanos for s in dst if s.running_at_unix_nanos]
    if not stopped or not running:
        return None
    return max(0, int(max(running) - min(stopped)) // 1_000)


def commit_patch(
    devices: list[dict[str, Any]], src_st: list[Any], dst_st: list[Any]
) -> dict[str, Any]:
    """The status that records the commit point: the target devices run."""
    for d, s in zip(devices, dst_st, strict=True):
        d["targetState"] = state_name(s.device_state)
    patch: dict[str, Any] = {"committed": True, "devices": devices}
    us = downtime_us(src_st, dst_st)
    if us is not None:
        patch["downtimeMs"] = us // 1_000
        patch["downtimeMicroseconds"] = us
        # Below 10 ms, tenths and hundredths of a millisecond say something.
        patch["downtime"] = f"{us / 1000:.2f}ms" if us < 10_000 else f"{us // 1_000}ms"
    return patch


def resume_request(refs: list[Any], i: int) -> Any:
    """Resume for device i; with several devices, naming all of them, so
    that the target agent takes every one to RUNNING_P2P before any runs
    (the first such call resumes them all; the others find them RUNNING)."""
    return agent_pb2.ResumeRequest(session=refs[i], vm_sessions=refs if len(refs) > 1 else [])


def finished(ctx: Context, agents: agentsmod.Agents, key: bytes) -> Result:
    st = ctx.status
    devices = [dict(d) for d in st.get("devices") or []]
    refs = [session_ref(ctx, key, i) for i in range(len(devices))]
    try:
        src = agent_for(ctx, agents, st["sourceNode"])
        dst = agent_for(ctx, agents, st["targetNode"])
        if not st.get("committed"):
            dst_st = [
                agentsmod.call(dst.stub.Resume, resume_request(refs, i)).status
                for i in range(len(refs))
            ]
            src_st = [
                agentsmod.call(src.stub.GetSession, agent_pb2.GetSessionRequest(session=r)).status
                for r in refs
            ]
            patch = commit_patch(devices, src_st, dst_st)
            # The commit point: written before the VMM may resume on the
            # target. Returned as Wait(0) so the driver records it first.
            return Wait(0.0, Reason.RESUMING, "target devices RUNNING: committed", patch)
        for r in refs:
            agentsmod.call(dst.stub.FinishSession, agent_pb2.FinishSessionRequest(session=r))
        for i, r in enumerate(refs):
            s = agentsmod.call(
                src.stub.FinishSession, agent_pb2.FinishSessionRequest(session=r)
            ).status
            devices[i]["sourceState"] = state_name(s.device_state)
    except agentsmod.AgentUnavailable as e:
        return Wait(RETRY_S, Reason.AGENT_UNAVAILABLE, str(e))
    except agentsmod.AgentRefused as e:
        if st.get("committed"):
            # After the commit point only forward: keep retrying.
            return Wait(RETRY_S, Reason.AGENT_ERROR, f"retrying after the commit point: {e}")
        return Failed(Reason.AGENT_ERROR, str(e))
    for d in devices:
        placement.release(
            ctx.cluster.coord,
            ctx.cluster.lease_namespace,
            st["targetNode"],
            d["targetDevice"],
            ctx.who,
        )
    return Done(
        Phase.SUCCEEDED, {"devices": devices, "progress": "100%"}, "devices run on the target"
    )
