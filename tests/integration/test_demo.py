"""README command 1: the demo migrates a device for real and ends cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from devmig_testbed import controlplane


def test_the_demo_migrates_a_device_and_prints_the_summary(
    control_plane_binaries: controlplane.Binaries,
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "devmig_testbed.demo", "--size", "16MiB"],
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
    assert re.search(r"result: +Succeeded \(node-a -> node-b\)", out)
    assert "now STOP on the source, RUNNING on the target" in out
    assert re.search(r"downtime: +\d+ ms", out)
    assert re.search(r"throughput: +[\d.]+ MiB/s", out)
    # The VMM stand-in's end-to-end checks: no access slipped past a trap,
    # no dirty page lost, the device state intact.
    assert re.search(r"missed traps: +0 \(the vCPU's BAR accesses: [1-9]\d* trapped", out)
    assert re.search(r"guest memory: +the VMM's copy equals the source's", out)
    assert re.search(r"device state: +the target's equals the source's", out)
    # The progress bar went through every phase on stderr.
    for phase in ("Validating", "PreCopy", "StopAndCopy", "Succeeded"):
        assert phase in r.stderr
    assert out.rstrip().endswith("==> demo finished")
