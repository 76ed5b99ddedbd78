"""Publishes this node's ``NodeDeviceInventory`` (cluster-scoped, named after the node).

The operator chooses migration targets from these objects, so the status
must be current and must say when it was last confirmed:

- Created when absent (``spec.nodeName`` = the node), then its ``status``
  written through the status subresource.
- The status is rewritten only when something in it changed, or when the
  heartbeat is due. Every write carries the ``resourceVersion`` it read, so
  a concurrent writer (another agent instance during a rolling update, or a
  human with kubectl) makes the API server answer 409 Conflict; the
  publisher then reads again and retries, rather than overwriting blindly.
- ``heartbeatTime`` is renewed every ``HEARTBEAT_SECONDS`` (60 s) even when
  nothing changed, so a reader can tell a live agent from a dead one: an
  inventory whose heartbeat is more than three intervals old (3 min) is
  stale. 60 s keeps the API server's load at one small write per node per
  minute (a 1000-node cluster: about 17 writes/s), while a dead agent is
  noticed within minutes, well before anyone would start a migration on it.

Device discovery is injected: a function returning the node's devices as
``InventoryDevice`` values or plain mappings (field names of
``InventoryDevice``, or the CRD's camelCase names), so the native core can
plug in without this module knowing it.
"""

# The kubernetes client's API methods carry no annotations.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import dataclasses
import datetime
import enum
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

import devmig_agent
from devmig_agent.podresources import Holder, NodeDeviceKey

log = logging.getLogger(__name__)

GROUP = "devmig.io"
VERSION = "v1alpha1"
PLURAL = "nodedeviceinventories"
KIND = "NodeDeviceInventory"

HEARTBEAT_SECONDS = 60.0
# How often ``run`` looks at the devices, seconds: a VM starting or stopping
# changes which pod holds a device, and a placement decision should see that
# within a few seconds; discovery reads sysfs and the kubelet socket, which
# costs milliseconds, and nothing is written unless something changed.
POLL_SECONDS = 10.0
# Attempts of one publish against 409 Conflicts; more than a couple of
# conflicts in a row means another writer is fighting us, which a later
# poll retries anyway.
MAX_CONFLICT_RETRIES = 5
# CRD limit on status.devices (maxItems).
MAX_DEVICES = 256

MIGRATION_FLAGS = ("STOP_COPY", "P2P", "PRE_COPY")
DIRTY_TRACKING = ("TYPE1", "DMA_LOGGING", "IOMMUFD_HWPT")
HEALTH = ("Healthy", "Unhealthy", "Unknown")


@dataclasses.dataclass(frozen=True)
class InventoryDevice:
    """One VFIO device as the inventory lists it."""

    id: str  # PCI address "0000:3b:00.1" or mdev UUID
    resource_name: str = ""
    vendor_id: int = 0
    device_id: int = 0
    subsystem_vendor_id: int = 0
    subsystem_device_id: int = 0
    driver: str = ""
    driver_version: str = ""
    mdev_type: str = ""
    iommu_group: int = -1  # -1: unknown
    migration_flags: tuple[str, ...] = ()
    dirty_tracking: tuple[str, ...] = ()
    estimated_state_bytes: int = 0
    migratable: bool = False
    not_migratable_reason: str = ""
    pod: str = ""  # namespace/name
    vmi: str = ""  # namespace/name
    health: str = "Unknown"

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> InventoryDevice:
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in m.items():
            snake = re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower()
            if snake not in names:
                raise ValueError(f"unknown device field {k!r}")
            if snake in ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_device_id"):
                v = int(v, 16) if isinstance(v, str) else int(v)
            if snake in ("migration_flags", "dirty_tracking"):
                v = tuple(v)
            kw[snake] = v
        return cls(**kw)

    def to_status(self) -> dict[str, Any]:
        """The CRD's ``status.devices[]`` entry. Values the CRD does not
        allow are left out (an unknown dirty-tracking method, an unknown
        health) rather than failing the whole inventory."""
        d: dict[str, Any] = {"id": self.id}
        if self.resource_name:
            d["resourceName"] = self.resource_name
        for key, v in (
            ("vendorId", self.vendor_id),
            ("deviceId", self.device_id),
            ("subsystemVendorId", self.subsystem_vendor_id),
            ("subsystemDeviceId", self.subsystem_device_id),
        ):
            if v:
                d[key] = f"0x{v:04x}"
        for key, s in (
            ("driver", self.driver),
            ("driverVersion", self.driver_version),
            ("mdevType", self.mdev_type),
        ):
            if s:
                d[key] = s
        if self.iommu_group >= 0:
            d["iommuGroup"] = self.iommu_group
        d["migrationFlags"] = [f for f in MIGRATION_FLAGS if f in self.migration_flags]
        d["dirtyTracking"] = [t for t in DIRTY_TRACKING if t in self.dirty_tracking]
        if self.estimated_state_bytes:
            d["estimatedStateBytes"] = self.estimated_state_bytes
        d["migratable"] = self.migratable
        if self.not_migratable_reason:
            d["notMigratableReason"] = self.not_migratable_reason
        if self.pod:
            d["pod"] = self.pod
        if self.vmi:
            d["vmi"] = self.vmi
        d["health"] = self.health if self.health in HEALTH else "Unknown"
        return d


DeviceLike = InventoryDevice | Mapping[str, Any]
Discover = Callable[[], Iterable[DeviceLike]]


def build_status(
    devices: Iterable[DeviceLike], agent_version: str, agent_endpoint: str = ""
) -> dict[str, Any]:
    """The inventory's status without ``heartbeatTime``, devices sorted by id."""
    devs = [
        d if isinstance(d, InventoryDevice) else InventoryDevice.from_mapping(d) for d in devices
    ]
    ids = [d.id for d in devs]
    if len(set(ids)) != len(ids):
        raise ValueError("two devices share an id")
    devs.sort(key=lambda d: d.id)
    if len(devs) > MAX_DEVICES:
        log.error("node has %d devices; the inventory lists the first %d", len(devs), MAX_DEVICES)
        devs = devs[:MAX_DEVICES]
    status: dict[str, Any] = {
        "agentVersion": agent_version,
        "deviceCount": len(devs),
        "migratableCount": sum(1 for d in devs if d.migratable),
        "devices": [d.to_status() for d in devs],
    }
    if agent_endpoint:
        status["agentEndpoint"] = agent_endpoint
    return status


def format_time(unix_seconds: float) -> str:
    """RFC 3339 in UTC, whole seconds (as Kubernetes writes its own times)."""
    t = datetime.datetime.fromtimestamp(int(unix_seconds), tz=datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


class Outcome(enum.Enum):
    CREATED = "Created"  # the object did not exist
    UPDATED = "Updated"  # the status changed
    HEARTBEAT = "Heartbeat"  # nothing changed but the heartbeat was due
    UNCHANGED = "Unchanged"  # nothing written


@dataclasses.dataclass(frozen=True)
class PublishResult:
    outcome: Outcome
    resource_version: str
    conflicts: int  # 409s met on the way


class InventoryError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _as_dict(obj: object) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InventoryError("UnexpectedAnswer", f"API server answered {type(obj).__name__}")
    return obj


class InventoryPublisher:
    def __init__(
        self,
        api: client.CustomObjectsApi,
        node_name: str,
        discover: Discover,
        *,
        agent_version: str = devmig_agent.__version__,
        agent_endpoint: str = "",
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.discover = discover
        self.agent_version = agent_version
        self.agent_endpoint = agent_endpoint
        self.heartbeat_seconds = heartbeat_seconds
        self.clock = clock

    def _get(self) -> dict[str, Any] | None:
        try:
            obj = self.api.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.node_name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return _as_dict(obj)

    def _create(self) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": self.node_name},
            "spec": {"nodeName": self.node_name},
        }
        try:
            return _as_dict(self.api.create_cluster_custom_object(GROUP, VERSION, PLURAL, body))
        except ApiException as e:
            if e.status != 409:
                raise
            # Created meanwhile (a previous instance of this agent): use it.
            obj = self._get()
            if obj is None:
                raise
            return obj

    def _due(self, current: Mapping[str, Any], now: float) -> bool:
        beat = parse_time(str(current.get("heartbeatTime", "")))
        return beat is None or now - beat >= self.heartbeat_seconds

    def publish_once(self) -> PublishResult:
        """Discover the devices and write the status if it changed or the
        heartbeat is due. Raises ``ApiException`` for API errors other than
        409, ``InventoryError("ConflictRetriesExhausted")`` after too many 409s."""
        status = build_status(self.discover(), self.agent_version, self.agent_endpoint)
        created = False
        conflicts = 0
        obj = self._get()
        while True:
            if obj is None:
                obj = self._create()
                created = True
            current = dict(obj.get("status") or {})
            now = self.clock()
            changed = {k: v for k, v in current.items() if k != "heartbeatTime"} != status
            if not changed and not self._due(current, now):
                return PublishResult(
                    Outcome.UNCHANGED, obj["metadata"]["resourceVersion"], conflicts
                )
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "metadata": {
                    "name": self.node_name,
                    "resourceVersion": obj["metadata"]["resourceVersion"],
                },
                "spec": obj.get("spec") or {"nodeName": self.node_name},
                "status": {**status, "heartbeatTime": format_time(now)},
            }
            try:
                written = _as_dict(
                    self.api.replace_cluster_custom_object_status(
                        GROUP, VERSION, PLURAL, self.node_name, body
                    )
                )
            except ApiException as e:
                if e.status == 409:
                    conflicts += 1
                    if conflicts > MAX_CONFLICT_RETRIES:
                        raise InventoryError(
                            "ConflictRetriesExhausted",
                            f"{conflicts} conflicts in a row writing {self.node_name}",
                        ) from None
                    log.info("inventory %s changed under us; reading it again", self.node_name)
                    obj = self._get()
                    continue
                if e.status == 404:
                    # Deleted between read and write: create it again.
                    obj = None
                    continue
                raise
            outcome = (
                Outcome.CREATED if created else Outcome.UPDATED if changed else Outcome.HEARTBEAT
            )
            return PublishResult(outcome, written["metadata"]["resourceVersion"], conflicts)

    def run(self, stop: threading.Event, poll_seconds: float = POLL_SECONDS) -> None:
        """Publish until ``stop`` is set; errors are logged and retried next poll."""
        while not stop.is_set():
            try:
                r = self.publish_once()
                if r.outcome is not Outcome.UNCHANGED:
                    log.info("inventory %s: %s", self.node_name, r.outcome.value)
            except Exception:
                log.exception("publishing inventory %s failed; retrying", self.node_name)
            stop.wait(poll_seconds)


def with_holders(
    devices: Iterable[InventoryDevice], holders: Mapping[str, Holder]
) -> list[InventoryDevice]:
    """The devices with ``pod`` and ``vmi`` from the kubelet's view
    (``podresources.device_holders``), and ``resource_name`` where discovery
    did not know it. A device nobody holds gets empty ``pod`` and ``vmi``."""
    out = []
    for d in devices:
        h = holders.get(d.id)
        out.append(
            dataclasses.replace(
                d,
                pod=h.pod if h else "",
                vmi=h.vmi if h else "",
                resource_name=d.resource_name or (h.resource_name if h else ""),
            )
        )
    return out


def node_device_keys(devices: Iterable[InventoryDevice]) -> list[NodeDeviceKey]:
    """What ``podresources`` needs to map device-plugin ids onto these devices."""
    return [NodeDeviceKey(d.id, d.iommu_group) for d in devices]


def devices_from(items: Sequence[DeviceLike]) -> Discover:
    """A ``Discover`` returning a fixed list (for tests and static setups)."""
    return lambda: list(items)
