"""A whole migration, every part real but the device: the operator (kopf
process) against the real kube-apiserver, two node agents (processes) with
simulated devices publishing their inventories, device state streamed agent
to agent by the native pump. The device ends RUNNING on the target alone."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch

from devmig_testbed import objects
from devmig_testbed.controlplane import ControlPlane
from devmig_testbed.pytest_plugin import OperatorProcess


def _agent(
    cp: ControlPlane, node: str, state: pathlib.Path, *extra: str
) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devmig_agent.main",
            "--listen",
            "127.0.0.1:0",
            "--node-name",
            node,
            "--sim",
            "count=1,size=8MiB,dirty=16",
            "--state-dir",
            str(state / node),
            "--publish-inventory",
            *extra,
        ],
        env={**os.environ, "KUBECONFIG": str(cp.admin_kubeconfig)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    while line and not line.startswith("LISTENING"):
        line = p.stdout.readline()
    m = re.fullmatch(r"LISTENING (127\.0\.0\.1:\d+)\n", line)
    assert m, f"agent {node} did not start"
    return p, m.group(1)


@pytest.fixture
def two_nodes(
    control_plane: ControlPlane, kube: Any, namespace: str, tmp_path: pathlib.Path
) -> Iterator[None]:
    for n in ("node-a", "node-b"):
        objects.create_node(kube, n)
    started = [
        _agent(control_plane, "node-a", tmp_path, "--sim-holder", f"0={namespace}/vm"),
        _agent(control_plane, "node-b", tmp_path),
    ]
    procs = [p for p, _ in started]
    # Both inventories published by these agents (inventories of the same
    # node names left by other tests name dead endpoints).
    want = {"node-a": started[0][1], "node-b": started[1][1]}
    co = client.CustomObjectsApi(kube)
    w = watch.Watch()
    for ev in w.stream(
        co.list_cluster_custom_object,
        "devmig.io",
        "v1alpha1",
        "nodedeviceinventories",
        timeout_seconds=60,
    ):
        o = ev["object"]
        node = o["spec"]["nodeName"]
        if want.get(node) and (o.get("status") or {}).get("agentEndpoint") == want[node]:
            del want[node]
        if not want:
            w.stop()
    assert not want, f"no inventory from {want}"
    yield
    for p in procs:
        p.terminate()
        out, _ = p.communicate(timeout=20)
        print(out[-3000:])


def test_a_device_migration_runs_to_success_with_real_agents(
    kube: Any, namespace: str, two_nodes: None, operator_process: OperatorProcess
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    objects.create_dm(kube, namespace, "move", "vm", policy={"downtimeLimitMs": 2000})
    dm = objects.wait_dm(
        kube,
        namespace,
        "move",
        lambda o: o.get("status", {}).get("phase") in ("Succeeded", "Failed", "Aborted"),
        timeout_s=120,
    )
    st = dm["status"]
    assert st["phase"] == "Succeeded", st
    assert [t["phase"] for t in st["phaseTransitions"]] == [
        "Validating",
        "PreparingTarget",
        "PreCopy",
        "StopAndCopy",
        "Resuming",
        "Succeeded",
    ]
    assert (st["sourceNode"], st["targetNode"]) == ("node-a", "node-b")
    assert st["committed"] is True
    d = st["devices"][0]
    assert (d["sourceDevice"], d["targetDevice"]) == ("sim-node-a-0", "sim-node-b-0")
    assert d["bytesSent"] >= 8 << 20  # at least the whole initial state
    assert (d["sourceState"], d["targetState"]) == ("STOP", "RUNNING")
    assert 0 <= st["downtimeMs"] < 60_000
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["Succeeded"]["status"] == "True" and cond["Failed"]["status"] == "False"
    assert client.CoordinationV1Api(kube).list_namespaced_lease(namespace).items == []
    assert 'devmig_migrations_total{result="Succeeded"} 1.0' in operator_process.metrics()
