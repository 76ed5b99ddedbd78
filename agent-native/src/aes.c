/* AES-256 in counter mode (FIPS 197, SP 800-38A §6.5), for sealed streams.
 *
 * Only with the CPU's AES instructions: AES-NI (every x86-64 server CPU
 * since about 2010), and VAES on 512-bit registers where present, four
 * blocks per instruction. There is deliberately no portable version: a
 * table-driven AES leaks its key through cache timing, and an agent without
 * AES-NI keeps using TLS for the data path instead (the hello says whether
 * both ends can seal).
 *
 * The counter block is an 8-byte IV followed by the block index as a
 * 64-bit big-endian number, so byte o of a stream is encrypted with byte
 * o % 16 of E_K(IV || BE64(o / 16)): any run of bytes can be
 * en/decrypted on its own given its offset, which is what the stream's
 * frames need. The tests check it against OpenSSL's AES-256-CTR. */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "devmig/stream.h"

#if defined(__x86_64__)
#define HAVE_X86 1
#include <cpuid.h>
#include <immintrin.h>

#include "simd_x86.h"

#define TGT_AES __attribute__((target("aes,sse4.1,ssse3")))

/* One step of the AES-256 key schedule (FIPS 197 §5.2): w[i] = w[i-8] xor
 * f(w[i-1]), four words at a time; prev holds w[i-8..i-5], assist the
 * AESKEYGENASSIST result of w[i-4..i-1] with its wanted word broadcast. */
TGT_AES static __m128i schedule_step(__m128i prev, __m128i assist)
{
	prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
	prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
	prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
	return _mm_xor_si128(prev, assist);
}

/* Even round keys take RotWord(SubWord(.)) xor Rcon (word 3 of the
 * assist), odd ones SubWord(.) alone (word 2); AESKEYGENASSIST takes its
 * round constant as an immediate, hence the macro. */
#define EVEN(i, rcon)                                                                              \
	rk[i] = schedule_step(rk[(i) - 2],                                                         \
			      _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[(i) - 1], rcon), 0xff))
#define ODD(i)                                                                                     \
	rk[i] = schedule_step(rk[(i) - 2],                                                         \
			      _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[(i) - 1], 0), 0xaa))

TGT_AES static void expand_key(const uint8_t key[32], uint8_t out[15][16])
{
	__m128i rk[15];

	rk[0] = _mm_loadu_si128((const __m128i *)key);
	rk[1] = _mm_loadu_si128((const __m128i *)(key + 16));
	EVEN(2, 0x01);
	ODD(3);
	EVEN(4, 0x02);
	ODD(5);
	EVEN(6, 0x04);
	ODD(7);
	EVEN(8, 0x08);
	ODD(9);
	EVEN(10, 0x10);
	ODD(11);
	EVEN(12, 0x20);
	ODD(13);
	EVEN(14, 0x40);
	for (int i = 0; i < 15; i++)
		_mm_storeu_si128((__m128i *)out[i], rk[i]);
}

TGT_AES static __m128i encrypt_block(const __m128i rk[15], __m128i x)
{
	x = _mm_xor_si128(x, rk[0]);
	for (int r = 1; r < 14; r++)
		x = _mm_aesenc_si128(x, rk[r]);
	return _mm_aesenclast_si128(x, rk[14]);
}

/* XOR n whole blocks at p with the keystream from block index ctr:
 * eight blocks in flight, as AESENC's latency is several times its issue
 * interval. */
TGT_AES static void ctr_blocks_aesni(const uint8_t rkb[15][16], uint64_t prefix, uint64_t ctr,
				     uint8_t *p, size_t n)
{
	__m128i rk[15], c = _mm_set_epi64x((long long)ctr, (long long)prefix);
	const __m128i swap = AES_BE_HIGH_LANE, one = _mm_set_epi64x(1, 0);

	for (int i = 0; i < 15; i++)
		rk[i] = _mm_loadu_si128((const __m128i *)rkb[i]);
	for (; n >= 8; n -= 8, p += 128) {
		__m128i x[8];

		for (int j = 0; j < 8; j++) {
			x[j] = _mm_xor_si128(_mm_shuffle_epi8(c, swap), rk[0]);
			c = _mm_add_epi64(c, one);
		}
		for (int r = 1; r < 14; r++)
			for (int j = 0; j < 8; j++)
				x[j] = _mm_aesenc_si128(x[j], rk[r]);
		for (int j = 0; j < 8; j++) {
			__m128i *q = (__m128i *)(p + 16 * j);

			x[j] = _mm_aesenclast_si128(x[j], rk[14]);
			_mm_storeu_si128(q, _mm_xor_si128(_mm_loadu_si128(q), x[j]));
		}
	}
	for (; n; n--, p += 16) {
		__m128i *q = (__m128i *)p;

		_mm_storeu_si128(q, _mm_xor_si128(_mm_loadu_si128(q),
						  encrypt_block(rk, _mm_shuffle_epi8(c, swap))));
		c = _mm_add_epi64(c, one);
	}
}

/* The same with VAES: four blocks per 512-bit register, AES_LANES
 * registers in flight. */
TGT_VAES static void ctr_blocks_vaes(const uint8_t rkb[15][16], uint64_t prefix, uint64_t ctr,
				     uint8_t *p, size_t n)
{
	__m512i rk[15], c = aes_ctr_first(prefix, ctr);

	aes_round_keys512(rkb[0], rk);
	for (; n >= 4 * AES_LANES; n -= 4 * AES_LANES, p += 64 * AES_LANES) {
		__m512i x[AES_LANES];

		aes_keystream512(rk, &c, x);
		for (int j = 0; j < AES_LANES; j++)
			_mm512_storeu_si512(p + 64 * j,
					    _mm512_xor_si512(_mm512_loadu_si512(p + 64 * j), x[j]));
	}
	if (n)
		ctr_blocks_aesni(rkb, prefix, aes_ctr_next(c), p, n);
}

/* VAES: CPUID leaf 7, subleaf 0, ECX bit 9 (asked directly, as ghash.c
 * does for VPCLMULQDQ). */
static bool cpu_has_vaes(void)
{
	unsigned int a, b, c, d;

	return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c & (1u << 9)) &&
	       __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
#endif

static bool has_aesni, has_vaes;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init(void)
{
#ifdef HAVE_X86
	__builtin_cpu_init();
	has_aesni = __builtin_cpu_supports("aes") && __builtin_cpu_supports("ssse3") &&
		    __builtin_cpu_supports("sse4.1");
	has_vaes = has_aesni && cpu_has_vaes();
#endif
}

int devmig_aes256_init_impl(struct devmig_aes256 *a, const uint8_t key[32], int impl)
{
	pthread_once(&once, init);
	memset(a, 0, sizeof(*a));
	if (impl == DEVMIG_IMPL_AUTO)
		impl = has_vaes ? DEVMIG_IMPL_X86_512 : DEVMIG_IMPL_X86;
	if ((impl == DEVMIG_IMPL_X86 && !has_aesni) || (impl == DEVMIG_IMPL_X86_512 && !has_vaes) ||
	    (impl != DEVMIG_IMPL_X86 && impl != DEVMIG_IMPL_X86_512))
		return -ENOTSUP;
#ifdef HAVE_X86
	expand_key(key, a->rk);
#else
	(void)key;
#endif
	a->impl = impl;
	return 0;
}

bool devmig_aes256_available(void)
{
	pthread_once(&once, init);
	return has_aesni;
}

const char *devmig_aes_impl_name(void)
{
	pthread_once(&once, init);
	return has_vaes ? "vaes" : has_aesni ? "aes-ni" : "none";
}

void devmig_aes256_ctr_xor(const struct devmig_aes256 *a, const uint8_t iv[8], uint64_t offset,
			   void *buf, size_t len)
{
#ifdef HAVE_X86
	uint8_t *p = buf, ks[16];
	uint64_t prefix; /* the IV's 8 bytes as they lie in the counter block */
	uint64_t block = offset / 16;
	size_t skip = (size_t)(offset % 16);

	if (!a->impl || !len)
		return;
	memcpy(&prefix, iv, 8);
	if (skip) {
		/* the rest of a block begun before: its keystream whole, then
		 * the bytes from where the offset falls */
		size_t n = 16 - skip < len ? 16 - skip : len;

		memset(ks, 0, sizeof(ks));
		ctr_blocks_aesni(a->rk, prefix, block++, ks, 1);
		for (size_t i = 0; i < n; i++)
			p[i] ^= ks[skip + i];
		p += n;
		len -= n;
	}
	if (len >= 16) {
		if (a->impl == DEVMIG_IMPL_X86_512)
			ctr_blocks_vaes(a->rk, prefix, block, p, len / 16);
		else
			ctr_blocks_aesni(a->rk, prefix, block, p, len / 16);
		block += len / 16;
		p += len / 16 * 16;
		len %= 16;
	}
	if (len) {
		memset(ks, 0, sizeof(ks));
		ctr_blocks_aesni(a->rk, prefix, block, ks, 1);
		for (size_t i = 0; i < len; i++)
			p[i] ^= ks[i];
	}
#else
	(void)a, (void)iv, (void)offset, (void)buf, (void)len;
#endif
}
