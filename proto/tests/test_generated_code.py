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
