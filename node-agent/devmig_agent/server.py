"""gRPC servicer: translates between the proto API and the agent's domain.

Only this module knows the generated proto classes; session logic lives in
the role modules and takes plain Python values.
"""

from __future__ import annotations

import grpc

import devmig_agent
import devmig_native
from devmig.agent.v1alpha1 import agent_pb2, agent_pb2_grpc

# API versions this agent serves, newest first.
API_VERSIONS = ("v1alpha1",)


class NodeAgentServicer(agent_pb2_grpc.NodeAgentServicer):
    def __init__(self, node_name: str) -> None:
        self.node_name = node_name

    def GetVersion(
        self, request: agent_pb2.GetVersionRequest, context: grpc.ServicerContext
    ) -> agent_pb2.GetVersionResponse:
        if request.api_version and request.api_version not in API_VERSIONS:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"UnsupportedApiVersion: this agent serves {', '.join(API_VERSIONS)}, "
                f"not {request.api_version!r}",
            )
        return agent_pb2.GetVersionResponse(
            api_versions=list(API_VERSIONS),
            agent_version=devmig_agent.__version__,
            native_version=devmig_native.version(),
            node_name=self.node_name,
        )


def add_to_server(server: grpc.Server, node_name: str) -> None:
    agent_pb2_grpc.add_NodeAgentServicer_to_server(NodeAgentServicer(node_name), server)
