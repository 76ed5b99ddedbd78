/* GHASH (NIST SP 800-38D §6.4) and the stream's keyed MAC built on it.
 *
 * GHASH_H(X1..Xm) = Y_m with Y_0 = 0, Y_i = (Y_{i-1} xor X_i) . H in
 * GF(2^128) under GCM's bit order (bit 0 of a block, the top bit of its
 * first byte, is the coefficient of x^0) modulo x^128 + x^7 + x^2 + x + 1.
 *
 * The MAC is the Wegman-Carter construction GMAC uses, with HMAC-SHA-256
 * as the function that makes the one-time key: for a stream key K (32
 * bytes, the session's) and the stream's random 16-byte nonce N,
 * (H, S) = HMAC-SHA-256(K, "devmig stream mac v1" || N), and
 *   tag = GHASH_H(data, zero-padded to 16 || [8 len(data)]_64 || 0^64) xor S,
 * the last block laid out as GCM's length block (big-endian bit count,
 * then a zero "ciphertext length"), so GHASH here equals the GHASH inside
 * AES-GCM with the data as its additional data: the tests check it against
 * OpenSSL's AES-GCM that way. A forgery succeeds with probability at most
 * (blocks + 1) / 2^128 per try while (H, S) stays secret and is never used
 * for two streams, hence the fresh nonce per stream.
 *
 * Why not SHA-256 alone: it costs about 1 s per GiB per end even with the
 * SHA extensions, more than moving the bytes; GHASH with carry-less
 * multiplication costs a small fraction of that. */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "devmig/stream.h"
#include "internal.h"

#if defined(__x86_64__)
#define HAVE_X86 1
#include <cpuid.h>
#include <immintrin.h>

#include "simd_x86.h"
#endif

static uint64_t be64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

/* ---- portable: SP 800-38D Algorithm 1, a bit at a time ---- */

/* x . y, both as (first 8 bytes, last 8 bytes) big-endian halves. */
static void gf_mul(uint64_t x[2], const uint64_t y[2])
{
	uint64_t z0 = 0, z1 = 0, v0 = y[0], v1 = y[1];

	for (int i = 0; i < 128; i++) {
		uint64_t bit = (i < 64 ? x[0] >> (63 - i) : x[1] >> (127 - i)) & 1;
		uint64_t lsb = v1 & 1;

		z0 ^= v0 & (0 - bit);
		z1 ^= v1 & (0 - bit);
		v1 = v1 >> 1 | v0 << 63;
		/* R = 11100001 || 0^120 */
		v0 = (v0 >> 1) ^ (0xe100000000000000ull & (0 - lsb));
	}
	x[0] = z0;
	x[1] = z1;
}

static void blocks_portable(struct devmig_ghash *g, const uint8_t *p, size_t n)
{
	uint64_t y[2] = { be64(g->y), be64(g->y + 8) }, h[2] = { be64(g->h), be64(g->h + 8) };

	for (; n; n--, p += 16) {
		y[0] ^= be64(p);
		y[1] ^= be64(p + 8);
		gf_mul(y, h);
	}
	put_be64(g->y, y[0]);
	put_be64(g->y + 8, y[1]);
}

#ifdef HAVE_X86
/* Carry-less multiplication. Blocks are byte-reversed on load, so each
 * holds its polynomial with x^0 at the top bit of the 128-bit integer: the
 * product of two such is the reflected product shifted right by one bit,
 * which ghash_shift_reduce (simd_x86.h) corrects (a left shift of the 256-bit product) before
 * it reduces modulo the reflected polynomial. Linear in the product, so
 * several products may be XORed together and reduced once. */
/* lo/hi ^= the 256-bit carry-less product a . b */
TGT_CLMUL static inline void clmul_acc(__m128i a, __m128i b, __m128i *lo, __m128i *hi)
{
	__m128i t0 = _mm_clmulepi64_si128(a, b, 0x00);
	__m128i t1 = _mm_clmulepi64_si128(a, b, 0x10);
	__m128i t2 = _mm_clmulepi64_si128(a, b, 0x01);
	__m128i t3 = _mm_clmulepi64_si128(a, b, 0x11);

	t1 = _mm_xor_si128(t1, t2);
	*lo = _mm_xor_si128(*lo, _mm_xor_si128(t0, _mm_slli_si128(t1, 8)));
	*hi = _mm_xor_si128(*hi, _mm_xor_si128(t3, _mm_srli_si128(t1, 8)));
}

TGT_CLMUL static __m128i mul(__m128i a, __m128i b)
{
	__m128i lo = _mm_setzero_si128(), hi = _mm_setzero_si128();

	clmul_acc(a, b, &lo, &hi);
	return ghash_shift_reduce(lo, hi);
}

/* Eight blocks per reduction: Y' = (Y^X1).H^8 ^ X2.H^7 ^ ... ^ X8.H, the
 * products independent of each other, so the multiplier stays busy. */
TGT_CLMUL static void blocks_pclmul(struct devmig_ghash *g, const uint8_t *p, size_t n)
{
	__m128i y = ghash_bswap128(_mm_loadu_si128((const __m128i *)g->y));
	__m128i hp[8];

	for (int i = 0; i < 8; i++)
		hp[i] = _mm_loadu_si128((const __m128i *)(g->hpow + 16 * i)); /* H^(i+1) */
	for (; n >= 8; n -= 8, p += 128) {
		__m128i lo = _mm_setzero_si128(), hi = _mm_setzero_si128();

		for (int i = 0; i < 8; i++) {
			__m128i x = ghash_bswap128(_mm_loadu_si128((const __m128i *)(p + 16 * i)));

			if (i == 0)
				x = _mm_xor_si128(x, y);
			clmul_acc(x, hp[7 - i], &lo, &hi);
		}
		y = ghash_shift_reduce(lo, hi);
	}
	for (; n; n--, p += 16)
		y = mul(_mm_xor_si128(y, ghash_bswap128(_mm_loadu_si128((const __m128i *)p))), hp[0]);
	_mm_storeu_si128((__m128i *)g->y, ghash_bswap128(y));
}

TGT_CLMUL static void powers_pclmul(struct devmig_ghash *g)
{
	__m128i h = ghash_bswap128(_mm_loadu_si128((const __m128i *)g->h)), x = h;

	for (int i = 0; i < (int)(sizeof(g->hpow) / 16); i++) {
		_mm_storeu_si128((__m128i *)(g->hpow + 16 * i), x);
		x = mul(x, h);
	}
}

/* 512-bit carry-less multiplication (VPCLMULQDQ with AVX-512): four blocks
 * per instruction, sixty-four per reduction:
 *   Y' = (Y^X1).H^64 ^ X2.H^63 ^ ... ^ X64.H = Y.H^64 ^ (X1.H^64 ^ ... ^ X64.H).
 * The blocks' products do not depend on Y, so they are summed (in 512-bit
 * lanes, then folded into one 256-bit product) while the previous group's
 * reduction is still running; only Y.H^64, four 128-bit multiplies, and the
 * reduction lie on the chain from one group to the next. With sixteen
 * blocks per reduction and Y folded into the first block, that chain (about
 * 35 cycles) bounded the loop at half the multiplier's rate: 18 GB/s in
 * cache here; 26 GB/s with 32 blocks per group and Y apart, 34 GB/s with 64,
 * where the shuffle port (the multiplies and the byte reversal) is full. */
TGT_CLMUL512 static void blocks_vpclmul(struct devmig_ghash *g, const uint8_t *p, size_t n)
{
	__m128i y = ghash_bswap128(_mm_loadu_si128((const __m128i *)g->y));
	const __m128i hg = _mm_loadu_si128((const __m128i *)(g->hpow + 16 * (GHASH_GROUP - 1)));
	__m512i hk[GHASH_GROUP / 4];

	if (n < GHASH_GROUP) {
		blocks_pclmul(g, p, n);
		return;
	}
	ghash_group_keys(g->hpow, hk);
	for (; n >= GHASH_GROUP; n -= GHASH_GROUP, p += 16 * GHASH_GROUP) {
		__m512i lo = _mm512_setzero_si512(), hi = lo, mid = lo;

		for (int j = 0; j < GHASH_GROUP / 4; j++)
			ghash_acc4(_mm512_loadu_si512((const void *)(p + 64 * j)), hk[j], &lo, &hi, &mid);
		y = ghash_group_end(lo, hi, mid, y, hg);
	}
	_mm_storeu_si128((__m128i *)g->y, ghash_bswap128(y));
	if (n)
		blocks_pclmul(g, p, n); /* the rest, fewer than GHASH_GROUP blocks */
}

/* VPCLMULQDQ: CPUID leaf 7, subleaf 0, ECX bit 10; asked directly, as
 * sha256.c does for the SHA extensions, since not every compiler's
 * __builtin_cpu_supports knows it. AVX-512's own checks (which include the
 * OS saving the 512-bit state) come from __builtin_cpu_supports. Also used
 * by crc32c.c. */
bool devmig_cpu_has_vpclmul512(void)
{
	unsigned int a, b, c, d;

	__builtin_cpu_init();
	return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c & (1u << 10)) &&
	       __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
#endif

static void (*best)(struct devmig_ghash *, const uint8_t *, size_t);
static bool has_pclmul, has_vpclmul;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init(void)
{
	best = blocks_portable;
#ifdef HAVE_X86
	__builtin_cpu_init();
	has_pclmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("ssse3") &&
		     __builtin_cpu_supports("sse4.1");
	has_vpclmul = has_pclmul && devmig_cpu_has_vpclmul512();
	if (has_pclmul)
		best = has_vpclmul ? blocks_vpclmul : blocks_pclmul;
#endif
}

int devmig_ghash_init_impl(struct devmig_ghash *g, const uint8_t h[16], int impl)
{
	pthread_once(&once, init);
	memset(g, 0, sizeof(*g));
	memcpy(g->h, h, 16);
	switch (impl) {
	case DEVMIG_IMPL_AUTO:
		g->blocks = best;
		break;
	case DEVMIG_IMPL_PORTABLE:
		g->blocks = blocks_portable;
		break;
#ifdef HAVE_X86
	case DEVMIG_IMPL_X86:
		if (!has_pclmul)
			return -ENOTSUP;
		g->blocks = blocks_pclmul;
		break;
	case DEVMIG_IMPL_X86_512:
		if (!has_vpclmul)
			return -ENOTSUP;
		g->blocks = blocks_vpclmul;
		break;
#endif
	default:
		return -ENOTSUP;
	}
#ifdef HAVE_X86
	if (g->blocks != blocks_portable)
		powers_pclmul(g);
#endif
	return 0;
}

const char *devmig_ghash_impl_name(void)
{
	pthread_once(&once, init);
#ifdef HAVE_X86
	if (best == blocks_vpclmul)
		return "vpclmulqdq";
	if (best == blocks_pclmul)
		return "pclmul";
#endif
	return "portable";
}

bool devmig_ghash_is_512(const struct devmig_ghash *g)
{
#ifdef HAVE_X86
	return g->blocks == blocks_vpclmul;
#else
	(void)g;
	return false;
#endif
}

void devmig_ghash_update(struct devmig_ghash *g, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	g->len += len;
	if (g->fill) {
		size_t k = 16 - g->fill < len ? 16 - g->fill : len;

		memcpy(g->buf + g->fill, p, k);
		g->fill += k;
		p += k;
		len -= k;
		if (g->fill < 16)
			return;
		g->blocks(g, g->buf, 1);
		g->fill = 0;
	}
	if (len >= 16) {
		g->blocks(g, p, len / 16);
		p += len & ~(size_t)15;
		len &= 15;
	}
	if (len) {
		memcpy(g->buf, p, len);
		g->fill = len;
	}
}

void devmig_ghash_final(struct devmig_ghash *g, uint8_t out[16])
{
	uint8_t lenblk[16] = { 0 };

	if (g->fill) {
		memset(g->buf + g->fill, 0, 16 - g->fill);
		g->blocks(g, g->buf, 1);
		g->fill = 0;
	}
	put_be64(lenblk, g->len * 8);
	g->blocks(g, lenblk, 1);
	memcpy(out, g->y, 16);
}

static const char MAC_LABEL[] = "devmig stream mac v1";

int devmig_mac_init(struct devmig_mac *m, const uint8_t key[32], const uint8_t nonce[16])
{
	uint8_t msg[sizeof(MAC_LABEL) - 1 + 16], hs[32];
	int r;

	memcpy(msg, MAC_LABEL, sizeof(MAC_LABEL) - 1);
	memcpy(msg + sizeof(MAC_LABEL) - 1, nonce, 16);
	devmig_hmac_sha256(key, 32, msg, sizeof(msg), hs);
	memcpy(m->s, hs + 16, 16);
	r = devmig_ghash_init_impl(&m->gh, hs, DEVMIG_IMPL_AUTO);
	memset(hs, 0, sizeof(hs));
	return r;
}

void devmig_mac_update(struct devmig_mac *m, const void *buf, size_t len)
{
	devmig_ghash_update(&m->gh, buf, len);
}

void devmig_mac_final(struct devmig_mac *m, uint8_t tag[16])
{
	devmig_ghash_final(&m->gh, tag);
	for (int i = 0; i < 16; i++)
		tag[i] ^= m->s[i];
}
