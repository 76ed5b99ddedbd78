"""Labels and annotations of the pods on this node, from the API server.

``podresources.device_holders`` names a device's VMI best from its
virt-launcher pod's metadata (the ``kubevirt.io/domain`` annotation and the
``kubevirt.io/created-by`` label). The kubelet's PodResources answer has only
pod names, so this lists the node's pods (one LIST with a field selector on
``spec.nodeName``, which the chart's RBAC grants) and serves lookups from
that snapshot.
"""

# The kubernetes client's API methods carry no annotations.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import threading

from kubernetes import client

from devmig_agent.podresources import PodMeta


class NodePods:
    """A ``PodLookup`` over a snapshot of one node's pods; ``refresh`` renews it.

    Call ``refresh`` before each pass over the kubelet's answer: a pod the
    snapshot lacks is looked up as unknown (its VMI then comes from its
    name), never fetched one by one.
    """

    def __init__(self, core: client.CoreV1Api, node_name: str) -> None:
        self.core = core
        self.node_name = node_name
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], PodMeta] = {}

    def refresh(self) -> int:
        """Re-list the node's pods; returns how many there are."""
        pods = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node_name}"
        )
        snapshot: dict[tuple[str, str], PodMeta] = {}
        for p in pods.items:
            md = p.metadata
            if md is None or not md.namespace or not md.name:
                continue
            snapshot[(md.namespace, md.name)] = PodMeta(
                labels=dict(md.labels or {}), annotations=dict(md.annotations or {})
            )
        with self._lock:
            self._pods = snapshot
        return len(snapshot)

    def __call__(self, namespace: str, name: str) -> PodMeta | None:
        with self._lock:
            return self._pods.get((namespace, name))
