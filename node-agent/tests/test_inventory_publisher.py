"""Publishing the node's NodeDeviceInventory to a real kube-apiserver."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devmig_agent import inventory, podresources
from devmig_agent.inventory import InventoryDevice, InventoryPublisher, Outcome

GPU = InventoryDevice(
    id="0000:3b:00.1",
    resource_name="nvidia.com/GRID_T4-1Q",
    vendor_id=0x10DE,
    device_id=0x1EB8,
    subsystem_vendor_id=0x10DE,
    subsystem_device_id=0x12A2,
    driver="nvidia-vfio-pci",
    driver_version="550.54.14",
    iommu_group=42,
    migration_flags=("STOP_COPY", "PRE_COPY", "P2P"),
    dirty_tracking=("DMA_LOGGING",),
    estimated_state_bytes=268435456,
    migratable=True,
    pod="vms/virt-launcher-db-x7k2p",
    vmi="vms/db",
    health="Healthy",
)
# A plain mapping in the CRD's own spelling, as discovery may hand it over.
VF = {
    "id": "0000:af:00.2",
    "vendorId": "0x8086",
    "deviceId": "0x154c",
    "driver": "vfio-pci",
    "iommuGroup": 7,
    "migratable": False,
    "notMigratableReason": "the driver has no VFIO migration support",
    "health": "Healthy",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # Unix seconds

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api(kube: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


@pytest.fixture
def node(api: client.CustomObjectsApi) -> Iterator[str]:
    # Inventories are cluster-scoped and the API server is shared by the
    # session: a node name of its own per test, its inventory removed after.
    name = f"node-{uuid.uuid4().hex[:10]}"
    yield name
    try:
        api.delete_cluster_custom_object("devmig.io", "v1alpha1", "nodedeviceinventories", name)
    except ApiException as e:
        if e.status != 404:
            raise


def read(api: client.CustomObjectsApi, node: str) -> dict[str, Any]:
    obj = api.get_cluster_custom_object("devmig.io", "v1alpha1", "nodedeviceinventories", node)
    assert isinstance(obj, dict)
    return obj


@pytest.mark.controlplane
def test_the_first_publish_creates_the_inventory_with_every_status_field(
    api: client.CustomObjectsApi, node: str
) -> None:
    clock = FakeClock()
    pub = InventoryPublisher(
        api,
        node,
        lambda: [GPU, VF],
        agent_version="0.1.0",
        agent_endpoint="10.0.0.7:7443",
        clock=clock,
    )
    r = pub.publish_once()
    assert r.outcome is Outcome.CREATED
    obj = read(api, node)
    assert obj["spec"] == {"nodeName": node}
    st = obj["status"]
    assert st["deviceCount"] == 2
    assert st["migratableCount"] == 1
    assert st["agentVersion"] == "0.1.0"
    assert st["agentEndpoint"] == "10.0.0.7:7443"
    assert st["heartbeatTime"] == "2027-01-15T08:00:00Z"
    gpu, vf = st["devices"]
    assert gpu == {
        "id": "0000:3b:00.1",
        "resourceName": "nvidia.com/GRID_T4-1Q",
        "vendorId": "0x10de",
        "deviceId": "0x1eb8",
        "subsystemVendorId": "0x10de",
        "subsystemDeviceId": "0x12a2",
        "driver": "nvidia-vfio-pci",
        "driverVersion": "550.54.14",
        "iommuGroup": 42,
        "migrationFlags": ["STOP_COPY", "P2P", "PRE_COPY"],
        "dirtyTracking": ["DMA_LOGGING"],
        "estimatedStateBytes": 268435456,
        "migratable": True,
        "pod": "vms/virt-launcher-db-x7k2p",
        "vmi": "vms/db",
        "health": "Healthy",
    }
    assert vf["vendorId"] == "0x8086" and vf["migratable"] is False
    assert vf["notMigratableReason"] == "the driver has no VFIO migration support"
    assert r.resource_version == obj["metadata"]["resourceVersion"]


@pytest.mark.controlplane
def test_nothing_is_written_while_nothing_changed_and_the_heartbeat_is_not_due(
    api: client.CustomObjectsApi, node: str
) -> None:
    clock = FakeClock()
    pub = InventoryPublisher(api, node, lambda: [GPU], clock=clock)
    first = pub.publish_once()
    clock.now += inventory.HEARTBEAT_SECONDS - 1
    again = pub.publish_once()
    assert again.outcome is Outcome.UNCHANGED
    assert again.resource_version == first.resource_version
    assert read(api, node)["metadata"]["resourceVersion"] == first.resource_version


@pytest.mark.controlplane
def test_a_due_heartbeat_is_written_even_when_nothing_else_changed(
    api: client.CustomObjectsApi, node: str
) -> None:
    clock = FakeClock()
    pub = InventoryPublisher(api, node, lambda: [GPU], clock=clock)
    first = pub.publish_once()
    clock.now += inventory.HEARTBEAT_SECONDS
    beat = pub.publish_once()
    assert beat.outcome is Outcome.HEARTBEAT
    assert beat.resource_version != first.resource_version
    assert read(api, node)["status"]["heartbeatTime"] == "2027-01-15T08:01:00Z"


@pytest.mark.controlplane
def test_a_changed_device_is_published_at_once(api: client.CustomObjectsApi, node: str) -> None:
    clock = FakeClock()
    devices: list[Any] = [GPU]
    pub = InventoryPublisher(api, node, lambda: devices, clock=clock)
    pub.publish_once()
    devices[0] = InventoryDevice(**{**GPU.__dict__, "vmi": "", "pod": ""})
    devices.append(VF)
    r = pub.publish_once()
    assert r.outcome is Outcome.UPDATED
    st = read(api, node)["status"]
    assert st["deviceCount"] == 2
    assert "vmi" not in st["devices"][0]


@pytest.mark.controlplane
def test_a_restarted_agent_respects_the_heartbeat_it_finds(
    api: client.CustomObjectsApi, node: str
) -> None:
    clock = FakeClock()
    InventoryPublisher(api, node, lambda: [GPU], clock=clock).publish_once()
    clock.now += 5
    again = InventoryPublisher(api, node, lambda: [GPU], clock=clock).publish_once()
    assert again.outcome is Outcome.UNCHANGED


class ConflictingApi(client.CustomObjectsApi):  # type: ignore[misc]
    """Another writer changes the object between our read and our write."""

    def __init__(self, api_client: Any, other: client.CustomObjectsApi, times: int) -> None:
        super().__init__(api_client)
        self.other = other
        self.times = times
        self.writes = 0

    def replace_cluster_custom_object_status(self, *args: Any, **kw: Any) -> Any:
        self.writes += 1
        if self.times > 0:
            self.times -= 1
            name = args[3]
            self.other.patch_cluster_custom_object(
                "devmig.io",
                "v1alpha1",
                "nodedeviceinventories",
                name,
                {"metadata": {"labels": {"touched-by": f"other-{self.times}"}}},
            )
        return super().replace_cluster_custom_object_status(*args, **kw)


@pytest.mark.controlplane
def test_a_409_conflict_is_met_by_reading_again_and_retrying(
    kube: Any, api: client.CustomObjectsApi, node: str
) -> None:
    clock = FakeClock()
    InventoryPublisher(api, node, lambda: [GPU], clock=clock).publish_once()
    racing = ConflictingApi(kube, api, times=2)
    pub = InventoryPublisher(racing, node, lambda: [GPU, VF], clock=clock)
    r = pub.publish_once()
    assert r.outcome is Outcome.UPDATED
    assert r.conflicts == 2
    assert racing.writes == 3
    obj = read(api, node)
    assert obj["status"]["deviceCount"] == 2
    assert obj["metadata"]["labels"] == {"touched-by": "other-0"}, "the other write survives"


@pytest.mark.controlplane
def test_endless_conflicts_give_up_with_a_reason(
    kube: Any, api: client.CustomObjectsApi, node: str
) -> None:
    clock = FakeClock()
    InventoryPublisher(api, node, lambda: [GPU], clock=clock).publish_once()
    racing = ConflictingApi(kube, api, times=1000)
    with pytest.raises(inventory.InventoryError) as e:
        InventoryPublisher(racing, node, lambda: [VF], clock=clock).publish_once()
    assert e.value.reason == "ConflictRetriesExhausted"
    assert racing.writes == inventory.MAX_CONFLICT_RETRIES + 1


@pytest.mark.controlplane
def test_the_agent_publishes_with_only_the_verbs_the_chart_grants_it(
    control_plane: Any, kube: Any, namespace: str, node: str
) -> None:
    rbac = client.RbacAuthorizationV1Api(kube)
    role = f"devmig-agent-{node}"
    rbac.create_cluster_role(
        client.V1ClusterRole(
            metadata=client.V1ObjectMeta(name=role),
            rules=[
                client.V1PolicyRule(
                    api_groups=["devmig.io"],
                    resources=["nodedeviceinventories"],
                    verbs=["get", "create", "update", "patch"],
                ),
                client.V1PolicyRule(
                    api_groups=["devmig.io"],
                    resources=["nodedeviceinventories/status"],
                    verbs=["get", "update", "patch"],
                ),
            ],
        )
    )
    rbac.create_cluster_role_binding(
        client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name=role),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=role
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="agent", namespace=namespace)
            ],
        )
    )
    sa = control_plane.api_client(control_plane.service_account_kubeconfig(namespace, "agent"))
    try:
        sa_api = client.CustomObjectsApi(sa)
        # The authorizer's cache may lag the binding by a moment: retry the
        # first call on 403 a bounded number of times, each a real request.
        for attempt in range(50):
            try:
                r = InventoryPublisher(sa_api, node, lambda: [GPU]).publish_once()
                break
            except ApiException as e:
                if e.status != 403 or attempt == 49:
                    raise
        assert r.outcome is Outcome.CREATED
        with pytest.raises(ApiException) as denied:
            sa_api.delete_cluster_custom_object(
                "devmig.io", "v1alpha1", "nodedeviceinventories", node
            )
        assert denied.value.status == 403
    finally:
        sa.close()
        rbac.delete_cluster_role_binding(role)
        rbac.delete_cluster_role(role)


@pytest.mark.controlplane
def test_an_inventory_deleted_under_the_agent_is_created_again(
    api: client.CustomObjectsApi, node: str
) -> None:
    clock = FakeClock()
    pub = InventoryPublisher(api, node, lambda: [GPU], clock=clock)
    pub.publish_once()
    api.delete_cluster_custom_object("devmig.io", "v1alpha1", "nodedeviceinventories", node)
    assert pub.publish_once().outcome is Outcome.CREATED
    assert read(api, node)["status"]["deviceCount"] == 1


def test_status_values_the_crd_does_not_know_are_left_out_not_rejected() -> None:
    d = InventoryDevice(
        id="x", dirty_tracking=("TRAPS", "TYPE1"), migration_flags=("P2P", "BOGUS"), health="Sick"
    )
    st = d.to_status()
    assert st["dirtyTracking"] == ["TYPE1"]
    assert st["migrationFlags"] == ["P2P"]
    assert st["health"] == "Unknown"


def test_a_device_mapping_with_an_unknown_field_is_refused() -> None:
    with pytest.raises(ValueError):
        inventory.build_status([{"id": "x", "color": "red"}], "0.1.0")
    with pytest.raises(ValueError):
        inventory.build_status([{"id": "x"}, {"id": "x"}], "0.1.0")


@pytest.mark.controlplane
def test_run_publishes_until_stopped(api: client.CustomObjectsApi, node: str) -> None:
    import threading

    stop = threading.Event()
    calls = 0

    def discover() -> list[InventoryDevice]:
        nonlocal calls
        calls += 1
        if calls == 2:
            stop.set()  # the second poll is the last
        return [GPU]

    pub = InventoryPublisher(api, node, discover)
    t = threading.Thread(target=pub.run, args=(stop,), kwargs={"poll_seconds": 0.01})
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    assert calls == 2
    assert read(api, node)["status"]["deviceCount"] == 1


def test_holders_from_the_kubelet_fill_pod_vmi_and_missing_resource_names() -> None:
    bare = [
        InventoryDevice(id="0000:3b:00.1", iommu_group=42, pod="stale/pod", vmi="stale/vmi"),
        InventoryDevice(id="0000:3b:00.2", iommu_group=43, resource_name="own/name"),
        InventoryDevice(id="0000:af:00.0", iommu_group=7),
    ]
    keys = inventory.node_device_keys(bare)
    assignments = [
        podresources.Assignment(
            "vms", "virt-launcher-db-x7k2p", "compute", "devices.kubevirt.io/t4", "42"
        ),
        podresources.Assignment("vms", "virt-launcher-db-x7k2p", "compute", "x/y", "0000:3b:00.2"),
    ]
    got = inventory.with_holders(bare, podresources.device_holders(assignments, keys))
    assert [(d.pod, d.vmi, d.resource_name) for d in got] == [
        ("vms/virt-launcher-db-x7k2p", "vms/db", "devices.kubevirt.io/t4"),
        ("vms/virt-launcher-db-x7k2p", "vms/db", "own/name"),
        ("", "", ""),
    ]
