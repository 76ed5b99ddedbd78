"""The local demo (``make demo``): devmig's main job on an embedded default.

Everything real but the hardware: the control plane (etcd + kube-apiserver
built from Go modules), devmig's CRDs, the operator (kopf) and two node
agents ("node-a", "node-b") whose devices are the native core's simulated
migratable devices. A VMI on node-a holds one device; ``kubectl devmig
migrate`` moves it to node-b, live, with a progress bar: pre-copy rounds
while the device runs, stop-and-copy, the target verified and RUNNING. A
summary follows, then everything is torn down.

KubeVirt itself cannot run here: the VMI is a KubeVirt-shaped object of the
test stand-in CRD, and no guest runs; the device and its workload are the
simulated device's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from devmig_testbed import controlplane, objects, processes

NODES = ("node-a", "node-b")
NS = "demo"


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def summary(dm: dict[str, Any], elapsed_s: float) -> list[str]:
    st = dm["status"]
    d = st["devices"][0]
    sent = int(d.get("bytesSent", 0))
    lines = [
        f"result:        {st['phase']} ({st['sourceNode']} -> {st.get('targetNode', '?')})",
        f"device:        {d['sourceDevice']} -> {d.get('targetDevice', '?')}, "
        f"now {d.get('sourceState', '?')} on the source, {d.get('targetState', '?')} on the target",
        f"device state:  {sent / (1 << 20):.1f} MiB sent in "
        f"{d.get('preCopyIterations', 0)} pre-copy round(s) plus stop-and-copy",
        f"downtime:      {st.get('downtimeMs', '?')} ms (source left RUNNING -> target RUNNING)",
        f"wall time:     {elapsed_s:.1f} s from kubectl devmig migrate to Succeeded",
        f"phases:        {' -> '.join(t['phase'] for t in st['phaseTransitions'])}",
    ]
    return lines


def run(size: str, dirty: int, keep: bool) -> int:
    from kubernetes import client

    from devmig_operator import kubectl_plugin

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="devmig-demo-"))
    cp = controlplane.ControlPlane(workdir=workdir, binaries=controlplane.locate_binaries())
    agents: list[processes.AgentProcess] = []
    operator: subprocess.Popen[str] | None = None
    try:
        say("starting the control plane (real etcd + kube-apiserver on loopback)")
        cp.start()
        for name, v in cp.binaries.versions().items():
            print(f"    {name}: {v}")
        say("installing devmig's CRDs (and KubeVirt's VMI/VMIM CRDs as test stand-ins)")
        for n in cp.install_crds() + cp.install_crds(controlplane.KUBEVIRT_CRDS_DIR):
            print(f"    {n}: Established")
        api = cp.api_client()
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=NS))
        )
        for n in NODES:
            objects.create_node(api, n)
        say(
            f"starting two node agents, each with one simulated device (size={size}, dirty={dirty})"
        )
        sim = f"count=1,size={size},dirty={dirty}"
        agents = [
            processes.start_agent(cp.admin_kubeconfig, "node-a", workdir, sim, {0: f"{NS}/vm-1"}),
            processes.start_agent(cp.admin_kubeconfig, "node-b", workdir, sim),
        ]
        processes.wait_inventories(api, agents)
        for a in agents:
            print(f"    agent {a.node} at {a.endpoint}: inventory published")
        say("starting the operator")
        operator = processes.start_operator(cp.admin_kubeconfig, NS, controlplane.free_port())
        objects.create_vmi(api, NS, "vm-1", "node-a", devices=["devmig.io/sim"])
        say("VMI demo/vm-1 runs on node-a with device sim-node-a-0; devices:")
        cli = kubectl_plugin.Cli(api, NS, sys.stdout, sys.stderr)
        cli.devices(None, "")
        say("kubectl devmig migrate vm-1 --wait")
        start = time.monotonic()
        rc = cli.migrate("vm-1", None, True, 300.0, "")
        elapsed = time.monotonic() - start
        dms = client.CustomObjectsApi(api).list_namespaced_custom_object(
            "devmig.io", "v1alpha1", NS, "devicemigrations"
        )
        assert isinstance(dms, dict)
        dm = dms["items"][0]
        say("summary")
        for line in summary(dm, elapsed):
            print(f"    {line}")
        if keep:
            say(f"cluster kept up: export KUBECONFIG={cp.admin_kubeconfig}; Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                agents[0].proc.wait()
        say("demo finished" if rc == 0 else "demo finished: the migration did not succeed")
        return rc
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                operator.kill()
        for a in agents:
            a.stop()
        cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="devmig-demo", description="devmig local demo")
    p.add_argument("--size", default="64MiB", help="device state size (default: %(default)s)")
    p.add_argument(
        "--dirty",
        type=int,
        default=16,
        help="pages (4 KiB) the device's workload dirties per MiB sent (default: %(default)s)",
    )
    p.add_argument("--keep", action="store_true", help="keep the cluster up until Ctrl-C")
    a = p.parse_args(argv)
    return run(a.size, a.dirty, a.keep)


if __name__ == "__main__":
    with contextlib.suppress(io.UnsupportedOperation):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.exit(main())
