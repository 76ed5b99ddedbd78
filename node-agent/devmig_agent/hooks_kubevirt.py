"""KubeVirt Plugins node hooks: devmig's part of a KubeVirt live migration.

virt-handler calls ``NodeHookService.ExecuteNodeHook`` on the socket a
``Plugin`` names (``spec.nodeHooks[].socket``), one fresh connection per
call, at these points of a migration (in this order):

- ``PreMigrationTarget`` on the target node, before the target launcher
  prepares the domain: devmig prepares the target device.
- ``PreMigrationSource`` on the source node, just before libvirt starts the
  memory migration: devmig starts the device's pre-copy.
- ``PostMigrationTarget`` on the target node once the domain runs there,
  before KubeVirt marks the migration completed: devmig finishes.

Every other hook point, and every VMI that names no devmig device (the
``devmig.io/devices`` annotation), is answered OK at once. A non-OK answer
makes virt-handler retry the hook later (``failureStrategy: Fail``), so each
call must be idempotent; a call repeated after it succeeded for the same
migration returns OK without calling the session machinery again, and two
calls for the same migration never run at the same time.

Errors are gRPC status codes whose details begin with a CamelCase reason, as
in devmig's own agent API.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import grpc
from kubevirt.hooks.plugins.v1alpha1 import api_pb2  # type: ignore[import-untyped]

from devmig_agent.podresources import Holder, normalize_pci_address
from devmig_agent.uds_gate import PeerGate

log = logging.getLogger(__name__)

# KubeVirt's own example plugin and e2e tests put node-hook sockets here;
# virt-handler sees host /var/run/kubevirt at the same path.
DEFAULT_SOCKET = "/var/run/kubevirt/plugins/devmig.sock"
DEVICES_ANNOTATION = "devmig.io/devices"
SERVICE = "kubevirt.hooks.plugins.v1alpha1.NodeHookService"

PRE_MIGRATION_SOURCE = "PreMigrationSource"
PRE_MIGRATION_TARGET = "PreMigrationTarget"
POST_MIGRATION_TARGET = "PostMigrationTarget"
HANDLED_HOOK_POINTS = (PRE_MIGRATION_SOURCE, PRE_MIGRATION_TARGET, POST_MIGRATION_TARGET)

# Successful (hook point, VMI UID, migration UID) triples remembered to
# answer repeats at once. A node runs a few migrations at a time; 1024 covers
# hours of them, and forgetting an old one only costs an idempotent re-call.
MAX_REMEMBERED = 1024
# Threads for hook calls: virt-handler calls one hook at a time per VMI, and
# a node migrates a handful of VMIs at once.
MAX_WORKERS = 8


class HookErrorKind(enum.Enum):
    """What kind of failure; decides the gRPC status code."""

    INVALID = grpc.StatusCode.INVALID_ARGUMENT  # the VMI or its annotation is wrong
    NOT_FOUND = grpc.StatusCode.NOT_FOUND  # a named device is not on this node
    PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION  # the device cannot do it now
    UNAVAILABLE = grpc.StatusCode.UNAVAILABLE  # not yet; virt-handler retries
    ABORTED = grpc.StatusCode.ABORTED  # the migration was cancelled or rolled back
    INTERNAL = grpc.StatusCode.INTERNAL


class HookError(Exception):
    """A typed failure of a migration hook; ``reason`` is CamelCase."""

    def __init__(self, kind: HookErrorKind, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.kind = kind
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class HookVmi:
    """What the session machinery needs of the VMI a hook was called for."""

    namespace: str
    name: str
    uid: str
    # Resource names or device ids from the devmig.io/devices annotation, in order.
    devices: tuple[str, ...]
    # The node virt-handler runs on (NodeContext.node_name).
    node_name: str
    # status.migrationState, as far as it is filled.
    migration_uid: str = ""
    source_node: str = ""
    target_node: str = ""
    target_pod: str = ""
    # The whole VMI as virt-handler sent it.
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class MigrationHooks(Protocol):
    """The session machinery, called by the hooks. Each method returns when
    its step is done (or is known to be already done) and raises
    ``HookError`` otherwise; any other exception is an internal error."""

    def pre_migration_source(self, vmi: HookVmi) -> None: ...

    def pre_migration_target(self, vmi: HookVmi) -> None: ...

    def post_migration_target(self, vmi: HookVmi) -> None: ...


def parse_devices(annotation: str) -> tuple[str, ...]:
    """``"nvidia.com/T4, 0000:3b:00.1,,"`` -> ``("nvidia.com/T4", "0000:3b:00.1")``."""
    return tuple(d for d in (s.strip() for s in annotation.split(",")) if d)


def select_devices(entries: Sequence[str], held: Iterable[Holder], vmi_key: str) -> list[str]:
    """The device ids of this node that a VMI's ``devmig.io/devices`` entries name.

    ``held``: who holds which device (``podresources.device_holders``). An
    entry naming a resource (it contains "/") selects every device of that
    resource the VMI's pod holds; any other entry is a device id (PCI address
    in any spelling, or mdev UUID) that the VMI must hold. Order follows the
    entries, without repeats. ``HookError(NOT_FOUND, "UnknownDevice")`` when
    an entry selects nothing, ``HookError(PRECONDITION, "DeviceNotHeld")``
    when the device is on the node but not the VMI's.
    """
    mine = [h for h in held if h.vmi == vmi_key]
    everyone = {h.device_id: h for h in held}
    out: list[str] = []
    for entry in entries:
        if "/" in entry:
            ids = sorted(h.device_id for h in mine if h.resource_name == entry)
        else:
            want = normalize_pci_address(entry) or entry.lower()
            ids = [
                h.device_id
                for h in mine
                if (normalize_pci_address(h.device_id) or h.device_id.lower()) == want
            ]
            if not ids:
                other = [
                    h
                    for d, h in everyone.items()
                    if (normalize_pci_address(d) or d.lower()) == want
                ]
                if other:
                    raise HookError(
                        HookErrorKind.PRECONDITION,
                        "DeviceNotHeld",
                        f"{entry} is held by {other[0].pod or 'nobody'}, not by VMI {vmi_key}",
                    )
        if not ids:
            raise HookError(
                HookErrorKind.NOT_FOUND,
                "UnknownDevice",
                f"VMI {vmi_key} names {entry!r} in {DEVICES_ANNOTATION}; it holds no such device",
            )
        out.extend(i for i in ids if i not in out)
    return out


def parse_vmi(raw_json: bytes, node_name: str) -> HookVmi:
    """The hook's VMI JSON; ``HookError(INVALID, "BadVmiJson")`` if it is not one."""
    try:
        obj = json.loads(raw_json)
    except (ValueError, UnicodeDecodeError) as e:
        raise HookError(HookErrorKind.INVALID, "BadVmiJson", f"VMI is not JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise HookError(HookErrorKind.INVALID, "BadVmiJson", "VMI JSON has no metadata object")
    meta = obj["metadata"]
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise HookError(HookErrorKind.INVALID, "BadVmiJson", "metadata.annotations is not a map")
    devices_value = annotations.get(DEVICES_ANNOTATION, "")
    if not isinstance(devices_value, str):
        raise HookError(
            HookErrorKind.INVALID, "BadDevicesAnnotation", f"{DEVICES_ANNOTATION} is not a string"
        )
    status = obj.get("status")
    ms = status.get("migrationState") if isinstance(status, dict) else None
    if not isinstance(ms, dict):
        ms = {}

    def s(d: Mapping[str, Any], k: str) -> str:
        v = d.get(k)
        return v if isinstance(v, str) else ""

    return HookVmi(
        namespace=s(meta, "namespace"),
        name=s(meta, "name"),
        uid=s(meta, "uid"),
        devices=parse_devices(devices_value),
        node_name=node_name,
        migration_uid=s(ms, "migrationUid"),
        source_node=s(ms, "sourceNode"),
        target_node=s(ms, "targetNode"),
        target_pod=s(ms, "targetPod"),
        raw=obj,
    )


# (hook point, namespace/name, VMI UID, migration UID)
_Key = tuple[str, str, str, str]


@dataclasses.dataclass
class _Slot:
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    users: int = 0


class NodeHookHandler:
    """Serves ``ExecuteNodeHook``: hook point -> ``MigrationHooks`` call."""

    def __init__(self, hooks: MigrationHooks) -> None:
        self.hooks = hooks
        self._lock = threading.Lock()
        # Calls under way, per key: one runs, repeats wait for its result.
        self._running: dict[_Key, _Slot] = {}
        self._done: collections.OrderedDict[_Key, None] = collections.OrderedDict()

    def execute(self, hook_point: str, vmi_json: bytes, node_name: str) -> None:
        """Run one hook; raises ``HookError``."""
        if hook_point not in HANDLED_HOOK_POINTS:
            return
        vmi = parse_vmi(vmi_json, node_name)
        if not vmi.devices:
            return
        # Without a migration UID there is nothing to key a repeat by: call
        # through (the session machinery is idempotent on its own).
        key = (hook_point, vmi.key, vmi.uid, vmi.migration_uid)
        remember = bool(vmi.uid and vmi.migration_uid)
        with self._lock:
            if remember and key in self._done:
                return
            slot = self._running.get(key)
            if slot is None:
                slot = self._running[key] = _Slot()
            slot.users += 1
        try:
            with slot.lock:
                with self._lock:
                    if remember and key in self._done:
                        return
                self._call(hook_point, vmi)
                with self._lock:
                    if remember:
                        self._done[key] = None
                        while len(self._done) > MAX_REMEMBERED:
                            self._done.popitem(last=False)
        finally:
            with self._lock:
                slot.users -= 1
                if slot.users == 0:
                    del self._running[key]

    def _call(self, hook_point: str, vmi: HookVmi) -> None:
        log.info("%s for VMI %s (migration %s)", hook_point, vmi.key, vmi.migration_uid or "-")
        if hook_point == PRE_MIGRATION_SOURCE:
            self.hooks.pre_migration_source(vmi)
        elif hook_point == PRE_MIGRATION_TARGET:
            self.hooks.pre_migration_target(vmi)
        else:
            self.hooks.post_migration_target(vmi)

    def rpc(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self.execute(request.hookPoint, request.vmi, request.node_context.node_name)
        except HookError as e:
            log.warning("%s failed: %s", request.hookPoint, e)
            context.abort(e.kind.value, f"{e.reason}: {e.message}")
        except Exception as e:
            log.exception("%s failed", request.hookPoint)
            context.abort(grpc.StatusCode.INTERNAL, f"InternalError: {type(e).__name__}: {e}")
        return api_pb2.ExecuteNodeHookResponse()


def add_node_hook_service(server: grpc.Server, hooks: MigrationHooks) -> NodeHookHandler:
    handler = NodeHookHandler(hooks)
    rpcs = {
        "ExecuteNodeHook": grpc.unary_unary_rpc_method_handler(
            handler.rpc,
            request_deserializer=api_pb2.ExecuteNodeHookRequest.FromString,
            response_serializer=api_pb2.ExecuteNodeHookResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, rpcs),))
    return handler


def prepare_socket_path(path: str) -> None:
    """Create the socket's directory and remove a stale socket left by an
    earlier run. Anything else at the path is refused, never deleted."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    os.unlink(path)


def serve_node_hooks(
    hooks: MigrationHooks,
    socket_path: str = DEFAULT_SOCKET,
    *,
    allowed_uids: Iterable[int] = (),
    on_refused: Callable[[int, int], None] | None = None,
    max_workers: int = MAX_WORKERS,
) -> PeerGate:
    """Serve the node hooks on ``socket_path``; the caller stops the gate.

    Who may call: root (virt-handler runs as root) and ``allowed_uids``,
    checked by the peer's kernel credentials on every connection (see
    uds_gate); others get PERMISSION_DENIED with reason PeerNotAllowed. The
    file mode is a first fence: 0600 (root only) unless other uids are
    allowed, then 0666 and the credential check alone decides. The socket's
    existence is what tells KubeVirt the plugin is ready, so it is created
    only once the service is about to serve. ``on_refused(pid, uid)`` is
    called for each refused caller.
    """
    prepare_socket_path(socket_path)
    gate = PeerGate(
        socket_path,
        lambda server: add_node_hook_service(server, hooks),
        allowed_uids,
        max_workers=max_workers,
        on_refused=on_refused,
    )
    gate.start()
    return gate
