"""devmig's own VFIO uAPI header (include/devmig/vfio_uapi.h) against the
Linux 6.12 header from Debian's linux-source-6.12 package.

Every constant our header defines (DEVMIG_VFIO_X) must equal the kernel's
VFIO_X, and every struct (devmig_vfio_y) must have the kernel's struct
vfio_y's size and alignment, with each field at the kernel's offset. The
checker is generated from our header's text, so a definition added there
is checked with no list to keep; a name the 6.12 header lacks fails the
build of the checker, which fails the test. A second test feeds it a
header with one value and one field drifted and expects both reported.

The kernel header comes from the kernel source tree the real-kernel test
unpacks (~/.cache/devmig/kernel), or is extracted once from
/usr/src/linux-source-6.12.tar.xz into ~/.cache/devmig/uapi-6.12.
"""

from __future__ import annotations

import glob
import os
import pathlib
import re
import shutil
import subprocess
import tarfile

import pytest

NATIVE = pathlib.Path(__file__).resolve().parents[1]
OURS = NATIVE / "include" / "devmig" / "vfio_uapi.h"
# Each of our uAPI headers and the kernel header it mirrors.
PAIRS = {"vfio_uapi.h": "vfio.h", "iommufd_uapi.h": "iommufd.h"}
_XDG = os.environ.get("XDG_CACHE_HOME")
CACHE = (pathlib.Path(_XDG) if _XDG else pathlib.Path.home() / ".cache") / "devmig"
TARBALL = pathlib.Path("/usr/src/linux-source-6.12.tar.xz")
MEMBER = "linux-source-6.12/include/uapi/linux/{}"


def _kernel_uapi_dir() -> pathlib.Path:
    """A directory holding only linux/vfio.h and linux/iommufd.h from 6.12;
    everything they include (linux/types.h, linux/ioctl.h) comes from the
    system's exported headers, as for any userspace build."""
    out = CACHE / "uapi-6.12"
    missing = [h for h in PAIRS.values() if not (out / "linux" / h).exists()]
    if not missing:
        return out
    (out / "linux").mkdir(parents=True, exist_ok=True)
    unpacked = sorted(glob.glob(str(CACHE / "kernel" / "src-6.12*")))
    for h in missing:
        dest = out / "linux" / h
        tmp = dest.with_suffix(".tmp")
        src = pathlib.Path(unpacked[-1]) / MEMBER.format(h) if unpacked else None
        if src is not None and src.exists():
            shutil.copyfile(src, tmp)
        elif TARBALL.exists():
            with tarfile.open(TARBALL, "r:xz") as tar:
                f = tar.extractfile(MEMBER.format(h))
                assert f is not None, f"{MEMBER.format(h)} missing from {TARBALL}"
                tmp.write_bytes(f.read())
        else:
            msg = f"{TARBALL} not found: install linux-source-6.12 (scripts/bootstrap.sh does)"
            if os.environ.get("CI") == "true":
                pytest.fail(msg, pytrace=False)
            pytest.skip(msg)
        tmp.replace(dest)
    return out


# Fields whose name differs from the kernel's, and why. The kernel's
# "__reserved" is an identifier C reserves for the implementation, so our
# header calls it "reserved"; the offset is still checked.
FIELD_NAMES = {("vfio_device_feature_dma_logging_control", "reserved"): "__reserved"}


def _checker_source(header_text: str, header_path: pathlib.Path) -> tuple[str, int]:
    """C source that prints 'name ours kernel' for every value compared,
    and how many values that is."""
    consts = re.findall(r"^#define DEVMIG_(\w+)[ \t]+\S", header_text, re.M)
    structs = re.findall(r"^struct devmig_(\w+) \{(.*?)^\};", header_text, re.M | re.S)
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/vfio.h>",
        "#include <linux/iommufd.h>",
        f'#include "{header_path}"',
        '#define SHOW(n, a, b) printf("%s %lld %lld\\n", n, (long long)(a), (long long)(b))',
        "int main(void) {",
    ]
    n = 0
    for c in consts:
        if c.endswith("_UAPI_H"):
            continue  # the include guard
        lines.append(f'SHOW("{c}", DEVMIG_{c}, {c});')
        n += 1
    for name, body in structs:
        ours, theirs = f"struct devmig_{name}", f"struct {name}"
        lines.append(f'SHOW("sizeof {name}", sizeof({ours}), sizeof({theirs}));')
        lines.append(f'SHOW("alignof {name}", _Alignof({ours}), _Alignof({theirs}));')
        n += 2
        for field in re.findall(r"(\w+)(?:\[\])?;", re.sub(r"/\*.*?\*/", "", body, flags=re.S)):
            lines.append(
                f'SHOW("offsetof {name}.{field}", offsetof({ours}, {field}), '
                f"offsetof({theirs}, {FIELD_NAMES.get((name, field), field)}));"
            )
            n += 1
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n", n


def _compare(header: pathlib.Path, tmp: pathlib.Path) -> tuple[list[str], int]:
    """Mismatches ('NAME: ours X, 6.12 Y') and how many values were compared."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "no C compiler; install gcc"
    src, n = _checker_source(header.read_text(), header)
    (tmp / "check.c").write_text(src)
    exe = tmp / "check"
    r = subprocess.run(
        # __user: the sparse annotation headers_install strips from the
        # exported copy; the source tree still has it.
        [
            cc,
            "-std=gnu11",
            "-D__user=",
            "-I",
            str(_kernel_uapi_dir()),
            "-o",
            str(exe),
            str(tmp / "check.c"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"the checker does not build against 6.12:\n{r.stderr[-4000:]}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    bad = []
    for line in out.splitlines():
        name, ours, theirs = line.rsplit(" ", 2)
        if ours != theirs:
            bad.append(f"{name}: ours {ours}, 6.12 {theirs}")
    assert len(out.splitlines()) == n
    return bad, n


@pytest.mark.parametrize("ours", sorted(PAIRS))
def test_every_definition_in_our_uapi_header_equals_linux_6_12(
    ours: str, tmp_path: pathlib.Path
) -> None:
    bad, n = _compare(NATIVE / "include" / "devmig" / ours, tmp_path)
    assert not bad, f"devmig's {ours} differs from Linux 6.12:\n" + "\n".join(bad)
    # Each header defines at least this many; a parse that found little
    # would pass vacuously.
    assert n >= {"vfio_uapi.h": 200, "iommufd_uapi.h": 60}[ours], f"only {n} values compared"


def test_the_check_reports_a_drifted_value_and_a_drifted_field(tmp_path: pathlib.Path) -> None:
    text = OURS.read_text()
    drifted = text.replace(
        "#define DEVMIG_VFIO_DEVICE_FEATURE_MIG_DATA_SIZE 9",
        "#define DEVMIG_VFIO_DEVICE_FEATURE_MIG_DATA_SIZE 10",
    ).replace(
        "\tuint32_t nr_areas;\n\tuint32_t reserved;", "\tuint64_t nr_areas;\n\tuint32_t reserved;"
    )
    assert drifted != text and drifted.count("uint64_t nr_areas") == 1
    header = tmp_path / "drifted_uapi.h"
    header.write_text(drifted)
    bad, _ = _compare(header, tmp_path)
    names = {b.split(":")[0] for b in bad}
    assert "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE" in names
    assert "offsetof vfio_region_info_cap_sparse_mmap.reserved" in names
