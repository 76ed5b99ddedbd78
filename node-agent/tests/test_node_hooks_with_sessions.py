"""KubeVirt's migration hooks, served on real Unix sockets by two agents,
wait for the agents' real sessions as the operator drives them: the target
hook for a prepared target, the source hook for pre-copy, the post hook for
the target device running; a rollback answers ABORTED."""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from kubevirt.hooks.plugins.v1alpha1 import api_pb2, api_pb2_grpc

from devmig_agent import datapath, devices, hooks_kubevirt, hooks_sessions, journal
from devmig_agent.hooks_kubevirt import HookVmi
from devmig_agent.sessions import Phase, SessionManager

SID, TOKEN = "dm-h-0", "hook-token"
VMI = "vms/db"


@dataclass
class Node:
    name: str
    registry: devices.DeviceRegistry
    manager: SessionManager
    data: datapath.DataPath
    hooks: hooks_sessions.SessionHooks
    server: grpc.Server
    socket: str
    entered: threading.Event

    @property
    def device(self) -> str:
        return f"sim-{self.name}-0"


def start(name: str, state: pathlib.Path, sock_dir: str) -> Node:
    reg = devices.simulated(name, devices.SimSpec(count=2, size=1 << 20, dirty=16))
    # The kubelet says the VMI's pod holds device 0 (on the target: the
    # target pod, which belongs to the same VMI).
    reg.set_holder(f"sim-{name}-0", VMI)
    j = journal.Journal(state / name)
    j.load()
    holder: list[SessionManager] = []
    dp = datapath.DataPath("127.0.0.1", 0, lambda s, e: holder[0].on_transfer_done(s, e))
    m = SessionManager(reg, j, dp)
    holder.append(m)
    entered = threading.Event()
    by_registry = hooks_sessions.registry_devices(reg)

    def devices_of(vmi: HookVmi) -> list[str]:
        entered.set()  # the hook is about to look at the sessions
        return by_registry(vmi)

    hooks = hooks_sessions.SessionHooks(m, devices_of, wait_seconds=0)
    path = f"{sock_dir}/{name}/devmig.sock"
    srv = hooks_kubevirt.serve_node_hooks(hooks, path)
    return Node(name, reg, m, dp, hooks, srv, path, entered)


@pytest.fixture
def nodes(tmp_path: pathlib.Path) -> Iterator[tuple[Node, Node]]:
    # Unix socket paths are limited to 108 bytes; tmp_path can exceed it.
    d = tempfile.mkdtemp(prefix="dm-hs-")
    a, b = start("a", tmp_path, d), start("b", tmp_path, d)
    yield a, b
    for n in (a, b):
        n.server.stop(grace=None).wait()
        n.data.shutdown()
    shutil.rmtree(d, ignore_errors=True)


def vmi_json(migration_uid: str = "mig-1") -> bytes:
    return json.dumps(
        {
            "metadata": {
                "name": "db",
                "namespace": "vms",
                "uid": "vmi-uid-1",
                "annotations": {"devmig.io/devices": "devmig.io/sim"},
            },
            "status": {"migrationState": {"migrationUid": migration_uid}},
        }
    ).encode()


def call(n: Node, hook_point: str, migration_uid: str = "mig-1") -> Any:
    with grpc.insecure_channel(f"unix://{n.socket}") as ch:
        return api_pb2_grpc.NodeHookServiceStub(ch).ExecuteNodeHook(
            api_pb2.ExecuteNodeHookRequest(
                hookPoint=hook_point,
                vmi=vmi_json(migration_uid),
                node_context=api_pb2.NodeContext(node_name=n.name),
            ),
            timeout=30,
        )


def failure(n: Node, hook_point: str, migration_uid: str = "mig-1") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(n, hook_point, migration_uid)
    return e.value


def while_waiting(n: Node, hook_point: str, step: Callable[[], object]) -> Any:
    """Call the hook with time to wait, do ``step`` once it is looking,
    and return what the hook answered (a response or an RpcError)."""
    n.hooks.wait_seconds = 20
    n.entered.clear()
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call(n, hook_point))
        except grpc.RpcError as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    assert n.entered.wait(10)
    step()
    t.join(30)
    assert not t.is_alive()
    n.hooks.wait_seconds = 0
    return out[0]


def test_the_hooks_follow_a_migration_driven_by_the_operator(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    # Before the operator prepared anything, KubeVirt is told to come back.
    e = failure(b, "PreMigrationTarget")
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert e.details().startswith("TargetNotPrepared")
    endpoint: list[str] = []

    def prepare() -> None:
        a.manager.prepare_source(SID, TOKEN, a.device, 0)
        endpoint.append(b.manager.prepare_target(SID, TOKEN, b.device).data_endpoint)

    assert isinstance(
        while_waiting(b, "PreMigrationTarget", prepare), api_pb2.ExecuteNodeHookResponse
    )
    # The source waits for pre-copy: memory must not move before the
    # device's dirty tracking is on.
    assert failure(a, "PreMigrationSource").details().startswith("SourceNotInPreCopy")
    r = while_waiting(
        a, "PreMigrationSource", lambda: a.manager.start_pre_copy(SID, TOKEN, endpoint[0])
    )
    assert isinstance(r, api_pb2.ExecuteNodeHookResponse)
    assert a.manager.get(SID, TOKEN).phase is Phase.PRE_COPY

    def commit() -> None:
        a.manager.stop_and_copy(SID, TOKEN, [])
        for snap in b.manager.watch(SID, TOKEN, 10, lambda: True):
            if snap.phase is Phase.TRANSFERRED:
                break
        b.manager.resume(SID, TOKEN)

    assert failure(b, "PostMigrationTarget").details().startswith("TargetNotResumed")
    assert isinstance(
        while_waiting(b, "PostMigrationTarget", commit), api_pb2.ExecuteNodeHookResponse
    )
    b.manager.finish(SID, TOKEN)
    # Repeats answer OK and change nothing.
    call(b, "PostMigrationTarget")
    call(b, "PreMigrationTarget")
    assert b.manager.get(SID, TOKEN).phase is Phase.SUCCEEDED


def test_a_rollback_while_the_source_hook_waits_answers_aborted(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    a.manager.prepare_source(SID, TOKEN, a.device, 0)
    b.manager.prepare_target(SID, TOKEN, b.device)
    e = while_waiting(a, "PreMigrationSource", lambda: a.manager.abort(SID, TOKEN, "operator"))
    assert isinstance(e, grpc.RpcError)
    assert e.code() == grpc.StatusCode.ABORTED
    assert e.details().startswith("DeviceMigrationRolledBack")
    # KubeVirt's retry hears the same, not a wait for a session that ended.
    assert failure(a, "PreMigrationSource").code() == grpc.StatusCode.ABORTED


def test_a_new_migration_is_not_answered_by_an_old_sessions_outcome(
    nodes: tuple[Node, Node],
) -> None:
    a, _ = nodes
    a.manager.prepare_source(SID, TOKEN, a.device, 0)
    a.manager.abort(SID, TOKEN, "first attempt")
    # The next migration of the VMI has no session yet: come back later.
    e = failure(a, "PreMigrationSource", migration_uid="mig-2")
    assert e.code() == grpc.StatusCode.UNAVAILABLE


def test_a_device_the_vmi_does_not_hold_is_not_found(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    a.registry.set_holder(a.device, "vms/other")
    e = failure(a, "PreMigrationSource")
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert e.details().startswith("UnknownDevice")
