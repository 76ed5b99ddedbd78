"""Leader election on a real Lease in the real API server, with time moved
by hand: one replica leads, a follower takes over only once the leader
stopped renewing for a lease duration or released it, and of two replicas
writing from the same read only one wins."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from kubernetes import client

from devmig_operator.leader import LeaderElection

pytestmark = pytest.mark.controlplane


class Clock:
    def __init__(self) -> None:
        self.t = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        self.mono = 1000.0

    def now(self) -> datetime.datetime:
        return self.t

    def monotonic(self) -> float:
        return self.mono

    def advance(self, s: float) -> None:
        self.t += datetime.timedelta(seconds=s)
        self.mono += s


def _replica(coord: Any, ns: str, who: str, clock: Clock) -> LeaderElection:
    return LeaderElection(
        coord, ns, "devmig-operator", who, lease_duration_s=15, clock=clock.now,
        monotonic=clock.monotonic,
    )  # fmt: skip


def test_one_replica_leads_until_it_stops_renewing_or_releases(kube: Any, namespace: str) -> None:
    coord = client.CoordinationV1Api(kube)
    clock = Clock()
    a, b = _replica(coord, namespace, "a", clock), _replica(coord, namespace, "b", clock)
    assert a.try_acquire_or_renew()  # created the Lease
    assert not b.try_acquire_or_renew()
    clock.advance(10)
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()  # renewed in time
    clock.advance(14)
    assert not b.try_acquire_or_renew()  # 14 s since the renewal: still held
    assert not a.lost()
    clock.advance(2)
    # 16 s without a renewal: the follower takes over; the old leader
    # knows it lost and cannot take the Lease back.
    assert b.try_acquire_or_renew()
    assert a.lost() and not a.try_acquire_or_renew()
    lease = coord.read_namespaced_lease("devmig-operator", namespace)
    assert (lease.spec.holder_identity, lease.spec.lease_transitions) == ("b", 1)
    # A clean stop releases it: the other replica leads at once.
    b.release()
    assert a.try_acquire_or_renew()
    assert coord.read_namespaced_lease("devmig-operator", namespace).spec.holder_identity == "a"


def test_of_two_replicas_taking_an_expired_lease_from_one_read_only_one_wins(
    kube: Any, namespace: str
) -> None:
    coord = client.CoordinationV1Api(kube)
    clock = Clock()
    a = _replica(coord, namespace, "a", clock)
    assert a.try_acquire_or_renew()
    clock.advance(20)  # a died
    stale = coord.read_namespaced_lease("devmig-operator", namespace)

    class StaleRead:
        """The API as replica c saw it: the read from before b's write."""

        def read_namespaced_lease(self, name: str, ns: str) -> Any:
            return stale

        def __getattr__(self, attr: str) -> Any:
            return getattr(coord, attr)

    b = _replica(coord, namespace, "b", clock)
    c = _replica(StaleRead(), namespace, "c", clock)
    assert b.try_acquire_or_renew()
    assert not c.try_acquire_or_renew()  # its write carried a stale resourceVersion
    assert coord.read_namespaced_lease("devmig-operator", namespace).spec.holder_identity == "b"
