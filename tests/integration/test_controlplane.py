"""The test control plane is the real kube-apiserver + etcd, and behaves so.

These tests prove that what every operator and chart test stands on is
genuine: real binaries at the versions the Go modules pin, real RBAC, real
CRD schemas with CEL rules, real watches and the status subresource.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from devmig_testbed import controlplane, objects

GROUP, VERSION, PLURAL = "devmig.io", "v1alpha1", "devicemigrations"


def _gomod_version(module_dir: str, module: str) -> str:
    text = (controlplane.REPO_ROOT / "tests" / "controlplane" / module_dir / "go.mod").read_text()
    m = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", text, re.M)
    assert m, f"{module} not required in {module_dir}/go.mod"
    return m.group(1)


def dm(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DeviceMigration",
        "metadata": {"name": name},
        "spec": {"vmiName": "vm-1", **spec},
    }


def test_the_binaries_are_the_versions_the_go_modules_pin(
    control_plane: controlplane.ControlPlane,
) -> None:
    versions = control_plane.binaries.versions()
    for name, v in versions.items():
        print(f"{name}: {v}")
    assert (
        versions["kube-apiserver"]
        == f"Kubernetes {_gomod_version('apiserver', 'k8s.io/kubernetes')}"
    )
    assert _gomod_version("etcd", "go.etcd.io/etcd/server/v3").lstrip("v") in versions["etcd"]
    assert versions["helm"].startswith(_gomod_version("helm", "helm.sh/helm/v4"))
    assert _gomod_version("apiserver", "k8s.io/kubernetes") in versions["kubectl"]


def test_the_api_server_reports_its_stamped_version(kube: Any) -> None:
    info = client.VersionApi(kube).get_code()
    assert info.git_version == _gomod_version("apiserver", "k8s.io/kubernetes")
    assert info.major == "1"


def test_a_namespace_can_be_created_and_read_back(kube: Any, namespace: str) -> None:
    ns = client.CoreV1Api(kube).read_namespace(namespace)
    assert ns.metadata.name == namespace
    assert ns.status.phase == "Active"


def test_every_crd_in_the_crds_folder_is_established(kube: Any) -> None:
    files = sorted(p.name for p in controlplane.CRDS_DIR.glob("*.yaml"))
    assert files, "crds/ is empty"
    names = {
        c.metadata.name
        for c in client.ApiextensionsV1Api(kube).list_custom_resource_definition().items
    }
    for f in files:
        assert f.removesuffix(".yaml").split("_", 1)[1] + "." + f.split("_", 1)[0] in names


def test_a_device_migration_is_created_watched_and_patched_with_its_status(
    kube: Any, namespace: str
) -> None:
    co = client.CustomObjectsApi(kube)
    created = co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dm("m1"))
    # Defaults come from the CRD's schema.
    assert created["spec"]["policy"]["downtimeLimitMs"] == 300
    assert created["spec"]["policy"]["onNonConvergence"] == "Abort"
    assert created["spec"]["cancel"] is False

    seen: list[tuple[str, str | None]] = []
    ready = threading.Event()

    def watcher() -> None:
        w = watch.Watch()
        for ev in w.stream(
            co.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            resource_version=created["metadata"]["resourceVersion"],
            timeout_seconds=30,
        ):
            seen.append((ev["type"], ev["object"].get("status", {}).get("phase")))
            if ev["object"].get("status", {}).get("phase") == "Validating":
                w.stop()
        ready.set()

    t = threading.Thread(target=watcher, daemon=True)
    t.start()

    # A status write through the main resource is ignored...
    co.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "m1", {"status": {"phase": "Failed"}}
    )
    assert "status" not in co.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "m1")
    # ...and lands through the status subresource.
    co.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "m1",
        {"status": {"phase": "Validating", "observedGeneration": 1, "sourceNode": "node-a"}},
    )
    assert ready.wait(30), f"watch never saw the status change; saw {seen}"
    assert ("MODIFIED", "Validating") in seen
    got = co.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "m1")
    assert got["status"]["sourceNode"] == "node-a"
    # A status write does not change the generation; a spec write does.
    assert got["metadata"]["generation"] == 1


def test_a_service_account_is_forbidden_without_a_role_and_allowed_with_one(
    control_plane: controlplane.ControlPlane, kube: Any, namespace: str
) -> None:
    cfg = control_plane.service_account_kubeconfig(namespace, "reader")
    sa_api = control_plane.api_client(cfg)
    co = client.CustomObjectsApi(sa_api)
    with pytest.raises(ApiException) as e:
        co.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    assert e.value.status == 403
    assert f"system:serviceaccount:{namespace}:reader" in e.value.body

    rbac = client.RbacAuthorizationV1Api(kube)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "dm-reader"},
            "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "dm-reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "dm-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    # The RBAC authorizer learns of the new binding through a watch:
    # allowed within moments, not necessarily on the very next request.
    listed = objects.eventually(
        lambda: co.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL),
        what="listing with the new Role",
    )
    assert listed["items"] == []
    # The Role grants reading only.
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dm("nope"))
    assert e.value.status == 403
    sa_api.close()


def _rejected(call: Any) -> str:
    with pytest.raises(ApiException) as e:
        call()
    assert e.value.status == 422, e.value.body
    return str(e.value.body)


def test_cel_rules_reject_invalid_device_migrations_with_their_messages(
    kube: Any, namespace: str
) -> None:
    co = client.CustomObjectsApi(kube)

    def create(obj: dict[str, Any]) -> Any:
        return co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)

    body = _rejected(lambda: create(dm("zero", policy={"downtimeLimitMs": 0})))
    assert "policy.downtimeLimitMs must be a positive number of milliseconds" in body

    body = _rejected(
        lambda: create(
            dm("slow", policy={"preCopyTimeoutSeconds": 900, "completionTimeoutSeconds": 60})
        )
    )
    assert "must be shorter than policy.completionTimeoutSeconds" in body

    create(dm("c", cancel=True))
    body = _rejected(
        lambda: co.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "c", {"spec": {"cancel": False}}
        )
    )
    assert "spec.cancel can only change from false to true" in body


def test_the_spec_is_immutable_once_started_except_cancel(kube: Any, namespace: str) -> None:
    co = client.CustomObjectsApi(kube)
    co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dm("m"))
    # Still Pending: the spec may change.
    co.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "m", {"spec": {"targetNode": "b"}}
    )
    co.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "m", {"status": {"phase": "PreCopy"}}
    )
    body = _rejected(
        lambda: co.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "m", {"spec": {"targetNode": "c"}}
        )
    )
    assert "spec is immutable once the migration has started" in body
    got = co.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "m", {"spec": {"cancel": True}}
    )
    assert got["spec"]["cancel"] is True
    assert got["spec"]["targetNode"] == "b"


def test_a_node_inventory_must_be_named_after_its_node(kube: Any) -> None:
    co = client.CustomObjectsApi(kube)
    body = _rejected(
        lambda: co.create_cluster_custom_object(
            GROUP,
            VERSION,
            "nodedeviceinventories",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "NodeDeviceInventory",
                "metadata": {"name": "node-a"},
                "spec": {"nodeName": "node-b"},
            },
        )
    )
    assert "named after its node" in body
