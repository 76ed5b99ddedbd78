/* x86 SIMD steps shared by ghash.c, crc32c.c, aes.c and framepass.c (which
 * runs all three in one pass over a frame). Static inline, each with the
 * narrowest target it needs: GCC inlines a function only into callers
 * whose target includes its own. Not installed. */
#ifndef DEVMIG_SIMD_X86_H
#define DEVMIG_SIMD_X86_H

#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define TGT_CLMUL __attribute__((target("pclmul,ssse3,sse4.1")))
#define TGT_CLMUL512 __attribute__((target("avx512f,avx512bw,vpclmulqdq,pclmul,ssse3,sse4.1")))
#define TGT_CRC512 __attribute__((target("avx512f,avx512bw,vpclmulqdq,pclmul,sse4.2")))
#define TGT_VAES __attribute__((target("aes,sse4.1,ssse3,avx512f,avx512bw,vaes")))

/* ---- GHASH (ghash.c explains the representation) ---- */

TGT_CLMUL static inline __m128i ghash_bswap128(__m128i x)
{
	return _mm_shuffle_epi8(x, _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

/* The 256-bit carry-less product hi:lo of two byte-reversed blocks, one
 * bit to the left (the reflected product comes out one bit short), reduced
 * modulo x^128 + x^7 + x^2 + x + 1 in the reflected order. */
TGT_CLMUL static inline __m128i ghash_shift_reduce(__m128i lo, __m128i hi)
{
	/* The 256-bit hi:lo one bit to the left. */
	__m128i c_lo = _mm_srli_epi32(lo, 31), c_hi = _mm_srli_epi32(hi, 31);
	__m128i top = _mm_srli_si128(c_lo, 12);

	lo = _mm_or_si128(_mm_slli_epi32(lo, 1), _mm_slli_si128(c_lo, 4));
	hi = _mm_or_si128(_mm_or_si128(_mm_slli_epi32(hi, 1), _mm_slli_si128(c_hi, 4)), top);
	/* Reduce: first fold the low half's words by x^127, x^126, x^121
	 * (left shifts 31, 30, 25)... */
	__m128i a = _mm_xor_si128(_mm_xor_si128(_mm_slli_epi32(lo, 31), _mm_slli_epi32(lo, 30)),
				  _mm_slli_epi32(lo, 25));
	__m128i carry = _mm_srli_si128(a, 4);

	lo = _mm_xor_si128(lo, _mm_slli_si128(a, 12));
	/* ...then by x^1, x^2, x^7 (right shifts 1, 2, 7), into the high half. */
	__m128i b = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi32(lo, 1), _mm_srli_epi32(lo, 2)),
				  _mm_srli_epi32(lo, 7));

	b = _mm_xor_si128(b, carry);
	return _mm_xor_si128(hi, _mm_xor_si128(lo, b));
}

/* Blocks per reduction in the 512-bit GHASH; struct devmig_ghash's hpow
 * holds H^1..H^GHASH_GROUP. */
#define GHASH_GROUP 64

/* The group's multipliers: lane k of hk[j] multiplies block 4j + k of a
 * group, H^(GHASH_GROUP - 4j - k), found at hpow + 16 * (power - 1). */
TGT_CLMUL512 static inline void ghash_group_keys(const uint8_t *hpow, __m512i hk[GHASH_GROUP / 4])
{
	for (int j = 0; j < GHASH_GROUP / 4; j++) {
		uint8_t lanes[64];

		for (int k = 0; k < 4; k++)
			memcpy(lanes + 16 * k, hpow + 16 * (GHASH_GROUP - 1 - 4 * j - k), 16);
		hk[j] = _mm512_loadu_si512((const void *)lanes);
	}
}

/* Adds the products of four blocks as they lie in memory (64 bytes, not
 * yet byte-reversed) and their multipliers into the group's sums. */
TGT_CLMUL512 static inline void ghash_acc4(__m512i wire, __m512i hk, __m512i *lo, __m512i *hi,
					   __m512i *mid)
{
	const __m512i rev = _mm512_broadcast_i32x4(
		_mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
	__m512i x = _mm512_shuffle_epi8(wire, rev);

	*lo = _mm512_xor_si512(*lo, _mm512_clmulepi64_epi128(x, hk, 0x00));
	*hi = _mm512_xor_si512(*hi, _mm512_clmulepi64_epi128(x, hk, 0x11));
	/* 0x96: a ^ b ^ c in one instruction */
	*mid = _mm512_ternarylogic_epi64(*mid, _mm512_clmulepi64_epi128(x, hk, 0x10),
					 _mm512_clmulepi64_epi128(x, hk, 0x01), 0x96);
}

TGT_CLMUL512 static inline __m128i xor_lanes(__m512i v)
{
	__m256i t = _mm256_xor_si256(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));

	return _mm_xor_si128(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

/* The group's end: Y' = Y.H^GHASH_GROUP ^ (the blocks' summed products),
 * reduced. y and hg (H^GHASH_GROUP) byte-reversed, as is the result.
 * Y's term last: the blocks' products ran while Y was being reduced. */
TGT_CLMUL512 static inline __m128i ghash_group_end(__m512i lo, __m512i hi, __m512i mid, __m128i y,
						   __m128i hg)
{
	__m128i l = xor_lanes(lo), h = xor_lanes(hi), m = xor_lanes(mid);

	l = _mm_xor_si128(l, _mm_clmulepi64_si128(y, hg, 0x00));
	h = _mm_xor_si128(h, _mm_clmulepi64_si128(y, hg, 0x11));
	m = _mm_xor_si128(m, _mm_xor_si128(_mm_clmulepi64_si128(y, hg, 0x10),
					   _mm_clmulepi64_si128(y, hg, 0x01)));
	l = _mm_xor_si128(l, _mm_slli_si128(m, 8));
	h = _mm_xor_si128(h, _mm_srli_si128(m, 8));
	return ghash_shift_reduce(l, h);
}

/* ---- CRC32C folding (crc32c.c explains it) ---- */

/* Bytes the four accumulators hold; each fold moves them this far on. */
#define CRC_FOLD_BYTES 256u

/* The fold multipliers in every lane (devmig_crc32c_fold_consts). */
TGT_CLMUL512 static inline __m512i crc_fold_key(uint64_t lo, uint64_t hi)
{
	return _mm512_broadcast_i32x4(_mm_set_epi64x((long long)hi, (long long)lo));
}

/* One accumulator moved CRC_FOLD_BYTES on (k: the fold multipliers) onto
 * the next 64 bytes. */
TGT_CLMUL512 static inline __m512i crc_fold512(__m512i acc, __m512i k, __m512i next)
{
	return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(acc, k, 0x00),
					 _mm512_clmulepi64_epi128(acc, k, 0x11), next, 0x96);
}

/* The CRC (in devmig_crc32c's chaining form) of the stream folded into
 * a[0..3]: the CRC32 instruction over the 256 bytes they hold. */
TGT_CRC512 static inline uint32_t crc_fold_finish(const __m512i a[4])
{
	uint8_t rest[CRC_FOLD_BYTES];
	uint64_t c = 0;

	for (int i = 0; i < 4; i++)
		_mm512_storeu_si512((void *)(rest + 64 * i), a[i]);
	for (size_t i = 0; i < CRC_FOLD_BYTES; i += 8) {
		uint64_t w;

		memcpy(&w, rest + i, 8);
		c = _mm_crc32_u64(c, w);
	}
	return ~(uint32_t)c;
}

/* ---- AES-256-CTR (aes.c explains the counter block) ---- */

/* Reverses bytes 8..15 (the counter, kept as a native 64-bit number in
 * the high lane so that it adds with PADDQ) and keeps the prefix. */
#define AES_BE_HIGH_LANE _mm_set_epi8(8, 9, 10, 11, 12, 13, 14, 15, 7, 6, 5, 4, 3, 2, 1, 0)

/* 512-bit registers encrypted side by side: VAESENC's latency is several
 * cycles, so eight independent ones keep the unit busy (5.7 GB/s with four,
 * 7 to 8.5 GB/s with eight here, in cache). */
#define AES_LANES 8

/* Counter blocks ctr, ctr+1, ctr+2, ctr+3 in the four lanes. */
TGT_VAES static inline __m512i aes_ctr_first(uint64_t prefix, uint64_t ctr)
{
	return _mm512_add_epi64(
		_mm512_broadcast_i32x4(_mm_set_epi64x((long long)ctr, (long long)prefix)),
		_mm512_set_epi64(3, 0, 2, 0, 1, 0, 0, 0));
}

/* The 15 round keys (16 bytes each, in order at rkb) in every lane. */
TGT_VAES static inline void aes_round_keys512(const uint8_t *rkb, __m512i rk[15])
{
	for (int i = 0; i < 15; i++)
		rk[i] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(rkb + 16 * i)));
}

/* The next AES_LANES registers of counter blocks from *c (which moves on
 * past them), byte-ordered and whitened with round key 0: the input of
 * the first round. */
TGT_VAES static inline void aes_ctr_blocks512(__m512i rk0, __m512i *c, __m512i x[AES_LANES])
{
	const __m512i swap = _mm512_broadcast_i32x4(AES_BE_HIGH_LANE);
	const __m512i four = _mm512_broadcast_i32x4(_mm_set_epi64x(4, 0));

	for (int j = 0; j < AES_LANES; j++) {
		x[j] = _mm512_xor_si512(_mm512_shuffle_epi8(*c, swap), rk0);
		*c = _mm512_add_epi64(*c, four);
	}
}

/* The keystream of the next AES_LANES registers (4 * AES_LANES blocks)
 * from counter *c, which moves on past them. */
TGT_VAES static inline void aes_keystream512(const __m512i rk[15], __m512i *c, __m512i x[AES_LANES])
{
	aes_ctr_blocks512(rk[0], c, x);
	for (int r = 1; r < 14; r++)
		for (int j = 0; j < AES_LANES; j++)
			x[j] = _mm512_aesenc_epi128(x[j], rk[r]);
	for (int j = 0; j < AES_LANES; j++)
		x[j] = _mm512_aesenclast_epi128(x[j], rk[14]);
}

/* The counter block that follows *c's lanes' first (for the AES-NI code
 * that finishes a run). */
TGT_VAES static inline uint64_t aes_ctr_next(__m512i c)
{
	return (uint64_t)_mm_extract_epi64(_mm512_castsi512_si128(c), 1);
}
#endif

#endif
