"""A stand-in kubelet for tests: a real gRPC server on a Unix socket serving
``v1.PodResourcesLister`` with the kubelet's documented semantics:

- List: every active pod's containers with their devices.
- GetAllocatableResources: every device the node can hand out.
- Get: one pod; an unknown pod is a plain error "pod <name> in namespace
  <ns> not found" (status UNKNOWN, as a Go fmt.Errorf reaches the wire);
  with the Get gate off, "PodResources API Get method disabled".
- A token bucket of 100 calls per second with a burst of 10 on every call;
  over it, RESOURCE_EXHAUSTED "rejected by rate limit". Time is injected, so
  tests drive the bucket without sleeping.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from devmig_agent import podresources_api as api

QPS = 100.0
BURST = 10


@dataclasses.dataclass
class StandInDevice:
    resource_name: str
    device_ids: list[str]
    numa: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StandInPod:
    namespace: str
    name: str
    containers: dict[str, list[StandInDevice]]


class StandInKubelet:
    def __init__(
        self,
        socket_path: str,
        *,
        clock: Callable[[], float] | None = None,
        get_enabled: bool = True,
    ) -> None:
        self.socket_path = socket_path
        self.pods: list[StandInPod] = []
        self.allocatable: list[StandInDevice] = []
        self.get_enabled = get_enabled
        self.calls: list[str] = []
        self._now = clock or (lambda: 0.0)
        self._tokens = float(BURST)
        self._last = self._now()
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api.add_pod_resources_lister(
            self._server,
            {"List": self._list, "GetAllocatableResources": self._allocatable, "Get": self._get},
        )
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        self._server.add_insecure_port(f"unix://{socket_path}")

    def start(self) -> StandInKubelet:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def _admit(self, rpc: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append(rpc)
            now = self._now()
            self._tokens = min(float(BURST), self._tokens + (now - self._last) * QPS)
            self._last = now
            if self._tokens < 1.0:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected by rate limit")
            self._tokens -= 1.0

    @staticmethod
    def _devices(devs: list[StandInDevice]) -> list[Any]:
        out = []
        for d in devs:
            cd = api.ContainerDevices(resource_name=d.resource_name, device_ids=d.device_ids)
            for n in d.numa:
                cd.topology.nodes.add(ID=n)
            out.append(cd)
        return out

    def _pod(self, p: StandInPod) -> Any:
        pr = api.PodResources(name=p.name, namespace=p.namespace)
        for cname, devs in p.containers.items():
            pr.containers.add(name=cname, devices=self._devices(devs))
        return pr

    def _list(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("List", context)
        return api.ListPodResourcesResponse(pod_resources=[self._pod(p) for p in self.pods])

    def _allocatable(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("GetAllocatableResources", context)
        return api.AllocatableResourcesResponse(devices=self._devices(self.allocatable))

    def _get(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("Get", context)
        if not self.get_enabled:
            context.abort(grpc.StatusCode.UNKNOWN, "PodResources API Get method disabled")
        for p in self.pods:
            if p.namespace == request.pod_namespace and p.name == request.pod_name:
                return api.GetPodResourcesResponse(pod_resources=self._pod(p))
        context.abort(
            grpc.StatusCode.UNKNOWN,
            f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
        )
