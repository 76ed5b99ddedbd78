"""What the chart hands the product is what the product reads: the
operator's command line, the environment its code looks up, and the metric
names and label values the alert rules query."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "devmig"


def _operator_container(helm: Any, find_one: Any, *sets: str) -> dict[str, Any]:
    dep = find_one(helm.template(set_values=list(sets)), "Deployment", "-operator")
    return dict(dep["spec"]["template"]["spec"]["containers"][0])


@pytest.mark.parametrize(
    ("sets", "metrics", "liveness", "verbose", "served"),
    [
        ((), 8080, "http://0.0.0.0:8081/healthz", False, []),
        (
            ("operator.metricsPort=9400", "operator.healthPort=9401", "operator.logLevel=DEBUG"),
            9400,
            "http://0.0.0.0:9401/healthz",
            True,
            [],
        ),
        (
            ("operator.watchNamespaces={tenant-a,tenant-b}",),
            8080,
            "http://0.0.0.0:8081/healthz",
            False,
            ["tenant-a", "tenant-b"],
        ),
    ],
    ids=["defaults", "moved-ports-and-debug", "served-namespaces"],
)
def test_the_operator_command_line_is_accepted_by_the_operators_own_parser(
    helm: Any,
    find_one: Any,
    monkeypatch: pytest.MonkeyPatch,
    sets: tuple[str, ...],
    metrics: int,
    liveness: str,
    verbose: bool,
    served: list[str],
) -> None:
    import kopf
    import prometheus_client

    from devmig_operator import __main__ as entry

    c = _operator_container(helm, find_one, *sets)
    assert c["command"] == ["python", "-m", "devmig_operator"]
    started: dict[str, Any] = {}

    def fake_operator(**kw: Any) -> Any:
        started.update(kw)

        async def nothing() -> None:
            return None

        return nothing()

    monkeypatch.setattr(kopf, "operator", fake_operator)
    monkeypatch.setattr(
        prometheus_client, "start_http_server", lambda port: started.update(metrics=port)
    )
    monkeypatch.setattr(entry.logging, "basicConfig", lambda **kw: started.update(log=kw))
    assert entry.main(c["args"]) == 0
    assert started["metrics"] == metrics
    assert started["liveness_endpoint"] == liveness
    assert started["clusterwide"] is (not served)
    assert list(started["namespaces"]) == served
    assert (started["log"]["level"] == entry.logging.DEBUG) is verbose
    # The container exposes what the operator serves.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == metrics
    assert liveness.endswith(f":{ports['health']}{c['livenessProbe']['httpGet']['path']}")


@pytest.mark.parametrize(
    ("package", "kind", "suffix"),
    [
        ("operator/devmig_operator", "Deployment", "-operator"),
        ("node-agent/devmig_agent", "DaemonSet", "-agent"),
    ],
    ids=["operator", "agent"],
)
def test_every_environment_variable_the_code_reads_is_set_by_the_chart(
    helm: Any, find_one: Any, package: str, kind: str, suffix: str
) -> None:
    src = "\n".join(p.read_text() for p in (ROOT / package).rglob("*.py"))
    read = set(re.findall(r"""environ(?:\.get)?[(\[]\s*["']([A-Z_]+)["']""", src))
    read |= set(re.findall(r"""getenv\(\s*["']([A-Z_]+)["']""", src))
    # Read only by tools run on users' machines (kubectl plugin, local runs).
    read -= {"KUBECONFIG", "HOME", "PATH"}
    # Set by the kubelet in every container (in-cluster API discovery).
    read = {v for v in read if not v.startswith("KUBERNETES_SERVICE_")}
    assert read, f"no environment lookups found in {package}"
    workload = find_one(helm.template(), kind, suffix)
    env = {e["name"] for e in workload["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert read <= env, f"{package} reads {sorted(read - env)} but the chart does not set them"


def test_the_operator_finds_its_tls_files_where_the_chart_mounts_them(
    helm: Any, find_one: Any
) -> None:
    c = _operator_container(helm, find_one)
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
    assert env["DEVMIG_TLS_DIR"] == mount["mountPath"] == "/etc/devmig/tls"
    # A kubernetes.io/tls Secret with the CA: the three files the operator opens.
    secret = find_one(helm.template(), "Secret", "-operator-tls")
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}


def test_the_alert_rules_query_metrics_and_labels_the_operator_exports(
    helm: Any, find_one: Any
) -> None:
    from devmig_operator import metrics
    from devmig_operator.conditions import Phase

    docs = helm.template([CHART / "ci" / "monitoring-values.yaml"])
    rules = [r for g in find_one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    exported = {
        "devmig_migrations_total": metrics.MIGRATIONS,
        "devmig_migration_downtime_seconds_bucket": metrics.DOWNTIME,
        "devmig_migration_phase": metrics.PHASE,
    }
    for name, m in exported.items():
        fams = {s.name for fam in m.collect() for s in fam.samples} | {
            fam.name for fam in m.collect()
        }
        assert name in fams or name.removesuffix("_total") in fams, name
    failed = next(r for r in rules if r["alert"] == "DevmigMigrationFailed")
    result = re.search(r'devmig_migrations_total\{result="([^"]+)"\}', failed["expr"])
    assert result and result.group(1) in {p.value for p in Phase if p.final}
    stuck = next(r for r in rules if r["alert"] == "DevmigMigrationStuck")
    excluded = re.search(r'phase!~"([^"]+)"', stuck["expr"])
    assert excluded and set(excluded.group(1).split("|")) == {p.value for p in Phase if p.final}
    assert set(metrics.PHASE._labelnames) >= {"namespace", "name", "phase"}
    assert "by (namespace, name, phase)" in stuck["expr"]
    # The downtime alerts' thresholds (default and scenario) lie on histogram
    # bucket boundaries, so the quantile is not an interpolation artefact.
    import yaml

    for f in (CHART / "values.yaml", CHART / "ci" / "monitoring-values.yaml"):
        limit = yaml.safe_load(f.read_text())["metrics"]["prometheusRule"]["downtimeLimitSeconds"]
        assert limit in metrics.DOWNTIME._upper_bounds, f


def test_the_agents_paths_are_where_the_agent_looks_by_default(helm: Any, find_one: Any) -> None:
    """The sockets and directories the chart mounts and names are the node
    agent's own defaults, so the agent works even where it ignores the
    environment the chart passes."""
    from devmig_agent import domain_hook, hooks_kubevirt, journal, podresources

    docs = helm.template([CHART / "ci" / "kubevirt-plugin-values.yaml"])
    ds = find_one(docs, "DaemonSet", "-agent")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    plugin = find_one(docs, "Plugin")

    assert plugin["spec"]["nodeHooks"][0]["socket"] == hooks_kubevirt.DEFAULT_SOCKET
    assert env["DEVMIG_HOOK_SOCKET"] == hooks_kubevirt.DEFAULT_SOCKET
    assert str(pathlib.PurePath(hooks_kubevirt.DEFAULT_SOCKET).parent) in mounts
    assert env["DEVMIG_POD_RESOURCES_SOCKET"] == podresources.DEFAULT_SOCKET
    assert str(pathlib.PurePath(podresources.DEFAULT_SOCKET).parent) in mounts
    assert pathlib.PurePath(journal.DEFAULT_DIR).is_relative_to(env["DEVMIG_STATE_DIR"])
    assert env["DEVMIG_STATE_DIR"] in mounts
    # KubeVirt accepts a domain-hook sidecar socket only under
    # /var/run/kubevirt-plugin/<Plugin name>/.
    assert plugin["metadata"]["name"] == domain_hook.DEFAULT_PLUGIN_NAME
    assert domain_hook.DEFAULT_SOCKET.startswith(
        f"/var/run/kubevirt-plugin/{plugin['metadata']['name']}/"
    )
    # The agent serves mutual TLS from the directory the chart mounts.
    assert env["DEVMIG_TLS_DIR"] == "/etc/devmig/tls" and "/etc/devmig/tls" in mounts
