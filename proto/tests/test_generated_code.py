"""The installed gRPC code is generated from, and matches, the .proto files."""

from __future__ import annotations

import pathlib
import re

from devmig.agent.v1alpha1 import agent_pb2

PROTO_DIR = pathlib.Path(__file__).resolve().parents[1]


def test_every_rpc_in_the_proto_file_is_in_the_installed_descriptor() -> None:
    text = (PROTO_DIR / "devmig/agent/v1alpha1/agent.proto").read_text()
    declared = set(re.findall(r"^\s*rpc (\w+)\(", text, re.M))
    installed = {m.name for m in agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].methods}
    assert declared, "no rpc found in agent.proto"
    assert installed == declared, "installed devmig-api is stale: run `uv sync`"


def test_proto_packages_are_versioned() -> None:
    for p in PROTO_DIR.rglob("*.proto"):
        m = re.search(r"^package ([\w.]+);", p.read_text(), re.M)
        assert m and re.search(r"\.v\d+(alpha|beta)?\d*$", m.group(1)), f"{p}: unversioned package"


def test_every_rpc_has_its_own_request_and_response_named_after_it() -> None:
    for method in agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


def test_every_enum_starts_with_unspecified_zero() -> None:
    for enum in agent_pb2.DESCRIPTOR.enum_types_by_name.values():
        first = enum.values_by_number[0].name
        assert first.endswith("_UNSPECIFIED"), f"{enum.name}: value 0 is {first}"


def test_vfio_state_names_are_the_kernels() -> None:
    names = {
        v.name.removeprefix("VFIO_DEVICE_STATE_")
        for v in agent_pb2.DESCRIPTOR.enum_types_by_name["VfioDeviceState"].values
    } - {"UNSPECIFIED"}
    assert names == {
        "ERROR",
        "STOP",
        "RUNNING",
        "STOP_COPY",
        "RESUMING",
        "RUNNING_P2P",
        "PRE_COPY",
        "PRE_COPY_P2P",
    }


def test_every_rpc_documents_its_contract() -> None:
    text = (PROTO_DIR / "devmig/agent/v1alpha1/agent.proto").read_text()
    for m in re.finditer(r"((?:^\s*//.*\n)+)\s*rpc (\w+)\(", text, re.M):
        doc = m.group(1).lower()
        assert "idempotent" in doc, f"{m.group(2)}: no idempotency contract"
    assert len(re.findall(r"^\s*rpc ", text, re.M)) == len(
        re.findall(r"((?:^\s*//.*\n)+)\s*rpc (\w+)\(", text, re.M)
    ), "an rpc has no comment"
