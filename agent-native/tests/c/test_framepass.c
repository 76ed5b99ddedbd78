/* The one-pass frame code (framepass.c) gives bit for bit what the
 * separate passes (one_pass false: the cipher, CRC32C and MAC functions one
 * after the other, each checked on its own elsewhere) give: the same ciphertext or plaintext, the same CRC32C
 * and the same MAC state afterwards, for every mode, on lengths around the
 * loop's edges (a 1 KiB group, the 4 KiB minimum), at offsets that leave
 * the MAC in the middle of a block, with the counter and the MAC out of
 * step (where the loop must not run), and with a frame split in two. */
#include <stdint.h>

#include "../../src/internal.h" /* devmig_ghash_is_512: says what ran */
#include "check.h"
#include "devmig/stream.h"

#define SEAL DEVMIG_FRAME_SEAL
#define OPEN DEVMIG_FRAME_OPEN
#define MAC DEVMIG_FRAME_MAC

static uint64_t rng = 0x2545f4914f6cdd1dull;

static uint8_t next_byte(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint8_t)(rng >> 32);
}

static const uint8_t iv[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };

static uint32_t one_pass(struct devmig_digest *dg, enum devmig_frame_mode m, uint64_t off, uint32_t crc,
			 uint8_t *b, size_t len)
{
	return devmig_frame_pass(dg, m, iv, off, crc, b, len, true);
}

static uint32_t apart(struct devmig_digest *dg, enum devmig_frame_mode m, uint64_t off, uint32_t crc,
		      uint8_t *b, size_t len)
{
	return devmig_frame_pass(dg, m, iv, off, crc, b, len, false);
}

static void tag(const struct devmig_digest *dg, uint8_t out[16])
{
	struct devmig_mac m = dg->mac; /* a copy: the stream's goes on */

	devmig_mac_final(&m, out);
}

/* pre bytes through the MAC first (a header and earlier frames); the frame
 * at stream offset off, len bytes, whole or cut in two at cut. */
static void check_case(const struct devmig_digest *base, enum devmig_frame_mode m, size_t pre, uint64_t off, size_t len,
		       size_t cut, const uint8_t *src)
{
	struct devmig_digest a = *base, b = *base;
	uint8_t *x = malloc(len + 1), *y = malloc(len + 1), ta[16], tb[16];
	uint32_t ca, cb;

	CHECK(x && y);
	devmig_mac_update(&a.mac, src, pre);
	devmig_mac_update(&b.mac, src, pre);
	memcpy(x, src + pre, len);
	memcpy(y, src + pre, len);
	if (cut && cut < len) {
		ca = one_pass(&a, m, off, 0x1234u, x, cut);
		ca = one_pass(&a, m, off + cut, ca, x + cut, len - cut);
	} else {
		ca = one_pass(&a, m, off, 0x1234u, x, len);
	}
	cb = apart(&b, m, off, 0x1234u, y, len);
	tag(&a, ta);
	tag(&b, tb);
	if (ca != cb || memcmp(x, y, len) != 0 || memcmp(ta, tb, 16) != 0)
		fprintf(stderr, "mode %d pre %zu off %llu len %zu cut %zu: crc %s, bytes %s, mac %s\n", m,
			pre, (unsigned long long)off, len, cut, ca == cb ? "same" : "DIFFER",
			memcmp(x, y, len) ? "DIFFER" : "same", memcmp(ta, tb, 16) ? "DIFFER" : "same");
	CHECK(ca == cb);
	CHECK(memcmp(x, y, len) == 0);
	CHECK(memcmp(ta, tb, 16) == 0);
	CHECK(a.mac.gh.len == b.mac.gh.len && a.mac.gh.fill == b.mac.gh.fill);
	if (m == MAC)
		CHECK(memcmp(x, src + pre, len) == 0); /* read only */
	else if (len >= 16)
		CHECK(memcmp(x, src + pre, len) != 0); /* the cipher ran */
	free(x);
	free(y);
}

int main(void)
{
	const size_t lens[] = { 0,    1,    15,   16,   17,   1023, 1024, 4095, 4096, 4097,
				4111, 5120, 5121, 9216, 9999, 65536 + 7, 1u << 20, (1u << 20) + 13 };
	const size_t pres[] = { 0, 8, 96, 97, 101, 96 + 4096 + 3 };
	const size_t big = (1u << 20) + 13 + 8192;
	uint8_t key[32], nonce[16], *src = malloc(big);
	struct devmig_digest base;

	CHECK(src != NULL);
	if (!src)
		CHECK_DONE();
	for (size_t i = 0; i < big; i++)
		src[i] = next_byte();
	for (int i = 0; i < 32; i++)
		key[i] = next_byte();
	for (int i = 0; i < 16; i++)
		nonce[i] = next_byte();
	memset(&base, 0, sizeof(base));
	CHECK(devmig_mac_init(&base.mac, key, nonce) == 0);
	int aes = devmig_aes256_init_impl(&base.aes, key, DEVMIG_IMPL_AUTO);

	printf("one pass on this CPU: %s (mac only: %s)\n",
	       devmig_ghash_is_512(&base.mac.gh) && base.aes.impl == DEVMIG_IMPL_X86_512 ? "yes" : "no",
	       devmig_ghash_is_512(&base.mac.gh) ? "yes" : "no");
	for (int m = SEAL; m <= MAC; m++) {
		if (m != MAC && aes != 0) {
			printf("no AES-NI: the sealed modes are not checked\n");
			continue;
		}
		for (size_t i = 0; i < sizeof(pres) / sizeof(pres[0]); i++)
			for (size_t j = 0; j < sizeof(lens) / sizeof(lens[0]); j++) {
				/* The stream's own relation (the MAC began with a
				 * 96-byte header: its block and the counter's
				 * agree), and the counter one byte out of step. */
				uint64_t off = pres[i] >= 96 ? pres[i] - 96 : pres[i];

				check_case(&base, (enum devmig_frame_mode)m, pres[i], off, lens[j], 0, src);
				check_case(&base, (enum devmig_frame_mode)m, pres[i], off + 1, lens[j], 0, src);
				check_case(&base, (enum devmig_frame_mode)m, pres[i], off, lens[j], lens[j] / 3, src);
				check_case(&base, (enum devmig_frame_mode)m, pres[i], off, lens[j], 4099, src);
			}
	}
	/* The separate passes are the three functions one after the other
	 * (each checked against standard vectors or OpenSSL in test_crypto.c and
	 * test_native_checksums.py). */
	if (aes == 0) {
		struct devmig_digest s = base, r = base;
		size_t len = 70000;
		uint8_t *x = malloc(len), *y = malloc(len), ts[16], tr[16];

		CHECK(x && y);
		memcpy(x, src, len);
		memcpy(y, src, len);
		uint32_t cs = apart(&s, SEAL, 96, 7, x, len);

		devmig_aes256_ctr_xor(&r.aes, iv, 96, y, len);
		uint32_t cr = devmig_crc32c(7, y, len);

		devmig_mac_update(&r.mac, y, len);
		tag(&s, ts);
		tag(&r, tr);
		CHECK(cs == cr && memcmp(x, y, len) == 0 && memcmp(ts, tr, 16) == 0);
		free(x);
		free(y);
	}
	/* Sealing then opening gives the plaintext back, with the same CRC
	 * and MAC at both ends. */
	if (aes == 0) {
		struct devmig_digest s = base, o = base;
		size_t len = (1u << 20) + 13;
		uint8_t *x = malloc(len), ts[16], to[16];

		CHECK(x != NULL);
		memcpy(x, src, len);
		uint32_t cs = devmig_frame_pass(&s, SEAL, iv, 0, 0, x, len, true);
		uint32_t co = devmig_frame_pass(&o, OPEN, iv, 0, 0, x, len, true);

		tag(&s, ts);
		tag(&o, to);
		CHECK(cs == co);
		CHECK(memcmp(ts, to, 16) == 0);
		CHECK(memcmp(x, src, len) == 0);
		free(x);
	}
	free(src);
	CHECK_DONE();
}
