/* SHA-256 as FIPS 180-4 defines it (§4.1.2 functions, §4.2.2 constants,
 * §5.1.1 padding, §6.2 computation). */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "devmig/stream.h"

__extension__ typedef unsigned __int128 u128;

/* §4.2.2: K[t] is the first 32 bits of the fractional part of the cube
 * root of the t-th prime; §5.3.3: H0[i] the same of the square root of the
 * i-th prime. Derived here from that definition with exact integer roots
 * (floor(root(p * 2^(32*n))) mod 2^32), so no constant is mistyped; the
 * standard test vectors check the result. */
static uint32_t K[64], H0[8];
static pthread_once_t consts_once = PTHREAD_ONCE_INIT;

static u128 iroot(u128 x, int n)
{
	/* Largest r with r^n <= x. x < 2^105 (311, the 64th prime, shifted by
	 * 96 bits), so r < 2^37 for both roots; 2^40 bounds the search and
	 * keeps mid^3 below 2^120, inside 128 bits. */
	u128 lo = 0, hi = (u128)1 << 40;

	while (lo < hi) {
		u128 mid = lo + (hi - lo + 1) / 2;
		u128 p = n == 2 ? mid * mid : mid * mid * mid;

		if (p <= x)
			lo = mid;
		else
			hi = mid - 1;
	}
	return lo;
}

static void build_consts(void)
{
	int found = 0;

	for (uint32_t p = 2; found < 64; p++) {
		int prime = 1;

		for (uint32_t q = 2; q * q <= p; q++)
			if (p % q == 0)
				prime = 0;
		if (!prime)
			continue;
		K[found] = (uint32_t)iroot((u128)p << 96, 3);
		if (found < 8)
			H0[found] = (uint32_t)iroot((u128)p << 64, 2);
		found++;
	}
}

static uint32_t ror(uint32_t x, int n)
{
	return (x >> n) | (x << (32 - n));
}

static void blocks_portable(uint32_t hs[8], const uint8_t *b, size_t n)
{
	for (; n; n--, b += 64) {
		uint32_t w[64], a, bb, c, d, e, f, g, h;

		for (int t = 0; t < 16; t++)
			w[t] = (uint32_t)b[4 * t] << 24 | (uint32_t)b[4 * t + 1] << 16 |
			       (uint32_t)b[4 * t + 2] << 8 | b[4 * t + 3];
		for (int t = 16; t < 64; t++) {
			uint32_t s0 = ror(w[t - 15], 7) ^ ror(w[t - 15], 18) ^ (w[t - 15] >> 3);
			uint32_t s1 = ror(w[t - 2], 17) ^ ror(w[t - 2], 19) ^ (w[t - 2] >> 10);

			w[t] = w[t - 16] + s0 + w[t - 7] + s1;
		}
		a = hs[0], bb = hs[1], c = hs[2], d = hs[3];
		e = hs[4], f = hs[5], g = hs[6], h = hs[7];
		for (int t = 0; t < 64; t++) {
			uint32_t t1 = h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) +
				      K[t] + w[t];
			uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) +
				      ((a & bb) ^ (a & c) ^ (bb & c));

			h = g, g = f, f = e, e = d + t1;
			d = c, c = bb, bb = a, a = t1 + t2;
		}
		hs[0] += a, hs[1] += bb, hs[2] += c, hs[3] += d;
		hs[4] += e, hs[5] += f, hs[6] += g, hs[7] += h;
	}
}

#if defined(__x86_64__)
#define HAVE_X86 1
#include <cpuid.h>
#include <immintrin.h>

/* The SHA extensions (Intel SDM: SHA256RNDS2, SHA256MSG1, SHA256MSG2). The
 * working variables live in two registers, ABEF = {A, B, E, F} and CDGH,
 * highest lane first. SHA256RNDS2(cdgh, abef, wk) runs the two rounds
 * whose W[t] + K[t] are wk's low two lanes and returns the new ABEF; the
 * new CDGH is the old ABEF. The schedule is kept as four registers of four
 * words, W[4i + j] in lane j of M[i] (m0..m3 hold M[i] for i mod 4); for
 * i >= 4
 *   M[i] = MSG2(MSG1(M[i-4], M[i-3]) + {W[4i-7] .. W[4i-4]}, M[i-1])
 * where the middle term is M[i-2] and M[i-1] shifted down one word
 * (§6.2.2 step 1, four words at a time). */
__attribute__((target("sha,ssse3,sse4.1"))) static void blocks_shani(uint32_t hs[8],
								     const uint8_t *b, size_t n)
{
	/* Bytes of each big-endian word reversed into a little-endian lane. */
	const __m128i bswap = _mm_set_epi8(12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3);
	__m128i abef = _mm_set_epi32((int)hs[0], (int)hs[1], (int)hs[4], (int)hs[5]);
	__m128i cdgh = _mm_set_epi32((int)hs[2], (int)hs[3], (int)hs[6], (int)hs[7]);

	for (; n; n--, b += 64) {
		__m128i m0, m1, m2, m3, wk, abef0 = abef, cdgh0 = cdgh;

		m0 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(const void *)b), bswap);
		m1 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(const void *)(b + 16)), bswap);
		m2 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(const void *)(b + 32)), bswap);
		m3 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(const void *)(b + 48)), bswap);
/* Rounds 4i .. 4i+3 from the schedule words in m: the first SHA256RNDS2
 * leaves the new ABEF in cdgh (abef is then the CDGH), the second swaps
 * them back. */
#define ROUNDS4(m, i)                                                                      \
	do {                                                                               \
		wk = _mm_add_epi32(m, _mm_loadu_si128((const __m128i *)(const void *)&K[4 * (i)])); \
		cdgh = _mm_sha256rnds2_epu32(cdgh, abef, wk);                             \
		abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(wk, 0x0e));    \
	} while (0)
/* The next four words into a (the oldest group), from a, b, c and d. */
#define SCHED(a, b, c, d) \
	a = _mm_sha256msg2_epu32(_mm_add_epi32(_mm_sha256msg1_epu32(a, b), _mm_alignr_epi8(d, c, 4)), d)
		ROUNDS4(m0, 0);
		ROUNDS4(m1, 1);
		ROUNDS4(m2, 2);
		ROUNDS4(m3, 3);
		for (int i = 4; i < 16; i += 4) {
			SCHED(m0, m1, m2, m3);
			ROUNDS4(m0, i);
			SCHED(m1, m2, m3, m0);
			ROUNDS4(m1, i + 1);
			SCHED(m2, m3, m0, m1);
			ROUNDS4(m2, i + 2);
			SCHED(m3, m0, m1, m2);
			ROUNDS4(m3, i + 3);
		}
#undef ROUNDS4
#undef SCHED
		abef = _mm_add_epi32(abef, abef0);
		cdgh = _mm_add_epi32(cdgh, cdgh0);
	}
	hs[0] = (uint32_t)_mm_extract_epi32(abef, 3);
	hs[1] = (uint32_t)_mm_extract_epi32(abef, 2);
	hs[4] = (uint32_t)_mm_extract_epi32(abef, 1);
	hs[5] = (uint32_t)_mm_extract_epi32(abef, 0);
	hs[2] = (uint32_t)_mm_extract_epi32(cdgh, 3);
	hs[3] = (uint32_t)_mm_extract_epi32(cdgh, 2);
	hs[6] = (uint32_t)_mm_extract_epi32(cdgh, 1);
	hs[7] = (uint32_t)_mm_extract_epi32(cdgh, 0);
}
#endif

static void (*best)(uint32_t h[8], const uint8_t *p, size_t n);

#ifdef HAVE_X86
/* The SHA extensions: CPUID leaf 7, subleaf 0, EBX bit 29. Asked directly
 * because not every compiler's __builtin_cpu_supports knows "sha" (clang
 * 14, which builds the fuzz targets, does not). */
static bool cpu_has_sha(void)
{
	unsigned int a, b, c, d;

	return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29));
}
#endif

static void init(void)
{
	build_consts();
	best = blocks_portable;
#ifdef HAVE_X86
	__builtin_cpu_init();
	if (cpu_has_sha() && __builtin_cpu_supports("ssse3") && __builtin_cpu_supports("sse4.1"))
		best = blocks_shani;
#endif
}

int devmig_sha256_init_impl(struct devmig_sha256 *s, int impl)
{
	pthread_once(&consts_once, init);
	switch (impl) {
	case DEVMIG_IMPL_AUTO:
		s->blocks = best;
		break;
	case DEVMIG_IMPL_PORTABLE:
		s->blocks = blocks_portable;
		break;
#ifdef HAVE_X86
	case DEVMIG_IMPL_X86:
		if (best != blocks_shani)
			return -ENOTSUP;
		s->blocks = blocks_shani;
		break;
#endif
	default:
		return -ENOTSUP;
	}
	memcpy(s->h, H0, sizeof(H0));
	s->len = 0;
	s->fill = 0;
	return 0;
}

void devmig_sha256_init(struct devmig_sha256 *s)
{
	devmig_sha256_init_impl(s, DEVMIG_IMPL_AUTO);
}

static char impls[96];
static pthread_once_t impls_once = PTHREAD_ONCE_INIT;

static void build_impls(void)
{
	bool crc_hw = devmig_crc32c_impl(DEVMIG_IMPL_X86) != NULL;
	bool crc_fold = devmig_crc32c_impl(DEVMIG_IMPL_X86_512) != NULL;
	bool sha_hw = false;

	pthread_once(&consts_once, init);
#ifdef HAVE_X86
	sha_hw = best == blocks_shani;
#endif
	snprintf(impls, sizeof(impls), "crc32c=%s sha256=%s ghash=%s",
		 crc_fold ? "vpclmulqdq" : crc_hw ? "sse4.2" : "slicing-by-8", sha_hw ? "sha-ni" : "portable",
		 devmig_ghash_impl_name());
}

const char *devmig_crypto_impls(void)
{
	pthread_once(&impls_once, build_impls);
	return impls;
}

void devmig_sha256_update(struct devmig_sha256 *s, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	s->len += len;
	if (s->fill) {
		size_t n = 64 - s->fill < len ? 64 - s->fill : len;

		memcpy(s->buf + s->fill, p, n);
		s->fill += n;
		p += n;
		len -= n;
		if (s->fill < 64)
			return;
		s->blocks(s->h, s->buf, 1);
		s->fill = 0;
	}
	if (len >= 64) {
		s->blocks(s->h, p, len / 64);
		p += len / 64 * 64;
		len %= 64;
	}
	memcpy(s->buf, p, len);
	s->fill = len;
}

void devmig_sha256_final(struct devmig_sha256 *s, uint8_t out[32])
{
	uint64_t bits = s->len * 8;

	/* §5.1.1: a 1 bit, zeros to 56 mod 64 bytes, the bit length big-endian. */
	s->buf[s->fill++] = 0x80;
	if (s->fill > 56) {
		memset(s->buf + s->fill, 0, 64 - s->fill);
		s->blocks(s->h, s->buf, 1);
		s->fill = 0;
	}
	memset(s->buf + s->fill, 0, 56 - s->fill);
	for (int i = 0; i < 8; i++)
		s->buf[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
	s->blocks(s->h, s->buf, 1);
	for (int i = 0; i < 8; i++) {
		out[4 * i] = (uint8_t)(s->h[i] >> 24);
		out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
		out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
		out[4 * i + 3] = (uint8_t)s->h[i];
	}
}

/* RFC 2104 with SHA-256 (block 64 bytes): H((K ^ opad) || H((K ^ ipad) || m)),
 * a key longer than the block hashed first. */
void devmig_hmac_sha256(const uint8_t *key, size_t key_len, const void *msg, size_t len,
			uint8_t out[32])
{
	uint8_t k[64] = { 0 }, pad[64], inner[32];
	struct devmig_sha256 s;

	if (key_len > 64) {
		devmig_sha256_init(&s);
		devmig_sha256_update(&s, key, key_len);
		devmig_sha256_final(&s, k);
	} else {
		memcpy(k, key, key_len);
	}
	for (int i = 0; i < 64; i++)
		pad[i] = k[i] ^ 0x36;
	devmig_sha256_init(&s);
	devmig_sha256_update(&s, pad, 64);
	devmig_sha256_update(&s, msg, len);
	devmig_sha256_final(&s, inner);
	for (int i = 0; i < 64; i++)
		pad[i] = k[i] ^ 0x5c;
	devmig_sha256_init(&s);
	devmig_sha256_update(&s, pad, 64);
	devmig_sha256_update(&s, inner, 32);
	devmig_sha256_final(&s, out);
	memset(k, 0, sizeof(k));
	memset(pad, 0, sizeof(pad));
}
