"""Architecture rules that import-linter cannot check (it does not see
compiled extension modules): only the binding package imports the native
library, and nothing outside the agent reaches into the native core."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ["operator", "node-agent", "tests/testbed", "bench"]


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _py_files(*dirs: str) -> list[pathlib.Path]:
    return [p for d in dirs for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts]


def test_only_the_binding_imports_the_compiled_native_module() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in _py_files(*PRODUCT_DIRS)
        if any(n == "devmig_native._native" for n in _imports(p))
    ]
    assert offenders == []


def test_the_operator_never_imports_the_native_core_or_agent_internals() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in _py_files("operator")
        if any(n.split(".")[0] in ("devmig_native", "devmig_agent") for n in _imports(p))
    ]
    assert offenders == []


def test_the_rule_checker_sees_imports() -> None:
    # Guard against a checker that passes because it finds nothing.
    assert "devmig_native" in _imports(ROOT / "node-agent" / "devmig_agent" / "server.py")
    assert len(_py_files(*PRODUCT_DIRS)) >= 5
