"""Leader election on a coordination.k8s.io Lease, so that any number of
operator replicas can run and exactly one acts.

The protocol is the one client-go's leaderelection uses: the Lease names
its holder and when the holder last renewed it; a replica may take the
Lease when it is free or when the holder has not renewed it for
``leaseDurationSeconds``; every write carries the resourceVersion it read,
so of two replicas racing for it the API server accepts one. The leader
renews every ``renew_s``; a leader that cannot renew within the lease
duration must stop acting at once (``lost``), because another replica may
already have taken over. A leader that stops cleanly releases the Lease,
so a follower takes over within one retry instead of one lease duration.

Why not kopf's peering: the replicas would need kopf's peering CRDs in
the cluster, and a replica kopf had paused in favour of another was seen
here handling a new DeviceMigration right after pausing; a Lease is an
API every cluster has, and the operator already claims devices with them.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("devmig_operator")

# Defaults, seconds, as client-go's (15 / 10 / 2): a follower takes over
# 15 s after the leader died; the leader renews every 5 s, so a missed
# renew or two does not cost it the lease; followers try every 2 s.
LEASE_DURATION_S = 15
RENEW_S = 5.0
RETRY_S = 2.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _micro(t: datetime.datetime) -> datetime.datetime:
    """A time the client writes as a MicroTime the API server accepts: it
    parses exactly six fractional digits, and the client (isoformat) writes
    none for a time whose microseconds are 0, so those become 1."""
    return t if t.microsecond else t.replace(microsecond=1)


@dataclasses.dataclass
class LeaderElection:
    coord: client.CoordinationV1Api
    namespace: str
    name: str
    identity: str
    lease_duration_s: int = LEASE_DURATION_S
    # Wall clock; injected so tests can move time.
    clock: Callable[[], datetime.datetime] = _now
    # When this replica last renewed successfully (monotonic, seconds).
    renewed_at: float = 0.0
    monotonic: Callable[[], float] = time.monotonic

    def _lease(
        self,
        holder: str,
        transitions: int,
        acquired: datetime.datetime | None,
        resource_version: str | None = None,
        renewed: bool = True,
    ) -> client.V1Lease:
        now = self.clock()
        return client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=self.name, namespace=self.namespace, resource_version=resource_version
            ),
            spec=client.V1LeaseSpec(
                holder_identity=holder,
                lease_duration_seconds=self.lease_duration_s,
                acquire_time=_micro(acquired or now),
                renew_time=_micro(now) if renewed else None,
                lease_transitions=transitions,
            ),
        )

    def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this replica holds the Lease afterwards."""
        try:
            cur = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                log.warning("leader election: reading Lease %s: %s", self.name, e.reason)
                return False
            try:
                self.coord.create_namespaced_lease(
                    self.namespace, self._lease(self.identity, 0, None)
                )
            except ApiException as e2:
                if e2.status != 409:  # 409: another replica created it first
                    log.warning("leader election: creating Lease %s: %s", self.name, e2.reason)
                return False
            self.renewed_at = self.monotonic()
            return True
        spec = cur.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or ""
        mine = holder == self.identity
        if holder and not mine:
            renewed = spec.renew_time or spec.acquire_time
            duration = spec.lease_duration_seconds or self.lease_duration_s
            if renewed is not None and self.clock() < renewed + datetime.timedelta(
                seconds=duration
            ):
                return False  # held, and renewed recently enough
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        assert cur.metadata is not None
        # The resourceVersion read: of two replicas taking a free or expired
        # Lease, the API server accepts exactly one (409 for the other).
        lease = self._lease(
            self.identity,
            transitions,
            spec.acquire_time if mine else None,
            cur.metadata.resource_version,
        )
        try:
            self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as e:
            if e.status != 409:
                log.warning("leader election: updating Lease %s: %s", self.name, e.reason)
            return False
        if not mine:
            log.info("leader election: %s now leads (Lease %s/%s)", self.identity,
                     self.namespace, self.name)  # fmt: skip
        self.renewed_at = self.monotonic()
        return True

    def lost(self) -> bool:
        """Whether this leader went a whole lease duration without renewing:
        another replica may lead now."""
        return self.monotonic() - self.renewed_at >= self.lease_duration_s

    def release(self) -> None:
        """Give the Lease up (clean stop), so a follower need not wait for
        it to expire. Only if this replica still holds it."""
        try:
            cur = self.coord.read_namespaced_lease(self.name, self.namespace)
            if cur.spec is None or cur.spec.holder_identity != self.identity:
                return
            assert cur.metadata is not None
            free = self._lease(
                "",
                cur.spec.lease_transitions or 0,
                cur.spec.acquire_time,
                cur.metadata.resource_version,
                renewed=False,
            )
            self.coord.replace_namespaced_lease(self.name, self.namespace, free)
            log.info("leader election: %s released Lease %s", self.identity, self.name)
        except ApiException as e:
            log.warning("leader election: releasing Lease %s: %s", self.name, e.reason)
