"""The stream's checksums from Python: every implementation agrees with the
definitions (a bitwise CRC32C here, hashlib's SHA-256), and the CPU's own
implementations are used where /proc/cpuinfo says the CPU has them."""

from __future__ import annotations

import errno
import hashlib
import pathlib
import random

import pytest

import devmig_native
from devmig_native import ChecksumImpl


def _cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _crc_bitwise(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def _available(impl: ChecksumImpl) -> bool:
    try:
        devmig_native.crc32c(b"", impl)
        devmig_native.sha256(b"", impl)
    except OSError as e:
        assert e.errno == errno.ENOTSUP
        return False
    return True


# X86_512 is GHASH's and CRC32C's (GHASH tested against AES-GCM below,
# CRC32C in its own test), not SHA-256's.
IMPLS = [i for i in ChecksumImpl if i is not ChecksumImpl.X86_512]
FOLD_FLAGS = {"vpclmulqdq", "avx512f", "avx512bw", "pclmulqdq", "sse4_2"}


def test_the_cpu_s_own_implementations_are_used_when_it_has_them() -> None:
    flags = _cpu_flags()
    impls = devmig_native.crypto_impls()
    if FOLD_FLAGS.issubset(flags):
        assert "crc32c=vpclmulqdq" in impls
        devmig_native.crc32c(b"x", ChecksumImpl.X86_512)  # does not raise
    elif "sse4_2" in flags:
        assert "crc32c=sse4.2" in impls
    if "sse4_2" in flags:
        devmig_native.crc32c(b"x", ChecksumImpl.X86)  # does not raise
    if "sha_ni" in flags and "sse4_2" in flags:
        assert "sha256=sha-ni" in impls
    if {"vpclmulqdq", "avx512f", "avx512bw"} <= flags:
        assert "ghash=vpclmulqdq" in impls
        devmig_native.ghash(bytes(16), b"x", ChecksumImpl.X86_512)  # does not raise
    elif "pclmulqdq" in flags and "sse4_2" in flags:
        assert "ghash=pclmul" in impls
        devmig_native.ghash(bytes(16), b"x", ChecksumImpl.X86)  # does not raise
    if not flags & {"sse4_2", "sha_ni", "pclmulqdq"}:
        assert impls == "crc32c=slicing-by-8 sha256=portable ghash=portable"


def test_an_unknown_implementation_is_refused() -> None:
    with pytest.raises(OSError) as e:
        devmig_native.crc32c(b"abc", 7)
    assert e.value.errno == errno.ENOTSUP
    with pytest.raises(OSError):
        devmig_native.sha256(b"abc", 7)


@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
def test_each_implementation_matches_the_definitions(impl: ChecksumImpl) -> None:
    if not _available(impl):
        pytest.skip(f"this CPU lacks {impl.name}")
    rng = random.Random(int(impl))
    assert devmig_native.crc32c(b"123456789", impl) == 0xE3069283
    assert devmig_native.sha256(b"abc", impl).hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    for n in [0, 1, 7, 63, 64, 65, 1000, 6143, 6144, 6145, 20000]:
        data = rng.randbytes(n)
        assert devmig_native.sha256(data, impl) == hashlib.sha256(data).digest(), n
        if n <= 1000:
            assert devmig_native.crc32c(data, impl) == _crc_bitwise(data), n
    big = memoryview(rng.randbytes(5 << 20))[3:]  # odd start and length
    assert devmig_native.sha256(big, impl) == hashlib.sha256(big).digest()
    assert devmig_native.crc32c(big, impl) == devmig_native.crc32c(big, ChecksumImpl.PORTABLE)


def test_the_folded_crc32c_matches_the_definition_at_every_length_around_its_steps() -> None:
    if not FOLD_FLAGS.issubset(_cpu_flags()):
        pytest.skip("this CPU lacks VPCLMULQDQ on AVX-512 (the folded CRC32C)")
    rng = random.Random(512)
    data = rng.randbytes(3000)
    # The folded path starts at 2048 bytes and moves 256 at a time: every
    # length across two of its steps, and a tail of every size.
    for n in range(2040, 2600):
        assert devmig_native.crc32c(data[:n], ChecksumImpl.X86_512) == _crc_bitwise(data[:n]), n
    big = memoryview(rng.randbytes(3 << 20))[5:]  # odd start and length
    assert devmig_native.crc32c(big, ChecksumImpl.X86_512) == devmig_native.crc32c(
        big, ChecksumImpl.PORTABLE
    )


def _aes_block(key: bytes, block: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


@pytest.mark.parametrize("impl", [ChecksumImpl.PORTABLE, ChecksumImpl.X86, ChecksumImpl.X86_512])
def test_ghash_is_the_ghash_inside_openssls_aes_gcm(impl: ChecksumImpl) -> None:
    """AES-GCM's tag over additional data A with an empty plaintext is
    GHASH_H(A, GCM's length block) xor E_K(J0), H = E_K(0^128): the stream's
    MAC core must give exactly that, for every length around the block and
    aggregation boundaries (8 blocks of 16 bytes with PCLMULQDQ, 64 with
    VPCLMULQDQ)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    flags = _cpu_flags()
    if impl is ChecksumImpl.X86 and "pclmulqdq" not in flags:
        pytest.skip("this CPU has no carry-less multiplication (pclmulqdq)")
    if impl is ChecksumImpl.X86_512 and not {"vpclmulqdq", "avx512f", "avx512bw"} <= flags:
        pytest.skip("this CPU has no 512-bit carry-less multiplication (vpclmulqdq, avx512bw)")
    rng = random.Random(7)
    blocks = [0, 1, 15, 16, 17, 127, 128, 129, 255, 256, 257, 511, 1000]
    groups = [1023, 1024, 1025, 2047, 2048, 2064, 3071, 4096, 65_537]  # 64 blocks: 1 KiB
    for length in blocks + groups:
        key, iv = rng.randbytes(32), rng.randbytes(12)
        data = rng.randbytes(length)
        h = _aes_block(key, bytes(16))
        s = _aes_block(key, iv + b"\0\0\0\1")
        tag = AESGCM(key).encrypt(iv, b"", data)
        mine = devmig_native.ghash(h, data, impl)
        assert bytes(a ^ b for a, b in zip(mine, s, strict=True)) == tag, length


def test_hmac_sha256_matches_pythons() -> None:
    import hmac

    rng = random.Random(8)
    for klen in (0, 32, 64, 65, 200):
        key, msg = rng.randbytes(klen), rng.randbytes(rng.randrange(300))
        want = hmac.new(key, msg, hashlib.sha256).digest()
        assert devmig_native.hmac_sha256(key, msg) == want


ONE_PASS_FLAGS = {"vaes", "vpclmulqdq", "avx512f", "avx512bw", "aes"}


@pytest.mark.parametrize("mode", list(devmig_native.FrameMode))
def test_one_pass_frames_give_what_the_separate_passes_give(mode: devmig_native.FrameMode) -> None:
    """The stream's frames through the one-pass code (VAES and VPCLMULQDQ
    together) and through the separate passes: the same bytes, CRC32C per
    frame and MAC tag, for frame sizes around the loop's 1 KiB step and
    4 KiB minimum. Sealing gives AES-256-CTR's ciphertext (OpenSSL's, per
    test_native_pump) and each frame's CRC32C is that of its ciphertext."""
    if devmig_native.aes_impl() == "none" and mode is not devmig_native.FrameMode.MAC:
        pytest.skip("this CPU has no AES-NI: streams are not sealed here")
    if not _cpu_flags() >= ONE_PASS_FLAGS:
        print("no VAES/VPCLMULQDQ on this CPU: both runs take the separate passes")
    rng = random.Random(11)
    key, nonce = rng.randbytes(32), rng.randbytes(16)
    for size, frame in [
        (3 << 20, 1 << 20),
        (100_000, 4096),
        (100_000, 4097),
        (70_001, 5000),
        (50, 16),
    ]:
        data = rng.randbytes(size)
        a, b = bytearray(data), bytearray(data)
        one = devmig_native.frame_pass(mode, key, nonce, a, frame, one_pass=True)
        apart = devmig_native.frame_pass(mode, key, nonce, b, frame, one_pass=False)
        assert one == apart, (mode, size, frame)
        assert a == b
        wire = bytes(a) if mode is devmig_native.FrameMode.SEAL else data
        if mode is devmig_native.FrameMode.SEAL:
            assert wire == devmig_native.aes256_ctr(key, bytes(8), 0, data)
        if mode is devmig_native.FrameMode.OPEN:
            assert bytes(a) == devmig_native.aes256_ctr(key, bytes(8), 0, data)
        frames = [wire[i : i + frame] for i in range(0, size, frame)]
        assert one[1] == [devmig_native.crc32c(f) for f in frames]


def test_a_sealed_frame_opens_to_its_plaintext_with_the_same_sums() -> None:
    if devmig_native.aes_impl() == "none":
        pytest.skip("this CPU has no AES-NI: streams are not sealed here")
    rng = random.Random(12)
    key, nonce, data = rng.randbytes(32), rng.randbytes(16), rng.randbytes((2 << 20) + 5)
    buf = bytearray(data)
    sealed = devmig_native.frame_pass(devmig_native.FrameMode.SEAL, key, nonce, buf)
    assert buf != data
    opened = devmig_native.frame_pass(devmig_native.FrameMode.OPEN, key, nonce, buf)
    assert bytes(buf) == data
    assert sealed == opened
