"""KubeVirt node hooks over real gRPC on a Unix socket, as virt-handler calls them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from kubevirt.hooks.plugins.v1alpha1 import api_pb2, api_pb2_grpc
from peer_uid import connect_as, relayed

from devmig_agent import hooks_kubevirt, uds_gate
from devmig_agent.hooks_kubevirt import HookError, HookErrorKind, HookVmi
from devmig_agent.podresources import Holder


def vmi_json(
    annotations: dict[str, str] | None = None, migration_uid: str = "mig-1", uid: str = "vmi-uid-1"
) -> bytes:
    return json.dumps(
        {
            "metadata": {
                "name": "db",
                "namespace": "vms",
                "uid": uid,
                "annotations": annotations
                if annotations is not None
                else {"devmig.io/devices": "devmig.io/sim, 0000:3b:00.1,"},
            },
            "spec": {"domain": {"devices": {}}},
            "status": {
                "phase": "Running",
                "nodeName": "node-a",
                "migrationState": {
                    "migrationUid": migration_uid,
                    "sourceNode": "node-a",
                    "targetNode": "node-b",
                    "targetPod": "virt-launcher-db-abcde",
                },
            },
        }
    ).encode()


class RecordingHooks:
    """Records calls; can fail or block on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, HookVmi]] = []
        self.fail: Exception | None = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def _record(self, name: str, vmi: HookVmi) -> None:
        self.calls.append((name, vmi))
        self.entered.set()
        assert self.release.wait(timeout=30)
        if self.fail is not None:
            raise self.fail

    def pre_migration_source(self, vmi: HookVmi) -> None:
        self._record("pre_migration_source", vmi)

    def pre_migration_target(self, vmi: HookVmi) -> None:
        self._record("pre_migration_target", vmi)

    def post_migration_target(self, vmi: HookVmi) -> None:
        self._record("post_migration_target", vmi)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can exceed it.
    d = tempfile.mkdtemp(prefix="dm-nh-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture
def served(sock_dir: str, hooks: RecordingHooks) -> Iterator[str]:
    path = f"{sock_dir}/plugins/devmig.sock"
    server = hooks_kubevirt.serve_node_hooks(hooks, path)
    yield path
    server.stop(grace=None).wait()


def call(path: str, hook_point: str, vmi: bytes, node: str = "node-b") -> Any:
    # A fresh connection per call, as virt-handler dials.
    with grpc.insecure_channel(f"unix://{path}") as ch:
        return api_pb2_grpc.NodeHookServiceStub(ch).ExecuteNodeHook(
            api_pb2.ExecuteNodeHookRequest(
                hookPoint=hook_point, vmi=vmi, node_context=api_pb2.NodeContext(node_name=node)
            ),
            timeout=30,
        )


@pytest.mark.parametrize(
    ("hook_point", "method"),
    [
        ("PreMigrationSource", "pre_migration_source"),
        ("PreMigrationTarget", "pre_migration_target"),
        ("PostMigrationTarget", "post_migration_target"),
    ],
)
def test_each_migration_hook_point_calls_its_step_with_the_parsed_vmi(
    served: str, hooks: RecordingHooks, hook_point: str, method: str
) -> None:
    call(served, hook_point, vmi_json())
    assert [name for name, _ in hooks.calls] == [method]
    vmi = hooks.calls[0][1]
    assert (vmi.namespace, vmi.name, vmi.uid) == ("vms", "db", "vmi-uid-1")
    assert vmi.devices == ("devmig.io/sim", "0000:3b:00.1")
    assert vmi.node_name == "node-b"
    assert (vmi.migration_uid, vmi.source_node, vmi.target_node) == ("mig-1", "node-a", "node-b")
    assert vmi.target_pod == "virt-launcher-db-abcde"
    assert vmi.raw["status"]["phase"] == "Running"


@pytest.mark.parametrize("hook_point", ["PreVMStart", "PostVMStop", "PostMigrationSource", ""])
def test_other_hook_points_answer_ok_at_once_without_reading_the_vmi(
    served: str, hooks: RecordingHooks, hook_point: str
) -> None:
    call(served, hook_point, b"not json at all")
    assert hooks.calls == []


@pytest.mark.parametrize("annotations", [{}, {"devmig.io/devices": " , "}, {"other": "x"}])
def test_a_vmi_without_devmig_devices_answers_ok_without_calling_a_step(
    served: str, hooks: RecordingHooks, annotations: dict[str, str]
) -> None:
    call(served, "PreMigrationSource", vmi_json(annotations))
    assert hooks.calls == []


def test_a_repeat_after_success_for_the_same_migration_does_nothing_twice(
    served: str, hooks: RecordingHooks
) -> None:
    for _ in range(3):
        call(served, "PreMigrationTarget", vmi_json())
    call(served, "PreMigrationTarget", vmi_json(migration_uid="mig-2"))
    call(served, "PostMigrationTarget", vmi_json(migration_uid="mig-2"))
    assert [(n, v.migration_uid) for n, v in hooks.calls] == [
        ("pre_migration_target", "mig-1"),
        ("pre_migration_target", "mig-2"),
        ("post_migration_target", "mig-2"),
    ]


def test_without_a_migration_uid_every_call_reaches_the_idempotent_step(
    served: str, hooks: RecordingHooks
) -> None:
    call(served, "PreMigrationSource", vmi_json(migration_uid=""))
    call(served, "PreMigrationSource", vmi_json(migration_uid=""))
    assert len(hooks.calls) == 2


def test_a_typed_failure_maps_to_its_status_code_with_the_reason_and_is_retried(
    served: str, hooks: RecordingHooks
) -> None:
    hooks.fail = HookError(
        HookErrorKind.PRECONDITION, "DeviceBusy", "0000:3b:00.1 is in session s1"
    )
    with pytest.raises(grpc.RpcError) as e:
        call(served, "PreMigrationSource", vmi_json())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == "DeviceBusy: 0000:3b:00.1 is in session s1"
    hooks.fail = None
    call(served, "PreMigrationSource", vmi_json())
    assert len(hooks.calls) == 2, "a failed hook must run again when virt-handler retries"


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (HookErrorKind.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (HookErrorKind.NOT_FOUND, grpc.StatusCode.NOT_FOUND),
        (HookErrorKind.ABORTED, grpc.StatusCode.ABORTED),
        (HookErrorKind.INVALID, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_every_error_kind_has_its_own_status_code(
    served: str, hooks: RecordingHooks, kind: HookErrorKind, code: grpc.StatusCode
) -> None:
    hooks.fail = HookError(kind, "SomeReason", "detail")
    with pytest.raises(grpc.RpcError) as e:
        call(served, "PostMigrationTarget", vmi_json())
    assert e.value.code() == code
    assert e.value.details().startswith("SomeReason: ")


def test_an_unexpected_exception_is_internal_with_a_reason(
    served: str, hooks: RecordingHooks
) -> None:
    hooks.fail = RuntimeError("boom")
    with pytest.raises(grpc.RpcError) as e:
        call(served, "PostMigrationTarget", vmi_json())
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert e.value.details() == "InternalError: RuntimeError: boom"


@pytest.mark.parametrize("bad", [b"{", b"[]", b'{"metadata": 3}', b"\xff\xfe"])
def test_a_vmi_that_is_not_a_vmi_is_invalid_argument(
    served: str, hooks: RecordingHooks, bad: bytes
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call(served, "PreMigrationSource", bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("BadVmiJson: ")
    assert hooks.calls == []


def test_concurrent_repeats_of_one_hook_run_the_step_once(
    sock_dir: str, hooks: RecordingHooks
) -> None:
    handler = hooks_kubevirt.NodeHookHandler(hooks)
    hooks.release.clear()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            handler.execute("PreMigrationTarget", vmi_json(), "node-b")
        except BaseException as e:
            errors.append(e)

    first = threading.Thread(target=run)
    first.start()
    assert hooks.entered.wait(timeout=30)
    second = threading.Thread(target=run)
    second.start()
    # Wait until the second call is queued behind the first (both hold the slot).
    key = ("PreMigrationTarget", "vms/db", "vmi-uid-1", "mig-1")
    queued = threading.Event()
    while not queued.is_set():
        with handler._lock:
            if handler._running[key].users == 2:
                queued.set()
        queued.wait(0.001)
    hooks.release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert not errors
    assert len(hooks.calls) == 1
    assert handler._running == {}


def test_a_stale_socket_is_replaced_and_the_new_server_answers(
    sock_dir: str, hooks: RecordingHooks
) -> None:
    path = f"{sock_dir}/devmig.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # bound, never listening: what a killed server leaves behind
    server = hooks_kubevirt.serve_node_hooks(hooks, path)
    try:
        call(path, "PreMigrationSource", vmi_json())
        assert len(hooks.calls) == 1
    finally:
        server.stop(grace=None).wait()


def test_a_regular_file_at_the_socket_path_is_refused_not_deleted(
    sock_dir: str, hooks: RecordingHooks
) -> None:
    path = f"{sock_dir}/devmig.sock"
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(FileExistsError):
        hooks_kubevirt.serve_node_hooks(hooks, path)
    with open(path) as f:
        assert f.read() == "keep me"


def test_the_server_answers_kubevirts_full_method_path(served: str, hooks: RecordingHooks) -> None:
    req = api_pb2.ExecuteNodeHookRequest(hookPoint="PreMigrationSource", vmi=vmi_json())
    with grpc.insecure_channel(f"unix://{served}") as ch:
        raw = ch.unary_unary("/kubevirt.hooks.plugins.v1alpha1.NodeHookService/ExecuteNodeHook")(
            req.SerializeToString(), timeout=30
        )
    assert raw == b""
    assert len(hooks.calls) == 1
    assert os.path.exists(served)


def test_the_devices_annotation_splits_on_commas_and_drops_blanks() -> None:
    assert hooks_kubevirt.parse_devices("a/b, 0000:3b:00.1 ,, ") == ("a/b", "0000:3b:00.1")
    assert hooks_kubevirt.parse_devices("") == ()


HELD = [
    Holder("0000:3b:00.1", "nvidia.com/T4", "vms/virt-launcher-db-x7k2p", "compute", "vms/db"),
    Holder("0000:3b:00.2", "nvidia.com/T4", "vms/virt-launcher-db-x7k2p", "compute", "vms/db"),
    Holder("0000:af:00.0", "devmig.io/sim", "vms/virt-launcher-db-x7k2p", "compute", "vms/db"),
    Holder("0000:af:00.1", "devmig.io/sim", "vms/virt-launcher-web-a1b2c", "compute", "vms/web"),
]


def test_annotation_entries_select_the_vmis_devices_by_resource_or_id() -> None:
    assert hooks_kubevirt.select_devices(["nvidia.com/T4"], HELD, "vms/db") == [
        "0000:3b:00.1",
        "0000:3b:00.2",
    ]
    assert hooks_kubevirt.select_devices(["AF:00.0", "0000:3b:00.2"], HELD, "vms/db") == [
        "0000:af:00.0",
        "0000:3b:00.2",
    ]
    assert hooks_kubevirt.select_devices(["0000:3b:00.2", "nvidia.com/T4"], HELD, "vms/db") == [
        "0000:3b:00.2",
        "0000:3b:00.1",
    ]
    # The resource filter is per VMI: web's sim device is not db's.
    assert hooks_kubevirt.select_devices(["devmig.io/sim"], HELD, "vms/db") == ["0000:af:00.0"]


def test_an_entry_that_selects_nothing_is_unknown_device() -> None:
    with pytest.raises(HookError) as e:
        hooks_kubevirt.select_devices(["intel.com/qat"], HELD, "vms/db")
    assert (e.value.kind, e.value.reason) == (HookErrorKind.NOT_FOUND, "UnknownDevice")
    with pytest.raises(HookError) as e:
        hooks_kubevirt.select_devices(["0000:00:1f.0"], HELD, "vms/db")
    assert e.value.reason == "UnknownDevice"


def test_a_device_another_pod_holds_is_device_not_held() -> None:
    with pytest.raises(HookError) as e:
        hooks_kubevirt.select_devices(["0000:af:00.1"], HELD, "vms/db")
    assert (e.value.kind, e.value.reason) == (HookErrorKind.PRECONDITION, "DeviceNotHeld")
    assert "vms/virt-launcher-web-a1b2c" in str(e.value)


def test_only_the_sockets_owner_may_connect(served: str) -> None:
    """The hook socket is 0600: a process of another uid cannot even
    connect (a forked child drops to nobody, 65534, and tries)."""
    assert os.stat(served).st_mode & 0o777 == 0o600
    if os.getuid() != 0:
        pytest.skip("needs root to switch the child to another uid")
    # The directory must let nobody reach the socket, so only the socket's
    # own mode decides.
    os.chmod(os.path.dirname(served), 0o755)
    os.chmod(os.path.dirname(os.path.dirname(served)), 0o755)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(served)
                code = 1  # connected: the permission did not hold
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a process of another uid could connect"
    # Root (virt-handler) still can.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(served)
    s.close()


def call_over(conn: socket.socket, sock_dir: str, hook_point: str) -> Any:
    """One ExecuteNodeHook call carried by ``conn``."""
    with relayed(conn, sock_dir) as local:
        return call(local, hook_point, vmi_json())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_a_caller_neither_root_nor_allowed_is_refused_by_its_kernel_credentials(
    sock_dir: str, hooks: RecordingHooks
) -> None:
    path = f"{sock_dir}/devmig.sock"
    qemu, nobody = 107, 65534
    gate = hooks_kubevirt.serve_node_hooks(hooks, path, allowed_uids=[qemu])
    refused: list[tuple[int, int]] = []
    gate._on_refused = lambda pid, uid: refused.append((pid, uid))
    try:
        # Another uid is allowed, so the file lets anyone connect and the
        # credential check alone decides.
        assert os.stat(path).st_mode & 0o777 == 0o666
        os.chmod(sock_dir, 0o755)  # mkdtemp's 0700 would stop any non-root peer
        with pytest.raises(grpc.RpcError) as ei:
            call_over(connect_as(nobody, path), sock_dir, "PreMigrationSource")
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert ei.value.details().startswith("PeerNotAllowed: ")
        assert "uid 0, 107 only" in ei.value.details()
        assert hooks.calls == []
        assert [uid for _pid, uid in refused] == [nobody]

        call_over(connect_as(qemu, path), sock_dir, "PreMigrationSource")
        assert [name for name, _ in hooks.calls] == ["pre_migration_source"]
    finally:
        gate.stop(grace=None).wait()
    assert not os.path.exists(path)


def test_only_root_may_open_the_socket_when_no_other_uid_is_allowed(
    served: str, hooks: RecordingHooks
) -> None:
    assert os.stat(served).st_mode & 0o777 == 0o600
    call(served, "PreMigrationSource", vmi_json())  # root (or the owner) is served
    assert len(hooks.calls) == 1


def test_the_gate_closes_connections_past_its_bound_and_keeps_serving(
    sock_dir: str, hooks: RecordingHooks
) -> None:
    # Idle connections held open by a local process: the gate relays at
    # most MAX_CONNECTIONS at once and closes the rest at accept.
    served = f"{sock_dir}/plugins/devmig.sock"
    gate = hooks_kubevirt.serve_node_hooks(hooks, served)
    try:
        held = []
        for _ in range(uds_gate.MAX_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX)
            s.connect(served)
            held.append(s)
        extra = socket.socket(socket.AF_UNIX)
        extra.connect(served)
        extra.settimeout(10)
        assert extra.recv(1) == b""  # closed by the gate
        extra.close()
        assert gate.active_connections() == uds_gate.MAX_CONNECTIONS
        for s in held:
            s.close()
        # The slots come back once the relays see the ends, not at close().
        assert gate.wait_active_at_most(0, timeout=10)
        call(served, "PreMigrationSource", vmi_json())
        assert len(hooks.calls) == 1
    finally:
        gate.stop(grace=None).wait()
