"""Which pod, container and VMI holds each device, from the kubelet.

The kubelet's PodResources v1 API (a Unix socket, plain gRPC) names, per
container, the device ids each device plugin allocated. Those ids are not
always what devmig calls a device:

- KubeVirt's built-in PCI and mdev plugins report the device's **IOMMU group
  number** ("42"); a map on the node turns the group into the PCI address or
  mdev UUID.
- External plugins (NVIDIA's kubevirt-gpu-device-plugin and similar) report
  the **PCI address** ("0000:3b:00.1"), some without the PCI domain.
- mdev-based plugins may report the **mdev UUID**.

``resolve_device_id`` maps any of these onto the node's device ids, and
``device_holders`` joins the kubelet's answer with the node's devices and
(optionally) pod labels to say which VMI holds each device.

The socket's *directory* is what the DaemonSet mounts, so the client keeps
working across kubelet restarts (the kubelet re-creates the socket file).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

from devmig_agent import podresources_api as api

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# The kubelet's own e2e tests dial the socket with these: 10 s to connect
# (a local socket answers in milliseconds; 10 s rides out a kubelet restart)
# and 16 MiB for the largest answer (List on a node with many pods).
CONNECT_TIMEOUT_SECONDS = 10.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Deadline of one call, seconds: the kubelet answers from memory.
CALL_TIMEOUT_SECONDS = 10.0

# Labels and annotations KubeVirt puts on a virt-launcher pod.
LAUNCHER_LABEL = "kubevirt.io"
LAUNCHER_VALUE = "virt-launcher"
VMI_UID_LABEL = "kubevirt.io/created-by"
VMI_ID_LABEL = "vmi.kubevirt.io/id"  # truncated with a hash suffix past 63 characters
DOMAIN_ANNOTATION = "kubevirt.io/domain"  # the VMI name, never truncated
# generateName is "virt-launcher-<vmi>-"; the API server appends 5 characters.
_LAUNCHER_POD_NAME = re.compile(r"^virt-launcher-(?P<vmi>.+)-[a-z0-9]{5}$")

_PCI_ADDRESS = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<dev>[0-9a-fA-F]{2})\.(?P<fn>[0-7])$"
)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


class PodResourcesError(Exception):
    """A failed kubelet call; ``reason`` is CamelCase."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One device id the kubelet assigned to one container."""

    namespace: str
    pod: str
    container: str
    resource_name: str
    device_id: str  # as the device plugin named it
    numa_nodes: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class AllocatableDevice:
    resource_name: str
    device_id: str
    numa_nodes: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class NodeDeviceKey:
    """What the mapping needs to know of a device on this node."""

    id: str  # PCI address ("0000:3b:00.1") or mdev UUID
    iommu_group: int  # -1 when unknown


@dataclasses.dataclass(frozen=True)
class Holder:
    device_id: str  # devmig's id: PCI address or mdev UUID
    resource_name: str
    pod: str  # "namespace/name"
    container: str
    vmi: str  # "namespace/name", or "" when the pod is not a virt-launcher
    vmi_uid: str = ""


# Labels and annotations of a pod, or None when the pod is unknown.
@dataclasses.dataclass(frozen=True)
class PodMeta:
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


PodLookup = Callable[[str, str], PodMeta | None]


def normalize_pci_address(s: str) -> str | None:
    """``3B:00.1`` or ``0000:3b:00.1`` -> ``0000:3b:00.1``; None if not a PCI address."""
    m = _PCI_ADDRESS.match(s.strip())
    if not m:
        return None
    domain = m.group("domain") or "0000"
    return f"{domain}:{m.group('bus')}:{m.group('dev')}.{m.group('fn')}".lower()


def resolve_device_id(reported: str, devices: Iterable[NodeDeviceKey]) -> list[str]:
    """The node's device ids a device-plugin id stands for.

    A decimal number is an IOMMU group (KubeVirt's built-in plugins): every
    device of this node in that group, sorted. A PCI address or an mdev UUID
    names one device, in any case and with or without the PCI domain. An id
    that matches nothing on the node gives an empty list.
    """
    devices = list(devices)
    r = reported.strip()
    if r.isdecimal():
        group = int(r)
        return sorted(d.id for d in devices if d.iommu_group == group)
    pci = normalize_pci_address(r)
    if pci is not None:
        return [d.id for d in devices if normalize_pci_address(d.id) == pci]
    if _UUID.match(r):
        return [d.id for d in devices if d.id.lower() == r.lower()]
    return [d.id for d in devices if d.id == r]


def vmi_of_pod(namespace: str, pod: str, meta: PodMeta | None) -> tuple[str, str]:
    """(``namespace/vmi-name``, VMI UID) of a virt-launcher pod, or ("", "").

    With the pod's metadata: only pods labelled ``kubevirt.io=virt-launcher``;
    the name comes from the ``kubevirt.io/domain`` annotation (never
    truncated), else the ``vmi.kubevirt.io/id`` label (exact below 64
    characters); the UID from ``kubevirt.io/created-by``. Without metadata the
    pod name ``virt-launcher-<vmi>-<5 chars>`` gives the name and no UID.
    """
    if meta is not None:
        if meta.labels.get(LAUNCHER_LABEL) != LAUNCHER_VALUE:
            return "", ""
        name = meta.annotations.get(DOMAIN_ANNOTATION) or meta.labels.get(VMI_ID_LABEL, "")
        if not name:
            m = _LAUNCHER_POD_NAME.match(pod)
            name = m.group("vmi") if m else ""
        uid = meta.labels.get(VMI_UID_LABEL, "")
        return (f"{namespace}/{name}" if name else ""), uid
    m = _LAUNCHER_POD_NAME.match(pod)
    return (f"{namespace}/{m.group('vmi')}", "") if m else ("", "")


def device_holders(
    assignments: Iterable[Assignment],
    devices: Iterable[NodeDeviceKey],
    pod_lookup: PodLookup | None = None,
) -> dict[str, Holder]:
    """devmig device id -> who holds it. Devices nobody holds are absent.

    ``pod_lookup`` (namespace, name) -> labels and annotations, e.g. from a
    pod informer; without it, VMIs are found by pod name alone.
    """
    devices = list(devices)
    meta_cache: dict[tuple[str, str], PodMeta | None] = {}
    out: dict[str, Holder] = {}
    for a in assignments:
        key = (a.namespace, a.pod)
        if key not in meta_cache:
            meta_cache[key] = pod_lookup(a.namespace, a.pod) if pod_lookup else None
        vmi, uid = vmi_of_pod(a.namespace, a.pod, meta_cache[key])
        for dev_id in resolve_device_id(a.device_id, devices):
            out[dev_id] = Holder(
                device_id=dev_id,
                resource_name=a.resource_name,
                pod=f"{a.namespace}/{a.pod}",
                container=a.container,
                vmi=vmi,
                vmi_uid=uid,
            )
    return out


def _numa(topology: Any) -> tuple[int, ...]:
    return tuple(int(n.ID) for n in topology.nodes)


def _assignments(pod: Any) -> list[Assignment]:
    out = []
    for c in pod.containers:
        for d in c.devices:
            for dev_id in d.device_ids:
                out.append(
                    Assignment(
                        namespace=pod.namespace,
                        pod=pod.name,
                        container=c.name,
                        resource_name=d.resource_name,
                        device_id=dev_id,
                        numa_nodes=_numa(d.topology),
                    )
                )
    return out


class PodResourcesClient:
    """A client of one kubelet's PodResources v1 socket.

    One channel for the client's life: gRPC reconnects by itself when the
    kubelet restarts and re-creates the socket. Errors are
    ``PodResourcesError`` with reason ``KubeletUnavailable`` (no socket, or
    nothing answering within the connect timeout), ``RateLimited`` (the
    kubelet allows 100 calls per second with a burst of 10),
    ``ResponseTooLarge`` (an answer over ``max_message_bytes``) or
    ``KubeletError``.
    """

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        call_timeout: float = CALL_TIMEOUT_SECONDS,
    ) -> None:
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self._channel = grpc.insecure_channel(
            f"unix://{socket_path}",
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                # The kubelet speaks to "localhost" on its socket.
                ("grpc.default_authority", "localhost"),
            ],
        )
        self._stub = api.PodResourcesListerStub(self._channel)
        self._ready = False

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PodResourcesClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        if self._ready:
            return
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise PodResourcesError(
                "KubeletUnavailable",
                f"no kubelet answered on {self.socket_path} within {self.connect_timeout} s",
            ) from None
        self._ready = True

    def _call(self, rpc: str, request: Any) -> Any:
        self._connect()
        try:
            return getattr(self._stub, rpc)(request, timeout=self.call_timeout)
        except grpc.RpcError as e:
            code = e.code()
            details = e.details() or ""
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # Two causes share the code: the kubelet's rate limit, and an
                # answer bigger than max_message_bytes (refused by this side).
                if "larger than max" in details:
                    raise PodResourcesError("ResponseTooLarge", details) from None
                raise PodResourcesError("RateLimited", details) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # Let the next call wait for the (re-created) socket again.
                self._ready = False
                raise PodResourcesError("KubeletUnavailable", details) from None
            raise PodResourcesError("KubeletError", f"{code.name}: {details}") from None

    def list_assignments(self) -> list[Assignment]:
        """Every device assigned to a container of an active pod."""
        resp = self._call("List", api.ListPodResourcesRequest())
        return [a for p in resp.pod_resources for a in _assignments(p)]

    def allocatable(self) -> list[AllocatableDevice]:
        """Every device the kubelet can hand out on this node."""
        resp = self._call("GetAllocatableResources", api.AllocatableResourcesRequest())
        return [
            AllocatableDevice(d.resource_name, dev_id, _numa(d.topology))
            for d in resp.devices
            for dev_id in d.device_ids
        ]

    def get(self, namespace: str, pod: str) -> list[Assignment] | None:
        """One pod's devices; None when the kubelet does not know the pod.

        The kubelet reports "not found" and "Get disabled" as plain errors
        (status code not fixed by the API), so they are told apart by their
        text. A kubelet without Get (gate off before 1.34, or before 1.27)
        raises ``PodResourcesError("GetUnsupported")``: use ``list_assignments``.
        """
        try:
            resp = self._call(
                "Get", api.GetPodResourcesRequest(pod_name=pod, pod_namespace=namespace)
            )
        except PodResourcesError as e:
            text = str(e)
            low = text.lower()
            if "not found" in low or "not_found" in low:
                return None
            if "disabled" in low or "unimplemented" in low:
                raise PodResourcesError("GetUnsupported", text) from None
            raise
        return _assignments(resp.pod_resources)
