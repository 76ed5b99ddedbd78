"""Run the native core's C unit tests from pytest, one item per executable.

Each ``tests/c/test_*.c`` is built by meson (with -Dtests=true, the same
sources the wheel ships) and run; a non-zero exit fails the item and its
output is shown. One runner for the whole suite keeps the closing line
pytest's own.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

NATIVE = pathlib.Path(__file__).resolve().parents[1]
BUILD = NATIVE.parent / "build" / "native-tests"
C_TESTS = sorted(p.stem for p in (NATIVE / "tests" / "c").glob("test_*.c"))


def _tool(name: str) -> str:
    # meson and ninja come from the dev dependency group, beside this Python.
    cand = pathlib.Path(sys.executable).parent / name
    found = str(cand) if cand.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found; run `make bootstrap` (uv sync installs it)", pytrace=False)
    return found


@pytest.fixture(scope="session")
def c_build() -> pathlib.Path:
    meson = _tool("meson")
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    if not (BUILD / "build.ninja").exists():
        subprocess.run(
            [
                meson,
                "setup",
                str(BUILD),
                str(NATIVE),
                "-Dtests=true",
                "-Dpython=false",
                "-Dbuildtype=debugoptimized",
                "-Db_sanitize=address,undefined",
            ],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
    r = subprocess.run(
        [meson, "compile", "-C", str(BUILD)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, f"C build failed:\n{r.stdout}\n{r.stderr}"
    return BUILD


@pytest.mark.parametrize("name", C_TESTS)
def test_c_unit_passes(c_build: pathlib.Path, name: str) -> None:
    exe = c_build / name
    assert exe.exists(), f"{name} is not listed in agent-native/meson.build's C tests"
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (
        f"{name} exited {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    )
