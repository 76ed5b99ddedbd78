"""``kubectl devmig`` against the real API server: what it creates, shows,
cancels, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

from kubernetes import client

from devmig_operator.kubectl_plugin import human_bytes, progress_line
from devmig_testbed import objects
from devmig_testbed.controlplane import ControlPlane

G, V, P = "devmig.io", "v1alpha1", "devicemigrations"


def run(cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devmig_operator.kubectl_plugin", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": str(cp.admin_kubeconfig)},
    )


def test_the_progress_line_shows_phase_bytes_rate_and_eta() -> None:
    obj = {
        "status": {
            "phase": "PreCopy",
            "devices": [
                {
                    "bytesSent": 3 << 30,
                    "remainingBytes": 1 << 30,
                    "throughputBytesPerSecond": 1 << 29,
                }
            ],
        }
    }
    line = progress_line(obj, width=10)
    assert line.startswith("PreCopy")
    assert "[#######---]  75.0%" in line
    assert "3.0 GiB sent" in line and "512.0 MiB/s" in line and "ETA 2.0s" in line
    done = {"status": {"phase": "Succeeded", "downtimeMs": 42, "devices": []}}
    assert "downtime 42 ms" in progress_line(done)
    assert human_bytes(1023) == "1023 B"


def test_migrating_an_unknown_vmi_exits_3_and_creates_nothing(
    control_plane: ControlPlane, kube: Any, namespace: str
) -> None:
    r = run(control_plane, "-n", namespace, "migrate", "ghost")
    assert r.returncode == 3
    assert "virtualmachineinstance 'ghost' not found" in r.stderr
    assert (
        client.CustomObjectsApi(kube).list_namespaced_custom_object(G, V, namespace, P)["items"]
        == []
    )


def test_migrate_creates_a_device_migration_for_the_vmi_and_node(
    control_plane: ControlPlane, kube: Any, namespace: str
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a")
    r = run(control_plane, "-n", namespace, "migrate", "vm", "--to", "node-b")
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    dm = client.CustomObjectsApi(kube).get_namespaced_custom_object(G, V, namespace, P, name)
    assert dm["spec"]["vmiName"] == "vm" and dm["spec"]["targetNode"] == "node-b"
    assert name.startswith("vm-")


def test_migrate_wait_follows_to_success_and_prints_the_downtime(
    control_plane: ControlPlane, kube: Any, namespace: str
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a")
    co = client.CustomObjectsApi(kube)

    def operator_stand_in() -> None:
        # Plays the operator's part: moves the migration the way it would.
        w = objects.wait_any_dm(kube, namespace)
        name = w["metadata"]["name"]
        for phase, sent, left in (("PreCopy", 1 << 20, 3 << 20), ("StopAndCopy", 3 << 20, 1 << 20)):
            co.patch_namespaced_custom_object_status(
                G,
                V,
                namespace,
                P,
                name,
                {
                    "status": {
                        "phase": phase,
                        "devices": [{"name": "d", "bytesSent": sent, "remainingBytes": left}],
                    }
                },
            )
        co.patch_namespaced_custom_object_status(
            G,
            V,
            namespace,
            P,
            name,
            {
                "status": {
                    "phase": "Succeeded",
                    "targetNode": "node-b",
                    "downtimeMs": 87,
                    "devices": [{"name": "d", "bytesSent": 4 << 20, "remainingBytes": 0}],
                }
            },
        )

    t = threading.Thread(target=operator_stand_in, daemon=True)
    t.start()
    r = run(control_plane, "-n", namespace, "migrate", "vm", "--wait", "--timeout", "60s")
    t.join(30)
    assert r.returncode == 0, r.stderr
    assert "Succeeded on node-b, 4.0 MiB of device state, downtime 87 ms" in r.stdout
    assert "StopAndCopy" in r.stderr  # progress lines went to stderr


def test_status_lists_migrations_and_json_is_machine_readable(
    control_plane: ControlPlane, kube: Any, namespace: str
) -> None:
    objects.create_dm(kube, namespace, "m1", "vm")
    client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        G,
        V,
        namespace,
        P,
        "m1",
        {
            "status": {
                "phase": "Failed",
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "VMINotFound",
                        "message": "gone",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ],
            }
        },
    )
    r = run(control_plane, "-n", namespace, "status")
    assert r.returncode == 0
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "VMI", "PHASE"]
    assert row.split()[:3] == ["m1", "vm", "Failed"] and "VMINotFound: gone" in row
    j = json.loads(run(control_plane, "-n", namespace, "status", "m1", "-o", "json").stdout)
    assert j["status"]["phase"] == "Failed"
    assert run(control_plane, "-n", namespace, "status", "nope").returncode == 3


def test_cancel_sets_the_flag_and_refuses_an_ended_migration(
    control_plane: ControlPlane, kube: Any, namespace: str
) -> None:
    objects.create_dm(kube, namespace, "m", "vm")
    r = run(control_plane, "-n", namespace, "cancel", "m")
    assert r.returncode == 0, r.stderr
    co = client.CustomObjectsApi(kube)
    assert co.get_namespaced_custom_object(G, V, namespace, P, "m")["spec"]["cancel"] is True
    co.patch_namespaced_custom_object_status(
        G, V, namespace, P, "m", {"status": {"phase": "Aborted"}}
    )
    r = run(control_plane, "-n", namespace, "cancel", "m")
    assert r.returncode == 1 and "already ended (Aborted)" in r.stderr


def test_devices_shows_each_device_and_why_it_cannot_migrate(
    control_plane: ControlPlane, kube: Any
) -> None:
    objects.put_inventory(
        kube,
        "node-dev",
        [
            objects.device("0000:05:00.0"),
            objects.device("0000:05:00.1", migratable=False, notMigratableReason="no STOP_COPY"),
        ],
    )
    r = run(control_plane, "devices", "--node", "node-dev")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("0000:05:00.0" in line and " yes " in f"{line} " for line in lines)
    assert any("0000:05:00.1" in line and "no: no STOP_COPY" in line for line in lines)
    assert run(control_plane, "devices", "--node", "no-such-node").returncode == 3


def test_bad_usage_exits_2() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "devmig_operator.kubectl_plugin", "migrate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
