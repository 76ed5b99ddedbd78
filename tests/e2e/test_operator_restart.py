"""The operator can die at any step and its successor finishes the job:
each phase is written to status before the next begins, and every agent
call is idempotent."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from devmig_testbed import controlplane, objects, processes
from devmig_testbed.controlplane import ControlPlane


@pytest.fixture
def nodes(
    control_plane: ControlPlane, kube: Any, namespace: str, tmp_path: pathlib.Path
) -> Iterator[None]:
    # 32 MiB of device state and a dirtying workload, sent at a capped
    # 8 MiB/s (below): pre-copy lasts seconds, long enough to kill the
    # operator in the middle of it.
    with processes.two_nodes(
        kube,
        control_plane.admin_kubeconfig,
        tmp_path,
        "count=1,size=32MiB,dirty=64",
        {0: f"{namespace}/vm"},
    ):
        yield


@pytest.mark.parametrize("phase", ["PreCopy", "StopAndCopy"])
def test_a_migration_survives_the_operator_dying_in_a_phase(
    control_plane: ControlPlane, kube: Any, namespace: str, nodes: None, phase: str
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    objects.create_dm(
        kube, namespace, "m", "vm", policy={"bandwidthMiBps": 8, "downtimeLimitMs": 5000}
    )
    cfg = control_plane.admin_kubeconfig
    first = processes.start_operator(cfg, namespace, controlplane.free_port(), namespace)
    # Killed as soon as the status records the phase: the successor finds
    # the migration there (or one step on, if the first got further in the
    # few milliseconds before the kill) and must finish it.
    objects.wait_dm(kube, namespace, "m", lambda o: o.get("status", {}).get("phase") == phase)
    first.p.kill()  # no goodbye: as if its node died
    first.p.wait(timeout=20)
    second = processes.start_operator(cfg, namespace, controlplane.free_port(), namespace)
    try:
        dm = objects.wait_dm_final(kube, namespace, "m")
    finally:
        second.stop()
        print(second.log()[-4000:])
    st = dm["status"]
    assert st["phase"] == "Succeeded", st
    # One pass through each phase: the successor resumed, it did not restart.
    assert [t["phase"] for t in st["phaseTransitions"]] == [
        "Validating", "PreparingTarget", "PreCopy", "StopAndCopy", "Resuming", "Succeeded",
    ]  # fmt: skip
    assert st["devices"][0]["bytesSent"] >= 32 << 20


def test_a_migration_past_its_completion_timeout_rolls_back(
    kube: Any, namespace: str, operator_process: Any
) -> None:
    objects.create_node(kube, "node-a")
    objects.put_inventory(kube, "node-a", [objects.device("dev-1", vmi=f"{namespace}/vm")])
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["dev-1"])
    # No node can host it: it waits in Validating for a target.
    objects.create_dm(kube, namespace, "m", "vm", targetNode="node-nowhere")
    objects.wait_dm(
        kube,
        namespace,
        "m",
        lambda o: any(
            c.get("reason") == "NoCompatibleTarget"
            for c in o.get("status", {}).get("conditions", [])
        ),
    )
    # Its start, as recorded, lies beyond completionTimeoutSeconds (900 s).
    from kubernetes import client

    client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        "devmig.io", "v1alpha1", namespace, "devicemigrations", "m",
        {"status": {"startTime": "2020-01-01T00:00:00Z"}},
    )  # fmt: skip
    dm = objects.wait_dm(
        kube, namespace, "m", lambda o: o.get("status", {}).get("phase") == "Failed", timeout_s=60
    )
    failed = next(c for c in dm["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "CompletionTimeout"
    assert "completionTimeoutSeconds=900" in failed["message"]
