/* CRC32C (Castagnoli), the checksum of iSCSI, ext4 and SCTP: reflected
 * polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF.
 *
 * Two implementations give the same results: a portable slicing-by-8
 * (eight 256-entry tables let the loop consume 8 bytes per step), and on
 * x86-64 CPUs with SSE4.2 the CRC32 instruction, which computes exactly
 * this polynomial (Intel SDM, CRC32: "polynomial 11EDC6F41H", the register
 * neither inverted on entry nor on exit). The instruction has a latency of
 * three cycles and a throughput of one, so long buffers are split in three
 * lanes checksummed side by side and then combined (see shift()). With
 * VPCLMULQDQ on AVX-512 long buffers are folded 256 bytes at a time by
 * carry-less multiplication instead (see crc_vpclmul()). The choice is made
 * once, at first use, from the CPU's features. */
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "devmig/stream.h"
#include "internal.h"

static uint32_t table[8][256];
/* Lanes of the interleaved hardware loop, and the operator that moves a
 * CRC register over LANE zero bytes, as four byte-indexed tables. */
#define LANE 2048u
static uint32_t shift_lane[4][256];
static devmig_crc32c_fn best;
static bool has_sse42, has_vpclmul;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* The register (not inverted) after n zero bytes, bytewise: only used to
 * build the shift tables. */
static uint32_t zeros(uint32_t crc, size_t n)
{
	while (n--)
		crc = (crc >> 8) ^ table[0][crc & 0xff];
	return crc;
}

static uint32_t crc_portable(uint32_t crc, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	crc = ~crc;
	while (len && ((uintptr_t)p & 7)) {
		crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
		len--;
	}
	while (len >= 8) {
		uint32_t lo, hi;

		/* Little-endian loads: the reflected CRC consumes the lowest
		 * byte first. */
		lo = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
		hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
		lo ^= crc;
		crc = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^ table[5][(lo >> 16) & 0xff] ^
		      table[4][lo >> 24] ^ table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^
		      table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
		p += 8;
		len -= 8;
	}
	while (len--)
		crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
	return ~crc;
}

#if defined(__x86_64__)
#define HAVE_X86 1
#include <immintrin.h>
#include <nmmintrin.h>

#include "simd_x86.h"

/* x^n mod P, P the CRC32C polynomial in its usual (not reflected) form,
 * x^32 + 0x1EDC6F41. */
static uint32_t xpow_mod(unsigned n)
{
	uint64_t r = 1;

	while (n--) {
		r <<= 1;
		if (r >> 32)
			r ^= 0x11EDC6F41ull;
	}
	return (uint32_t)r;
}

/* A polynomial of degree < 32 as a reflected 64-bit carry-less multiplier:
 * the coefficient of x^d at bit 63 - d, as the data's own bits are laid
 * out (the first bit of the stream is the highest power). */
static uint64_t reflect64(uint32_t poly)
{
	uint64_t r = 0;

	for (int d = 0; d < 32; d++)
		if (poly >> d & 1)
			r |= 1ull << (63 - d);
	return r;
}

/* The CRC register is linear over GF(2) in its starting value: the register
 * after data D from start r is (r moved over |D| zero bytes) xor (the
 * register after D from 0). So three lanes A, B, C of LANE bytes each,
 * run from r, 0 and 0, combine to shift(shift(a) ^ b) ^ c. */
static uint32_t shift(uint32_t crc)
{
	return shift_lane[0][crc & 0xff] ^ shift_lane[1][(crc >> 8) & 0xff] ^
	       shift_lane[2][(crc >> 16) & 0xff] ^ shift_lane[3][crc >> 24];
}

__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t crc, const void *buf,
							    size_t len)
{
	const uint8_t *p = buf;
	uint64_t c0;

	crc = ~crc;
	while (len && ((uintptr_t)p & 7)) {
		crc = _mm_crc32_u8(crc, *p++);
		len--;
	}
	c0 = crc;
	while (len >= 3 * LANE) {
		uint64_t c1 = 0, c2 = 0;

		for (size_t i = 0; i < LANE; i += 8) {
			uint64_t w0, w1, w2;

			memcpy(&w0, p + i, 8);
			memcpy(&w1, p + LANE + i, 8);
			memcpy(&w2, p + 2 * LANE + i, 8);
			c0 = _mm_crc32_u64(c0, w0);
			c1 = _mm_crc32_u64(c1, w1);
			c2 = _mm_crc32_u64(c2, w2);
		}
		c0 = shift(shift((uint32_t)c0) ^ (uint32_t)c1) ^ (uint32_t)c2;
		p += 3 * LANE;
		len -= 3 * LANE;
	}
	while (len >= 8) {
		uint64_t w;

		memcpy(&w, p, 8);
		c0 = _mm_crc32_u64(c0, w);
		p += 8;
		len -= 8;
	}
	crc = (uint32_t)c0;
	while (len--)
		crc = _mm_crc32_u8(crc, *p++);
	return ~crc;
}

/* Folding by carry-less multiplication. Reading the stream's bits as a
 * polynomial whose first bit is the highest power, the CRC (register 0, no
 * inversion) is M(x).x^32 mod P, linear in M. A 16-byte block V = Lo.x^64
 * + Hi (Lo its first eight bytes) moved T bits further down the stream is
 * V.x^T = Lo.x^(64+T) + Hi.x^T, and that is congruent to
 * clmul(Lo, x^(63+T) mod P) ^ clmul(Hi, x^(T-1) mod P): the product of two
 * reflected 64-bit operands comes out as a 128-bit block one power higher,
 * hence the -1. Four 512-bit accumulators hold sixteen blocks (256 bytes);
 * each step moves them 256 bytes on (T = 2048 bits) onto the next 256 bytes
 * of data. What is left at the end is 256 bytes congruent to everything
 * folded so far, placed where the last 256 bytes were: the CRC32
 * instruction finishes them and the tail. The register going in is xored
 * into the first four bytes (the same as starting the register there). */
/* Below this the three-lane CRC32 loop is as fast: the fold's fixed cost
 * (the 256-byte finish, 32 dependent CRC32 steps) needs a few KiB to pay. */
#define FOLD_MIN 2048u
static uint64_t fold_lo, fold_hi; /* x^(63+2048), x^(2048-1) mod P, reflected */

TGT_CRC512 static uint32_t crc_vpclmul(uint32_t crc, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	__m512i a[4];

	if (len < FOLD_MIN)
		return crc_sse42(crc, buf, len);
	const __m512i k = crc_fold_key(fold_lo, fold_hi);

	for (int i = 0; i < 4; i++)
		a[i] = _mm512_loadu_si512((const void *)(p + 64 * i));
	a[0] = _mm512_xor_si512(a[0], _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)~crc)));
	p += CRC_FOLD_BYTES;
	len -= CRC_FOLD_BYTES;
	for (; len >= CRC_FOLD_BYTES; p += CRC_FOLD_BYTES, len -= CRC_FOLD_BYTES)
		for (int i = 0; i < 4; i++)
			a[i] = crc_fold512(a[i], k, _mm512_loadu_si512((const void *)(p + 64 * i)));
	/* The tail, shorter than 256 bytes, from the register so far. */
	return crc_sse42(crc_fold_finish(a), p, len);
}

static void init(void);

void devmig_crc32c_fold_consts(uint64_t *lo, uint64_t *hi)
{
	pthread_once(&init_once, init);
	*lo = fold_lo;
	*hi = fold_hi;
}
#endif

static void init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (c & 1 ? 0x82F63B78u : 0);
		table[0][i] = c;
	}
	/* table[k][i]: the CRC of byte i followed by k zero bytes. */
	for (uint32_t i = 0; i < 256; i++)
		for (int k = 1; k < 8; k++)
			table[k][i] = (table[k - 1][i] >> 8) ^ table[0][table[k - 1][i] & 0xff];
	/* shift_lane: by linearity, from the 32 single-bit registers. */
	uint32_t bit[32];

	for (int b = 0; b < 32; b++)
		bit[b] = zeros(1u << b, LANE);
	for (int k = 0; k < 4; k++)
		for (uint32_t v = 0; v < 256; v++) {
			uint32_t s = 0;

			for (int b = 0; b < 8; b++)
				if (v >> b & 1)
					s ^= bit[8 * k + b];
			shift_lane[k][v] = s;
		}
	best = crc_portable;
#ifdef HAVE_X86
	fold_lo = reflect64(xpow_mod(63 + 8 * CRC_FOLD_BYTES));
	fold_hi = reflect64(xpow_mod(8 * CRC_FOLD_BYTES - 1));
	__builtin_cpu_init();
	has_sse42 = __builtin_cpu_supports("sse4.2");
	has_vpclmul = has_sse42 && __builtin_cpu_supports("pclmul") && devmig_cpu_has_vpclmul512();
	if (has_sse42)
		best = has_vpclmul ? crc_vpclmul : crc_sse42;
#endif
}

devmig_crc32c_fn devmig_crc32c_impl(int impl)
{
	pthread_once(&init_once, init);
	switch (impl) {
	case DEVMIG_IMPL_AUTO:
		return best;
	case DEVMIG_IMPL_PORTABLE:
		return crc_portable;
#ifdef HAVE_X86
	case DEVMIG_IMPL_X86:
		return has_sse42 ? crc_sse42 : NULL;
	case DEVMIG_IMPL_X86_512:
		return has_vpclmul ? crc_vpclmul : NULL;
#endif
	default:
		return NULL;
	}
}

uint32_t devmig_crc32c(uint32_t crc, const void *buf, size_t len)
{
	pthread_once(&init_once, init);
	return best(crc, buf, len);
}
