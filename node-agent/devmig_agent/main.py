"""``devmig-agent``: run the node agent's gRPC server."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from concurrent import futures

import grpc

from devmig_agent import security, server

log = logging.getLogger("devmig_agent")

# Worker threads for unary RPCs; streaming RPCs hold a thread each, and a
# node runs a handful of sessions at most, so 16 leaves ample headroom.
MAX_WORKERS = 16


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
        "--insecure",
        action="store_true",
        help="serve without TLS on a non-loopback address (never in production)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS))
    server.add_to_server(srv, a.node_name)
    host = a.listen.rsplit(":", 1)[0]
    if a.tls_dir:
        try:
            creds = security.TlsFiles.load(a.tls_dir).server_credentials()
        except security.TlsConfigError as e:
            log.error("%s", e)
            return 1
        port = srv.add_secure_port(a.listen, creds)
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
    # The first stdout line is machine-readable so launchers can find the port.
    print(f"LISTENING {host}:{port}", flush=True)
    log.info("agent for node %s serving on %s:%d", a.node_name, host, port)
    signal.signal(signal.SIGTERM, lambda *_: srv.stop(grace=5))
    srv.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
