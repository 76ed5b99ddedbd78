"""Choosing a target device for every source device, and claiming it.

Choice is a pure function over the node inventories (``NodeDeviceInventory``
status, written by each node's agent). A claim is a ``coordination.k8s.io``
Lease per target device: creating an object is atomic in the API server, so
when two migrations want the same device exactly one create succeeds and the
other sees 409 Conflict and chooses again. Leases are independent of the
inventory objects, which the agents rewrite at will.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

# Device fields that must be equal for device state to load on the target:
# the same hardware function (ids), the same driver and version (the state
# format is the driver's), and the same mdev type.
COMPATIBILITY_KEYS = (
    "vendorId",
    "deviceId",
    "subsystemVendorId",
    "subsystemDeviceId",
    "driver",
    "driverVersion",
    "mdevType",
)


@dataclasses.dataclass(frozen=True)
class Choice:
    source_device: str
    target_node: str
    target_device: str


class NoTarget(Exception):
    """No compatible free device; the message says why, per node."""


def incompatibility(
    src: Mapping[str, Any], cand: Mapping[str, Any], need_p2p: bool, vmi_ref: str = ""
) -> str | None:
    """Why ``cand`` cannot receive ``src``'s state, or None if it can. A
    device held by the migrating VMI itself (``vmi_ref``, namespace/name) is
    not in use by another: it is its target pod's (see choose_targets)."""
    if not cand.get("migratable"):
        return (
            f"{cand.get('id')} is not migratable ({cand.get('notMigratableReason') or 'no reason'})"
        )
    for k in COMPATIBILITY_KEYS:
        if (src.get(k) or "") != (cand.get(k) or ""):
            return f"{cand.get('id')} differs in {k}: {cand.get(k)!r} != {src.get(k)!r}"
    flags = set(cand.get("migrationFlags") or ())
    if "STOP_COPY" not in flags:
        return f"{cand.get('id')} lacks the STOP_COPY migration flag"
    if need_p2p and "P2P" not in flags:
        return f"{cand.get('id')} lacks P2P, needed when several devices migrate together"
    if cand.get("health", "Healthy") != "Healthy":
        return f"{cand.get('id')} is {cand.get('health')}"
    holder = cand.get("vmi") or cand.get("pod")
    if holder and not (vmi_ref and cand.get("vmi") == vmi_ref):
        return f"{cand.get('id')} is in use by {holder}"
    return None


def choose_targets(
    source_devices: Sequence[Mapping[str, Any]],
    inventories: Iterable[Mapping[str, Any]],
    source_node: str,
    schedulable_nodes: set[str],
    claimed: set[tuple[str, str]],
    target_node: str | None = None,
    busy_nodes: Mapping[str, str] | None = None,
    vmi_ref: str = "",
) -> list[Choice]:
    """One compatible, free device per source device, all on one node.

    ``vmi_ref`` (namespace/name) is the migrating VMI. When KubeVirt
    migrates it (auto mode), its target pod already runs on the target node
    and the kubelet allocated that pod its devices: the inventory shows
    them held by this same VMI. Those are the devices the target VM will
    have, so they are taken first, and they are not "in use".

    Nodes are tried in name order so that the choice is deterministic; a
    node is taken only if it can host every device of the VM (a VM runs on
    one node). ``claimed`` holds (node, device) pairs already leased.
    Raises NoTarget with the reasons when no node fits.
    """
    need_p2p = len(source_devices) > 1
    reasons: list[str] = []
    invs = sorted(inventories, key=lambda i: i["spec"]["nodeName"])
    for inv in invs:
        node = inv["spec"]["nodeName"]
        if node == source_node or (target_node and node != target_node):
            continue
        if node not in schedulable_nodes:
            reasons.append(f"{node}: not schedulable")
            continue
        if busy_nodes and node in busy_nodes:
            reasons.append(f"{node}: {busy_nodes[node]}")
            continue
        free = sorted(
            (
                d
                for d in (inv.get("status") or {}).get("devices") or []
                if (node, d.get("id")) not in claimed
            ),
            # The target pod's own devices first (stable otherwise).
            key=lambda d: not (vmi_ref and d.get("vmi") == vmi_ref),
        )
        picked: list[Choice] = []
        why: list[str] = []
        for src in source_devices:
            for cand in free:
                if any(c.target_device == cand["id"] for c in picked):
                    continue
                r = incompatibility(src, cand, need_p2p, vmi_ref)
                if r is None:
                    picked.append(Choice(src["id"], node, cand["id"]))
                    break
                why.append(r)
            else:
                why.append(f"no free device compatible with {src['id']}")
                break
        if len(picked) == len(source_devices):
            return picked
        reasons.append(f"{node}: " + "; ".join(why[-3:]))
    if target_node and not any(i["spec"]["nodeName"] == target_node for i in invs):
        reasons.append(f"{target_node}: no device inventory (is the devmig agent running there?)")
    raise NoTarget("no node can host every device: " + (" | ".join(reasons) or "no other node"))


# ------------------------------------------------------------------- claims

LEASE_PREFIX = "devmig-claim-"


def lease_name(node: str, device_id: str) -> str:
    """A valid, collision-free Lease name for (node, device): readable part
    plus a hash, because device ids hold ':' and '.' (PCI addresses)."""
    readable = re.sub(r"[^a-z0-9-]+", "-", f"{node}-{device_id}".lower()).strip("-")[:40]
    digest = hashlib.sha256(f"{node}/{device_id}".encode()).hexdigest()[:10]
    return f"{LEASE_PREFIX}{readable}-{digest}"


def holder(namespace: str, name: str, uid: str) -> str:
    return f"{namespace}/{name}/{uid}"


def claim(coord: client.CoordinationV1Api, lease_namespace: str, choice: Choice, who: str) -> bool:
    """Claim ``choice``'s target device for ``who``. True if ours (created
    now, or already ours: claiming is idempotent); False if someone else
    holds it."""
    name = lease_name(choice.target_node, choice.target_device)
    body = client.V1Lease(
        metadata=client.V1ObjectMeta(
            name=name,
            labels={"app.kubernetes.io/managed-by": "devmig", "devmig.io/node": choice.target_node},
            annotations={"devmig.io/device": choice.target_device},
        ),
        spec=client.V1LeaseSpec(holder_identity=who),
    )
    try:
        coord.create_namespaced_lease(lease_namespace, body)
        return True
    except ApiException as e:
        if e.status != 409:
            raise
    cur = coord.read_namespaced_lease(name, lease_namespace)
    return bool(cur.spec and cur.spec.holder_identity == who)


def release(
    coord: client.CoordinationV1Api, lease_namespace: str, node: str, device: str, who: str
) -> None:
    """Release a claim if ``who`` holds it. Idempotent."""
    name = lease_name(node, device)
    try:
        cur = coord.read_namespaced_lease(name, lease_namespace)
    except ApiException as e:
        if e.status == 404:
            return
        raise
    if not cur.spec or cur.spec.holder_identity != who or cur.metadata is None:
        return
    try:
        coord.delete_namespaced_lease(
            name,
            lease_namespace,
            body=client.V1DeleteOptions(
                preconditions=client.V1Preconditions(
                    uid=cur.metadata.uid, resource_version=cur.metadata.resource_version
                )
            ),
        )
    except ApiException as e:
        if e.status not in (404, 409):
            raise


def busy_nodes(held: Mapping[tuple[str, str], str], who: str, max_per_node: int) -> dict[str, str]:
    """Nodes already receiving ``max_per_node`` other migrations (0: no
    limit), with the reason, from the current claims."""
    if max_per_node <= 0:
        return {}
    per_node: dict[str, set[str]] = {}
    for (node, _dev), h in held.items():
        if h != who:
            per_node.setdefault(node, set()).add(h)
    return {
        n: f"already receiving {len(hs)} migration(s), the limit per node"
        for n, hs in per_node.items()
        if len(hs) >= max_per_node
    }


def claims(coord: client.CoordinationV1Api, lease_namespace: str) -> dict[tuple[str, str], str]:
    """Every claimed (node, device), with its holder."""
    leases = coord.list_namespaced_lease(
        lease_namespace, label_selector="app.kubernetes.io/managed-by=devmig"
    )
    out: dict[tuple[str, str], str] = {}
    for lease in leases.items:
        md = lease.metadata
        if md and md.labels and md.annotations and lease.spec:
            key = (md.labels.get("devmig.io/node", ""), md.annotations.get("devmig.io/device", ""))
            out[key] = lease.spec.holder_identity or ""
    return out


def claim_targets(
    coord: client.CoordinationV1Api,
    lease_namespace: str,
    who: str,
    source_devices: Sequence[Mapping[str, Any]],
    inventories: Sequence[Mapping[str, Any]],
    source_node: str,
    schedulable_nodes: set[str],
    target_node: str | None = None,
    attempts: int = 5,
    max_per_node: int = 0,
    vmi_ref: str = "",
) -> list[Choice]:
    """Choose and claim targets for every source device, all or nothing.

    On losing a race for a device, release what this call took and choose
    again with the fresh set of claims. ``attempts`` bounds the retries: five
    lost races in a row means heavy contention, and the caller retries later
    (TemporaryError) rather than spinning here.
    """
    for _ in range(attempts):
        held = claims(coord, lease_namespace)
        # Our own earlier claims (a repeated call) count as free for us.
        mine = {k for k, h in held.items() if h == who}
        others = {k for k, h in held.items() if h != who}
        choices = choose_targets(
            source_devices,
            inventories,
            source_node,
            schedulable_nodes,
            others,
            target_node,
            busy_nodes(held, who, max_per_node),
            vmi_ref,
        )
        got: list[Choice] = []
        for c in choices:
            if not claim(coord, lease_namespace, c, who):
                break
            got.append(c)
        else:
            # Drop claims from an earlier choice that this one did not keep.
            keep = {(c.target_node, c.target_device) for c in choices}
            for node, dev in mine - keep:
                release(coord, lease_namespace, node, dev, who)
            return choices
        for c in got:
            if (c.target_node, c.target_device) not in mine:
                release(coord, lease_namespace, c.target_node, c.target_device, who)
    raise NoTarget(f"lost the race for target devices {attempts} times in a row; will retry")
