"""The operator end to end: real kube-apiserver + etcd, the operator process,
agent processes with simulated devices, against baselines measured in the
same run.

Figures (see docs/benchmarks.md):

operator_downtime_1gib
    One migration of a 1 GiB simulated device whose workload dirties 16
    pages per MiB sent, with the default policy (downtimeLimitMs 300): the
    downtime the operator records (source left RUNNING -> target RUNNING).
    Baseline: 1.2 x the stop-and-copy bytes (bytesSent at the end minus at
    the StopAndCopy transition, or the remainingBytes the device reported
    then, whichever is more; from the DeviceMigration's own status) at
    the C TCP loopback copy's rate (bench/rawcopy.c) plus 5 gRPC unary round
    trips (GetVersion to an agent, median of 50), both measured in the same
    run. Ratio baseline / downtime: >= 1 meets the goal.
    ``within_limit``: when pre-copy converged, the downtime did not exceed
    downtimeLimitMs.
operator_scale_200
    200 migrations created at once, 4 nodes with 100 small simulated devices
    each (50 held by VMIs, 50 free targets): wall time until every one is
    final, seconds per migration, ``all_succeeded``, and the operator's peak
    RSS. Baseline: a no-op kopf operator (one handler that returns) handling
    200 objects of a trivial CRD in the same API server, seconds per object,
    times the 6 phase steps a migration takes. Ratio baseline / value: the
    share of a migration's time that kopf's own per-step cost explains
    (informational; the agents' work and the per-node concurrency limit of
    2 are the rest).

    uv run --no-sync python bench/bench_operator.py [--mib N] [--migrations N]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import rawcopy
from kubernetes import client

from devmig.agent.v1alpha1 import agent_pb2 as pb
from devmig.agent.v1alpha1 import agent_pb2_grpc
from devmig_testbed import controlplane, objects, processes

MIB = 1 << 20
NS = "bench"
FINAL = objects.FINAL_PHASES
# The phase steps one migration takes: Validating, PreparingTarget,
# PreCopy, StopAndCopy, Resuming, Succeeded.
STEPS = 6


@contextlib.contextmanager
def cluster(root: pathlib.Path) -> Iterator[tuple[controlplane.ControlPlane, Any]]:
    with controlplane.running(root / "cp") as cp:
        cp.install_crds()
        cp.install_crds(controlplane.KUBEVIRT_CRDS_DIR)
        api = cp.api_client()
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=NS))
        )
        yield cp, api


def agent(
    cp: controlplane.ControlPlane, node: str, root: pathlib.Path, sim: str, holders: dict[int, str]
) -> tuple[processes.Drained, str]:
    a = processes.start_agent(cp.admin_kubeconfig, node, root, sim, holders)
    return a.output, a.endpoint


def operator(cp: controlplane.ControlPlane) -> processes.Drained:
    return processes.start_operator(cp.admin_kubeconfig, NS, controlplane.free_port(), NS)


def rtt(endpoint: str) -> float:
    with grpc.insecure_channel(endpoint) as ch:
        stub = agent_pb2_grpc.NodeAgentStub(ch)
        times = []
        for _ in range(50):
            t = time.perf_counter()
            stub.GetVersion(pb.GetVersionRequest(), timeout=10)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def downtime(root: pathlib.Path, mib: int) -> dict[str, Any]:
    with cluster(root) as (cp, api):
        for n in ("node-a", "node-b"):
            objects.create_node(api, n)
        sim = f"count=1,size={mib}MiB,dirty=16"
        (pa, ea), (pb_, eb) = (
            agent(cp, "node-a", root, sim, {0: f"{NS}/vm"}),
            agent(cp, "node-b", root, sim, {}),
        )
        op = operator(cp)
        try:
            processes.wait_endpoints(api, {"node-a": ea, "node-b": eb})
            round_trip = rtt(ea)
            objects.create_vmi(api, NS, "vm", "node-a", devices=["devmig.io/sim"])
            objects.create_dm(api, NS, "m", "vm")
            at_stop: list[int] = []

            def until(o: dict[str, Any]) -> bool:
                st = o.get("status") or {}
                if st.get("phase") == "StopAndCopy" and not at_stop:
                    at_stop.append(sum(int(d.get("bytesSent", 0)) for d in st["devices"]))
                    at_stop.append(sum(int(d.get("remainingBytes", 0)) for d in st["devices"]))
                return st.get("phase") in FINAL

            st = objects.wait_dm(api, NS, "m", until, timeout_s=600)["status"]
            if st["phase"] != "Succeeded" or not at_stop:
                raise SystemExit(f"the migration did not succeed: {st}\n{op.log()[-4000:]}")
            sent = sum(int(d["bytesSent"]) for d in st["devices"])
            # What stop-and-copy moved: the bytes sent after the status
            # recorded the transition, or the device's own estimate of what
            # was left then (pre-copy keeps streaming until the source
            # stops, so the first alone can undercount), whichever is more.
            residual = max(sent - at_stop[0], at_stop[1])
            raw, _ = rawcopy.measure(max(residual, MIB))
            base = 1.2 * residual / raw + 5 * round_trip
            seconds = int(st["downtimeMicroseconds"]) / 1e6
            reason = next(
                (c.get("message", "") for c in st["conditions"] if c["type"] == "Succeeded"), ""
            )
            return {
                "name": f"operator_downtime_{mib // 1024}gib"
                if mib >= 1024
                else f"operator_downtime_{mib}mib",
                "value": seconds,
                "baseline": round(base, 6),
                "unit": "s",
                "ratio": round(base / seconds, 3) if seconds else None,
                "stop_copy_bytes": residual,
                "bytes_sent": sent,
                "raw_tcp": round(raw),
                "grpc_rtt_s": round(round_trip, 6),
                "downtime_limit_ms": 300,
                "within_limit": int(st["downtimeMs"]) <= 300,
                "pre_copy_iterations": max(
                    int(d.get("preCopyIterations", 0)) for d in st["devices"]
                ),
                "succeeded_message": reason,
            }
        finally:
            op.stop()
            pa.stop()
            pb_.stop()


NOOP_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "noops.bench.devmig.io"},
    "spec": {
        "group": "bench.devmig.io",
        "scope": "Namespaced",
        "names": {"plural": "noops", "singular": "noop", "kind": "Noop"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}

NOOP_OPERATOR = textwrap.dedent(
    """
    import kopf

    @kopf.on.startup()
    def configure(settings, **_):
        settings.persistence.finalizer = "bench.devmig.io/noop"

    @kopf.on.create("bench.devmig.io", "v1", "noops")
    def created(**_):
        return {"done": True}
    """
)


def _wait_all(api: Any, group: str, version: str, plural: str, done: Any, n: int) -> None:
    co = client.CustomObjectsApi(api)
    while True:
        items = co.list_namespaced_custom_object(group, version, NS, plural)["items"]
        if sum(1 for o in items if done(o)) >= n:
            return
        time.sleep(0.2)


def noop_kopf(cp: controlplane.ControlPlane, api: Any, root: pathlib.Path, n: int) -> float:
    """Seconds per object for a kopf operator whose handler does nothing."""
    client.ApiextensionsV1Api(api).create_custom_resource_definition(NOOP_CRD)
    time.sleep(2)  # the CRD Established
    script = root / "noop_operator.py"
    script.write_text(NOOP_OPERATOR)
    p = processes.Drained(
        subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", "-n", NS, str(script)],
            env={**os.environ, "KUBECONFIG": str(cp.admin_kubeconfig)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
    try:
        time.sleep(3)  # kopf's watch established
        co = client.CustomObjectsApi(api)
        t0 = time.perf_counter()
        for i in range(n):
            co.create_namespaced_custom_object(
                "bench.devmig.io",
                "v1",
                NS,
                "noops",
                {"apiVersion": "bench.devmig.io/v1", "kind": "Noop", "metadata": {"name": f"n{i}"}},
            )
        _wait_all(
            api,
            "bench.devmig.io",
            "v1",
            "noops",
            lambda o: (o.get("status") or {}).get("created", {}).get("done"),
            n,
        )
        return (time.perf_counter() - t0) / n
    finally:
        p.stop()


def scale(root: pathlib.Path, n: int) -> dict[str, Any]:
    nodes = [f"n{i}" for i in range(4)]
    per_node = n // len(nodes)
    with cluster(root) as (cp, api):
        noop = noop_kopf(cp, api, root, n)
        for node in nodes:
            objects.create_node(api, node)
        sim = f"count={2 * per_node},size=256KiB,dirty=0"
        started = [
            agent(cp, node, root, sim, {i: f"{NS}/{node}-vm{i}" for i in range(per_node)})
            for node in nodes
        ]
        op = operator(cp)
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                with contextlib.suppress(OSError):
                    peak[0] = max(peak[0], op.rss())

        threading.Thread(target=sample, daemon=True).start()
        try:
            processes.wait_endpoints(
                api, {node: ep for node, (_, ep) in zip(nodes, started, strict=True)}
            )
            for node in nodes:
                for i in range(per_node):
                    objects.create_vmi(api, NS, f"{node}-vm{i}", node, devices=["devmig.io/sim"])
            t0 = time.perf_counter()
            for node in nodes:
                for i in range(per_node):
                    objects.create_dm(api, NS, f"{node}-m{i}", f"{node}-vm{i}")
            _wait_all(
                api,
                objects.GROUP,
                objects.VERSION,
                "devicemigrations",
                lambda o: (o.get("status") or {}).get("phase") in FINAL,
                per_node * len(nodes),
            )
            wall = time.perf_counter() - t0
            items = client.CustomObjectsApi(api).list_namespaced_custom_object(
                objects.GROUP, objects.VERSION, NS, "devicemigrations"
            )["items"]
            phases = collections.Counter(o["status"]["phase"] for o in items)
            per = wall / len(items)
            return {
                "name": f"operator_scale_{len(items)}",
                "value": round(per, 4),
                "baseline": round(noop * STEPS, 4),
                "unit": "s/migration",
                "ratio": round(noop * STEPS / per, 3),
                "wall_s": round(wall, 1),
                "all_succeeded": phases == {"Succeeded": len(items)},
                "phases": dict(phases),
                "operator_peak_rss": peak[0],
                "noop_kopf_s_per_object": round(noop, 4),
                "nodes": len(nodes),
            }
        finally:
            stop.set()
            op.stop()
            for p, _ in started:
                p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="device state for the downtime, MiB")
    ap.add_argument("--migrations", type=int, default=200, help="migrations at once (scale)")
    args = ap.parse_args()
    # The agents' and the operator's logs: warnings only (every step at
    # INFO is a lot of text at this scale).
    os.environ["DEVMIG_LOG_LEVEL"] = "WARNING"
    figs = []
    with tempfile.TemporaryDirectory(prefix="devmig-bench-op-") as d:
        root = pathlib.Path(d)
        figs.append(downtime(root / "downtime", args.mib))
        figs.append(scale(root / "scale", args.migrations))
    for f in figs:
        print(json.dumps(f))


if __name__ == "__main__":
    main()
