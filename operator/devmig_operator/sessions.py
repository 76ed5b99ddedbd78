"""Session identities and agent lookup shared by the agent-facing phases."""

from __future__ import annotations

from typing import Any

from devmig.agent.v1alpha1 import agent_pb2
from devmig_operator.agents import Agents, AgentUnavailable, session_token
from devmig_operator.context import Context


def session_id(ctx: Context, index: int) -> str:
    """One session per device of the migration; stable across operator
    restarts because it derives from the object's uid."""
    return f"{ctx.uid}-{index}"


def session_ref(ctx: Context, key: bytes, index: int) -> Any:
    sid = session_id(ctx, index)
    return agent_pb2.SessionRef(session_id=sid, token=session_token(key, sid))


def agent_for(ctx: Context, agents: Agents, node: str) -> Any:
    inv = ctx.cluster.get_inventory(node)
    endpoint = ((inv or {}).get("status") or {}).get("agentEndpoint")
    if not endpoint:
        raise AgentUnavailable(f"node {node} publishes no agent endpoint in its inventory")
    return agents.get(node, endpoint)
