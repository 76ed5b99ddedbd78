"""What users see through the real kubectl (built from k8s.io/kubernetes at
the apiserver's version): printer columns, short names and categories,
``kubectl wait`` on devmig's conditions, and the ``kubectl devmig`` plugin."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any

from devmig_testbed import objects
from devmig_testbed.controlplane import ControlPlane
from devmig_testbed.pytest_plugin import OperatorProcess


def kubectl(cp: ControlPlane, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KUBECONFIG": str(cp.admin_kubeconfig),
        # kubectl finds plugins (kubectl-devmig) on PATH.
        "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    return subprocess.run(
        [str(cp.binaries.kubectl), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_kubectl_get_shows_devmigs_columns_by_short_name_and_category(
    control_plane: ControlPlane, kube: Any, namespace: str
) -> None:
    objects.create_dm(kube, namespace, "m", "vm-1")
    r = kubectl(control_plane, "get", "dmig", "-n", namespace)
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "VMI", "SOURCE", "TARGET", "PROGRESS", "DOWNTIME", "AGE"]
    assert r.stdout.splitlines()[1].split()[:2] == ["m", "vm-1"]
    r = kubectl(control_plane, "get", "devmig", "-n", namespace, "-o", "name")
    assert "devicemigration.devmig.io/m" in r.stdout


def test_kubectl_wait_sees_the_failed_condition(
    control_plane: ControlPlane, kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    objects.create_dm(kube, namespace, "m", "no-such-vmi")
    r = kubectl(
        control_plane, "wait", "--for=condition=Failed", "dm/m", "-n", namespace, "--timeout=60s"
    )
    assert r.returncode == 0, r.stderr
    assert "condition met" in r.stdout


def test_kubectl_finds_the_devmig_plugin(
    control_plane: ControlPlane, kube: Any, namespace: str
) -> None:
    objects.create_dm(kube, namespace, "m", "vm-9")
    r = kubectl(control_plane, "devmig", "-n", namespace, "status")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].split()[:2] == ["m", "vm-9"]
