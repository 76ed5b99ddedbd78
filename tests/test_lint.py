"""`make lint` is part of the suite: ruff (lint and format), mypy --strict
and the import-layering contracts, on the whole repository."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent

CHECKS = {
    "ruff-check": [str(BIN / "ruff"), "check", "."],
    "ruff-format": [str(BIN / "ruff"), "format", "--check", "."],
    "mypy-strict": [str(BIN / "mypy")],
    "import-layering": [str(BIN / "lint-imports")],
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_repository_passes(name: str) -> None:
    r = subprocess.run(CHECKS[name], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
