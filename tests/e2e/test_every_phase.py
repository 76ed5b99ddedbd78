"""Every phase, stopped at its two edges, then cancelled or taken over by a
fresh operator: the phase machine (``drive.reconcile``, what the operator
process runs for each event) against the real API server and two real
agent processes.

Why not the operator process: the short phases (Validating, PreparingTarget,
StopAndCopy's last steps, Resuming) last milliseconds, so killing a process
or setting ``cancel`` "in" them is a race the test would mostly lose. Here
the phase is held exactly, at one of two points:

- ``entered``: the status says the phase, its step has not run (an operator
  that died right after writing the transition);
- ``worked``: its step ran and did its work on the agents, but its result was
  not recorded (an operator that died just before writing it).

A restart is then what a new operator process does: a Context read afresh
from the API server, a new agent connection pool, and ``reconcile`` until
the migration is final. The operator-process tests (test_operator_restart,
test_rollback_end_to_end) cover the same paths through kopf where a phase
lasts long enough to hit.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from kubernetes import client

from devmig.agent.v1alpha1 import agent_pb2 as pb
from devmig.agent.v1alpha1 import agent_pb2_grpc
from devmig_operator import agents as agentsmod
from devmig_operator import drive
from devmig_operator.cluster import Cluster
from devmig_operator.conditions import Phase, Reason
from devmig_operator.context import Context
from devmig_operator.results import Done, Result, Wait
from devmig_testbed import objects, processes
from devmig_testbed.controlplane import ControlPlane

HELD = "held by the test"
# The Progressing reason each phase reports while it works.
REASON = {
    "Validating": Reason.VALIDATING,
    "PreparingTarget": Reason.PREPARING_TARGET,
    "PreCopy": Reason.PRE_COPYING,
    "StopAndCopy": Reason.STOPPING_AND_COPYING,
    "Resuming": Reason.RESUMING,
}
PHASES = ["Validating", "PreparingTarget", "PreCopy", "StopAndCopy", "Resuming"]
ALL = [*PHASES, "Succeeded"]


@pytest.fixture
def agents(
    control_plane: ControlPlane, kube: Any, namespace: str, tmp_path: pathlib.Path
) -> Iterator[list[processes.AgentProcess]]:
    # 4 MiB dirtying 16 pages per MiB sent: pre-copy converges in a few
    # rounds, the whole migration takes well under a second.
    with processes.two_nodes(
        kube,
        control_plane.admin_kubeconfig,
        tmp_path,
        "count=1,size=4MiB,dirty=16",
        {0: f"{namespace}/vm"},
    ) as started:
        yield started


class Operator:
    """One operator incarnation: a fresh Context per reconcile, as the kopf
    handler builds it, and its own agent connections."""

    def __init__(self, kube: Any, namespace: str) -> None:
        self.cluster = Cluster(kube, namespace)
        self.namespace = namespace
        self.agents = agentsmod.Agents()
        self.events: list[tuple[str, str, str]] = []

    def context(self, name: str) -> Context:
        obj = self.cluster.get_dm(self.namespace, name)
        assert obj is not None
        return Context(
            cluster=self.cluster,
            namespace=self.namespace,
            name=name,
            uid=obj["metadata"]["uid"],
            generation=int(obj["metadata"].get("generation", 1)),
            spec=dict(obj.get("spec") or {}),
            status=dict(obj.get("status") or {}),
        )

    def reconcile(self, name: str) -> float | None:
        return drive.reconcile(
            self.context(name),
            self.agents,
            lambda: agentsmod.session_key(self.cluster.core, self.namespace),
            lambda kind, reason, msg: self.events.append((kind, reason, msg)),
        )

    def until_final(self, name: str, timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (delay := self.reconcile(name)) is not None:
            assert time.monotonic() < deadline, self.context(name).status
            time.sleep(min(delay, 0.2))  # kopf's TemporaryError delay, capped for the test
        return self.context(name).status


def hold(monkeypatch: pytest.MonkeyPatch, phase: str, edge: str) -> None:
    """Make the driver stop in ``phase`` at ``edge`` (see the module doc)."""
    p = Phase(phase)
    real = drive.STEPS[p]

    def held(ctx: Context, a: agentsmod.Agents, k: Callable[[], bytes]) -> Result:
        if edge == "worked":
            r = real(ctx, a, k)
            if not isinstance(r, Done):
                return r  # still working (or failed): the step's own answer
        return Wait(3600, REASON[phase], HELD)

    monkeypatch.setitem(drive.STEPS, p, held)


def stopped_in(op: Operator, name: str, phase: str) -> dict[str, Any]:
    """Reconcile until the held phase answers HELD; return the status."""
    deadline = time.monotonic() + 60
    while True:
        delay = op.reconcile(name)
        st = op.context(name).status
        if st.get("phase") == phase and st.get("message") == HELD:
            return st
        assert delay is not None, f"final before reaching {phase}: {st}"
        assert time.monotonic() < deadline, st
        time.sleep(min(delay, 0.2))


def devices(endpoint: str) -> pb.Device:
    with grpc.insecure_channel(endpoint) as ch:
        stub = agent_pb2_grpc.NodeAgentStub(ch)
        return stub.ListDevices(pb.ListDevicesRequest(), timeout=10).devices[0]


def start(kube: Any, namespace: str) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    objects.create_dm(kube, namespace, "m", "vm", policy={"downtimeLimitMs": 2000})


@pytest.mark.parametrize("edge", ["entered", "worked"])
@pytest.mark.parametrize("phase", PHASES)
def test_an_operator_restarted_in_any_phase_finishes_the_migration_once(
    kube: Any,
    namespace: str,
    agents: list[processes.AgentProcess],
    monkeypatch: pytest.MonkeyPatch,
    phase: str,
    edge: str,
) -> None:
    start(kube, namespace)
    with monkeypatch.context() as m:
        hold(m, phase, edge)
        stopped_in(Operator(kube, namespace), "m", phase)
    st = Operator(kube, namespace).until_final("m")  # the successor
    assert st["phase"] == "Succeeded", st
    assert [t["phase"] for t in st["phaseTransitions"]] == ALL  # no phase twice
    src, dst = (devices(a.endpoint) for a in agents)
    # Running on exactly one node: the target; the source stopped, released.
    assert dst.state == pb.VFIO_DEVICE_STATE_RUNNING and not dst.session_id
    assert src.state == pb.VFIO_DEVICE_STATE_STOP and not src.session_id
    assert client.CoordinationV1Api(kube).list_namespaced_lease(namespace).items == []


@pytest.mark.parametrize(
    ("phase", "edge", "final"),
    [
        ("Validating", "entered", "Aborted"),
        ("Validating", "worked", "Aborted"),  # the target is claimed
        ("PreparingTarget", "entered", "Aborted"),
        ("PreparingTarget", "worked", "Aborted"),  # both sessions prepared
        ("PreCopy", "entered", "Aborted"),
        ("PreCopy", "worked", "Aborted"),  # converged, source still RUNNING
        ("StopAndCopy", "entered", "Aborted"),
        # The targets resumed (the commit point), not yet recorded: forward.
        ("StopAndCopy", "worked", "Succeeded"),
        ("Resuming", "entered", "Succeeded"),
        ("Resuming", "worked", "Succeeded"),  # the commit point recorded
    ],
)
def test_cancel_in_any_phase_rolls_back_until_the_commit_point(
    kube: Any,
    namespace: str,
    agents: list[processes.AgentProcess],
    monkeypatch: pytest.MonkeyPatch,
    phase: str,
    edge: str,
    final: str,
) -> None:
    start(kube, namespace)
    op = Operator(kube, namespace)
    with monkeypatch.context() as m:
        hold(m, phase, edge)
        before = stopped_in(op, "m", phase)
        client.CustomObjectsApi(kube).patch_namespaced_custom_object(
            objects.GROUP,
            objects.VERSION,
            namespace,
            "devicemigrations",
            "m",
            {"spec": {"cancel": True}},
        )
    st = op.until_final("m")
    assert st["phase"] == final, st
    src, dst = (devices(a.endpoint) for a in agents)
    if final == "Aborted":
        assert not before.get("committed")
        cond = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert cond["reason"] == "Cancelled", cond
        # As if it never happened: the source runs on, the target was reset.
        assert src.state == pb.VFIO_DEVICE_STATE_RUNNING and not src.session_id
        assert dst.state == pb.VFIO_DEVICE_STATE_RUNNING and not dst.session_id
        assert ("Warning", "Aborted") in {(k, r) for k, r, _ in op.events}
    else:
        # Too late: the target runs the device; the source stopped for good.
        assert [t["phase"] for t in st["phaseTransitions"]] == ALL
        if not before.get("committed"):
            assert any("past the commit point; going forward" in m for _, _, m in op.events)
        assert dst.state == pb.VFIO_DEVICE_STATE_RUNNING and not dst.session_id
        assert src.state == pb.VFIO_DEVICE_STATE_STOP and not src.session_id
    assert client.CoordinationV1Api(kube).list_namespaced_lease(namespace).items == []


def test_an_agent_that_predates_waiting_resumes_through_the_staged_path(
    kube: Any,
    namespace: str,
    agents: list[processes.AgentProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent older than ResumeRequest.wait_for_stream ignores the field
    and refuses at once (StreamNotVerified) while the stream still runs: the
    operator then watches the stream and resumes after it, as before."""
    from devmig.agent.v1alpha1 import agent_pb2 as real
    from devmig_operator.phases import stop_and_copy

    class OldAgentsProto:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def ResumeRequest(**kw: Any) -> Any:
            kw.pop("wait_for_stream", None)  # unknown to an old agent: dropped
            return real.ResumeRequest(**kw)

    monkeypatch.setattr(stop_and_copy, "agent_pb2", OldAgentsProto())
    start(kube, namespace)
    st = Operator(kube, namespace).until_final("m")
    assert st["phase"] == "Succeeded", st
    assert [t["phase"] for t in st["phaseTransitions"]] == ALL
    assert devices(agents[1].endpoint).state == pb.VFIO_DEVICE_STATE_RUNNING
