"""The native core against a real kernel: the mtty sample driver's VFIO
migration, in a QEMU guest (TCG) booting our own small kernel.

Builds (or reuses, from ~/.cache/devmig) the kernel (build-kernel.sh), the
static guest program (guest/build.sh, the core's C sources) and a busybox
initramfs (initramfs/build.sh), boots the guest once for the whole module
and checks each line the guest program printed ("ok NAME", "not ok NAME:
why", "skip NAME: why"). Without QEMU or the kernel's packages the tests
skip, saying what to install; under CI=true they fail instead.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import pytest

HERE = pathlib.Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 300
# Cold: unpacking the kernel source and building it (a few minutes on 2 cores).
pytestmark = pytest.mark.timeout(3600)

# Every check the guest program runs, in its order. A check missing from
# the guest's output fails (the guest stopped early or the lists drifted).
CHECKS = [
    "open_source_group_type1",
    "open_target_group_type1",
    "open_cdev_iommufd",
    "migration_flags",
    "initial_state_running",
    "uart_write_source",
    "refused_error_same_errno",
    "precopy_temporary_end",
    "abort_precopy_to_running",
    "source_to_precopy",
    "precopy_info_initial",
    "mig_data_size",
    "save_precopy_stopcopy",
    "stopcopy_to_precopy_refused",
    "stopcopy_to_precopy_p2p_refused",
    "kernel_and_sim_refuse_stopcopy_to_precopy",
    "source_stopcopy_to_stop",
    "target_to_resuming",
    "load_resuming_to_stop",
    "target_to_running",
    "target_uart0_bytes",
    "target_uart1_bytes",
    "corrupt_stream_refused_target_reset",
    "truncated_stream_refused_target_reset",
    "driver_rejected_write_target_reset",
    "kernel_loads_after_rejected_write",
    "core_refuses_stop_after_rejected_write",
    "source_resumes_with_its_bytes",
    "type1_dirty_off_refused",
    "type1_dirty_pinned_scope_reports_nothing",
    "type1_dirty_read_must_cover_whole_mappings",
    "type1_dirty_stop",
    "irq_info_intx",
    "irq_intx_eventfd_fires",
    "open_cdev_target",
    "cdev_second_bind_einval",
    "group_and_cdev_exclusive_ebusy",
    "cdev_migration_uart_bytes",
    "fd_handoff_both_drive",
    "device_lives_while_a_duplicate_is_open",
    "data_fd_enodev_after_last_close",
    "iommufd_dirty_hwpt_on_mock_domain",
    "iommufd_dirty_off_kernel_says_clean_core_refuses",
    "iommufd_dirty_start_and_mark",
    "iommufd_dirty_bitmap_no_clear_then_clear",
    "iommufd_dirty_kernel_only_sets_bits_core_zeroes",
    "iommufd_dirty_unmapped_range_reads_clean",
    "iommufd_dirty_stopped_kernel_says_clean_core_refuses",
    "mdev_cannot_attach_dirty_hwpt",
]

RESULT = re.compile(r"^(ok|not ok|skip) ([A-Za-z0-9_]+)(?:: (.*))?$")
MISSING_PACKAGES = 3  # the build scripts' exit code for "install these first"
INSTALL_HINT = (
    "apt-get install qemu-system-x86 busybox-static linux-source-6.12 "
    "bc bison flex libelf-dev libssl-dev cpio xz-utils (scripts/bootstrap.sh does)"
)


def _unavailable(why: str) -> None:
    msg = f"real-kernel test cannot run: {why}; install: {INSTALL_HINT}"
    if os.environ.get("CI") == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@dataclass
class GuestRun:
    output: str
    exit_code: int | None
    tainted: int | None
    seconds: dict[str, float]
    results: dict[str, tuple[str, str]] = field(default_factory=dict)


def _build(script: pathlib.Path, *args: str) -> tuple[str, float]:
    """Run a build script; returns the path it prints and its duration."""
    t0 = time.monotonic()
    r = subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DEVMIG_NO_INSTALL": "1"},
    )
    if r.returncode == MISSING_PACKAGES:
        _unavailable(r.stderr.strip())
    assert r.returncode == 0, f"{script.name} failed ({r.returncode}):\n{r.stderr[-6000:]}"
    return r.stdout.strip().splitlines()[-1], time.monotonic() - t0


@pytest.fixture(scope="module")
def guest() -> GuestRun:
    if shutil.which(QEMU) is None:
        _unavailable(f"{QEMU} not found")
    seconds: dict[str, float] = {}
    kernel, seconds["kernel"] = _build(HERE / "build-kernel.sh")
    prog, seconds["guest_program"] = _build(HERE / "guest" / "build.sh")
    initrd, seconds["initramfs"] = _build(HERE / "initramfs" / "build.sh", prog)
    cmd = [
        QEMU,
        "-nographic",
        "-no-reboot",
        "-m",
        "256M",
        "-accel",
        "tcg",
        "-nic",
        "none",
        "-kernel",
        kernel,
        "-initrd",
        initrd,
        "-append",
        "console=ttyS0 panic=-1 loglevel=5",
    ]
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=BOOT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        pytest.fail(f"guest did not end within {BOOT_TIMEOUT_S} s:\n{out[-8000:]}", pytrace=False)
    seconds["boot_and_run"] = time.monotonic() - t0
    output = r.stdout.decode(errors="replace").replace("\r", "")
    assert r.returncode == 0, f"QEMU exited {r.returncode}:\n{r.stderr.decode()}\n{output[-8000:]}"
    run = GuestRun(output=output, exit_code=None, tainted=None, seconds=seconds)
    for line in output.splitlines():
        m = RESULT.match(line.strip())
        if m:
            run.results[m.group(2)] = (m.group(1), m.group(3) or "")
        elif line.startswith("devmig-result: exit="):
            run.exit_code = int(line.split("=", 1)[1])
        elif line.startswith("devmig-guest: tainted="):
            run.tainted = int(line.split("=", 1)[1])
    print(f"real-kernel timings (s): {seconds}")
    return run


@pytest.mark.parametrize("name", CHECKS)
def test_real_kernel_check(guest: GuestRun, name: str) -> None:
    if name not in guest.results:
        pytest.fail(
            f"the guest printed no result for {name} (exit={guest.exit_code}):\n"
            f"{guest.output[-8000:]}",
            pytrace=False,
        )
    status, why = guest.results[name]
    if status == "skip":
        pytest.skip(f"{name}: {why}")
    assert status == "ok", f"{name}: {why}\nguest output:\n{guest.output[-8000:]}"


def test_guest_ran_every_check_and_exited_cleanly(guest: GuestRun) -> None:
    unknown = sorted(set(guest.results) - set(CHECKS))
    assert unknown == [], f"checks the test does not know: {unknown}"
    failed = [n for n, (s, _) in guest.results.items() if s == "not ok"]
    want = 1 if failed else 0
    assert guest.exit_code == want, f"guest exit {guest.exit_code}:\n{guest.output[-8000:]}"
    # The kernel must not have warned or oopsed while the driver was driven.
    assert guest.tainted == 0, f"kernel tainted={guest.tainted}:\n{guest.output[-8000:]}"
    oops = re.compile(r"WARNING:|BUG:|Oops|Call Trace")
    bad = [ln for ln in guest.output.splitlines() if oops.search(ln)]
    assert bad == [], "kernel warnings:\n" + "\n".join(bad) + f"\n{guest.output[-8000:]}"
