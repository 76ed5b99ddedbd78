/* CRC32C and SHA-256 against their standard test vectors (RFC 3720 B.4
 * for CRC32C; FIPS 180-4 examples for SHA-256), and the slicing path
 * against a bytewise reference at every alignment and length. */
#include "check.h"
#include "devmig/stream.h"

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

static int sha_is(const void *msg, size_t len, const char *hex)
{
	struct devmig_sha256 s;
	uint8_t out[32];
	char got[65];

	devmig_sha256_init(&s);
	devmig_sha256_update(&s, msg, len);
	devmig_sha256_final(&s, out);
	for (int i = 0; i < 32; i++)
		snprintf(got + 2 * i, 3, "%02x", out[i]);
	if (strcmp(got, hex) != 0)
		fprintf(stderr, "sha256 got %s want %s\n", got, hex);
	return strcmp(got, hex) == 0;
}

int main(void)
{
	uint8_t b[300];

	CHECK(devmig_crc32c(0, "123456789", 9) == 0xE3069283u);
	memset(b, 0, 32);
	CHECK(devmig_crc32c(0, b, 32) == 0x8A9136AAu);
	memset(b, 0xff, 32);
	CHECK(devmig_crc32c(0, b, 32) == 0x62A8AB43u);
	for (int i = 0; i < 32; i++)
		b[i] = (uint8_t)i;
	CHECK(devmig_crc32c(0, b, 32) == 0x46DD794Eu);
	CHECK(devmig_crc32c(0, b, 0) == 0);
	/* Continuation equals one pass. */
	CHECK(devmig_crc32c(devmig_crc32c(0, "12345", 5), "6789", 4) == 0xE3069283u);
	for (int i = 0; i < 300; i++)
		b[i] = (uint8_t)(i * 7 + 3);
	for (size_t off = 0; off < 9; off++)
		for (size_t len = 0; len + off <= 300; len += 13)
			CHECK(devmig_crc32c(0, b + off, len) == crc_bitwise(b + off, len));

	CHECK(sha_is("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
	CHECK(sha_is("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
	const char *m2 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
	CHECK(sha_is(m2, strlen(m2), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
	/* One million 'a', fed in uneven pieces to exercise the buffering. */
	struct devmig_sha256 s;
	uint8_t out[32], a[1000];
	memset(a, 'a', sizeof(a));
	devmig_sha256_init(&s);
	for (size_t done = 0, step = 1; done < 1000000; step = step % 997 + 1) {
		size_t n = 1000000 - done < step ? 1000000 - done : step;

		devmig_sha256_update(&s, a, n);
		done += n;
	}
	devmig_sha256_final(&s, out);
	CHECK(out[0] == 0xcd && out[1] == 0xc7 && out[30] == 0x2c && out[31] == 0xd0);
	/* Lengths around the padding boundary (55, 56, 63, 64 bytes) agree
	 * between one update and byte-by-byte updates. */
	for (size_t len = 50; len <= 70; len++) {
		uint8_t o1[32], o2[32];

		devmig_sha256_init(&s);
		devmig_sha256_update(&s, b, len);
		devmig_sha256_final(&s, o1);
		devmig_sha256_init(&s);
		for (size_t i = 0; i < len; i++)
			devmig_sha256_update(&s, b + i, 1);
		devmig_sha256_final(&s, o2);
		CHECK(memcmp(o1, o2, 32) == 0);
	}
	CHECK(sha_is(b, 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
	CHECK_DONE();
}
