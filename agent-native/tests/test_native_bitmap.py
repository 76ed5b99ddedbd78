"""Dirty-page bitmaps through the binding: ranges and counts equal a plain
Python reading of the bits, encodings round-trip, merge by OR, and every
corruption of an encoding is either refused or decodes to a valid bitmap
without touching memory it should not."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import devmig_native as dn

BLOCK = 32768  # DEVMIG_BITMAP_BLOCK_PAGES


def bitmap_of(pages: set[int], npages: int) -> bytearray:
    bm = bytearray((npages + 63) // 64 * 8)
    for p in pages:
        bm[p // 8] |= 1 << (p % 8)
    return bm


def runs_of(pages: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


page_sets = st.integers(min_value=0, max_value=3 * BLOCK + 77).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.sets(st.integers(min_value=0, max_value=max(n - 1, 0)), max_size=400)
        if n
        else st.just(set[int]()),
    )
)


@settings(max_examples=150, deadline=None)
@given(page_sets)
def test_ranges_and_count_equal_the_bits(case: tuple[int, set[int]]) -> None:
    npages, pages = case
    bm = bitmap_of(pages, npages)
    assert dn.bitmap_ranges(bm, npages) == runs_of(pages)
    assert dn.bitmap_count(bm, npages) == len(pages)


@settings(max_examples=150, deadline=None)
@given(page_sets, st.sampled_from([512, 2048, 4096, 1 << 21]))
def test_an_encoding_decodes_to_the_same_bitmap(case: tuple[int, set[int]], page_size: int) -> None:
    npages, pages = case
    bm = bitmap_of(pages, npages)
    enc = dn.bitmap_encode(bm, npages, page_size)
    assert len(enc) <= 32 + ((npages + BLOCK - 1) // BLOCK) * (11 + 4096)
    n, ps, back = dn.bitmap_decode(enc)
    assert (n, ps) == (npages, page_size)
    assert bytes(back) == bytes(bm)


def test_decoding_several_reports_merges_them() -> None:
    npages = 2 * BLOCK
    a, b = {1, 2, 3, BLOCK + 5}, {3, 4, 70000 % npages}
    into = bytearray((npages + 63) // 64 * 8)
    dn.bitmap_decode(dn.bitmap_encode(bitmap_of(a, npages), npages), into)
    dn.bitmap_decode(dn.bitmap_encode(bitmap_of(b, npages), npages), into)
    assert dn.bitmap_ranges(into, npages) == runs_of(a | b)
    merged = bitmap_of(a, npages)
    dn.bitmap_or(merged, bitmap_of(b, npages))
    assert merged == into


def test_a_sparse_bitmap_encodes_to_a_few_bytes_per_run() -> None:
    npages = 1 << 20  # a 4 GiB guest at 4 KiB pages: 128 KiB of bitmap
    rnd = random.Random(7)
    pages = {rnd.randrange(npages) for _ in range(1000)}
    enc = dn.bitmap_encode(bitmap_of(pages, npages), npages)
    assert len(enc) < 32 + 6 * len(runs_of(pages)) + 3 * (npages // BLOCK) * 4
    assert len(enc) < (npages // 8) // 20


@pytest.mark.parametrize("nruns", [1, 681, 682, 683, 700])
def test_a_block_is_written_as_runs_exactly_while_that_is_smaller(nruns: int) -> None:
    """The encoder counts a block's runs (eight words at a time where the
    CPU has AVX-512) and writes runs while 3 + 6 runs bytes < 4096 literal
    bytes, i.e. up to 682 runs. Runs here cross word boundaries at every
    position of an 8-word vector, so a lane that missed its lower
    neighbour's top bit would count one run twice."""
    npages = BLOCK
    pages: set[int] = set()
    stride = (BLOCK - 64) // nruns
    for r in range(nruns):
        # 3 pages, starting 2 before a word edge where the stride leaves room
        edge = (r * stride // 64) * 64 + 62
        start = edge if r * stride <= edge and edge + 4 < (r + 1) * stride else r * stride
        pages.update((start, start + 1, start + 2))
    got = runs_of(pages)
    enc = dn.bitmap_encode(bitmap_of(pages, npages), npages)
    assert enc[32] == 0  # no blocks skipped
    kind = enc[33]
    if len(got) <= 682:
        assert kind == 1, "RUNS expected"
        n, shift, i = 0, 0, 34
        while True:  # the run count, a LEB128 varint
            n |= (enc[i] & 0x7F) << shift
            shift += 7
            if enc[i] < 0x80:
                break
            i += 1
        assert n == len(got)
    else:
        assert kind == 2, "LITERAL expected"
    assert dn.bitmap_decode(enc)[2] == bitmap_of(pages, npages)


def test_the_encoder_refuses_a_bit_beyond_the_page_count() -> None:
    bm = bitmap_of({70}, 128)
    with pytest.raises(ValueError, match="beyond the page count"):
        dn.bitmap_encode(bm, 70)
    with pytest.raises(ValueError):
        dn.bitmap_encode(bm, 128, 1000)


def test_the_decoder_refuses_a_bitmap_too_small_and_leaves_it_untouched() -> None:
    enc = dn.bitmap_encode(bitmap_of({1, 200}, 256), 256)
    small = bytearray(8)
    with pytest.raises(ValueError, match="too small"):
        dn.bitmap_decode(enc, small)
    assert small == bytearray(8)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_corrupted_encoding_is_refused_or_decodes_within_bounds(data: st.DataObject) -> None:
    npages = data.draw(st.integers(min_value=1, max_value=2 * BLOCK + 10))
    pages = data.draw(st.sets(st.integers(min_value=0, max_value=npages - 1), max_size=60))
    enc = bytearray(dn.bitmap_encode(bitmap_of(pages, npages), npages))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(enc) - 1))
        enc[at] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(enc)))
    try:
        n, _, back = dn.bitmap_decode(bytes(enc[:cut]))
    except ValueError:
        return
    # Accepted: then it is a well-formed bitmap of its own page count.
    assert len(back) == (n + 63) // 64 * 8
    assert dn.bitmap_count(back, n) == sum(c for _, c in dn.bitmap_ranges(back, n))


def test_a_header_asking_for_a_huge_bitmap_is_refused_before_allocating() -> None:
    enc = bytearray(dn.bitmap_encode(bitmap_of(set(), 64), 64))
    enc[16:24] = (1 << 40).to_bytes(8, "little")
    with pytest.raises(ValueError, match="more than the 2"):
        dn.bitmap_decode(bytes(enc))


def _impls() -> list[dn.BitmapImpl]:
    """The encoder implementations this CPU has (the portable one always)."""
    have = []
    for impl in dn.BitmapImpl:
        try:
            dn.bitmap_encode(bytearray(8), 64, 4096, impl)
        except OSError:
            continue
        have.append(impl)
    return have


# Runs of 1 to 8 pages with gaps drawn around the sizes the vector encoder
# treats apart: a byte's 8 pages, 8 words' 512, a two-byte varint's 2^14.
dense_shapes = st.tuples(
    st.integers(min_value=1, max_value=3 * BLOCK + 77),
    st.lists(
        st.tuples(
            st.sampled_from([1, 2, 3, 7, 8, 9, 60, 500, 513, 16383, 16384, 16385]),
            st.integers(min_value=1, max_value=8),
        ),
        max_size=600,
    ),
)


@settings(max_examples=200, deadline=None)
@given(dense_shapes, st.randoms(use_true_random=False))
def test_every_encoder_implementation_writes_the_same_bytes(
    shape: tuple[int, list[tuple[int, int]]], rnd: random.Random
) -> None:
    npages, steps = shape
    pages: set[int] = set()
    p = rnd.randrange(npages)
    for gap, length in steps:
        p += gap
        pages.update(range(p, min(p + length, npages)))
        p += length
        if p >= npages:
            p = rnd.randrange(npages)
    bm = bitmap_of(pages, npages)
    ref = dn.bitmap_encode(bm, npages, 4096, dn.BitmapImpl.PORTABLE)
    for impl in _impls():
        assert dn.bitmap_encode(bm, npages, 4096, impl) == ref, f"{impl.name} differs"
    assert dn.bitmap_decode(ref)[2] == bm


def test_an_implementation_this_cpu_lacks_is_refused_as_not_supported() -> None:
    with pytest.raises(OSError) as e:
        dn.bitmap_encode(bytearray(8), 64, 4096, 99)
    assert e.value.errno == 95  # ENOTSUP
    assert dn.bitmap_impl() in ("avx512-vbmi2", "popcnt-bmi", "portable")


def test_the_cpu_s_own_encoder_is_used_when_it_has_one() -> None:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    need_512 = {"avx512f", "avx512bw", "avx512_vpopcntdq", "avx512vbmi", "avx512_vbmi2"}
    need_512 |= {"avx512_bitalg", "bmi2", "popcnt", "bmi1"}
    if need_512 <= flags:
        assert dn.bitmap_impl() == "avx512-vbmi2"
        assert dn.BitmapImpl.X86_512 in _impls()
    elif {"popcnt", "bmi1"} <= flags:
        assert dn.bitmap_impl() == "popcnt-bmi"
    else:
        assert dn.bitmap_impl() == "portable"
