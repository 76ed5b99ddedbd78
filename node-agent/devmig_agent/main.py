"""``devmig-agent``: run the node agent's gRPC server.

What it starts, from its flags and the environment the chart sets:

- the gRPC API (``--listen``; mutual TLS from ``DEVMIG_TLS_DIR``);
- the node's VFIO devices found in sysfs (``DEVMIG_VFIO_DISCOVERY``): with
  ``on`` the free migratable ones are opened and driven, with ``list``
  only listed;
- with devices to drive (``--sim`` / ``DEVMIG_SIM``, or discovery ``on``):
  the session manager over the journal in ``DEVMIG_STATE_DIR``, recovering
  what the journal holds, and the data path (``DEVMIG_DATA_PORT``);
- the KubeVirt node-hook server on ``DEVMIG_HOOK_SOCKET`` (off when unset);
- who holds which device from the kubelet (``DEVMIG_POD_RESOURCES_SOCKET``)
  when that socket exists and no ``--sim-holder`` is given;
- the VMM contract (``vmm.py``) on ``--vmm-socket`` (off when empty);
- Prometheus metrics (``metrics.py``) on ``DEVMIG_METRICS_PORT`` (off when
  unset or 0, or when prometheus-client is not installed);
- on SIGTERM: no new hook or API call, every session settled
  (``SessionManager.shutdown``), then exit 0.

The gRPC health service (``health.py``) says SERVING once all of this runs
and NOT_SERVING from the first moment of a shutdown.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import select
import signal
import socket
import sys
import threading
from concurrent import futures
from typing import Any

import grpc

import devmig_native
from devmig_agent import (
    datapath,
    devices,
    discovery,
    health,
    hooks_kubevirt,
    hooks_sessions,
    inventory,
    journal,
    metrics,
    podresources,
    security,
    server,
    sessions,
    vmm,
)

log = logging.getLogger("devmig_agent")

# Worker threads for unary RPCs; streaming RPCs hold a thread each, and a
# node runs a handful of sessions at most, so 16 leaves ample headroom.
MAX_WORKERS = 16
# Seconds between reads of the kubelet's pod resources: the same poll as the
# inventory's, so a device newly held shows up in the next publish.
HOLDERS_POLL_SECONDS = inventory.POLL_SECONDS
# Seconds in-flight RPCs get to finish at SIGTERM before the sessions are
# settled; the chart's terminationGracePeriodSeconds (60) leaves the rest
# for rolling back devices.
SHUTDOWN_GRACE_SECONDS = 5.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# How long the re-evaluate hint watcher waits before looking again for
# devices added or removed, seconds: one wake-up a second, and a new
# device's hints are followed within a second.
HINT_IDLE_SECONDS = 1.0


class NoDeviceBackend:
    """Hooks of an agent that cannot migrate: a devmig VMI must not move."""

    def _refuse(self, vmi: hooks_kubevirt.HookVmi) -> None:
        raise hooks_kubevirt.HookError(
            hooks_kubevirt.HookErrorKind.UNAVAILABLE,
            "NoDeviceBackend",
            f"the devmig agent on {vmi.node_name} runs without devices; "
            f"VMI {vmi.key} cannot migrate its devices",
        )

    pre_migration_source = _refuse
    pre_migration_target = _refuse
    post_migration_target = _refuse


def refresh_holders(
    registry: devices.DeviceRegistry, socket_path: str, stop: threading.Event
) -> None:
    """Keep the registry's pod and VMI per device in step with the kubelet."""
    with podresources.PodResourcesClient(socket_path) as client:
        while not stop.is_set():
            try:
                held = podresources.device_holders(
                    client.list_assignments(), inventory.node_device_keys(registry.inventory())
                )
                registry.set_holders(inventory.with_holders(registry.inventory(), held))
            except podresources.PodResourcesError as e:
                log.warning("pod resources: %s", e)
            stop.wait(HOLDERS_POLL_SECONDS)


def discover(
    registry: devices.DeviceRegistry,
    find: discovery.Discovery,
    reacquirer: vmm.VmmReacquirer | None = None,
) -> None:
    """One sysfs walk: the found-only list replaced; devices a probe left
    open (``--vfio-discovery on``) added to the registry; devices whose fd
    a VMM handed back while no session claimed them opened from it."""
    registry.set_discovered(find(registry.ids()))
    for info, opened in find.take_opened():
        try:
            registry.add(devices.ManagedDevice(info, opened.device, vfio=opened.vfio))
        except devices.DeviceBusy:
            opened.close()
            continue
        log.info("opened %s (%s) to drive its migration", info.id, info.driver)
    if reacquirer is not None:
        reacquirer.adopt_handed_back()


def rediscover(
    registry: devices.DeviceRegistry,
    find: discovery.Discovery,
    reacquirer: vmm.VmmReacquirer | None,
    stop: threading.Event,
) -> None:
    """Walk sysfs again every poll: a device bound to vfio-pci, or an mdev
    created, appears in the inventory within one interval."""
    while not stop.wait(inventory.POLL_SECONDS):
        try:
            discover(registry, find, reacquirer)
        except OSError as e:
            log.warning("VFIO discovery: %s", e)


def watch_reevaluate_hints(
    registry: devices.DeviceRegistry, manager: sessions.SessionManager, stop: threading.Event
) -> None:
    """Follow the devices' re-evaluate hints (an eventfd a device signals
    when its mappable BAR areas change; the simulated device has one, many
    real ones have none) and pass each on to the device's VMM."""
    fds: dict[int, str] = {}
    seen = -1
    while not stop.is_set():
        if registry.generation != seen:
            seen = registry.generation
            fds = {}
            for d in registry.all():
                if isinstance(d.handle, devmig_native.SimDevice):
                    # OSError: no eventfd, so this device offers no hint.
                    with contextlib.suppress(OSError):
                        fds[d.handle.reeval_eventfd()] = d.id
        if not fds:
            stop.wait(HINT_IDLE_SECONDS)
            continue
        ready, _, _ = select.select(list(fds), [], [], HINT_IDLE_SECONDS)
        for fd in ready:
            try:
                os.read(fd, 8)  # an eventfd's counter; reading resets it
            except BlockingIOError:
                continue
            manager.reevaluate(fds[fd])


def kube_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(client.ApiClient())


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
        "--operator-identity",
        action="append",
        default=[x for x in os.environ.get("DEVMIG_OPERATOR_IDENTITY", "").split(",") if x],
        metavar="NAME",
        help="with --tls-dir: the certificate name (CN or SAN) a client needs to drive "
        "sessions (prepare, pre-copy, stop, resume, finish, abort); repeatable; none: "
        "any client with a certificate from the CA (env DEVMIG_OPERATOR_IDENTITY, "
        "comma-separated)",
    )
    p.add_argument(
        "--sim",
        default=os.environ.get("DEVMIG_SIM", ""),
        metavar="SPEC",
        help="serve simulated devices, e.g. count=2,size=64MiB,dirty=16 (env DEVMIG_SIM)",
    )
    p.add_argument(
        "--sim-holder",
        action="append",
        default=[],
        metavar="N=NAMESPACE/VMI",
        help="simulated device N is held by that VMI (no kubelet tells us on a lab node)",
    )
    p.add_argument(
        "--device-holder",
        action="append",
        default=[],
        metavar="ID=NAMESPACE/VMI",
        help="the device with that id (PCI address, mdev UUID) is held by that VMI "
        "(a lab node without a kubelet)",
    )
    p.add_argument(
        "--publish-inventory",
        action="store_true",
        # In a pod the kubelet mounts a ServiceAccount token here.
        default=os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        help="publish this node's NodeDeviceInventory (default: when running in a cluster; "
        "uses the in-cluster config or KUBECONFIG)",
    )
    p.add_argument(
        "--state-dir",
        default=os.environ.get("DEVMIG_STATE_DIR", "/var/lib/devmig"),
        help="where the session journal lives (env DEVMIG_STATE_DIR; default %(default)s)",
    )
    p.add_argument(
        "--data-listen",
        default="",
        help="host:port for device-state streams from peer agents "
        "(default: the gRPC host, port from DEVMIG_DATA_PORT or any free one)",
    )
    p.add_argument(
        "--advertise-host",
        default=os.environ.get("POD_IP", ""),
        help="address peers and the operator use to reach this agent (env POD_IP)",
    )
    p.add_argument(
        "--advertise-endpoint",
        default="",
        metavar="HOST:PORT",
        help="the gRPC endpoint the inventory publishes for the operator, when it "
        "reaches this agent through a port forward (default: the advertise host and "
        "the listening port)",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("DEVMIG_LOG_LEVEL", "INFO").upper(),
        type=str.upper,
        choices=LOG_LEVELS,
        help="env DEVMIG_LOG_LEVEL (default %(default)s)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("DEVMIG_METRICS_PORT") or 0),
        help="serve Prometheus metrics on this port, 0 for none (env DEVMIG_METRICS_PORT)",
    )
    p.add_argument(
        "--hook-socket",
        default=os.environ.get("DEVMIG_HOOK_SOCKET", ""),
        help="serve KubeVirt node hooks on this Unix socket, empty for none "
        f"(env DEVMIG_HOOK_SOCKET; the chart's is {hooks_kubevirt.DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--hook-uid",
        type=int,
        action="append",
        default=[],
        help="a uid besides root that may call the node hooks (repeatable); virt-handler, "
        "their caller, runs as root, so none is needed with KubeVirt",
    )
    p.add_argument(
        "--pod-resources-socket",
        default=os.environ.get("DEVMIG_POD_RESOURCES_SOCKET", podresources.DEFAULT_SOCKET),
        help="the kubelet's pod-resources socket, read when it exists "
        "(env DEVMIG_POD_RESOURCES_SOCKET; default %(default)s)",
    )
    p.add_argument(
        "--data-seal",
        choices=("on", "off"),
        default=os.environ.get("DEVMIG_DATA_SEAL", "on"),
        help="with --tls-dir: agree a key inside TLS and seal device-state streams in the "
        "native core (AES-NI) instead of sending them through TLS; 'off' keeps every stream "
        "on TLS (env DEVMIG_DATA_SEAL; default %(default)s)",
    )
    p.add_argument(
        "--vfio-discovery",
        choices=("on", "list", "off"),
        default=os.environ.get("DEVMIG_VFIO_DISCOVERY", "on"),
        help="find the node's VFIO devices (PCI functions on vfio-pci or a variant, "
        "mdevs) in sysfs and probe each for migration; 'on' also opens the free "
        "migratable ones and drives their migrations (VMMs get their fds from the "
        "VMM socket), 'list' only lists them (env DEVMIG_VFIO_DISCOVERY; "
        "default %(default)s)",
    )
    p.add_argument(
        "--sysfs-root", default="/sys", help="where sysfs is mounted (default %(default)s)"
    )
    p.add_argument(
        "--dev-root", default="/dev", help="where the device nodes are (default %(default)s)"
    )
    p.add_argument(
        "--vmm-socket",
        default=os.environ.get("DEVMIG_VMM_SOCKET", ""),
        help="serve the VMM contract (vmm.py) on this Unix socket, empty for none "
        "(env DEVMIG_VMM_SOCKET)",
    )
    p.add_argument(
        "--vmm-uid",
        type=int,
        default=int(os.environ["DEVMIG_VMM_UID"]) if os.environ.get("DEVMIG_VMM_UID") else None,
        help="a uid besides root that may register as a VMM, e.g. virt-launcher's qemu, 107 "
        "(env DEVMIG_VMM_UID)",
    )
    p.add_argument(
        "--recovery-deadline",
        type=float,
        default=sessions.DEFAULT_RECOVERY_DEADLINE_SECONDS,
        metavar="SECONDS",
        help="after a restart, how long an unfinished session waits for the operator "
        "before the agent rolls it back (default %(default)s)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve without TLS on a non-loopback address (never in production)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, a.log_level),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS))
    host = a.listen.rsplit(":", 1)[0]
    tls = None
    if a.tls_dir:
        try:
            tls = security.TlsFiles.load(a.tls_dir)
        except security.TlsConfigError as e:
            log.error("%s", e)
            return 1
    registry, sessions_ = None, None
    dp_: datapath.DataPath | None = None
    agent_metrics: metrics.AgentMetrics | None = None
    if a.metrics_port:
        if metrics.available():
            agent_metrics = metrics.AgentMetrics(a.node_name, lambda: sessions_)
        else:
            log.warning("prometheus-client is not installed: no metrics on :%d", a.metrics_port)
    if a.sim:
        try:
            spec = devices.SimSpec.parse(a.sim)
        except ValueError as e:
            log.error("--sim: %s", e)
            return 2
        registry = devices.simulated(a.node_name, spec)
        for h in a.sim_holder:
            idx, _, vmi = h.partition("=")
            try:
                registry.set_holder(f"sim-{a.node_name}-{int(idx)}", vmi)
            except (ValueError, devices.UnknownDevice) as e:
                log.error("--sim-holder %s: %s", h, e)
                return 2
        log.info("%d simulated device(s)", spec.count)
    find: discovery.Discovery | None = None
    if a.vfio_discovery != "off":
        registry = registry or devices.DeviceRegistry([])
        find = discovery.Discovery(a.sysfs_root, a.dev_root, keep=a.vfio_discovery == "on")
        discover(registry, find)
        opened = sum(1 for d in registry.all() if d.vfio is not None)
        log.info(
            "%d VFIO device(s) found in %s, %d opened",
            len(registry.discovered()) + opened,
            a.sysfs_root,
            opened,
        )
    for h in a.device_holder:
        dev_id, _, vmi = h.partition("=")
        if not dev_id or "/" not in vmi:
            log.error("--device-holder %s: want ID=NAMESPACE/VMI", h)
            return 2
        registry = registry or devices.DeviceRegistry([])
        registry.pin_holder(dev_id, vmi)
    reacquirer: vmm.VmmReacquirer | None = None
    if registry is not None and (a.sim or a.vfio_discovery == "on"):
        j = journal.Journal(pathlib.Path(a.state_dir) / "sessions")
        try:
            j.directory.mkdir(parents=True, exist_ok=True)
            j.load()
        except OSError as e:
            log.error("cannot use the session journal in %s: %s", j.directory, e)
            return 1
        data_host, _, data_port = (
            a.data_listen or f"{host}:{os.environ.get('DEVMIG_DATA_PORT', '0')}"
        ).rpartition(":")
        manager: list[sessions.SessionManager] = []
        dp = datapath.DataPath(
            data_host,
            int(data_port),
            lambda s, e: manager[0].on_transfer_done(s, e),
            tls,
            a.advertise_host or data_host,
            seal=a.data_seal == "on",
        )
        dp_ = dp
        hub: vmm.VmmHub | None = None
        if a.vmm_socket:
            try:
                hub = vmm.VmmHub(a.vmm_socket, registry, allowed_uid=a.vmm_uid)
            except OSError as e:
                log.error("cannot serve the VMM socket %s: %s", a.vmm_socket, e)
                return 1
            log.info("VMMs register on %s", a.vmm_socket)
        manager.append(sessions.SessionManager(registry, j, dp, vmm=hub, observer=agent_metrics))
        if hub is not None:
            hub.dirty_source = manager[0].vmm_dirty
        sessions_ = manager[0]
        # With a VMM socket, devices whose VMM kept their fd through the
        # restart are taken back from it.
        reacquirer = vmm.VmmReacquirer(hub, registry) if hub is not None else None
        for snap in sessions_.recover(reacquirer, deadline_s=a.recovery_deadline):
            log.warning(
                "session %s (%s of %s) unfinished at start: %s %s",
                snap.session_id,
                snap.role.value,
                snap.device_id,
                snap.phase.value,
                snap.message,
            )
        log.info("device state accepted on %s", dp.advertise)
    identities = frozenset(a.operator_identity)
    if identities and tls is None:
        log.warning("--operator-identity needs --tls-dir: without TLS no client is identified")
        identities = frozenset()
    server.add_to_server(srv, a.node_name, registry, sessions_, identities)
    agent_health = health.AgentHealth()
    agent_health.add_to(srv)
    if tls is not None:
        port = srv.add_secure_port(a.listen, tls.server_credentials())
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
    stop = threading.Event()
    if sessions_ is not None:
        threading.Thread(
            target=sessions_.run_recovery_deadlines, args=(stop,), daemon=True, name="recovery"
        ).start()
    if sessions_ is not None and registry is not None:
        threading.Thread(
            target=watch_reevaluate_hints,
            args=(registry, sessions_, stop),
            daemon=True,
            name="reevaluate",
        ).start()
    if find is not None and registry is not None:
        threading.Thread(
            target=rediscover,
            args=(registry, find, reacquirer, stop),
            daemon=True,
            name="discovery",
        ).start()
    by_hand = a.sim_holder or a.device_holder
    if registry is not None and not by_hand and os.path.exists(a.pod_resources_socket):
        threading.Thread(
            target=refresh_holders,
            args=(registry, a.pod_resources_socket, stop),
            daemon=True,
            name="holders",
        ).start()
    if agent_metrics is not None:
        try:
            agent_metrics.serve(a.metrics_port)
        except OSError as e:
            log.error("cannot serve metrics on :%d: %s", a.metrics_port, e)
            srv.stop(None)
            return 1
        log.info("metrics on :%d/metrics", a.metrics_port)
    hook_server = None
    if a.hook_socket:
        hooks: hooks_kubevirt.MigrationHooks = NoDeviceBackend()
        if sessions_ is not None and registry is not None:
            hooks = hooks_sessions.SessionHooks(
                sessions_, hooks_sessions.registry_devices(registry)
            )
        try:
            hook_server = hooks_kubevirt.serve_node_hooks(
                hooks,
                a.hook_socket,
                allowed_uids=a.hook_uid,
                on_refused=agent_metrics.peer_refused if agent_metrics is not None else None,
            )
        except OSError as e:
            log.error("cannot serve KubeVirt node hooks on %s: %s", a.hook_socket, e)
            srv.stop(None)
            return 1
        log.info("KubeVirt node hooks on %s", a.hook_socket)
    if a.publish_inventory:
        adv = a.advertise_endpoint or f"{a.advertise_host or host}:{port}"
        pub = inventory.InventoryPublisher(
            kube_api(),
            a.node_name,
            (registry or devices.DeviceRegistry([])).inventory,
            agent_endpoint=adv,
        )
        threading.Thread(target=pub.run, args=(stop,), daemon=True, name="inventory").start()
    agent_health.serving()
    # The first stdout line is machine-readable so launchers can find the port.
    print(f"LISTENING {host}:{port}", flush=True)
    log.info("agent for node %s serving on %s:%d", a.node_name, host, port)

    def terminate(*_: object) -> None:
        # Runs on the main thread while it waits below; the work happens
        # there too, so the handler only asks.
        stop.set()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    stop.wait()
    log.info("stopping: no new calls, then every session settled")
    agent_health.shutting_down()
    if hook_server is not None:
        hook_server.stop(grace=SHUTDOWN_GRACE_SECONDS).wait()
    srv.stop(grace=SHUTDOWN_GRACE_SECONDS).wait()
    if sessions_ is not None:
        for sid in sessions_.shutdown("the agent received SIGTERM"):
            rec = sessions_.journal.get(sid)
            log.warning(
                "session %s settled at shutdown: %s %s",
                sid,
                rec.phase if rec else "?",
                rec.reason if rec else "",
            )
    if dp_ is not None:
        dp_.shutdown()
    if agent_metrics is not None:
        agent_metrics.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
