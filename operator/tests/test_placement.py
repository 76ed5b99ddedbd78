"""Target choice (pure) and device claims (against the real API server)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kubernetes import client

from devmig_operator import placement
from devmig_operator.placement import Choice, NoTarget, choose_targets


def dev(id_: str, **kw: Any) -> dict[str, Any]:
    d = {
        "id": id_,
        "vendorId": "0x10de",
        "deviceId": "0x1eb8",
        "subsystemVendorId": "0x10de",
        "subsystemDeviceId": "0x12a2",
        "driver": "nvidia-vfio-pci",
        "driverVersion": "580.1",
        "mdevType": "",
        "migrationFlags": ["STOP_COPY", "P2P", "PRE_COPY"],
        "migratable": True,
        "health": "Healthy",
    }
    d.update(kw)
    return d


def inv(node: str, *devices: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"nodeName": node}, "status": {"devices": list(devices)}}


SRC = [dev("0000:3b:00.0")]
ALL = {"a", "b", "c"}


def test_the_first_node_with_a_compatible_free_device_is_chosen() -> None:
    got = choose_targets(
        SRC, [inv("c", dev("c1")), inv("b", dev("b1")), inv("a", dev("a1"))], "a", ALL, set()
    )
    assert got == [Choice("0000:3b:00.0", "b", "b1")]


def test_the_source_node_is_never_a_target() -> None:
    with pytest.raises(NoTarget):
        choose_targets(SRC, [inv("a", dev("a1"))], "a", ALL, set())


def test_a_device_differing_in_driver_version_is_not_compatible() -> None:
    with pytest.raises(NoTarget, match="driverVersion"):
        choose_targets(SRC, [inv("b", dev("b1", driverVersion="570.0"))], "a", ALL, set())


def test_claimed_and_in_use_devices_are_skipped() -> None:
    invs = [inv("b", dev("b1"), dev("b2", vmi="ns/other"), dev("b3"))]
    got = choose_targets(SRC, invs, "a", ALL, {("b", "b1")})
    assert got[0].target_device == "b3"


def test_the_target_pods_own_devices_are_taken_first_and_others_in_use_never() -> None:
    # KubeVirt migrating ns/vm: its target pod on b already holds b2.
    invs = [inv("b", dev("b1"), dev("b2", vmi="ns/vm"), dev("b3", vmi="ns/other"))]
    got = choose_targets(SRC, invs, "a", ALL, set(), vmi_ref="ns/vm")
    assert got[0].target_device == "b2"
    # Without that VMI, b2 is in use like b3.
    assert choose_targets(SRC, invs, "a", ALL, set())[0].target_device == "b1"
    with pytest.raises(NoTarget, match="b3 is in use by ns/other"):
        choose_targets(SRC, [inv("b", dev("b3", vmi="ns/other"))], "a", ALL, set(), vmi_ref="ns/vm")


def test_several_devices_need_p2p_and_land_on_one_node() -> None:
    src = [dev("s1"), dev("s2")]
    no_p2p = [dev(f"b{i}", migrationFlags=["STOP_COPY", "PRE_COPY"]) for i in range(2)]
    with pytest.raises(NoTarget, match="P2P"):
        choose_targets(src, [inv("b", *no_p2p)], "a", ALL, set())
    # c has only one device: the VM's two devices cannot be split across nodes.
    got = choose_targets(
        src, [inv("c", dev("c1")), inv("d", dev("d1"), dev("d2"))], "a", ALL | {"d"}, set()
    )
    assert {(c.target_node, c.target_device) for c in got} == {("d", "d1"), ("d", "d2")}


def test_an_unschedulable_node_and_a_requested_node_are_honoured() -> None:
    invs = [inv("b", dev("b1")), inv("c", dev("c1"))]
    assert choose_targets(SRC, invs, "a", {"c"}, set())[0].target_node == "c"
    assert choose_targets(SRC, invs, "a", ALL, set(), target_node="c")[0].target_node == "c"
    with pytest.raises(NoTarget, match="no device inventory"):
        choose_targets(SRC, invs, "a", ALL, set(), target_node="zz")


def test_lease_names_are_valid_and_distinct() -> None:
    a = placement.lease_name("node-a", "0000:3b:00.0")
    b = placement.lease_name("node-a", "0000:3b:00.1")
    assert a != b and len(a) <= 63
    import re

    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", a)


def test_two_migrations_racing_for_one_device_never_both_win(kube: Any, namespace: str) -> None:
    coord = client.CoordinationV1Api(kube)
    invs = [inv("b", dev("b1"))]
    results: dict[str, Any] = {}
    start = threading.Barrier(2)

    def attempt(who: str) -> None:
        start.wait()
        try:
            results[who] = placement.claim_targets(coord, namespace, who, SRC, invs, "a", ALL)
        except NoTarget as e:
            results[who] = e

    threads = [threading.Thread(target=attempt, args=(w,)) for w in ("ns/m1/u1", "ns/m2/u2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [w for w, r in results.items() if isinstance(r, list)]
    assert len(winners) == 1, results
    loser = next(w for w in results if w not in winners)
    assert isinstance(results[loser], NoTarget)
    assert placement.claims(coord, namespace) == {("b", "b1"): winners[0]}


def test_claiming_again_is_idempotent_and_release_frees_the_device(
    kube: Any, namespace: str
) -> None:
    coord = client.CoordinationV1Api(kube)
    invs = [inv("b", dev("b1"), dev("b2"))]
    first = placement.claim_targets(coord, namespace, "ns/m1/u1", SRC, invs, "a", ALL)
    again = placement.claim_targets(coord, namespace, "ns/m1/u1", SRC, invs, "a", ALL)
    assert first == again
    assert len(placement.claims(coord, namespace)) == 1
    # Someone else cannot release it.
    placement.release(coord, namespace, "b", first[0].target_device, "ns/m9/u9")
    assert len(placement.claims(coord, namespace)) == 1
    placement.release(coord, namespace, "b", first[0].target_device, "ns/m1/u1")
    placement.release(coord, namespace, "b", first[0].target_device, "ns/m1/u1")
    assert placement.claims(coord, namespace) == {}


def test_a_node_at_its_migration_limit_is_skipped_with_the_reason() -> None:
    held = {("b", "b1"): "ns/m1/u1", ("b", "b2"): "ns/m2/u2", ("c", "c1"): "ns/m3/u3"}
    busy = placement.busy_nodes(held, "ns/m9/u9", 2)
    assert set(busy) == {"b"} and "2 migration(s)" in busy["b"]
    invs = [inv("b", dev("b3")), inv("c", dev("c2"))]
    got = choose_targets(SRC, invs, "a", ALL, set(held), busy_nodes=busy)
    assert got[0].target_node == "c"
    # Our own claims never count against us; 0 means no limit.
    assert placement.busy_nodes(held, "ns/m1/u1", 2) == {}
    assert placement.busy_nodes(held, "ns/m9/u9", 0) == {}
