"""helm lint and helm template, with the defaults and with every scenario in
charts/devmig/ci, and what each scenario must render."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "devmig"
SCENARIOS = [None, *sorted((CHART / "ci").glob("*.yaml"))]
IDS = ["defaults", *[p.stem for p in SCENARIOS[1:]]]
ALERTS = {
    "DevmigMigrationFailed",
    "DevmigAgentDown",
    "DevmigMigrationStuck",
    "DevmigDowntimeOverLimit",
}
METRICS = {
    "devmig_migrations_total",
    "devmig_migration_downtime_seconds_bucket",
    "devmig_migration_phase",
    "devmig_agent_up",
    "devmig_agent_sessions_active",
}


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def test_the_scenario_folder_holds_the_documented_scenarios() -> None:
    names = {p.name for p in SCENARIOS[1:]}
    for want in (
        "cert-manager-values.yaml",
        "kubevirt-plugin-values.yaml",
        "monitoring-values.yaml",
        "restricted-nodes-values.yaml",
    ):
        assert want in names


@pytest.mark.parametrize("values", SCENARIOS, ids=IDS)
def test_helm_lint_passes_strictly(helm: Any, values: pathlib.Path | None) -> None:
    args = ["lint", str(CHART), "--strict", "--kube-version", helm.kube_version]
    if values:
        args += ["-f", str(values)]
    out = helm.run(*args).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize("values", SCENARIOS, ids=IDS)
def test_helm_template_renders_labelled_well_formed_objects(
    helm: Any, values: pathlib.Path | None
) -> None:
    docs = helm.template([values] if values else [])
    given = yaml.safe_load(values.read_text()) if values else {}
    served = given.get("operator", {}).get("watchNamespaces", [])
    assert len(docs) >= 15
    cluster_scoped = {
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "Plugin",
    }
    for d in docs:
        meta = d["metadata"]
        assert d["apiVersion"] and d["kind"] and meta["name"], d
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == "devmig", (d["kind"], meta["name"])
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"
        if d["kind"] in cluster_scoped:
            assert "namespace" not in meta
        elif meta["name"].endswith("-operator-watch"):
            # Rights in a namespace the operator serves (operator.watchNamespaces).
            assert meta["namespace"] in served, meta
        else:
            assert meta["namespace"] == "devmig-system", (d["kind"], meta["name"])
        assert len(meta["name"]) <= 63


def test_the_defaults_render_the_operator_agent_crds_rbac_and_generated_tls(helm: Any) -> None:
    docs = helm.template()
    assert kinds(docs) == sorted(
        ["CustomResourceDefinition"] * 2
        + ["ServiceAccount"] * 2
        + ["Secret"] * 4
        + ["ClusterRole", "ClusterRoleBinding"] * 2
        + ["Role", "RoleBinding"]
        + ["Service"] * 2
        + ["Deployment", "DaemonSet", "Pod"]
    )


def test_the_operator_runs_the_decided_command_ports_and_probe(helm: Any, find_one: Any) -> None:
    docs = helm.template()
    dep = find_one(docs, "Deployment", "-operator")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "ghcr.io/devmig/devmig:0.1.0"
    assert c["command"] == ["python", "-m", "devmig_operator"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["DEVMIG_AGENT_PORT"] == "50051"
    assert env["DEVMIG_LEADER_ELECTION"] == "devmig-operator-leader"
    assert env["DEVMIG_AGENT_TLS_SERVER_NAME"] == "devmig-agent.devmig-system.svc"


def test_the_agent_runs_the_decided_command_with_its_node_name(helm: Any, find_one: Any) -> None:
    ds = find_one(helm.template(), "DaemonSet", "-agent")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert c["command"] == [
        "devmig-agent",
        "--listen",
        "0.0.0.0:50051",
        "--node-name",
        "$(NODE_NAME)",
    ]
    node = next(e for e in c["env"] if e["name"] == "NODE_NAME")
    assert node["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "data": 50052, "metrics": 9090}


def test_the_image_tag_defaults_to_the_app_version_and_a_digest_wins(
    helm: Any, find_one: Any
) -> None:
    app = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    images = {
        c["image"]
        for d in helm.template()
        if d["kind"] in ("Deployment", "DaemonSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {f"ghcr.io/devmig/devmig:{app}"}
    digest = "sha256:" + "ab" * 32
    docs = helm.template(set_values=[f"image.digest={digest}", "image.tag=9.9.9"])
    dep = find_one(docs, "Deployment", "-operator")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"ghcr.io/devmig/devmig@{digest}"
    )


def test_more_than_one_operator_replica_needs_leader_election(helm: Any, find_one: Any) -> None:
    proc = helm.run(
        "template",
        "devmig",
        str(CHART),
        "--set",
        "operator.replicas=2",
        "--set",
        "operator.leaderElection.enabled=false",
        check=False,
    )
    assert proc.returncode != 0
    assert "operator.replicas > 1 needs operator.leaderElection.enabled=true" in proc.stderr
    docs = helm.template(values=[CHART / "ci" / "ha-leader-election-values.yaml"])
    dep = find_one(docs, "Deployment", "-operator")
    assert dep["spec"]["replicas"] == 2
    env = {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["DEVMIG_LEADER_ELECTION"] == "devmig-operator-leader"
    # The one Lease may be updated (renewed, taken over, released); no other.
    role = find_one(docs, "Role", "-operator")
    (rule,) = [r for r in role["rules"] if "update" in r["verbs"]]
    assert rule["resources"] == ["leases"] and rule["resourceNames"] == ["devmig-operator-leader"]


def test_cert_manager_issues_the_same_secrets_the_chart_would_generate(helm: Any) -> None:
    own = helm.template()
    cm = helm.template(values=[CHART / "ci" / "cert-manager-values.yaml"])
    tls = "kubernetes.io/tls"
    assert not [d for d in cm if d["kind"] == "Secret" and d["type"] == tls]
    certs = {d["metadata"]["name"]: d["spec"] for d in cm if d["kind"] == "Certificate"}
    generated = {d["metadata"]["name"] for d in own if d["kind"] == "Secret" and d["type"] == tls}
    assert len(generated) == 3
    assert {c["secretName"] for c in certs.values()} == generated
    agent = certs["devmig-agent"]
    assert "devmig-agent.devmig-system.svc" in agent["dnsNames"]
    assert {"server auth", "client auth"} <= set(agent["usages"])
    assert "client auth" in certs["devmig-operator"]["usages"]
    issuers = {d["metadata"]["name"]: d["spec"] for d in cm if d["kind"] == "Issuer"}
    assert issuers["devmig-ca"] == {"ca": {"secretName": certs["devmig-ca"]["secretName"]}}
    assert certs["devmig-ca"]["isCA"] is True
    # With an issuer of the user's, the chart creates no CA and no Issuer.
    ext = helm.template(values=[CHART / "ci" / "cert-manager-cluster-issuer-values.yaml"])
    assert not [d for d in ext if d["kind"] == "Issuer"]
    refs = {d["spec"]["issuerRef"]["name"] for d in ext if d["kind"] == "Certificate"}
    assert refs == {"company-internal-ca"}


def test_the_operators_session_key_is_32_random_bytes_under_its_fixed_name(
    helm: Any, find_one: Any
) -> None:
    import base64

    keys = [
        base64.b64decode(find_one(helm.template(), "Secret", "devmig-session-key")["data"]["key"])
        for _ in range(2)
    ]
    assert [len(k) for k in keys] == [32, 32]
    assert keys[0] != keys[1]


def test_the_kubevirt_plugin_points_at_the_socket_the_agent_serves(
    helm: Any, find_one: Any
) -> None:
    assert not [d for d in helm.template() if d["kind"] == "Plugin"]
    docs = helm.template(values=[CHART / "ci" / "kubevirt-plugin-values.yaml"])
    plugin = find_one(docs, "Plugin")
    assert plugin["apiVersion"] == "plugin.kubevirt.io/v1alpha1"
    (hook,) = plugin["spec"]["nodeHooks"]
    assert hook["permittedHooks"] == [
        "PreMigrationSource",
        "PreMigrationTarget",
        "PostMigrationTarget",
    ]
    assert hook["timeout"] == "45s"
    ds = find_one(docs, "DaemonSet", "-agent")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["DEVMIG_HOOK_SOCKET"] == hook["socket"]
    # virt-handler dials the path inside its own container, where host
    # /var/run/kubevirt is mounted at the same path; the agent's hostPath
    # mount of the hook directory must therefore sit at the same host path.
    assert hook["socket"].startswith("/var/run/kubevirt/")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "kubevirt-hooks")
    vol = next(
        v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "kubevirt-hooks"
    )
    assert (
        vol["hostPath"]["path"]
        == mount["mountPath"]
        == str(pathlib.PurePath(hook["socket"]).parent)
    )


@pytest.mark.parametrize(
    ("hook_dir", "accepted"),
    [
        ("/var/run/kubevirt/plugins", True),
        ("/var/lib/kubelet/plugins/devmig/", True),
        ("/run/devmig", False),
        ("/var/run/kubevirt-private/devmig", False),
    ],
)
def test_the_plugin_refuses_a_hook_socket_virt_handler_cannot_see(
    helm: Any, hook_dir: str, accepted: bool
) -> None:
    proc = helm.run(
        "template",
        "devmig",
        str(CHART),
        "--set",
        "kubevirt.plugin.enabled=true",
        "--set",
        f"agent.hostPaths.kubevirtHooks={hook_dir}",
        check=False,
    )
    assert (proc.returncode == 0) is accepted, proc.stderr
    if not accepted:
        assert "put it under /var/run/kubevirt or /var/lib/kubelet" in proc.stderr


def test_monitoring_renders_a_service_monitor_and_the_alert_rules(helm: Any, find_one: Any) -> None:
    docs = helm.template(values=[CHART / "ci" / "monitoring-values.yaml"])
    sm = find_one(docs, "ServiceMonitor")
    selected = [
        d
        for d in docs
        if d["kind"] == "Service"
        and all(
            d["metadata"]["labels"].get(k) == v
            for k, v in sm["spec"]["selector"]["matchLabels"].items()
        )
    ]
    assert len(selected) == 2
    for svc in selected:
        assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    rule = find_one(docs, "PrometheusRule")
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= ALERTS
    exprs = " ".join(r["expr"] for r in rules)
    for m in METRICS:
        assert m in exprs, m
    for r in rules:
        ann = r["annotations"]
        assert ann["summary"] and ann["description"] and ann["runbook"], r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info")
    downtime = next(r for r in rules if r["alert"] == "DevmigDowntimeOverLimit")
    assert downtime["expr"].rstrip().endswith("> 0.3")
    assert downtime["annotations"]["runbook_url"].startswith("https://devmig.example.com/runbooks#")
    # Prometheus's own template syntax survives Helm's templating.
    assert (
        "{{ $labels.node }}"
        in next(r for r in rules if r["alert"] == "DevmigAgentDown")["annotations"]["summary"]
    )
    # Off by default.
    assert not {"ServiceMonitor", "PrometheusRule"} & set(kinds(helm.template()))


def test_restricted_nodes_reach_the_pods_scheduling_fields(helm: Any, find_one: Any) -> None:
    values = yaml.safe_load((CHART / "ci" / "restricted-nodes-values.yaml").read_text())
    docs = helm.template(values=[CHART / "ci" / "restricted-nodes-values.yaml"])
    for kind, suffix, key in (
        ("DaemonSet", "-agent", "agent"),
        ("Deployment", "-operator", "operator"),
    ):
        spec = find_one(docs, kind, suffix)["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == values[key]["nodeSelector"]
        assert spec["tolerations"] == values[key]["tolerations"]
        assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
        assert spec["containers"][0]["image"] == "registry.example.com/devmig/devmig:0.1.0-rc1"
    ds = find_one(docs, "DaemonSet", "-agent")
    assert ds["spec"]["template"]["spec"]["affinity"] == values["agent"]["affinity"]
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_clusters_older_than_cel_rules_are_refused(helm: Any) -> None:
    # The CRDs use CEL validation rules, GA in Kubernetes 1.29.
    proc = helm.run("template", "devmig", str(CHART), "--kube-version", "v1.28.9", check=False)
    assert proc.returncode != 0
    assert "kubeVersion" in proc.stderr or "incompatible" in proc.stderr.lower(), proc.stderr
    assert helm.run("template", "devmig", str(CHART), "--kube-version", "v1.29.0").returncode == 0


def test_notes_say_how_to_check_the_install_and_start_a_migration(helm: Any) -> None:
    out = helm.run(
        "install", "devmig", str(CHART), "--dry-run=client", "--namespace", "devmig-system"
    ).stdout
    notes = out.split("NOTES:", 1)[1]
    assert "helm test devmig -n devmig-system" in notes
    assert "kind: DeviceMigration" in notes
    assert "kubectl -n <namespace> wait dm/my-vm-move" in notes
    assert "pod-security.kubernetes.io/enforce=privileged" in notes
