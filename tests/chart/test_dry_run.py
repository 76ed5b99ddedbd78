"""Every object the chart renders, in every scenario, is accepted by the real
kube-apiserver: server-side dry-run with strict field validation."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import pytest

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "devmig"
SCENARIOS = [None, *sorted((CHART / "ci").glob("*.yaml"))]
IDS = ["defaults", *[p.stem for p in SCENARIOS[1:]]]


def test_the_stand_in_crds_carry_the_upstream_names(upstream_crds: list[str]) -> None:
    assert sorted(upstream_crds) == sorted(
        [
            "servicemonitors.monitoring.coreos.com",
            "prometheusrules.monitoring.coreos.com",
            "issuers.cert-manager.io",
            "clusterissuers.cert-manager.io",
            "certificates.cert-manager.io",
            "plugins.plugin.kubevirt.io",
        ]
    )


@pytest.mark.controlplane
@pytest.mark.parametrize("values", SCENARIOS, ids=IDS)
def test_the_api_server_accepts_every_rendered_object_in_a_dry_run(
    helm: Any, server: Any, namespace: str, release: str, values: pathlib.Path | None
) -> None:
    docs = helm.template([values] if values else [], release=release, namespace=namespace)
    # Namespaces a scenario names besides the release's (served tenants)
    # must exist for the API server to accept objects in them.
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(server.api)
    for ns in {d["metadata"].get("namespace") for d in docs} - {None, namespace}:
        try:
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        except ApiException as e:
            if e.status != 409:
                raise
    results = []
    for obj in docs:
        if obj["kind"] == "CustomResourceDefinition":
            # The session's control plane has devmig's CRDs already (from
            # crds/): apply over them, which validates the whole object.
            status, body = server.dry_run_apply(obj)
        else:
            status, body = server.dry_run_create(obj)
        results.append((obj["kind"], obj["metadata"]["name"], status, body))
    failed = [
        f"{k}/{n}: HTTP {s}: {b.get('message') if isinstance(b, dict) else b}"
        for k, n, s, b in results
        if s not in (200, 201)
    ]
    assert failed == []
    # Nothing was skipped and nothing was stored.
    assert len(results) == len(docs)
    for kind, name, _, body in results:
        assert body["kind"] == kind and body["metadata"]["name"] == name
    for obj in docs:
        if obj["kind"] != "CustomResourceDefinition":
            status, _ = server.request("GET", server.path(obj, named=True), None, [])
            assert status == 404, f"{obj['kind']}/{obj['metadata']['name']} was stored"


@pytest.mark.controlplane
def test_the_dry_run_refuses_what_is_wrong(
    helm: Any, server: Any, namespace: str, release: str, find_one: Any
) -> None:
    """The check above can fail: a misspelt field, an out-of-range port and
    an invalid hook point are each refused."""
    docs = helm.template(
        [CHART / "ci" / "kubevirt-plugin-values.yaml", CHART / "ci" / "cert-manager-values.yaml"],
        release=release,
        namespace=namespace,
    )
    ds = copy.deepcopy(find_one(docs, "DaemonSet", "-agent"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    status, body = server.dry_run_create(ds)
    assert status == 400 and "readOnlyRootFS" in body["message"]

    dep = copy.deepcopy(find_one(docs, "Deployment", "-operator"))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000
    status, body = server.dry_run_create(dep)
    assert status == 422 and "containerPort" in body["message"]

    plugin = copy.deepcopy(find_one(docs, "Plugin"))
    plugin["spec"]["nodeHooks"][0]["permittedHooks"] = ["DuringMigration"]
    status, body = server.dry_run_create(plugin)
    assert status == 422 and "permittedHooks" in body["message"]

    cert = copy.deepcopy(find_one(docs, "Certificate", "-agent"))
    cert["spec"]["usages"] = ["server-auth"]
    status, body = server.dry_run_create(cert)
    assert status == 422 and "usages" in body["message"]
