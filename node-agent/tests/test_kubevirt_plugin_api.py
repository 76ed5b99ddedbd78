"""The installed KubeVirt Plugins hook API has KubeVirt's exact wire names and numbers."""

from __future__ import annotations

from kubevirt.hooks.plugins.v1alpha1 import api_pb2

# As interfaces.md lists them (KubeVirt pkg/hooks/plugins/v1alpha1/api.proto).
DOCUMENTED_FIELDS = {
    "NodeContext": {"node_name": 1},
    "ExecuteNodeHookRequest": {"hookPoint": 1, "vmi": 2, "node_context": 3},
    "ExecuteNodeHookResponse": {},
    "SidecarContext": {"invocation_context": 1},
    "MutateDomainRequest": {"domain_type": 1, "domain": 2, "vmi": 3, "sidecar_context": 4},
    "MutateDomainResponse": {"domain": 1},
}


def full_paths() -> set[str]:
    return {
        f"/{svc.full_name}/{m.name}"
        for svc in api_pb2.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    }


def test_the_hook_services_have_kubevirts_full_method_paths() -> None:
    assert api_pb2.DESCRIPTOR.package == "kubevirt.hooks.plugins.v1alpha1"
    assert full_paths() == {
        "/kubevirt.hooks.plugins.v1alpha1.NodeHookService/ExecuteNodeHook",
        "/kubevirt.hooks.plugins.v1alpha1.DomainHookService/MutateDomain",
    }


def test_every_hook_message_has_the_documented_field_names_and_numbers() -> None:
    got = {
        name: {f.name: f.number for f in m.fields}
        for name, m in api_pb2.DESCRIPTOR.message_types_by_name.items()
    }
    assert got == DOCUMENTED_FIELDS


def test_every_hook_field_is_singular_with_the_documented_type() -> None:
    msgs = api_pb2.DESCRIPTOR.message_types_by_name
    fields = [f for m in msgs.values() for f in m.fields]
    assert not any(f.is_repeated for f in fields)
    kinds = {f"{f.containing_type.name}.{f.name}": f.type for f in fields}
    f = api_pb2.DESCRIPTOR.message_types_by_name["NodeContext"].fields_by_name["node_name"]
    assert kinds["ExecuteNodeHookRequest.vmi"] == f.TYPE_BYTES
    assert kinds["MutateDomainRequest.domain"] == f.TYPE_BYTES
    assert kinds["MutateDomainResponse.domain"] == f.TYPE_BYTES
    assert kinds["ExecuteNodeHookRequest.hookPoint"] == f.TYPE_STRING
    assert kinds["ExecuteNodeHookRequest.node_context"] == f.TYPE_MESSAGE


def test_a_request_encodes_hook_point_as_field_one_on_the_wire() -> None:
    raw = api_pb2.ExecuteNodeHookRequest(hookPoint="PreMigrationSource").SerializeToString()
    # tag (1 << 3 | 2) = 0x0a, then the length of "PreMigrationSource".
    assert raw == b"\x0a\x12PreMigrationSource"
    ctx = api_pb2.SidecarContext(invocation_context="Boot").SerializeToString()
    assert ctx == b"\x0a\x04Boot"
