"""StopAndCopy: with the VMM paused, every source device goes through
RUNNING_P2P (when several take part) to STOP_COPY and streams the rest; the
step ends when every target has received and verified its stream, and has
been asked to resume.

Why resume here rather than in the Resuming step: the devices are stopped
on both nodes now, so every API write between "verified" and "RUNNING" adds
to the downtime, and the phase transition is one (a status patch, a few ms).
Resume is idempotent and the commit point is still the Resuming step's
status write, before which the target's VMM never resumes: an operator that
stops after this Resume and before the transition is written starts this
step again, finds the targets past TRANSFERRED, and the Resuming step asks
again, as it would after stopping inside that step.
"""

from __future__ import annotations

from typing import Any

import grpc

from devmig.agent.v1alpha1 import agent_pb2
from devmig_operator import agents as agentsmod
from devmig_operator.conditions import Phase, Reason
from devmig_operator.context import Context
from devmig_operator.phases import resuming
from devmig_operator.phases.pre_copy import device_progress
from devmig_operator.phases.preparing_target import state_name
from devmig_operator.results import Done, Failed, Result, Wait
from devmig_operator.sessions import agent_for, session_ref

RETRY_S = 3.0
# Longest the step blocks on one target's WatchSession, seconds. The device
# is stopped now, so the step waits on the stream's events rather than
# polling: a poll interval would add straight to the downtime. Past this,
# the step returns and is called again, which keeps the operator responsive
# to cancellation and restarts.
WATCH_S = 30.0

# Delay before watching again when a watch ended with the stream still
# running (after WATCH_S, or a dropped watch): short, since the next watch
# blocks on events anyway; non-zero so a watch that ends at once cannot spin.
STILL_STREAMING_S = 0.1

_FINAL_TARGET = (
    agent_pb2.SESSION_PHASE_TRANSFERRED,
    agent_pb2.SESSION_PHASE_SUCCEEDED,
    agent_pb2.SESSION_PHASE_FAILED,
    agent_pb2.SESSION_PHASE_ABORTED,
)


def _wait_transferred(stub: Any, ref: Any) -> Any:
    """Block on the target session's events until it is TRANSFERRED (or
    failed), at most WATCH_S. Returns its last status."""
    last = None
    for msg in stub.WatchSession(agent_pb2.WatchSessionRequest(session=ref), timeout=WATCH_S):
        last = msg.status
        if last.phase in _FINAL_TARGET:
            break
    return last


def _one_device(src: Any, dst: Any, ref: Any, device: dict[str, Any]) -> Result | None:
    """One device: the target's Resume is asked first, waiting for the
    stream, then the source stops; the target resumes the moment its stream
    verifies, with no round trip between (the downtime's floor is the
    source's stop, the residual's transfer and the target's checks).
    Several devices keep the staged path below: every stream verified before
    any target runs (RUNNING_P2P ordering across the VM's devices).

    None: take the staged path instead. That is the answer to a refusal
    (StreamNotVerified): an agent that predates wait_for_stream refuses at
    once while the stream still runs, and the staged path's watch tells a
    stream still running from one that failed."""
    waiting = dst.stub.Resume.future(
        agent_pb2.ResumeRequest(session=ref, wait_for_stream=True), timeout=WATCH_S
    )
    try:
        agentsmod.call(
            src.stub.StopAndCopy, agent_pb2.StopAndCopyRequest(session=ref, vm_sessions=[ref])
        )
    except Exception:
        waiting.cancel()
        raise
    try:
        s = waiting.result().status
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Wait(
                STILL_STREAMING_S, Reason.STOPPING_AND_COPYING, "device state still streaming"
            )
        err = agentsmod.classify(e)
        if isinstance(err, agentsmod.AgentRefused) and err.details.startswith("StreamNotVerified"):
            return None
        raise err from e
    device["bytesReceived"] = int(s.progress.bytes_received)
    device["targetState"] = state_name(s.device_state)
    src_status = agentsmod.call(
        src.stub.GetSession, agent_pb2.GetSessionRequest(session=ref)
    ).status
    device.update(device_progress(device, src_status))
    return Done(
        Phase.RESUMING, {"devices": [device]}, "device state received and verified; target resumed"
    )


def streams_verified(ctx: Context, agents: agentsmod.Agents, key: bytes) -> Result:
    st = ctx.status
    devices = [dict(d) for d in st.get("devices") or []]
    refs = [session_ref(ctx, key, i) for i in range(len(devices))]
    try:
        src = agent_for(ctx, agents, st["sourceNode"])
        dst = agent_for(ctx, agents, st["targetNode"])
        if len(refs) == 1:
            done = _one_device(src, dst, refs[0], devices[0])
            if done is not None:
                return done
        for ref in refs:
            s = agentsmod.call(
                src.stub.StopAndCopy, agent_pb2.StopAndCopyRequest(session=ref, vm_sessions=refs)
            ).status
        for i, ref in enumerate(refs):
            try:
                s = _wait_transferred(dst.stub, ref)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return Wait(
                        STILL_STREAMING_S,
                        Reason.STOPPING_AND_COPYING,
                        "device state still streaming",
                    )
                raise agentsmod.classify(e) from e
            if s is None or s.phase not in _FINAL_TARGET:
                return Wait(
                    STILL_STREAMING_S, Reason.STOPPING_AND_COPYING, "device state still streaming"
                )
            if s.phase in (agent_pb2.SESSION_PHASE_FAILED, agent_pb2.SESSION_PHASE_ABORTED):
                return Failed(Reason.AGENT_ERROR, f"target session failed: {s.reason}: {s.message}")
            devices[i]["bytesReceived"] = int(s.progress.bytes_received)
        # The first Resume takes all the VM's devices to RUNNING_P2P, then
        # to RUNNING; the others answer with their device's state.
        for i in range(len(refs)):
            s = agentsmod.call(dst.stub.Resume, resuming.resume_request(refs, i)).status
            devices[i]["targetState"] = state_name(s.device_state)
        for i, ref in enumerate(refs):
            src_status = agentsmod.call(
                src.stub.GetSession, agent_pb2.GetSessionRequest(session=ref)
            ).status
            devices[i] = device_progress(devices[i], src_status)
    except agentsmod.AgentUnavailable as e:
        return Wait(RETRY_S, Reason.AGENT_UNAVAILABLE, str(e))
    except agentsmod.AgentRefused as e:
        return Failed(Reason.AGENT_ERROR, str(e))
    return Done(
        Phase.RESUMING, {"devices": devices}, "device state received and verified; targets resumed"
    )
