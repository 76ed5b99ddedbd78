"""Two operator replicas with leader election on a Lease: the leader acts
and the follower waits; when the leader stops, it releases the Lease and
the follower takes over and serves the next migration. Real processes
against the real API server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devmig_testbed import objects, processes
from devmig_testbed.controlplane import ControlPlane, free_port

LEASE = "devmig-operator"


def _holder(kube: Any, namespace: str) -> str:
    try:
        lease = client.CoordinationV1Api(kube).read_namespaced_lease(LEASE, namespace)
    except ApiException:
        return ""
    return str(lease.spec.holder_identity or "")


@pytest.fixture
def replicas(
    control_plane: ControlPlane, kube: Any, namespace: str
) -> Iterator[tuple[processes.Drained, processes.Drained]]:
    def start() -> processes.Drained:
        return processes.start_operator(
            control_plane.admin_kubeconfig,
            namespace,
            free_port(),
            namespace,
            extra_args=["--leader-election", LEASE],
        )

    first = start()
    started = [first]
    try:
        objects.wait_for("the first replica to lead", lambda: _holder(kube, namespace) != "")
        started.append(start())
        objects.wait_for(
            "the second replica to wait", lambda: "waits for Lease" in started[1].log()
        )
        yield first, started[1]
    finally:
        for r in started:
            r.stop()
            print(f"--- operator\n{r.log()[-4000:]}")


@pytest.fixture
def agents(control_plane: ControlPlane, kube: Any, namespace: str, tmp_path: Any) -> Iterator[None]:
    with processes.two_nodes(
        kube,
        control_plane.admin_kubeconfig,
        tmp_path,
        "count=2,size=1MiB,dirty=16",
        {0: f"{namespace}/vm1", 1: f"{namespace}/vm2"},
    ):
        yield


def test_only_the_leader_acts_and_the_follower_takes_over_when_it_stops(
    kube: Any, namespace: str, agents: None, replicas: tuple[processes.Drained, processes.Drained]
) -> None:
    leader, follower = replicas
    for vm in ("vm1", "vm2"):
        objects.create_vmi(kube, namespace, vm, "node-a", devices=["devmig.io/sim"])
    objects.create_dm(kube, namespace, "one", "vm1")
    st = objects.wait_dm_final(kube, namespace, "one")["status"]
    assert st["phase"] == "Succeeded", st
    assert f"{namespace}/one: Pending -> Validating" in leader.log()
    assert f"{namespace}/one:" not in follower.log()
    # The leader stops cleanly and releases the Lease: the follower leads
    # at once (no lease duration to wait) and serves the next migration.
    leader.stop()
    assert "released Lease" in leader.log()
    objects.create_dm(kube, namespace, "two", "vm2")
    st = objects.wait_dm_final(kube, namespace, "two")["status"]
    assert st["phase"] == "Succeeded", st
    assert "now leads" in follower.log()
    assert f"{namespace}/two: Pending -> Validating" in follower.log()
    assert f"{namespace}/two:" not in leader.log()
