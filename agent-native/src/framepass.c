/* A data frame's payload in one pass: its CRC32C, the stream's MAC
 * (GHASH) and, for a sealed stream, AES-256-CTR, together.
 *
 * Why: run one after the other, each of the three reads the frame again
 * (1 MiB, most of L2), and the cipher's and the MAC's units sit idle in
 * turn. Here every 64 bytes are loaded once and go through all three while
 * they are in a register, and VAESENC (the cipher) and VPCLMULQDQ (the MAC
 * and the CRC fold), which use different execution ports, issue side by
 * side: 12.3 GB/s against 9.4 for the separate passes on a cache-resident
 * 1 MiB frame here (bench_checksums.py --mib 1). The result is bit for bit that of
 * the separate passes (the tests compare them on every length, offset and
 * split around the loop's edges); only the order of the work changes.
 *
 * The loop takes whole GHASH groups (64 blocks, 1 KiB) at a 16-byte
 * boundary of both the MAC and the counter; what comes before the first
 * boundary and after the last group goes through the separate passes. */
#include <string.h>

#include "devmig/stream.h"
#include "internal.h"

#if defined(__x86_64__)
#define HAVE_X86 1
#include "simd_x86.h"
#endif

enum mode { SEAL = DEVMIG_FRAME_SEAL, OPEN = DEVMIG_FRAME_OPEN, MAC = DEVMIG_FRAME_MAC };

/* The separate passes, in the order the mode needs: the CRC and the MAC
 * always cover the bytes on the wire (the ciphertext). */
static uint32_t separate(struct devmig_digest *dg, const uint8_t iv[8], uint64_t offset, uint32_t crc,
			 uint8_t *buf, size_t len, enum mode m)
{
	if (m == SEAL)
		devmig_aes256_ctr_xor(&dg->aes, iv, offset, buf, len);
	crc = devmig_crc32c(crc, buf, len);
	devmig_mac_update(&dg->mac, buf, len);
	if (m == OPEN)
		devmig_aes256_ctr_xor(&dg->aes, iv, offset, buf, len);
	return crc;
}

#ifdef HAVE_X86
/* Bytes per step: one GHASH group. */
#define STEP (16u * GHASH_GROUP)
_Static_assert(STEP % (64u * AES_LANES) == 0, "a step is whole runs of the cipher's registers");
/* Below this the separate passes are as fast: the CRC fold's finish and
 * the loop's set-up (the round keys, 16 registers of H powers) cost about
 * what a few KiB of work saves. */
#define PASS_MIN 4096u

#define TGT_PASS                                                                                   \
	__attribute__((target("avx512f,avx512bw,vpclmulqdq,vaes,aes,pclmul,ssse3,sse4.1,sse4.2")))

/* The running sums: the MAC's group of 64 blocks (its products summed,
 * Y the value before the group) and the CRC fold's four accumulators. */
struct sums {
	__m512i lo, hi, mid, crc[4], kc;
	__m128i y, hg;
	size_t regs; /* 64-byte registers taken so far */
};

/* One register of wire bytes into the MAC and the CRC. The first 256
 * bytes start the CRC's accumulators (the register going in xored into
 * the first four bytes); every 1 KiB ends a MAC group. */
TGT_PASS static inline __attribute__((always_inline)) void absorb(struct sums *s, const __m512i *hk,
								   __m512i w, uint32_t crc_in)
{
	const unsigned r = (unsigned)(s->regs % (GHASH_GROUP / 4));

	ghash_acc4(w, hk[r], &s->lo, &s->hi, &s->mid);
	if (s->regs < 4)
		s->crc[s->regs] = s->regs ? w
					  : _mm512_xor_si512(w, _mm512_zextsi128_si512(
									_mm_cvtsi32_si128((int)~crc_in)));
	else
		s->crc[s->regs & 3] = crc_fold512(s->crc[s->regs & 3], s->kc, w);
	if (r == GHASH_GROUP / 4 - 1) {
		s->y = ghash_group_end(s->lo, s->hi, s->mid, s->y, s->hg);
		s->lo = s->hi = s->mid = _mm512_setzero_si512();
	}
	s->regs++;
}

/* The bulk of the payload at p (len bytes at a 16-byte boundary of the
 * MAC and of the counter, block the counter's block index there): whole
 * steps only; returns how many bytes it took. One body, made three times
 * with m a constant so that each mode's loop has no branch on it.
 *
 * The MAC and CRC work is laced between the cipher's rounds, so that both
 * kinds of unit have work from the same stretch of instructions: opening,
 * a run's own wire bytes (the ciphertext, there before it is decrypted);
 * sealing, the run before's (its ciphertext is only made at the end of its
 * rounds), and the last run's after the loop. */
TGT_PASS static inline __attribute__((always_inline)) size_t
pass512(struct devmig_digest *dg, uint64_t prefix, uint64_t block, uint32_t *crc, uint8_t *p,
	size_t len, enum mode m)
{
	struct devmig_ghash *g = &dg->mac.gh;
	const size_t n = len / STEP * STEP;
	const size_t run = 64u * AES_LANES;
	__m512i rk[15], ctr = _mm512_setzero_si512(), hk[GHASH_GROUP / 4];
	struct sums s;
	uint64_t klo, khi;
	const uint32_t crc_in = *crc;

	devmig_crc32c_fold_consts(&klo, &khi);
	s.kc = crc_fold_key(klo, khi);
	s.lo = s.hi = s.mid = _mm512_setzero_si512();
	s.y = ghash_bswap128(_mm_loadu_si128((const __m128i *)g->y));
	s.hg = _mm_loadu_si128((const __m128i *)(g->hpow + 16 * (GHASH_GROUP - 1)));
	s.regs = 0;
	ghash_group_keys(g->hpow, hk);
	if (m == MAC) {
		for (size_t off = 0; off < n; off += 64)
			absorb(&s, hk, _mm512_loadu_si512((const void *)(p + off)), crc_in);
	} else {
		uint8_t *prev = NULL;

		aes_round_keys512(dg->aes.rk[0], rk);
		ctr = aes_ctr_first(prefix, block);
		for (size_t off = 0; off < n; off += run) {
			uint8_t *q = p + off;
			/* opening sums this run's bytes, sealing the run before's */
			uint8_t *sum = m == OPEN ? q : prev;
			__m512i x[AES_LANES];

			aes_ctr_blocks512(rk[0], &ctr, x);
#pragma GCC unroll 13
			for (unsigned r = 1; r < 14; r++) {
				for (unsigned j = 0; j < AES_LANES; j++)
					x[j] = _mm512_aesenc_epi128(x[j], rk[r]);
				if (sum && r <= AES_LANES)
					absorb(&s, hk, _mm512_loadu_si512((const void *)(sum + 64 * (r - 1))),
					       crc_in);
			}
			for (unsigned j = 0; j < AES_LANES; j++)
				_mm512_storeu_si512((void *)(q + 64 * j),
						    _mm512_xor_si512(_mm512_loadu_si512((const void *)(q + 64 * j)),
								     _mm512_aesenclast_epi128(x[j], rk[14])));
			prev = q;
		}
		if (m == SEAL && prev)
			for (unsigned j = 0; j < AES_LANES; j++)
				absorb(&s, hk, _mm512_loadu_si512((const void *)(prev + 64 * j)), crc_in);
	}
	_mm_storeu_si128((__m128i *)g->y, ghash_bswap128(s.y));
	g->len += n;
	*crc = crc_fold_finish(s.crc);
	return n;
}

TGT_PASS static size_t pass_seal(struct devmig_digest *dg, uint64_t prefix, uint64_t block,
				 uint32_t *crc, uint8_t *p, size_t len)
{
	return pass512(dg, prefix, block, crc, p, len, SEAL);
}

TGT_PASS static size_t pass_open(struct devmig_digest *dg, uint64_t prefix, uint64_t block,
				 uint32_t *crc, uint8_t *p, size_t len)
{
	return pass512(dg, prefix, block, crc, p, len, OPEN);
}

TGT_PASS static size_t pass_mac(struct devmig_digest *dg, uint64_t prefix, uint64_t block,
				uint32_t *crc, uint8_t *p, size_t len)
{
	return pass512(dg, prefix, block, crc, p, len, MAC);
}
#endif

uint32_t devmig_frame_pass(struct devmig_digest *dg, enum devmig_frame_mode mode, const uint8_t iv[8],
			   uint64_t offset, uint32_t crc, uint8_t *buf, size_t len, bool one_pass)
{
	enum mode m = (enum mode)mode;
	size_t done = 0;
#ifdef HAVE_X86
	/* The bytes that complete the MAC's partial block, if any: after
	 * them the MAC is at a block boundary, and (for a sealed stream,
	 * whose MAC began with the 96-byte header) so is the counter. */
	size_t head = (16 - dg->mac.gh.fill) % 16;

	if (one_pass && len >= head + PASS_MIN && devmig_ghash_is_512(&dg->mac.gh) &&
	    (m == MAC || (dg->aes.impl == DEVMIG_IMPL_X86_512 && (offset + head) % 16 == 0))) {
		size_t (*pass)(struct devmig_digest *, uint64_t, uint64_t, uint32_t *, uint8_t *, size_t) =
			m == SEAL ? pass_seal : m == OPEN ? pass_open : pass_mac;
		uint64_t prefix = 0;

		if (m != MAC)
			memcpy(&prefix, iv, 8);
		crc = separate(dg, iv, offset, crc, buf, head, m);
		done = head + pass(dg, prefix, (offset + head) / 16, &crc, buf + head, len - head);
	}
#else
	(void)one_pass;
#endif
	return separate(dg, iv, offset + done, crc, buf + done, len - done, m);
}
