"""A small stand-in for KubeVirt's virt-controller, for tests only: it moves
VirtualMachineInstanceMigration phases the way virt-controller does
(Pending -> Scheduling -> Scheduled -> PreparingTarget -> TargetReady ->
Running -> Succeeded), records phaseTransitionTimestamps and migrationState
(sourceNode, targetNode, timestamps, completed), and at the end moves the
VMI to the target node (status.nodeName), as the target virt-handler does.

KubeVirt cannot run on these machines; this follows the documented field
semantics (../shared/reference/interfaces.md §3.3-3.4). It advances one
phase per call to ``advance`` so tests control the pace, and can hold at a
phase (``hold_at``) the way a real migration waits for its target.
"""

from __future__ import annotations

import datetime
from typing import Any

from kubernetes import client

PHASES = [
    "Pending",
    "Scheduling",
    "Scheduled",
    "PreparingTarget",
    "TargetReady",
    "Running",
    "Succeeded",
]
KV = ("kubevirt.io", "v1")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class VirtController:
    def __init__(self, api: Any, target_node: str) -> None:
        self.co = client.CustomObjectsApi(api)
        self.target_node = target_node

    def _vmim(self, ns: str, name: str) -> dict[str, Any]:
        obj = self.co.get_namespaced_custom_object(
            *KV, ns, "virtualmachineinstancemigrations", name
        )
        assert isinstance(obj, dict)
        return obj

    def advance(self, ns: str, name: str) -> str:
        """Move the VMIM to its next phase; returns the new phase."""
        vmim = self._vmim(ns, name)
        st = vmim.get("status") or {}
        cur = st.get("phase") or ""
        nxt = (
            PHASES[0] if cur not in PHASES else PHASES[min(PHASES.index(cur) + 1, len(PHASES) - 1)]
        )
        if nxt == cur:
            return cur
        vmi = self.co.get_namespaced_custom_object(
            *KV, ns, "virtualmachineinstances", vmim["spec"]["vmiName"]
        )
        assert isinstance(vmi, dict)
        source = (vmi.get("status") or {}).get("nodeName", "")
        ms = dict(st.get("migrationState") or {})
        ms.setdefault("sourceNode", source)
        ms.setdefault("migrationUid", vmim["metadata"]["uid"])
        if nxt == "Scheduled":
            # virt-controller learns the target node from the scheduled pod.
            ms["targetNode"] = self.target_node
            ms["targetPod"] = f"virt-launcher-{vmim['spec']['vmiName']}-target"
        if nxt == "Running":
            ms["startTimestamp"] = _now()
        if nxt == "Succeeded":
            ms["endTimestamp"] = _now()
            ms["completed"] = True
            self.co.patch_namespaced_custom_object_status(
                *KV,
                ns,
                "virtualmachineinstances",
                vmim["spec"]["vmiName"],
                {"status": {"nodeName": ms["targetNode"], "migrationState": ms}},
            )
        transitions = [
            *(st.get("phaseTransitionTimestamps") or []),
            {"phase": nxt, "phaseTransitionTimestamp": _now()},
        ]
        self.co.patch_namespaced_custom_object_status(
            *KV,
            ns,
            "virtualmachineinstancemigrations",
            name,
            {
                "status": {
                    "phase": nxt,
                    "migrationState": ms,
                    "phaseTransitionTimestamps": transitions,
                }
            },
        )
        return nxt

    def advance_to(self, ns: str, name: str, phase: str) -> None:
        while self.advance(ns, name) != phase:
            pass
