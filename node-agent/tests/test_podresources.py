"""The kubelet PodResources client, against a stand-in kubelet on a real Unix socket."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor
from kubelet_standin import StandInDevice, StandInKubelet, StandInPod

from devmig_agent import podresources
from devmig_agent import podresources_api as api
from devmig_agent.podresources import (
    Assignment,
    NodeDeviceKey,
    PodMeta,
    PodResourcesClient,
    PodResourcesError,
)

# Field numbers exactly as interfaces.md lists them for the kubelet's v1 API.
DOCUMENTED_FIELDS = {
    "AllocatableResourcesResponse": {"devices": 1, "cpu_ids": 2, "memory": 3},
    "ListPodResourcesResponse": {"pod_resources": 1},
    "PodResources": {"name": 1, "namespace": 2, "containers": 3},
    "ContainerResources": {
        "name": 1,
        "devices": 2,
        "cpu_ids": 3,
        "memory": 4,
        "dynamic_resources": 5,
    },
    "ContainerMemory": {"memory_type": 1, "size": 2, "topology": 3},
    "ContainerDevices": {"resource_name": 1, "device_ids": 2, "topology": 3},
    "TopologyInfo": {"nodes": 1},
    "NUMANode": {"ID": 1},
    "DynamicResource": {"claim_name": 2, "claim_namespace": 3, "claim_resources": 4},
    "ClaimResource": {
        "cdi_devices": 1,
        "driver_name": 2,
        "pool_name": 3,
        "device_name": 4,
        "share_id": 5,
    },
    "CDIDevice": {"name": 1},
    "GetPodResourcesRequest": {"pod_name": 1, "pod_namespace": 2},
    "GetPodResourcesResponse": {"pod_resources": 1},
    "ListPodResourcesRequest": {},
    "AllocatableResourcesRequest": {},
}


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path, named
    # after these long test names, can exceed that.
    d = tempfile.mkdtemp(prefix="dm-pr-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kubelet(sock_dir: str, clock: FakeClock) -> Iterator[StandInKubelet]:
    k = StandInKubelet(f"{sock_dir}/kubelet.sock", clock=clock).start()
    yield k
    k.stop()


@pytest.fixture
def client(kubelet: StandInKubelet) -> Iterator[PodResourcesClient]:
    with PodResourcesClient(kubelet.socket_path, connect_timeout=10) as c:
        yield c


def launcher_pod(ns: str, vmi: str, resource: str, ids: list[str]) -> StandInPod:
    return StandInPod(
        ns,
        f"virt-launcher-{vmi}-x7k2p",
        {"compute": [StandInDevice(resource, ids, [0])], "volumecontainerdisk": []},
    )


def test_the_api_uses_the_kubelets_method_paths() -> None:
    assert api.method_path("List") == "/v1.PodResourcesLister/List"
    assert (
        api.method_path("GetAllocatableResources")
        == "/v1.PodResourcesLister/GetAllocatableResources"
    )
    assert api.method_path("Get") == "/v1.PodResourcesLister/Get"
    svc = api.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert svc.full_name == "v1.PodResourcesLister"
    assert {m.name: (m.input_type.name, m.output_type.name) for m in svc.methods} == {
        "List": ("ListPodResourcesRequest", "ListPodResourcesResponse"),
        "GetAllocatableResources": ("AllocatableResourcesRequest", "AllocatableResourcesResponse"),
        "Get": ("GetPodResourcesRequest", "GetPodResourcesResponse"),
    }


def test_every_message_has_the_documented_field_names_and_numbers() -> None:
    assert api.DESCRIPTOR.package == "v1"
    got = {
        name: {f.name: f.number for f in m.fields}
        for name, m in api.DESCRIPTOR.message_types_by_name.items()
    }
    assert got == DOCUMENTED_FIELDS


def test_repeated_fields_and_the_optional_share_id_are_declared_as_documented() -> None:
    msgs = api.DESCRIPTOR.message_types_by_name
    dev = msgs["ContainerDevices"].fields_by_name
    assert dev["device_ids"].is_repeated
    assert dev["device_ids"].type == descriptor.FieldDescriptor.TYPE_STRING
    assert not dev["resource_name"].is_repeated
    assert msgs["NUMANode"].fields_by_name["ID"].type == descriptor.FieldDescriptor.TYPE_INT64
    assert msgs["GetPodResourcesResponse"].fields_by_name["pod_resources"].message_type.name == (
        "PodResources"
    )
    share = api.message_class("ClaimResource")()
    assert not share.HasField("share_id")
    share.share_id = ""
    assert share.HasField("share_id"), "share_id must have explicit presence"


def test_the_stand_in_kubelet_serves_the_documented_method_paths(
    kubelet: StandInKubelet,
) -> None:
    # Raw calls by path, as a kubelet client in any language would make them.
    with grpc.insecure_channel(f"unix://{kubelet.socket_path}") as ch:
        raw = ch.unary_unary("/v1.PodResourcesLister/List")(b"", timeout=10)
        assert raw == b""  # no pods: an empty response
        kubelet.pods.append(launcher_pod("ns", "vm", "devmig.io/sim", ["0000:3b:00.1"]))
        raw = ch.unary_unary("/v1.PodResourcesLister/List")(b"", timeout=10)
        # field 1 (pod_resources), wire type 2 (length-delimited): tag byte 0x0a.
        assert raw[0] == 0x0A
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/v1.PodResourcesLister/Watch")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_list_reports_each_device_with_its_pod_container_and_numa_node(
    kubelet: StandInKubelet, client: PodResourcesClient
) -> None:
    kubelet.pods = [
        launcher_pod("vms", "db", "nvidia.com/GRID_T4-1Q", ["0000:3b:00.1", "0000:3b:00.2"]),
        StandInPod("kube-system", "coredns-abc", {"coredns": []}),
    ]
    assert client.list_assignments() == [
        Assignment("vms", "virt-launcher-db-x7k2p", "compute", "nvidia.com/GRID_T4-1Q", i, (0,))
        for i in ("0000:3b:00.1", "0000:3b:00.2")
    ]


def test_allocatable_lists_every_device_the_kubelet_can_hand_out(
    kubelet: StandInKubelet, client: PodResourcesClient
) -> None:
    kubelet.allocatable = [StandInDevice("devices.kubevirt.io/sim", ["17", "18"], [1])]
    got = client.allocatable()
    assert [(d.resource_name, d.device_id, d.numa_nodes) for d in got] == [
        ("devices.kubevirt.io/sim", "17", (1,)),
        ("devices.kubevirt.io/sim", "18", (1,)),
    ]


def test_get_returns_one_pods_devices_and_none_for_an_unknown_pod(
    kubelet: StandInKubelet, client: PodResourcesClient
) -> None:
    kubelet.pods = [launcher_pod("vms", "a", "r/x", ["1"]), launcher_pod("vms", "b", "r/x", ["2"])]
    got = client.get("vms", "virt-launcher-b-x7k2p")
    assert got is not None and [a.device_id for a in got] == ["2"]
    assert client.get("vms", "virt-launcher-zzz-x7k2p") is None


def test_get_on_a_kubelet_with_the_get_gate_off_says_use_list(sock_dir: str) -> None:
    k = StandInKubelet(f"{sock_dir}/off.sock", get_enabled=False).start()
    try:
        with PodResourcesClient(k.socket_path) as c, pytest.raises(PodResourcesError) as e:
            c.get("vms", "p")
        assert e.value.reason == "GetUnsupported"
    finally:
        k.stop()


def test_calls_over_the_kubelets_rate_limit_fail_as_rate_limited_until_tokens_refill(
    kubelet: StandInKubelet, client: PodResourcesClient, clock: FakeClock
) -> None:
    for _ in range(10):  # the burst
        client.list_assignments()
    with pytest.raises(PodResourcesError) as e:
        client.list_assignments()
    assert e.value.reason == "RateLimited"
    clock.t += 0.015  # 15 ms at 100 calls/s refills one and a half tokens: one call
    client.list_assignments()
    with pytest.raises(PodResourcesError):
        client.list_assignments()


def test_no_kubelet_on_the_socket_is_kubelet_unavailable_after_the_connect_timeout(
    sock_dir: str,
) -> None:
    with PodResourcesClient(f"{sock_dir}/absent.sock", connect_timeout=0.2) as c:
        with pytest.raises(PodResourcesError) as e:
            c.list_assignments()
        assert e.value.reason == "KubeletUnavailable"


def test_the_client_reconnects_when_the_kubelet_restarts_on_the_same_socket(
    sock_dir: str, clock: FakeClock
) -> None:
    path = f"{sock_dir}/kubelet.sock"
    first = StandInKubelet(path, clock=clock).start()
    with PodResourcesClient(path) as c:
        first.pods = [launcher_pod("ns", "a", "r/x", ["1"])]
        assert len(c.list_assignments()) == 1
        first.stop()
        with pytest.raises(PodResourcesError) as e:
            c.list_assignments()
        assert e.value.reason == "KubeletUnavailable"
        second = StandInKubelet(path, clock=clock).start()
        try:
            second.pods = [
                launcher_pod("ns", "b", "r/x", ["2"]),
                launcher_pod("ns", "c", "r/x", []),
            ]
            assert [a.pod for a in c.list_assignments()] == ["virt-launcher-b-x7k2p"]
        finally:
            second.stop()


NODE = [
    NodeDeviceKey("0000:3b:00.1", 42),
    NodeDeviceKey("0000:3b:00.2", 43),
    NodeDeviceKey("0000:af:00.0", 7),
    NodeDeviceKey("0000:af:00.1", 7),
    NodeDeviceKey("b7c4a2f0-1e0a-4b4e-9d2f-6a9f7c3e5d11", 120),
]


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        ("42", ["0000:3b:00.1"]),  # KubeVirt built-in PCI plugin: IOMMU group
        ("7", ["0000:af:00.0", "0000:af:00.1"]),  # two functions share a group
        ("120", ["b7c4a2f0-1e0a-4b4e-9d2f-6a9f7c3e5d11"]),  # built-in mdev plugin
        ("0000:3b:00.2", ["0000:3b:00.2"]),  # external plugin: PCI address
        ("0000:3B:00.2", ["0000:3b:00.2"]),
        ("3b:00.2", ["0000:3b:00.2"]),  # without the PCI domain
        ("B7C4A2F0-1E0A-4B4E-9D2F-6A9F7C3E5D11", ["b7c4a2f0-1e0a-4b4e-9d2f-6a9f7c3e5d11"]),
        ("99", []),
        ("0000:00:1f.0", []),
        ("gpu-1", []),
    ],
)
def test_device_plugin_ids_resolve_to_the_nodes_device_ids(
    reported: str, expected: list[str]
) -> None:
    assert podresources.resolve_device_id(reported, NODE) == expected


def test_pci_addresses_normalize_to_lowercase_with_a_domain() -> None:
    assert podresources.normalize_pci_address("3B:00.1") == "0000:3b:00.1"
    assert podresources.normalize_pci_address("0001:3b:00.7") == "0001:3b:00.7"
    assert podresources.normalize_pci_address("0000:3b:00.8") is None
    assert podresources.normalize_pci_address("42") is None


def test_holders_name_the_vmi_from_the_launcher_pods_labels_and_annotation() -> None:
    long_name = "a" * 70
    metas = {
        ("vms", "virt-launcher-db-x7k2p"): PodMeta(
            labels={"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "uid-1"},
            annotations={"kubevirt.io/domain": "db"},
        ),
        ("vms", "virt-launcher-long-abcde"): PodMeta(
            labels={
                "kubevirt.io": "virt-launcher",
                "vmi.kubevirt.io/id": "a" * 54 + "-12345678",
                "kubevirt.io/created-by": "uid-2",
            },
            annotations={"kubevirt.io/domain": long_name},
        ),
        ("apps", "virt-launcher-fake-abcde"): PodMeta(labels={"app": "x"}, annotations={}),
    }
    assignments = [
        Assignment("vms", "virt-launcher-db-x7k2p", "compute", "devices.kubevirt.io/sim", "42"),
        Assignment("vms", "virt-launcher-long-abcde", "compute", "nvidia.com/T4", "0000:3b:00.2"),
        Assignment("apps", "virt-launcher-fake-abcde", "main", "r/x", "0000:af:00.0"),
        Assignment("vms", "virt-launcher-gone-abcde", "compute", "r/x", "99"),
    ]
    held = podresources.device_holders(assignments, NODE, lambda ns, n: metas.get((ns, n)))
    assert held["0000:3b:00.1"].vmi == "vms/db"
    assert held["0000:3b:00.1"].vmi_uid == "uid-1"
    assert held["0000:3b:00.1"].pod == "vms/virt-launcher-db-x7k2p"
    assert held["0000:3b:00.2"].vmi == f"vms/{long_name}"
    assert held["0000:af:00.0"].vmi == "", "a pod not labelled virt-launcher holds no VMI"
    assert held["0000:af:00.0"].pod == "apps/virt-launcher-fake-abcde"
    assert set(held) == {"0000:3b:00.1", "0000:3b:00.2", "0000:af:00.0"}


def test_without_pod_metadata_the_vmi_comes_from_the_launcher_pod_name() -> None:
    assignments = [
        Assignment("vms", "virt-launcher-my-vm.v2-q9z8w", "compute", "r/x", "42"),
        Assignment("vms", "sriov-helper-0", "main", "r/x", "43"),
    ]
    held = podresources.device_holders(assignments, NODE)
    assert held["0000:3b:00.1"].vmi == "vms/my-vm.v2"
    assert held["0000:3b:00.2"].vmi == ""


def test_holders_come_from_a_real_list_call_end_to_end(
    kubelet: StandInKubelet, client: PodResourcesClient
) -> None:
    kubelet.pods = [launcher_pod("vms", "db", "devices.kubevirt.io/sim", ["7"])]
    held = podresources.device_holders(client.list_assignments(), NODE)
    assert {k: v.vmi for k, v in held.items()} == {
        "0000:af:00.0": "vms/db",
        "0000:af:00.1": "vms/db",
    }


def test_an_answer_over_the_message_size_limit_is_response_too_large(
    kubelet: StandInKubelet,
) -> None:
    # About 2 MiB of device ids: over a 1 MiB limit, well under the default 16 MiB.
    ids = [f"{i:06d}-" + "x" * 200 for i in range(10_000)]
    kubelet.pods = [launcher_pod("vms", "big", "r/x", ids)]
    with PodResourcesClient(kubelet.socket_path, max_message_bytes=1024 * 1024) as small:
        with pytest.raises(PodResourcesError) as e:
            small.list_assignments()
        assert e.value.reason == "ResponseTooLarge"
    with PodResourcesClient(kubelet.socket_path) as default:
        assert len(default.list_assignments()) == 10_000
