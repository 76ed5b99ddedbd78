"""The ``devmig-agent`` process as the chart runs it: the environment it
reads, the hook socket it serves, SIGTERM that settles every session, and a
restart (after SIGTERM or SIGKILL) that answers for the journal's sessions."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import grpc
import local_agent
import pytest
from kubevirt.hooks.plugins.v1alpha1 import api_pb2, api_pb2_grpc

from devmig.agent.v1alpha1 import agent_pb2 as pb
from devmig.agent.v1alpha1 import agent_pb2_grpc
from devmig_agent import devices, security, sessions, vmm
from devmig_native import MigState
from devmig_testbed.pki import CA

REF = pb.SessionRef(session_id="dm-p-0", token="process-token")


class AgentProcess:
    def __init__(
        self,
        state: pathlib.Path,
        env: dict[str, str],
        *extra: str,
        tls_ca: pathlib.Path | None = None,
    ) -> None:
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
        if tls_ca is None:
            self.channel = grpc.insecure_channel(m.group(1))
        else:  # the directory's certificate serves as the client's too
            creds = grpc.ssl_channel_credentials(
                (tls_ca / "ca.crt").read_bytes(),
                (tls_ca / "tls.key").read_bytes(),
                (tls_ca / "tls.crt").read_bytes(),
            )
            self.channel = grpc.secure_channel(
                m.group(1), creds, options=[("grpc.ssl_target_name_override", "localhost")]
            )
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
    manager, dp = local_agent.wire(reg, tmp_path / "target")
    yield manager
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


@pytest.fixture
def source(
    tmp_path: pathlib.Path,
) -> Iterator[tuple[devices.DeviceRegistry, sessions.SessionManager]]:
    """An in-process source agent streaming to the process."""
    reg = devices.simulated("s", devices.SimSpec(count=1, size=32 << 20))
    manager, dp = local_agent.wire(reg, tmp_path / "source")
    yield reg, manager
    dp.shutdown()


def test_a_target_killed_mid_stream_leaves_the_source_running_and_reports_its_device_reset(
    short_dir: pathlib.Path,
    source: tuple[devices.DeviceRegistry, sessions.SessionManager],
) -> None:
    reg, src = source
    state = short_dir / "state"
    # The target process holds a 32 MiB device; the source streams at
    # 4 MiB/s, so the stream is in flight for seconds when the target dies.
    target = AgentProcess(state, {}, "--sim", "count=1,size=32MiB")
    pt = target.stub.PrepareTarget(
        pb.PrepareTargetRequest(session=REF, device_id="sim-p-0"), timeout=10
    )
    src.prepare_source(REF.session_id, REF.token, "sim-s-0", 4 << 20)
    src.start_pre_copy(REF.session_id, REF.token, pt.data_endpoint)
    for _ in range(1000):  # progress is polled: it changes no session state
        if src.get(REF.session_id, REF.token).progress.bytes_sent > 1 << 20:
            break
        time.sleep(0.01)
    got = src.get(REF.session_id, REF.token).progress.bytes_sent < 32 << 20
    assert got, "the stream ended before the target died"
    assert record(state) == {"phase": "PREPARED", "reason": "", "deviceState": "RESUMING"}
    target.stop(signal.SIGKILL)
    # The source sees the connection die: its session fails, its device runs.
    failed = src.wait_until(
        lambda: s if (s := src.get(REF.session_id, REF.token)).phase.final else None, 30
    )
    assert failed is not None, src.get(REF.session_id, REF.token)
    assert (failed.phase, failed.reason) == (
        sessions.Phase.FAILED,
        "SendFailed",
    )
    assert reg.get("sim-s-0").handle.state is MigState.RUNNING
    # The restarted target answers for the session: its device's state died
    # with the process, so nothing of the stream can ever run there.
    again = AgentProcess(state, {}, "--sim", "count=1,size=32MiB")
    st = again.stub.GetSession(pb.GetSessionRequest(session=REF), timeout=10).status
    assert (st.phase, st.reason) == (pb.SESSION_PHASE_FAILED, "DeviceReset")
    with pytest.raises(grpc.RpcError) as e:
        again.stub.Resume(pb.ResumeRequest(session=REF), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The operator's Abort settles both ends: the device runs on the source only.
    again.stub.Abort(pb.AbortRequest(session=REF, reason="target died"), timeout=10)
    src.abort(REF.session_id, REF.token, "target died")
    assert reg.get("sim-s-0").handle.state is MigState.RUNNING
    assert again.stop(signal.SIGTERM)[0] == 0
    assert record(state)["phase"] == "ABORTED"


@pytest.mark.parametrize(
    ("tls", "seal"),
    [(False, "on"), (True, "on"), (True, "off")],
    ids=["plain", "tls", "tls-seal-off"],
)
def test_a_target_that_dies_while_the_source_idles_between_rounds_is_noticed(
    short_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    tls: bool,
    seal: str,
) -> None:
    caplog.set_level(logging.INFO, logger="devmig_agent.datapath")
    files = None
    d: pathlib.Path | None = None
    extra: list[str] = ["--sim", "count=1,size=1MiB", "--data-seal", seal]
    if tls:
        d = CA.create().write_tls_dir(tmp_path / "tls", "devmig-agent", ["localhost"])
        files = security.TlsFiles.load(str(d))
        extra += ["--tls-dir", str(d)]
    reg = devices.simulated("s", devices.SimSpec(count=1, size=1 << 20))
    src, dp = local_agent.wire(reg, tmp_path / "source", files)
    target = AgentProcess(short_dir / "state", {}, *extra, tls_ca=d)
    try:
        pt = target.stub.PrepareTarget(
            pb.PrepareTargetRequest(session=REF, device_id="sim-p-0"), timeout=10
        )
        src.prepare_source(REF.session_id, REF.token, "sim-s-0", 0)
        src.start_pre_copy(REF.session_id, REF.token, pt.data_endpoint)
        # Nothing dirties the source: after its first round it sends nothing.
        for _ in range(1000):
            if src.get(REF.session_id, REF.token).progress.pre_copy_iterations >= 2:
                break
            time.sleep(0.01)
        target.stop(signal.SIGKILL)
        failed = src.wait_until(
            lambda: s if (s := src.get(REF.session_id, REF.token)).phase.final else None, 10
        )
        assert failed is not None, src.get(REF.session_id, REF.token)
        assert (failed.phase, failed.reason) == (sessions.Phase.FAILED, "SendFailed")
        assert reg.get("sim-s-0").handle.state is MigState.RUNNING
        # The target process's --data-seal decided the data path.
        how = "plain" if not tls else "sealed" if seal == "on" and dp.seal else "tls relay"
        assert any(m.endswith(f"({how})") and "sending to" in m for m in caplog.messages)
    finally:
        dp.shutdown()
