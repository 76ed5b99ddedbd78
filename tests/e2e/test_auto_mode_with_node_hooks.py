"""Auto mode end to end: KubeVirt migrates a VMI (the stand-in moves its
VirtualMachineInstanceMigration through virt-controller's phases) and
calls the agents' node hooks where virt-handler does; devmig creates the
DeviceMigration from the VMIM, takes the device the target pod already
holds, and the hooks hold KubeVirt's migration until the device phases
allow it. Real operator and agent processes, the hooks over their Unix
sockets, the real API server."""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from kubernetes import client
from kubevirt.hooks.plugins.v1alpha1 import api_pb2, api_pb2_grpc

from devmig_testbed import objects, processes
from devmig_testbed.controlplane import ControlPlane
from devmig_testbed.kubevirt_standin import KV, VirtController
from devmig_testbed.pytest_plugin import OperatorProcess


@pytest.fixture
def hook_sockets(
    control_plane: ControlPlane, kube: Any, namespace: str, tmp_path: pathlib.Path
) -> Iterator[dict[str, str]]:
    # Unix socket paths are limited to 108 bytes; tmp_path can exceed it.
    d = tempfile.mkdtemp(prefix="dm-hooks-")
    socks = {n: f"{d}/{n}.sock" for n in ("node-a", "node-b")}
    for n in socks:
        objects.create_node(kube, n)
    vm = f"{namespace}/vm"
    agents = [
        # The VMI's pod on node-a holds device 0; on node-b KubeVirt's
        # target pod already holds device 0 too, device 1 is free.
        processes.start_agent(
            control_plane.admin_kubeconfig, n, tmp_path, "count=2,size=1MiB,dirty=16",
            {0: vm}, extra_args=["--hook-socket", socks[n]],
        )
        for n in socks
    ]  # fmt: skip
    try:
        processes.wait_inventories(kube, agents)
        yield socks
    finally:
        for a in agents:
            print(a.stop())
        shutil.rmtree(d, ignore_errors=True)


def _vmi_json(kube: Any, namespace: str, vmim_uid: str) -> bytes:
    """The VMI as virt-handler hands it to a hook: with the migration's UID
    in its migrationState."""
    vmi = client.CustomObjectsApi(kube).get_namespaced_custom_object(
        *KV, namespace, "virtualmachineinstances", "vm"
    )
    vmi.setdefault("status", {}).setdefault("migrationState", {})["migrationUid"] = vmim_uid
    return json.dumps(vmi).encode()


def _hook_until_ok(socket: str, node: str, point: str, vmi: bytes, timeout_s: float = 120) -> None:
    """Call a node hook as virt-handler does: retried while the agent says
    UNAVAILABLE (not yet), failing on anything else."""
    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"unix://{socket}") as ch:
        stub = api_pb2_grpc.NodeHookServiceStub(ch)
        while True:
            try:
                stub.ExecuteNodeHook(
                    api_pb2.ExecuteNodeHookRequest(
                        hookPoint=point, vmi=vmi, node_context=api_pb2.NodeContext(node_name=node)
                    ),
                    timeout=30,
                )
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                    raise
            time.sleep(0.2)


def test_kubevirt_migration_waits_on_the_device_phases_and_both_succeed(
    kube: Any,
    namespace: str,
    hook_sockets: dict[str, str],
    operator_process: OperatorProcess,
) -> None:
    objects.create_vmi(kube, namespace, "vm", "node-a", devices=["devmig.io/sim"])
    co = client.CustomObjectsApi(kube)
    vmim = objects.create_vmim(kube, namespace, "mig", "vm")
    kv = VirtController(kube, target_node="node-b")
    kv.advance_to(namespace, "mig", "PreparingTarget")
    vmi = _vmi_json(kube, namespace, vmim["metadata"]["uid"])
    # virt-handler on the target: the target device must be RESUMING.
    _hook_until_ok(hook_sockets["node-b"], "node-b", "PreMigrationTarget", vmi)
    kv.advance_to(namespace, "mig", "TargetReady")
    # virt-handler on the source, before memory copying starts: the device
    # must be in PRE_COPY (traps and dirty tracking on).
    _hook_until_ok(hook_sockets["node-a"], "node-a", "PreMigrationSource", vmi)
    kv.advance_to(namespace, "mig", "Running")
    # The domain runs on the target: KubeVirt completes only once the
    # target device is RUNNING (devmig's commit point).
    _hook_until_ok(hook_sockets["node-b"], "node-b", "PostMigrationTarget", vmi)
    kv.advance_to(namespace, "mig", "Succeeded")
    st = objects.wait_dm_final(kube, namespace, "vmim-mig")["status"]
    assert st["phase"] == "Succeeded", st
    d = st["devices"][0]
    # The device KubeVirt's target pod holds, not the free one.
    assert (d["sourceDevice"], d["targetDevice"]) == ("sim-node-a-0", "sim-node-b-0")
    assert (d["sourceState"], d["targetState"]) == ("STOP", "RUNNING")
    assert st["committed"] is True
    vm = co.get_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", "vm")
    assert vm["status"]["nodeName"] == "node-b"
