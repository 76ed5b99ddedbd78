"""Finds this node's VFIO devices in sysfs: PCI functions bound to vfio-pci
or a vfio-pci variant driver (mlx5_vfio_pci, hisi_acc_vfio_pci, ...), and
mediated devices (mdevs) bound to their vendor driver; and learns whether
each can migrate by asking the device (the native probe).

What sysfs says, per device (Documentation/ABI/testing/sysfs-bus-pci,
sysfs-bus-vfio-mdev, and the VFIO docs):

- ``/sys/bus/pci/devices/<domain:bus:dev.fn>`` and
  ``/sys/bus/mdev/devices/<uuid>`` link to the device's directory;
- ``driver`` links to the bound driver (its basename is the name);
- ``iommu_group`` links to ``/sys/kernel/iommu_groups/<N>``; the group's
  character device is ``/dev/vfio/<N>``, or ``/dev/vfio/noiommu-<N>`` for
  a device without an IOMMU (vfio's unsafe no-IOMMU mode);
- ``vfio-dev/vfio<M>`` exists when the kernel has VFIO device cdevs: the
  device's own character device is ``/dev/vfio/devices/vfio<M>``;
- PCI: ``vendor``, ``device``, ``subsystem_vendor``, ``subsystem_device``,
  ``class`` hold hex numbers ("0x10de\\n");
- mdev: ``mdev_type`` links to the parent's
  ``mdev_supported_types/<type>`` directory; its basename is the type id
  (``mtty-2``, ``nvidia-558``) and its ``name`` file a readable name.
  The device's parent is the directory above it.

A device bound to VFIO is one the node set aside for a guest: the walk
lists them all, migratable or not, so an operator sees why one is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import threading
from collections.abc import Callable, Collection

import devmig_native
from devmig_agent.inventory import MIGRATION_FLAGS, InventoryDevice

log = logging.getLogger(__name__)

# The PCI core's vfio driver, and how variant drivers built on vfio-pci-core
# are named (mlx5_vfio_pci, hisi_acc_vfio_pci, pds_vfio_pci, virtio_vfio_pci,
# nvgrace_gpu_vfio_pci, ...). A device with a ``vfio-dev`` directory is a
# VFIO device whatever its driver is called.
VFIO_PCI = "vfio-pci"


@dataclasses.dataclass(frozen=True)
class Found:
    """One VFIO device as sysfs describes it."""

    id: str  # PCI address or mdev UUID
    bus: str  # "pci" or "mdev"
    driver: str
    vendor_id: int = 0
    device_id: int = 0
    subsystem_vendor_id: int = 0
    subsystem_device_id: int = 0
    class_code: int = 0
    iommu_group: int = -1
    group_path: str = ""  # /dev/vfio/<N> or /dev/vfio/noiommu-<N>, "" none
    cdev_path: str = ""  # /dev/vfio/devices/vfio<M>, "" none
    mdev_type: str = ""
    parent: str = ""  # an mdev's parent device


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _hex(path: str) -> int:
    v = _read(path)
    try:
        return int(v, 16) if v else 0
    except ValueError:
        return 0


def _link_name(path: str) -> str:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def is_vfio_driver(driver: str) -> bool:
    return driver == VFIO_PCI or driver.replace("-", "_").endswith("_vfio_pci")


def _common(dev_dir: str, dev_root: str) -> tuple[int, str, str]:
    group = _link_name(os.path.join(dev_dir, "iommu_group"))
    gnum, gpath = -1, ""
    if group.isdigit():
        gnum = int(group)
        for name in (group, f"noiommu-{group}"):
            p = os.path.join(dev_root, "vfio", name)
            if os.path.exists(p):
                gpath = p
                break
    cdev = ""
    with contextlib.suppress(OSError):
        names = sorted(
            n for n in os.listdir(os.path.join(dev_dir, "vfio-dev")) if n.startswith("vfio")
        )
        if names:
            cdev = os.path.join(dev_root, "vfio", "devices", names[0])
    return gnum, gpath, cdev


def walk(sys_root: str = "/sys", dev_root: str = "/dev") -> list[Found]:
    """Every VFIO device on the node, sorted by id. Reads sysfs only; a
    device that disappears during the walk is left out."""
    out: list[Found] = []
    pci = os.path.join(sys_root, "bus", "pci", "devices")
    for name in _listdir(pci):
        d = os.path.join(pci, name)
        driver = _link_name(os.path.join(d, "driver"))
        has_cdev = os.path.isdir(os.path.join(d, "vfio-dev"))
        if not (is_vfio_driver(driver) or has_cdev):
            continue
        gnum, gpath, cdev = _common(d, dev_root)
        out.append(
            Found(
                id=name,
                bus="pci",
                driver=driver,
                vendor_id=_hex(os.path.join(d, "vendor")),
                device_id=_hex(os.path.join(d, "device")),
                subsystem_vendor_id=_hex(os.path.join(d, "subsystem_vendor")),
                subsystem_device_id=_hex(os.path.join(d, "subsystem_device")),
                class_code=_hex(os.path.join(d, "class")),
                iommu_group=gnum,
                group_path=gpath,
                cdev_path=cdev,
            )
        )
    mdev = os.path.join(sys_root, "bus", "mdev", "devices")
    for name in _listdir(mdev):
        d = os.path.join(mdev, name)
        driver = _link_name(os.path.join(d, "driver"))
        if not driver:
            continue  # created but not bound: nothing can open it
        gnum, gpath, cdev = _common(d, dev_root)
        parent = ""
        with contextlib.suppress(OSError):
            parent = os.path.basename(os.path.dirname(os.path.realpath(d)))
        out.append(
            Found(
                id=name,
                bus="mdev",
                driver=driver,
                iommu_group=gnum,
                group_path=gpath,
                cdev_path=cdev,
                mdev_type=_link_name(os.path.join(d, "mdev_type")),
                parent=parent,
            )
        )
    return sorted(out, key=lambda f: f.id)


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


@dataclasses.dataclass
class Opened:
    """A device a probe left open for the agent to manage: its VFIO fds and
    the native core's handle on a duplicate of its device fd."""

    vfio: devmig_native.VfioHandle
    device: devmig_native.Device

    def close(self) -> None:
        self.device.close()
        self.vfio.close()


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    flags: tuple[str, ...] = ()
    migratable: bool = False
    reason: str = ""  # why not migratable, or why unknown
    # probe(keep=True) of a migratable device: left open, the caller's now.
    opened: Opened | None = dataclasses.field(default=None, compare=False, repr=False)


# VFIO_MIGRATION_STOP_COPY is what migration needs at least.
_REQUIRED = devmig_native.MigFlags.STOP_COPY


def probe(found: Found, iommufd_path: str = "/dev/iommu", *, keep: bool = False) -> ProbeResult:
    """Open the device (its cdev with a fresh iommufd, else its group with a
    fresh type1 container) and ask for its migration flags. The device is
    closed again, unless ``keep`` and it can migrate: then it stays open in
    ``opened`` (opening is exclusive, so the agent holds on to what it
    will drive). A device a VMM holds cannot be opened twice: that is
    ``InUse``, not a verdict."""
    by_cdev = bool(found.cdev_path) and os.path.exists(iommufd_path)
    try:
        if by_cdev:
            handle = devmig_native.open_cdev(found.cdev_path, iommufd_path)
        elif found.group_path:
            handle = devmig_native.open_group(found.group_path, found.id)
        else:
            return ProbeResult(reason="NoVfioNode: neither a group nor a cdev node in /dev")
    except devmig_native.DevmigError as e:
        # A group another process opened is EBUSY; a cdev opens twice but
        # the kernel refuses to bind a second fd of a bound device (EINVAL,
        # shown on 6.12 by tests/kernel).
        if e.errno in (errno.EBUSY, errno.EPERM) or (by_cdev and e.errno == errno.EINVAL):
            return ProbeResult(reason=f"InUse: {e}")
        return ProbeResult(reason=f"OpenFailed: {e}")
    kept = False
    try:
        dev = devmig_native.Device.open_vfio(
            handle.device_fd, found.vendor_id, found.device_id, found.driver
        )
        try:
            flags = dev.probe()
            names = tuple(f.name for f in devmig_native.MigFlags if f.name and flags & f)
            if not flags & _REQUIRED:
                return ProbeResult(
                    flags=names, reason="NoStopCopy: the device cannot save its state"
                )
            if keep:
                kept = True
                return ProbeResult(flags=names, migratable=True, opened=Opened(handle, dev))
            return ProbeResult(flags=names, migratable=True)
        finally:
            if not kept:
                dev.close()
    except devmig_native.DevmigError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return ProbeResult(reason="NoMigrationSupport: the driver offers no VFIO migration")
        return ProbeResult(reason=f"ProbeFailed: {e}")
    finally:
        if not kept:
            handle.close()


class Discovery:
    """The node's VFIO devices as inventory entries, re-walked on each call.
    Probing opens a device, so a device is probed once per driver binding
    (a rebind may bring migration support) and the answer kept; a device
    that was in use is probed again on a later walk.

    With ``keep``, a migratable device is left open by its probe and handed
    to the caller (``take_opened``) to manage; devices the caller already
    holds (``held``) are neither probed nor listed again."""

    def __init__(
        self,
        sys_root: str = "/sys",
        dev_root: str = "/dev",
        *,
        keep: bool = False,
        probe_fn: Callable[[Found], ProbeResult] | None = None,
    ) -> None:
        self.sys_root = sys_root
        self.dev_root = dev_root
        iommufd = os.path.join(dev_root, "iommu")
        self._probe = probe_fn or (lambda f: probe(f, iommufd, keep=keep))
        self._known: dict[tuple[str, str], ProbeResult] = {}
        self._opened: list[tuple[InventoryDevice, Opened]] = []
        self._lock = threading.Lock()

    def __call__(self, held: Collection[str] = ()) -> list[InventoryDevice]:
        found = walk(self.sys_root, self.dev_root)
        out = []
        with self._lock:
            for f in found:
                if f.id in held:
                    continue
                key = (f.id, f.driver)
                r = self._known.get(key)
                if r is None or r.reason.startswith("InUse"):
                    r = self._probe(f)
                    log.info(
                        "discovered %s (%s, %s): %s%s",
                        f.id,
                        f.bus,
                        f.driver,
                        " ".join(r.flags) or r.reason,
                        " (opened)" if r.opened is not None else "",
                    )
                    if r.opened is not None:
                        self._opened.append((to_inventory(f, r), r.opened))
                        # Probe it again should the caller ever let it go.
                        continue
                    self._known[key] = r
                out.append(to_inventory(f, r))
            live = {(f.id, f.driver) for f in found}
            for k in set(self._known) - live:
                del self._known[k]
        return out

    def take_opened(self) -> list[tuple[InventoryDevice, Opened]]:
        """The devices probes left open since the last call; the caller
        owns them."""
        with self._lock:
            out, self._opened = self._opened, []
        return out


def _health(r: ProbeResult) -> str:
    # Opened and answered: healthy, whether or not it can migrate. A device
    # that failed its probe is not; one a VMM holds, or without a node in
    # /dev, is not known.
    if r.migratable or r.reason.startswith(("NoMigrationSupport", "NoStopCopy")):
        return "Healthy"
    if r.reason.startswith("ProbeFailed"):
        return "Unhealthy"
    return "Unknown"


def to_inventory(f: Found, r: ProbeResult) -> InventoryDevice:
    return InventoryDevice(
        id=f.id,
        vendor_id=f.vendor_id,
        device_id=f.device_id,
        subsystem_vendor_id=f.subsystem_vendor_id,
        subsystem_device_id=f.subsystem_device_id,
        driver=f.driver,
        mdev_type=f.mdev_type,
        iommu_group=f.iommu_group,
        migration_flags=tuple(x for x in r.flags if x in MIGRATION_FLAGS),
        migratable=r.migratable,
        not_migratable_reason="" if r.migratable else r.reason,
        health=_health(r),
    )
