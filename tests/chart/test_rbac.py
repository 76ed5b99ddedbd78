"""The chart's RBAC, applied to the real API server and exercised with the
ServiceAccounts' own tokens: each can do what its rules' comments say, and
nothing more."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devmig_testbed import objects

GROUP, VERSION = "devmig.io", "v1alpha1"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")

pytestmark = pytest.mark.controlplane


def _status(fn: Any, *a: Any, **kw: Any) -> int:
    """The HTTP status of one real request (2xx collapsed to 200)."""
    try:
        fn(*a, **kw)
    except ApiException as e:
        return int(e.status)
    return 200


class Installed:
    def __init__(self, docs: list[dict[str, Any]], namespace: str, apis: dict[str, Any]) -> None:
        self.docs = docs
        self.namespace = namespace
        self.apis = apis  # "operator" / "agent" -> ApiClient authenticated as that SA

    def rules(self, component: str) -> list[tuple[str, dict[str, Any]]]:
        """(scope, rule): scope is "cluster" or the Role's namespace."""
        out = []
        for d in self.docs:
            if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"].endswith(
                f"-{component}"
            ):
                scope = "cluster" if d["kind"] == "ClusterRole" else d["metadata"]["namespace"]
                out += [(scope, r) for r in d["rules"]]
        return out


@contextlib.contextmanager
def install_rbac(
    helm: Any,
    control_plane: Any,
    kube: Any,
    namespace: str,
    release: str,
    set_values: tuple[str, ...] = (),
) -> Iterator[Installed]:
    """Create the rendered ServiceAccounts, Secrets and RBAC for real, and
    API clients authenticated as the two ServiceAccounts."""
    docs = helm.template(release=release, namespace=namespace, set_values=set_values)
    core = client.CoreV1Api(kube)
    rbac = client.RbacAuthorizationV1Api(kube)
    made: list[tuple[Any, str]] = []
    for d in docs:
        k, ns = d["kind"], d["metadata"].get("namespace", namespace)
        if k == "ServiceAccount":
            core.create_namespaced_service_account(ns, d)
        elif k == "Secret":
            core.create_namespaced_secret(ns, d)
        elif k == "ClusterRole":
            rbac.create_cluster_role(d)
            made.append((rbac.delete_cluster_role, d["metadata"]["name"]))
        elif k == "ClusterRoleBinding":
            rbac.create_cluster_role_binding(d)
            made.append((rbac.delete_cluster_role_binding, d["metadata"]["name"]))
        elif k == "Role":
            rbac.create_namespaced_role(ns, d)
        elif k == "RoleBinding":
            rbac.create_namespaced_role_binding(ns, d)
    sas = {
        c: next(
            d["metadata"]["name"]
            for d in docs
            if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith(f"-{c}")
        )
        for c in ("operator", "agent")
    }
    apis = {
        c: control_plane.api_client(control_plane.service_account_kubeconfig(namespace, sa))
        for c, sa in sas.items()
    }
    served = [
        d["metadata"]["namespace"]
        for d in docs
        if d["kind"] == "RoleBinding" and d["metadata"]["name"].endswith("-operator-watch")
    ]

    # The RBAC authorizer learns of new bindings through a watch: wait until
    # the last-created binding of each ServiceAccount is in effect.
    def bound() -> None:
        assert _allowed(apis["operator"], "coordination.k8s.io", "leases", "create", namespace)
        for ns in served or [""]:
            assert _allowed(apis["operator"], GROUP, "devicemigrations", "list", ns)
        assert _allowed(apis["agent"], GROUP, "nodedeviceinventories", "create", "")

    objects.eventually(bound, what="the chart's RBAC reaching the authorizer")
    try:
        yield Installed(docs, namespace, apis)
    finally:
        for a in apis.values():
            a.close()
        for delete, name in made:
            delete(name)


@pytest.fixture
def installed(
    helm: Any, control_plane: Any, kube: Any, namespace: str, release: str
) -> Iterator[Installed]:
    with install_rbac(helm, control_plane, kube, namespace, release) as inst:
        yield inst


def _allowed(api: Any, group: str, resource: str, verb: str, ns: str, name: str = "") -> bool:
    sub = None
    if "/" in resource:
        resource, sub = resource.split("/", 1)
    review = client.V1SelfSubjectAccessReview(
        spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                group=group,
                resource=resource,
                subresource=sub,
                verb=verb,
                namespace=ns or None,
                name=name or None,
            )
        )
    )
    r = client.AuthorizationV1Api(api).create_self_subject_access_review(review)
    return bool(r.status.allowed)


def granted(installed: Installed, component: str) -> list[dict[str, str]]:
    rows = []
    for scope, rule in installed.rules(component):
        for g in rule["apiGroups"]:
            for res in rule["resources"]:
                for v in rule["verbs"]:
                    for n in rule.get("resourceNames", [""]):
                        rows.append(
                            {
                                "component": component,
                                "scope": scope,
                                "apiGroup": g,
                                "resource": res,
                                "verb": v,
                                "resourceName": n,
                            }
                        )
    return rows


def test_every_granted_permission_is_listed_and_holds_for_the_service_account(
    installed: Installed,
) -> None:
    """The permissions as data (one JSON object a line, prefixed RBAC-GRANT),
    for comparing with what the code calls; each one is confirmed by the
    API server's authorizer for the ServiceAccount itself."""
    for component in ("operator", "agent"):
        rows = granted(installed, component)
        assert rows
        for row in rows:
            print("RBAC-GRANT " + json.dumps(row, sort_keys=True))
            ns = "" if row["scope"] == "cluster" else row["scope"]
            api = installed.apis[component]
            assert _allowed(
                api, row["apiGroup"], row["resource"], row["verb"], ns, row["resourceName"]
            ), row
            if ns:
                # A Role's permission stops at its namespace.
                assert not _allowed(
                    api,
                    row["apiGroup"],
                    row["resource"],
                    row["verb"],
                    "kube-system",
                    row["resourceName"],
                ), row


def test_no_rule_uses_wildcards_or_escalating_verbs(installed: Installed) -> None:
    for component in ("operator", "agent"):
        for _, rule in installed.rules(component):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def test_every_rule_carries_a_comment_naming_the_code_path_that_uses_it(helm: Any) -> None:
    text = helm.template_text(
        set_values=[
            "operator.leaderElection.enabled=true",
            "operator.replicas=2",
            "operator.watchNamespaces={tenant-a}",
        ]
    )
    checked = 0
    for doc in text.split("\n---\n"):
        m = re.search(r"^kind: (ClusterRole|Role)$", doc, re.M)
        if not m:
            continue
        component = re.search(r"^  name: \S+-(operator|agent)(?:-watch)?$", doc, re.M)
        assert component, doc[:200]
        lines = doc.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("  - apiGroups:"):
                j = i - 1
                while lines[j].lstrip().startswith("#") and lines[j - 1].lstrip().startswith("#"):
                    j -= 1  # to the first line of the comment block
                assert lines[j].strip().startswith(f"# {component.group(1)}: "), (
                    f"rule without a '# {component.group(1)}: <purpose>' comment: "
                    f"{lines[j]!r} above {lines[i : i + 3]}"
                )
                checked += 1
    assert checked >= 15


def test_the_operator_can_do_its_work_with_real_requests(installed: Installed, kube: Any) -> None:
    ns = installed.namespace
    op = installed.apis["operator"]
    co, admin_co = client.CustomObjectsApi(op), client.CustomObjectsApi(kube)
    admin_co.create_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        "devicemigrations",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DeviceMigration",
            "metadata": {"name": "m1"},
            "spec": {"vmiName": "vm-1"},
        },
    )
    assert _status(co.list_cluster_custom_object, GROUP, VERSION, "devicemigrations") == 200
    assert (
        _status(
            co.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            ns,
            "devicemigrations",
            "m1",
            {"status": {"phase": "Validating"}},
        )
        == 200
    )
    assert (
        admin_co.get_namespaced_custom_object(GROUP, VERSION, ns, "devicemigrations", "m1")[
            "status"
        ]["phase"]
        == "Validating"
    )
    # kopf's finalizer and progress annotations.
    assert (
        _status(
            co.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            ns,
            "devicemigrations",
            "m1",
            {"metadata": {"annotations": {"devmig.io/test": "1"}}},
        )
        == 200
    )
    assert _status(co.list_cluster_custom_object, GROUP, VERSION, "nodedeviceinventories") == 200
    # Allowed, and the VMI does not exist: 404, not 403.
    assert (
        _status(
            co.get_namespaced_custom_object,
            "kubevirt.io",
            "v1",
            ns,
            "virtualmachineinstances",
            "vm-1",
        )
        == 404
    )
    assert (
        _status(
            co.list_cluster_custom_object, "kubevirt.io", "v1", "virtualmachineinstancemigrations"
        )
        == 200
    )
    assert _status(client.CoreV1Api(op).list_node) == 200
    ev = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="m1."),
        involved_object=client.V1ObjectReference(
            api_version=f"{GROUP}/{VERSION}", kind="DeviceMigration", name="m1", namespace=ns
        ),
        reason="Validating",
        message="test",
        type="Normal",
    )
    assert _status(client.CoreV1Api(op).create_namespaced_event, ns, ev) == 200
    coord = client.CoordinationV1Api(op)
    lease = client.V1Lease(
        metadata=client.V1ObjectMeta(name="claim-node-b-dev0"),
        spec=client.V1LeaseSpec(holder_identity=f"{ns}/m1"),
    )
    assert _status(coord.create_namespaced_lease, ns, lease) == 200
    assert _status(coord.create_namespaced_lease, ns, lease) == 409  # claimed already
    assert _status(coord.list_namespaced_lease, ns) == 200
    assert _status(coord.delete_namespaced_lease, "claim-node-b-dev0", ns) == 200
    assert _status(client.CoreV1Api(op).read_namespaced_secret, "devmig-session-key", ns) == 200
    assert _status(client.ApiextensionsV1Api(op).list_custom_resource_definition) == 200


def test_the_operators_own_code_paths_work_under_the_charts_rbac(
    installed: Installed, kube: Any
) -> None:
    """The operator's Kubernetes calls, made by its own functions with the
    ServiceAccount's token: the Cluster facade, device claims, the session key."""
    from devmig_operator import agents, placement
    from devmig_operator.cluster import Cluster

    ns = installed.namespace
    op = installed.apis["operator"]
    cluster = Cluster(op, ns)
    assert cluster.get_vmi(ns, "absent") is None
    assert cluster.get_inventory("absent-node") is None
    assert isinstance(cluster.list_inventories(), list)
    assert isinstance(cluster.schedulable_nodes(), set)
    dm = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DeviceMigration",
        "metadata": {"name": "auto-1", "namespace": ns},
        "spec": {"vmiName": "vm-1"},
    }
    assert cluster.create_dm_if_absent(dm) is True
    assert cluster.create_dm_if_absent(dm) is False
    cluster.patch_dm_status(ns, "auto-1", {"phase": "Validating"})
    got = cluster.get_dm(ns, "auto-1")
    assert got is not None and got["status"]["phase"] == "Validating"

    coord = client.CoordinationV1Api(op)
    choice = placement.Choice(
        source_device="0000:01:00.0", target_node="node-b", target_device="0000:02:00.0"
    )
    who = placement.holder(ns, "auto-1", got["metadata"]["uid"])
    assert placement.claim(coord, ns, choice, who) is True
    assert placement.claim(coord, ns, choice, who) is True  # idempotent
    assert placement.claim(coord, ns, choice, f"{ns}/other/uid") is False
    assert placement.claims(coord, ns) == {("node-b", "0000:02:00.0"): who}
    placement.release(coord, ns, "node-b", "0000:02:00.0", who)
    assert placement.claims(coord, ns) == {}

    chart_key = next(d for d in installed.docs if d["metadata"]["name"] == "devmig-session-key")
    import base64

    key = agents.session_key(client.CoreV1Api(op), ns)
    assert key == base64.b64decode(chart_key["data"]["key"])

    # kopf's bookkeeping on a KubeVirt migration it handles (auto mode).
    client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "kubevirt.io",
        "v1",
        ns,
        "virtualmachineinstancemigrations",
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "mig-1"},
            "spec": {"vmiName": "vm-1"},
        },
    )
    patched = client.CustomObjectsApi(op).patch_namespaced_custom_object(
        "kubevirt.io",
        "v1",
        ns,
        "virtualmachineinstancemigrations",
        "mig-1",
        {"metadata": {"annotations": {"devmig.io/last-handled-configuration": "{}"}}},
    )
    assert "devmig.io/last-handled-configuration" in patched["metadata"]["annotations"]


def test_the_operator_cannot_do_what_it_does_not_need(installed: Installed) -> None:
    ns = installed.namespace
    op = installed.apis["operator"]
    core, co = client.CoreV1Api(op), client.CustomObjectsApi(op)
    ca = next(
        d["metadata"]["name"]
        for d in installed.docs
        if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-ca")
    )
    assert _status(core.read_namespaced_secret, ca, ns) == 403
    assert _status(core.list_namespaced_secret, ns) == 403
    assert _status(core.list_pod_for_all_namespaces) == 403
    assert (
        _status(co.delete_namespaced_custom_object, GROUP, VERSION, ns, "devicemigrations", "m1")
        == 403
    )
    assert (
        _status(
            co.patch_namespaced_custom_object,
            "kubevirt.io",
            "v1",
            ns,
            "virtualmachineinstances",
            "vm-1",
            {"metadata": {"annotations": {"x": "y"}}},
        )
        == 403
    )
    assert not _allowed(op, "coordination.k8s.io", "leases", "update", ns)
    lease = client.V1Lease(metadata=client.V1ObjectMeta(name="elsewhere"))
    assert _status(client.CoordinationV1Api(op).create_namespaced_lease, "default", lease) == 403
    assert (
        _status(
            co.create_namespaced_custom_object,
            "kubevirt.io",
            "v1",
            ns,
            "virtualmachineinstancemigrations",
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": "x"},
                "spec": {"vmiName": "vm"},
            },
        )
        == 403
    )
    assert not _allowed(op, "rbac.authorization.k8s.io", "clusterroles", "create", "")


def test_the_agent_publishes_its_inventory_and_reads_its_node_and_pods(
    installed: Installed, kube: Any
) -> None:
    agent = installed.apis["agent"]
    node = f"node-{installed.namespace}"
    client.CoreV1Api(kube).create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))
    try:
        co = client.CustomObjectsApi(agent)
        inv = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "NodeDeviceInventory",
            "metadata": {"name": node},
            "spec": {"nodeName": node},
        }
        assert (
            _status(co.create_cluster_custom_object, GROUP, VERSION, "nodedeviceinventories", inv)
            == 200
        )
        assert (
            _status(
                co.patch_cluster_custom_object_status,
                GROUP,
                VERSION,
                "nodedeviceinventories",
                node,
                {
                    "status": {
                        "agentVersion": "0.1.0",
                        "agentEndpoint": "10.0.0.7:50051",
                        "deviceCount": 0,
                        "migratableCount": 0,
                    }
                },
            )
            == 200
        )
        got = co.get_cluster_custom_object(GROUP, VERSION, "nodedeviceinventories", node)
        assert got["status"]["agentEndpoint"] == "10.0.0.7:50051"
        assert _status(client.CoreV1Api(agent).read_node, node) == 200
        assert (
            _status(
                client.CoreV1Api(agent).list_pod_for_all_namespaces,
                field_selector=f"spec.nodeName={node}",
            )
            == 200
        )
        assert (
            _status(co.delete_cluster_custom_object, GROUP, VERSION, "nodedeviceinventories", node)
            == 403
        )
    finally:
        client.CoreV1Api(kube).delete_node(node)
        client.CustomObjectsApi(kube).delete_cluster_custom_object(
            GROUP, VERSION, "nodedeviceinventories", node
        )


def test_the_agent_cannot_touch_migrations_secrets_or_other_nodes(
    installed: Installed, kube: Any
) -> None:
    ns = installed.namespace
    agent = installed.apis["agent"]
    core, co = client.CoreV1Api(agent), client.CustomObjectsApi(agent)
    assert (
        _status(co.delete_namespaced_custom_object, GROUP, VERSION, ns, "devicemigrations", "m1")
        == 403
    )
    assert _status(co.list_cluster_custom_object, GROUP, VERSION, "devicemigrations") == 403
    assert _status(core.read_namespaced_secret, "devmig-session-key", ns) == 403
    assert _status(core.list_secret_for_all_namespaces) == 403
    assert _status(core.list_node) == 403
    assert _status(core.patch_node, "any", {"metadata": {"labels": {"x": "y"}}}) == 403
    assert _status(core.create_namespaced_pod, ns, {"metadata": {"name": "p"}}) == 403
    assert _status(client.CoordinationV1Api(agent).list_namespaced_lease, ns) == 403


def test_an_operator_serving_listed_namespaces_has_rights_there_only(
    helm: Any, control_plane: Any, kube: Any, namespace: str, release: str
) -> None:
    served = f"{namespace}-served"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=served)))
    try:
        with install_rbac(
            helm,
            control_plane,
            kube,
            namespace,
            release,
            (f"operator.watchNamespaces={{{served}}}",),
        ) as inst:
            op = inst.apis["operator"]
            co = client.CustomObjectsApi(op)
            assert (
                _status(
                    co.list_namespaced_custom_object, GROUP, VERSION, served, "devicemigrations"
                )
                == 200
            )
            assert _allowed(op, GROUP, "devicemigrations/status", "patch", served)
            assert _allowed(op, "kubevirt.io", "virtualmachineinstances", "watch", served)
            assert _allowed(op, "", "events", "create", served)
            # Not in the release namespace, not in others, not cluster-wide.
            for ns in (namespace, "default"):
                assert (
                    _status(
                        co.list_namespaced_custom_object, GROUP, VERSION, ns, "devicemigrations"
                    )
                    == 403
                )
                assert not _allowed(op, "kubevirt.io", "virtualmachineinstances", "get", ns)
            assert _status(co.list_cluster_custom_object, GROUP, VERSION, "devicemigrations") == 403
            # What the operator needs wherever it serves stays cluster-wide.
            assert (
                _status(co.list_cluster_custom_object, GROUP, VERSION, "nodedeviceinventories")
                == 200
            )
            assert _status(client.CoreV1Api(op).list_node) == 200
            assert _allowed(op, "coordination.k8s.io", "leases", "create", namespace)
    finally:
        core.delete_namespace(served)
