"""gRPC client for the node agents.

The operator finds a node's agent through the ``agentEndpoint`` its
NodeDeviceInventory publishes, opens a channel, and makes the version
handshake before any other call. Session tokens are derived, not stored:
HMAC-SHA256 over the session id with a key kept in a Secret, so an operator
restart recomputes the same token and no token ever sits in an object users
can read.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import pathlib
import secrets
import threading
from typing import Any

import grpc
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devmig.agent.v1alpha1 import agent_pb2, agent_pb2_grpc

API_VERSION = "v1alpha1"
SESSION_KEY_SECRET = "devmig-session-key"
# Deadline for one unary agent call, seconds. Prepare and StopAndCopy wait
# for device state transitions, which drivers finish in well under a second;
# 30 s covers a loaded node without hiding a hung one.
CALL_TIMEOUT_S = 30.0


class AgentUnavailable(Exception):
    """The agent cannot be reached now; try again later."""


class AgentRefused(Exception):
    """The agent answered with an error that retrying will not fix."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# Codes that mean "not now" rather than "no": retry after a delay.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


def session_key(core: client.CoreV1Api, namespace: str) -> bytes:
    """The operator's session-token key, created once per installation.
    Create-or-read is race-free: two operators starting together both end
    up with the one Secret that won the create."""
    try:
        s = core.read_namespaced_secret(SESSION_KEY_SECRET, namespace)
    except ApiException as e:
        if e.status != 404:
            raise
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=SESSION_KEY_SECRET),
            # 32 bytes: the HMAC-SHA256 block of security, no more is useful.
            data={"key": base64.b64encode(secrets.token_bytes(32)).decode()},
        )
        try:
            s = core.create_namespaced_secret(namespace, body)
        except ApiException as e2:
            if e2.status != 409:
                raise
            s = core.read_namespaced_secret(SESSION_KEY_SECRET, namespace)
    assert s.data is not None
    return base64.b64decode(s.data["key"])


def session_token(key: bytes, session_id: str) -> str:
    return hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()


@dataclasses.dataclass
class Agent:
    node: str
    endpoint: str
    stub: Any
    versions: Any


def tls_credentials(directory: str) -> grpc.ChannelCredentials:
    """Client credentials from a directory laid out as the chart mounts a
    kubernetes.io/tls Secret plus its CA: ca.crt, tls.crt, tls.key."""
    d = pathlib.Path(directory)
    try:
        ca, crt, key = ((d / n).read_bytes() for n in ("ca.crt", "tls.crt", "tls.key"))
    except OSError as e:
        raise AgentRefused(
            grpc.StatusCode.UNAUTHENTICATED, f"TlsConfig: cannot read {e.filename}: {e.strerror}"
        ) from e
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=crt
    )


class Agents:
    """Channels to agents, one per endpoint, reused across reconciles.

    With ``credentials`` every channel is mutual TLS; agents are dialled by
    IP, so ``server_name`` is the name their shared certificate carries
    (DEVMIG_AGENT_TLS_SERVER_NAME in the chart)."""

    def __init__(
        self, credentials: grpc.ChannelCredentials | None = None, server_name: str = ""
    ) -> None:
        self._credentials = credentials
        self._options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self._lock = threading.Lock()
        self._agents: dict[str, Agent] = {}

    def get(self, node: str, endpoint: str) -> Agent:
        with self._lock:
            a = self._agents.get(endpoint)
            if a is not None and a.node == node:
                return a
        if self._credentials is None:
            ch = grpc.insecure_channel(endpoint)
        else:
            ch = grpc.secure_channel(endpoint, self._credentials, options=self._options)
        stub = agent_pb2_grpc.NodeAgentStub(ch)
        versions = call(stub.GetVersion, agent_pb2.GetVersionRequest(api_version=API_VERSION))
        if versions.node_name != node:
            ch.close()
            raise AgentRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"WrongNode: {endpoint} is the agent of {versions.node_name!r}, not {node!r}",
            )
        a = Agent(node, endpoint, stub, versions)
        with self._lock:
            self._agents[endpoint] = a
        return a


def classify(e: grpc.RpcError) -> AgentUnavailable | AgentRefused:
    """Sort a gRPC error into retry-later and give-up."""
    code = e.code()
    if code in _TRANSIENT:
        return AgentUnavailable(f"{code.name}: {e.details()}")
    return AgentRefused(code, e.details() or "")


def call(method: Any, request: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
    """One unary call, with errors sorted by ``classify``."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as e:
        raise classify(e) from e
