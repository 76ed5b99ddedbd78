/* Dirty-page bitmaps: scanning to page ranges, merging, and devmig's compact
 * encoding for sending them (the agent's dirty-page export).
 *
 * A bitmap is what the kernel reports (VFIO_IOMMU_DIRTY_PAGES,
 * VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, IOMMU_HWPT_GET_DIRTY_BITMAP): an
 * array of little-endian 64-bit words, bit i of word w standing for page
 * w * 64 + i. Bits at or beyond the page count must be zero.
 *
 * The encoding, version 1 ("DMDB"), all integers little-endian:
 *
 *   header (32 bytes)
 *     0  magic       "DMDB"
 *     4  u16 version  1
 *     6  u16 flags    0 (anything else is refused)
 *     8  u32 page_size  bytes per page, a power of two from 512 to 1 GiB
 *    12  u32 block_pages  pages per block, DEVMIG_BITMAP_BLOCK_PAGES
 *    16  u64 npages
 *    24  u64 body_len  bytes that follow the header
 *   body: one record per block with any bit set, in increasing block order
 *     varint skip    blocks left out (all clear) since the previous record
 *     u8 kind        1 RUNS or 2 LITERAL
 *     RUNS:    varint n (>= 1), then n pairs: varint gap, varint len - 1
 *              gap counts the clear pages before the run, from the block's
 *              start for the first run and from the previous run's end
 *              after it (then >= 1: touching runs are one run); every run
 *              lies inside the block and inside npages
 *     LITERAL: the block's words, 8 bytes each (the last block may be
 *              shorter: as many words as its pages need)
 *   varint: unsigned LEB128, at most 10 bytes, no value above 2^64 - 1.
 *
 * The encoder picks, per block, whichever kind is smaller, so a sparse
 * bitmap costs a few bytes per dirty run and a dense one barely more than
 * the raw words; the whole encoding never exceeds devmig_bitmap_encode_bound.
 * The decoder checks every field and bound before it writes a bit. */
#ifndef DEVMIG_BITMAP_H
#define DEVMIG_BITMAP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DEVMIG_BITMAP_VERSION 1
#define DEVMIG_BITMAP_HEADER_LEN 32
/* 32768 pages: one block is 4 KiB of bitmap (a page of the bitmap itself),
 * and every in-block offset fits a 3-byte varint. */
#define DEVMIG_BITMAP_BLOCK_PAGES 32768u

/* 64-bit words a bitmap of npages needs. */
static inline uint64_t devmig_bitmap_words(uint64_t npages)
{
	return (npages + 63) / 64;
}

/* A run of dirty pages [first, first + count). */
struct devmig_page_range {
	uint64_t first;
	uint64_t count;
};

/* Set bits among the first npages. */
uint64_t devmig_bitmap_count(const uint64_t *bm, uint64_t npages);
/* The runs of set bits, in order, starting at page *pos: fills at most max
 * ranges, sets *pos where the next call continues, and returns how many it
 * filled (0 once no run is left). A run is never split between calls. */
size_t devmig_bitmap_ranges(const uint64_t *bm, uint64_t npages, uint64_t *pos,
			    struct devmig_page_range *out, size_t max);
/* dst |= src, nwords words. */
void devmig_bitmap_or(uint64_t *dst, const uint64_t *src, uint64_t nwords);

/* Largest encoding of any bitmap of npages. */
uint64_t devmig_bitmap_encode_bound(uint64_t npages);
/* Encode bm (npages pages of page_size bytes) into out (cap bytes). Returns
 * the encoded length, -ENOSPC when cap is short of what this bitmap needs
 * (cap >= devmig_bitmap_encode_bound(npages) always suffices), -EINVAL for
 * a bad page size or a bit set at or beyond npages. */
long devmig_bitmap_encode(const uint64_t *bm, uint64_t npages, uint32_t page_size, void *out,
			  size_t cap);

/* The encoder's implementations; every one writes the same bytes. */
enum devmig_bitmap_impl {
	DEVMIG_BITMAP_IMPL_AUTO = 0,     /* the fastest this CPU has */
	DEVMIG_BITMAP_IMPL_PORTABLE = 1, /* plain C */
	DEVMIG_BITMAP_IMPL_X86 = 2,      /* POPCNT and BMI (x86-64 since about 2013) */
	DEVMIG_BITMAP_IMPL_X86_512 = 3,  /* AVX-512 with VBMI2, BITALG and VPOPCNTDQ */
};
/* As devmig_bitmap_encode with a given implementation; -ENOTSUP when this
 * CPU lacks it. */
long devmig_bitmap_encode_impl(int impl, const uint64_t *bm, uint64_t npages, uint32_t page_size,
			       void *out, size_t cap);
/* The implementation devmig_bitmap_encode uses here, for logs and benchmarks. */
const char *devmig_bitmap_impl_name(void);

struct devmig_bitmap_header {
	uint32_t page_size;
	uint64_t npages;
	uint64_t body_len;
};
/* Read and check the header of an encoding of len bytes (the body's length
 * must match len). -EPROTO for a malformed one, -EPROTONOSUPPORT for
 * another version. */
int devmig_bitmap_decode_header(const void *buf, size_t len, struct devmig_bitmap_header *h);
/* Decode, OR-ing the pages into bm (nwords words, at least
 * devmig_bitmap_words(npages) of the encoding): decoding into a zeroed
 * bitmap reproduces it, decoding several merges them. The whole encoding is
 * checked first, so on any error (-EPROTO malformed, -EPROTONOSUPPORT,
 * -ENOSPC bm too small) bm is left untouched. */
int devmig_bitmap_decode(const void *buf, size_t len, uint64_t *bm, uint64_t nwords,
			 struct devmig_bitmap_header *h);

#ifdef __cplusplus
}
#endif
#endif
