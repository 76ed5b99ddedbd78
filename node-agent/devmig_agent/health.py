"""The agent's gRPC health service (grpc.health.v1), beside its own API.

SERVING once the journal is recovered and every listener is up (the gRPC
server only starts after recovery, so before that a probe cannot connect at
all); NOT_SERVING from the moment a shutdown begins, so probes and load
balancers stop sending work while the sessions settle. The overall status
("") and the agent API's service name report the same.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# The fully qualified name of the agent API, as health checks name it.
AGENT_SERVICE = "devmig.agent.v1alpha1.NodeAgent"


class AgentHealth:
    def __init__(self) -> None:
        self._svc = health.HealthServicer()
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def add_to(self, srv: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self._svc, srv)

    def serving(self) -> None:
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def shutting_down(self) -> None:
        """NOT_SERVING for good: watchers are told, later sets are ignored."""
        self._svc.enter_graceful_shutdown()

    def _set(self, status: int) -> None:
        for name in ("", AGENT_SERVICE):
            self._svc.set(name, status)
