"""The ``devmig-agent`` process as the chart runs it: the environment it
reads, the hook socket it serves, SIGTERM that settles every session, and a
restart (after SIGTERM or SIGKILL) that answers for the journal's sessions."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from kubevirt.hooks.plugins.v1alpha1 import api_pb2, api_pb2_grpc

from devmig.agent.v1alpha1 import agent_pb2 as pb
from devmig.agent.v1alpha1 import agent_pb2_grpc
from devmig_agent import datapath, devices, journal, sessions, vmm

REF = pb.SessionRef(session_id="dm-p-0", token="process-token")


class AgentProcess:
    def __init__(self, state: pathlib.Path, env: dict[str, str], *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devmig_agent.main",
                "--listen",
                "127.0.0.1:0",
                "--node-name",
                "p",
                "--sim",
                "count=1,size=1MiB,dirty=16",
                "--sim-holder",
                "0=vms/db",
                "--state-dir",
                str(state),
                *extra,
            ],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        m = re.fullmatch(r"LISTENING (127\.0\.0\.1:\d+)\n", self.proc.stdout.readline())
        assert m, self.proc.stderr.read() if self.proc.stderr else "no output"
        self.channel = grpc.insecure_channel(m.group(1))
        self.stub = agent_pb2_grpc.NodeAgentStub(self.channel)

    def stop(self, sig: int) -> tuple[int, str]:
        self.channel.close()
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@pytest.fixture
def short_dir() -> Iterator[pathlib.Path]:
    # Unix socket paths are limited to 108 bytes; tmp_path can exceed it.
    d = tempfile.mkdtemp(prefix="dm-ap-")
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def target(tmp_path: pathlib.Path) -> Iterator[sessions.SessionManager]:
    """An in-process target agent the process streams to."""
    reg = devices.simulated("t", devices.SimSpec(count=1, size=1 << 20))
    j = journal.Journal(tmp_path / "target")
    j.load()
    holder: list[sessions.SessionManager] = []
    dp = datapath.DataPath("127.0.0.1", 0, lambda s, e: holder[0].on_transfer_done(s, e))
    holder.append(sessions.SessionManager(reg, j, dp))
    yield holder[0]
    dp.shutdown()


def hook(path: pathlib.Path, annotations: dict[str, str]) -> None:
    vmi = {"metadata": {"name": "db", "namespace": "vms", "uid": "u1", "annotations": annotations}}
    with grpc.insecure_channel(f"unix://{path}") as ch:
        api_pb2_grpc.NodeHookServiceStub(ch).ExecuteNodeHook(
            api_pb2.ExecuteNodeHookRequest(
                hookPoint="PreMigrationSource", vmi=json.dumps(vmi).encode()
            ),
            timeout=30,
        )


def into_pre_copy(agent: AgentProcess, target: sessions.SessionManager) -> None:
    agent.stub.PrepareSource(pb.PrepareSourceRequest(session=REF, device_id="sim-p-0"), timeout=10)
    endpoint = target.prepare_target(REF.session_id, REF.token, "sim-t-0").data_endpoint
    st = agent.stub.StartPreCopy(
        pb.StartPreCopyRequest(session=REF, target_data_endpoint=endpoint), timeout=10
    ).status
    assert st.phase == pb.SESSION_PHASE_PRE_COPY


def record(state: pathlib.Path) -> dict[str, str]:
    data = json.loads((state / "sessions" / f"{REF.session_id}.json").read_text())
    return {k: data[k] for k in ("phase", "reason", "deviceState")}


def test_sigterm_rolls_back_the_session_in_flight_and_a_restart_reports_it(
    short_dir: pathlib.Path, target: sessions.SessionManager
) -> None:
    state = short_dir / "state"
    sock = short_dir / "hooks" / "devmig.sock"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "DEVMIG_HOOK_SOCKET": str(sock),
        "DEVMIG_LOG_LEVEL": "warning",
        "DEVMIG_METRICS_PORT": str(port),
    }
    agent = AgentProcess(state, env, "--vmm-socket", str(short_dir / "vmm.sock"))
    # The hook socket serves: a VMI that is not devmig's is answered at once.
    hook(sock, {})
    # So does the VMM socket (asked about a device it does not have, so no
    # VMM stays registered for the migration below).
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(short_dir / "vmm.sock"))
        vmm.send_line(s, {"op": "register", "id": 1, "device": "sim-p-9"})
        reply = vmm.LineReader(s).read()
        assert reply is not None and reply["reason"] == "UnknownDevice"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert 'devmig_agent_up{node="p"} 1.0' in r.read().decode()
    into_pre_copy(agent, target)
    code, err = agent.stop(signal.SIGTERM)
    assert code == 0, err
    # DEVMIG_LOG_LEVEL=warning: the warnings, none of the INFO lines.
    assert "settled at shutdown" in err and " INFO " not in err
    assert record(state) == {
        "phase": "ABORTED",
        "reason": "AgentShutdown",
        "deviceState": "RUNNING",
    }
    env.pop("DEVMIG_METRICS_PORT")
    again = AgentProcess(state, env)
    st = again.stub.GetSession(pb.GetSessionRequest(session=REF), timeout=10).status
    assert (st.phase, st.reason) == (pb.SESSION_PHASE_ABORTED, "AgentShutdown")
    with pytest.raises(grpc.RpcError) as e:
        again.stub.GetSession(
            pb.GetSessionRequest(session=pb.SessionRef(session_id=REF.session_id, token="x")),
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert again.stop(signal.SIGTERM)[0] == 0


def test_after_sigkill_a_simulated_device_is_reported_reset(
    short_dir: pathlib.Path, target: sessions.SessionManager
) -> None:
    state = short_dir / "state"
    agent = AgentProcess(state, {})
    into_pre_copy(agent, target)
    agent.stop(signal.SIGKILL)
    assert record(state)["phase"] == "PRE_COPY"  # what the killed process left
    again = AgentProcess(state, {})
    st = again.stub.GetSession(pb.GetSessionRequest(session=REF), timeout=10).status
    assert (st.phase, st.reason) == (pb.SESSION_PHASE_FAILED, "DeviceReset")
    # The operator's Abort settles it for good.
    again.stub.Abort(pb.AbortRequest(session=REF, reason="rollback"), timeout=10)
    assert again.stop(signal.SIGTERM)[0] == 0
    assert record(state)["phase"] == "ABORTED"
