"""A real Kubernetes control plane (etcd + kube-apiserver) on loopback.

The binaries are the genuine ones, built from published Go modules by
``tests/controlplane/build.sh`` into a version-keyed cache. This module
starts them with free loopback ports, TLS, a service-account signing key and
RBAC authorization, waits on ``/readyz``, and tears them down. It is used by
the pytest fixtures (``tests/conftest.py``), by ``make cluster-up`` and by
the demo.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from devmig_testbed.pki import CA, key_pem

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "tests" / "controlplane" / "build.sh"
CRDS_DIR = REPO_ROOT / "crds"
# Test stand-ins for KubeVirt's CRDs (KubeVirt cannot run here): KubeVirt's
# names, schemas covering the fields devmig reads.
KUBEVIRT_CRDS_DIR = REPO_ROOT / "tests" / "kubevirt" / "crds"

# How long a cold start may take on a 2-core machine: etcd is ready in about
# a second, kube-apiserver in 5-15 s (it installs its bootstrap RBAC policy
# and priority classes before /readyz turns green). 120 s leaves room for a
# loaded CI machine without hiding a hang.
START_TIMEOUT_S = 120.0
# Poll interval while waiting for a health endpoint. Short, because the wait
# is bounded by the process becoming ready, not by this number.
POLL_INTERVAL_S = 0.1


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or reached."""


def log(msg: str) -> None:
    print(f"[controlplane] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Binaries:
    kube_apiserver: pathlib.Path
    etcd: pathlib.Path
    helm: pathlib.Path
    kubectl: pathlib.Path

    def versions(self) -> dict[str, str]:
        """What each binary says of its own version."""

        def run(*args: str) -> str:
            out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60)
            return out.stdout.strip().splitlines()[0]

        return {
            "kube-apiserver": run(str(self.kube_apiserver), "--version"),
            "etcd": run(str(self.etcd), "--version"),
            "helm": run(str(self.helm), "version", "--short"),
            "kubectl": run(str(self.kubectl), "version", "--client"),
        }


def locate_binaries(build: bool = True) -> Binaries:
    """Paths of the cached binaries; builds the missing ones when ``build``."""
    args = [str(BUILD_SCRIPT)] if build else [str(BUILD_SCRIPT), "--print"]
    proc = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
    paths = dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)
    b = Binaries(
        kube_apiserver=pathlib.Path(paths["KUBE_APISERVER"]),
        etcd=pathlib.Path(paths["ETCD"]),
        helm=pathlib.Path(paths["HELM"]),
        kubectl=pathlib.Path(paths["KUBECTL"]),
    )
    missing = [str(p) for p in dataclasses.astuple(b) if not os.access(p, os.X_OK)]
    if missing:
        raise ControlPlaneError(
            "control-plane binaries missing: " + ", ".join(missing) + f"; run {BUILD_SCRIPT}"
        )
    return b


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------- certificates


def make_pki(pki: pathlib.Path) -> None:
    """A CA, a serving certificate for 127.0.0.1/localhost, and an RSA key
    that signs and verifies service-account tokens."""
    pki.mkdir(parents=True, exist_ok=True)
    ca = CA.create()
    crt, key = ca.issue("kube-apiserver", ["localhost", "kubernetes.default.svc"], ["127.0.0.1"])
    (pki / "ca.crt").write_bytes(ca.pem)
    (pki / "ca.key").write_bytes(key_pem(ca.key))
    (pki / "serving.crt").write_bytes(crt)
    (pki / "serving.key").write_bytes(key)
    # RSA 2048: what kube-apiserver's service-account signer expects.
    (pki / "sa.key").write_bytes(
        key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    )
    for f in ("ca.key", "serving.key", "sa.key"):
        (pki / f).chmod(0o600)


def kubeconfig(server: str, ca_file: pathlib.Path, user: str, token: str) -> dict[str, Any]:
    ca = base64.b64encode(ca_file.read_bytes()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "devmig-test", "cluster": {"server": server, "certificate-authority-data": ca}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "devmig-test", "user": user}}],
        "current-context": user,
    }


# ------------------------------------------------------------------- processes


def _wait_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    logfile: pathlib.Path,
    ctx: ssl.SSLContext | None = None,
    token: str | None = None,
) -> None:
    """Poll ``url`` until it answers 200; fail fast if ``proc`` exits."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers=headers)
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-3000:]
            raise ControlPlaneError(f"{url}: process exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(POLL_INTERVAL_S)
    tail = logfile.read_text(errors="replace")[-3000:]
    raise ControlPlaneError(f"{url} not ready after {START_TIMEOUT_S:.0f} s ({last}):\n{tail}")


def _stop(proc: subprocess.Popen[bytes] | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        # kube-apiserver drains for up to a few seconds; etcd closes at once.
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        log(f"{name} ignored SIGTERM for 20 s; killing it")
        proc.kill()
        proc.wait()


@dataclasses.dataclass
class ControlPlane:
    """etcd + kube-apiserver, started on free loopback ports under ``workdir``."""

    workdir: pathlib.Path
    binaries: Binaries
    detach: bool = False  # keep running after this Python process exits (cluster-up)

    etcd_proc: subprocess.Popen[bytes] | None = None
    apiserver_proc: subprocess.Popen[bytes] | None = None
    server: str = ""
    admin_token: str = ""

    @property
    def pki(self) -> pathlib.Path:
        return self.workdir / "pki"

    @property
    def admin_kubeconfig(self) -> pathlib.Path:
        return self.workdir / "admin.kubeconfig"

    def _popen(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        logfile = self.workdir / f"{name}.log"
        with logfile.open("wb") as out:
            return subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=self.detach,
            )

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        make_pki(self.pki)
        etcd_client, etcd_peer, api_port = free_port(), free_port(), free_port()
        started = time.monotonic()

        log(f"starting etcd on 127.0.0.1:{etcd_client}")
        self.etcd_proc = self._popen(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=devmig-test",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=devmig-test=http://127.0.0.1:{etcd_peer}",
                # Test data is thrown away; fsync only slows the suite down.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        _wait_ready(
            f"http://127.0.0.1:{etcd_client}/health", self.etcd_proc, self.workdir / "etcd.log"
        )

        self.admin_token = secrets.token_urlsafe(32)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.admin_token},devmig-admin,devmig-admin,"system:masters"\n')
        tokens.chmod(0o600)
        self.server = f"https://127.0.0.1:{api_port}"
        log(f"starting kube-apiserver on {self.server}")
        self.apiserver_proc = self._popen(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                "--bind-address=127.0.0.1",
                # These machines have no default route; without this the
                # apiserver fails to choose an address to advertise.
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={self.pki / 'serving.crt'}",
                f"--tls-private-key-file={self.pki / 'serving.key'}",
                f"--client-ca-file={self.pki / 'ca.crt'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={self.pki / 'sa.key'}",
                f"--service-account-signing-key-file={self.pki / 'sa.key'}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={tokens}",
                # No controller-manager runs, so no namespace gets a
                # "default" ServiceAccount that this plugin would require.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                # Nothing serves the kubernetes Service endpoints here.
                "--endpoint-reconciler-type=none",
                f"--cert-dir={self.pki}",
                "--v=1",
            ],
        )
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        _wait_ready(
            f"{self.server}/readyz",
            self.apiserver_proc,
            self.workdir / "kube-apiserver.log",
            ctx=ctx,
            token=self.admin_token,
        )
        self.admin_kubeconfig.write_text(
            yaml.safe_dump(
                kubeconfig(self.server, self.pki / "ca.crt", "devmig-admin", self.admin_token)
            )
        )
        self.admin_kubeconfig.chmod(0o600)
        (self.workdir / "state.json").write_text(
            json.dumps(
                {
                    "etcd_pid": self.etcd_proc.pid,
                    "apiserver_pid": self.apiserver_proc.pid,
                    "server": self.server,
                    "kubeconfig": str(self.admin_kubeconfig),
                }
            )
        )
        log(f"ready in {time.monotonic() - started:.1f} s; KUBECONFIG={self.admin_kubeconfig}")

    def stop(self) -> None:
        _stop(self.apiserver_proc, "kube-apiserver")
        _stop(self.etcd_proc, "etcd")

    # ---------------------------------------------------------------- clients

    def api_client(self, kubeconfig_path: pathlib.Path | None = None) -> Any:
        from kubernetes import config

        return config.new_client_from_config(
            config_file=str(kubeconfig_path or self.admin_kubeconfig)
        )

    def service_account_kubeconfig(
        self, namespace: str, name: str, expiration_s: int = 3600
    ) -> pathlib.Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name``
        (created if absent), through a TokenRequest, so RBAC applies for real."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self.api_client())
        sa = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        try:
            core.create_namespaced_service_account(namespace, sa)
        except ApiException as e:
            if e.status != 409:
                raise
        tr = core.create_namespaced_service_account_token(
            name,
            namespace,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_s)
            ),
        )
        if tr.status is None or not tr.status.token:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
        path = self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        user = f"system:serviceaccount:{namespace}:{name}"
        path.write_text(
            yaml.safe_dump(kubeconfig(self.server, self.pki / "ca.crt", user, tr.status.token))
        )
        path.chmod(0o600)
        return path

    def install_crds(self, crds_dir: pathlib.Path = CRDS_DIR) -> list[str]:
        """Create or replace every CRD in ``crds_dir`` and wait until each is
        Established. Returns the CRD names."""
        from kubernetes import client, watch
        from kubernetes.client.exceptions import ApiException

        ext = client.ApiextensionsV1Api(self.api_client())
        names: list[str] = []
        for f in sorted(crds_dir.glob("*.yaml")):
            for doc in yaml.safe_load_all(f.read_text()):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                name = doc["metadata"]["name"]
                try:
                    ext.create_custom_resource_definition(doc)
                except ApiException as e:
                    if e.status != 409:
                        raise
                    cur = ext.read_custom_resource_definition(name)
                    assert cur.metadata is not None
                    doc["metadata"]["resourceVersion"] = cur.metadata.resource_version
                    ext.replace_custom_resource_definition(name, doc)
                names.append(name)
        for name in names:
            w = watch.Watch()
            for ev in w.stream(
                ext.list_custom_resource_definition,
                field_selector=f"metadata.name={name}",
                timeout_seconds=60,
            ):
                conds = ev["object"].status.conditions or []
                if any(c.type == "Established" and c.status == "True" for c in conds):
                    w.stop()
                    break
            else:
                raise ControlPlaneError(f"CRD {name} not Established within 60 s")
        return names


@contextlib.contextmanager
def running(workdir: pathlib.Path, build: bool = True) -> Iterator[ControlPlane]:
    """Start a control plane, yield it, always stop it."""
    cp = ControlPlane(workdir=workdir, binaries=locate_binaries(build=build))
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()
