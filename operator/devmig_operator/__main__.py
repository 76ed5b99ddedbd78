"""``python -m devmig_operator``: run the operator."""

from __future__ import annotations

import argparse
import asyncio
import http.server
import logging
import os
import socket
import sys
import threading
import time
import urllib.parse
import uuid

import kopf
import prometheus_client

from devmig_operator import (
    handlers,  # registers the handlers
    leader,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="devmig-operator", description="devmig operator")
    p.add_argument(
        "--liveness",
        default="http://0.0.0.0:8081/healthz",
        help="liveness endpoint URL (default: %(default)s); empty to disable",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="port for Prometheus /metrics (default: %(default)s); 0 to disable",
    )
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: the whole cluster",
    )
    p.add_argument(
        "--max-migrations-per-node",
        type=int,
        default=handlers.MAX_MIGRATIONS_PER_NODE,
        help="most migrations one node may receive at once; 0: no limit (default: %(default)s)",
    )
    p.add_argument(
        "--leader-election",
        default=os.environ.get("DEVMIG_LEADER_ELECTION", ""),
        metavar="LEASE",
        help="elect the one replica that acts through this Lease in DEVMIG_NAMESPACE "
        "(leader.py); empty: no election, run one replica (env DEVMIG_LEADER_ELECTION)",
    )
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    handlers.MAX_MIGRATIONS_PER_NODE = a.max_migrations_per_node
    if a.metrics_port:
        prometheus_client.start_http_server(a.metrics_port)
    elector = lead(a.leader_election, a.liveness) if a.leader_election else None
    asyncio.run(
        kopf.operator(
            clusterwide=not a.namespace,
            namespaces=a.namespace,
            # One active operator: a second replica waits (kopf peering needs
            # its peering CRD; standalone keeps the install CRD-minimal).
            standalone=True,
            liveness_endpoint=a.liveness or None,
        )
    )
    if elector is not None:
        elector.release()
    return 0


def lead(lease: str, liveness: str) -> leader.LeaderElection:
    """Block until this replica leads, answering liveness probes meanwhile
    (a follower is alive); then keep renewing in the background, and exit
    the process at once should leadership be lost: another replica may be
    acting already."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    elector = leader.LeaderElection(client.CoordinationV1Api(), handlers.NAMESPACE, lease, identity)
    log = logging.getLogger("devmig_operator")
    probe = _liveness_server(liveness)
    try:
        if not elector.try_acquire_or_renew():
            log.info("leader election: %s waits for Lease %s", identity, lease)
            while not elector.try_acquire_or_renew():
                time.sleep(leader.RETRY_S)
    finally:
        if probe is not None:
            probe.shutdown()
            probe.server_close()  # kopf serves liveness from now on

    def renew() -> None:
        while True:
            time.sleep(leader.RENEW_S)
            if not elector.try_acquire_or_renew() and elector.lost():
                log.error("leader election: %s lost Lease %s; stopping", identity, lease)
                os._exit(1)  # kopf would go on acting; a restart makes this a follower

    threading.Thread(target=renew, daemon=True, name="leader-renew").start()
    return elector


def _liveness_server(url: str) -> http.server.ThreadingHTTPServer | None:
    if not url:
        return None
    u = urllib.parse.urlsplit(url)

    class Alive(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == u.path else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer((u.hostname or "0.0.0.0", u.port or 80), Alive)
    threading.Thread(target=srv.serve_forever, daemon=True, name="follower-liveness").start()
    return srv


if __name__ == "__main__":
    sys.exit(main())
