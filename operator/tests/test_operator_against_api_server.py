"""The operator (kopf, as a real process) reconciles DeviceMigrations against
the real API server, with real node agents on loopback."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from devmig_testbed import objects
from devmig_testbed.pytest_plugin import OperatorProcess


@pytest.fixture
def operator(operator_process: OperatorProcess) -> OperatorProcess:
    return operator_process


@pytest.fixture
def agents() -> Iterator[dict[str, str]]:
    """Real node agents for node-a and node-b on loopback: name -> endpoint."""
    procs: list[subprocess.Popen[str]] = []
    out: dict[str, str] = {}
    for node in ("node-a", "node-b"):
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devmig_agent.main",
                "--listen",
                "127.0.0.1:0",
                "--node-name",
                node,
                # Devices listed, never driven: these agents run no sessions.
                "--vfio-discovery",
                "list",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        assert p.stdout is not None
        m = re.fullmatch(r"LISTENING (\S+)\n", p.stdout.readline())
        assert m, f"agent {node} did not start"
        out[node] = m.group(1)
    yield out
    for p in procs:
        p.terminate()
        p.wait(timeout=15)


def _cluster(kube: Any, agents: dict[str, str]) -> None:
    for node in ("node-a", "node-b"):
        objects.create_node(kube, node)
    objects.put_inventory(
        kube, "node-a", [objects.device("0000:01:00.0", vmi="")], agents.get("node-a", "")
    )
    objects.put_inventory(
        kube, "node-b", [objects.device("0000:02:00.0")], agents.get("node-b", "")
    )


def _cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def _leases(kube: Any, namespace: str) -> list[Any]:
    return client.CoordinationV1Api(kube).list_namespaced_lease(namespace).items


def test_a_missing_vmi_fails_the_migration_with_a_clear_reason(
    kube: Any, namespace: str, operator: OperatorProcess
) -> None:
    objects.create_dm(kube, namespace, "m", "no-such-vmi")
    dm = objects.wait_dm(
        kube, namespace, "m", lambda o: o.get("status", {}).get("phase") == "Failed"
    )
    f = _cond(dm, "Failed")
    assert (f["status"], f["reason"]) == ("True", "VMINotFound")
    assert "no-such-vmi" in f["message"]
    assert _cond(dm, "Succeeded")["status"] == "False"
    assert dm["status"]["observedGeneration"] == 1
    assert [t["phase"] for t in dm["status"]["phaseTransitions"]] == ["Validating", "Failed"]


def test_a_migration_claims_a_target_prepares_and_rolls_back_when_the_agent_refuses(
    kube: Any, namespace: str, operator: OperatorProcess, agents: dict[str, str]
) -> None:
    # The agents answer the handshake but cannot yet run sessions: the
    # operator must report that as the failure and release every claim.
    _cluster(kube, agents)
    objects.put_inventory(
        kube, "node-a", [objects.device("0000:01:00.0", vmi=f"{namespace}/vm")], agents["node-a"]
    )
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    objects.create_dm(kube, namespace, "m", "vm")
    dm = objects.wait_dm(
        kube, namespace, "m", lambda o: o.get("status", {}).get("phase") in ("Failed", "Succeeded")
    )
    st = dm["status"]
    assert [t["phase"] for t in st["phaseTransitions"]] == [
        "Validating",
        "PreparingTarget",
        "Failed",
    ]
    assert (st["sourceNode"], st["targetNode"]) == ("node-a", "node-b")
    ready = _cond(dm, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "TargetClaimed")
    assert st["devices"][0]["targetDevice"] == "0000:02:00.0"
    f = _cond(dm, "Failed")
    assert f["reason"] == "AgentError" and "UNIMPLEMENTED" in f["message"]
    assert st["rollback"]["reason"] == "AgentError"
    assert _leases(kube, namespace) == [], "rollback must release the device claim"
    assert 'devmig_migrations_total{result="Failed"} 1.0' in operator.metrics()

    # kopf posts Events asynchronously: the last can arrive just after the
    # status that ends the migration.
    def reasons() -> set[str]:
        events = client.CoreV1Api(kube).list_namespaced_event(namespace).items
        got = {e.reason for e in events if e.involved_object.name == "m"}
        assert {"PreparingTarget", "AgentError", "Failed"} <= got, got
        return got

    objects.eventually(reasons, what="the PreparingTarget, AgentError and Failed events")


def test_a_migration_waiting_for_a_target_can_be_cancelled(
    kube: Any, namespace: str, operator: OperatorProcess
) -> None:
    objects.create_node(kube, "node-a")
    objects.put_inventory(kube, "node-a", [objects.device("0000:01:00.0", vmi=f"{namespace}/vm2")])
    objects.create_vmi(kube, namespace, "vm2", "node-a", devices=["0000:01:00.0"])
    # No node can host it: a target node that does not exist.
    objects.create_dm(kube, namespace, "m", "vm2", targetNode="node-zz")
    dm = objects.wait_dm(
        kube,
        namespace,
        "m",
        lambda o: any(
            c["reason"] == "NoCompatibleTarget" for c in o.get("status", {}).get("conditions", [])
        ),
    )
    assert "node-zz: no device inventory" in _cond(dm, "Progressing")["message"]
    assert (_cond(dm, "Ready")["status"], _cond(dm, "Ready")["reason"]) == (
        "False",
        "NoCompatibleTarget",
    )
    client.CustomObjectsApi(kube).patch_namespaced_custom_object(
        "devmig.io", "v1alpha1", namespace, "devicemigrations", "m", {"spec": {"cancel": True}}
    )
    dm = objects.wait_dm(kube, namespace, "m", lambda o: o["status"].get("phase") == "Aborted")
    assert _cond(dm, "Failed")["reason"] == "Cancelled"
    assert dm["status"]["completionTime"]
