"""The stream's checksums alone, on one core, against widely used libraries.

Figures (bytes per second over a 256 MiB buffer, best of --repeat runs; see
docs/benchmarks.md):

sha256
    devmig's SHA-256 (the trailer digest) as the stream uses it (AUTO: the
    SHA extensions where the CPU has them), against Python's hashlib
    (OpenSSL) on the same bytes. The portable C figure is reported beside.
crc32c
    devmig's CRC32C (every frame; AUTO: the SSE4.2 crc32 instruction where
    present) against zlib.crc32 (the other common CRC, a different
    polynomial, same job size). The portable slicing-by-8 figure beside.
ghash
    devmig's GHASH (the core of the stream's keyed MAC; AUTO: carry-less
    multiplication where present) against OpenSSL's AES-256-GCM (via
    ``cryptography``) authenticating the same bytes as additional data with
    an empty plaintext: the same GHASH plus two AES blocks. The portable
    bit-at-a-time figure beside (on a 1/64 slice: it is that slow).

frame_seal, frame_open
    A sealed stream's frames (1 MiB, as the pump makes them) through the
    one-pass code: AES-256-CTR, CRC32C and the MAC together where the CPU
    has VAES and VPCLMULQDQ (``devmig_native.frame_pass``), against the
    same three as separate passes over each frame in the same run. OpenSSL's
    AES-256-GCM on the same bytes in 1 MiB records (``cryptography``)
    beside, for scale. In place, on the buffer: the cipher's output is
    the next run's input, which changes nothing of the work.

Both run without the GIL and without a copy of the buffer.

    uv run --no-sync python bench/bench_checksums.py [--mib N] [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable

import devmig_native
from devmig_native import ChecksumImpl


def _rate(fn: Callable[[memoryview], object], buf: memoryview, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(buf)
        best = min(best, time.perf_counter() - t0)
    return len(buf) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="buffer size, MiB")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best counts")
    args = ap.parse_args()
    buf = memoryview(os.urandom(args.mib << 20))
    figs = []
    key, h = bytes(range(32)), bytes(range(16))

    def gcm_aad(b: memoryview) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        return AESGCM(key).encrypt(bytes(12), b"", b)

    for name, ours, portable, base in [
        (
            "sha256",
            lambda b: devmig_native.sha256(b),
            lambda b: devmig_native.sha256(b, ChecksumImpl.PORTABLE),
            lambda b: hashlib.sha256(b).digest(),
        ),
        (
            "crc32c",
            lambda b: devmig_native.crc32c(b),
            lambda b: devmig_native.crc32c(b, ChecksumImpl.PORTABLE),
            lambda b: zlib.crc32(b),
        ),
        (
            "ghash",
            lambda b: devmig_native.ghash(h, b),
            lambda b: devmig_native.ghash(h, b[: len(b) // 64], ChecksumImpl.PORTABLE),
            gcm_aad,
        ),
    ]:
        value = _rate(ours, buf, args.repeat)
        baseline = _rate(base, buf, args.repeat)
        figs.append(
            {
                "name": name,
                "value": round(value),
                "baseline": round(baseline),
                "unit": "B/s",
                "ratio": round(value / baseline, 3),
                "portable": round(_rate(portable, buf, 1) / (64 if name == "ghash" else 1)),
                "impls": devmig_native.crypto_impls(),
            }
        )
    nonce = bytes(16)
    frame = 1 << 20
    work = bytearray(buf)

    def gcm_records(b: memoryview) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aead = AESGCM(key)
        for i in range(0, len(b), frame):
            aead.encrypt(i.to_bytes(12, "little"), b[i : i + frame], None)

    gcm = _rate(gcm_records, buf, args.repeat)
    for name, mode in [
        ("frame_seal", devmig_native.FrameMode.SEAL),
        ("frame_open", devmig_native.FrameMode.OPEN),
    ]:
        one = _rate(
            lambda b, m=mode: devmig_native.frame_pass(m, key, nonce, b, frame, True),
            memoryview(work),
            args.repeat,
        )
        apart = _rate(
            lambda b, m=mode: devmig_native.frame_pass(m, key, nonce, b, frame, False),
            memoryview(work),
            args.repeat,
        )
        figs.append(
            {
                "name": name,
                "value": round(one),
                "baseline": round(apart),
                "unit": "B/s",
                "ratio": round(one / apart, 3),
                "openssl_aes_256_gcm": round(gcm),
                "impls": devmig_native.crypto_impls(),
            }
        )
    for f in figs:
        print(json.dumps(f))


if __name__ == "__main__":
    main()
