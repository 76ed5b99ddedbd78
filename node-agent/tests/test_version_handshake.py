"""The agent answers the version handshake over a real gRPC server on loopback."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

import devmig_agent
import devmig_native
from devmig.agent.v1alpha1 import agent_pb2, agent_pb2_grpc
from devmig_agent import server


@pytest.fixture
def stub() -> Iterator[agent_pb2_grpc.NodeAgentStub]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_to_server(srv, "node-a")
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield agent_pb2_grpc.NodeAgentStub(ch)
    srv.stop(grace=None)


def test_the_handshake_names_the_served_api_and_component_versions(
    stub: agent_pb2_grpc.NodeAgentStub,
) -> None:
    r = stub.GetVersion(agent_pb2.GetVersionRequest(api_version="v1alpha1"), timeout=10)
    assert list(r.api_versions) == ["v1alpha1"]
    assert r.agent_version == devmig_agent.__version__
    assert r.native_version == devmig_native.version()
    assert r.node_name == "node-a"


def test_an_empty_api_version_asks_what_the_agent_serves(
    stub: agent_pb2_grpc.NodeAgentStub,
) -> None:
    assert "v1alpha1" in stub.GetVersion(agent_pb2.GetVersionRequest(), timeout=10).api_versions


def test_an_unknown_api_version_is_refused_with_failed_precondition(
    stub: agent_pb2_grpc.NodeAgentStub,
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.GetVersion(agent_pb2.GetVersionRequest(api_version="v9"), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details().startswith("UnsupportedApiVersion:")


def test_the_agent_command_serves_the_handshake_until_terminated() -> None:
    proc = subprocess.Popen(
        # Listing devices only: no session manager, so no journal to write.
        [
            sys.executable,
            "-m",
            "devmig_agent.main",
            "--listen",
            "127.0.0.1:0",
            "--node-name",
            "n1",
            "--vfio-discovery",
            "list",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        m = re.fullmatch(r"LISTENING (127\.0\.0\.1:\d+)\n", proc.stdout.readline())
        assert m, "agent did not print its address"
        with grpc.insecure_channel(m.group(1)) as ch:
            r = agent_pb2_grpc.NodeAgentStub(ch).GetVersion(
                agent_pb2.GetVersionRequest(), timeout=10
            )
        assert r.node_name == "n1"
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
