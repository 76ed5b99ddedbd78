"""Auto mode: KubeVirt's migration of a VMI with devmig devices gets its
DeviceMigration, pinned to the node KubeVirt chose."""

from __future__ import annotations

from typing import Any

from devmig_operator import automode
from devmig_testbed import objects
from devmig_testbed.kubevirt_standin import VirtController


def _vmim(name: str, uid: str = "u1", phase: str = "", target: str = "") -> dict[str, Any]:
    st: dict[str, Any] = {"phase": phase}
    if target:
        st["migrationState"] = {"targetNode": target}
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": uid},
        "spec": {"vmiName": "vm"},
        "status": st,
    }


def _vmi(annotated: bool = True) -> dict[str, Any]:
    ann = {"devmig.io/devices": "devmig.io/sim"} if annotated else {}
    return {"metadata": {"name": "vm", "namespace": "ns", "annotations": ann}, "spec": {}}


def test_no_device_migration_until_kubevirt_has_chosen_the_target() -> None:
    assert automode.device_migration_for(_vmim("m", phase="Scheduling"), _vmi()) is None
    dm = automode.device_migration_for(_vmim("m", phase="Scheduled", target="b"), _vmi())
    assert dm is not None
    assert dm["spec"] == {"vmiName": "vm", "targetNode": "b"}
    assert dm["metadata"]["ownerReferences"][0]["uid"] == "u1"


def test_vmis_without_devmig_devices_and_finished_migrations_are_left_alone() -> None:
    assert (
        automode.device_migration_for(_vmim("m", phase="Scheduled", target="b"), _vmi(False))
        is None
    )
    assert automode.device_migration_for(_vmim("m", phase="Succeeded", target="b"), _vmi()) is None
    assert automode.device_migration_for(_vmim("m", phase="Scheduled", target="b"), None) is None


def test_long_vmim_names_give_valid_distinct_names() -> None:
    a, b = automode.dm_name("x" * 300), automode.dm_name("x" * 299 + "y")
    assert len(a) <= 253 and a != b


def test_a_kubevirt_migration_gets_its_device_migration(
    kube: Any, namespace: str, operator_process: Any
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    objects.create_vmim(kube, namespace, "mig", "vm")
    VirtController(kube, target_node="node-b").advance_to(namespace, "mig", "Scheduled")
    dm = objects.wait_dm(kube, namespace, "vmim-mig", lambda o: True)
    assert dm["spec"]["targetNode"] == "node-b"
    assert dm["spec"]["vmiName"] == "vm"
    assert dm["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachineInstanceMigration"
    assert dm["metadata"]["labels"]["devmig.io/vmim"] == "mig"
