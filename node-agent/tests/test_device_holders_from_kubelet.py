"""The agent fills who holds each device from the kubelet's pod resources,
and the node hooks find a VMI's devices from there."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest
from kubelet_standin import StandInDevice, StandInKubelet, StandInPod

from devmig_agent import devices, hooks_sessions, main
from devmig_agent.hooks_kubevirt import HookVmi


@pytest.fixture
def kubelet() -> Iterator[StandInKubelet]:
    # Unix socket paths are limited to 108 bytes; tmp_path can exceed it.
    d = tempfile.mkdtemp(prefix="dm-kh-")
    k = StandInKubelet(f"{d}/kubelet.sock").start()
    yield k
    k.stop()
    shutil.rmtree(d, ignore_errors=True)


def test_the_kubelets_assignments_name_the_pod_and_vmi_of_each_device(
    kubelet: StandInKubelet,
) -> None:
    reg = devices.simulated("k", devices.SimSpec(count=2, size=1 << 20))
    kubelet.pods = [
        StandInPod(
            "vms",
            "virt-launcher-db-abcde",
            {"compute": [StandInDevice("devmig.io/sim", ["sim-k-1"])]},
        )
    ]
    stop = threading.Event()
    t = threading.Thread(target=main.refresh_holders, args=(reg, kubelet.socket_path, stop))
    with reg.changed:
        start = reg.generation
    t.start()
    try:
        with reg.changed:
            assert reg.changed.wait_for(lambda: reg.generation != start, 10)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    held = reg.get("sim-k-1").info
    assert (held.pod, held.vmi) == ("vms/virt-launcher-db-abcde", "vms/db")
    assert reg.get("sim-k-0").info.vmi == ""
    vmi = HookVmi("vms", "db", "uid", ("devmig.io/sim",), "k")
    assert hooks_sessions.registry_devices(reg)(vmi) == ["sim-k-1"]
