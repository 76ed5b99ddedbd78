"""A whole migration, every part real but the device: the operator (kopf
process) against the real kube-apiserver, two node agents (processes) with
simulated devices publishing their inventories, device state streamed agent
to agent by the native pump. The device ends RUNNING on the target alone."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from devmig_testbed import objects, processes
from devmig_testbed.controlplane import ControlPlane
from devmig_testbed.pytest_plugin import OperatorProcess


@pytest.fixture
def two_nodes(
    control_plane: ControlPlane, kube: Any, namespace: str, tmp_path: pathlib.Path
) -> Iterator[None]:
    with processes.two_nodes(
        kube,
        control_plane.admin_kubeconfig,
        tmp_path,
        "count=1,size=8MiB,dirty=16",
        {0: f"{namespace}/vm"},
    ):
        yield


def test_a_device_migration_runs_to_success_with_real_agents(
    kube: Any, namespace: str, two_nodes: None, operator_process: OperatorProcess
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    objects.create_dm(kube, namespace, "move", "vm", policy={"downtimeLimitMs": 2000})
    dm = objects.wait_dm_final(kube, namespace, "move")
    st = dm["status"]
    assert st["phase"] == "Succeeded", st
    assert [t["phase"] for t in st["phaseTransitions"]] == [
        "Validating",
        "PreparingTarget",
        "PreCopy",
        "StopAndCopy",
        "Resuming",
        "Succeeded",
    ]
    assert (st["sourceNode"], st["targetNode"]) == ("node-a", "node-b")
    assert st["committed"] is True
    d = st["devices"][0]
    assert (d["sourceDevice"], d["targetDevice"]) == ("sim-node-a-0", "sim-node-b-0")
    assert d["bytesSent"] >= 8 << 20  # at least the whole initial state
    assert (d["sourceState"], d["targetState"]) == ("STOP", "RUNNING")
    assert 0 <= st["downtimeMs"] < 60_000
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["Succeeded"]["status"] == "True" and cond["Failed"]["status"] == "False"
    assert client.CoordinationV1Api(kube).list_namespaced_lease(namespace).items == []
    assert 'devmig_migrations_total{result="Succeeded"} 1.0' in operator_process.metrics()


@pytest.fixture
def two_devices_each(
    control_plane: ControlPlane, kube: Any, namespace: str, tmp_path: pathlib.Path
) -> Iterator[None]:
    vm = f"{namespace}/vm2"
    with processes.two_nodes(
        kube, control_plane.admin_kubeconfig, tmp_path, "count=2,size=4MiB,dirty=16", {0: vm, 1: vm}
    ):
        yield


def test_a_vm_with_two_devices_moves_both_to_one_node_together(
    kube: Any, namespace: str, two_devices_each: None, operator_process: OperatorProcess
) -> None:
    objects.create_vmi(kube, namespace, "vm2", "node-a", devices=["devmig.io/sim", "devmig.io/sim"])
    objects.create_dm(kube, namespace, "move2", "vm2", policy={"downtimeLimitMs": 2000})
    dm = objects.wait_dm_final(kube, namespace, "move2")
    st = dm["status"]
    assert st["phase"] == "Succeeded", st
    pairs = {(d["sourceDevice"], d["targetDevice"]) for d in st["devices"]}
    assert {s for s, _ in pairs} == {"sim-node-a-0", "sim-node-a-1"}
    assert {t for _, t in pairs} == {"sim-node-b-0", "sim-node-b-1"}
    assert all(d["targetState"] == "RUNNING" and d["sourceState"] == "STOP" for d in st["devices"])


def test_a_vmi_with_host_devices_migrates_through_an_explicit_device_migration(
    kube: Any, namespace: str, two_nodes: None, operator_process: OperatorProcess
) -> None:
    # KubeVirt itself would refuse to migrate this VMI (hostDevices make it
    # not live-migratable); an explicit DeviceMigration moves its device.
    objects.create_vmi(kube, namespace, "vm", "node-a", host_devices=["devmig.io/sim"])
    objects.create_dm(kube, namespace, "hd", "vm", policy={"downtimeLimitMs": 2000})
    dm = objects.wait_dm_final(kube, namespace, "hd")
    assert dm["status"]["phase"] == "Succeeded", dm["status"]
    assert dm["status"]["devices"][0]["targetDevice"] == "sim-node-b-0"
