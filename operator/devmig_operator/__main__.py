"""``python -m devmig_operator``: run the operator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import kopf
import prometheus_client

from devmig_operator import handlers  # registers the handlers


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
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    handlers.MAX_MIGRATIONS_PER_NODE = a.max_migrations_per_node
    if a.metrics_port:
        prometheus_client.start_http_server(a.metrics_port)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
