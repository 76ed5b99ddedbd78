"""Fixtures for the chart tests: the real helm binary (built from Go modules
by tests/controlplane/build.sh) rendering charts/devmig."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
import yaml

from devmig_testbed import controlplane

CHART = controlplane.REPO_ROOT / "charts" / "devmig"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))


@dataclasses.dataclass(frozen=True)
class Helm:
    binary: pathlib.Path
    kube_version: str
    home: pathlib.Path

    def run(
        self, *args: str, check: bool = True, kubeconfig: pathlib.Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            # Keep helm's caches and repository config out of the user's home.
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        proc = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=env, timeout=120
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}\n{proc.stdout}"
            )
        return proc

    def template_text(
        self,
        values: Iterable[pathlib.Path] = (),
        set_values: Iterable[str] = (),
        release: str = "devmig",
        namespace: str = "devmig-system",
        extra: Iterable[str] = (),
    ) -> str:
        args = [
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            self.kube_version,
            "--include-crds",
        ]
        for v in values:
            args += ["-f", str(v)]
        for s in set_values:
            args += ["--set", s]
        args += list(extra)
        return self.run(*args).stdout

    def template(self, *a: Any, **kw: Any) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.template_text(*a, **kw)) if d]


@pytest.fixture(scope="session")
def helm(
    control_plane_binaries: controlplane.Binaries, tmp_path_factory: pytest.TempPathFactory
) -> Helm:
    # The version the test apiserver stamps itself with: what the chart is
    # rendered for and then validated against.
    version = control_plane_binaries.versions()["kube-apiserver"].split()[-1]
    return Helm(control_plane_binaries.helm, version, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture
def release() -> str:
    """A release name of its own: cluster-scoped objects (ClusterRoles,
    the Plugin) carry it, and the control plane is shared by the session."""
    return f"r{uuid.uuid4().hex[:8]}"


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, (
        f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in hits]}"
    )
    return hits[0]


@pytest.fixture(scope="session")
def find_one() -> Any:
    """``find_one(docs, kind, name_suffix)``: the one rendered object."""
    return find


UPSTREAM_CRDS = pathlib.Path(__file__).resolve().parent / "upstream-crds"


@pytest.fixture(scope="session")
def upstream_crds(control_plane: controlplane.ControlPlane) -> list[str]:
    """The stand-in CRDs of the third-party kinds the chart renders
    (Prometheus Operator, cert-manager, KubeVirt Plugin),
    installed into the test apiserver under their upstream names."""
    return control_plane.install_crds(UPSTREAM_CRDS)


class Server:
    """Raw requests to the API server, for what the typed clients lack:
    any kind by apiVersion/kind, dry-run and strict field validation."""

    def __init__(self, api: Any) -> None:
        from kubernetes import dynamic

        self.api = api
        self.dyn = dynamic.DynamicClient(api)

    def path(self, obj: dict[str, Any], named: bool = False) -> str:
        res = self.dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        ns = obj["metadata"].get("namespace") if res.namespaced else None
        name = obj["metadata"]["name"] if named else None
        return str(res.path(name=name, namespace=ns))

    def request(
        self,
        method: str,
        path: str,
        body: Any,
        query: list[tuple[str, str]],
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        import json
        import urllib.parse

        from kubernetes.client.exceptions import ApiException

        cfg = self.api.configuration
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        for auth in cfg.auth_settings().values():
            headers[auth["key"]] = auth["value"]
        url = f"{cfg.host}{path}?{urllib.parse.urlencode(query)}"
        try:
            resp = self.api.call_api(method, url, header_params=headers, body=body)
            resp.read()
            status, data = resp.status, resp.data
        except ApiException as e:
            status, data = e.status, e.body
        try:
            return int(status), json.loads(data or b"null")
        except (TypeError, ValueError):
            return int(status), data

    def dry_run_create(self, obj: dict[str, Any]) -> tuple[int, Any]:
        """POST with dryRun=All and fieldValidation=Strict: every admission
        and validation step runs, unknown fields are errors, nothing is stored."""
        return self.request(
            "POST", self.path(obj), obj, [("dryRun", "All"), ("fieldValidation", "Strict")]
        )

    def dry_run_apply(self, obj: dict[str, Any]) -> tuple[int, Any]:
        """Server-side apply with dryRun=All, for objects that exist already."""
        import json

        return self.request(
            "PATCH",
            self.path(obj, named=True),
            json.dumps(obj),
            [
                ("dryRun", "All"),
                ("fieldValidation", "Strict"),
                ("fieldManager", "devmig-chart-test"),
                ("force", "true"),
            ],
            content_type="application/apply-patch+yaml",
        )


@pytest.fixture
def server(kube: Any, upstream_crds: list[str]) -> Server:
    return Server(kube)
