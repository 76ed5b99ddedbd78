"""Fuzz the two parsers that read bytes from the network: the devmig stream
decoder and the dirty bitmap decoder, with libFuzzer (clang's
-fsanitize=fuzzer) plus ASan and UBSan, for a bounded time each.

The targets are agent-native/fuzz/fuzz_*.c, built against the core's own
sources and cached under ~/.cache/devmig/fuzz by the hash of every source
they compile. Seeds are valid inputs made here through the binding (a real
simulated device's stream, real encodings), so mutation starts from
inputs that pass every check. A crash, a sanitizer report, a leak, or an
input that breaks a harness invariant fails the test with libFuzzer's
output; the reproducer is left in the test's temporary directory.

Time per target: DEVMIG_FUZZ_SECONDS (default 20).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import subprocess

import pytest

import devmig_native as dn

NATIVE = pathlib.Path(__file__).resolve().parents[1]
_XDG = os.environ.get("XDG_CACHE_HOME")
CACHE = (pathlib.Path(_XDG) if _XDG else pathlib.Path.home() / ".cache") / "devmig" / "fuzz"
SECONDS = int(os.environ.get("DEVMIG_FUZZ_SECONDS", "20"))
# Enough to show the target really ran (a few hundred per second at least,
# even sanitized on a loaded 2-CPU machine), far below what a healthy run does.
MIN_EXECS = 1000


def _clang() -> str:
    for name in ("clang-14", "clang"):
        found = shutil.which(name)
        if found:
            return found
    msg = "clang not found: install clang-14 and libclang-rt-14-dev (scripts/bootstrap.sh does)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _build(target: str) -> pathlib.Path:
    clang = _clang()
    sources = [NATIVE / "fuzz" / f"{target}.c", *sorted((NATIVE / "src").rglob("*.c"))]
    headers = sorted((NATIVE / "include").rglob("*.h")) + sorted((NATIVE / "src").rglob("*.h"))
    h = hashlib.sha256(clang.encode())
    for p in sources + headers:
        h.update(p.name.encode() + p.read_bytes())
    out = CACHE / f"{target}-{h.hexdigest()[:16]}"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        cmd = [
            clang,
            "-g",
            "-O1",
            "-D_GNU_SOURCE",
            "-fsanitize=fuzzer,address,undefined",
            "-fno-sanitize-recover=undefined",
            "-I",
            str(NATIVE / "include"),
            *map(str, sources),
            "-pthread",
            "-o",
            str(tmp),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 and "fuzzer" in r.stderr and "cannot find" in r.stderr:
            pytest.fail("clang has no libFuzzer runtime: install libclang-rt-14-dev", pytrace=False)
        assert r.returncode == 0, r.stderr[-4000:]
        tmp.replace(out)
    return out


def _stream_seeds(corpus: pathlib.Path, tmp: pathlib.Path) -> None:
    for i, mem in enumerate((4096, 3 * 4096, 64 * 1024)):
        dev = dn.SimDevice(mem_size=mem, seed=i, driver="devmig-sim")
        dev.set_log(lambda _line: None)
        dev.set_state(dn.MigState.STOP_COPY, dn.MigState.RUNNING)
        path = tmp / f"s{i}.bin"
        dev.save_stream(path)
        dev.close()
        body = path.read_bytes()
        for control in (0, 7, 7 | (3 << 3)):
            (corpus / f"stream-{i}-{control}").write_bytes(bytes([control]) + body)


def _bitmap_seeds(corpus: pathlib.Path) -> None:
    cases = {
        "empty": (b"\0" * 16, 128),
        "sparse": (bytes([1, 0, 0, 0x80]) + b"\0" * 60, 512),
        "dense": (bytes(range(256)) * 16, 32768),
        "two-blocks": (b"\xff" * 4096 + b"\x55" * 4096 + b"\x01" * 8, 65600),
    }
    for name, (bm, npages) in cases.items():
        (corpus / name).write_bytes(dn.bitmap_encode(bm, npages))


def _run(target: str, corpus: pathlib.Path, workdir: pathlib.Path) -> None:
    binary = _build(target)
    r = subprocess.run(
        [
            str(binary),
            f"-max_total_time={SECONDS}",
            "-timeout=10",  # one input taking 10 s is a hang
            "-rss_limit_mb=2048",
            "-max_len=262144",
            "-print_final_stats=1",
            f"-artifact_prefix={workdir}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=SECONDS + 120,
    )
    assert r.returncode == 0, f"{target} found a failure:\n{r.stderr[-6000:]}"
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.stderr)
    assert m, r.stderr[-2000:]
    execs = int(m.group(1))
    print(f"{target}: {execs} inputs in {SECONDS} s, no failure")
    assert execs >= MIN_EXECS, f"{target} ran only {execs} inputs:\n{r.stderr[-2000:]}"


@pytest.mark.timeout(600)
def test_the_stream_decoder_survives_fuzzing(tmp_path: pathlib.Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _stream_seeds(corpus, tmp_path)
    _run("fuzz_stream", corpus, tmp_path)


@pytest.mark.timeout(600)
def test_the_bitmap_decoder_survives_fuzzing(tmp_path: pathlib.Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _bitmap_seeds(corpus)
    _run("fuzz_bitmap", corpus, tmp_path)
