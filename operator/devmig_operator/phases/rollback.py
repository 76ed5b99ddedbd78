"""Rolled back: every session is aborted on both agents (the source device
returns to RUNNING with full passthrough, the target device is reset and
released) and every device claim is released. Only before the commit point;
after it, only forward.

The commit point is a target device RUNNING (the agents' Resume), which the
operator records in status (``committed``) right after. A rollback asked
for between the two (a cancel or a failure after the targets resumed, or an
operator that stopped in between) finds the targets already running: the
agents refuse to reset them (PastCommitPoint), and the source must not be
started again beside them. So the rollback asks the targets first and,
when any runs, records the commit point and goes forward instead.
"""

from __future__ import annotations

from typing import Any

from devmig.agent.v1alpha1 import agent_pb2
from devmig_operator import agents as agentsmod
from devmig_operator import placement
from devmig_operator.conditions import Phase, Reason, epoch
from devmig_operator.context import Context
from devmig_operator.phases import resuming
from devmig_operator.results import Done, Result, Wait
from devmig_operator.sessions import agent_for, session_ref

# Seconds between rollback attempts while an agent is unreachable. Rollback
# must finish before the migration may report Failed: a source device left
# in PRE_COPY would keep its traps on and its VM slowed.
RETRY_S = 3.0
# policy.agentTimeoutSeconds's default (the CRD's too), seconds: long enough
# for an agent pod to be restarted and recover its journal, short enough
# that a VM does not run slowed by traps for long when its target is gone.
DEFAULT_AGENT_TIMEOUT_S = 60


def past_commit_point(ctx: Context, agents: agentsmod.Agents, key: bytes) -> Result | None:
    """Done(Resuming) with the commit recorded when a target device already
    runs; None when none does or the target cannot be asked (then the
    rollback goes on as before: a target that cannot be reached never told
    its VMM to resume, since that waits for the recorded commit)."""
    st = ctx.status
    devices = [dict(d) for d in st.get("devices") or []]
    if not st.get("targetNode") or not devices:
        return None
    refs = [session_ref(ctx, key, i) for i in range(len(devices))]
    try:
        dst = agent_for(ctx, agents, st["targetNode"])
        dst_st = [
            agentsmod.call(dst.stub.GetSession, agent_pb2.GetSessionRequest(session=r)).status
            for r in refs
        ]
    except (agentsmod.AgentUnavailable, agentsmod.AgentRefused):
        return None  # unreachable, or no such session: it never resumed
    if not any(s.running_at_unix_nanos for s in dst_st):
        return None
    src_st: list[Any] = []
    try:
        src = agent_for(ctx, agents, st["sourceNode"])
        src_st = [
            agentsmod.call(src.stub.GetSession, agent_pb2.GetSessionRequest(session=r)).status
            for r in refs
        ]
    except (agentsmod.AgentUnavailable, agentsmod.AgentRefused):
        pass  # the downtime stays unknown; the Resuming step still finishes the source
    patch = resuming.commit_patch(devices, src_st, dst_st)
    patch["rollback"] = None
    rb = st.get("rollback") or {}
    return Done(
        Phase.RESUMING,
        patch,
        f"not rolled back ({rb.get('message', 'requested')}): the target devices already run, "
        "past the commit point; going forward",
    )


def rolled_back(ctx: Context, agents: agentsmod.Agents, key: bytes) -> Result:
    forward = past_commit_point(ctx, agents, key)
    if forward is not None:
        return forward
    st = ctx.status
    rb = st.get("rollback") or {}
    devices = st.get("devices") or []
    note = ""
    # The source first: the VM's device must run there again, whatever
    # becomes of the target.
    for node_key in ("sourceNode", "targetNode"):
        node = st.get(node_key)
        if not node or not devices:
            continue
        try:
            agent = agent_for(ctx, agents, node)
            for i in range(len(devices)):
                agentsmod.call(
                    agent.stub.Abort,
                    agent_pb2.AbortRequest(
                        session=session_ref(ctx, key, i), reason=rb.get("message", "")
                    ),
                )
        except agentsmod.AgentUnavailable as e:
            if node_key == "targetNode" and _gave_up_on_target(ctx):
                # A target agent gone for good (its node died) holds no
                # state of the VM's: when it returns, its journal recovery
                # resets a target that never ran. Nothing waits for it.
                note = (
                    f"; the target agent on {node} was unreachable, it resets its "
                    "device when it returns"
                )
                continue
            return Wait(RETRY_S, Reason.AGENT_UNAVAILABLE, f"rolling back: {e}")
        except agentsmod.AgentRefused as e:
            if e.code.name == "UNIMPLEMENTED":
                # An agent that cannot run sessions never prepared one:
                # there is nothing on that node to roll back.
                continue
            return Wait(RETRY_S, Reason.AGENT_ERROR, f"rolling back: {e}")
    for d in devices:
        if st.get("targetNode") and d.get("targetDevice"):
            placement.release(
                ctx.cluster.coord,
                ctx.cluster.lease_namespace,
                st["targetNode"],
                d["targetDevice"],
                ctx.who,
            )
    # Claims taken before the status recorded them (a crash between claim
    # and status write) are found by holder and released too.
    for (node, dev), who in placement.claims(
        ctx.cluster.coord, ctx.cluster.lease_namespace
    ).items():
        if who == ctx.who:
            placement.release(ctx.cluster.coord, ctx.cluster.lease_namespace, node, dev, who)
    final = Phase(rb.get("phase", Phase.FAILED.value))
    return Done(final, {}, rb.get("message", "rolled back") + note)


def _gave_up_on_target(ctx: Context) -> bool:
    """Whether agents have been unreachable for policy.agentTimeoutSeconds
    (``agentUnavailableSince`` counts from the first failed call)."""
    since = ctx.status.get("agentUnavailableSince")
    if not since:
        return False
    limit = int(ctx.policy.get("agentTimeoutSeconds", DEFAULT_AGENT_TIMEOUT_S))
    return ctx.clock() - epoch(since) > limit
