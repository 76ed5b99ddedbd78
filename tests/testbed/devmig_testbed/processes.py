"""devmig's own processes, started for tests and the demo: node agents with
simulated devices and the operator, against a control plane."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

from kubernetes import client, watch


class Drained:
    """A child process whose output (stdout, with stderr merged into it) a
    thread reads as it comes, so a full pipe never stalls the child; the
    last lines are kept for logs and assertions."""

    def __init__(self, p: subprocess.Popen[str], keep_lines: int = 5000) -> None:
        self.p = p
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def rss(self) -> int:
        """Resident memory now, bytes (0 once gone)."""
        with open(f"/proc/{self.p.pid}/status") as f:
            m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else 0

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@dataclasses.dataclass
class AgentProcess:
    """A running agent. Its output is read by a thread from the start
    (``output``): an agent whose pipe nobody read would block on its next
    log line once 64 KiB had piled up, in the middle of a test."""

    node: str
    proc: subprocess.Popen[str]
    endpoint: str
    output: Drained

    def stop(self) -> str:
        """Terminate; returns the tail of its log."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.output.log()[-3000:]


def start_agent(
    kubeconfig: pathlib.Path,
    node: str,
    state_dir: pathlib.Path,
    sim: str = "count=1,size=8MiB,dirty=16",
    holders: dict[int, str] | None = None,
    vmm_socket: str = "",
    extra_args: list[str] | None = None,
) -> AgentProcess:
    """A node agent on a free loopback port with simulated devices,
    publishing its NodeDeviceInventory. ``holders``: device index ->
    namespace/vmi holding it; ``vmm_socket``: serve the VMM contract
    there."""
    args = [
        sys.executable, "-m", "devmig_agent.main",
        "--listen", "127.0.0.1:0",
        "--node-name", node,
        "--sim", sim,
        "--state-dir", str(state_dir / node),
        "--publish-inventory",
        # Simulated devices only: never the machine's own VFIO devices.
        "--vfio-discovery", "off",
    ]  # fmt: skip
    for i, vmi in (holders or {}).items():
        args += ["--sim-holder", f"{i}={vmi}"]
    if vmm_socket:
        args += ["--vmm-socket", vmm_socket]
    args += extra_args or []
    p = subprocess.Popen(
        args,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    while line and not line.startswith("LISTENING"):
        line = p.stdout.readline()
    m = re.fullmatch(r"LISTENING (127\.0\.0\.1:\d+)\n", line)
    if not m:
        p.kill()
        raise RuntimeError(f"agent {node} did not start: {line!r}")
    return AgentProcess(node, p, m.group(1), Drained(p))


def wait_inventories(api: Any, agents: list[AgentProcess], timeout_s: int = 60) -> None:
    """Until every agent's NodeDeviceInventory names that agent's endpoint
    (an inventory of the same node left from before names a dead one)."""
    wait_endpoints(api, {a.node: a.endpoint for a in agents}, timeout_s)


def wait_endpoints(api: Any, endpoints: dict[str, str], timeout_s: int = 60) -> None:
    """Until each node's NodeDeviceInventory names the agent endpoint given
    for it."""
    want = dict(endpoints)
    w = watch.Watch()
    for ev in w.stream(
        client.CustomObjectsApi(api).list_cluster_custom_object,
        "devmig.io",
        "v1alpha1",
        "nodedeviceinventories",
        timeout_seconds=timeout_s,
    ):
        o = ev["object"]
        node = o["spec"]["nodeName"]
        if want.get(node) and (o.get("status") or {}).get("agentEndpoint") == want[node]:
            del want[node]
        if not want:
            w.stop()
            return
    raise RuntimeError(f"no inventory published by the agents of {sorted(want)}")


def start_operator(
    kubeconfig: pathlib.Path,
    namespace: str,
    metrics_port: int,
    watch_namespace: str = "",
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> Drained:
    args = [
        sys.executable, "-m", "devmig_operator",
        "--liveness", "",
        "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    if watch_namespace:
        args += ["--namespace", watch_namespace]
    args += extra_args or []
    # Read from the start (Drained): kopf logs every event, and an operator
    # whose pipe filled would stall mid-test.
    return Drained(
        subprocess.Popen(
            args,
            env={
                **os.environ,
                "KUBECONFIG": str(kubeconfig),
                "DEVMIG_NAMESPACE": namespace,
                **(env or {}),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )


@contextlib.contextmanager
def two_nodes(
    api: Any,
    kubeconfig: pathlib.Path,
    state_dir: pathlib.Path,
    sim: str,
    source_holders: dict[int, str],
) -> Iterator[list[AgentProcess]]:
    """Nodes node-a and node-b, each with an agent serving simulated devices
    (``sim``); ``source_holders`` says which VMI holds which of node-a's
    devices. Waits until both inventories are published; stops the agents
    at the end and prints their logs."""
    from devmig_testbed import objects

    for n in ("node-a", "node-b"):
        objects.create_node(api, n)
    agents = [
        start_agent(kubeconfig, "node-a", state_dir, sim, source_holders),
        start_agent(kubeconfig, "node-b", state_dir, sim),
    ]
    try:
        wait_inventories(api, agents)
        yield agents
    finally:
        for a in agents:
            print(a.stop())
