/* SHA-256 as FIPS 180-4 defines it (§4.1.2 functions, §4.2.2 constants,
 * §5.1.1 padding, §6.2 computation). */
#include <pthread.h>
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

static void block(struct devmig_sha256 *s, const uint8_t *b)
{
	uint32_t w[64], a, bb, c, d, e, f, g, h;

	for (int t = 0; t < 16; t++)
		w[t] = (uint32_t)b[4 * t] << 24 | (uint32_t)b[4 * t + 1] << 16 |
		       (uint32_t)b[4 * t + 2] << 8 | b[4 * t + 3];
	for (int t = 16; t < 64; t++) {
		uint32_t s0 = ror(w[t - 15], 7) ^ ror(w[t - 15], 18) ^ (w[t - 15] >> 3);
		uint32_t s1 = ror(w[t - 2], 17) ^ ror(w[t - 2], 19) ^ (w[t - 2] >> 10);

		w[t] = w[t - 16] + s0 + w[t - 7] + s1;
	}
	a = s->h[0], bb = s->h[1], c = s->h[2], d = s->h[3];
	e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
	for (int t = 0; t < 64; t++) {
		uint32_t t1 = h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[t] + w[t];
		uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & bb) ^ (a & c) ^ (bb & c));

		h = g, g = f, f = e, e = d + t1;
		d = c, c = bb, bb = a, a = t1 + t2;
	}
	s->h[0] += a, s->h[1] += bb, s->h[2] += c, s->h[3] += d;
	s->h[4] += e, s->h[5] += f, s->h[6] += g, s->h[7] += h;
}

void devmig_sha256_init(struct devmig_sha256 *s)
{
	pthread_once(&consts_once, build_consts);
	memcpy(s->h, H0, sizeof(H0));
	s->len = 0;
	s->fill = 0;
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
		block(s, s->buf);
		s->fill = 0;
	}
	for (; len >= 64; p += 64, len -= 64)
		block(s, p);
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
		block(s, s->buf);
		s->fill = 0;
	}
	memset(s->buf + s->fill, 0, 56 - s->fill);
	for (int i = 0; i < 8; i++)
		s->buf[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
	block(s, s->buf);
	for (int i = 0; i < 8; i++) {
		out[4 * i] = (uint8_t)(s->h[i] >> 24);
		out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
		out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
		out[4 * i + 3] = (uint8_t)s->h[i];
	}
}
