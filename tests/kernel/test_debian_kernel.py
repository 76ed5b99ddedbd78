"""The native core against Debian's own 6.12 kernel, driven by the static
devmig-native CLI alone: Debian's linux-image-<abi>-unsigned booted under
QEMU (TCG) with a busybox initramfs, its vfio, vfio_iommu_type1 and mdev
modules loaded, and mtty.ko built out of tree from linux-source-6.12
against the matching linux-headers (tests/kernel/debian/build.sh).

The guest's init (tests/kernel/debian/init) writes bytes into one mtty's
UART, checks that a request for ERROR is refused with the same exit code
and errno as on the simulated device, aborts a PRE_COPY back to RUNNING
with the UART's data kept, saves with --precopy, loads into the other mdev
and reads the same bytes back, and has a corrupted stream refused with the
target reset. It also binds QEMU's "edu" PCI device to vfio-pci behind an
emulated VT-d IOMMU (its probe must report no migration support) and
prints the sysfs entries the agent's discovery reads; the host rebuilds
that tree and runs the agent's walk on it (real names, links and layout).
Debian's kernel has no IOMMUFD: the cdev + iommufd paths run on our own
kernel (test_real_kernel.py).

Cold: about a minute (the 107 MB image download and mtty's build); warm:
a boot of a few seconds.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

HERE = pathlib.Path(__file__).resolve().parent
NATIVE = HERE.parents[1] / "agent-native"
QEMU = "qemu-system-x86_64"
pytestmark = pytest.mark.timeout(1800)

CHECKS = [
    "modules_loaded",
    "mdevs_created",
    "cli_probe_flags",
    "uart_write_source",
    "refused_error_same_as_sim",
    "abort_precopy_keeps_state",
    "save_precopy",
    "load_verified",
    "target_uart_bytes",
    "corrupt_stream_refused_target_reset",
    "vfio_pci_bound",
    "vfio_pci_probe_no_migration",
]
RESULT = re.compile(r"^(ok|not ok) ([a-z0-9_]+)(?:: (.*))?$")
# Taint flags an out-of-tree, unsigned module sets by itself (O = 4096,
# E = 8192); anything else (a WARN is 512, a die 128) fails the test.
EXPECTED_TAINT = 4096 | 8192
MISSING_PACKAGES = 3


def _unavailable(why: str) -> None:
    msg = f"Debian-kernel test cannot run: {why} (scripts/bootstrap.sh installs what it needs)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _build(*cmd: str) -> list[str]:
    r = subprocess.run(
        list(cmd), capture_output=True, text=True, env={**os.environ, "DEVMIG_NO_INSTALL": "1"}
    )
    if r.returncode == MISSING_PACKAGES:
        _unavailable(r.stderr.strip())
    assert r.returncode == 0, f"{cmd[0]} failed ({r.returncode}):\n{r.stderr[-6000:]}"
    return r.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def guest_output() -> str:
    if shutil.which(QEMU) is None:
        _unavailable(f"{QEMU} not found")
    (cli,) = _build(str(NATIVE / "cli" / "build-static.sh"))[-1:]
    kernel, modules = _build(str(HERE / "debian" / "build.sh"))[-2:]
    (initrd,) = _build(str(HERE / "debian" / "pack.sh"), cli, modules)[-1:]
    cmd = [
        QEMU,
        "-nographic",
        "-no-reboot",
        "-m",
        "512M",  # Debian's general kernel and its initramfs; 256M is tight
        "-accel",
        "tcg",
        "-nic",
        "none",
        # q35 with an emulated VT-d IOMMU, so vfio-pci can take QEMU's
        # "edu" PCI device (vfio needs an IOMMU group; Debian's kernel has
        # no unsafe no-IOMMU mode). Interrupt remapping on: without it
        # vfio_iommu_type1 refuses the container (EPERM).
        "-machine",
        "q35",
        "-device",
        "intel-iommu,intremap=on",
        "-device",
        "edu",
        "-kernel",
        kernel,
        "-initrd",
        initrd,
        "-append",
        "console=ttyS0 panic=-1 loglevel=4 intel_iommu=on",
    ]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    out = r.stdout.decode(errors="replace").replace("\r", "")
    assert r.returncode == 0, f"QEMU exited {r.returncode}:\n{r.stderr.decode()}\n{out[-6000:]}"
    return out


@pytest.mark.parametrize("name", CHECKS)
def test_debian_kernel_check(guest_output: str, name: str) -> None:
    results = {}
    for line in guest_output.splitlines():
        m = RESULT.match(line.strip())
        if m:
            results[m.group(2)] = (m.group(1), m.group(3) or "")
    assert name in results, f"the guest printed no result for {name}:\n{guest_output[-6000:]}"
    status, why = results[name]
    assert status == "ok", f"{name}: {why}\n{guest_output[-6000:]}"


def test_the_debian_guest_ended_cleanly_with_only_the_module_taints(guest_output: str) -> None:
    m = re.search(r"^devmig-result: exit=(\d+)", guest_output, re.M)
    t = re.search(r"^devmig-guest: tainted=(\d+)", guest_output, re.M)
    assert m and t, guest_output[-6000:]
    assert int(m.group(1)) == 0, guest_output[-6000:]
    assert int(t.group(1)) & ~EXPECTED_TAINT == 0, f"tainted={t.group(1)}\n{guest_output[-6000:]}"
    oops = [ln for ln in guest_output.splitlines() if re.search(r"WARNING:|BUG:|Oops", ln)]
    assert oops == [], "\n".join(oops)


SYSFS = re.compile(r"^devmig-sysfs: (link|file|dir|node) (\S+)(?: (.*))?$")


def rebuild_sysfs(guest_output: str, root: pathlib.Path) -> None:
    """The guest's /sys and /dev entries, recreated under ``root``: bus
    links and attribute links with the kernel's own (relative) targets,
    attribute files with their contents, directories and device nodes."""
    lines = [m for ln in guest_output.splitlines() if (m := SYSFS.match(ln.strip()))]
    assert lines, "the guest printed no sysfs lines"
    for m in lines:
        kind, path, rest = m.group(1), root / m.group(2).lstrip("/"), m.group(3) or ""
        if kind == "link":
            path.parent.mkdir(parents=True, exist_ok=True)
            if m.group(2).count("/") == 5:  # /sys/bus/<bus>/devices/<dev>: a device dir
                pathlib.Path(os.path.normpath(path.parent / rest)).mkdir(parents=True)
            path.symlink_to(rest)
        elif kind == "file":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rest + "\n")
        elif kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


def test_the_agents_sysfs_walk_reads_this_kernels_layout(
    guest_output: str, tmp_path: pathlib.Path
) -> None:
    from devmig_agent import discovery

    rebuild_sysfs(guest_output, tmp_path)
    found = {f.id: f for f in discovery.walk(str(tmp_path / "sys"), str(tmp_path / "dev"))}
    mdevs = {k: f for k, f in found.items() if f.bus == "mdev"}
    pci = {k: f for k, f in found.items() if f.bus == "pci"}
    # The two mtty mdevs, under their parent, with their type and group.
    assert set(mdevs) == {
        "83b8f4f2-509f-382f-3c1e-e6bfe0fa2001",
        "83b8f4f2-509f-382f-3c1e-e6bfe0fa2002",
    }
    for f in mdevs.values():
        assert (f.driver, f.mdev_type, f.parent) == ("mtty", "mtty-2", "mtty")
        assert f.iommu_group >= 0 and f.group_path.endswith(f"/vfio/{f.iommu_group}")
    # QEMU's edu device on vfio-pci, and no other PCI function (the
    # emulated chipset's devices keep their own drivers or none).
    (edu,) = pci.values()
    assert (edu.driver, edu.vendor_id, edu.device_id) == ("vfio-pci", 0x1234, 0x11E8)
    assert edu.class_code >> 8 == 0x00FF and edu.group_path.endswith(f"/vfio/{edu.iommu_group}")
