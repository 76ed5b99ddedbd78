/* libFuzzer target: the devmig stream decoder (src/stream.c).
 *
 * Input: one control byte, then the stream. Random bytes almost never pass
 * a CRC32C, which would keep the fuzzer at the header; so the control
 * byte's low bits ask the harness to repair what a checksum would refuse,
 * letting mutations reach the checks behind it:
 *   bit 0  recompute the header's and every frame's CRC32C
 *   bit 1  renumber the frames 0, 1, 2, ... (reach the trailer)
 *   bit 2  rewrite a trailer's length and SHA-256 to match the payload
 * and bits 3..7 pick how the bytes are split across feed calls (the
 * decoder must give the same answer for any split).
 *
 * Checked: no crash, leak or undefined behaviour (the sanitizers); the
 * verdict does not depend on the split; an accepted stream's payload is
 * exactly what its trailer covers. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "devmig/stream.h"

#define HDR DEVMIG_STREAM_HEADER_LEN
#define FH DEVMIG_STREAM_FRAME_HDR_LEN

static uint32_t rd32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return v;
}

static void wr32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, 4);
}

static void wr64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, 8);
}

static void repair(uint8_t *s, size_t n, unsigned how)
{
	struct devmig_sha256 sha;
	uint64_t total = 0, seq = 0;
	size_t o = HDR;

	if (n < HDR)
		return;
	if (how & 1)
		wr32(s + HDR - 4, devmig_crc32c(0, s, HDR - 4));
	devmig_sha256_init(&sha);
	while (o + FH <= n) {
		uint32_t type = rd32(s + o), len = rd32(s + o + 4);

		if (len > DEVMIG_STREAM_MAX_FRAME || o + FH + len > n)
			break;
		if (how & 2)
			wr64(s + o + 8, seq++);
		if ((how & 4) && type == 2 && len == DEVMIG_STREAM_TRAILER_LEN) {
			wr64(s + o + FH, total);
			devmig_sha256_final(&sha, s + o + FH + 8);
			devmig_sha256_init(&sha);
		} else if (type == 1) {
			devmig_sha256_update(&sha, s + o + FH, len);
			total += len;
		}
		if (how & 1)
			wr32(s + o + 16, devmig_crc32c(devmig_crc32c(0, s + o, 16), s + o + FH, len));
		o += FH + len;
	}
}

struct count {
	uint64_t bytes;
};

static int sink(void *ctx, const void *buf, size_t len)
{
	(void)buf;
	((struct count *)ctx)->bytes += len;
	return 0;
}

/* Decode s in pieces of `step` bytes (0: all at once); returns the verdict. */
static int decode(const uint8_t *s, size_t n, size_t step, uint64_t *payload)
{
	struct devmig_stream_dec *dec;
	struct count c = { 0 };
	int r = devmig_stream_dec_new(NULL, sink, &c, &dec);

	if (r < 0)
		abort();
	for (size_t o = 0; o < n && r == 0;) {
		size_t k = step && step < n - o ? step : n - o;

		r = devmig_stream_dec_feed(dec, s + o, k);
		o += k;
	}
	if (r == 0)
		r = devmig_stream_dec_finish(dec);
	if (r == 0 && devmig_stream_dec_payload_bytes(dec) != c.bytes)
		abort(); /* accepted, but the payload handed on is not what was verified */
	*payload = c.bytes;
	devmig_stream_dec_free(dec);
	return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint64_t p1, p2;
	uint8_t *s;
	int r1, r2;

	if (size < 1)
		return 0;
	s = malloc(size);
	if (!s)
		return 0;
	memcpy(s, data + 1, size - 1);
	repair(s, size - 1, data[0] & 7);
	r1 = decode(s, size - 1, 0, &p1);
	r2 = decode(s, size - 1, (size_t)(data[0] >> 3) + 1, &p2);
	/* Refusal codes may differ by split only in when they are seen, never
	 * in whether the stream is accepted. */
	if ((r1 == 0) != (r2 == 0) || (r1 == 0 && p1 != p2))
		abort();
	free(s);
	return 0;
}
