"""The plain C socket copy baseline (bench/rawcopy.c), built on first use.

The binary is cached under ~/.cache/devmig/bench, keyed by the source's
hash, so a changed baseline is rebuilt and never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess

SRC = pathlib.Path(__file__).resolve().parent / "rawcopy.c"
_XDG = os.environ.get("XDG_CACHE_HOME")
CACHE = (pathlib.Path(_XDG) if _XDG else pathlib.Path.home() / ".cache") / "devmig" / "bench"


def binary() -> pathlib.Path:
    """Path of the built baseline, compiling it when the source changed."""
    key = hashlib.sha256(SRC.read_bytes()).hexdigest()[:16]
    out = CACHE / f"rawcopy-{key}"
    if not out.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise SystemExit("rawcopy: no C compiler; install gcc (scripts/bootstrap.sh does)")
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run([cc, "-O2", "-pthread", "-o", str(tmp), str(SRC)], check=True)
        tmp.replace(out)
    return out


def measure(nbytes: int) -> tuple[float, float]:
    """(bytes/s, CPU seconds) of one plain C copy of nbytes, memfd to memfd over loopback TCP."""
    r = subprocess.run([str(binary()), str(nbytes)], check=True, capture_output=True, text=True)
    fig = json.loads(r.stdout.strip().splitlines()[-1])
    return fig["bytes"] / fig["seconds"], fig["cpu_seconds"]
