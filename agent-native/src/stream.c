/* The devmig stream (include/devmig/stream.h): encoder, incremental
 * decoder, and the save/load paths between a device and a file or socket. */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "devmig/stream.h"
#include "internal.h"

static const uint8_t MAGIC[8] = { 'D', 'E', 'V', 'M', 'I', 'G', 'S', 'T' };
#define TYPE_DATA 1u
#define TYPE_TRAILER 2u

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}
static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}
static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p)
{
	return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Header layout: magic 0..8, version 8..10, header length 10..12,
 * vendor 12..14, device 14..16, driver 16..48, expected size 48..56,
 * digest 56..58, reserved 58..60, MAC nonce 60..76 (zero for SHA-256),
 * key check 76..92 (sealed streams; zero otherwise), CRC32C of bytes 0..92
 * at 92..96. */
#define H_DIGEST 56
#define H_NONCE 60
#define H_KEYCHECK 76
#define H_CRC 92

/* ---- the trailer's digest ---- */

static void dg_sha(struct devmig_digest *g)
{
	g->kind = DEVMIG_DIGEST_SHA256;
	devmig_sha256_init(&g->sha);
}

/* The cipher key of a sealed stream: HMAC-SHA-256(key, label || nonce),
 * fresh with every stream's nonce (so the counter may start at 0 and the IV
 * be zero), and apart from the MAC's one-time key by its label. */
#define SEAL_LABEL "devmig stream enc v1"
static const uint8_t seal_iv[8];
/* A sealed stream's header carries the first 16 bytes of
 * HMAC-SHA-256(key, label || nonce): a receiver holding another key refuses
 * the stream at its header, before any payload (which it would decrypt to
 * noise) reaches the device. It tells nothing of the key. */
#define CHECK_LABEL "devmig stream key check v1"

static void key_check(const uint8_t *key, const uint8_t *nonce, uint8_t out[16])
{
	uint8_t msg[sizeof(CHECK_LABEL) - 1 + 16], mac[32];

	memcpy(msg, CHECK_LABEL, sizeof(CHECK_LABEL) - 1);
	memcpy(msg + sizeof(CHECK_LABEL) - 1, nonce, 16);
	devmig_hmac_sha256(key, DEVMIG_STREAM_KEY_LEN, msg, sizeof(msg), mac);
	memcpy(out, mac, 16);
}

/* The MAC covers the header too (all of it, nonce and CRC included), so a
 * header changed on the wire fails the stream even with its CRC fixed.
 * kind: DEVMIG_DIGEST_MAC or DEVMIG_DIGEST_SEALED. */
static int dg_keyed(struct devmig_digest *g, const uint8_t *key, const uint8_t *hdr, int kind)
{
	int r = devmig_mac_init(&g->mac, key, hdr + H_NONCE);

	if (r < 0)
		return r;
	if (kind == DEVMIG_DIGEST_SEALED) {
		uint8_t msg[sizeof(SEAL_LABEL) - 1 + 16], k[32];

		memcpy(msg, SEAL_LABEL, sizeof(SEAL_LABEL) - 1);
		memcpy(msg + sizeof(SEAL_LABEL) - 1, hdr + H_NONCE, 16);
		devmig_hmac_sha256(key, DEVMIG_STREAM_KEY_LEN, msg, sizeof(msg), k);
		r = devmig_aes256_init_impl(&g->aes, k, DEVMIG_IMPL_AUTO);
		memset(k, 0, sizeof(k));
		if (r < 0)
			return r;
	}
	g->kind = kind;
	devmig_mac_update(&g->mac, hdr, DEVMIG_STREAM_HEADER_LEN);
	return 0;
}

/* A data frame's payload through the stream's sums, its CRC32C continued
 * from crc (the frame header's) and returned: the MAC (and, sealed, the
 * cipher: encrypting before the sums, or after them when opening) in one
 * pass where the CPU allows (framepass.c), or SHA-256. */
static uint32_t sum_payload(struct devmig_digest *g, bool opening, uint64_t offset, uint32_t crc,
			    uint8_t *buf, size_t len)
{
	if (g->kind == DEVMIG_DIGEST_SEALED)
		return devmig_frame_pass(g, opening ? DEVMIG_FRAME_OPEN : DEVMIG_FRAME_SEAL, seal_iv,
					 offset, crc, buf, len, true);
	if (g->kind == DEVMIG_DIGEST_MAC)
		return devmig_frame_pass(g, DEVMIG_FRAME_MAC, NULL, 0, crc, buf, len, true);
	devmig_sha256_update(&g->sha, buf, len);
	return devmig_crc32c(crc, buf, len);
}

/* The trailer's 32 digest bytes. */
static void dg_final(struct devmig_digest *g, uint8_t out[32])
{
	if (g->kind != DEVMIG_DIGEST_SHA256) {
		memset(out, 0, 32);
		devmig_mac_final(&g->mac, out);
	} else {
		devmig_sha256_final(&g->sha, out);
	}
}

/* Equal or not, in time independent of where they differ: a MAC check
 * must not tell an attacker how many of its bytes were right. */
static bool equal_ct(const uint8_t *a, const uint8_t *b, size_t n)
{
	uint8_t d = 0;

	for (size_t i = 0; i < n; i++)
		d |= a[i] ^ b[i];
	return d == 0;
}

int devmig_fd_write_all(void *ctx, const void *buf, size_t len)
{
	int fd = *(int *)ctx;
	const uint8_t *p = buf;

	bool sock = true;

	while (len) {
		/* On a socket, send() with MSG_NOSIGNAL: a peer that went away
		 * is an EPIPE to handle, not a SIGPIPE that kills the agent. */
		ssize_t n = sock ? send(fd, p, len, MSG_NOSIGNAL) : write(fd, p, len);

		if (n < 0 && sock && errno == ENOTSOCK) {
			sock = false;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* As devmig_fd_write_all for an iovec array (modified as it goes). */
int devmig_fd_writev_all(int fd, struct iovec *iov, int cnt)
{
	bool sock = true;

	while (cnt) {
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)cnt };
		ssize_t n = sock ? sendmsg(fd, &mh, MSG_NOSIGNAL) : writev(fd, iov, cnt);

		if (n < 0 && sock && errno == ENOTSOCK) {
			sock = false;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		size_t k = (size_t)n;

		for (; cnt && k >= iov->iov_len; cnt--, iov++)
			k -= iov->iov_len;
		if (cnt) { /* the rest of a partly written entry */
			iov->iov_base = (uint8_t *)iov->iov_base + k;
			iov->iov_len -= k;
		}
	}
	return 0;
}

int devmig_stream_enc_begin(struct devmig_stream_enc *e, const struct devmig_dev_desc *desc,
			    uint64_t expected_size, devmig_write_fn out, void *ctx)
{
	return devmig_stream_enc_begin_keyed(e, desc, expected_size, NULL, out, ctx);
}

static int enc_begin(struct devmig_stream_enc *e, const struct devmig_dev_desc *desc,
		     uint64_t expected_size, const uint8_t *key, int kind, devmig_write_fn out,
		     void *ctx)
{
	uint8_t h[DEVMIG_STREAM_HEADER_LEN] = { 0 };
	int r;

	memset(e, 0, sizeof(*e));
	e->out = out;
	e->ctx = ctx;
	memcpy(h, MAGIC, 8);
	put16(h + 8, DEVMIG_STREAM_VERSION);
	put16(h + 10, DEVMIG_STREAM_HEADER_LEN);
	put16(h + 12, desc->vendor_id);
	put16(h + 14, desc->device_id);
	memcpy(h + 16, desc->driver, strnlen(desc->driver, sizeof(desc->driver) - 1));
	put64(h + 48, expected_size);
	put16(h + H_DIGEST, (uint16_t)kind);
	/* A fresh nonce per stream: the MAC's one-time key must never serve
	 * two streams (the same session may stream again after a failure). */
	if (key && getrandom(h + H_NONCE, 16, 0) != 16)
		return -EIO;
	if (kind == DEVMIG_DIGEST_SEALED)
		key_check(key, h + H_NONCE, h + H_KEYCHECK);
	put32(h + H_CRC, devmig_crc32c(0, h, H_CRC));
	if (key) {
		r = dg_keyed(&e->dg, key, h, kind);
		if (r < 0)
			return r;
	} else {
		dg_sha(&e->dg);
	}
	return out(ctx, h, sizeof(h));
}

int devmig_stream_enc_begin_keyed(struct devmig_stream_enc *e, const struct devmig_dev_desc *desc,
				  uint64_t expected_size, const uint8_t *key, devmig_write_fn out,
				  void *ctx)
{
	return enc_begin(e, desc, expected_size, key,
			 key ? DEVMIG_DIGEST_MAC : DEVMIG_DIGEST_SHA256, out, ctx);
}

int devmig_stream_enc_begin_sealed(struct devmig_stream_enc *e, const struct devmig_dev_desc *desc,
				   uint64_t expected_size, const uint8_t *key, devmig_write_fn out,
				   void *ctx)
{
	if (!key)
		return -EINVAL;
	return enc_begin(e, desc, expected_size, key, DEVMIG_DIGEST_SEALED, out, ctx);
}

static void frame_head(const struct devmig_stream_enc *e, uint32_t type, size_t len,
		       uint8_t fh[DEVMIG_STREAM_FRAME_HDR_LEN])
{
	put32(fh, type);
	put32(fh + 4, (uint32_t)len);
	put64(fh + 8, e->seq);
}

/* The frame (its header's CRC filled in) to the sink. */
static int send_frame(struct devmig_stream_enc *e, uint8_t fh[DEVMIG_STREAM_FRAME_HDR_LEN],
		      const void *buf, size_t len)
{
	int r;

	if (e->out == devmig_fd_write_all) {
		/* One system call for the frame, its header straight from
		 * the stack and its payload from the caller's buffer. */
		struct iovec iov[2] = { { fh, DEVMIG_STREAM_FRAME_HDR_LEN },
					{ (void *)(uintptr_t)buf, len } };

		r = devmig_fd_writev_all(*(int *)e->ctx, iov, len ? 2 : 1);
	} else {
		r = e->out(e->ctx, fh, DEVMIG_STREAM_FRAME_HDR_LEN);
		if (r == 0 && len)
			r = e->out(e->ctx, buf, len);
	}
	if (r == 0)
		e->seq++;
	return r;
}

static int enc_data(struct devmig_stream_enc *e, uint8_t *mut, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	if (e->done || (e->dg.kind == DEVMIG_DIGEST_SEALED && !mut))
		return -EINVAL;
	while (len) {
		size_t n = len < DEVMIG_STREAM_MAX_FRAME ? len : DEVMIG_STREAM_MAX_FRAME;
		uint8_t fh[DEVMIG_STREAM_FRAME_HDR_LEN];
		uint32_t crc;
		int r;

		frame_head(e, TYPE_DATA, n, fh);
		/* Encrypt, then checksum and MAC what goes on the wire; only a
		 * sealed stream writes (into mut). The digest takes the frame
		 * before it is written: a failed write ends the stream (the
		 * peer has part of a frame). */
		crc = sum_payload(&e->dg, false, e->total, devmig_crc32c(0, fh, 16),
				  mut ? mut + (p - (const uint8_t *)buf) : (uint8_t *)(uintptr_t)p, n);
		put32(fh + 16, crc);
		r = send_frame(e, fh, p, n);
		if (r < 0)
			return r;
		e->total += n;
		p += n;
		len -= n;
	}
	return 0;
}

int devmig_stream_enc_data(struct devmig_stream_enc *e, const void *buf, size_t len)
{
	return enc_data(e, NULL, buf, len);
}

int devmig_stream_enc_data_mut(struct devmig_stream_enc *e, void *buf, size_t len)
{
	return enc_data(e, buf, buf, len);
}

int devmig_stream_enc_finish(struct devmig_stream_enc *e)
{
	uint8_t t[DEVMIG_STREAM_TRAILER_LEN], fh[DEVMIG_STREAM_FRAME_HDR_LEN];

	if (e->done)
		return -EINVAL;
	put64(t, e->total);
	dg_final(&e->dg, t + 8);
	e->done = 1;
	frame_head(e, TYPE_TRAILER, sizeof(t), fh);
	put32(fh + 16, devmig_crc32c(devmig_crc32c(0, fh, 16), t, sizeof(t)));
	return send_frame(e, fh, t, sizeof(t));
}

/* ---- decoder ---- */

enum dec_state { D_HEADER, D_FRAME_HDR, D_PAYLOAD, D_DONE, D_FAILED };

struct devmig_stream_dec {
	enum dec_state st;
	bool have_header; /* got and expected_size are valid */
	bool check_dev;
	struct devmig_dev_desc want, got;
	uint64_t expected_size;
	devmig_payload_fn fn;
	void *ctx;
	uint8_t hdr[DEVMIG_STREAM_HEADER_LEN]; /* header, then frame headers */
	size_t have;                            /* bytes in hdr or payload */
	uint32_t type, len;
	uint64_t seq; /* the sequence number the next frame must carry */
	uint8_t *payload; /* DEVMIG_STREAM_MAX_FRAME bytes */
	uint64_t total;
	struct devmig_digest dg;
	bool keyed;
	int want_kind; /* DEVMIG_DIGEST_*: the only kind this decoder takes */
	uint8_t key[DEVMIG_STREAM_KEY_LEN];
	int err;
	const char *why;
};

int devmig_stream_dec_new(const struct devmig_dev_desc *want, devmig_payload_fn fn, void *ctx,
			  struct devmig_stream_dec **out)
{
	return devmig_stream_dec_new_keyed(want, NULL, fn, ctx, out);
}

static int dec_new(const struct devmig_dev_desc *want, const uint8_t *key, int kind,
		   devmig_payload_fn fn, void *ctx, struct devmig_stream_dec **out)
{
	struct devmig_stream_dec *d = calloc(1, sizeof(*d));

	if (!d)
		return -ENOMEM;
	d->payload = malloc(DEVMIG_STREAM_MAX_FRAME);
	if (!d->payload) {
		free(d);
		return -ENOMEM;
	}
	if (want) {
		d->check_dev = true;
		d->want = *want;
	}
	if (key) {
		d->keyed = true;
		memcpy(d->key, key, sizeof(d->key));
	}
	d->want_kind = kind;
	d->fn = fn;
	d->ctx = ctx;
	d->why = "";
	*out = d;
	return 0;
}

int devmig_stream_dec_new_keyed(const struct devmig_dev_desc *want, const uint8_t *key,
				devmig_payload_fn fn, void *ctx, struct devmig_stream_dec **out)
{
	return dec_new(want, key, key ? DEVMIG_DIGEST_MAC : DEVMIG_DIGEST_SHA256, fn, ctx, out);
}

int devmig_stream_dec_new_sealed(const struct devmig_dev_desc *want, const uint8_t *key,
				 devmig_payload_fn fn, void *ctx, struct devmig_stream_dec **out)
{
	if (!key)
		return -EINVAL;
	if (!devmig_aes256_available())
		return -ENOTSUP;
	return dec_new(want, key, DEVMIG_DIGEST_SEALED, fn, ctx, out);
}

void devmig_stream_dec_free(struct devmig_stream_dec *dec)
{
	if (!dec)
		return;
	memset(dec->key, 0, sizeof(dec->key));
	memset(&dec->dg.aes, 0, sizeof(dec->dg.aes));
	free(dec->payload);
	free(dec);
}

static int fail(struct devmig_stream_dec *d, int err, const char *why)
{
	d->st = D_FAILED;
	d->err = err;
	d->why = why;
	return err;
}

static int header_done(struct devmig_stream_dec *d)
{
	const uint8_t *h = d->hdr;
	uint8_t check[16];

	if (memcmp(h, MAGIC, 8) != 0)
		return fail(d, -EPROTO, "not a devmig stream (bad magic)");
	/* The version before the checksum: another version's header may be
	 * laid out (and checksummed) differently. */
	if (get16(h + 8) != DEVMIG_STREAM_VERSION || get16(h + 10) != DEVMIG_STREAM_HEADER_LEN)
		return fail(d, -EPROTONOSUPPORT, "unsupported stream format version");
	if (get32(h + H_CRC) != devmig_crc32c(0, h, H_CRC))
		return fail(d, -EBADMSG, "header checksum mismatch");
	memset(&d->got, 0, sizeof(d->got));
	d->got.vendor_id = get16(h + 12);
	d->got.device_id = get16(h + 14);
	memcpy(d->got.driver, h + 16, sizeof(d->got.driver) - 1);
	d->expected_size = get64(h + 48);
	d->have_header = true;
	if (d->check_dev &&
	    (d->got.vendor_id != d->want.vendor_id || d->got.device_id != d->want.device_id ||
	     strncmp(d->got.driver, d->want.driver, sizeof(d->got.driver)) != 0))
		return fail(d, -EXDEV, "stream is from a different kind of device");
	/* Exactly the kind asked for: a stream cannot talk its receiver down
	 * from sealed to MAC only, or from the MAC to an unkeyed digest. */
	switch (get16(h + H_DIGEST)) {
	case DEVMIG_DIGEST_SEALED:
		if (d->want_kind != DEVMIG_DIGEST_SEALED)
			return fail(d, -EBADMSG, "a sealed (encrypted) stream, and this receiver did not ask for one");
		key_check(d->key, h + H_NONCE, check);
		if (!equal_ct(check, h + H_KEYCHECK, sizeof(check)))
			return fail(d, -EBADMSG, "a stream sealed under another key");
		if (dg_keyed(&d->dg, d->key, h, DEVMIG_DIGEST_SEALED) < 0)
			return fail(d, -EBADMSG, "cannot set up the stream cipher and MAC");
		break;
	case DEVMIG_DIGEST_MAC:
		if (d->want_kind != DEVMIG_DIGEST_MAC)
			return fail(d, -EBADMSG, d->keyed ? "a MAC-only stream, and this receiver needs it sealed"
							  : "a keyed (MAC) stream, and this receiver has no key");
		if (dg_keyed(&d->dg, d->key, h, DEVMIG_DIGEST_MAC) < 0)
			return fail(d, -EBADMSG, "cannot set up the stream MAC");
		break;
	case DEVMIG_DIGEST_SHA256:
		if (d->want_kind != DEVMIG_DIGEST_SHA256)
			return fail(d, -EBADMSG, "an unkeyed (SHA-256) stream, and this receiver needs the MAC");
		dg_sha(&d->dg);
		break;
	default:
		return fail(d, -EBADMSG, "unknown stream digest");
	}
	d->st = D_FRAME_HDR;
	d->have = 0;
	return 0;
}

static int frame_hdr_done(struct devmig_stream_dec *d)
{
	d->type = get32(d->hdr);
	d->len = get32(d->hdr + 4);
	if ((d->type != TYPE_DATA && d->type != TYPE_TRAILER) || d->len > DEVMIG_STREAM_MAX_FRAME ||
	    (d->type == TYPE_TRAILER && d->len != DEVMIG_STREAM_TRAILER_LEN))
		return fail(d, -EBADMSG, "corrupted frame header");
	d->st = D_PAYLOAD;
	d->have = 0;
	return 0;
}

static int frame_done(struct devmig_stream_dec *d)
{
	uint32_t crc = devmig_crc32c(0, d->hdr, 16);
	uint8_t digest[32];
	int r;

	/* A data frame's CRC, digest and (sealed) cipher together: the digest
	 * and the plaintext of a frame that then fails a check are never
	 * used, as the stream fails with it. */
	if (d->type == TYPE_TRAILER)
		crc = devmig_crc32c(crc, d->payload, d->len);
	else
		crc = sum_payload(&d->dg, true, d->total, crc, d->payload, d->len);
	/* The checksum first: a frame that fails it says nothing reliable,
	 * its sequence number included. */
	if (crc != get32(d->hdr + 16))
		return fail(d, -EBADMSG, "frame checksum mismatch");
	if (get64(d->hdr + 8) != d->seq)
		return fail(d, -EILSEQ, "frame out of sequence (reordered, replayed or lost)");
	d->seq++;
	if (d->type == TYPE_TRAILER) {
		dg_final(&d->dg, digest);
		if (get64(d->payload) != d->total)
			return fail(d, -EBADMSG, "trailer length does not match the payload");
		if (!equal_ct(d->payload + 8, digest, 32))
			return fail(d, -EBADMSG, d->dg.kind != DEVMIG_DIGEST_SHA256
							 ? "trailer MAC does not match the payload (changed, or another key)"
							 : "trailer digest does not match the payload");
		d->st = D_DONE;
		return 0;
	}
	/* Checked as it came; decrypted for the device (which still gets it
	 * before the trailer verifies, and is reset if it then does not). */
	d->total += d->len;
	if (d->fn && d->len) {
		r = d->fn(d->ctx, d->payload, d->len);
		if (r < 0)
			return fail(d, r, "the device refused the payload");
	}
	d->st = D_FRAME_HDR;
	d->have = 0;
	return 0;
}

/* Where the decoder's next bytes go and how many it needs there before it
 * can check something: 0 once the stream ended (or was refused). Readers
 * can fill this place directly (devmig_stream_load), sparing a copy. */
static size_t dec_want(struct devmig_stream_dec *d, uint8_t **dst)
{
	switch (d->st) {
	case D_HEADER:
		*dst = d->hdr + d->have;
		return DEVMIG_STREAM_HEADER_LEN - d->have;
	case D_FRAME_HDR:
		*dst = d->hdr + d->have;
		return DEVMIG_STREAM_FRAME_HDR_LEN - d->have;
	case D_PAYLOAD:
		*dst = d->payload + d->have;
		return d->len - d->have;
	default:
		*dst = NULL;
		return 0;
	}
}

/* n more bytes (at most what dec_want asked for) are in place. */
static int dec_advance(struct devmig_stream_dec *d, size_t n)
{
	int r = 0;

	d->have += n;
	if (d->st == D_HEADER && d->have == DEVMIG_STREAM_HEADER_LEN)
		r = header_done(d);
	else if (d->st == D_FRAME_HDR && d->have == DEVMIG_STREAM_FRAME_HDR_LEN)
		r = frame_hdr_done(d);
	else if (d->st == D_PAYLOAD && d->have == d->len)
		r = frame_done(d);
	/* A zero-length frame completes without any byte of its own. */
	while (r == 0 && d->st == D_PAYLOAD && d->len == 0)
		r = frame_done(d);
	return r;
}

int devmig_stream_dec_feed(struct devmig_stream_dec *d, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	int r = 0;

	if (d->st == D_FAILED)
		return d->err;
	while (len && r == 0) {
		uint8_t *dst;
		size_t need = dec_want(d, &dst), n;

		if (!need)
			return fail(d, -EBADMSG, "data after the trailer");
		n = need < len ? need : len;
		memcpy(dst, p, n);
		p += n;
		len -= n;
		r = dec_advance(d, n);
	}
	return r;
}

int devmig_stream_dec_finish(struct devmig_stream_dec *d)
{
	if (d->st == D_FAILED)
		return d->err;
	if (d->st != D_DONE)
		return fail(d, -ENODATA, "stream ended before its trailer (truncated)");
	return 0;
}

const char *devmig_stream_dec_why(const struct devmig_stream_dec *d)
{
	return d->why;
}

int devmig_stream_dec_header(const struct devmig_stream_dec *d, struct devmig_dev_desc *desc,
			     uint64_t *expected_size)
{
	if (!d->have_header)
		return -ENODATA;
	if (desc)
		*desc = d->got;
	if (expected_size)
		*expected_size = d->expected_size;
	return 0;
}

uint64_t devmig_stream_dec_payload_bytes(const struct devmig_stream_dec *d)
{
	return d->total;
}

/* ---- device <-> stream ---- */

static int enc_sink(void *ctx, const void *buf, size_t len)
{
	return devmig_stream_enc_data(ctx, buf, len);
}

long devmig_stream_save(struct devmig_dev *d, int out_fd)
{
	struct devmig_stream_enc e;
	uint64_t expected = 0;
	int r;

	if (!devmig_state_is_saving(d->state) || d->data_fd < 0)
		return -EINVAL;
	/* The header carries the estimate, so a receiver can size its work;
	 * devices without MIG_DATA_SIZE (before 6.2) leave it 0: unknown. */
	if (devmig_data_size(d, &expected) < 0)
		expected = 0;
	r = devmig_stream_enc_begin(&e, &d->desc, expected, devmig_fd_write_all, &out_fd);
	if (r < 0)
		return r;
	if (d->state != DEVMIG_STATE_STOP_COPY) {
		r = devmig_data_drain(d, enc_sink, &e, NULL);
		if (r < 0)
			return r;
		/* PRE_COPY's temporary end: the rest comes from STOP_COPY. */
		r = devmig_set_state(d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL);
		if (r < 0)
			return r;
	}
	r = devmig_data_drain(d, enc_sink, &e, NULL);
	if (r < 0)
		return r;
	if (r != 1)
		return -EPROTO; /* a temporary end in STOP_COPY: not a valid device */
	r = devmig_stream_enc_finish(&e);
	return r < 0 ? r : (long)e.total;
}

#define LOAD_TAIL 4096u

struct load_sink {
	struct devmig_dev *d;
	uint64_t *received; /* NULL, or updated atomically after each frame */
	uint64_t total;
};

static int dev_sink(void *ctx, const void *buf, size_t len)
{
	struct load_sink *ls = ctx;
	long n = devmig_data_write(ls->d, buf, len);

	if (n < 0)
		return (int)n;
	ls->total += len;
	if (ls->received)
		__atomic_store_n(ls->received, ls->total, __ATOMIC_RELAXED);
	return 0;
}

int devmig_stream_load(struct devmig_dev *d, int in_fd)
{
	return devmig_stream_load_counted(d, in_fd, NULL);
}

int devmig_stream_load_counted(struct devmig_dev *d, int in_fd, uint64_t *received)
{
	return devmig_stream_load_keyed(d, in_fd, received, NULL);
}

static int load(struct devmig_dev *d, int in_fd, uint64_t *received, const uint8_t *key,
		bool sealed);

int devmig_stream_load_keyed(struct devmig_dev *d, int in_fd, uint64_t *received,
			     const uint8_t *key)
{
	return load(d, in_fd, received, key, false);
}

int devmig_stream_load_sealed(struct devmig_dev *d, int in_fd, uint64_t *received,
			      const uint8_t *key)
{
	if (!key)
		return -EINVAL;
	return load(d, in_fd, received, key, true);
}

static int load(struct devmig_dev *d, int in_fd, uint64_t *received, const uint8_t *key,
		bool sealed)
{
	struct load_sink ls = { .d = d, .received = received };
	struct devmig_stream_dec *dec;
	/* Reads go straight into the decoder's header or frame buffer, each
	 * asking for the rest of what it is filling; buf only takes what
	 * comes after the trailer. */
	uint8_t *buf;
	int r, lowat = 0, mark, bulk;

	if (d->state != DEVMIG_STATE_RESUMING || d->data_fd < 0 || d->poisoned)
		return -EINVAL;
	buf = malloc(LOAD_TAIL);
	if (!buf)
		return -ENOMEM;
	r = sealed ? devmig_stream_dec_new_sealed(&d->desc, key, dev_sink, &ls, &dec)
		   : devmig_stream_dec_new_keyed(&d->desc, key, dev_sink, &ls, &dec);
	if (r < 0) {
		free(buf);
		return r;
	}
	bulk = devmig_sched_bulk_begin();
	for (;;) {
		uint8_t *dst;
		size_t want = dec_want(dec, &dst);
		ssize_t n;

		/* After the trailer, read on only to see the end of file (or
		 * bytes that should not be there: the decoder refuses them). */
		if (!want) {
			dst = buf;
			want = LOAD_TAIL;
		}
		/* The socket wakes this reader once the rest of what it is
		 * filling is there (a frame's header, or its payload), not at
		 * every segment: one wake-up and one read per 1 MiB frame
		 * instead of two or three, each wake-up costing both ends CPU
		 * (7% of a sealed transfer's, measured). Two details of TCP's
		 * low mark decide how:
		 * - it wakes a sleeping reader only once the mark's worth is
		 *   unread, whatever the read asked for, so the mark is always
		 *   exactly what this read needs (a higher one would leave a
		 *   round's short last frame unread until more came);
		 * - it counts from what is unread, so a read that copied part
		 *   of what it needs and slept for the rest would wait for a
		 *   whole mark more: poll() waits for all of it instead, and
		 *   the read then takes it in one go.
		 * Anything but a socket refuses the option: never asked again,
		 * and read() alone waits as before. */
		mark = dst == buf ? 1 : (int)want; /* after the trailer: any byte, or the end */
		if (lowat >= 0 && lowat != mark)
			lowat = setsockopt(in_fd, SOL_SOCKET, SO_RCVLOWAT, &mark, sizeof(mark)) == 0 ? mark : -1;
		if (lowat > 1) {
			struct pollfd pfd = { .fd = in_fd, .events = POLLIN };

			if (poll(&pfd, 1, -1) < 0) {
				if (errno == EINTR)
					continue;
				r = -errno;
				break;
			}
		}
		n = read(in_fd, dst, want);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = -errno;
			break;
		}
		if (n == 0) {
			r = devmig_stream_dec_finish(dec);
			break;
		}
		r = dst == buf ? devmig_stream_dec_feed(dec, buf, (size_t)n) : dec_advance(dec, (size_t)n);
		if (r < 0)
			break;
	}
	/* The caller's thread goes on with its own policy: the device's
	 * state changes below are not bulk work. */
	devmig_sched_bulk_end(bulk);
	free(buf);
	if (r < 0) {
		devmig_logf(d, "stream refused: %s (%s); resetting the device", devmig_stream_dec_why(dec),
			    strerror(-r));
		devmig_stream_dec_free(dec);
		/* Part of the stream may already be in the device: it must
		 * never run on it. Poison first, so even a failed reset leaves
		 * a device the setter will not start. */
		devmig_dev_poison(d);
		devmig_reset(d);
		return r;
	}
	devmig_stream_dec_free(dec);
	/* Verified end to end: the driver checks it too on RESUMING -> STOP,
	 * and a refusal there resets the device (no recovery from RESUMING
	 * keeps bad data). */
	return devmig_set_state(d, DEVMIG_STATE_STOP, DEVMIG_STATE_ERROR, NULL);
}
