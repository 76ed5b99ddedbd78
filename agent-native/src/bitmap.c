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

ALWAYS_INLINE long encode(const uint64_t *bm, uint64_t npages, uint32_t page_size, void *out,
			  size_t cap, count_runs_fn runs_in)
{
	uint64_t nwords = devmig_bitmap_words(npages), skip = 0;
	uint64_t nblocks = (npages + DEVMIG_BITMAP_BLOCK_PAGES - 1) / DEVMIG_BITMAP_BLOCK_PAGES;
	uint8_t *o0 = out, *o = o0 + DEVMIG_BITMAP_HEADER_LEN, *oend = o0 + cap;
	uint16_t ver = DEVMIG_BITMAP_VERSION, flags = 0;
	uint32_t bp = DEVMIG_BITMAP_BLOCK_PAGES;
	/* Edges of one block: at most one per page, plus the 4 slots
	 * find_edges may write past the last. 64 KiB: on the stack of any
	 * thread the agent runs. */
	uint16_t edges[DEVMIG_BITMAP_BLOCK_PAGES + 4];
	uint64_t body;

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
		uint64_t nruns = runs_in(w, wn);

		if (!nruns) {
			skip++;
			continue;
		}
		uint64_t lit = wn * 8;
		uint64_t runs_max = VARINT_BLOCK_MAX + nruns * 2 * VARINT_BLOCK_MAX;
		int runs = runs_max < lit;

		/* 4 bytes of slack: put_varint_small stores 4 bytes at a time. */
		if ((uint64_t)(oend - o) < VARINT_MAX + 1 + (runs ? runs_max + 4 : lit))
			return -ENOSPC;
		o = put_varint(o, skip);
		skip = 0;
		if (runs) {
			*o++ = KIND_RUNS;
			o = put_varint(o, nruns);
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

/* The same encoder compiled twice: with the POPCNT and BMI instructions
 * (every x86-64 server CPU since about 2013), and without, for the rest;
 * the x86-64 baseline ABI has neither, and without them popcount is a
 * library call per word, ten times slower. */
#if defined(__x86_64__)
#define TGT_X86 __attribute__((target("popcnt,bmi")))

TGT_X86 static uint64_t count_runs_x86(const uint64_t *w, uint64_t wn)
{
	return count_runs(w, wn);
}

TGT_X86 static long encode_x86(const uint64_t *bm, uint64_t npages, uint32_t page_size, void *out,
			       size_t cap)
{
	return encode(bm, npages, page_size, out, cap, count_runs_x86);
}

/* With AVX-512 and its 64-bit popcount (VPOPCNTQ): count_runs eight words
 * at a time, each lane seeing its lower neighbour's top bit through
 * valignq. At half the pages dirty, counting was the encoder's one pass
 * over the block that did work per word; the rest is copying. */
#define TGT_512 __attribute__((target("avx512f,avx512vpopcntdq,popcnt,bmi")))

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

TGT_512 static long encode_avx512(const uint64_t *bm, uint64_t npages, uint32_t page_size,
				  void *out, size_t cap)
{
	return encode(bm, npages, page_size, out, cap, count_runs_avx512);
}
#endif

static uint64_t count_runs_portable(const uint64_t *w, uint64_t wn)
{
	return count_runs(w, wn);
}

static long encode_portable(const uint64_t *bm, uint64_t npages, uint32_t page_size, void *out,
			    size_t cap)
{
	return encode(bm, npages, page_size, out, cap, count_runs_portable);
}

long devmig_bitmap_encode(const uint64_t *bm, uint64_t npages, uint32_t page_size, void *out,
			  size_t cap)
{
#if defined(__x86_64__)
	if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
	    __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi"))
		return encode_avx512(bm, npages, page_size, out, cap);
	if (__builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi"))
		return encode_x86(bm, npages, page_size, out, cap);
#endif
	return encode_portable(bm, npages, page_size, out, cap);
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
