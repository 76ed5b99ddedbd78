"""The chart's CRDs are the repository's crds/ (the single source), wrapped
with the chart's labels and the keep policy, and nothing else."""

from __future__ import annotations

import copy
import pathlib
import subprocess
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = ROOT / "crds"
CHART = ROOT / "charts" / "devmig"
COPY = CHART / "files" / "crds"


def test_the_charts_crd_files_are_byte_identical_to_the_repositorys_crds() -> None:
    src = {p.name: p.read_bytes() for p in SOURCE.glob("*.yaml")}
    dst = {p.name: p.read_bytes() for p in COPY.glob("*.yaml")}
    assert src, "crds/ is empty"
    assert sorted(dst) == sorted(src), "run charts/devmig/hack/sync-crds.sh"
    stale = [n for n in src if src[n] != dst[n]]
    assert stale == [], f"{stale} differ from crds/; run charts/devmig/hack/sync-crds.sh"


def test_the_sync_script_restores_a_drifted_copy(tmp_path: pathlib.Path) -> None:
    # A scratch chart layout: <tmp>/charts/devmig/{hack,files/crds} + <tmp>/crds.
    chart = tmp_path / "charts" / "devmig"
    (chart / "hack").mkdir(parents=True)
    (chart / "files" / "crds").mkdir(parents=True)
    (tmp_path / "crds").mkdir()
    script = chart / "hack" / "sync-crds.sh"
    script.write_bytes((CHART / "hack" / "sync-crds.sh").read_bytes())
    script.chmod(0o755)
    for p in SOURCE.glob("*.yaml"):
        (tmp_path / "crds" / p.name).write_bytes(p.read_bytes())
    (chart / "files" / "crds" / "stale_leftover.yaml").write_text("kind: Stale\n")
    subprocess.run([str(script)], check=True, capture_output=True)
    got = {p.name: p.read_bytes() for p in (chart / "files" / "crds").glob("*.yaml")}
    assert got == {p.name: p.read_bytes() for p in SOURCE.glob("*.yaml")}


def _source_crds() -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(SOURCE.glob("*.yaml")):
        for d in yaml.safe_load_all(p.read_text()):
            if d and d.get("kind") == "CustomResourceDefinition":
                out[d["metadata"]["name"]] = d
    return out


def test_rendered_crds_equal_the_source_except_labels_and_the_keep_annotation(
    helm: Any,
) -> None:
    rendered = {
        d["metadata"]["name"]: d for d in helm.template() if d["kind"] == "CustomResourceDefinition"
    }
    source = _source_crds()
    assert sorted(rendered) == sorted(source)
    for name, r in rendered.items():
        r = copy.deepcopy(r)
        meta = r["metadata"]
        assert meta.pop("annotations") == {"helm.sh/resource-policy": "keep"}
        labels = meta.pop("labels")
        assert labels["app.kubernetes.io/instance"] == "devmig"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        # Every field of the source, numbers and CEL rules included, survives.
        assert r == source[name], name


def test_crds_install_and_keep_follow_their_values(helm: Any) -> None:
    none = helm.template(set_values=["crds.install=false"])
    assert not [d for d in none if d["kind"] == "CustomResourceDefinition"]
    unkept = [
        d
        for d in helm.template(set_values=["crds.keep=false"])
        if d["kind"] == "CustomResourceDefinition"
    ]
    assert len(unkept) == len(_source_crds())
    for d in unkept:
        assert "helm.sh/resource-policy" not in d["metadata"].get("annotations", {})
