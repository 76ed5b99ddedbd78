/* Dirty-page bitmaps: scan, merge, and the compact encoding described in
 * include/devmig/bitmap.h. Word at a time throughout: clear words are
 * skipped with one compare, runs found with count-trailing-zeros, and the
 * encoder counts a block's runs with popcount before it picks a kind. */
#include <errno.h>
#include <string.h>

#include "devmig/bitmap.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the bitmap words and the encoding are little-endian; add byte swaps for this target"
#endif

#define MAGIC "DMDB"
#define KIND_RUNS 1
#define KIND_LITERAL 2
#define BLOCK_WORDS (DEVMIG_BITMAP_BLOCK_PAGES / 64)
/* Longest LEB128 varint of a 64-bit value. */
#define VARINT_MAX 10
/* Longest varint of an in-block value (< 32768 = 2^15: three 7-bit groups). */
#define VARINT_BLOCK_MAX 3
/* Page sizes a bitmap may describe: 512 bytes (the smallest IOMMU page
 * seen, below the IOMMUFD_TEST mock's 2 KiB) to 1 GiB (the largest huge
 * page). */
#define PAGE_SIZE_MIN 512u
#define PAGE_SIZE_MAX (1u << 30)

static uint64_t get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return v;
}

static uint32_t get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return v;
}

static uint16_t get16(const uint8_t *p)
{
	uint16_t v;

	memcpy(&v, p, 2);
	return v;
}

static int page_size_ok(uint32_t ps)
{
	return ps >= PAGE_SIZE_MIN && ps <= PAGE_SIZE_MAX && (ps & (ps - 1)) == 0;
}

/* Mask of the bits of the last word that stand for pages (all ones when
 * npages fills it). */
static uint64_t tail_mask(uint64_t npages)
{
	return npages % 64 ? (1ULL << (npages % 64)) - 1 : ~0ULL;
}

/* First set bit at or after p, below end (end when none). */
static uint64_t next_set(const uint64_t *bm, uint64_t p, uint64_t end)
{
	uint64_t i = p / 64, w;

	if (p >= end)
		return end;
	w = bm[i] & (~0ULL << (p % 64));
	while (!w) {
		if (++i * 64 >= end)
			return end;
		w = bm[i];
	}
	p = i * 64 + (uint64_t)__builtin_ctzll(w);
	return p < end ? p : end;
}

/* First clear bit at or after p, below end (end when none). */
static uint64_t next_clear(const uint64_t *bm, uint64_t p, uint64_t end)
{
	uint64_t i = p / 64, w;

	if (p >= end)
		return end;
	w = ~bm[i] & (~0ULL << (p % 64));
	while (!w) {
		if (++i * 64 >= end)
			return end;
		w = ~bm[i];
	}
	p = i * 64 + (uint64_t)__builtin_ctzll(w);
	return p < end ? p : end;
}

uint64_t devmig_bitmap_count(const uint64_t *bm, uint64_t npages)
{
	uint64_t n = 0, nw = devmig_bitmap_words(npages);

	if (!nw)
		return 0;
	for (uint64_t i = 0; i + 1 < nw; i++)
		n += (uint64_t)__builtin_popcountll(bm[i]);
	return n + (uint64_t)__builtin_popcountll(bm[nw - 1] & tail_mask(npages));
}

size_t devmig_bitmap_ranges(const uint64_t *bm, uint64_t npages, uint64_t *pos,
			    struct devmig_page_range *out, size_t max)
{
	uint64_t p = *pos;
	size_t n = 0;

	while (n < max) {
		uint64_t q;

		p = next_set(bm, p, npages);
		if (p >= npages)
			break;
		q = next_clear(bm, p, npages);
		out[n].first = p;
		out[n].count = q - p;
		n++;
		p = q;
	}
	*pos = p;
	return n;
}

void devmig_bitmap_or(uint64_t *dst, const uint64_t *src, uint64_t nwords)
{
	for (uint64_t i = 0; i < nwords; i++)
		dst[i] |= src[i];
}

/* ---- encoding ---- */

static inline __attribute__((always_inline)) uint8_t *put_varint(uint8_t *o, uint64_t v)
{
	while (v >= 0x80) {
		*o++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*o++ = (uint8_t)v;
	return o;
}

uint64_t devmig_bitmap_encode_bound(uint64_t npages)
{
	uint64_t nblocks = (npages + DEVMIG_BITMAP_BLOCK_PAGES - 1) / DEVMIG_BITMAP_BLOCK_PAGES;

	/* Per block at most: the skip varint, the kind byte, and the larger
	 * of the kinds the encoder may pick, which is never more than the
	 * literal words (RUNS is picked only when its bound is smaller). Plus
	 * the 4 bytes put_varint_small may store past the last run (a block
	 * of 682 runs, 4095 bytes at most, needs them to be encoded at all). */
	return DEVMIG_BITMAP_HEADER_LEN + nblocks * (VARINT_MAX + 1 + (uint64_t)BLOCK_WORDS * 8) + 4;
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Runs in a block's words: a run starts at each set bit whose lower
 * neighbour is clear, and the block's start counts as clear (runs never
 * cross blocks). */
ALWAYS_INLINE uint64_t count_runs(const uint64_t *w, uint64_t wn)
{
	uint64_t n = 0, prev = 0;

	for (uint64_t i = 0; i < wn; i++) {
		n += (uint64_t)__builtin_popcountll(w[i] & ~((w[i] << 1) | prev));
		prev = w[i] >> 63;
	}
	return n;
}

/* A varint of an in-block value (< 2^21), without branches: three bytes
 * are computed and stored as one 4-byte write, and o advances by as many as
 * the value needs. The caller leaves 4 bytes of room. */
ALWAYS_INLINE uint8_t *put_varint_small(uint8_t *o, uint32_t v)
{
	uint32_t two = v >= 0x80, three = v >= 0x4000;
	uint32_t b = (v & 0x7f) | (two << 7) | (((v >> 7) & 0x7f) << 8) | (three << 15) |
		     ((v >> 14) << 16);

	memcpy(o, &b, 4);
	return o + 1 + two + three;
}

/* Where runs start and end in a block's words, in order: the bits that
 * differ from their lower neighbour (the block's start counting as clear).
 * Each word's first four are written unconditionally, so a sparse word
 * costs no branch on how many it has; `tzcnt` of 0 is 64, which lands in
 * the slack past the real ones. Returns how many; edges has room for the
 * block's worst case plus 4. */
ALWAYS_INLINE uint32_t find_edges(const uint64_t *w, uint64_t wn, uint16_t *edges)
{
	uint64_t carry = 0;
	uint32_t k = 0;

	for (uint64_t i = 0; i < wn; i++) {
		uint64_t e = w[i] ^ ((w[i] << 1) | carry);
		uint32_t n = (uint32_t)__builtin_popcountll(e);
		uint16_t base = (uint16_t)(i * 64);

		carry = w[i] >> 63;
		for (int j = 0; j < 4; j++) {
			edges[k + (uint32_t)j] = (uint16_t)(base + (e ? __builtin_ctzll(e) : 64));
			e &= e - 1;
		}
		if (n > 4) {
			for (uint32_t j = 4; e; j++) {
				edges[k + j] = (uint16_t)(base + __builtin_ctzll(e));
				e &= e - 1;
			}
		}
		k += n;
	}
	return k;
}

/* Write a block's runs as (gap, len - 1) varint pairs from its edges: an
 * even edge starts a run, the next one ends it, and a run still open at the
 * block's last word ends there (bits beyond npages are clear, so that only
 * happens when the block is full). */
ALWAYS_INLINE uint8_t *emit_runs(const uint16_t *edges, uint32_t nedges, uint64_t wn, uint8_t *o)
{
	uint32_t last = 0;

	for (uint32_t k = 0; k + 1 < nedges; k += 2) {
		o = put_varint_small(o, edges[k] - last);
		o = put_varint_small(o, (uint32_t)edges[k + 1] - edges[k] - 1);
		last = edges[k + 1];
	}
	if (nedges & 1) {
		o = put_varint_small(o, edges[nedges - 1] - last);
		o = put_varint_small(o, (uint32_t)(wn * 64) - edges[nedges - 1] - 1);
	}
	return o;
}

typedef uint64_t (*count_runs_fn)(const uint64_t *w, uint64_t wn);

/* Declared here, defined with the x86 variants below: the edge finder and
 * run writer of the AVX-512 encoder (vec = 1). */
/* find_edges_512's limit and answer: with a limit below EDGES_ALL it gives
 * up (EDGES_DENSE) once the edges pass the limit or 16 words hold more than
 * 64 of them (dense: the scalar way, and likely a LITERAL block). The
 * encoder's "edges not known" is the same value. */
#define EDGES_ALL UINT32_MAX
#define EDGES_DENSE UINT32_MAX
#define EDGES_NONE UINT32_MAX

#if defined(__x86_64__)
static uint32_t find_edges_512(const uint64_t *w, uint64_t wn, uint16_t *E, uint32_t limit);
static uint8_t *emit_runs_512(const uint16_t *E, uint32_t n, uint8_t *o);
#endif

ALWAYS_INLINE long encode(const uint64_t *bm, uint64_t npages, uint32_t page_size, void *out,
			  size_t cap, count_runs_fn runs_in, int vec)
{
	uint64_t nwords = devmig_bitmap_words(npages), skip = 0;
	uint64_t nblocks = (npages + DEVMIG_BITMAP_BLOCK_PAGES - 1) / DEVMIG_BITMAP_BLOCK_PAGES;
	uint8_t *o0 = out, *o = o0 + DEVMIG_BITMAP_HEADER_LEN, *oend = o0 + cap;
	uint16_t ver = DEVMIG_BITMAP_VERSION, flags = 0;
	uint32_t bp = DEVMIG_BITMAP_BLOCK_PAGES;
	/* Edges of one block: at most one per page, after a leading 0 (where
	 * the vector writer measures the first gap from), plus the 64 slots
	 * find_edges_512 may store past the last and emit_runs_512 read
	 * (find_edges: 4). 64 KiB: on the stack of any thread the agent runs. */
	uint16_t edges[DEVMIG_BITMAP_BLOCK_PAGES + 128];
	uint64_t body;
	int prev_runs = 1;

	if (!page_size_ok(page_size))
		return -EINVAL;
	if (nwords && (bm[nwords - 1] & ~tail_mask(npages)))
		return -EINVAL;
	if (cap < DEVMIG_BITMAP_HEADER_LEN)
		return -ENOSPC;
	for (uint64_t b = 0; b < nblocks; b++) {
		const uint64_t *w = bm + b * BLOCK_WORDS;
		uint64_t wn = nwords - b * BLOCK_WORDS < BLOCK_WORDS ? nwords - b * BLOCK_WORDS
								     : BLOCK_WORDS;
		uint64_t lit = wn * 8, nruns;
		uint32_t ne = EDGES_NONE;

#if defined(__x86_64__)
		/* After a block written as runs, guess this one is too: find its
		 * edges first, and count its runs from them (one pass, not two),
		 * giving up at the most edges a RUNS block can have. */
		if (vec && prev_runs) {
			uint64_t most = (lit - VARINT_BLOCK_MAX - 1) / (2 * VARINT_BLOCK_MAX);

			ne = find_edges_512(w, wn, edges + 1, (uint32_t)(2 * most));
		}
#endif
		nruns = ne != EDGES_NONE ? (ne + 1) / 2 : runs_in(w, wn);
		if (!nruns) {
			skip++;
			continue;
		}
		uint64_t runs_max = VARINT_BLOCK_MAX + nruns * 2 * VARINT_BLOCK_MAX;
		int runs = runs_max < lit;

		prev_runs = runs;

		/* 4 bytes of slack: put_varint_small stores 4 bytes at a time. */
		if ((uint64_t)(oend - o) < VARINT_MAX + 1 + (runs ? runs_max + 4 : lit))
			return -ENOSPC;
		o = put_varint(o, skip);
		skip = 0;
		if (runs) {
			*o++ = KIND_RUNS;
			o = put_varint(o, nruns);
#if defined(__x86_64__)
			if (vec) {
				if (ne == EDGES_NONE)
					ne = find_edges_512(w, wn, edges + 1, EDGES_ALL);

				if (ne & 1) /* a run open at the block's end ends there */
					edges[1 + ne++] = (uint16_t)(wn * 64);
				edges[0] = 0;
				o = emit_runs_512(edges, ne, o);
				continue;
			}
#endif
			(void)vec;
			o = emit_runs(edges, find_edges(w, wn, edges), wn, o);
		} else {
			*o++ = KIND_LITERAL;
			memcpy(o, w, lit);
			o += lit;
		}
	}
	body = (uint64_t)(o - o0) - DEVMIG_BITMAP_HEADER_LEN;
	memcpy(o0, MAGIC, 4);
	memcpy(o0 + 4, &ver, 2);
	memcpy(o0 + 6, &flags, 2);
	memcpy(o0 + 8, &page_size, 4);
	memcpy(o0 + 12, &bp, 4);
	memcpy(o0 + 16, &npages, 8);
	memcpy(o0 + 24, &body, 8);
	return (long)(o - o0);
}

/* The same encoder compiled three times: with AVX-512 (below), with the
 * POPCNT and BMI instructions (every x86-64 server CPU since about 2013),
 * and without, for the rest; the x86-64 baseline ABI has neither, and
 * without them popcount is a library call per word, ten times slower. */
#if defined(__x86_64__)
#define TGT_X86 __attribute__((target("popcnt,bmi")))

TGT_X86 static uint64_t count_runs_x86(const uint64_t *w, uint64_t wn)
{
	return count_runs(w, wn);
}

TGT_X86 static long encode_x86(const uint64_t *bm, uint64_t npages, uint32_t page_size, void *out,
			       size_t cap)
{
	return encode(bm, npages, page_size, out, cap, count_runs_x86, 0);
}

/* With AVX-512 (Ice Lake, Zen 4 and later). VBMI2 for VPCOMPRESSB/W,
 * BITALG for the byte popcount, VBMI for byte permutes, VPOPCNTDQ for the
 * run count, BMI2 for PDEP. */
#define TGT_512                                                                              \
	__attribute__((target("avx512f,avx512bw,avx512vpopcntdq,avx512vbmi,avx512vbmi2,"        \
			      "avx512bitalg,popcnt,bmi,bmi2")))
#define INLINE_512 static inline __attribute__((always_inline)) TGT_512

/* count_runs eight words at a time, each lane seeing its lower neighbour's
 * top bit through valignq. At half the pages dirty, counting was the
 * encoder's one pass over the block that did work per word; the rest is
 * copying. */
TGT_512 static uint64_t count_runs_avx512(const uint64_t *w, uint64_t wn)
{
	__m512i acc = _mm512_setzero_si512(), last = _mm512_setzero_si512();
	uint64_t i = 0;

	for (; i + 8 <= wn; i += 8) {
		__m512i v = _mm512_loadu_si512((const void *)(w + i));
		/* lane k: word i + k - 1 (lane 0: the last word of the previous 8) */
		__m512i below = _mm512_alignr_epi64(v, last, 7);
		__m512i starts = _mm512_andnot_si512(
			_mm512_or_si512(_mm512_slli_epi64(v, 1), _mm512_srli_epi64(below, 63)), v);

		acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(starts));
		last = v;
	}
	uint64_t n = (uint64_t)_mm512_reduce_add_epi64(acc);
	uint64_t prev = i ? w[i - 1] >> 63 : 0;

	for (; i < wn; i++) {
		n += (uint64_t)__builtin_popcountll(w[i] & ~((w[i] << 1) | prev));
		prev = w[i] >> 63;
	}
	return n;
}

/* Edges of one chunk of 8 words (512 pages) the scalar way, for the chunks
 * the vector path below does not take. */
TGT_512 static uint32_t chunk_edges_scalar(const uint64_t *w, uint64_t i, uint64_t n, uint16_t *E)
{
	uint64_t carry = i ? w[i - 1] >> 63 : 0;
	uint32_t k = 0;

	for (uint64_t j = i; j < i + n; j++) {
		uint64_t e = w[j] ^ ((w[j] << 1) | carry);

		carry = w[j] >> 63;
		while (e) {
			E[k++] = (uint16_t)(j * 64 + (uint64_t)__builtin_ctzll(e));
			e &= e - 1;
		}
	}
	return k;
}

/* find_edges with AVX-512, 1024 pages (16 words) at a time. The edge bits
 * of each 8 words are computed at once, and the bytes that hold any are
 * packed to the front with VPCOMPRESSB, along with their offsets (0..127 in
 * the 16 words). Each of the (at most 16) bytes is then copied into four
 * slots; slot r of a byte clears its r lowest set bits and takes the index
 * of the lowest one left (popcount of the bits below it), so the slots that
 * still hold a bit are the byte's edges in order, and VPCOMPRESSW packs
 * them. 8 words with more than 16 such bytes, or a byte with more than four
 * edges, are done the scalar way: rare below the density where a block is
 * written as runs at all (about one run per 48 pages). E needs room for 64
 * entries past the block's edges.
 *
 * Slot s (byte s / 4, rank s % 4) sits at the byte of the vector from which
 * VPUNPCKLBW (s < 32) or VPUNPCKHBW (s >= 32) makes 16-bit lane s % 32:
 * byte b holds slot SLOT_(b), so that the two unpacks give the slots' pages
 * in order. IDX_(na, b) is where byte b's copy comes from when the first
 * na packed bytes are in the first table of VPERMT2B and the rest in the
 * second (index 64 + j - na). */
#define SLOT_(b) ((b) % 16 < 8 ? 8 * ((b) / 16) + (b) % 16 : 24 + 8 * ((b) / 16) + (b) % 16)
#define IDX_(na, b) (SLOT_(b) / 4 < (na) ? SLOT_(b) / 4 : 64 + SLOT_(b) / 4 - (na))
#define IDX8_(na, b)                                                                           \
	IDX_(na, b), IDX_(na, b + 1), IDX_(na, b + 2), IDX_(na, b + 3), IDX_(na, b + 4),           \
		IDX_(na, b + 5), IDX_(na, b + 6), IDX_(na, b + 7)
#define IDX64_(na)                                                                             \
	{ IDX8_(na, 0),  IDX8_(na, 8),  IDX8_(na, 16), IDX8_(na, 24),                              \
	  IDX8_(na, 32), IDX8_(na, 40), IDX8_(na, 48), IDX8_(na, 56) }
#define GE_(r, b) (SLOT_(b) % 4 >= (r))
#define GE8_(r, b)                                                                             \
	GE_(r, b), GE_(r, b + 1), GE_(r, b + 2), GE_(r, b + 3), GE_(r, b + 4), GE_(r, b + 5),      \
		GE_(r, b + 6), GE_(r, b + 7)
#define GE64_(r)                                                                               \
	{ GE8_(r, 0),  GE8_(r, 8),  GE8_(r, 16), GE8_(r, 24),                                      \
	  GE8_(r, 32), GE8_(r, 40), GE8_(r, 48), GE8_(r, 56) }

static const uint8_t slot_idx[17][64] __attribute__((aligned(64))) = {
	IDX64_(0),  IDX64_(1),  IDX64_(2),  IDX64_(3),	IDX64_(4),  IDX64_(5),
	IDX64_(6),  IDX64_(7),  IDX64_(8),  IDX64_(9),	IDX64_(10), IDX64_(11),
	IDX64_(12), IDX64_(13), IDX64_(14), IDX64_(15), IDX64_(16),
};
/* 1 in the bytes whose slot has rank >= 1, 2, 3 */
static const uint8_t slot_rank[3][64] __attribute__((aligned(64))) = { GE64_(1), GE64_(2),
								       GE64_(3) };

/* The edges in bytes ma of ea (offsets 0..63) and mb of eb (64..127),
 * na + popcount(mb) <= 16, written at E as pages from cb; -1 when a byte
 * has more than four. */
INLINE_512 int bytes_edges(__m512i ea, __mmask64 ma, __m512i eb, __mmask64 mb, uint32_t na,
			   uint16_t cb, uint16_t *E)
{
	const __m512i iota = _mm512_set_epi8(63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51,
					     50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38,
					     37, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25,
					     24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12,
					     11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
	const __m512i one = _mm512_set1_epi8(1);
	const __m512i c1 = _mm512_load_si512(slot_rank[0]), c2 = _mm512_load_si512(slot_rank[1]);
	const __m512i c3 = _mm512_load_si512(slot_rank[2]);
	const __mmask64 r3 = _mm512_test_epi8_mask(c3, c3);
	__m512i idx = _mm512_load_si512(slot_idx[na]);
	__m512i x = _mm512_permutex2var_epi8(_mm512_maskz_compress_epi8(ma, ea), idx,
					     _mm512_maskz_compress_epi8(mb, eb));
	__m512i offs = _mm512_permutex2var_epi8(
		_mm512_maskz_compress_epi8(ma, iota), idx,
		_mm512_maskz_compress_epi8(mb, _mm512_add_epi8(iota, _mm512_set1_epi8(64))));

	/* x & (x - 1) clears the lowest set bit; x - 0 leaves x alone */
	x = _mm512_and_si512(x, _mm512_sub_epi8(x, c1));
	x = _mm512_and_si512(x, _mm512_sub_epi8(x, c2));
	x = _mm512_and_si512(x, _mm512_sub_epi8(x, c3));
	__m512i d = _mm512_sub_epi8(x, one);

	if (_mm512_mask_test_epi8_mask(r3, x, d)) /* a fifth edge */
		return -1;
	__mmask64 slots = _mm512_test_epi8_mask(x, x);
	/* the lowest set bit's index: popcount of the bits below it */
	__m512i t = _mm512_popcnt_epi8(_mm512_andnot_si512(x, d));
	/* page - cb = offs * 8 + t: its low byte, and its high byte offs >> 5 */
	__m512i lo8 = _mm512_or_si512(
		_mm512_slli_epi16(_mm512_and_si512(offs, _mm512_set1_epi8(0x1f)), 3), t);
	__m512i hi8 = _mm512_srli_epi16(_mm512_and_si512(offs, _mm512_set1_epi8(0x60)), 5);
	__m512i base = _mm512_set1_epi16((short)cb);
	__mmask32 slo = (__mmask32)_pext_u64(slots, 0x00ff00ff00ff00ffULL);
	__mmask32 shi = (__mmask32)_pext_u64(slots, 0xff00ff00ff00ff00ULL);
	uint32_t k = (uint32_t)_mm_popcnt_u32(slo);

	_mm512_storeu_si512(E, _mm512_maskz_compress_epi16(
				       slo, _mm512_add_epi16(base, _mm512_unpacklo_epi8(lo8, hi8))));
	_mm512_storeu_si512(E + k,
			    _mm512_maskz_compress_epi16(
				    shi, _mm512_add_epi16(base, _mm512_unpackhi_epi8(lo8, hi8))));
	return (int)(k + (uint32_t)_mm_popcnt_u32(shi));
}

/* One 16-word group of find_edges_512: words i.. of w, n of them (16 but
 * in a block's last group), la / lb the lanes of the first and second 8
 * that exist, lane 0 of ba0 whether the word below i is read (not at the
 * block's start). Adds the group's edges at E + *k; 0, or -1 to give up
 * (see EDGES_DENSE). Inlined with constant masks into the main loop. */
INLINE_512 int edges_group(const uint64_t *w, uint64_t i, uint64_t n, __mmask8 la, __mmask8 lb,
			   __mmask8 ba0, uint16_t *E, uint32_t *k, uint32_t limit)
{
	/* The hardware prefetchers stop at a 4 KiB page, and a block is one:
	 * ask for the next block's lines while this one is worked on, two per
	 * 16 words (beyond the bitmap's end, a prefetch is dropped, never a
	 * fault). */
	_mm_prefetch((const char *)(w + i + BLOCK_WORDS), _MM_HINT_T0);
	_mm_prefetch((const char *)(w + i + 8 + BLOCK_WORDS), _MM_HINT_T0);
	__m512i va = _mm512_maskz_loadu_epi64(la, w + i);
	__m512i vb = _mm512_maskz_loadu_epi64(lb, w + i + 8);
	/* Lane k: the word below, loaded again one word lower (a load port, not
	 * the shuffle port valignq needs); below the block's first word, 0 (a
	 * masked-off lane is never read). */
	__m512i ba = _mm512_maskz_loadu_epi64(la & ba0, (const void *)((uintptr_t)(w + i) - 8));
	__m512i bb = _mm512_maskz_loadu_epi64(lb, w + i + 7);
	__m512i ea = _mm512_maskz_xor_epi64(
		la, va, _mm512_or_si512(_mm512_slli_epi64(va, 1), _mm512_srli_epi64(ba, 63)));
	__m512i eb = _mm512_maskz_xor_epi64(
		lb, vb, _mm512_or_si512(_mm512_slli_epi64(vb, 1), _mm512_srli_epi64(bb, 63)));
	__mmask64 ma = _mm512_test_epi8_mask(ea, ea), mb = _mm512_test_epi8_mask(eb, eb);
	uint32_t na = (uint32_t)_mm_popcnt_u64(ma), nb = (uint32_t)_mm_popcnt_u64(mb);
	uint16_t cb = (uint16_t)(i * 64);
	int r;

	if (!(ma | mb))
		return 0;
	if (na + nb <= 16 && (r = bytes_edges(ea, ma, eb, mb, na, cb, E + *k)) >= 0) {
		*k += (uint32_t)r;
		return *k > limit ? -1 : 0;
	}
	if (limit != EDGES_ALL &&
	    _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_popcnt_epi64(ea),
						     _mm512_popcnt_epi64(eb))) > 64)
		return -1;
	/* each 8 words alone */
	if (na <= 16 && (r = bytes_edges(ea, ma, eb, 0, na, cb, E + *k)) >= 0)
		*k += (uint32_t)r;
	else
		*k += chunk_edges_scalar(w, i, n < 8 ? n : 8, E + *k);
	if (n > 8) {
		if (nb <= 16 &&
		    (r = bytes_edges(eb, mb, eb, 0, nb, (uint16_t)(cb + 512), E + *k)) >= 0)
			*k += (uint32_t)r;
		else
			*k += chunk_edges_scalar(w, i + 8, n - 8, E + *k);
	}
	return *k > limit ? -1 : 0;
}

TGT_512 static uint32_t find_edges_512(const uint64_t *w, uint64_t wn, uint16_t *E, uint32_t limit)
{
	uint32_t k = 0;
	uint64_t i = 0;

	/* The first group (no word below it), the full groups, the rest. */
	if (wn >= 16) {
		if (edges_group(w, 0, 16, 0xff, 0xff, 0xfe, E, &k, limit) < 0)
			return EDGES_DENSE;
		for (i = 16; i + 16 <= wn; i += 16)
			if (edges_group(w, i, 16, 0xff, 0xff, 0xff, E, &k, limit) < 0)
				return EDGES_DENSE;
	}
	if (i < wn) {
		uint64_t n = wn - i;
		__mmask8 la = (__mmask8)(n >= 8 ? 0xff : (1u << n) - 1);
		__mmask8 lb = (__mmask8)(n > 8 ? (1u << (n - 8)) - 1 : 0);

		if (edges_group(w, i, n, la, lb, i ? 0xff : 0xfe, E, &k, limit) < 0)
			return EDGES_DENSE;
	}
	return k;
}

/* emit_runs over E[1..n] (E[0] = 0, n even: a run open at the block's end
 * was closed by the caller), 32 varints at a time: value i is
 * E[i + 1] - E[i] - (i odd), a gap or a length - 1; each becomes one byte,
 * or two from 128 on, laid out in a 16-bit lane and packed with VPCOMPRESSB.
 * 32 values with one of 2^14 or more (3 bytes; rare: a gap of 16384 pages
 * in a block that has runs at all) go the scalar way. */
TGT_512 static uint8_t *emit_runs_512(const uint16_t *E, uint32_t n, uint8_t *o)
{
	const __m512i alt = _mm512_set_epi16(1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
					     0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
	const __m512i low7 = _mm512_set1_epi16(0x7f), cont = _mm512_set1_epi16(0x80);

	for (uint32_t i = 0; i < n; i += 32) {
		uint32_t c = n - i < 32 ? n - i : 32;
		__mmask32 lanes = c == 32 ? 0xffffffffu : (1u << c) - 1;
		__m512i val = _mm512_sub_epi16(
			_mm512_sub_epi16(_mm512_loadu_si512(E + i + 1), _mm512_loadu_si512(E + i)),
			alt);

		if (_mm512_mask_cmpge_epu16_mask(lanes, val, _mm512_set1_epi16(0x4000))) {
			uint16_t tmp[32];

			_mm512_storeu_si512(tmp, val);
			for (uint32_t j = 0; j < c; j++)
				o = put_varint_small(o, tmp[j]);
			continue;
		}
		__mmask32 two = _mm512_mask_cmpge_epu16_mask(lanes, val, cont);
		__m512i lo = _mm512_and_si512(val, low7);
		/* low 7 bits, + 0x80 (below 0x80: an OR) where a second byte follows */
		__m512i b = _mm512_or_si512(_mm512_mask_add_epi16(lo, two, lo, cont),
					    _mm512_slli_epi16(_mm512_srli_epi16(val, 7), 8));
		uint64_t keep = _pdep_u64(lanes, 0x5555555555555555ULL) |
				_pdep_u64(two, 0xaaaaaaaaaaaaaaaaULL);
		uint32_t nbytes = (uint32_t)_mm_popcnt_u64(keep);

		_mm512_mask_storeu_epi8(o, nbytes == 64 ? ~0ULL : (1ULL << nbytes) - 1,
					_mm512_maskz_compress_epi8(keep, b));
		o += nbytes;
	}
	return o;
}

TGT_512 static long encode_512(const uint64_t *bm, uint64_t npages, uint32_t page_size,
				   void *out, size_t cap)
{
	return encode(bm, npages, page_size, out, cap, count_runs_avx512, 1);
}

#endif

static uint64_t count_runs_portable(const uint64_t *w, uint64_t wn)
{
	return count_runs(w, wn);
}

static long encode_portable(const uint64_t *bm, uint64_t npages, uint32_t page_size, void *out,
			    size_t cap)
{
	return encode(bm, npages, page_size, out, cap, count_runs_portable, 0);
}

static int have_x86(void)
{
#if defined(__x86_64__)
	return __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi");
#else
	return 0;
#endif
}

static int have_x86_512(void)
{
#if defined(__x86_64__)
	return have_x86() && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("avx512f") &&
	       __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vpopcntdq") &&
	       __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
	       __builtin_cpu_supports("avx512bitalg");
#else
	return 0;
#endif
}

long devmig_bitmap_encode_impl(int impl, const uint64_t *bm, uint64_t npages, uint32_t page_size,
			       void *out, size_t cap)
{
	if (impl == DEVMIG_BITMAP_IMPL_AUTO)
		impl = have_x86_512() ? DEVMIG_BITMAP_IMPL_X86_512
		       : have_x86()   ? DEVMIG_BITMAP_IMPL_X86
				      : DEVMIG_BITMAP_IMPL_PORTABLE;
	switch (impl) {
	case DEVMIG_BITMAP_IMPL_PORTABLE:
		return encode_portable(bm, npages, page_size, out, cap);
#if defined(__x86_64__)
	case DEVMIG_BITMAP_IMPL_X86:
		return have_x86() ? encode_x86(bm, npages, page_size, out, cap) : -ENOTSUP;
	case DEVMIG_BITMAP_IMPL_X86_512:
		return have_x86_512() ? encode_512(bm, npages, page_size, out, cap) : -ENOTSUP;
#endif
	default:
		return -ENOTSUP;
	}
}

long devmig_bitmap_encode(const uint64_t *bm, uint64_t npages, uint32_t page_size, void *out,
			  size_t cap)
{
	return devmig_bitmap_encode_impl(DEVMIG_BITMAP_IMPL_AUTO, bm, npages, page_size, out, cap);
}

const char *devmig_bitmap_impl_name(void)
{
	return have_x86_512() ? "avx512-vbmi2" : have_x86() ? "popcnt-bmi" : "portable";
}

/* ---- decoding ---- */

int devmig_bitmap_decode_header(const void *buf, size_t len, struct devmig_bitmap_header *h)
{
	const uint8_t *p = buf;

	if (len < DEVMIG_BITMAP_HEADER_LEN || memcmp(p, MAGIC, 4) != 0)
		return -EPROTO;
	if (get16(p + 4) != DEVMIG_BITMAP_VERSION)
		return -EPROTONOSUPPORT;
	if (get16(p + 6) != 0 || !page_size_ok(get32(p + 8)) ||
	    get32(p + 12) != DEVMIG_BITMAP_BLOCK_PAGES ||
	    get64(p + 24) != len - DEVMIG_BITMAP_HEADER_LEN)
		return -EPROTO;
	h->page_size = get32(p + 8);
	h->npages = get64(p + 16);
	h->body_len = get64(p + 24);
	return 0;
}

struct reader {
	const uint8_t *p, *end;
};

static int get_varint(struct reader *r, uint64_t *v)
{
	uint64_t x = 0;

	for (int i = 0; i < VARINT_MAX; i++) {
		if (r->p >= r->end)
			return -EPROTO;
		uint8_t b = *r->p++;

		/* The tenth byte holds bit 63 alone. */
		if (i == VARINT_MAX - 1 && b > 1)
			return -EPROTO;
		x |= (uint64_t)(b & 0x7f) << (7 * i);
		if (!(b & 0x80)) {
			*v = x;
			return 0;
		}
	}
	return -EPROTO;
}

static void set_range(uint64_t *bm, uint64_t first, uint64_t count)
{
	uint64_t end = first + count;

	while (first < end) {
		uint64_t i = first / 64, lo = first % 64;
		uint64_t n = end - first < 64 - lo ? end - first : 64 - lo;

		bm[i] |= (n == 64 ? ~0ULL : ((1ULL << n) - 1)) << lo;
		first += n;
	}
}

/* Walk the body; with bm == NULL only check it. */
static int walk(const uint8_t *body, uint64_t len, uint64_t npages, uint64_t *bm)
{
	struct reader r = { body, body + len };
	uint64_t nblocks = (npages + DEVMIG_BITMAP_BLOCK_PAGES - 1) / DEVMIG_BITMAP_BLOCK_PAGES;
	uint64_t block = 0, skip, n, gap, lenm1;
	int rc;

	while (r.p < r.end) {
		if ((rc = get_varint(&r, &skip)) < 0)
			return rc;
		if (skip >= nblocks - block)
			return -EPROTO; /* past the last block (also when none is left) */
		block += skip;
		if (r.p >= r.end)
			return -EPROTO;
		uint8_t kind = *r.p++;
		uint64_t base = block * DEVMIG_BITMAP_BLOCK_PAGES;
		uint64_t end = npages - base < DEVMIG_BITMAP_BLOCK_PAGES ? npages
									 : base + DEVMIG_BITMAP_BLOCK_PAGES;

		if (kind == KIND_LITERAL) {
			uint64_t nw = (end - base + 63) / 64;

			if ((uint64_t)(r.end - r.p) < nw * 8)
				return -EPROTO;
			if (end == npages && (get64(r.p + (nw - 1) * 8) & ~tail_mask(npages)))
				return -EPROTO; /* a page beyond npages */
			if (bm)
				for (uint64_t i = 0; i < nw; i++)
					bm[base / 64 + i] |= get64(r.p + i * 8);
			r.p += nw * 8;
		} else if (kind == KIND_RUNS) {
			uint64_t pos = base;

			if ((rc = get_varint(&r, &n)) < 0)
				return rc;
			/* Runs are separated by a clear page: at most half the
			 * block's pages, rounded up, and at least one. */
			if (n == 0 || n > (end - base + 1) / 2)
				return -EPROTO;
			for (uint64_t k = 0; k < n; k++) {
				if ((rc = get_varint(&r, &gap)) < 0 || (rc = get_varint(&r, &lenm1)) < 0)
					return rc;
				if ((k && gap == 0) || gap >= end - pos || lenm1 >= end - pos - gap)
					return -EPROTO;
				pos += gap;
				if (bm)
					set_range(bm, pos, lenm1 + 1);
				pos += lenm1 + 1;
			}
		} else {
			return -EPROTO;
		}
		block++;
	}
	return 0;
}

int devmig_bitmap_decode(const void *buf, size_t len, uint64_t *bm, uint64_t nwords,
			 struct devmig_bitmap_header *h)
{
	const uint8_t *body = (const uint8_t *)buf + DEVMIG_BITMAP_HEADER_LEN;
	struct devmig_bitmap_header hh;
	int r = devmig_bitmap_decode_header(buf, len, &hh);

	if (r < 0)
		return r;
	if (nwords < devmig_bitmap_words(hh.npages))
		return -ENOSPC;
	r = walk(body, hh.body_len, hh.npages, NULL);
	if (r < 0)
		return r;
	walk(body, hh.body_len, hh.npages, bm);
	if (h)
		*h = hh;
	return 0;
}
