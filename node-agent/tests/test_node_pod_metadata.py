"""VMI names from the node's virt-launcher pods, read from a real API server."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kubernetes import client

from devmig_agent import podresources
from devmig_agent.podmeta import NodePods
from devmig_agent.podresources import Assignment, NodeDeviceKey

pytestmark = pytest.mark.controlplane


def launcher(name: str, node: str, vmi: str, uid: str) -> client.V1Pod:
    # What virt-controller renders, as far as the mapping reads it.
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=name,
            labels={
                "kubevirt.io": "virt-launcher",
                "kubevirt.io/created-by": uid,
                "vmi.kubevirt.io/id": vmi[:54] if len(vmi) > 63 else vmi,
            },
            annotations={"kubevirt.io/domain": vmi},
        ),
        spec=client.V1PodSpec(
            node_name=node,
            automount_service_account_token=False,
            containers=[client.V1Container(name="compute", image="virt-launcher")],
        ),
    )


def test_the_node_snapshot_names_vmis_of_its_own_pods_only(kube: Any, namespace: str) -> None:
    core = client.CoreV1Api(kube)
    # The ServiceAccount admission plugin wants the namespace's default
    # account, which only a controller-manager would create.
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default"))
    )
    node = f"node-{uuid.uuid4().hex[:8]}"
    long_vmi = "database-" + "x" * 60
    core.create_namespaced_pod(namespace, launcher("virt-launcher-db-q1w2e", node, "db", "u-1"))
    core.create_namespaced_pod(
        namespace, launcher("virt-launcher-long-r4t5y", node, long_vmi, "u-2")
    )
    core.create_namespaced_pod(
        namespace, launcher("virt-launcher-other-a1s2d", "elsewhere", "o", "u-3")
    )

    pods = NodePods(core, node)
    assert pods.refresh() == 2
    assert pods(namespace, "virt-launcher-other-a1s2d") is None, "another node's pod"

    devices = [NodeDeviceKey("0000:3b:00.1", 42), NodeDeviceKey("0000:3b:00.2", 43)]
    held = podresources.device_holders(
        [
            Assignment(namespace, "virt-launcher-db-q1w2e", "compute", "r/x", "42"),
            Assignment(namespace, "virt-launcher-long-r4t5y", "compute", "r/x", "43"),
        ],
        devices,
        pods,
    )
    assert (held["0000:3b:00.1"].vmi, held["0000:3b:00.1"].vmi_uid) == (f"{namespace}/db", "u-1")
    assert held["0000:3b:00.2"].vmi == f"{namespace}/{long_vmi}", "the annotation is never cut"
