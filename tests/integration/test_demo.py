"""README command 1: the demo runs against the real control plane and ends cleanly."""

from __future__ import annotations

import os
import subprocess
import sys

from devmig_testbed import controlplane


def test_the_demo_runs_to_the_end_and_reports_both_agents(
    control_plane_binaries: controlplane.Binaries,
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "devmig_testbed.demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "devicemigrations.devmig.io: Established" in out
    for node in ("node-a", "node-b"):
        assert f"agent {node} at 127.0.0.1:" in out
    assert "'downtimeLimitMs': 300" in out
    assert out.rstrip().endswith("==> demo finished")
