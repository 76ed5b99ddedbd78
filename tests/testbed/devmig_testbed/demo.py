"""The local demo (``make demo``): devmig's main job on an embedded default.

Everything real but the hardware: the control plane (etcd + kube-apiserver
built from Go modules), devmig's CRDs, the operator (kopf) and two node
agents ("node-a", "node-b") whose devices are the native core's simulated
migratable devices, each with a VMM stand-in on the agent's VMM socket.
A VMI on node-a holds one device, and its "VM" runs: the stand-in's vCPU
keeps hammering the device's BAR and programming its DMA into guest
memory, and its memory migration copies the guest memory and then the
pages the device dirtied. ``kubectl devmig migrate`` moves the device to
node-b, live, with a progress bar: pre-copy rounds while the device runs
(traps switched on through the VMM), stop-and-copy with the vCPU paused,
the target verified and RUNNING and its VMM resumed. A summary follows
(downtime, bytes, throughput, missed traps, the guest memory and the
device state compared), then everything is torn down.

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
import sys
import tempfile
import threading
import time
from typing import Any

from devmig_testbed import controlplane, objects, processes
from devmig_testbed.vmm_standin import GUEST_CHUNK, VmmStandIn

NODES = ("node-a", "node-b")
NS = "demo"


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


class MemoryMigration:
    """What the hypervisor's own memory migration does beside devmig's: a
    first copy of the whole guest memory, then, until the device stopped,
    the pages its DMA dirtied (the VMM's ``dirty`` pull), copied again."""

    def __init__(self, vmm: VmmStandIn) -> None:
        self.vmm = vmm
        self.pulls = 0
        self.pages = 0
        self.final = False
        self.error = ""
        self._stop = threading.Event()
        vmm.copy_guest()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.final:
            try:
                n, self.final = self.vmm.copy_dirty()
                self.pulls += 1
                self.pages += n
            except RuntimeError as e:  # NotMigrating: pre-copy has not begun
                self.error = str(e)
            # A pull every 100 ms: often enough to keep each bitmap small.
            self._stop.wait(0.1)

    def finish(self, timeout_s: float = 30) -> None:
        """Until the final pull (the device stopped for good), then stop."""
        self._thread.join(timeout_s)
        self._stop.set()
        self._thread.join(30)


def check(src: VmmStandIn, dst: VmmStandIn, mem: MemoryMigration) -> list[str]:
    """The summary's end-to-end lines (missed traps, guest memory, device
    state); raises AssertionError with the line that shows a difference."""
    s, d = src.sim_info(), dst.sim_info()
    guest = b"".join(
        src.guest(off, min(GUEST_CHUNK, len(src.memory) - off))
        for off in range(0, len(src.memory), GUEST_CHUNK)
    )
    lines = [
        f"missed traps:  {s['missed_traps']} (the vCPU's BAR accesses: {src.trapped} trapped, "
        f"{src.direct} through its mapping; DMA programmed {src.dma_programmed} times)",
        "guest memory:  the VMM's copy "
        + ("equals" if bytes(src.memory) == guest else "DIFFERS from")
        + f" the source's ({len(guest) >> 10} KiB; {mem.pages} dirty page(s) in "
        f"{mem.pulls} pull(s), the last one final: {mem.final})",
        "device state:  the target's "
        + ("equals" if s["mem_digest"] == d["mem_digest"] else "DIFFERS from")
        + f" the source's (digest {d['mem_digest']:#018x})",
    ]
    assert s["missed_traps"] == 0, lines[0]
    assert bytes(src.memory) == guest, lines[1]
    assert s["mem_digest"] == d["mem_digest"], lines[2]
    return lines


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
        f"throughput:    {sent / (1 << 20) / max(elapsed_s, 1e-3):.1f} MiB/s of device state, "
        "averaged over the whole migration (phases and polling included)",
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
    vmms: list[VmmStandIn] = []
    operator: processes.Drained | None = None
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
        socks = {n: str(workdir / n / "vmm.sock") for n in NODES}
        agents = [
            processes.start_agent(
                cp.admin_kubeconfig, "node-a", workdir, sim, {0: f"{NS}/vm-1"}, socks["node-a"]
            ),
            processes.start_agent(
                cp.admin_kubeconfig, "node-b", workdir, sim, None, socks["node-b"]
            ),
        ]
        processes.wait_inventories(api, agents)
        for a in agents:
            print(f"    agent {a.node} at {a.endpoint}: inventory published")
        say("starting the VMM stand-ins: on node-a a vCPU hammering the BAR and programming DMA")
        # The source VM runs: its vCPU keeps touching the device's BAR and
        # programming its DMA into guest memory. The target's waits paused.
        vmms = [
            VmmStandIn(socks["node-a"], "sim-node-a-0", hammer=True),
            VmmStandIn(socks["node-b"], "sim-node-b-0", start_paused=True),
        ]
        mem = MemoryMigration(vmms[0])
        print(f"    guest memory copied once ({len(vmms[0].memory) >> 10} KiB); dirty pages follow")
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
        # The VMM's final pull follows the commit; a failed migration has none.
        mem.finish(timeout_s=30 if rc == 0 else 0)
        say("summary")
        for line in summary(dm, elapsed):
            print(f"    {line}")
        if rc == 0:
            try:
                for line in check(vmms[0], vmms[1], mem):
                    print(f"    {line}")
            except AssertionError as e:
                print(f"    {e}")
                rc = 1
        if keep:
            say(f"cluster kept up: export KUBECONFIG={cp.admin_kubeconfig}; Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                agents[0].proc.wait()
        say("demo finished" if rc == 0 else "demo finished: the migration did not succeed")
        return rc
    finally:
        if operator is not None:
            operator.stop()
        for standin in vmms:
            standin.close()
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
