"""The kubelet PodResources v1 gRPC API (proto package ``v1``), in code.

The wire is fixed by the kubelet: method paths ``/v1.PodResourcesLister/*``
and the message field numbers below. The descriptor is built here rather
than compiled from a ``.proto`` under ``proto/``, because that tree's rule
is that every package is dotted and versioned (``devmig.agent.v1alpha1``),
and the kubelet's bare ``v1`` cannot follow it without changing the wire.
Only the messages devmig reads or a test stand-in writes are needed, but the
whole v1 surface of Kubernetes 1.34 to 1.36 is declared, so a real kubelet's
answers parse completely (unknown fields would be kept anyway).

The descriptor lives in a private pool, so it can never clash with another
copy of the same file name loaded by some other library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

PACKAGE = "v1"
SERVICE = "PodResourcesLister"
FILE_NAME = "kubelet/podresources/v1/api.proto"

_F = descriptor_pb2.FieldDescriptorProto
_STRING = _F.TYPE_STRING
_INT64 = _F.TYPE_INT64
_UINT64 = _F.TYPE_UINT64
_MSG = _F.TYPE_MESSAGE
_ONE = _F.LABEL_OPTIONAL
_MANY = _F.LABEL_REPEATED

# message -> [(field name, number, type, label, message type or "")], as the
# kubelet's v1 api.proto declares them. PodResources fields 4 and 5
# (pod-level cpu_ids and memory) exist only on the kubelet's master branch,
# behind a beta gate that is off by default, so they are left out; a kubelet
# that sends them is still parsed (proto3 keeps unknown fields).
MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "AllocatableResourcesRequest": [],
    "AllocatableResourcesResponse": [
        ("devices", 1, _MSG, _MANY, "ContainerDevices"),
        ("cpu_ids", 2, _INT64, _MANY, ""),
        ("memory", 3, _MSG, _MANY, "ContainerMemory"),
    ],
    "ListPodResourcesRequest": [],
    "ListPodResourcesResponse": [
        ("pod_resources", 1, _MSG, _MANY, "PodResources"),
    ],
    "PodResources": [
        ("name", 1, _STRING, _ONE, ""),
        ("namespace", 2, _STRING, _ONE, ""),
        ("containers", 3, _MSG, _MANY, "ContainerResources"),
    ],
    "ContainerResources": [
        ("name", 1, _STRING, _ONE, ""),
        ("devices", 2, _MSG, _MANY, "ContainerDevices"),
        ("cpu_ids", 3, _INT64, _MANY, ""),
        ("memory", 4, _MSG, _MANY, "ContainerMemory"),
        ("dynamic_resources", 5, _MSG, _MANY, "DynamicResource"),
    ],
    "ContainerMemory": [
        ("memory_type", 1, _STRING, _ONE, ""),
        ("size", 2, _UINT64, _ONE, ""),
        ("topology", 3, _MSG, _ONE, "TopologyInfo"),
    ],
    "ContainerDevices": [
        ("resource_name", 1, _STRING, _ONE, ""),
        ("device_ids", 2, _STRING, _MANY, ""),
        ("topology", 3, _MSG, _ONE, "TopologyInfo"),
    ],
    "TopologyInfo": [
        ("nodes", 1, _MSG, _MANY, "NUMANode"),
    ],
    "NUMANode": [
        ("ID", 1, _INT64, _ONE, ""),
    ],
    # Field 1 (class_name) was removed in Kubernetes 1.31 without a
    # `reserved`; it is simply absent here too.
    "DynamicResource": [
        ("claim_name", 2, _STRING, _ONE, ""),
        ("claim_namespace", 3, _STRING, _ONE, ""),
        ("claim_resources", 4, _MSG, _MANY, "ClaimResource"),
    ],
    "ClaimResource": [
        ("cdi_devices", 1, _MSG, _MANY, "CDIDevice"),
        ("driver_name", 2, _STRING, _ONE, ""),
        ("pool_name", 3, _STRING, _ONE, ""),
        ("device_name", 4, _STRING, _ONE, ""),
        # `optional string share_id = 5` (Kubernetes 1.35+): explicit presence.
        ("share_id", 5, _STRING, _ONE, "?"),
    ],
    "CDIDevice": [
        ("name", 1, _STRING, _ONE, ""),
    ],
    "GetPodResourcesRequest": [
        ("pod_name", 1, _STRING, _ONE, ""),
        ("pod_namespace", 2, _STRING, _ONE, ""),
    ],
    "GetPodResourcesResponse": [
        ("pod_resources", 1, _MSG, _ONE, "PodResources"),
    ],
}

# rpc -> (request, response); all unary.
METHODS: dict[str, tuple[str, str]] = {
    "List": ("ListPodResourcesRequest", "ListPodResourcesResponse"),
    "GetAllocatableResources": ("AllocatableResourcesRequest", "AllocatableResourcesResponse"),
    "Get": ("GetPodResourcesRequest", "GetPodResourcesResponse"),
}


def method_path(rpc: str) -> str:
    """The full gRPC method path, e.g. ``/v1.PodResourcesLister/List``."""
    return f"/{PACKAGE}.{SERVICE}/{rpc}"


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto3")
    for name, fields in MESSAGES.items():
        m = fd.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if ftype == _MSG:
                f.type_name = f".{PACKAGE}.{type_name}"
            if type_name == "?":
                # proto3 `optional` is a synthetic one-field oneof named
                # "_<field>", declared after the real oneofs.
                f.proto3_optional = True
                f.oneof_index = len(m.oneof_decl)
                m.oneof_decl.add(name=f"_{fname}")
    svc = fd.service.add(name=SERVICE)
    for rpc, (req, resp) in METHODS.items():
        svc.method.add(name=rpc, input_type=f".{PACKAGE}.{req}", output_type=f".{PACKAGE}.{resp}")
    return fd


POOL = descriptor_pool.DescriptorPool()
POOL.Add(_file_descriptor())
DESCRIPTOR = POOL.FindFileByName(FILE_NAME)


def message_class(name: str) -> type[message.Message]:
    """The Python class of one of the API's messages, e.g. ``"PodResources"``."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ListPodResourcesRequest = message_class("ListPodResourcesRequest")
ListPodResourcesResponse = message_class("ListPodResourcesResponse")
AllocatableResourcesRequest = message_class("AllocatableResourcesRequest")
AllocatableResourcesResponse = message_class("AllocatableResourcesResponse")
GetPodResourcesRequest = message_class("GetPodResourcesRequest")
GetPodResourcesResponse = message_class("GetPodResourcesResponse")
PodResources = message_class("PodResources")
ContainerResources = message_class("ContainerResources")
ContainerDevices = message_class("ContainerDevices")


def _deserializer(name: str) -> Callable[[bytes], Any]:
    cls = message_class(name)
    return cls.FromString


class PodResourcesListerStub:
    """Client calls on a channel, one attribute per RPC (as generated stubs)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.List = channel.unary_unary(
            method_path("List"),
            request_serializer=ListPodResourcesRequest.SerializeToString,
            response_deserializer=_deserializer("ListPodResourcesResponse"),
        )
        self.GetAllocatableResources = channel.unary_unary(
            method_path("GetAllocatableResources"),
            request_serializer=AllocatableResourcesRequest.SerializeToString,
            response_deserializer=_deserializer("AllocatableResourcesResponse"),
        )
        self.Get = channel.unary_unary(
            method_path("Get"),
            request_serializer=GetPodResourcesRequest.SerializeToString,
            response_deserializer=_deserializer("GetPodResourcesResponse"),
        )


# A server-side implementation: rpc name -> handler(request, context) -> response.
Handler = Callable[[Any, grpc.ServicerContext], Any]


def add_pod_resources_lister(server: grpc.Server, handlers: dict[str, Handler]) -> None:
    """Serve ``v1.PodResourcesLister`` with the given handlers (used by test
    stand-ins for the kubelet); an rpc without a handler is UNIMPLEMENTED."""
    rpcs = {}
    for rpc, (req, resp) in METHODS.items():
        if rpc in handlers:
            rpcs[rpc] = grpc.unary_unary_rpc_method_handler(
                handlers[rpc],
                request_deserializer=_deserializer(req),
                response_serializer=message_class(resp).SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(f"{PACKAGE}.{SERVICE}", rpcs),)
    )
