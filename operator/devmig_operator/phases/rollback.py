"""Rolled back: every session is aborted on both agents (the source device
returns to RUNNING with full passthrough, the target device is reset and
released) and every device claim is released. Only before the commit point
(target RUNNING recorded); after it, only forward."""

from __future__ import annotations

from devmig.agent.v1alpha1 import agent_pb2
from devmig_operator import agents as agentsmod
from devmig_operator import placement
from devmig_operator.conditions import Phase, Reason
from devmig_operator.context import Context
from devmig_operator.results import Done, Result, Wait
from devmig_operator.sessions import agent_for, session_ref

# Seconds between rollback attempts while an agent is unreachable. Rollback
# must finish before the migration may report Failed: a source device left
# in PRE_COPY would keep its traps on and its VM slowed.
RETRY_S = 3.0


def rolled_back(ctx: Context, agents: agentsmod.Agents, key: bytes) -> Result:
    st = ctx.status
    rb = st.get("rollback") or {}
    devices = st.get("devices") or []
    for node_key in ("targetNode", "sourceNode"):
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
    return Done(final, {}, rb.get("message", "rolled back"))
