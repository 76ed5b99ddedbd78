"""The CRDs across a real `helm upgrade` and `helm uninstall`, on an API
server of their own (the shared one has the CRDs installed outside Helm):
an upgrade brings a new schema field with its default while the
DeviceMigrations already stored stay as they were, and an uninstall keeps
the CRDs and every object (helm.sh/resource-policy: keep)."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from devmig_testbed import controlplane

pytestmark = pytest.mark.controlplane

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "devmig"
DM_CRD = "devmig.io_devicemigrations.yaml"
NEW_FIELD = "agentTimeoutSeconds"  # added to spec.policy after the first release


@pytest.fixture
def own_api_server(
    control_plane_binaries: controlplane.Binaries, tmp_path: pathlib.Path
) -> Iterator[controlplane.ControlPlane]:
    cp = controlplane.ControlPlane(workdir=tmp_path / "cp", binaries=control_plane_binaries)
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()


def _older_chart(tmp: pathlib.Path) -> pathlib.Path:
    """This chart as the release before had it: the DeviceMigration CRD
    without the newest policy field."""
    old = tmp / "devmig-old"
    shutil.copytree(CHART, old)
    p = old / "files" / "crds" / DM_CRD
    crd = yaml.safe_load(p.read_text())
    for v in crd["spec"]["versions"]:
        policy = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["policy"]
        del policy["properties"][NEW_FIELD]
    p.write_text(yaml.safe_dump(crd, sort_keys=False))
    return old


def _dm(name: str, policy: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "devmig.io/v1alpha1",
        "kind": "DeviceMigration",
        "metadata": {"name": name},
        "spec": {"vmiName": "vm", "policy": policy},
    }


def test_an_upgrade_brings_new_crd_fields_and_an_uninstall_keeps_every_object(
    helm: Any, own_api_server: controlplane.ControlPlane, tmp_path: pathlib.Path
) -> None:
    cp = own_api_server
    kc = cp.admin_kubeconfig
    ns = "devmig-system"
    api = cp.api_client()
    co = client.CustomObjectsApi(api)
    ext = client.ApiextensionsV1Api(api)
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=ns))
    )
    common = ["--namespace", ns, "--set", "operator.replicas=0"]
    helm.run("install", "devmig", str(_older_chart(tmp_path)), *common, kubeconfig=kc)
    crd = ext.read_custom_resource_definition("devicemigrations.devmig.io")
    assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
    policy = crd.spec.versions[0].schema.open_apiv3_schema.properties["spec"].properties["policy"]
    assert NEW_FIELD not in policy.properties
    # Stored under the old schema: the field it does not know is pruned.
    co.create_namespaced_custom_object(
        "devmig.io", "v1alpha1", ns, "devicemigrations", _dm("before", {NEW_FIELD: 5})
    )
    before = co.get_namespaced_custom_object(
        "devmig.io", "v1alpha1", ns, "devicemigrations", "before"
    )
    assert NEW_FIELD not in before["spec"]["policy"]

    helm.run("upgrade", "devmig", str(CHART), *common, kubeconfig=kc)
    crd = ext.read_custom_resource_definition("devicemigrations.devmig.io")
    policy = crd.spec.versions[0].schema.open_apiv3_schema.properties["spec"].properties["policy"]
    assert policy.properties[NEW_FIELD].default == 60
    # The stored object is still there; reading it now applies the new
    # default (the API server defaults on read).
    again = co.get_namespaced_custom_object(
        "devmig.io", "v1alpha1", ns, "devicemigrations", "before"
    )
    assert again["spec"]["vmiName"] == "vm" and again["spec"]["policy"][NEW_FIELD] == 60
    co.create_namespaced_custom_object(
        "devmig.io", "v1alpha1", ns, "devicemigrations", _dm("after", {NEW_FIELD: 5})
    )
    after = co.get_namespaced_custom_object(
        "devmig.io", "v1alpha1", ns, "devicemigrations", "after"
    )
    assert after["spec"]["policy"][NEW_FIELD] == 5

    helm.run("uninstall", "devmig", "--namespace", ns, kubeconfig=kc)
    # The CRDs, and with them every DeviceMigration, outlive the release.
    names = {c.metadata.name for c in ext.list_custom_resource_definition().items}
    assert {"devicemigrations.devmig.io", "nodedeviceinventories.devmig.io"} <= names
    kept = co.list_namespaced_custom_object("devmig.io", "v1alpha1", ns, "devicemigrations")
    assert sorted(o["metadata"]["name"] for o in kept["items"]) == ["after", "before"]
