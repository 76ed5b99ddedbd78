"""values.schema.json is generated from values.yaml and its comments, stays in
step with it, and makes helm reject unknown keys and wrong types."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest
import yaml

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "devmig"
GEN = CHART / "hack" / "gen-schema.py"


def _gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("devmig_gen_schema", GEN)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_committed_schema_is_what_the_generator_makes_of_values_yaml() -> None:
    proc = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    want = _gen().render((CHART / "values.yaml").read_text())
    assert (CHART / "values.schema.json").read_text() == want


def test_the_readme_values_table_is_generated_from_the_same_comments() -> None:
    gen = _gen()
    text = (CHART / "values.yaml").read_text()
    readme = (CHART / "README.md").read_text()
    assert gen.values_table(text) in readme
    table = gen.values_table(text)
    for key in ("agent.privileged", "crds.keep", "certManager.issuerRef.kind", "tests.enabled"):
        assert f"| `{key}` |" in table, key
    changed = text.replace("# Render the test Pod.", "# Render the handshake test Pod.")
    assert gen.readme_with_table(readme, gen.values_table(changed)) != readme


def test_the_generator_reports_drift_when_values_change(tmp_path: pathlib.Path) -> None:
    gen = _gen()
    text = (CHART / "values.yaml").read_text()
    changed = text + "\n# A new key.\nnewKey: 1\n"
    assert gen.render(changed) != gen.render(text)
    assert json.loads(gen.render(changed))["properties"]["newKey"] == {
        "description": "A new key.",
        "type": "integer",
    }


def test_the_generator_refuses_a_key_without_a_comment() -> None:
    gen = _gen()
    with pytest.raises(gen.SchemaError, match="undocumented has no comment"):
        gen.generate("# Documented.\ndocumented: 1\nundocumented: 2\n")


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for k, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{k}")
    return out


def test_every_key_is_described_and_every_object_closed_or_deliberately_open() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    open_maps = []
    for path, s in _walk(schema):
        if path:
            assert s.get("description"), f"{path} has no description"
        if s.get("type") == "object" and path != ".global":
            assert "additionalProperties" in s, path
            if s["additionalProperties"] is not False:
                open_maps.append(path)
    # Only maps whose keys are the user's or that are Kubernetes objects stay open.
    for path in open_maps:
        leaf = path.rsplit(".", 1)[-1]
        assert leaf in {
            "commonLabels",
            "podAnnotations",
            "podLabels",
            "nodeSelector",
            "affinity",
            "resources",
            "requests",
            "limits",
            "annotations",
            "labels",
            "updateStrategy",
            "rollingUpdate",
        }, path
    assert set(schema["properties"]) == set(values) | {"global"}


def _template(helm: Any, tmp_path: pathlib.Path, values: str) -> Any:
    f = tmp_path / "values.yaml"
    f.write_text(values)
    return helm.run("template", "devmig", str(CHART), "-f", str(f), check=False)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ("bogus: 1\n", "additional properties 'bogus' not allowed"),
        ("agent:\n  hostpaths: {}\n", "additional properties 'hostpaths' not allowed"),
        (
            "operator:\n  leaderElection:\n    enable: true\n",
            "additional properties 'enable' not allowed",
        ),
        ("metrics:\n  serviceMonitor:\n    enabled: true\n    intervall: 5s\n", "'intervall'"),
    ],
    ids=["top-level", "nested-typo", "deep-typo", "monitoring-typo"],
)
def test_helm_rejects_a_values_file_with_an_unknown_key(
    helm: Any, tmp_path: pathlib.Path, values: str, complaint: str
) -> None:
    proc = _template(helm, tmp_path, values)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert complaint in proc.stderr


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ('agent:\n  grpcPort: "50051"\n', "/agent/grpcPort"),
        ("agent:\n  grpcPort: 70000\n", "/agent/grpcPort"),
        ('crds:\n  install: "yes"\n', "/crds/install"),
        ("image:\n  pullPolicy: Sometimes\n", "/image/pullPolicy"),
        ("operator:\n  replicas: -1\n", "/operator/replicas"),
        ("kubevirt:\n  plugin:\n    failureStrategy: Retry\n", "/kubevirt/plugin/failureStrategy"),
        ("agent:\n  nodeSelector: [a]\n", "/agent/nodeSelector"),
        ("agent:\n  capabilitiesAdd: [sys_admin]\n", "/agent/capabilitiesAdd/0"),
        ("certManager:\n  duration: 90d\n", "/certManager/duration"),
        ("image:\n  digest: latest\n", "/image/digest"),
    ],
)
def test_helm_rejects_values_of_the_wrong_type_or_range(
    helm: Any, tmp_path: pathlib.Path, values: str, where: str
) -> None:
    proc = _template(helm, tmp_path, values)
    assert proc.returncode != 0, proc.stdout[:300]
    assert where in proc.stderr, proc.stderr


def test_the_same_values_pass_when_well_typed(helm: Any, tmp_path: pathlib.Path) -> None:
    proc = _template(
        helm,
        tmp_path,
        "agent:\n  grpcPort: 50061\n"
        "  updateStrategy:\n    rollingUpdate:\n      maxUnavailable: 10%\n"
        "crds:\n  install: false\nimage:\n  pullPolicy: Always\n"
        # Quantities may be numbers, and a default may be removed with null.
        "operator:\n  resources:\n    requests:\n      cpu: 2\n    limits:\n      memory: null\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert "0.0.0.0:50061" in proc.stdout
    assert "cpu: 2\n" in proc.stdout
