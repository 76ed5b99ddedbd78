"""A whole migration with the chart's ServiceAccounts: the operator and both
agents authenticate with the tokens of the ServiceAccounts the chart
creates, bound by the chart's own RBAC. A permission the code needs and the
chart does not grant fails this test."""

from __future__ import annotations

import pathlib
import re
from typing import Any

from kubernetes import client
from test_rbac import install_rbac

from devmig_testbed import controlplane, objects, processes


def test_a_migration_succeeds_with_only_the_charts_permissions(
    helm: Any,
    control_plane: controlplane.ControlPlane,
    kube: Any,
    namespace: str,
    release: str,
    tmp_path: pathlib.Path,
) -> None:
    # The operator serves this test's namespace only (operator.watchNamespaces),
    # as the chart runs it with --namespace: objects other tests left in
    # other namespaces stay out of this run.
    served = (f"operator.watchNamespaces={{{namespace}}}",)
    with install_rbac(helm, control_plane, kube, namespace, release, served) as inst:
        sa = {
            c: next(
                d["metadata"]["name"]
                for d in inst.docs
                if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith(f"-{c}")
            )
            for c in ("operator", "agent")
        }
        op_cfg = control_plane.service_account_kubeconfig(namespace, sa["operator"])
        agent_cfg = control_plane.service_account_kubeconfig(namespace, sa["agent"])
        for n in ("node-a", "node-b"):
            objects.create_node(kube, n)
        agents = [
            processes.start_agent(agent_cfg, "node-a", tmp_path, holders={0: f"{namespace}/vm"}),
            processes.start_agent(agent_cfg, "node-b", tmp_path),
        ]
        # Leader election as the chart configures it: its Lease is renewed
        # and released with the chart's own rights.
        dep = next(
            d
            for d in inst.docs
            if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
        )
        lease = next(
            e["value"]
            for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
            if e["name"] == "DEVMIG_LEADER_ELECTION"
        )
        operator = processes.start_operator(
            op_cfg,
            namespace,
            controlplane.free_port(),
            namespace,
            extra_args=["--leader-election", lease],
        )
        try:
            processes.wait_inventories(kube, agents)
            objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
            objects.create_dm(kube, namespace, "m", "vm", policy={"downtimeLimitMs": 2000})
            dm = objects.wait_dm_final(kube, namespace, "m")
            # kopf posts Events asynchronously: they arrive shortly after.
            objects.eventually(
                lambda: next(
                    e
                    for e in client.CoreV1Api(kube).list_namespaced_event(namespace).items
                    if e.reason == "Succeeded" and e.involved_object.name == "m"
                ),
                what="the Succeeded event",
            )
        finally:
            operator.stop()
            out = operator.log()
            print(out[-4000:])
            for a in agents:
                print(a.stop())
        assert dm["status"]["phase"] == "Succeeded", dm["status"]
        # A refusal shows as kopf's APIForbiddenError (status=403), the
        # client's ApiException ("(403)" and "Reason: Forbidden") or a Status
        # body ('code': 403). A bare "403" is not enough: ports and
        # millisecond timestamps contain it.
        denied = re.search(r"Forbidden|status=403\b|\(403\)|'code': 403\b", out)
        assert denied is None, out[-4000:]
        assert "released Lease" in out, out[-4000:]
