"""Security posture of the rendered Pods: the agent is privileged only as
far as VFIO needs, and mounts exactly the documented host paths."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "devmig"
SCENARIOS = [None, *sorted((CHART / "ci").glob("*.yaml"))]
IDS = ["defaults", *[p.stem for p in SCENARIOS[1:]]]

# The host paths the agent is documented to mount (values.yaml, DaemonSet
# comments), and whether each is read-only inside the container.
AGENT_HOST_PATHS = {
    "/dev/vfio": False,  # VFIO group nodes and device cdevs: opened read-write
    "/sys": True,  # discovery only
    "/var/lib/kubelet/pod-resources": True,  # connect() to the socket needs no write
    "/var/run/kubevirt/plugins": False,  # the agent creates its hook socket here
    "/var/lib/devmig": False,  # session journal
    "/var/run/devmig": False,  # the agent creates the VMM contract socket here
}


def _pod(docs: list[dict[str, Any]], kind: str, suffix: str, find_one: Any) -> dict[str, Any]:
    return dict(find_one(docs, kind, suffix)["spec"]["template"]["spec"])


@pytest.mark.parametrize("values", SCENARIOS, ids=IDS)
def test_the_agent_drops_all_capabilities_and_has_a_read_only_root(
    helm: Any, find_one: Any, values: pathlib.Path | None
) -> None:
    pod = _pod(helm.template([values] if values else []), "DaemonSet", "-agent", find_one)
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"].get("add", [])) <= {"IPC_LOCK"}
    assert sc["readOnlyRootFilesystem"] is True
    # Privileged implies escalation; unprivileged forbids it.
    assert sc["allowPrivilegeEscalation"] is sc["privileged"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host_ns), host_ns


@pytest.mark.parametrize("values", SCENARIOS, ids=IDS)
def test_the_agent_mounts_only_the_documented_host_paths(
    helm: Any, find_one: Any, values: pathlib.Path | None
) -> None:
    pod = _pod(helm.template([values] if values else []), "DaemonSet", "-agent", find_one)
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert sorted(host.values()) == sorted(AGENT_HOST_PATHS)
    (c,) = pod["containers"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    for name, path in host.items():
        m = mounts[name]
        # Each host path appears at the same path in the container.
        assert m["mountPath"] == path
        assert bool(m.get("readOnly", False)) is AGENT_HOST_PATHS[path], path
        assert "mountPropagation" not in m or m["mountPropagation"] == "None"
    # Every other volume is the TLS Secret or scratch space.
    others = {v["name"]: v for v in pod["volumes"] if "hostPath" not in v}
    assert set(others) == {"tls", "tmp"}
    assert mounts["tls"]["mountPath"] == "/etc/devmig/tls" and mounts["tls"]["readOnly"]


def test_privileged_is_a_value_and_off_leaves_only_ipc_lock(helm: Any, find_one: Any) -> None:
    default = _pod(helm.template(), "DaemonSet", "-agent", find_one)
    assert default["containers"][0]["securityContext"]["privileged"] is True
    off = _pod(
        helm.template([CHART / "ci" / "unprivileged-agent-values.yaml"]),
        "DaemonSet",
        "-agent",
        find_one,
    )
    sc = off["containers"][0]["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}


def test_the_agent_runs_as_root_only_with_the_reason_written_down(helm: Any) -> None:
    text = (CHART / "templates" / "agent-daemonset.yaml").read_text()
    assert "runAsNonRoot: false" in text
    assert "root-owned 0600" in text  # the reason, next to the setting
    values = (CHART / "values.yaml").read_text()
    assert "IPC_LOCK: VFIO type1 and iommufd charge pinned DMA pages" in values
    assert "device cgroup" in values  # why privileged is needed for /dev/vfio


@pytest.mark.parametrize("values", SCENARIOS, ids=IDS)
def test_the_operator_and_test_pod_run_as_non_root_without_capabilities(
    helm: Any, find_one: Any, values: pathlib.Path | None
) -> None:
    docs = helm.template([values] if values else [])
    pods = [_pod(docs, "Deployment", "-operator", find_one)]
    pods += [dict(d["spec"]) for d in docs if d["kind"] == "Pod"]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not [v for v in pod["volumes"] if "hostPath" in v]
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert not sc.get("privileged")
