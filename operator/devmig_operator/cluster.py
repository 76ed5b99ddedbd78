"""The operator's reads and writes of Kubernetes objects, in one place, so
steps stay plain functions and RBAC needs can be read off one module."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devmig_operator import GROUP, VERSION, kubevirt

DM_PLURAL = "devicemigrations"
INVENTORY_PLURAL = "nodedeviceinventories"


class Cluster:
    def __init__(self, api: client.ApiClient, lease_namespace: str) -> None:
        self.api = api
        self.lease_namespace = lease_namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)

    # KubeVirt
    def get_vmi(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.custom.get_namespaced_custom_object(
                kubevirt.GROUP, kubevirt.VERSION, namespace, kubevirt.VMI_PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        assert isinstance(obj, dict)
        return obj

    # inventories
    def get_inventory(self, node: str) -> dict[str, Any] | None:
        try:
            obj = self.custom.get_cluster_custom_object(GROUP, VERSION, INVENTORY_PLURAL, node)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        assert isinstance(obj, dict)
        return obj

    def list_inventories(self) -> list[dict[str, Any]]:
        obj = self.custom.list_cluster_custom_object(GROUP, VERSION, INVENTORY_PLURAL)
        assert isinstance(obj, dict)
        return list(obj.get("items", []))

    # nodes
    def schedulable_nodes(self) -> set[str]:
        """Nodes that are Ready and not cordoned."""
        out: set[str] = set()
        for n in self.core.list_node().items:
            if n.spec and n.spec.unschedulable:
                continue
            conds = (n.status.conditions or []) if n.status else []
            if any(c.type == "Ready" and c.status == "True" for c in conds) and n.metadata:
                out.add(str(n.metadata.name))
        return out

    # DeviceMigration
    def patch_dm_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        obj = self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, DM_PLURAL, name, {"status": dict(status)}
        )
        assert isinstance(obj, dict)
        return obj

    def create_dm_if_absent(self, body: Mapping[str, Any]) -> bool:
        """Create a DeviceMigration; False if one of that name exists."""
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, body["metadata"]["namespace"], DM_PLURAL, dict(body)
            )
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def get_dm(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, DM_PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        assert isinstance(obj, dict)
        return obj
