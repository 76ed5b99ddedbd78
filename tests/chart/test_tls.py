"""The chart's mutual-TLS material: a real CA and leaves that a real agent
and the chart's own `helm test` handshake accept, kept stable across
upgrades by `lookup` against the real API server."""

from __future__ import annotations

import base64
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import ExtendedKeyUsageOID

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "devmig"


def _secrets(docs: list[dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    return {
        d["metadata"]["name"]: {k: base64.b64decode(v) for k, v in d["data"].items()}
        for d in docs
        if d["kind"] == "Secret"
    }


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _signed_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        ca.public_key().verify(  # type: ignore[call-arg]
            leaf.signature,
            leaf.tbs_certificate_bytes,
            padding.PKCS1v15(),
            leaf.signature_hash_algorithm,
        )
    except Exception:
        return False
    return leaf.issuer == ca.subject


def test_the_generated_ca_signs_an_operator_client_and_an_agent_peer_certificate(
    helm: Any,
) -> None:
    s = _secrets(helm.template())
    ca = _cert(s["devmig-ca"]["tls.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    op, ag = _cert(s["devmig-operator-tls"]["tls.crt"]), _cert(s["devmig-agent-tls"]["tls.crt"])
    for name in ("devmig-operator-tls", "devmig-agent-tls"):
        assert s[name]["ca.crt"] == s["devmig-ca"]["tls.crt"]
    assert _signed_by(op, ca) and _signed_by(ag, ca)
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in op.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    eku = ag.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    sans = ag.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "devmig-agent.devmig-system.svc" in sans.get_values_for_type(x509.DNSName)
    # Two renders without a cluster make two different CAs: the stability
    # comes from lookup, tested against the API server below.
    assert _secrets(helm.template())["devmig-ca"]["tls.crt"] != s["devmig-ca"]["tls.crt"]


@pytest.fixture
def agent_with_chart_certs(
    helm: Any, tmp_path: pathlib.Path
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """The real agent servicer behind a gRPC server that requires a client
    certificate from the chart's CA, serving the chart's agent certificate."""
    import grpc

    from devmig_agent import server

    docs = helm.template()
    ag = _secrets(docs)["devmig-agent-tls"]
    creds = grpc.ssl_server_credentials(
        [(ag["tls.key"], ag["tls.crt"])],
        root_certificates=ag["ca.crt"],
        require_client_auth=True,
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_to_server(srv, "node-a")
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    try:
        yield port, docs
    finally:
        srv.stop(grace=None)


def _run_helm_test_script(
    docs: list[dict[str, Any]], tls: dict[str, bytes], port: int, tmp_path: pathlib.Path
) -> subprocess.CompletedProcess[str]:
    """Run the `helm test` Pod's own command, with its env, against 127.0.0.1."""
    pod = next(d for d in docs if d["kind"] == "Pod")
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["python", "-c"]
    env = {e["name"]: e["value"] for e in c["env"]}
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir(exist_ok=True)
    for k in ("ca.crt", "tls.crt", "tls.key"):
        (tls_dir / k).write_bytes(tls[k])
    env.update(DEVMIG_TLS_DIR=str(tls_dir), DEVMIG_AGENT_ADDRESS=f"127.0.0.1:{port}")
    return subprocess.run(
        [sys.executable, "-c", c["command"][2]],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_helm_test_pod_completes_the_handshake_over_mtls_with_the_chart_certs(
    agent_with_chart_certs: tuple[int, list[dict[str, Any]]], tmp_path: pathlib.Path
) -> None:
    port, docs = agent_with_chart_certs
    proc = _run_helm_test_script(docs, _secrets(docs)["devmig-operator-tls"], port, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "node node-a apis ['v1alpha1']" in proc.stdout


def test_the_agent_refuses_a_client_certificate_from_another_install(
    helm: Any, agent_with_chart_certs: tuple[int, list[dict[str, Any]]], tmp_path: pathlib.Path
) -> None:
    port, docs = agent_with_chart_certs
    other = _secrets(helm.template())["devmig-operator-tls"]
    # The other install's client certificate, with this install's CA to
    # verify the server: only the client side is foreign.
    tls = {**other, "ca.crt": _secrets(docs)["devmig-ca"]["tls.crt"]}
    proc = _run_helm_test_script(docs, tls, port, tmp_path)
    assert proc.returncode != 0
    assert "UNAVAILABLE" in proc.stderr or "handshake" in proc.stderr.lower(), proc.stderr


@pytest.mark.controlplane
def test_certificates_and_the_session_key_survive_helm_upgrades(
    helm: Any, control_plane: Any, kube: Any, namespace: str, release: str
) -> None:
    from kubernetes import client

    kc = control_plane.admin_kubeconfig
    core = client.CoreV1Api(kube)
    base = [str(CHART), "--namespace", namespace, "--set", "crds.install=false"]

    def secrets() -> dict[str, dict[str, str]]:
        return {
            s.metadata.name: dict(s.data)
            for s in core.list_namespaced_secret(namespace).items
            if s.metadata.name.startswith(release) or s.metadata.name == "devmig-session-key"
        }

    helm.run("install", release, *base, kubeconfig=kc)
    try:
        first = secrets()
        assert len(first) == 4
        helm.run("upgrade", release, *base, "--set", "operator.logLevel=DEBUG", kubeconfig=kc)
        assert secrets() == first
        # A lost leaf is re-issued by the CA that is kept.
        core.delete_namespaced_secret(f"{release}-devmig-agent-tls", namespace)
        helm.run("upgrade", release, *base, kubeconfig=kc)
        again = secrets()
        assert again[f"{release}-devmig-ca"] == first[f"{release}-devmig-ca"]
        assert again["devmig-session-key"] == first["devmig-session-key"]
        new_leaf = _cert(base64.b64decode(again[f"{release}-devmig-agent-tls"]["tls.crt"]))
        assert (
            new_leaf.serial_number
            != _cert(
                base64.b64decode(first[f"{release}-devmig-agent-tls"]["tls.crt"])
            ).serial_number
        )
        assert _signed_by(
            new_leaf, _cert(base64.b64decode(first[f"{release}-devmig-ca"]["tls.crt"]))
        )
    finally:
        helm.run("uninstall", release, "--namespace", namespace, kubeconfig=kc)


def test_the_agent_lets_only_the_charts_operator_certificate_drive_sessions(
    helm: Any,
) -> None:
    import grpc

    from devmig.agent.v1alpha1 import agent_pb2, agent_pb2_grpc
    from devmig_agent import server

    docs = helm.template()
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    env = {
        e["name"]: e.get("value") for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    identity = env["DEVMIG_OPERATOR_IDENTITY"]
    s = _secrets(docs)
    ag, op = s["devmig-agent-tls"], s["devmig-operator-tls"]
    creds = grpc.ssl_server_credentials(
        [(ag["tls.key"], ag["tls.crt"])], root_certificates=ag["ca.crt"], require_client_auth=True
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_to_server(srv, "node-a", operator_identities=frozenset([identity]))
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    req = agent_pb2.AbortRequest(session=agent_pb2.SessionRef(session_id="s", token="t"))
    opts = [("grpc.ssl_target_name_override", "devmig-agent.devmig-system.svc")]
    codes = {}
    try:
        for who, c in (("agent", ag), ("operator", op)):
            client_creds = grpc.ssl_channel_credentials(c["ca.crt"], c["tls.key"], c["tls.crt"])
            with grpc.secure_channel(f"127.0.0.1:{port}", client_creds, options=opts) as ch:
                try:
                    agent_pb2_grpc.NodeAgentStub(ch).Abort(req, timeout=10)
                    codes[who] = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    codes[who] = e.code()
    finally:
        srv.stop(grace=None)
    # A peer agent's certificate is refused; the operator's passes the check
    # (this servicer runs no sessions, so it then answers UNIMPLEMENTED).
    assert codes == {
        "agent": grpc.StatusCode.PERMISSION_DENIED,
        "operator": grpc.StatusCode.UNIMPLEMENTED,
    }
