/* libFuzzer target: the dirty bitmap decoder (src/bitmap.c).
 *
 * Input: an encoding, as it would arrive from a peer. The harness decodes
 * it into a bitmap sized from the header (bounded, as the binding bounds
 * it); an accepted encoding must re-encode and decode to the same bitmap,
 * and a refused one must leave the bitmap untouched. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "devmig/bitmap.h"

/* 2^24 pages (64 GiB at 4 KiB): a 2 MiB bitmap, enough for every block
 * kind and edge while each run stays fast. */
#define MAX_PAGES (1ULL << 24)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct devmig_bitmap_header h;
	uint64_t nw, *bm, *back;
	uint8_t *enc;
	long n;
	int r;

	if (devmig_bitmap_decode_header(data, size, &h) < 0 || h.npages > MAX_PAGES)
		return 0;
	nw = devmig_bitmap_words(h.npages);
	bm = calloc(nw ? nw : 1, 8);
	back = calloc(nw ? nw : 1, 8);
	enc = malloc(devmig_bitmap_encode_bound(h.npages));
	if (!bm || !back || !enc)
		abort();
	r = devmig_bitmap_decode(data, size, bm, nw, NULL);
	if (r < 0) {
		for (uint64_t i = 0; i < nw; i++)
			if (bm[i])
				abort(); /* a refused decode wrote into the bitmap */
	} else {
		n = devmig_bitmap_encode(bm, h.npages, h.page_size, enc,
					 devmig_bitmap_encode_bound(h.npages));
		if (n < 0 || devmig_bitmap_decode(enc, (size_t)n, back, nw, NULL) < 0 ||
		    memcmp(bm, back, nw * 8) != 0)
			abort(); /* accepted, but does not round-trip */
	}
	free(bm);
	free(back);
	free(enc);
	return 0;
}
