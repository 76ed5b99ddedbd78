"""``devmig-domain-hook``: attach devmig's devices to a VMI's libvirt domain.

KubeVirt refuses to live-migrate a VMI with ``hostDevices``, so a VMI whose
devices devmig migrates names them in the ``devmig.io/devices`` annotation
instead, and this KubeVirt Plugins domain-hook sidecar (a container in the
virt-launcher pod) adds them to the domain as ``<hostdev>`` elements:

- at ``Boot``, the devices allocated on the VMI's node;
- at ``MigrationTarget``, the *target* node's devices, replacing the
  source's in the domain XML the source sent, so the guest sees each device
  at the same guest PCI address (the ``<hostdev>`` keeps its ``<address>``
  and alias; only its ``<source>`` changes).

Which devices: the node agent writes one JSON file per VMI into a directory
shared with the sidecar (a hostPath the launcher pod mounts read-only,
default ``/var/run/devmig/domain-devices``), named
``<namespace>_<vmi-name>.json``::

    {"vmiUID": "6f1c...", "devices": [
        {"alias": "ua-devmig-0", "type": "pci", "id": "0000:3b:00.1"},
        {"alias": "ua-devmig-1", "type": "mdev", "id": "b7c4a2f0-...", "model": "vfio-pci"}]}

``alias`` is optional (``ua-devmig-<index>`` by default; libvirt demands the
``ua-`` prefix for user aliases); on the target the agent gives each device
the alias of the source device it takes over. For a fixed setup without the
agent, the same JSON may be given in the ``DEVMIG_DOMAIN_DEVICES``
environment variable instead (it wins over the file).

The hook never removes or reorders anything but devmig's own ``<hostdev>``
sources; other contexts (``MigrationSource``) return the domain unchanged.
The socket path follows KubeVirt's rules for sidecar sockets:
``/var/run/kubevirt-plugin/<plugin name>/<file>.sock``, a clean path of at
most 108 bytes (default ``/var/run/kubevirt-plugin/devmig/domain.sock``).

Who may call: the socket lies in a directory the pod's containers share, so
the hook checks each caller's kernel credentials (``uds_gate``): root, the
hook's own uid and ``--allow-uid`` (default 107, the ``qemu`` user
virt-launcher runs a non-root VM as); any other process in the pod gets
PERMISSION_DENIED with reason PeerNotAllowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import posixpath
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from xml.parsers import expat

import grpc
from kubevirt.hooks.plugins.v1alpha1 import api_pb2  # type: ignore[import-untyped]

from devmig_agent import atomicfile
from devmig_agent.hooks_kubevirt import prepare_socket_path
from devmig_agent.uds_gate import PeerGate

log = logging.getLogger(__name__)

SERVICE = "kubevirt.hooks.plugins.v1alpha1.DomainHookService"
PLUGIN_SOCKET_ROOT = "/var/run/kubevirt-plugin"
DEFAULT_PLUGIN_NAME = "devmig"
DEFAULT_SOCKET = f"{PLUGIN_SOCKET_ROOT}/{DEFAULT_PLUGIN_NAME}/domain.sock"
DEFAULT_DEVICES_DIR = "/var/run/devmig/domain-devices"
DEVICES_ENV = "DEVMIG_DOMAIN_DEVICES"
DEVICES_ANNOTATION = "devmig.io/devices"
ALIAS_PREFIX = "ua-devmig-"
# sockaddr_un.sun_path holds 108 bytes; KubeVirt's admission policy enforces it.
MAX_SOCKET_PATH = 108
# KubeVirt calls the sidecar once per domain definition; two threads cover a
# repeat arriving while the first call finishes.
MAX_WORKERS = 2

BOOT = "Boot"
MIGRATION_TARGET = "MigrationTarget"
MUTATING_CONTEXTS = (BOOT, MIGRATION_TARGET)

_PCI = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
_UUID = re.compile(r"^[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}$")
# libvirt wants user aliases to start with "ua-"; the character set keeps
# file content from ever being read as XML markup.
_ALIAS = re.compile(r"^ua-[A-Za-z0-9_.-]+$")
_MODEL = re.compile(r"^[a-z0-9-]+$")  # vfio-pci, vfio-ccw, vfio-ap


class DomainHookError(Exception):
    """A refused mutation; ``reason`` is CamelCase, ``code`` the gRPC status."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.code = code
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class DomainDevice:
    alias: str
    type: str  # "pci" or "mdev"
    id: str  # PCI address "0000:3b:00.1" or mdev UUID
    model: str = "vfio-pci"  # mdev only


def _bad(reason: str, message: str) -> DomainHookError:
    return DomainHookError(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


def parse_devices(doc: Mapping[str, Any]) -> tuple[str, list[DomainDevice]]:
    """(vmiUID, devices) from the devices file's JSON; ``BadDeviceList`` if malformed."""
    entries = doc.get("devices")
    if not isinstance(entries, list):
        raise _bad("BadDeviceList", "devices is not a list")
    out: list[DomainDevice] = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise _bad("BadDeviceList", f"devices[{i}] is not an object")
        kind = e.get("type")
        dev_id = str(e.get("id", "")).lower()
        if kind == "pci" and not _PCI.match(dev_id):
            raise _bad("BadDeviceList", f"devices[{i}]: {dev_id!r} is not a PCI address")
        if kind == "mdev" and not _UUID.match(dev_id):
            raise _bad("BadDeviceList", f"devices[{i}]: {dev_id!r} is not an mdev UUID")
        if kind not in ("pci", "mdev"):
            raise _bad("BadDeviceList", f"devices[{i}]: type {kind!r} is not pci or mdev")
        alias = str(e.get("alias") or f"{ALIAS_PREFIX}{i}")
        if not _ALIAS.match(alias):
            raise _bad("BadDeviceList", f"devices[{i}]: alias {alias!r} is not ua-[A-Za-z0-9_.-]+")
        model = str(e.get("model") or "vfio-pci")
        if not _MODEL.match(model):
            raise _bad("BadDeviceList", f"devices[{i}]: mdev model {model!r} is not a model name")
        out.append(DomainDevice(alias, kind, dev_id, model))
    aliases = [d.alias for d in out]
    if len(set(aliases)) != len(aliases):
        raise _bad("BadDeviceList", "two devices share an alias")
    uid = doc.get("vmiUID", "")
    return (uid if isinstance(uid, str) else ""), out


def devices_file(directory: str, namespace: str, name: str) -> str:
    return os.path.join(directory, f"{namespace}_{name}.json")


def write_devices_file(
    directory: str, namespace: str, name: str, vmi_uid: str, devices: Sequence[DomainDevice]
) -> str:
    """What the node agent calls: publish a VMI's devices for the sidecar, atomically."""
    os.makedirs(directory, exist_ok=True)
    doc = {"vmiUID": vmi_uid, "devices": [dataclasses.asdict(d) for d in devices]}
    path = devices_file(directory, namespace, name)
    # Readable by the launcher pod's sidecar, which does not run as root.
    atomicfile.write_atomic(path, json.dumps(doc, indent=1).encode(), mode=0o644)
    return path


# --- domain XML -------------------------------------------------------------
#
# The domain XML is edited as text at positions an XML parser reports, never
# re-serialized: KubeVirt re-parses the answer, and its own metadata
# (``<kubevirt xmlns="http://kubevirt.io">``) and any ``qemu:`` elements must
# come back byte for byte. A serializer would move namespace declarations and
# rename prefixes, which breaks consumers that read inner XML verbatim.


@dataclasses.dataclass
class _HostdevSpan:
    start: int
    open_end: int  # just past the opening tag
    end: int = -1
    alias: str = ""
    source: tuple[int, int] | None = None
    indent: str = ""


@dataclasses.dataclass
class _Layout:
    root: str = ""
    devices_start: int = -1
    devices_close: int = -1  # index of "</devices>", or -1 for <devices/>
    devices_end: int = -1
    hostdevs: list[_HostdevSpan] = dataclasses.field(default_factory=list)


def _line_indent(xml: bytes, index: int) -> str:
    line_start = xml.rfind(b"\n", 0, index) + 1
    head = xml[line_start:index]
    return head.decode() if head.strip() == b"" else ""


def _tag_end(xml: bytes, start: int) -> int:
    """Index just past the tag that begins at ``start`` ('>' inside quoted
    attribute values is legal XML and does not end the tag)."""
    quote = 0
    for i in range(start + 1, len(xml)):
        c = xml[i]
        if quote:
            if c == quote:
                quote = 0
        elif c in b"'\"":
            quote = c
        elif c == ord(">"):
            return i + 1
    raise _bad("BadDomainXml", f"unterminated tag at byte {start}")


def _scan(xml: bytes) -> _Layout:
    lay = _Layout()
    # (name, start of the start tag, end of the start tag) per open element.
    stack: list[tuple[str, int, int]] = []
    parser = expat.ParserCreate()  # no namespace processing: names stay as written

    def path() -> list[str]:
        return [n for n, _, _ in stack]

    def start(name: str, attrs: dict[str, str]) -> None:
        idx = parser.CurrentByteIndex
        stack.append((name, idx, _tag_end(xml, idx)))
        p = path()
        if len(p) == 1:
            lay.root = name
        elif p == ["domain", "devices"]:
            lay.devices_start = idx
        elif p == ["domain", "devices", "hostdev"]:
            lay.hostdevs.append(
                _HostdevSpan(start=idx, open_end=stack[-1][2], indent=_line_indent(xml, idx))
            )
        elif p == ["domain", "devices", "hostdev", "alias"]:
            lay.hostdevs[-1].alias = attrs.get("name", "")
        elif p == ["domain", "devices", "hostdev", "source"]:
            lay.hostdevs[-1].source = (idx, -1)

    def end(name: str) -> None:
        p = path()
        _, _, open_end = stack.pop()
        if xml[open_end - 2 : open_end] == b"/>":
            close, after = -1, open_end  # an empty-element tag: no end tag
        else:
            close = parser.CurrentByteIndex
            after = _tag_end(xml, close)
        if p == ["domain", "devices"]:
            lay.devices_close, lay.devices_end = close, after
        elif p == ["domain", "devices", "hostdev"]:
            lay.hostdevs[-1].end = after
        elif p == ["domain", "devices", "hostdev", "source"]:
            src = lay.hostdevs[-1].source
            assert src is not None
            lay.hostdevs[-1].source = (src[0], after)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(xml, True)
    except expat.ExpatError as e:
        raise _bad("BadDomainXml", str(e)) from None
    if lay.root != "domain":
        raise _bad("BadDomainXml", f"root element is <{lay.root}>, not <domain>")
    if lay.devices_start < 0:
        raise _bad("BadDomainXml", "the domain has no <devices>")
    return lay


def _source_xml(dev: DomainDevice) -> str:
    if dev.type == "pci":
        m = _PCI.match(dev.id)
        assert m is not None
        dom, bus, slot, fn = m.groups()
        addr = (
            f"<address type='pci' domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' "
            f"function='0x{fn}'/>"
        )
    else:
        addr = f"<address uuid='{dev.id}'/>"
    return f"<source>{addr}</source>"


def _open_tag(dev: DomainDevice) -> str:
    if dev.type == "pci":
        # managed='no': the agent, not libvirt, binds the device to vfio-pci
        # and owns it, as KubeVirt emits its own PCI hostdevs.
        return "<hostdev mode='subsystem' type='pci' managed='no'>"
    return f"<hostdev mode='subsystem' type='mdev' model='{dev.model}'>"


def _hostdev_xml(dev: DomainDevice, indent: str) -> str:
    inner = indent + "  "
    return (
        f"{_open_tag(dev)}\n{inner}{_source_xml(dev)}\n"
        f"{inner}<alias name='{dev.alias}'/>\n{indent}</hostdev>"
    )


def mutate_domain(xml: bytes, devices: Sequence[DomainDevice]) -> bytes:
    """The domain XML with ``devices`` attached; every other byte unchanged.

    A ``<hostdev>`` whose alias is a device's alias is re-pointed at that
    device: its opening tag and ``<source>`` are rewritten, its guest
    ``<address>``, alias and anything else stay (idempotent, and how a
    migration target takes over the source's slot). Other devices are
    inserted after the last ``<hostdev>``, or at the end of ``<devices>``.
    devmig hostdevs whose alias is not listed are left alone: removing a
    device from a guest is not this hook's call.
    """
    lay = _scan(xml)
    by_alias = {h.alias: h for h in lay.hostdevs if h.alias}
    # (start, end, replacement) edits on the original bytes, applied from the end.
    edits: list[tuple[int, int, str]] = []
    new: list[DomainDevice] = []
    for dev in devices:
        h = by_alias.get(dev.alias)
        if h is None:
            new.append(dev)
            continue
        edits.append((h.start, h.open_end, _open_tag(dev)))
        if h.source is not None:
            edits.append((h.source[0], h.source[1], _source_xml(dev)))
        else:
            edits.append((h.open_end, h.open_end, _source_xml(dev)))
    if new:
        devices_indent = _line_indent(xml, lay.devices_start)
        if lay.hostdevs:
            last = lay.hostdevs[-1]
            indent = last.indent or devices_indent + "  "
            text = "".join(f"\n{indent}{_hostdev_xml(d, indent)}" for d in new)
            edits.append((last.end, last.end, text))
        elif lay.devices_close >= 0:
            indent = devices_indent + "  "
            at = lay.devices_close
            # Keep the closing tag on its own line, indented as it was.
            before_close = _line_indent(xml, at)
            if before_close or xml[:at].endswith(b"\n"):
                line_start = at - len(before_close.encode())
                text = "".join(f"{indent}{_hostdev_xml(d, indent)}\n" for d in new)
                edits.append((line_start, line_start, text))
            else:
                text = "".join(f"{_hostdev_xml(d, indent)}" for d in new)
                edits.append((at, at, text))
        else:  # <devices/>
            indent = devices_indent + "  "
            body = "".join(f"\n{indent}{_hostdev_xml(d, indent)}" for d in new)
            edits.append(
                (lay.devices_start, lay.devices_end, f"<devices>{body}\n{devices_indent}</devices>")
            )
    out = xml
    for start, end, text in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        out = out[:start] + text.encode() + out[end:]
    return out


# --- the hook ----------------------------------------------------------------


class DomainHook:
    """``MutateDomain``: looks up the VMI's devices, then ``mutate_domain``."""

    def __init__(
        self, devices_dir: str = DEFAULT_DEVICES_DIR, env: Mapping[str, str] | None = None
    ):
        self.devices_dir = devices_dir
        self.env = os.environ if env is None else env

    def devices_for(self, vmi: Mapping[str, Any]) -> list[DomainDevice]:
        meta = vmi.get("metadata") if isinstance(vmi.get("metadata"), dict) else None
        if meta is None:
            raise _bad("BadVmiJson", "VMI JSON has no metadata object")
        annotations = meta.get("annotations") or {}
        wanted = annotations.get(DEVICES_ANNOTATION, "") if isinstance(annotations, dict) else ""
        if not isinstance(wanted, str) or not [s for s in wanted.split(",") if s.strip()]:
            return []
        ns, name, uid = meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", "")
        raw = self.env.get(DEVICES_ENV)
        source = f"${DEVICES_ENV}"
        if raw is None:
            source = devices_file(self.devices_dir, str(ns), str(name))
            try:
                with open(source, "rb") as f:
                    raw = f.read().decode()
            except FileNotFoundError:
                # The agent has not assigned the devices yet: KubeVirt retries
                # a failed domain definition, so this is worth a retry.
                raise DomainHookError(
                    grpc.StatusCode.UNAVAILABLE,
                    "DevicesNotAssigned",
                    f"VMI {ns}/{name} asks for devmig devices and {source} does not exist",
                ) from None
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise _bad("BadDeviceList", f"{source}: {e}") from None
        if not isinstance(doc, dict):
            raise _bad("BadDeviceList", f"{source}: not a JSON object")
        file_uid, devices = parse_devices(doc)
        if file_uid and uid and file_uid != uid:
            raise DomainHookError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "StaleDeviceList",
                f"{source} is for VMI UID {file_uid}, this VMI is {uid}",
            )
        return devices

    def mutate(self, context: str, domain: bytes, vmi_json: bytes) -> bytes:
        if context not in MUTATING_CONTEXTS:
            return domain
        try:
            vmi = json.loads(vmi_json)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad("BadVmiJson", str(e)) from None
        if not isinstance(vmi, dict):
            raise _bad("BadVmiJson", "VMI JSON is not an object")
        devices = self.devices_for(vmi)
        if not devices:
            return domain
        return mutate_domain(domain, devices)

    def rpc(self, request: Any, context: grpc.ServicerContext) -> Any:
        ctx = request.sidecar_context.invocation_context
        try:
            domain = self.mutate(ctx, request.domain, request.vmi)
        except DomainHookError as e:
            log.warning("MutateDomain (%s) refused: %s", ctx, e)
            context.abort(e.code, str(e))
        except Exception as e:
            log.exception("MutateDomain (%s) failed", ctx)
            context.abort(grpc.StatusCode.INTERNAL, f"InternalError: {type(e).__name__}: {e}")
        return api_pb2.MutateDomainResponse(domain=domain)


def check_socket_path(path: str, plugin_name: str) -> None:
    """KubeVirt's rules for a sidecar socket; ``ValueError`` naming the broken one."""
    prefix = f"{PLUGIN_SOCKET_ROOT}/{plugin_name}/"
    if not path.startswith(prefix):
        raise ValueError(f"{path}: a sidecar socket must be under {prefix}")
    if not path.endswith(".sock"):
        raise ValueError(f"{path}: a sidecar socket must end with .sock")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"{path}: longer than {MAX_SOCKET_PATH} bytes")
    if posixpath.normpath(path) != path:
        raise ValueError(f"{path}: not a clean path")


# The uid virt-launcher's compute container runs a non-root VM as (KubeVirt's
# "qemu" user): the domain hook's caller.
VIRT_LAUNCHER_UID = 107


def serve(
    hook: DomainHook,
    socket_path: str,
    *,
    allowed_uids: Iterable[int] = (VIRT_LAUNCHER_UID,),
    on_refused: Callable[[int, int], None] | None = None,
    max_workers: int = MAX_WORKERS,
) -> PeerGate:
    """Serve ``DomainHookService`` on ``socket_path`` (stale socket removed
    first); the caller stops the gate. Root, this process's uid and
    ``allowed_uids`` may call; others get PERMISSION_DENIED (PeerNotAllowed),
    checked by their kernel credentials. The file is 0666 when uids other
    than root may call (the check alone decides), else 0600."""
    prepare_socket_path(socket_path)
    rpcs = {
        "MutateDomain": grpc.unary_unary_rpc_method_handler(
            hook.rpc,
            request_deserializer=api_pb2.MutateDomainRequest.FromString,
            response_serializer=api_pb2.MutateDomainResponse.SerializeToString,
        )
    }
    gate = PeerGate(
        socket_path,
        lambda server: server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, rpcs),)
        ),
        {os.getuid(), *allowed_uids},
        max_workers=max_workers,
        on_refused=on_refused
        or (lambda pid, uid: log.warning("refused a caller: pid %d, uid %d", pid, uid)),
    )
    gate.start()
    return gate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="devmig-domain-hook",
        description="KubeVirt domain-hook sidecar: attach devmig devices to the domain",
    )
    p.add_argument("--plugin-name", default=DEFAULT_PLUGIN_NAME, help="the Plugin CR's name")
    p.add_argument("--socket", default=None, help=f"default: {DEFAULT_SOCKET} for plugin devmig")
    p.add_argument("--devices-dir", default=DEFAULT_DEVICES_DIR)
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=None,
        help=f"a uid that may call besides root and this process's (repeatable; "
        f"default {VIRT_LAUNCHER_UID}, virt-launcher's qemu user)",
    )
    p.add_argument(
        "--no-socket-check",
        action="store_true",
        help="skip KubeVirt's socket path rules (tests and local runs only)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    socket_path = a.socket or f"{PLUGIN_SOCKET_ROOT}/{a.plugin_name}/domain.sock"
    if not a.no_socket_check:
        try:
            check_socket_path(socket_path, a.plugin_name)
        except ValueError as e:
            log.error("%s", e)
            return 2
    allowed = a.allow_uid if a.allow_uid is not None else [VIRT_LAUNCHER_UID]
    gate = serve(DomainHook(a.devices_dir), socket_path, allowed_uids=allowed)
    # Machine-readable first line, as devmig-agent prints its address.
    print(f"LISTENING unix://{socket_path}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    gate.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
