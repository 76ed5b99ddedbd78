/* Every implementation of CRC32C and SHA-256 against the standard vectors
 * and against each other on pseudo-random buffers of many lengths and
 * alignments, whole and in pieces. The CPU's own implementations (SSE4.2
 * crc32, SHA extensions) are checked when this CPU has them; the test says
 * which it could check. */
#include <errno.h>
#include <stdint.h>

#include "check.h"
#include "devmig/stream.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static uint32_t crc_bitwise(const uint8_t *p, size_t len)
{
	uint32_t c = 0xffffffffu;

	while (len--) {
		c ^= *p++;
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (c & 1 ? 0x82F63B78u : 0);
	}
	return ~c;
}

static void sha(int impl, const void *msg, size_t len, size_t piece, uint8_t out[32])
{
	struct devmig_sha256 s;
	const uint8_t *p = msg;

	CHECK(devmig_sha256_init_impl(&s, impl) == 0);
	while (len) {
		size_t n = piece && piece < len ? piece : len;

		devmig_sha256_update(&s, p, n);
		p += n;
		len -= n;
	}
	devmig_sha256_final(&s, out);
}

static int sha_is(int impl, const void *msg, size_t len, const char *hex)
{
	uint8_t out[32];
	char got[65];

	sha(impl, msg, len, 0, out);
	for (int i = 0; i < 32; i++)
		snprintf(got + 2 * i, 3, "%02x", out[i]);
	if (strcmp(got, hex) != 0)
		fprintf(stderr, "impl %d: sha256 got %s want %s\n", impl, got, hex);
	return strcmp(got, hex) == 0;
}

static void check_crc(int impl, devmig_crc32c_fn f, const uint8_t *big, size_t big_len)
{
	uint8_t z[32] = { 0 };

	CHECK(f(0, "123456789", 9) == 0xE3069283u);
	CHECK(f(0, z, 32) == 0x8A9136AAu);
	CHECK(f(0, z, 0) == 0);
	CHECK(f(f(0, "12345", 5), "6789", 4) == 0xE3069283u);
	/* Short buffers at every alignment against the bitwise definition. */
	for (size_t off = 0; off < 9; off++)
		for (size_t len = 0; len < 200; len += 7)
			CHECK(f(0, big + off, len) == crc_bitwise(big + off, len));
	/* Long buffers (around and across the three-lane blocks) against the
	 * portable implementation, whole and continued at odd points. */
	devmig_crc32c_fn ref = devmig_crc32c_impl(DEVMIG_IMPL_PORTABLE);
	for (int i = 0; i < 200; i++) {
		size_t off = (size_t)(next() % 64);
		size_t len = i < 100 ? (size_t)(next() % 20000) : (size_t)(next() % (big_len - off));
		size_t cut = len ? (size_t)(next() % len) : 0;
		uint32_t want = ref(0, big + off, len);

		CHECK(f(0, big + off, len) == want);
		CHECK(f(f(0, big + off, cut), big + off + cut, len - cut) == want);
		if (f(0, big + off, len) != want)
			fprintf(stderr, "impl %d: crc of %zu bytes at %zu differs\n", impl, len, off);
	}
	/* Every length around the folded path's threshold (2048) and its
	 * 256-byte steps, from a register that is not zero. */
	for (size_t len = 1800; len < 2900; len++) {
		uint32_t want = ref(0x12345678u, big + 3, len);

		CHECK(f(0x12345678u, big + 3, len) == want);
	}
	CHECK(f(0, big, big_len) == crc_bitwise(big, big_len));
}

static void check_sha(int impl, const uint8_t *big, size_t big_len)
{
	const char *m2 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
	const char *m4 = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
			 "ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
	uint8_t a[1000], o1[32], o2[32];

	CHECK(sha_is(impl, "abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
	CHECK(sha_is(impl, "", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
	CHECK(sha_is(impl, m2, strlen(m2),
		     "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
	CHECK(sha_is(impl, m4, strlen(m4),
		     "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"));
	/* One million 'a', in pieces of 1000. */
	struct devmig_sha256 s;
	memset(a, 'a', sizeof(a));
	CHECK(devmig_sha256_init_impl(&s, impl) == 0);
	for (int i = 0; i < 1000; i++)
		devmig_sha256_update(&s, a, sizeof(a));
	devmig_sha256_final(&s, o1);
	static const uint8_t million_a[32] = {
		0xcd, 0xc7, 0x6e, 0x5c, 0x99, 0x14, 0xfb, 0x92, 0x81, 0xa1, 0xc7,
		0xe2, 0x84, 0xd7, 0x3e, 0x67, 0xf1, 0x80, 0x9a, 0x48, 0xa4, 0x97,
		0x20, 0x0e, 0x04, 0x6d, 0x39, 0xcc, 0xc7, 0x11, 0x2c, 0xd0,
	};
	CHECK(memcmp(o1, million_a, 32) == 0);
	/* Against the portable implementation: many lengths (the padding
	 * boundaries among them), whole and in uneven pieces. */
	for (int i = 0; i < 300; i++) {
		size_t off = (size_t)(next() % 64);
		size_t len = i < 130 ? (size_t)i : (size_t)(next() % (big_len - off));
		size_t piece = (size_t)(next() % 300);

		sha(DEVMIG_IMPL_PORTABLE, big + off, len, 0, o1);
		sha(impl, big + off, len, piece, o2);
		CHECK(memcmp(o1, o2, 32) == 0);
	}
}

int main(void)
{
	size_t big_len = 3u << 20;
	uint8_t *big = malloc(big_len);
	int impls[] = { DEVMIG_IMPL_AUTO, DEVMIG_IMPL_PORTABLE, DEVMIG_IMPL_X86, DEVMIG_IMPL_X86_512 };
	struct devmig_sha256 s;

	CHECK(big != NULL);
	if (!big)
		CHECK_DONE();
	for (size_t i = 0; i < big_len; i += 8) {
		uint64_t v = next();

		memcpy(big + i, &v, 8);
	}
	printf("auto: %s\n", devmig_crypto_impls());
	/* The portable ones exist everywhere; an unknown one nowhere. */
	CHECK(devmig_crc32c_impl(DEVMIG_IMPL_PORTABLE) != NULL);
	CHECK(devmig_crc32c_impl(99) == NULL);
	CHECK(devmig_sha256_init_impl(&s, 99) == -ENOTSUP);
	for (size_t i = 0; i < sizeof(impls) / sizeof(impls[0]); i++) {
		devmig_crc32c_fn f = devmig_crc32c_impl(impls[i]);

		if (f) {
			check_crc(impls[i], f, big, big_len);
			printf("crc32c impl %d checked\n", impls[i]);
		} else {
			printf("crc32c impl %d not on this CPU\n", impls[i]);
		}
		if (devmig_sha256_init_impl(&s, impls[i]) == 0) {
			check_sha(impls[i], big, big_len);
			printf("sha256 impl %d checked\n", impls[i]);
		} else {
			printf("sha256 impl %d not on this CPU\n", impls[i]);
		}
	}
	/* The default is the CPU's fastest when it has one. */
	if (devmig_crc32c_impl(DEVMIG_IMPL_X86_512))
		CHECK(devmig_crc32c_impl(DEVMIG_IMPL_AUTO) == devmig_crc32c_impl(DEVMIG_IMPL_X86_512));
	else if (devmig_crc32c_impl(DEVMIG_IMPL_X86))
		CHECK(devmig_crc32c_impl(DEVMIG_IMPL_AUTO) == devmig_crc32c_impl(DEVMIG_IMPL_X86));
	free(big);
	CHECK_DONE();
}
