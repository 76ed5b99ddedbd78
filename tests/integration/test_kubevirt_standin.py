"""The virt-controller stand-in follows KubeVirt's documented VMIM semantics."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from devmig_testbed import objects
from devmig_testbed.kubevirt_standin import PHASES, VirtController


def test_the_stand_in_walks_kubevirts_phases_and_moves_the_vmi_at_the_end(
    kube: Any, namespace: str
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a")
    co = client.CustomObjectsApi(kube)
    objects.create_vmim(kube, namespace, "mig", "vm")
    vc = VirtController(kube, target_node="node-b")
    seen = [vc.advance(namespace, "mig") for _ in PHASES]
    assert seen == PHASES
    assert vc.advance(namespace, "mig") == "Succeeded"  # final: stays
    vmim = co.get_namespaced_custom_object(
        "kubevirt.io", "v1", namespace, "virtualmachineinstancemigrations", "mig"
    )
    ms = vmim["status"]["migrationState"]
    assert (ms["sourceNode"], ms["targetNode"], ms["completed"]) == ("node-a", "node-b", True)
    assert [t["phase"] for t in vmim["status"]["phaseTransitionTimestamps"]] == PHASES
    vmi = co.get_namespaced_custom_object(
        "kubevirt.io", "v1", namespace, "virtualmachineinstances", "vm"
    )
    assert vmi["status"]["nodeName"] == "node-b"
