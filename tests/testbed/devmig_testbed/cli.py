"""``devmig-cluster up|down|status``: the test control plane, by hand.

``up`` starts etcd and kube-apiserver in the background (they outlive this
command), installs the CRDs from ``crds/`` and prints the kubeconfig path;
``down`` stops them. State lives in ``--dir`` (default ``.cache/cluster``
in the clone, ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import sys

from devmig_testbed import controlplane

DEFAULT_DIR = controlplane.REPO_ROOT / ".cache" / "cluster"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def up(workdir: pathlib.Path) -> int:
    state = workdir / "state.json"
    if state.exists():
        s = json.loads(state.read_text())
        if _alive(s["apiserver_pid"]) and _alive(s["etcd_pid"]):
            print(f"already up: {s['server']}\nexport KUBECONFIG={s['kubeconfig']}")
            return 0
        down(workdir)
    cp = controlplane.ControlPlane(
        workdir=workdir, binaries=controlplane.locate_binaries(build=True), detach=True
    )
    try:
        cp.start()
        names = cp.install_crds()
    except BaseException:
        cp.stop()
        raise
    print(f"installed CRDs: {', '.join(names) or '(none)'}")
    print(f"control plane up at {cp.server}")
    print(f"export KUBECONFIG={cp.admin_kubeconfig}")
    return 0


def down(workdir: pathlib.Path) -> int:
    state = workdir / "state.json"
    if not state.exists():
        print("no control plane recorded in", workdir)
        return 0
    s = json.loads(state.read_text())
    for key in ("apiserver_pid", "etcd_pid"):
        pid = int(s[key])
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            print(f"stopped {key.removesuffix('_pid')} (pid {pid})")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def status(workdir: pathlib.Path) -> int:
    state = workdir / "state.json"
    if not state.exists():
        print("down")
        return 1
    s = json.loads(state.read_text())
    ok = _alive(s["apiserver_pid"]) and _alive(s["etcd_pid"])
    print(f"{'up' if ok else 'broken'}: {s['server']}  KUBECONFIG={s['kubeconfig']}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="devmig-cluster", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR)
    a = p.parse_args(argv)
    try:
        return {"up": up, "down": down, "status": status}[a.command](a.dir.resolve())
    except controlplane.ControlPlaneError as e:
        print(f"devmig-cluster: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
