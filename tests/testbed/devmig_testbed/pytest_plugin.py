"""pytest fixtures for the real control plane.

- ``control_plane`` (session): etcd + kube-apiserver on loopback, CRDs from
  ``crds/`` and the KubeVirt test stand-in CRDs (``tests/kubevirt/crds``)
  installed; torn down at the end of the run.
- ``kube``: an admin ``kubernetes.client.ApiClient``.
- ``namespace``: a fresh namespace for one test.

If the binaries are missing they are built (minutes when cold). Where Go is
missing the tests skip loudly, except under CI=true, where they fail:
nothing that needs the control plane may be skipped in CI.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devmig_testbed import controlplane, processes


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"control plane unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"control plane unavailable: {reason}")


@pytest.fixture(scope="session")
def control_plane_binaries() -> controlplane.Binaries:
    if shutil.which("go") is None:
        try:
            return controlplane.locate_binaries(build=False)
        except controlplane.ControlPlaneError:
            _unavailable("Go 1.26 is not installed; run `make bootstrap` (or install golang 1.26)")
    return controlplane.locate_binaries(build=True)


@pytest.fixture(scope="session")
def control_plane(
    control_plane_binaries: controlplane.Binaries,
) -> Iterator[controlplane.ControlPlane]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="devmig-cp-"))
    cp = controlplane.ControlPlane(workdir=workdir, binaries=control_plane_binaries)
    try:
        cp.start()
        cp.install_crds()
        cp.install_crds(controlplane.KUBEVIRT_CRDS_DIR)
        yield cp
    finally:
        cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def kube(control_plane: controlplane.ControlPlane) -> Iterator[Any]:
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(kube: Any) -> Iterator[str]:
    """A namespace of its own for one test. Without a controller-manager a
    deleted namespace stays Terminating, so names are unique per test."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@dataclasses.dataclass
class OperatorProcess:
    proc: processes.Drained
    metrics_url: str

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return str(r.read().decode())


@pytest.fixture
def operator_process(
    control_plane: controlplane.ControlPlane, namespace: str
) -> Iterator[OperatorProcess]:
    """The devmig operator as a real process against the control plane, with
    its Leases and session key in ``namespace`` and metrics on a free port.
    Its log is printed when the test ends (pytest shows it on failure)."""
    port = controlplane.free_port()
    # Scoped to the test's namespace: objects other tests left behind
    # (namespaces never finish deleting without a controller-manager) must
    # not be reconciled here.
    proc = processes.start_operator(control_plane.admin_kubeconfig, namespace, port, namespace)
    try:
        yield OperatorProcess(proc, f"http://127.0.0.1:{port}/metrics")
    finally:
        proc.stop()
        print(proc.log()[-5000:])
