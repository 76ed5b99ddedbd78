"""PreparingTarget: each source device is opened for migration (still
RUNNING) and each target device is opened and put in RESUMING, ready to
receive its source's state."""

from __future__ import annotations

from devmig.agent.v1alpha1 import agent_pb2
from devmig_operator import agents as agentsmod
from devmig_operator.conditions import Phase, Reason
from devmig_operator.context import Context
from devmig_operator.results import Done, Failed, Result, Wait
from devmig_operator.sessions import agent_for, session_ref

# Seconds before retrying an agent that could not be reached: an agent pod
# restarts in a few seconds; polling faster only adds load.
RETRY_S = 3.0


def state_name(v: int) -> str:
    return str(agent_pb2.VfioDeviceState.Name(v)).removeprefix("VFIO_DEVICE_STATE_")


def targets_resuming(ctx: Context, agents: agentsmod.Agents, key: bytes) -> Result:
    st = ctx.status
    bandwidth = int(ctx.policy.get("bandwidthMiBps", 0)) * 1024 * 1024
    devices = [dict(d) for d in st.get("devices") or []]
    try:
        src = agent_for(ctx, agents, st["sourceNode"])
        dst = agent_for(ctx, agents, st["targetNode"])
        for i, d in enumerate(devices):
            ref = session_ref(ctx, key, i)
            ps = agentsmod.call(
                src.stub.PrepareSource,
                agent_pb2.PrepareSourceRequest(
                    session=ref, device_id=d["sourceDevice"], bandwidth_bytes_per_second=bandwidth
                ),
            )
            pt = agentsmod.call(
                dst.stub.PrepareTarget,
                agent_pb2.PrepareTargetRequest(
                    session=ref, device_id=d["targetDevice"], source_descriptor=ps.descriptor
                ),
            )
            d["sourceState"] = state_name(ps.status.device_state)
            d["targetState"] = state_name(pt.status.device_state)
    except agentsmod.AgentUnavailable as e:
        return Wait(RETRY_S, Reason.AGENT_UNAVAILABLE, str(e))
    except agentsmod.AgentRefused as e:
        return Failed(Reason.AGENT_ERROR, str(e))
    return Done(Phase.PRE_COPY, {"devices": devices}, "target devices RESUMING")
