"""helm test: an agent answers the version handshake over mutual TLS."""

import os
import pathlib
import sys

import grpc

from devmig.agent.v1alpha1 import agent_pb2, agent_pb2_grpc

tls = pathlib.Path(os.environ.get("DEVMIG_TLS_DIR", "/etc/devmig/tls"))
creds = grpc.ssl_channel_credentials(
    root_certificates=(tls / "ca.crt").read_bytes(),
    private_key=(tls / "tls.key").read_bytes(),
    certificate_chain=(tls / "tls.crt").read_bytes(),
)
# Agents share one certificate named after their Service.
opts = [("grpc.ssl_target_name_override", os.environ["DEVMIG_TLS_SERVER_NAME"])]
with grpc.secure_channel(os.environ["DEVMIG_AGENT_ADDRESS"], creds, options=opts) as ch:
    stub = agent_pb2_grpc.NodeAgentStub(ch)
    r = stub.GetVersion(agent_pb2.GetVersionRequest(api_version="v1alpha1"), timeout=20)
print(f"agent {r.agent_version} native {r.native_version} node {r.node_name}", end=" ")
print("apis", list(r.api_versions))
sys.exit(0 if "v1alpha1" in r.api_versions else 1)
