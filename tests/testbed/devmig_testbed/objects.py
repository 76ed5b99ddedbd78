"""Builders and waiters for the objects operator tests create: Nodes,
NodeDeviceInventories, KubeVirt VMIs, DeviceMigrations. Test-bed only."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

GROUP, VERSION = "devmig.io", "v1alpha1"


def create_node(api: Any, name: str, ready: bool = True) -> None:
    """A Node object as a kubelet would register it (no kubelet runs here)."""
    core = client.CoreV1Api(api)
    try:
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name)))
    except ApiException as e:
        if e.status != 409:
            raise
    core.patch_node_status(
        name,
        {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "reason": "KubeletReady",
                        "message": "test node",
                    }
                ]
            }
        },
    )


def device(id_: str, **kw: Any) -> dict[str, Any]:
    """An inventory device entry shaped as the CRD defines it."""
    d: dict[str, Any] = {
        "id": id_,
        "resourceName": "devmig.io/sim",
        "vendorId": "0x1af4",
        "deviceId": "0x10f0",
        "subsystemVendorId": "0x1af4",
        "subsystemDeviceId": "0x0001",
        "driver": "devmig-sim",
        "driverVersion": "1",
        "mdevType": "",
        "iommuGroup": 7,
        "migrationFlags": ["STOP_COPY", "P2P", "PRE_COPY"],
        "dirtyTracking": ["DMA_LOGGING"],
        "migratable": True,
        "health": "Healthy",
    }
    d.update(kw)
    return d


def put_inventory(api: Any, node: str, devices: list[dict[str, Any]], endpoint: str = "") -> None:
    """Create or replace a node's inventory, as its agent would."""
    co = client.CustomObjectsApi(api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NodeDeviceInventory",
        "metadata": {"name": node},
        "spec": {"nodeName": node},
    }
    try:
        co.create_cluster_custom_object(GROUP, VERSION, "nodedeviceinventories", body)
    except ApiException as e:
        if e.status != 409:
            raise
    status: dict[str, Any] = {
        "devices": devices,
        "deviceCount": len(devices),
        "migratableCount": sum(1 for d in devices if d.get("migratable")),
        "agentVersion": "test",
    }
    if endpoint:
        status["agentEndpoint"] = endpoint
    co.patch_cluster_custom_object_status(
        GROUP, VERSION, "nodedeviceinventories", node, {"status": status}
    )


def create_vmi(
    api: Any,
    namespace: str,
    name: str,
    node: str,
    devices: list[str] | None = None,
    host_devices: list[str] | None = None,
    phase: str = "Running",
) -> dict[str, Any]:
    co = client.CustomObjectsApi(api)
    body: dict[str, Any] = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "annotations": {}},
        "spec": {
            "domain": {
                "devices": {
                    "hostDevices": [
                        {"name": f"hd{i}", "deviceName": d}
                        for i, d in enumerate(host_devices or [])
                    ]
                }
            }
        },
    }
    if devices:
        body["metadata"]["annotations"]["devmig.io/devices"] = ",".join(devices)
    co.create_namespaced_custom_object(
        "kubevirt.io", "v1", namespace, "virtualmachineinstances", body
    )
    obj = co.patch_namespaced_custom_object_status(
        "kubevirt.io",
        "v1",
        namespace,
        "virtualmachineinstances",
        name,
        {"status": {"phase": phase, "nodeName": node}},
    )
    assert isinstance(obj, dict)
    return obj


def create_dm(api: Any, namespace: str, name: str, vmi: str, **spec: Any) -> dict[str, Any]:
    obj = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "devicemigrations",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DeviceMigration",
            "metadata": {"name": name},
            "spec": {"vmiName": vmi, **spec},
        },
    )
    assert isinstance(obj, dict)
    return obj


def wait_dm(
    api: Any,
    namespace: str,
    name: str,
    until: Callable[[dict[str, Any]], bool],
    timeout_s: float = 60,
) -> dict[str, Any]:
    """Watch a DeviceMigration until ``until(obj)``; raise with the last
    status seen if it does not happen within ``timeout_s``."""
    co = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        w = watch.Watch()
        for ev in w.stream(
            co.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            "devicemigrations",
            field_selector=f"metadata.name={name}",
            timeout_seconds=max(1, int(deadline - time.monotonic())),
        ):
            last = ev["object"]
            if until(last):
                w.stop()
                return last
    raise AssertionError(
        f"DeviceMigration {namespace}/{name} never matched; last status {last.get('status')}"
    )


def wait_any_dm(api: Any, namespace: str, timeout_s: float = 60) -> dict[str, Any]:
    """The first DeviceMigration that appears in ``namespace``."""
    co = client.CustomObjectsApi(api)
    w = watch.Watch()
    for ev in w.stream(
        co.list_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        "devicemigrations",
        timeout_seconds=int(timeout_s),
    ):
        w.stop()
        obj: dict[str, Any] = ev["object"]
        return obj
    raise AssertionError(f"no DeviceMigration appeared in {namespace} within {timeout_s} s")


def eventually(fn: Callable[[], Any], timeout_s: float = 15, what: str = "") -> Any:
    """Call ``fn`` until it stops raising, up to ``timeout_s``; for state the
    API server makes visible eventually, such as a new RoleBinding reaching
    the RBAC authorizer's cache. Polls every 50 ms (the authorizer's cache
    follows a watch, typically within tens of milliseconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except Exception as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or fn} did not succeed within {timeout_s} s") from e
        time.sleep(0.05)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60) -> None:
    """Poll ``check`` every 0.2 s until it is true; AssertionError naming
    ``what`` after ``timeout_s``. For state only a process can tell (a log
    line, a guest's view), where no watch exists."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def create_vmim(api: Any, namespace: str, name: str, vmi: str) -> dict[str, Any]:
    """A VirtualMachineInstanceMigration of ``vmi``, as ``virtctl migrate``
    creates it (the test stand-in for virt-controller moves its phases)."""
    obj = client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubevirt.io",
        "v1",
        namespace,
        "virtualmachineinstancemigrations",
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": name},
            "spec": {"vmiName": vmi},
        },
    )
    assert isinstance(obj, dict)
    return obj


FINAL_PHASES = ("Succeeded", "Failed", "Aborted")


def wait_dm_final(api: Any, namespace: str, name: str, timeout_s: float = 120) -> dict[str, Any]:
    """Watch a DeviceMigration until it reaches a final phase."""
    return wait_dm(
        api,
        namespace,
        name,
        lambda o: o.get("status", {}).get("phase") in FINAL_PHASES,
        timeout_s=timeout_s,
    )
