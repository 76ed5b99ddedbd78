"""Validating: the VMI runs on its source node, each of its devices is in the
source inventory and can migrate, and a compatible target device for each is
chosen and claimed (all on one node)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from devmig_operator import kubevirt, placement
from devmig_operator.conditions import Phase, Reason
from devmig_operator.context import Context
from devmig_operator.results import Done, Failed, Result, Wait

# Seconds between tries while the source agent has not published the node's
# inventory yet, or no compatible device is free: long enough not to load
# the API server, short enough that a freed device is taken within a poll.
RETRY_S = 5.0


def source_devices(
    requested: Sequence[str], inventory: Mapping[str, Any], vmi_ref: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Map the VMI's requested entries (resource names or device ids) to the
    concrete devices it holds on the source node. Returns (devices, errors)."""
    held = [
        d for d in (inventory.get("status") or {}).get("devices") or [] if d.get("vmi") == vmi_ref
    ]
    out: list[dict[str, Any]] = []
    errors: list[str] = []
    for entry in requested:
        match = next(
            (
                d
                for d in held
                if (d.get("id") == entry or d.get("resourceName") == entry) and d not in out
            ),
            None,
        )
        if match is None:
            errors.append(f"{entry}: not held by {vmi_ref} in the source node's inventory")
        elif not match.get("migratable"):
            errors.append(
                f"{match['id']}: not migratable ({match.get('notMigratableReason') or 'no reason'})"
            )
        else:
            out.append(match)
    return out, errors


def target_claimed(ctx: Context) -> Result:
    vmi = ctx.cluster.get_vmi(ctx.namespace, ctx.spec["vmiName"])
    if vmi is None:
        return Failed(
            Reason.VMI_NOT_FOUND, f"VirtualMachineInstance {ctx.spec['vmiName']} not found"
        )
    if kubevirt.phase(vmi) != "Running" or not kubevirt.node_name(vmi):
        return Failed(
            Reason.VMI_NOT_RUNNING,
            f"VirtualMachineInstance {ctx.spec['vmiName']} is "
            f"{kubevirt.phase(vmi) or 'not started'}, not Running on a node",
        )
    source = kubevirt.node_name(vmi)
    # spec.devices narrows the migration to a subset; each entry must still
    # name a device this VMI holds (checked against the inventory below).
    requested = list(ctx.spec.get("devices") or []) or kubevirt.requested_devices(vmi)
    if not requested:
        return Failed(
            Reason.NO_MIGRATABLE_DEVICES,
            f"VirtualMachineInstance {ctx.spec['vmiName']} requests no VFIO devices "
            f"(annotation {kubevirt.DEVICES_ANNOTATION}, hostDevices or gpus)",
        )
    inventory = ctx.cluster.get_inventory(source)
    if inventory is None:
        return Wait(
            RETRY_S,
            Reason.AGENT_UNAVAILABLE,
            f"node {source} has no device inventory yet (is the devmig agent running there?)",
        )
    devices, errors = source_devices(requested, inventory, kubevirt.ref(vmi))
    if errors:
        return Failed(Reason.DEVICE_NOT_MIGRATABLE, "; ".join(errors))
    try:
        choices = placement.claim_targets(
            ctx.cluster.coord,
            ctx.cluster.lease_namespace,
            ctx.who,
            devices,
            ctx.cluster.list_inventories(),
            source,
            ctx.cluster.schedulable_nodes(),
            ctx.spec.get("targetNode") or None,
            max_per_node=ctx.max_migrations_per_node,
            vmi_ref=kubevirt.ref(vmi),
        )
    except placement.NoTarget as e:
        return Wait(RETRY_S, Reason.NO_COMPATIBLE_TARGET, str(e), {"sourceNode": source})
    target = choices[0].target_node
    return Done(
        Phase.PREPARING_TARGET,
        {
            "sourceNode": source,
            "targetNode": target,
            "devices": [
                {
                    "name": c.source_device,
                    "sourceDevice": c.source_device,
                    "targetDevice": c.target_device,
                }
                for c in choices
            ],
        },
        f"claimed {len(choices)} device(s) on {target}",
    )
