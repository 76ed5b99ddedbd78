import os, sys, grpc
from devmig.agent.v1alpha1 import agent_pb2, agent_pb2_grpc
d = os.environ.get("DEVMIG_TLS_DIR", "/etc/devmig/tls")
rd = lambda n: open(os.path.join(d, n), "rb").read()
creds = grpc.ssl_channel_credentials(rd("ca.crt"), rd("tls.key"), rd("tls.crt"))
opts = [("grpc.ssl_target_name_override", os.environ["DEVMIG_TLS_SERVER_NAME"])]
with grpc.secure_channel(os.environ["DEVMIG_AGENT_ADDRESS"], creds, options=opts) as ch:
    r = agent_pb2_grpc.NodeAgentStub(ch).GetVersion(agent_pb2.GetVersionRequest(api_version="v1alpha1"), timeout=20)
print("agent", r.agent_version, "native", r.native_version, "node", r.node_name, "apis", list(r.api_versions))
sys.exit(0 if "v1alpha1" in r.api_versions else 1)
