"""The agent serves mutual TLS: only clients with a certificate from the
installation's CA get in; without TLS it serves only on loopback."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from devmig.agent.v1alpha1 import agent_pb2, agent_pb2_grpc
from devmig_operator.agents import Agents
from devmig_testbed.pki import CA

SERVER_NAME = "devmig-agent.devmig-system.svc"


@pytest.fixture
def tls(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    ca = CA.create()
    return {
        "agent": ca.write_tls_dir(tmp_path / "agent", "devmig-agent", [SERVER_NAME]),
        "operator": ca.write_tls_dir(tmp_path / "operator", "devmig-operator", []),
        "stranger": CA.create("other-ca").write_tls_dir(tmp_path / "x", "devmig-operator", []),
    }


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(
        # Listing devices only: no session manager, so no journal to write.
        [
            sys.executable,
            "-m",
            "devmig_agent.main",
            "--node-name",
            "n1",
            "--vfio-discovery",
            "list",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    m = re.fullmatch(r"LISTENING (\S+)\n", line)
    return p, (m.group(1) if m else "")


@pytest.fixture
def tls_agent(tls: dict[str, pathlib.Path]) -> Iterator[str]:
    p, addr = start("--listen", "127.0.0.1:0", "--tls-dir", str(tls["agent"]))
    assert addr, "agent with TLS did not start"
    yield addr
    p.terminate()
    p.wait(timeout=15)


def _handshake(addr: str, creds: grpc.ChannelCredentials) -> agent_pb2.GetVersionResponse:
    opts = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with grpc.secure_channel(addr, creds, options=opts) as ch:
        stub = agent_pb2_grpc.NodeAgentStub(ch)
        return stub.GetVersion(agent_pb2.GetVersionRequest(), timeout=10)


def _creds(d: pathlib.Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (d / "ca.crt").read_bytes(), (d / "tls.key").read_bytes(), (d / "tls.crt").read_bytes()
    )


def test_a_client_with_a_certificate_from_the_ca_gets_in(
    tls: dict[str, pathlib.Path], tls_agent: str
) -> None:
    assert _handshake(tls_agent, _creds(tls["operator"])).node_name == "n1"


def test_the_operators_client_speaks_mutual_tls(
    tls: dict[str, pathlib.Path], tls_agent: str
) -> None:
    from devmig_operator.agents import tls_credentials

    a = Agents(tls_credentials(str(tls["operator"])), SERVER_NAME).get("n1", tls_agent)
    assert a.versions.node_name == "n1"


def test_a_client_without_a_certificate_is_refused(
    tls: dict[str, pathlib.Path], tls_agent: str
) -> None:
    creds = grpc.ssl_channel_credentials((tls["agent"] / "ca.crt").read_bytes())
    with pytest.raises(grpc.RpcError) as e:
        _handshake(tls_agent, creds)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(
    tls: dict[str, pathlib.Path], tls_agent: str
) -> None:
    # The client trusts the agent, but its own certificate is foreign.
    creds = grpc.ssl_channel_credentials(
        (tls["agent"] / "ca.crt").read_bytes(),
        (tls["stranger"] / "tls.key").read_bytes(),
        (tls["stranger"] / "tls.crt").read_bytes(),
    )
    with pytest.raises(grpc.RpcError) as e:
        _handshake(tls_agent, creds)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_without_tls_the_agent_refuses_a_non_loopback_address() -> None:
    p, addr = start("--listen", "0.0.0.0:0")
    assert p.wait(timeout=30) == 2 and addr == ""
    assert p.stderr is not None and "refusing to serve without TLS" in p.stderr.read()


def test_a_missing_tls_directory_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    p, _ = start("--listen", "127.0.0.1:0", "--tls-dir", str(tmp_path / "nope"))
    assert p.wait(timeout=30) == 1
    assert p.stderr is not None and "cannot read" in p.stderr.read()


def test_only_the_operators_certificate_drives_sessions(
    tls: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    p, addr = start(
        "--listen", "127.0.0.1:0", "--tls-dir", str(tls["agent"]),
        "--sim", "count=1,size=1MiB", "--state-dir", str(tmp_path / "state"),
        "--operator-identity", "devmig-operator",
    )  # fmt: skip
    assert addr, "agent did not start"
    opts = [("grpc.ssl_target_name_override", SERVER_NAME)]
    req = agent_pb2.PrepareSourceRequest(
        session=agent_pb2.SessionRef(session_id="s", token="t"), device_id="nope"
    )
    try:
        # A peer agent's certificate: from the same CA, but not the operator.
        with grpc.secure_channel(addr, _creds(tls["agent"]), options=opts) as ch:
            stub = agent_pb2_grpc.NodeAgentStub(ch)
            assert stub.GetVersion(agent_pb2.GetVersionRequest(), timeout=10).node_name == "n1"
            with pytest.raises(grpc.RpcError) as e:
                stub.PrepareSource(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (e.value.details() or "").startswith("NotOperator")
        # The operator's gets past the check (and meets the unknown device).
        with grpc.secure_channel(addr, _creds(tls["operator"]), options=opts) as ch:
            stub = agent_pb2_grpc.NodeAgentStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.PrepareSource(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    finally:
        p.terminate()
        p.wait(timeout=15)
