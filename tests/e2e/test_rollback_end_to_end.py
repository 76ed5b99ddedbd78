"""Rollback with real agents: a migration whose pre-copy cannot converge is
aborted by policy, and both devices end as if it never happened: the source
RUNNING with its session gone, the target reset and free."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from kubernetes import client

from devmig.agent.v1alpha1 import agent_pb2 as pb
from devmig.agent.v1alpha1 import agent_pb2_grpc
from devmig_testbed import objects, processes
from devmig_testbed.controlplane import ControlPlane
from devmig_testbed.pytest_plugin import OperatorProcess


@pytest.fixture
def agents(
    control_plane: ControlPlane, kube: Any, namespace: str, tmp_path: pathlib.Path
) -> Iterator[list[processes.AgentProcess]]:
    # A device that dirties 4096 pages (16 MiB) for every MiB sent: pre-copy
    # can never catch up.
    with processes.two_nodes(
        kube,
        control_plane.admin_kubeconfig,
        tmp_path,
        "count=1,size=8MiB,dirty=4096",
        {0: f"{namespace}/vm"},
    ) as started:
        yield started


def _devices(endpoint: str) -> list[pb.Device]:
    with grpc.insecure_channel(endpoint) as ch:
        stub = agent_pb2_grpc.NodeAgentStub(ch)
        return list(stub.ListDevices(pb.ListDevicesRequest(), timeout=10).devices)


def _as_if_it_never_happened(
    kube: Any, namespace: str, agents: list[processes.AgentProcess]
) -> None:
    """Both devices RUNNING with no session, no claim left."""
    src, dst = (_devices(a.endpoint)[0] for a in agents)
    assert src.state == pb.VFIO_DEVICE_STATE_RUNNING and not src.session_id
    assert dst.state == pb.VFIO_DEVICE_STATE_RUNNING and not dst.session_id
    assert client.CoordinationV1Api(kube).list_namespaced_lease(namespace).items == []


def test_a_migration_that_cannot_converge_is_aborted_and_rolled_back(
    kube: Any,
    namespace: str,
    agents: list[processes.AgentProcess],
    operator_process: OperatorProcess,
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    objects.create_dm(
        kube,
        namespace,
        "m",
        "vm",
        policy={"downtimeLimitMs": 1, "maxPreCopyIterations": 3, "bandwidthMiBps": 16},
    )
    dm = objects.wait_dm_final(kube, namespace, "m")
    st = dm["status"]
    assert st["phase"] == "Failed", st
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PreCopyNotConverged"
    assert "maxPreCopyIterations 3" in failed["message"]
    assert [t["phase"] for t in st["phaseTransitions"]] == [
        "Validating", "PreparingTarget", "PreCopy", "Failed",
    ]  # fmt: skip
    _as_if_it_never_happened(kube, namespace, agents)


def test_a_target_agent_that_dies_mid_pre_copy_rolls_back_without_waiting_for_it(
    kube: Any,
    namespace: str,
    agents: list[processes.AgentProcess],
    operator_process: OperatorProcess,
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    # Never converges at 16 MiB/s, so pre-copy runs until the target dies.
    objects.create_dm(
        kube,
        namespace,
        "m",
        "vm",
        policy={
            "downtimeLimitMs": 1,
            "maxPreCopyIterations": 1000,
            "bandwidthMiBps": 16,
            "agentTimeoutSeconds": 5,
        },
    )
    objects.wait_dm(kube, namespace, "m", lambda o: o.get("status", {}).get("phase") == "PreCopy")
    source, target = agents
    target.proc.kill()
    target.proc.wait()
    st = objects.wait_dm_final(kube, namespace, "m")["status"]
    assert st["phase"] == "Failed", st
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    # Whichever the operator saw first, the source's broken stream
    # (AgentError) or the unreachable target (AgentUnavailable, after
    # agentTimeoutSeconds), the rollback gave up on the target after it.
    assert failed["reason"] in ("AgentError", "AgentUnavailable"), failed
    assert "the target agent on node-b was unreachable" in failed["message"], failed
    src = _devices(source.endpoint)[0]
    assert src.state == pb.VFIO_DEVICE_STATE_RUNNING and not src.session_id
    assert client.CoordinationV1Api(kube).list_namespaced_lease(namespace).items == []


def test_cancelling_during_pre_copy_aborts_with_the_source_running(
    kube: Any,
    namespace: str,
    agents: list[processes.AgentProcess],
    operator_process: OperatorProcess,
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    # Never converges at 16 MiB/s: pre-copy runs until cancelled.
    objects.create_dm(
        kube,
        namespace,
        "m",
        "vm",
        policy={"downtimeLimitMs": 1, "maxPreCopyIterations": 1000, "bandwidthMiBps": 16},
    )
    objects.wait_dm(
        kube,
        namespace,
        "m",
        lambda o: (o.get("status") or {}).get("devices", [{}])[0].get("bytesSent", 0) > 0,
    )
    client.CustomObjectsApi(kube).patch_namespaced_custom_object(
        objects.GROUP,
        objects.VERSION,
        namespace,
        "devicemigrations",
        "m",
        {"spec": {"cancel": True}},
    )
    st = objects.wait_dm_final(kube, namespace, "m")["status"]
    assert st["phase"] == "Aborted", st
    aborted = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert aborted["reason"] == "Cancelled", aborted
    _as_if_it_never_happened(kube, namespace, agents)
