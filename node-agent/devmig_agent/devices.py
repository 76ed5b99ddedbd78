"""The devices an agent drives, and which session holds each.

A device is opened once and held for the agent's lifetime (the VMM gets a
duplicate of its fd); sessions borrow it. Real devices are the migratable
VFIO devices discovery found free and opened (discovery.py); on nodes
without migratable hardware, and in tests and the demo, the devices are
simulated devices from the native core: the kernel's semantics, no
hardware.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import uuid
import zlib

import devmig_native
from devmig_agent.inventory import InventoryDevice

# What a simulated device presents: a virtio-class vendor id (0x1af4) and a
# device id from its experimental range, so it can never be mistaken for
# real hardware, and a driver name that says what it is.
SIM_VENDOR_ID = 0x1AF4
SIM_DEVICE_ID = 0x10F0
SIM_DRIVER = "devmig-sim"
SIM_RESOURCE = "devmig.io/sim"


class DeviceBusy(Exception):
    pass


class UnknownDevice(Exception):
    pass


def new_incarnation() -> str:
    return uuid.uuid4().hex


@dataclasses.dataclass
class ManagedDevice:
    info: InventoryDevice
    handle: devmig_native.Device
    session_id: str = ""
    # A real device's VFIO fds (device fd, and the iommufd or group and
    # container that keep its IOMMU context): the device fd is what a VMM
    # is handed a duplicate of. None for a simulated device.
    vfio: devmig_native.VfioHandle | None = None
    # Names one open lifetime of the device: its state lives exactly as long
    # as some process holds an fd of it. The journal records it with each
    # session, so a restarted agent can tell a device that kept its state
    # (the same incarnation, e.g. an fd taken back from the VMM that held a
    # duplicate) from one that was reset (a new incarnation).
    incarnation: str = dataclasses.field(default_factory=new_incarnation)

    @property
    def id(self) -> str:
        return self.info.id


class DeviceRegistry:
    """Devices by id, with at most one session holding each."""

    def __init__(self, devices: list[ManagedDevice]) -> None:
        self._lock = threading.Lock()
        self._devices = {d.id: d for d in devices}
        # VFIO devices found on the node that the agent has not opened
        # (discovery.py): listed, not yet migratable through this agent.
        self._discovered: dict[str, InventoryDevice] = {}
        # Holders given by hand (``--device-holder``, a lab node without a
        # kubelet): VMI by device id, applied whenever the device is listed.
        self._pinned: dict[str, str] = {}
        self.changed = threading.Condition(self._lock)
        self.generation = 0

    def get(self, device_id: str) -> ManagedDevice:
        with self._lock:
            d = self._devices.get(device_id)
        if d is None:
            raise UnknownDevice(f"no device {device_id!r} on this node")
        return d

    def hold(self, device_id: str, session_id: str) -> ManagedDevice:
        """Reserve the device for a session; idempotent for the holder."""
        with self._lock:
            d = self._devices.get(device_id)
            if d is None:
                raise UnknownDevice(f"no device {device_id!r} on this node")
            if d.session_id and d.session_id != session_id:
                raise DeviceBusy(f"device {device_id} is held by session {d.session_id}")
            if not d.session_id:
                d.session_id = session_id
                self._bump()
            return d

    def add(self, device: ManagedDevice) -> None:
        """A device the agent opened while running (discovery found it free,
        or a VMM handed its fd back); it leaves the found-only list."""
        with self._lock:
            if device.id in self._devices:
                raise DeviceBusy(f"device {device.id} is already open")
            found = self._discovered.pop(device.id, None)
            if found is not None and not device.info.pod:
                device.info = dataclasses.replace(device.info, pod=found.pod, vmi=found.vmi)
            if device.id in self._pinned:
                device.info = dataclasses.replace(device.info, vmi=self._pinned[device.id])
            self._devices[device.id] = device
            self._bump()

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._devices)

    def found(self, device_id: str) -> InventoryDevice | None:
        """A device discovery listed without opening it (e.g. one a VMM
        holds), or None."""
        with self._lock:
            return self._discovered.get(device_id)

    def replace(self, device: ManagedDevice) -> None:
        """Swap in a re-opened device (same id), keeping who holds it."""
        with self._lock:
            old = self._devices.get(device.id)
            if old is None:
                raise UnknownDevice(f"no device {device.id!r} on this node")
            device.session_id = old.session_id
            self._devices[device.id] = device
            self._bump()

    def release(self, device_id: str, session_id: str) -> None:
        with self._lock:
            d = self._devices.get(device_id)
            if d is not None and d.session_id == session_id:
                d.session_id = ""
                self._bump()

    def pin_holder(self, device_id: str, vmi: str) -> None:
        """The VMI (namespace/name) holding a device that may not be listed
        yet: applied now and whenever discovery lists or opens it."""
        with self._lock:
            self._pinned[device_id] = vmi
            d = self._devices.get(device_id)
            if d is not None:
                d.info = dataclasses.replace(d.info, vmi=vmi)
            f = self._discovered.get(device_id)
            if f is not None:
                self._discovered[device_id] = dataclasses.replace(f, vmi=vmi)
            self._bump()

    def set_holder(self, device_id: str, vmi: str) -> None:
        """Record the VMI (namespace/name) holding a device."""
        d = self.get(device_id)
        with self._lock:
            d.info = dataclasses.replace(d.info, vmi=vmi)
            self._bump()

    def set_holders(self, devices: list[InventoryDevice]) -> bool:
        """Take ``pod``, ``vmi`` and ``resource_name`` from ``devices``
        (``inventory.with_holders`` of the kubelet's view); True if any
        changed."""
        by_id = {d.id: d for d in devices}
        changed = False
        with self._lock:
            for i, found in self._discovered.items():
                n = by_id.get(i)
                if n is not None:
                    new_found = dataclasses.replace(
                        found, pod=n.pod, vmi=n.vmi, resource_name=n.resource_name
                    )
                    if new_found != found:
                        self._discovered[i] = new_found
                        changed = True
            for d in self._devices.values():
                n = by_id.get(d.id)
                if n is None:
                    continue
                new = dataclasses.replace(
                    d.info, pod=n.pod, vmi=n.vmi, resource_name=n.resource_name
                )
                if new != d.info:
                    d.info = new
                    changed = True
            if changed:
                self._bump()
        return changed

    def inventory(self) -> list[InventoryDevice]:
        """What the node's NodeDeviceInventory lists: the devices the agent
        holds open, then those it only found."""
        return [d.info for d in self.all()] + self.discovered()

    def discovered(self) -> list[InventoryDevice]:
        with self._lock:
            return sorted(
                (d for i, d in self._discovered.items() if i not in self._devices),
                key=lambda d: d.id,
            )

    def set_discovered(self, found: list[InventoryDevice]) -> bool:
        """Replace the found-only devices (a sysfs walk's result, with the
        kubelet's holders kept); True if anything changed."""
        with self._lock:
            new = {}
            for d in found:
                old = self._discovered.get(d.id)
                if old is not None:
                    d = dataclasses.replace(
                        d,
                        pod=old.pod,
                        vmi=old.vmi,
                        resource_name=d.resource_name or old.resource_name,
                    )
                if d.id in self._pinned:
                    d = dataclasses.replace(d, vmi=self._pinned[d.id])
                new[d.id] = d
            if new == self._discovered:
                return False
            self._discovered = new
            self._bump()
            return True

    def all(self) -> list[ManagedDevice]:
        with self._lock:
            return sorted(self._devices.values(), key=lambda d: d.id)

    def _bump(self) -> None:
        self.generation += 1
        self.changed.notify_all()


def parse_size(s: str) -> int:
    """'64MiB', '1GiB', '4096' -> bytes."""
    m = re.fullmatch(r"(\d+)\s*(KiB|MiB|GiB)?", s.strip())
    if not m:
        raise ValueError(f"not a size: {s!r} (e.g. 64MiB)")
    mult = {None: 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]
    return int(m.group(1)) * mult


@dataclasses.dataclass(frozen=True)
class SimSpec:
    """``--sim count=2,size=64MiB,dirty=16``: devices, state size each, and
    pages (4 KiB) the running workload dirties per MiB of state between
    pre-copy rounds."""

    count: int = 1
    size: int = 16 << 20
    dirty: int = 0

    @classmethod
    def parse(cls, s: str) -> SimSpec:
        kv: dict[str, str] = {}
        for part in filter(None, s.split(",")):
            k, _, v = part.partition("=")
            kv[k.strip()] = v.strip()
        unknown = set(kv) - {"count", "size", "dirty"}
        if unknown:
            raise ValueError(f"unknown --sim key(s): {', '.join(sorted(unknown))}")
        return cls(
            count=int(kv.get("count", cls.count)),
            size=parse_size(kv["size"]) if "size" in kv else cls.size,
            dirty=int(kv.get("dirty", cls.dirty)),
        )


def simulated(node: str, spec: SimSpec) -> DeviceRegistry:
    """Simulated devices named ``sim-<node>-<n>``, all compatible with one
    another across nodes (same ids, driver and version), so any node's
    device can receive any other's state."""
    flags = (
        devmig_native.MigFlags.STOP_COPY
        | devmig_native.MigFlags.P2P
        | devmig_native.MigFlags.PRE_COPY
    )
    out = []
    for i in range(spec.count):
        handle = devmig_native.SimDevice(
            flags=flags,
            mem_size=spec.size,
            dirty_pages_per_mib=spec.dirty,
            # Distinct contents per device and node, so a test can tell
            # whose state a target received.
            seed=zlib.crc32(f"{node}/{i}".encode()),
            vendor_id=SIM_VENDOR_ID,
            device_id=SIM_DEVICE_ID,
            driver=SIM_DRIVER,
        )
        info = InventoryDevice(
            id=f"sim-{node}-{i}",
            resource_name=SIM_RESOURCE,
            vendor_id=SIM_VENDOR_ID,
            device_id=SIM_DEVICE_ID,
            subsystem_vendor_id=SIM_VENDOR_ID,
            subsystem_device_id=0x0001,
            driver=SIM_DRIVER,
            driver_version=devmig_native.version(),
            migration_flags=("STOP_COPY", "P2P", "PRE_COPY"),
            dirty_tracking=("DMA_LOGGING",),
            estimated_state_bytes=spec.size,
            migratable=True,
            health="Healthy",
        )
        out.append(ManagedDevice(info, handle))
    return DeviceRegistry(out)
