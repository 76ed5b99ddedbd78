/* The simulated device's digest: not cryptographic (the stream's MAC
 * guards the wire); it catches a device loading the wrong bytes, at the
 * wrong place, or a page at the wrong index, and it must cost little next
 * to moving the bytes, since a simulated device in a benchmark stands for
 * hardware that checks its state on its own time.
 *
 * Eight 64-bit lanes, 64 bytes per step. Word i of step b (w) goes into
 * lane i as  acc_i += lo32(x) * hi32(x) + w,  x = w ^ key_i(b), where
 * key_i(b) = K_i + b * STEP: the product depends on where the word is (two
 * equal words at different places mix differently, so swapped blocks
 * change the digest), the added word keeps every bit of it (the product
 * alone loses words whose half is zero). A word changed from w to w' goes
 * unseen only if the products differ by exactly w - w' (mod 2^64). The
 * lanes are folded into one value at the end, with the few bytes past the
 * last whole step. This is the multiply-accumulate shape of fast
 * non-cryptographic hashes (32 x 32 -> 64-bit multiplies, which every
 * vector unit has), so the AVX-512 form below runs at memory speed.
 *
 * Both forms compute exactly the same value (tests compare them); the
 * AVX-512 one is chosen at first use where the CPU has it. */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "devmig/sim.h"
#include "devmig/stream.h"
#include "sim_digest.h"

#define LANES 8
#define STEP_BYTES 64u
/* Per-lane keys: odd multiples of 2^64 / golden ratio (distinct, odd,
 * with bits spread over the whole word). */
#define KEY_BASE 0x9e3779b97f4a7c15ull
/* Added to every lane's key per step: an odd constant with mixed bits
 * (splitmix64's first multiplier), so keys never repeat within 2^64 steps. */
#define KEY_STEP 0xbf58476d1ce4e5b9ull

uint64_t sim_digest_fold(uint64_t h, uint64_t w)
{
	return (((h << 23) | (h >> 41)) ^ w) * KEY_BASE;
}

/* The lanes, then the bytes past the last whole step and their count, into
 * one value. */
static uint64_t finish(const uint64_t acc[LANES], const uint8_t *tail, size_t n)
{
	uint64_t h = 0, w;
	size_t i = 0;

	for (int l = 0; l < LANES; l++)
		h = sim_digest_fold(h, acc[l]);
	for (; i + 8 <= n; i += 8) {
		memcpy(&w, tail + i, 8);
		h = sim_digest_fold(h, w);
	}
	if (i < n) {
		w = 0;
		memcpy(&w, tail + i, n - i);
		h = sim_digest_fold(h, w ^ (uint64_t)(n - i) << 56);
	}
	return sim_digest_fold(h, (uint64_t)n);
}

static uint64_t digest_portable(void *dst, const void *src, size_t len, uint64_t h)
{
	const uint8_t *p = src;
	uint8_t *q = dst;
	uint64_t acc[LANES], key[LANES];
	size_t steps = len / STEP_BYTES;

	for (int l = 0; l < LANES; l++) {
		key[l] = KEY_BASE * (2 * (uint64_t)l + 1);
		acc[l] = h ^ key[l];
	}
	for (size_t b = 0; b < steps; b++, p += STEP_BYTES) {
		if (q) {
			memcpy(q, p, STEP_BYTES);
			q += STEP_BYTES;
		}
		for (int l = 0; l < LANES; l++) {
			uint64_t w, x;

			memcpy(&w, p + 8 * l, 8);
			x = w ^ key[l];
			acc[l] += (x & 0xffffffffu) * (x >> 32) + w;
			key[l] += KEY_STEP;
		}
	}
	if (q && len % STEP_BYTES)
		memcpy(q, p, len % STEP_BYTES);
	return finish(acc, p, len % STEP_BYTES);
}

#if defined(__x86_64__)
#define HAVE_X86 1
#include <immintrin.h>

__attribute__((target("avx512f"))) static uint64_t digest_512(void *dst, const void *src,
							      size_t len, uint64_t h)
{
	const uint8_t *p = src;
	uint8_t *q = dst;
	uint64_t acc_out[LANES], k0[LANES];
	size_t steps = len / STEP_BYTES;

	for (int l = 0; l < LANES; l++)
		k0[l] = KEY_BASE * (2 * (uint64_t)l + 1);
	__m512i key = _mm512_loadu_si512((const void *)k0);
	__m512i acc = _mm512_xor_si512(_mm512_set1_epi64((long long)h), key);
	const __m512i step = _mm512_set1_epi64((long long)KEY_STEP);

	for (size_t b = 0; b < steps; b++, p += STEP_BYTES) {
		__m512i w = _mm512_loadu_si512((const void *)p);
		__m512i x = _mm512_xor_si512(w, key);

		if (q) {
			_mm512_stream_si512((void *)q, w);
			q += STEP_BYTES;
		}
		/* VPMULUDQ: the low 32 bits of each lane times those of the
		 * other operand, which holds each lane's high half. */
		acc = _mm512_add_epi64(acc, _mm512_add_epi64(_mm512_mul_epu32(x, _mm512_srli_epi64(x, 32)), w));
		key = _mm512_add_epi64(key, step);
	}
	if (q && len % STEP_BYTES)
		memcpy(q, p, len % STEP_BYTES);
	_mm512_storeu_si512((void *)acc_out, acc);
	return finish(acc_out, p, len % STEP_BYTES);
}
#endif

typedef uint64_t (*digest_fn)(void *, const void *, size_t, uint64_t);
static digest_fn best = digest_portable;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init(void)
{
#ifdef HAVE_X86
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx512f"))
		best = digest_512;
#endif
}

uint64_t sim_digest_copy(void *dst, const void *src, size_t len, uint64_t h)
{
	pthread_once(&once, init);
	return best(dst, src, len, h);
}

void sim_digest_fence(void)
{
#ifdef HAVE_X86
	/* Streaming stores are weakly ordered: fence them once per batch, not
	 * per page (each fence waits for them to reach memory). */
	_mm_sfence();
#endif
}

int devmig_sim_digest_impl(int impl, void *dst, const void *src, size_t len, uint64_t *out)
{
	pthread_once(&once, init);
	switch (impl) {
	case DEVMIG_IMPL_AUTO:
		*out = best(dst, src, len, 0);
		sim_digest_fence();
		return 0;
	case DEVMIG_IMPL_PORTABLE:
		*out = digest_portable(dst, src, len, 0);
		return 0;
#ifdef HAVE_X86
	case DEVMIG_IMPL_X86_512:
		if (best != digest_512)
			return -ENOTSUP;
		*out = digest_512(dst, src, len, 0);
		sim_digest_fence();
		return 0;
#endif
	default:
		return -ENOTSUP;
	}
}
