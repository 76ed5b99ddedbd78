"""The devmig-native CLI, as one static binary (cli/build-static.sh) and as
installed with the wheel, against the simulated device: exit codes a script
can rely on, state changes logged "FROM -> TO", and a save/load round trip
whose memory digests match while every damaged stream is refused."""

from __future__ import annotations

import pathlib
import re
import shutil
import struct
import subprocess
import sys

import pytest

NATIVE = pathlib.Path(__file__).resolve().parents[1]
OK, USAGE, DEVICE, REFUSED, STREAM = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def static_cli() -> pathlib.Path:
    if not shutil.which("gcc") and not shutil.which("cc"):
        pytest.fail("no C compiler: install gcc (scripts/bootstrap.sh does)", pytrace=False)
    r = subprocess.run(
        [str(NATIVE / "cli" / "build-static.sh")], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    return pathlib.Path(r.stdout.strip())


def _run(cli: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=60)


def _digest(out: str) -> str:
    m = re.search(r"^digest (0x[0-9a-f]{16})$", out, re.M)
    assert m, out
    return m.group(1)


def test_the_static_binary_has_no_dynamic_loader(static_cli: pathlib.Path) -> None:
    data = static_cli.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit ELF
    # ELF64 header: e_phoff at 0x20, e_phentsize and e_phnum at 0x36.
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    PT_DYNAMIC, PT_INTERP = 2, 3
    assert PT_INTERP not in types and PT_DYNAMIC not in types, types


def test_the_wheel_installs_the_cli_beside_python() -> None:
    cli = pathlib.Path(sys.executable).parent / "devmig-native"
    assert cli.exists(), "devmig-native is not installed with devmig-native's wheel"
    r = _run(cli, "--sim", "mem=64K", "probe")
    assert r.returncode == OK and "STOP_COPY P2P PRE_COPY" in r.stdout


@pytest.mark.parametrize("precopy", [False, True])
def test_save_then_load_moves_the_device_memory(
    static_cli: pathlib.Path, tmp_path: pathlib.Path, precopy: bool
) -> None:
    stream = tmp_path / "state.devmig"
    extra = ["--precopy"] if precopy else []
    save = _run(static_cli, "--sim", "mem=256K,seed=1,dirty=8", "save", "--to", str(stream), *extra)
    assert save.returncode == OK, save.stderr
    want = "RUNNING -> PRE_COPY" if precopy else "RUNNING -> STOP_COPY"
    assert f"devmig: {want}" in save.stderr
    assert "devmig: STOP_COPY -> STOP" in save.stderr
    load = _run(static_cli, "--sim", "mem=256K,seed=2", "load", "--from", str(stream))
    assert load.returncode == OK, load.stderr
    assert "devmig: RESUMING -> STOP" in load.stderr
    assert _digest(load.stdout) == _digest(save.stdout)


def test_a_damaged_stream_is_refused_with_the_stream_exit_code(
    static_cli: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    good = tmp_path / "good.devmig"
    assert _run(static_cli, "--sim", "mem=64K,seed=1", "save", "--to", str(good)).returncode == OK
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    for name, body in {"flipped": bytes(flipped), "truncated": data[: len(data) - 30]}.items():
        bad = tmp_path / name
        bad.write_bytes(body)
        r = _run(static_cli, "--sim", "mem=64K,seed=2", "load", "--from", str(bad))
        assert r.returncode == STREAM, (name, r.stderr)
        assert "was refused" in r.stderr and "reset" in r.stderr
        assert "devmig: RESUMING -> STOP" not in r.stderr  # never left RESUMING on bad data
    # A stream from a device with a different memory size: the device
    # itself refuses it.
    other = _run(static_cli, "--sim", "mem=128K,seed=2", "load", "--from", str(good))
    assert other.returncode == STREAM, other.stderr


def test_refused_transitions_and_usage_errors_have_their_own_exit_codes(
    static_cli: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    r = _run(static_cli, "--sim", "mem=64K", "state", "ERROR")
    assert r.returncode == REFUSED and "RUNNING -> ERROR refused" in r.stderr
    r = _run(static_cli, "--sim", "mem=64K,flags=stop_copy", "state", "PRE_COPY")
    assert r.returncode == REFUSED
    r = _run(static_cli, "--sim", "mem=64K", "state", "STOP_COPY")
    assert r.returncode == OK and r.stdout.strip() == "STOP_COPY"
    assert "devmig: RUNNING -> STOP_COPY (via RUNNING_P2P, STOP)" in r.stderr
    assert _run(static_cli, "--sim", "mem=64K", "state", "NOPE").returncode == USAGE
    assert _run(static_cli, "--sim", "bogus=1", "probe").returncode == USAGE
    assert _run(static_cli, "probe").returncode == USAGE
    assert _run(static_cli, "--sim", "mem=64K", "fly").returncode == USAGE
    assert _run(static_cli, "--sim", "mem=64K", "region-read", "0", "0", "4").returncode == DEVICE
    r = _run(static_cli, "--cdev", str(tmp_path / "no-such-vfio"), "probe")
    assert r.returncode == DEVICE and "no-such-vfio" in r.stderr
    assert _run(static_cli, "--help").returncode == OK


def test_dirty_runs_device_dma_logging_over_a_range(static_cli: pathlib.Path) -> None:
    r = _run(
        static_cli, "--sim", "mem=64K", "dirty", "--iova", "0", "--length", "1M", "--seconds", "0"
    )
    # "1M" is not a number the command takes: sizes are plain integers.
    assert r.returncode == USAGE
    r = _run(
        static_cli,
        "--sim",
        "mem=64K",
        "dirty",
        "--iova",
        "0",
        "--length",
        str(1 << 20),
        "--page-size",
        "8192",
        "--seconds",
        "0",
    )
    assert r.returncode == OK, r.stderr
    # Nothing runs DMA on an idle simulated device: a clean report of 128
    # 8 KiB pages, after a start the device accepted.
    assert "# device logs at 4096 bytes; report at 8192" in r.stdout
    assert r.stdout.rstrip().endswith("# 0 of 128 pages dirty")
    bad = _run(
        static_cli,
        "--sim",
        "mem=64K",
        "dirty",
        "--iova",
        "4096",
        "--length",
        "8192",
        "--page-size",
        "8192",
    )
    assert bad.returncode == USAGE  # iova not a multiple of the page size
