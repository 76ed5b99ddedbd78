/* Dirty-page bitmaps: ranges, merge, and the DMDB encoding's round trips and
 * refusals. Every malformed encoding must be refused without touching the
 * output bitmap, and no input may make the decoder read or write out of
 * bounds (ASan watches). */
#include <errno.h>
#include <stdint.h>

#include "check.h"
#include "devmig/bitmap.h"

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint64_t next_rand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void set_bit(uint64_t *bm, uint64_t p)
{
	bm[p / 64] |= 1ULL << (p % 64);
}

/* Encode, decode into a zeroed bitmap, compare; returns the encoded size. */
static long round_trip(const uint64_t *bm, uint64_t npages)
{
	uint64_t nw = devmig_bitmap_words(npages), bound = devmig_bitmap_encode_bound(npages);
	uint8_t *enc = malloc(bound);
	uint64_t *back = calloc(nw ? nw : 1, 8);
	struct devmig_bitmap_header h;
	long n = devmig_bitmap_encode(bm, npages, 4096, enc, bound);

	CHECK(n >= DEVMIG_BITMAP_HEADER_LEN && (uint64_t)n <= bound);
	if (n > 0) {
		CHECK(devmig_bitmap_decode(enc, (size_t)n, back, nw, &h) == 0);
		CHECK(h.npages == npages && h.page_size == 4096);
		CHECK(memcmp(back, bm, nw * 8) == 0);
	}
	free(enc);
	free(back);
	return n;
}

static void ranges_match_bits(void)
{
	uint64_t bm[4] = { 0 };
	struct devmig_page_range r[8];
	uint64_t pos = 0;
	size_t n;

	/* A run inside a word, one across a word boundary, one at the end. */
	for (uint64_t p = 3; p < 6; p++)
		set_bit(bm, p);
	for (uint64_t p = 60; p < 70; p++)
		set_bit(bm, p);
	set_bit(bm, 199);
	n = devmig_bitmap_ranges(bm, 200, &pos, r, 8);
	CHECK(n == 3);
	CHECK(r[0].first == 3 && r[0].count == 3);
	CHECK(r[1].first == 60 && r[1].count == 10);
	CHECK(r[2].first == 199 && r[2].count == 1);
	CHECK(devmig_bitmap_count(bm, 200) == 14);
	/* In batches of one, continuing where the last stopped. */
	pos = 0;
	CHECK(devmig_bitmap_ranges(bm, 200, &pos, r, 1) == 1 && r[0].first == 3);
	CHECK(devmig_bitmap_ranges(bm, 200, &pos, r, 1) == 1 && r[0].first == 60);
	CHECK(devmig_bitmap_ranges(bm, 200, &pos, r, 1) == 1 && r[0].first == 199);
	CHECK(devmig_bitmap_ranges(bm, 200, &pos, r, 1) == 0);
	/* Pages beyond npages are not reported. */
	pos = 0;
	CHECK(devmig_bitmap_ranges(bm, 65, &pos, r, 8) == 2 && r[1].count == 5);
}

static void or_merges(void)
{
	uint64_t a[2] = { 0x0f, 0 }, b[2] = { 0xf0, 1 };

	devmig_bitmap_or(a, b, 2);
	CHECK(a[0] == 0xff && a[1] == 1);
}

static void round_trips_at_every_density(void)
{
	/* 3 blocks and a short tail, so the last block is partial. */
	uint64_t npages = 3 * DEVMIG_BITMAP_BLOCK_PAGES + 1000, nw = devmig_bitmap_words(npages);
	uint64_t *bm = calloc(nw, 8);
	long empty, sparse, dense;

	empty = round_trip(bm, npages);
	CHECK(empty == DEVMIG_BITMAP_HEADER_LEN); /* no block records at all */
	for (int i = 0; i < 300; i++)
		set_bit(bm, next_rand() % npages);
	sparse = round_trip(bm, npages);
	/* A few bytes per run, far below the raw bitmap. */
	CHECK(sparse > 0 && sparse < 300 * 6 + 200);
	for (uint64_t i = 0; i < nw; i++)
		bm[i] = next_rand();
	bm[nw - 1] &= (1ULL << (npages % 64)) - 1;
	dense = round_trip(bm, npages);
	/* Random bits: literal blocks, barely above the raw words. */
	CHECK(dense > 0 && (uint64_t)dense <= nw * 8 + 4 * 11 + DEVMIG_BITMAP_HEADER_LEN);
	memset(bm, 0xff, nw * 8);
	bm[nw - 1] &= (1ULL << (npages % 64)) - 1;
	CHECK(round_trip(bm, npages) < 100); /* all dirty: one run per block */
	free(bm);
	/* Edge sizes. */
	uint64_t one = 1, zero = 0;
	CHECK(round_trip(&one, 1) > DEVMIG_BITMAP_HEADER_LEN);
	CHECK(round_trip(&zero, 0) == DEVMIG_BITMAP_HEADER_LEN); /* no pages at all */
}

static void encoder_refuses_bad_input(void)
{
	uint64_t bm[2] = { 0, 1ULL << 10 };
	uint8_t out[256];

	CHECK(devmig_bitmap_encode(bm, 74, 4096, out, sizeof(out)) == -EINVAL); /* bit 74 set */
	CHECK(devmig_bitmap_encode(bm, 75, 4096, out, sizeof(out)) > 0);
	CHECK(devmig_bitmap_encode(bm, 75, 3000, out, sizeof(out)) == -EINVAL); /* not a power of 2 */
	CHECK(devmig_bitmap_encode(bm, 75, 256, out, sizeof(out)) == -EINVAL);  /* below 512 */
	CHECK(devmig_bitmap_encode(bm, 75, 4096, out, 20) == -ENOSPC);
}

/* An encoding of 2 blocks to corrupt: runs in block 0, literal in block 1. */
static long sample(uint8_t *enc, size_t cap, uint64_t *npages)
{
	static uint64_t bm[2 * DEVMIG_BITMAP_BLOCK_PAGES / 64];

	memset(bm, 0, sizeof(bm));
	*npages = 2 * DEVMIG_BITMAP_BLOCK_PAGES;
	set_bit(bm, 5);
	set_bit(bm, 6);
	set_bit(bm, 100);
	for (uint64_t i = DEVMIG_BITMAP_BLOCK_PAGES / 64; i < 2 * DEVMIG_BITMAP_BLOCK_PAGES / 64; i++)
		bm[i] = 0xaaaaaaaaaaaaaaaaULL; /* alternate bits: literal is smaller */
	return devmig_bitmap_encode(bm, *npages, 4096, enc, cap);
}

static int decodes(const uint8_t *enc, size_t len, uint64_t npages)
{
	uint64_t nw = devmig_bitmap_words(npages);
	uint64_t *bm = calloc(nw, 8);
	int r = devmig_bitmap_decode(enc, len, bm, nw, NULL);

	/* A refusal leaves the output untouched. */
	if (r < 0)
		for (uint64_t i = 0; i < nw; i++)
			if (bm[i]) {
				CHECK(!"a refused decode wrote into the bitmap");
				break;
			}
	free(bm);
	return r;
}

static void put16(uint8_t *p, uint16_t v)
{
	memcpy(p, &v, 2);
}
static void put64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, 8);
}

static void decoder_refuses_malformed(void)
{
	size_t cap = (size_t)devmig_bitmap_encode_bound(2 * DEVMIG_BITMAP_BLOCK_PAGES);
	uint8_t *enc = malloc(cap), *bad = malloc(cap);
	uint64_t npages;
	long n = sample(enc, cap, &npages);
	size_t len = (size_t)n;

	CHECK(n > 0);
	CHECK(decodes(enc, len, npages) == 0);
	/* Body starts: skip=0, RUNS, n=2, (5, 1), (93, 0); then skip=0, LITERAL. */
	const uint8_t *body = enc + DEVMIG_BITMAP_HEADER_LEN;
	CHECK(body[0] == 0 && body[1] == 1 && body[2] == 2 && body[3] == 5 && body[4] == 1 &&
	      body[5] == 93 && body[6] == 0 && body[7] == 0 && body[8] == 2);

	/* Every truncation is refused. */
	for (size_t cut = 0; cut < len; cut++)
		CHECK(decodes(enc, cut, npages) < 0);
	/* Header fields. */
	memcpy(bad, enc, len);
	bad[0] = 'X';
	CHECK(decodes(bad, len, npages) == -EPROTO);
	memcpy(bad, enc, len);
	put16(bad + 4, 2);
	CHECK(decodes(bad, len, npages) == -EPROTONOSUPPORT);
	memcpy(bad, enc, len);
	put16(bad + 6, 1);
	CHECK(decodes(bad, len, npages) == -EPROTO);
	memcpy(bad, enc, len);
	bad[13] ^= 1; /* block size */
	CHECK(decodes(bad, len, npages) == -EPROTO);
	memcpy(bad, enc, len);
	put64(bad + 24, len); /* body length off by the header */
	CHECK(decodes(bad, len, npages) == -EPROTO);
	/* Fewer pages than the records cover. */
	memcpy(bad, enc, len);
	put64(bad + 16, DEVMIG_BITMAP_BLOCK_PAGES);
	CHECK(decodes(bad, len, npages) == -EPROTO);
	/* Body fields. */
	uint8_t *b = bad + DEVMIG_BITMAP_HEADER_LEN;
	memcpy(bad, enc, len);
	b[1] = 3; /* unknown kind */
	CHECK(decodes(bad, len, npages) == -EPROTO);
	memcpy(bad, enc, len);
	b[2] = 0; /* zero runs */
	CHECK(decodes(bad, len, npages) == -EPROTO);
	memcpy(bad, enc, len);
	b[5] = 0; /* a second run touching the first */
	CHECK(decodes(bad, len, npages) == -EPROTO);
	memcpy(bad, enc, len);
	b[0] = 2; /* skip past the last block */
	CHECK(decodes(bad, len, npages) == -EPROTO);
	memcpy(bad, enc, len);
	b[7] = 1; /* the literal block now lands past the end */
	CHECK(decodes(bad, len, npages) == -EPROTO);
	/* A run running past its block: gap 5, length 32768. */
	{
		uint8_t h[DEVMIG_BITMAP_HEADER_LEN + 16];
		uint8_t body2[] = { 0, 1, 1, 5, 0xff, 0xff, 0x01 };

		memcpy(h, enc, DEVMIG_BITMAP_HEADER_LEN);
		put64(h + 24, sizeof(body2));
		memcpy(h + DEVMIG_BITMAP_HEADER_LEN, body2, sizeof(body2));
		CHECK(decodes(h, DEVMIG_BITMAP_HEADER_LEN + sizeof(body2), npages) == -EPROTO);
		/* An over-long varint. */
		uint8_t body3[] = { 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02, 1 };
		put64(h + 24, sizeof(body3));
		memcpy(h + DEVMIG_BITMAP_HEADER_LEN, body3, sizeof(body3));
		CHECK(decodes(h, DEVMIG_BITMAP_HEADER_LEN + sizeof(body3), npages) == -EPROTO);
	}
	/* A literal with a bit beyond npages. */
	{
		uint64_t bm[2] = { 0, 0 };
		uint8_t e[128];
		long k;

		for (int i = 0; i < 64; i += 2)
			bm[0] |= 1ULL << i; /* dense enough for a literal */
		bm[1] = 1;
		k = devmig_bitmap_encode(bm, 70, 4096, e, sizeof(e));
		CHECK(k > 0 && e[DEVMIG_BITMAP_HEADER_LEN + 1] == 2);
		CHECK(decodes(e, (size_t)k, 70) == 0);
		e[k - 1] = 0x80; /* page 127 */
		CHECK(decodes(e, (size_t)k, 70) == -EPROTO);
	}
	/* The target bitmap too small. */
	{
		uint64_t small[1];

		CHECK(devmig_bitmap_decode(enc, len, small, 1, NULL) == -ENOSPC);
	}
	free(enc);
	free(bad);
}

static void decode_merges(void)
{
	uint64_t a[1] = { 0x3 }, b[1] = { 0x30 }, into[1] = { 0 };
	uint8_t ea[128], eb[128];
	long na = devmig_bitmap_encode(a, 64, 4096, ea, sizeof(ea));
	long nb = devmig_bitmap_encode(b, 64, 4096, eb, sizeof(eb));

	CHECK(devmig_bitmap_decode(ea, (size_t)na, into, 1, NULL) == 0);
	CHECK(devmig_bitmap_decode(eb, (size_t)nb, into, 1, NULL) == 0);
	CHECK(into[0] == 0x33);
}

/* Every implementation this CPU has writes the same bytes as the portable
 * one; the shapes reach each path of the vector encoder: bytes with one to
 * eight edges, 8 words with more than 16 bytes that hold edges, gaps of
 * 2^14 pages and more (three-byte varints), runs open at a block's end,
 * short last blocks, and blocks on both sides of the RUNS/LITERAL line. */
static void same_bytes(const uint64_t *bm, uint64_t npages, const char *what)
{
	uint64_t bound = devmig_bitmap_encode_bound(npages);
	uint8_t *ref = malloc(bound), *got = malloc(bound);
	long nref = devmig_bitmap_encode_impl(DEVMIG_BITMAP_IMPL_PORTABLE, bm, npages, 4096, ref,
					      bound);

	CHECK(nref > 0);
	for (int impl = DEVMIG_BITMAP_IMPL_X86; impl <= DEVMIG_BITMAP_IMPL_X86_512; impl++) {
		long n = devmig_bitmap_encode_impl(impl, bm, npages, 4096, got, bound);

		if (n == -ENOTSUP)
			continue;
		if (n != nref || memcmp(ref, got, (size_t)nref) != 0) {
			fprintf(stderr, "impl %d differs from portable on %s (%ld vs %ld bytes)\n",
				impl, what, n, nref);
			CHECK(0);
		}
	}
	CHECK(devmig_bitmap_encode_impl(99, bm, npages, 4096, got, bound) == -ENOTSUP);
	free(ref);
	free(got);
}

static void every_implementation_writes_the_same_bytes(void)
{
	const uint64_t npages = 3 * DEVMIG_BITMAP_BLOCK_PAGES + 777;
	const uint64_t nw = devmig_bitmap_words(npages);
	/* parts per million of pages dirty, around 1% and the RUNS limit
	 * (about 2%) */
	static const uint32_t ppm[] = { 0, 50, 1000, 5000, 10000, 15000, 20000, 25000, 100000, 500000 };
	uint64_t *bm = calloc(nw, 8);
	char what[64];

	for (size_t d = 0; d < sizeof(ppm) / sizeof(ppm[0]); d++) {
		for (int rep = 0; rep < 3; rep++) {
			memset(bm, 0, nw * 8);
			for (uint64_t p = 0; p < npages; p++)
				if (next_rand() % 1000000 < ppm[d])
					set_bit(bm, p);
			snprintf(what, sizeof(what), "%u ppm", ppm[d]);
			same_bytes(bm, npages, what);
		}
	}
	/* Every byte value at sparse spots: one to eight edges in a byte. */
	for (unsigned v = 1; v < 256; v++) {
		memset(bm, 0, nw * 8);
		for (uint64_t at = 5; at + 1 < nw; at += 37 + (next_rand() % 50))
			bm[at] = (uint64_t)v << (8 * (next_rand() % 8));
		snprintf(what, sizeof(what), "byte 0x%02x", v);
		same_bytes(bm, npages, what);
	}
	/* Every 8th page: 64 bytes with an edge pair in 8 words, few runs. */
	memset(bm, 0, nw * 8);
	for (uint64_t p = 100; p < 100 + 8 * 600; p += 8)
		set_bit(bm, p);
	same_bytes(bm, npages, "every 8th page");
	/* Gaps of 2^14 and more, runs open at each block's end, a run from a
	 * block's first page, long runs across words and 16-word groups. */
	memset(bm, 0, nw * 8);
	for (uint64_t b = 0; b < 3; b++) {
		uint64_t base = b * DEVMIG_BITMAP_BLOCK_PAGES;

		set_bit(bm, base);
		set_bit(bm, base + 16385);
		set_bit(bm, base + 30000);
		for (uint64_t p = base + 1000; p < base + 3100; p++)
			set_bit(bm, p);
		for (uint64_t p = base + DEVMIG_BITMAP_BLOCK_PAGES - 70;
		     p < base + DEVMIG_BITMAP_BLOCK_PAGES; p++)
			set_bit(bm, p);
	}
	for (uint64_t p = npages - 5; p < npages; p++)
		set_bit(bm, p);
	same_bytes(bm, npages, "long gaps and block ends");
	/* Short bitmaps: every length to 1100 pages, 2% dirty. */
	for (uint64_t n = 1; n <= 1100; n += 1 + n / 64) {
		memset(bm, 0, nw * 8);
		for (uint64_t p = 0; p < n; p++)
			if (next_rand() % 50 == 0)
				set_bit(bm, p);
		set_bit(bm, n - 1);
		snprintf(what, sizeof(what), "%llu pages", (unsigned long long)n);
		same_bytes(bm, n, what);
	}
	free(bm);
}

int main(void)
{
	ranges_match_bits();
	or_merges();
	round_trips_at_every_density();
	encoder_refuses_bad_input();
	decoder_refuses_malformed();
	decode_merges();
	every_implementation_writes_the_same_bytes();
	CHECK_DONE();
}
