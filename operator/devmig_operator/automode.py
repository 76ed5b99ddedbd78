"""Auto mode: KubeVirt's own migration of a VMI whose devices devmig
manages gets its DeviceMigration, created by devmig and followed.

A VirtualMachineInstanceMigration (VMIM) names the VMI; KubeVirt picks the
target node and records it in ``status.migrationState.targetNode`` once the
target pod is scheduled. devmig then creates one DeviceMigration for the
VMIM, owned by it (so it goes when the VMIM goes), pinned to that target
node. The agents' node hooks tie KubeVirt's memory migration to the device
phases.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from devmig_operator import GROUP, VERSION, kubevirt

VMIM_LABEL = "devmig.io/vmim"


def dm_name(vmim_name: str) -> str:
    """DeviceMigration name for a VMIM: readable and within 253 characters."""
    name = f"vmim-{vmim_name}"
    if len(name) <= 253:
        return name
    return f"{name[:240]}-{hashlib.sha256(vmim_name.encode()).hexdigest()[:10]}"


def target_node(vmim: Mapping[str, Any]) -> str:
    ms = (vmim.get("status") or {}).get("migrationState") or {}
    return str(ms.get("targetNode") or "")


def device_migration_for(
    vmim: Mapping[str, Any], vmi: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The DeviceMigration to create for ``vmim``, or None when there is none
    to create yet (no devmig devices, VMI gone, target not chosen yet, or the
    migration already ended)."""
    if vmi is None or not kubevirt.requested_devices(vmi):
        return None
    # Only the devmig annotation is migrated along KubeVirt's migration:
    # KubeVirt refuses to migrate VMIs with hostDevices at all.
    if not (vmi.get("metadata", {}).get("annotations") or {}).get(kubevirt.DEVICES_ANNOTATION):
        return None
    phase = (vmim.get("status") or {}).get("phase") or ""
    if phase in ("Succeeded", "Failed"):
        return None
    node = target_node(vmim)
    if not node:
        return None
    md = vmim["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DeviceMigration",
        "metadata": {
            "name": dm_name(md["name"]),
            "namespace": md["namespace"],
            "labels": {VMIM_LABEL: md["name"]},
            "ownerReferences": [
                {
                    "apiVersion": f"{kubevirt.GROUP}/{kubevirt.VERSION}",
                    "kind": "VirtualMachineInstanceMigration",
                    "name": md["name"],
                    "uid": md["uid"],
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {"vmiName": vmim["spec"]["vmiName"], "targetNode": node},
    }
