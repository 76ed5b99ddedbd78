"""``devmig-agent``: run the node agent's gRPC server."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import socket
import sys
import threading
from concurrent import futures
from typing import Any

import grpc

from devmig_agent import datapath, devices, inventory, journal, security, server, sessions

log = logging.getLogger("devmig_agent")

# Worker threads for unary RPCs; streaming RPCs hold a thread each, and a
# node runs a handful of sessions at most, so 16 leaves ample headroom.
MAX_WORKERS = 16


def kube_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(client.ApiClient())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="devmig-agent", description="devmig node agent")
    p.add_argument(
        "--listen", default="127.0.0.1:0", help="host:port for gRPC (default: %(default)s)"
    )
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", socket.gethostname()))
    p.add_argument(
        "--tls-dir",
        default=os.environ.get("DEVMIG_TLS_DIR", ""),
        help="directory with ca.crt, tls.crt, tls.key for mutual TLS (env DEVMIG_TLS_DIR)",
    )
    p.add_argument(
        "--sim",
        default=os.environ.get("DEVMIG_SIM", ""),
        metavar="SPEC",
        help="serve simulated devices, e.g. count=2,size=64MiB,dirty=16 (env DEVMIG_SIM)",
    )
    p.add_argument(
        "--sim-holder",
        action="append",
        default=[],
        metavar="N=NAMESPACE/VMI",
        help="simulated device N is held by that VMI (no kubelet tells us on a lab node)",
    )
    p.add_argument(
        "--publish-inventory",
        action="store_true",
        # In a pod the kubelet mounts a ServiceAccount token here.
        default=os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        help="publish this node's NodeDeviceInventory (default: when running in a cluster; "
        "uses the in-cluster config or KUBECONFIG)",
    )
    p.add_argument(
        "--state-dir",
        default=os.environ.get("DEVMIG_STATE_DIR", "/var/lib/devmig"),
        help="where the session journal lives (env DEVMIG_STATE_DIR; default %(default)s)",
    )
    p.add_argument(
        "--data-listen",
        default="",
        help="host:port for device-state streams from peer agents "
        "(default: the gRPC host, port from DEVMIG_DATA_PORT or any free one)",
    )
    p.add_argument(
        "--advertise-host",
        default=os.environ.get("POD_IP", ""),
        help="address peers and the operator use to reach this agent (env POD_IP)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve without TLS on a non-loopback address (never in production)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS))
    host = a.listen.rsplit(":", 1)[0]
    tls = None
    if a.tls_dir:
        try:
            tls = security.TlsFiles.load(a.tls_dir)
        except security.TlsConfigError as e:
            log.error("%s", e)
            return 1
    registry, sessions_ = None, None
    if a.sim:
        try:
            spec = devices.SimSpec.parse(a.sim)
        except ValueError as e:
            log.error("--sim: %s", e)
            return 2
        registry = devices.simulated(a.node_name, spec)
        for h in a.sim_holder:
            idx, _, vmi = h.partition("=")
            try:
                registry.set_holder(f"sim-{a.node_name}-{int(idx)}", vmi)
            except (ValueError, devices.UnknownDevice) as e:
                log.error("--sim-holder %s: %s", h, e)
                return 2
        j = journal.Journal(pathlib.Path(a.state_dir) / "sessions")
        try:
            j.directory.mkdir(parents=True, exist_ok=True)
            j.load()
        except OSError as e:
            log.error("cannot use the session journal in %s: %s", j.directory, e)
            return 1
        data_host, _, data_port = (
            a.data_listen or f"{host}:{os.environ.get('DEVMIG_DATA_PORT', '0')}"
        ).rpartition(":")
        manager: list[sessions.SessionManager] = []
        dp = datapath.DataPath(
            data_host,
            int(data_port),
            lambda s, e: manager[0].on_transfer_done(s, e),
            tls,
            a.advertise_host or data_host,
        )
        manager.append(sessions.SessionManager(registry, j, dp))
        sessions_ = manager[0]
        log.info("%d simulated device(s); device state accepted on %s", spec.count, dp.advertise)
    server.add_to_server(srv, a.node_name, registry, sessions_)
    if tls is not None:
        port = srv.add_secure_port(a.listen, tls.server_credentials())
    elif security.is_loopback(host) or a.insecure:
        port = srv.add_insecure_port(a.listen)
    else:
        log.error(
            "refusing to serve without TLS on %s: pass --tls-dir (or --insecure for a lab)",
            a.listen,
        )
        return 2
    if port == 0:
        log.error("cannot listen on %s", a.listen)
        return 1
    srv.start()
    stop = threading.Event()
    if a.publish_inventory:
        adv = f"{a.advertise_host or host}:{port}"
        pub = inventory.InventoryPublisher(
            kube_api(),
            a.node_name,
            (registry or devices.DeviceRegistry([])).inventory,
            agent_endpoint=adv,
        )
        threading.Thread(target=pub.run, args=(stop,), daemon=True, name="inventory").start()
    # The first stdout line is machine-readable so launchers can find the port.
    print(f"LISTENING {host}:{port}", flush=True)
    log.info("agent for node %s serving on %s:%d", a.node_name, host, port)

    def terminate(*_: object) -> None:
        stop.set()
        srv.stop(grace=5)

    signal.signal(signal.SIGTERM, terminate)
    srv.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
