"""The local demo (``make demo``): devmig's main job on an embedded default.

What runs today, all real: the control plane (etcd + kube-apiserver built
from Go modules), devmig's CRDs with their schemas and CEL rules, and two
node agents ("node-a", "node-b") serving gRPC on loopback, each answering
the version handshake with the native core's version. A DeviceMigration is
created and the API server applies its defaults.

Not yet built, and said so at the end of the run: the operator's reconcile
loop, migration sessions in the agents, the simulated devices' migration
and the progress bar. The demo grows with them.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from devmig_testbed import controlplane

NODES = ("node-a", "node-b")


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def start_agent(node: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devmig_agent.main", "--listen", "127.0.0.1:0", "--node-name", node],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.fullmatch(r"LISTENING (\S+)\n", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"agent for {node} did not start (printed {line!r})")
    return proc, m.group(1)


def handshake(addr: str) -> Any:
    import grpc

    from devmig.agent.v1alpha1 import agent_pb2, agent_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        stub = agent_pb2_grpc.NodeAgentStub(ch)
        return stub.GetVersion(agent_pb2.GetVersionRequest(api_version="v1alpha1"), timeout=10)


def run(keep: bool) -> int:
    from kubernetes import client

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="devmig-demo-"))
    cp = controlplane.ControlPlane(workdir=workdir, binaries=controlplane.locate_binaries())
    agents: list[subprocess.Popen[str]] = []
    try:
        say("starting the control plane (real etcd + kube-apiserver on loopback)")
        cp.start()
        for name, v in cp.binaries.versions().items():
            print(f"    {name}: {v}")
        say("installing devmig's CRDs")
        for n in cp.install_crds():
            print(f"    {n}: Established")
        for node in NODES:
            proc, addr = start_agent(node)
            agents.append(proc)
            v = handshake(addr)
            say(
                f"agent {v.node_name} at {addr}: api {', '.join(v.api_versions)}, "
                f"agent {v.agent_version}, native core {v.native_version}"
            )
        api = cp.api_client()
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="demo")))
        say("creating DeviceMigration demo/vm-1-move")
        dm = client.CustomObjectsApi(api).create_namespaced_custom_object(
            "devmig.io",
            "v1alpha1",
            "demo",
            "devicemigrations",
            {
                "apiVersion": "devmig.io/v1alpha1",
                "kind": "DeviceMigration",
                "metadata": {"name": "vm-1-move"},
                "spec": {"vmiName": "vm-1", "targetNode": "node-b"},
            },
        )
        assert isinstance(dm, dict)
        print(f"    spec with defaults from the CRD: {dm['spec']}")
        say(
            "not yet built: the operator's reconcile loop, agent migration sessions, "
            "simulated-device migration and the progress bar; this demo grows with them"
        )
        if keep:
            say(f"cluster kept up: export KUBECONFIG={cp.admin_kubeconfig}; Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                agents[0].wait()
        say("demo finished")
        return 0
    finally:
        for a in agents:
            a.terminate()
            a.wait(timeout=15)
        cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="devmig-demo", description="devmig local demo")
    p.add_argument("--keep", action="store_true", help="keep the cluster up until Ctrl-C")
    a = p.parse_args(argv)
    return run(a.keep)


if __name__ == "__main__":
    sys.exit(main())
