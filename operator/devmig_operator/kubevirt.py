"""What devmig reads from KubeVirt objects (``kubevirt.io/v1``), as plain
functions over the objects' dicts. Field facts: KubeVirt's VMI type
(spec.domain.devices.hostDevices[]/gpus[], status.nodeName/phase)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GROUP, VERSION = "kubevirt.io", "v1"
VMI_PLURAL = "virtualmachineinstances"
VMIM_PLURAL = "virtualmachineinstancemigrations"
# Devices a VMI asks devmig to attach and migrate: resource names or device
# ids, comma-separated. KubeVirt refuses to migrate VMIs with hostDevices,
# so devmig-managed devices are requested here instead.
DEVICES_ANNOTATION = "devmig.io/devices"


def _get(obj: Mapping[str, Any], *path: str) -> Any:
    cur: Any = obj
    for p in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(p)
    return cur


def requested_devices(vmi: Mapping[str, Any]) -> list[str]:
    """Every device the VMI holds that devmig may migrate, in a stable
    order: the devmig annotation first, then hostDevices, then gpus (by
    their resource name). Duplicates are kept: two entries of one resource
    name are two devices."""
    out: list[str] = []
    ann = _get(vmi, "metadata", "annotations", DEVICES_ANNOTATION) or ""
    out += [d.strip() for d in ann.split(",") if d.strip()]
    for kind in ("hostDevices", "gpus"):
        for d in _get(vmi, "spec", "domain", "devices", kind) or []:
            if d.get("deviceName"):
                out.append(d["deviceName"])
    return out


def node_name(vmi: Mapping[str, Any]) -> str:
    return str(_get(vmi, "status", "nodeName") or "")


def phase(vmi: Mapping[str, Any]) -> str:
    return str(_get(vmi, "status", "phase") or "")


def ref(vmi: Mapping[str, Any]) -> str:
    """namespace/name, as inventories record the VMI holding a device."""
    return f"{vmi['metadata']['namespace']}/{vmi['metadata']['name']}"
