"""The agent's grpc.health.v1 service: SERVING once it is up, for the whole
agent and for the NodeAgent service by name; NOT_SERVING, pushed to
watchers, the moment a shutdown begins."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devmig_agent import health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def test_the_status_follows_the_agent_and_shutdown_is_final() -> None:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    h = health.AgentHealth()
    h.add_to(srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert _check(stub, "") == NOT_SERVING  # until the agent says so
            h.serving()
            assert _check(stub, "") == SERVING
            assert _check(stub, health.AGENT_SERVICE) == SERVING
            try:
                _check(stub, "no.such.Service")
                raise AssertionError("an unknown service must be NOT_FOUND")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
            h.shutting_down()
            h.serving()  # ignored once shutting down
            assert _check(stub, "") == NOT_SERVING
            assert _check(stub, health.AGENT_SERVICE) == NOT_SERVING
    finally:
        srv.stop(None)


def test_a_running_agent_serves_health_and_tells_watchers_when_it_stops(
    tmp_path: pathlib.Path,
) -> None:
    args = [
        sys.executable, "-m", "devmig_agent.main",
        "--listen", "127.0.0.1:0",
        "--node-name", "node-h",
        "--sim", "count=1,size=1MiB",
        "--state-dir", str(tmp_path),
    ]  # fmt: skip
    p = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        while line and not line.startswith("LISTENING"):
            line = p.stdout.readline()
        assert line.startswith("LISTENING"), "the agent did not start"
        addr = line.split()[1]
        with grpc.insecure_channel(addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert _check(stub, "") == SERVING
            assert _check(stub, health.AGENT_SERVICE) == SERVING
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(watch).status == SERVING
            p.send_signal(signal.SIGTERM)
            seen = []
            try:
                for msg in watch:
                    seen.append(msg.status)
                    if msg.status == NOT_SERVING:
                        break
            except grpc.RpcError:
                pass  # the server may end the stream once it stopped
            assert NOT_SERVING in seen, f"watch saw {seen} after SIGTERM"
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
