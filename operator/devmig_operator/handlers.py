"""The operator's only kopf decorators. Each is thin: it builds a Context and
hands over to ``drive.reconcile``; "not yet" becomes TemporaryError."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import kopf
from kubernetes import client, config

from devmig_operator import GROUP, VERSION, automode, drive, kubevirt
from devmig_operator import agents as agentsmod
from devmig_operator.cluster import DM_PLURAL, Cluster
from devmig_operator.context import Context

log = logging.getLogger("devmig_operator")

# Most migrations one node may receive at once; set by --max-migrations-per-node.
# Two by default: each incoming migration streams device state at up to
# line rate, so two already share the node's link; more would stretch every
# one's stop-copy window (the downtime) without finishing sooner.
MAX_MIGRATIONS_PER_NODE = 2

# Namespace the operator runs in: device-claim Leases and the session-key
# Secret live there. Set from the downward API by the chart.
NAMESPACE = os.environ.get("DEVMIG_NAMESPACE", "devmig-system")


@functools.cache
def _cluster() -> Cluster:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return Cluster(client.ApiClient(), NAMESPACE)


@functools.cache
def _agents() -> agentsmod.Agents:
    tls_dir = os.environ.get("DEVMIG_TLS_DIR", "")
    if not tls_dir:
        log.warning(
            "DEVMIG_TLS_DIR is not set: talking to agents without TLS (tests and labs only)"
        )
        return agentsmod.Agents()
    return agentsmod.Agents(
        agentsmod.tls_credentials(tls_dir), os.environ.get("DEVMIG_AGENT_TLS_SERVER_NAME", "")
    )


@functools.cache
def _key() -> bytes:
    return agentsmod.session_key(_cluster().core, NAMESPACE)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations under our own prefix: the
    # DeviceMigration status schema is devmig's contract and has no room for
    # kopf's fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="devmig.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="devmig.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    # Reconnect watches every 10 minutes: stale connections through load
    # balancers then never hide events for long.
    settings.watching.server_timeout = 600


def _drive(body: kopf.Body, **_: Any) -> None:
    cluster = _cluster()
    meta = body["metadata"]
    fresh = cluster.get_dm(meta["namespace"], meta["name"])
    if fresh is None:
        return
    ctx = Context(
        cluster=cluster,
        namespace=meta["namespace"],
        name=meta["name"],
        uid=fresh["metadata"]["uid"],
        generation=int(fresh["metadata"].get("generation", 1)),
        spec=dict(fresh.get("spec") or {}),
        status=dict(fresh.get("status") or {}),
        max_migrations_per_node=MAX_MIGRATIONS_PER_NODE,
    )

    def emit(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    delay = drive.reconcile(ctx, _agents(), _key, emit)
    if delay is not None:
        raise kopf.TemporaryError(ctx.status.get("message", "waiting"), delay=delay)


@kopf.on.create(GROUP, VERSION, DM_PLURAL, retries=None)
def created(body: kopf.Body, **kw: Any) -> None:
    _drive(body, **kw)


@kopf.on.resume(GROUP, VERSION, DM_PLURAL, retries=None)
def resumed(body: kopf.Body, **kw: Any) -> None:
    _drive(body, **kw)


@kopf.on.update(GROUP, VERSION, DM_PLURAL, field="spec.cancel", retries=None)
def cancel_changed(body: kopf.Body, **kw: Any) -> None:
    _drive(body, **kw)


@kopf.on.create(kubevirt.GROUP, kubevirt.VERSION, kubevirt.VMIM_PLURAL, retries=None)
@kopf.on.update(
    kubevirt.GROUP, kubevirt.VERSION, kubevirt.VMIM_PLURAL, field="status", retries=None
)
@kopf.on.resume(kubevirt.GROUP, kubevirt.VERSION, kubevirt.VMIM_PLURAL, retries=None)
def vmim_changed(body: kopf.Body, **_: Any) -> None:
    cluster = _cluster()
    meta = body["metadata"]
    vmi = cluster.get_vmi(meta["namespace"], body["spec"]["vmiName"])
    dm = automode.device_migration_for(body, vmi)
    if dm is not None and cluster.create_dm_if_absent(dm):
        kopf.info(
            body, reason="DeviceMigrationCreated", message=f"created {dm['metadata']['name']}"
        )
