"""The sysfs walk that finds a node's VFIO devices, on a sysfs tree laid out
as the kernel lays it out (links into /sys/devices, drivers and IOMMU
groups as links, hex attribute files, ``vfio-dev`` for cdevs, mdevs under
their parent with ``mdev_type`` links), plus /dev nodes; and the probe
against the simulated devices' refusal paths. The layout facts are the
kernel ABI documents' (sysfs-bus-pci, sysfs-bus-vfio-mdev); the Debian
kernel test checks the same walk's names against a real kernel's sysfs."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys as pysys
import tempfile

import grpc

import devmig_native
from devmig.agent.v1alpha1 import agent_pb2 as pb
from devmig.agent.v1alpha1 import agent_pb2_grpc
from devmig_agent import devices, discovery, vmm
from devmig_agent import main as agent_main
from devmig_agent.discovery import Found, Opened, ProbeResult
from devmig_agent.inventory import InventoryDevice


def _pci(
    sys: pathlib.Path, bdf: str, driver: str, group: int, ids: tuple[int, ...], cdev: str = ""
) -> None:
    real = sys / "devices" / "pci0000:00" / bdf
    real.mkdir(parents=True)
    for name, v in zip(
        ("vendor", "device", "subsystem_vendor", "subsystem_device", "class"), ids, strict=True
    ):
        (real / name).write_text(f"0x{v:04x}\n")
    drv = sys / "bus" / "pci" / "drivers" / driver
    drv.mkdir(parents=True, exist_ok=True)
    (real / "driver").symlink_to(os.path.relpath(drv, real))
    g = sys / "kernel" / "iommu_groups" / str(group)
    g.mkdir(parents=True, exist_ok=True)
    (real / "iommu_group").symlink_to(os.path.relpath(g, real))
    if cdev:
        (real / "vfio-dev" / cdev).mkdir(parents=True)
    link = sys / "bus" / "pci" / "devices" / bdf
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(real, link.parent))


def _mdev(
    sys: pathlib.Path, uuid: str, parent: str, mtype: str, group: int, driver: str | None
) -> None:
    pdir = sys / "devices" / "virtual" / parent / parent
    types = pdir / "mdev_supported_types" / mtype
    types.mkdir(parents=True, exist_ok=True)
    (types / "name").write_text("Dual-port serial\n")
    real = pdir / uuid
    real.mkdir()
    (real / "mdev_type").symlink_to(os.path.relpath(types, real))
    g = sys / "kernel" / "iommu_groups" / str(group)
    g.mkdir(parents=True, exist_ok=True)
    (real / "iommu_group").symlink_to(os.path.relpath(g, real))
    if driver:
        drv = sys / "bus" / "mdev" / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        (real / "driver").symlink_to(os.path.relpath(drv, real))
    link = sys / "bus" / "mdev" / "devices" / uuid
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(real, link.parent))


def node(tmp: pathlib.Path) -> tuple[str, str]:
    sys, dev = tmp / "sys", tmp / "dev"
    # A GPU VF on vfio-pci with a cdev, a NIC VF on a variant driver
    # (group only), a NIC on its own driver, and two mdevs, one unbound.
    _pci(sys, "0000:3b:00.1", "vfio-pci", 12, (0x10DE, 0x2330, 0x10DE, 0x16C1, 0x030200), "vfio3")
    _pci(sys, "0000:5e:00.2", "mlx5_vfio_pci", 40, (0x15B3, 0x101E, 0x15B3, 0x0051, 0x020000))
    _pci(sys, "0000:00:1f.6", "e1000e", 7, (0x8086, 0x15BB, 0x8086, 0x0000, 0x020000))
    _mdev(sys, "83b8f4f2-509f-382f-3c1e-e6bfe0fa2001", "mtty", "mtty-2", 3, "mtty")
    _mdev(sys, "83b8f4f2-509f-382f-3c1e-e6bfe0fa2002", "mtty", "mtty-2", 4, None)
    (dev / "vfio" / "devices").mkdir(parents=True)
    for n in ("12", "noiommu-40", "3", "devices/vfio3"):
        (dev / "vfio" / n).touch()
    return str(sys), str(dev)


def test_the_walk_lists_vfio_pci_variant_and_mdev_devices_and_nothing_else(
    tmp_path: pathlib.Path,
) -> None:
    sys, dev = node(tmp_path)
    found = discovery.walk(sys, dev)
    assert [f.id for f in found] == [
        "0000:3b:00.1",
        "0000:5e:00.2",
        "83b8f4f2-509f-382f-3c1e-e6bfe0fa2001",
    ]
    gpu, nic, mdev = found
    assert gpu == Found(
        id="0000:3b:00.1",
        bus="pci",
        driver="vfio-pci",
        vendor_id=0x10DE,
        device_id=0x2330,
        subsystem_vendor_id=0x10DE,
        subsystem_device_id=0x16C1,
        class_code=0x030200,
        iommu_group=12,
        group_path=f"{dev}/vfio/12",
        cdev_path=f"{dev}/vfio/devices/vfio3",
    )
    # A variant driver, in vfio's no-IOMMU mode: the group node says so.
    assert (nic.driver, nic.group_path, nic.cdev_path) == (
        "mlx5_vfio_pci",
        f"{dev}/vfio/noiommu-40",
        "",
    )
    assert (mdev.bus, mdev.driver, mdev.mdev_type, mdev.parent, mdev.iommu_group) == (
        "mdev",
        "mtty",
        "mtty-2",
        "mtty",
        3,
    )


def test_an_empty_or_missing_sysfs_lists_nothing(tmp_path: pathlib.Path) -> None:
    assert discovery.walk(str(tmp_path / "nope"), str(tmp_path)) == []


def test_inventory_entries_say_why_a_device_cannot_migrate_and_probe_once(
    tmp_path: pathlib.Path,
) -> None:
    sys, dev = node(tmp_path)
    probed: list[str] = []
    answers = {
        "0000:3b:00.1": ProbeResult(flags=("STOP_COPY", "P2P", "PRE_COPY"), migratable=True),
        "0000:5e:00.2": ProbeResult(reason="InUse: the VMM holds it"),
        "83b8f4f2-509f-382f-3c1e-e6bfe0fa2001": ProbeResult(
            reason="NoMigrationSupport: the driver offers no VFIO migration"
        ),
    }

    def fake_probe(f: Found) -> ProbeResult:
        probed.append(f.id)
        return answers[f.id]

    d = discovery.Discovery(sys, dev, probe_fn=fake_probe)
    inv = {i.id: i for i in d()}
    assert inv["0000:3b:00.1"].migratable and inv["0000:3b:00.1"].migration_flags == (
        "STOP_COPY",
        "P2P",
        "PRE_COPY",
    )
    assert inv["0000:3b:00.1"].health == "Healthy" and inv["0000:3b:00.1"].iommu_group == 12
    assert not inv["0000:5e:00.2"].migratable
    assert inv["0000:5e:00.2"].not_migratable_reason.startswith("InUse")
    assert inv["0000:5e:00.2"].health == "Unknown"
    assert inv["83b8f4f2-509f-382f-3c1e-e6bfe0fa2001"].mdev_type == "mtty-2"
    assert inv["83b8f4f2-509f-382f-3c1e-e6bfe0fa2001"].health == "Healthy"
    # The next walk probes only the device that was in use.
    probed.clear()
    d()
    assert probed == ["0000:5e:00.2"]
    # Every entry is one the CRD accepts.
    for i in inv.values():
        assert i.to_status()["id"] == i.id


def test_a_probe_without_any_vfio_node_says_so(tmp_path: pathlib.Path) -> None:
    r = discovery.probe(Found(id="0000:00:01.0", bus="pci", driver="vfio-pci"))
    assert not r.migratable and r.reason.startswith("NoVfioNode")


def test_a_probe_of_a_group_that_is_not_a_vfio_node_is_an_open_failure(
    tmp_path: pathlib.Path,
) -> None:
    fake = tmp_path / "12"
    fake.touch()
    r = discovery.probe(
        Found(id="0000:00:01.0", bus="pci", driver="vfio-pci", group_path=str(fake))
    )
    assert not r.migratable and r.reason.startswith("OpenFailed")


def test_the_agent_process_lists_found_devices_beside_its_simulated_ones(
    tmp_path: pathlib.Path,
) -> None:
    sys, dev = node(tmp_path)
    proc = subprocess.Popen(
        [
            pysys.executable,
            "-m",
            "devmig_agent.main",
            "--node-name",
            "d",
            "--sim",
            "count=1,size=1MiB",
            "--state-dir",
            str(tmp_path / "state"),
            "--sysfs-root",
            sys,
            "--dev-root",
            dev,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        m = re.fullmatch(r"LISTENING (127\.0\.0\.1:\d+)\n", proc.stdout.readline())
        assert m, proc.stderr.read() if proc.stderr else ""
        with grpc.insecure_channel(m.group(1)) as ch:
            got = agent_pb2_grpc.NodeAgentStub(ch).ListDevices(pb.ListDevicesRequest(), timeout=10)
        by_id = {d.id: d for d in got.devices}
        assert set(by_id) == {
            "sim-d-0",
            "0000:3b:00.1",
            "0000:5e:00.2",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa2001",
        }
        assert by_id["sim-d-0"].migratable and by_id["sim-d-0"].state
        # The fixture's /dev nodes are plain files: the probe cannot open
        # them, and the entry says so instead of guessing.
        gpu = by_id["0000:3b:00.1"]
        assert (gpu.vendor_id, gpu.iommu_group, gpu.state) == (0x10DE, 12, 0)
        assert not gpu.migratable and gpu.not_migratable_reason.startswith("OpenFailed")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# ------------------------------------------------ devices the agent drives


def _opened() -> tuple[Opened, int]:
    """What a kept probe returns on a real node, with a memfd standing for
    the VFIO device fd and a simulated device for the native handle."""
    fd = os.memfd_create("vfio-device", os.MFD_CLOEXEC)
    return Opened(devmig_native.VfioHandle(device_fd=fd), devmig_native.SimDevice()), fd


def test_a_free_migratable_device_stays_open_and_its_vmm_gets_a_duplicate_of_its_fd(
    tmp_path: pathlib.Path,
) -> None:
    sys, dev = node(tmp_path)
    opened, fd = _opened()
    probed: list[str] = []

    def fake_probe(f: Found) -> ProbeResult:
        probed.append(f.id)
        if f.id == "0000:3b:00.1":
            return ProbeResult(flags=("STOP_COPY", "PRE_COPY"), migratable=True, opened=opened)
        return ProbeResult(reason="NoMigrationSupport: the driver offers no VFIO migration")

    reg = devices.DeviceRegistry([])
    reg.pin_holder("0000:3b:00.1", "ns/vm")
    find = discovery.Discovery(sys, dev, keep=True, probe_fn=fake_probe)
    agent_main.discover(reg, find)
    assert reg.ids() == {"0000:3b:00.1"}
    held = reg.get("0000:3b:00.1")
    assert held.vfio is opened.vfio and held.handle is opened.device
    inv = reg.inventory()
    assert inv[0].id == "0000:3b:00.1" and inv[0].migratable and inv[0].vmi == "ns/vm"
    assert "0000:3b:00.1" not in {d.id for d in reg.discovered()}
    # A device the agent holds is never probed again (it would be in use).
    probed.clear()
    agent_main.discover(reg, find)
    assert "0000:3b:00.1" not in probed and reg.ids() == {"0000:3b:00.1"}

    sock_dir = tempfile.mkdtemp(prefix="dm-disc-")
    hub = vmm.VmmHub(f"{sock_dir}/vmm.sock", reg)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(hub.path)
            vmm.send_line(c, {"op": "register", "id": 1, "device": "0000:3b:00.1"})
            r = vmm.LineReader(c, vmm.MAX_REPLY)
            reply = r.read()
            assert reply is not None and (reply["op"], reply["fd"]) == ("registered", "vfio")
            (got,) = r.fds
            # The same open file as the agent's own: a duplicate, not a copy.
            assert os.fstat(got).st_ino == os.fstat(fd).st_ino
            os.close(got)
    finally:
        hub.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_restarted_agent_opens_a_device_found_in_use_from_the_fd_its_vmm_hands_back(
    tmp_path: pathlib.Path,
) -> None:
    dev_id = "83b8f4f2-509f-382f-3c1e-e6bfe0fa2001"
    reg = devices.DeviceRegistry([])
    reg.set_discovered(
        [
            InventoryDevice(
                id=dev_id,
                driver="mtty",
                mdev_type="mtty-2",
                not_migratable_reason="InUse: VFIO_DEVICE_BIND_IOMMUFD: Invalid argument",
            )
        ]
    )
    sim = devmig_native.SimDevice()
    sock_dir = tempfile.mkdtemp(prefix="dm-disc-")
    hub = vmm.VmmHub(f"{sock_dir}/vmm.sock", reg)
    reacquirer = vmm.VmmReacquirer(hub, reg, open_device=lambda fd: sim, wait_s=0)
    fd = os.memfd_create("vfio-device", os.MFD_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(hub.path)
            r = vmm.LineReader(c, vmm.MAX_REPLY)
            # Unknown to this node: refused, the fd not taken.
            vmm.send_line(
                c,
                {"op": "register", "id": 1, "device": "nope", "incarnation": "i0", "fd": "vfio"},
                fd,
            )
            reply = r.read()
            assert reply is not None and reply["reason"] == "UnknownDevice"
            vmm.send_line(
                c,
                {"op": "register", "id": 2, "device": dev_id, "incarnation": "i1", "fd": "vfio"},
                fd,
            )
            reply = r.read()
            assert reply is not None and (reply["op"], reply["fd"]) == ("registered", "kept")
            assert hub.handed_back() == [dev_id]
            assert reacquirer.adopt_handed_back() == [dev_id]
        d = reg.get(dev_id)
        # The same incarnation: the VMM's fd kept the device's state.
        assert d.incarnation == "i1" and d.handle is sim
        assert d.vfio is not None and os.fstat(d.vfio.device_fd).st_ino == os.fstat(fd).st_ino
        # Completed from the device itself: it can migrate.
        assert d.info.migratable and "STOP_COPY" in d.info.migration_flags
        assert reg.discovered() == [] and hub.handed_back() == []
    finally:
        os.close(fd)
        hub.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
