/* devmig's stream format around a device's opaque migration data.
 *
 *   header  (96 bytes)  "DEVMIGST", version 2, the source device (vendor,
 *                       device, driver), the expected size, the digest
 *                       (SHA-256, the keyed MAC, or sealed), the MAC's
 *                       nonce, the key check (sealed), CRC32C
 *   frames  (20 + len)  type DATA, payload length, sequence number from 0,
 *                       CRC32C over the frame header and payload
 *   trailer (20 + 40)   type TRAILER, next sequence number, total payload
 *                       bytes and the digest of all payload (SHA-256: 32
 *                       bytes; MAC: the 16-byte tag, then 16 zero bytes)
 *
 * All integers little-endian. The decoder checks each frame before its
 * payload is handed on, and the trailer proves nothing was lost, added or
 * reordered in between.
 *
 * The digest: streams between agents carry a MAC keyed with the session's
 * 32-byte key (ghash.c: GHASH with a one-time key from HMAC-SHA-256 of the
 * key and the header's nonce), which both ends know and an eavesdropper
 * does not, so a changed byte is caught as surely as by SHA-256 and, unlike
 * SHA-256, a stream cannot be forged without the key; at a fraction of
 * SHA-256's cost. Streams without a key (files: `devmig-native save`) carry
 * SHA-256. A decoder given a key accepts only MAC streams, one without a
 * key only SHA-256 streams: neither can be talked down to the other.
 *
 * Sealed streams (digest 3) also encrypt the payload, AES-256-CTR under
 * HMAC-SHA-256(key, "devmig stream enc v1" || nonce) with a zero IV and the
 * counter from 0 (a fresh key per stream), and carry a key check in the
 * header (16 bytes of HMAC-SHA-256(key, "devmig stream key check v1" ||
 * nonce)) so that a receiver with another key refuses at the header. The
 * frame CRCs and the MAC cover the ciphertext (encrypt-then-MAC). A sealed
 * decoder accepts only sealed streams. For TLS deployments: the agents agree
 * the key over mutual TLS, then move the stream off TLS onto the native
 * pump. */
#ifndef DEVMIG_STREAM_H
#define DEVMIG_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "devmig/devmig.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 2: the digest field and the nonce (version 1 had SHA-256 only, in a
 * 64-byte header). */
#define DEVMIG_STREAM_VERSION 2
#define DEVMIG_STREAM_HEADER_LEN 96
/* The header's digest field. */
#define DEVMIG_DIGEST_SHA256 1
#define DEVMIG_DIGEST_MAC 2
/* The MAC, over payload encrypted with AES-256-CTR ("sealed"): for TLS
 * deployments, where the key is a secret both agents agreed over TLS. */
#define DEVMIG_DIGEST_SEALED 3
#define DEVMIG_STREAM_KEY_LEN 32
#define DEVMIG_STREAM_FRAME_HDR_LEN 20
#define DEVMIG_STREAM_TRAILER_LEN 40
/* Largest frame payload: the 1 MiB the data fd is read in (see data.c);
 * also the bound that keeps a corrupt length from allocating without end. */
#define DEVMIG_STREAM_MAX_FRAME (1u << 20)

/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78): the CPU's CRC32
 * instruction where it has one (x86-64 SSE4.2), slicing-by-8 otherwise.
 * Pass 0 to start; feed the previous result to continue. */
uint32_t devmig_crc32c(uint32_t crc, const void *buf, size_t len);

/* Implementations of the checksums, all giving the same results; the
 * default (AUTO) is chosen once from the CPU's features. Named so tests
 * and benchmarks can compare them. */
enum devmig_impl {
	DEVMIG_IMPL_AUTO = 0,
	DEVMIG_IMPL_PORTABLE = 1, /* plain C */
	DEVMIG_IMPL_X86 = 2,      /* CRC32C: SSE4.2 crc32; SHA-256: the SHA extensions;
				   * GHASH: PCLMULQDQ */
	DEVMIG_IMPL_X86_512 = 3,  /* GHASH and CRC32C (long buffers; SSE4.2 for the rest):
				   * VPCLMULQDQ on 512-bit registers (AVX-512) */
};
typedef uint32_t (*devmig_crc32c_fn)(uint32_t crc, const void *buf, size_t len);
/* The implementation, or NULL when this CPU lacks it. */
devmig_crc32c_fn devmig_crc32c_impl(int impl);

struct devmig_sha256 {
	uint32_t h[8];
	uint64_t len; /* bytes hashed */
	uint8_t buf[64];
	size_t fill;
	void (*blocks)(uint32_t h[8], const uint8_t *p, size_t n); /* n 64-byte blocks */
};
void devmig_sha256_init(struct devmig_sha256 *s);
/* As devmig_sha256_init with a given implementation; -ENOTSUP when this
 * CPU lacks it. */
int devmig_sha256_init_impl(struct devmig_sha256 *s, int impl);
/* "crc32c=sse4.2 sha256=sha-ni ghash=pclmul" or the portable names: what
 * AUTO uses. */
const char *devmig_crypto_impls(void);
void devmig_sha256_update(struct devmig_sha256 *s, const void *buf, size_t len);
void devmig_sha256_final(struct devmig_sha256 *s, uint8_t out[32]);

/* RFC 2104 HMAC with SHA-256. */
void devmig_hmac_sha256(const uint8_t *key, size_t key_len, const void *msg, size_t len,
			uint8_t out[32]);

/* GHASH (SP 800-38D §6.4) over any number of bytes: the data zero-padded
 * to whole blocks, then GCM's length block (the bit count, big-endian,
 * and 64 zero bits). Carry-less multiplication where the CPU has it. */
struct devmig_ghash {
	uint8_t h[16];
	uint8_t hpow[1024]; /* H^1..H^64 for the carry-less implementations */
	uint8_t y[16];
	uint8_t buf[16];
	size_t fill;
	uint64_t len;
	void (*blocks)(struct devmig_ghash *g, const uint8_t *p, size_t n); /* n 16-byte blocks */
};
/* -ENOTSUP when this CPU lacks the implementation asked for. */
int devmig_ghash_init_impl(struct devmig_ghash *g, const uint8_t h[16], int impl);
void devmig_ghash_update(struct devmig_ghash *g, const void *buf, size_t len);
void devmig_ghash_final(struct devmig_ghash *g, uint8_t out[16]);
/* "vpclmulqdq", "pclmul" or "portable": what AUTO uses. */
const char *devmig_ghash_impl_name(void);

/* The stream's MAC (see the top of this file and ghash.c). */
struct devmig_mac {
	struct devmig_ghash gh;
	uint8_t s[16];
};
int devmig_mac_init(struct devmig_mac *m, const uint8_t key[32], const uint8_t nonce[16]);
void devmig_mac_update(struct devmig_mac *m, const void *buf, size_t len);
void devmig_mac_final(struct devmig_mac *m, uint8_t tag[16]);

/* AES-256 in counter mode (aes.c), with the CPU's AES instructions only:
 * init gives -ENOTSUP without them (AUTO: VAES where present, else
 * AES-NI; X86: AES-NI; X86_512: VAES). */
struct devmig_aes256 {
	uint8_t rk[15][16]; /* the round keys */
	int impl;           /* 0 until initialised */
};
int devmig_aes256_init_impl(struct devmig_aes256 *a, const uint8_t key[32], int impl);
/* Whether this CPU has AES-NI, which sealed streams need. */
bool devmig_aes256_available(void);
/* "vaes", "aes-ni" or "none". */
const char *devmig_aes_impl_name(void);
/* XOR len bytes at buf with the keystream from byte offset on, counter
 * blocks iv || BE64(block index): encrypts and decrypts alike. */
void devmig_aes256_ctr_xor(const struct devmig_aes256 *a, const uint8_t iv[8], uint64_t offset,
			   void *buf, size_t len);

/* The trailer's digest: SHA-256, or the MAC when a key is given; and for
 * a sealed stream the payload's cipher. */
struct devmig_digest {
	int kind; /* DEVMIG_DIGEST_* */
	struct devmig_sha256 sha;
	struct devmig_mac mac;
	struct devmig_aes256 aes;
};

/* A data frame's payload, its CRC32C returned (continued from crc, which
 * covers the frame's header), the digest's MAC updated over the bytes on
 * the wire (framepass.c). iv and offset: a sealed stream's counter and
 * the payload's place in the stream.
 *   DEVMIG_FRAME_SEAL: encrypt buf in place, then sum it;
 *   DEVMIG_FRAME_OPEN: sum buf, then decrypt it in place;
 *   DEVMIG_FRAME_MAC: sum buf only (iv and offset unused; buf read only).
 * one_pass: in one pass over the bytes where this CPU has VAES and
 * VPCLMULQDQ (the separate passes elsewhere, and around it); false: the
 * separate passes always. Both give the same bytes, CRC and MAC; the
 * stream uses one_pass, benchmarks and tests compare the two. */
enum devmig_frame_mode { DEVMIG_FRAME_SEAL = 1, DEVMIG_FRAME_OPEN = 2, DEVMIG_FRAME_MAC = 3 };
uint32_t devmig_frame_pass(struct devmig_digest *dg, enum devmig_frame_mode mode, const uint8_t iv[8],
			   uint64_t offset, uint32_t crc, uint8_t *buf, size_t len, bool one_pass);

/* Byte sink for the encoder: write all of buf or return -errno. */
typedef int (*devmig_write_fn)(void *ctx, const void *buf, size_t len);
/* devmig_write_fn over a file descriptor; ctx is a pointer to the int fd. */
int devmig_fd_write_all(void *ctx, const void *buf, size_t len);

struct devmig_stream_enc {
	devmig_write_fn out;
	void *ctx;
	uint64_t seq;
	uint64_t total;
	struct devmig_digest dg;
	int done;
};
/* A stream digested with SHA-256. */
int devmig_stream_enc_begin(struct devmig_stream_enc *e, const struct devmig_dev_desc *desc,
			    uint64_t expected_size, devmig_write_fn out, void *ctx);
/* With key (DEVMIG_STREAM_KEY_LEN bytes) a stream with the keyed MAC and
 * a fresh random nonce; NULL: as devmig_stream_enc_begin. */
int devmig_stream_enc_begin_keyed(struct devmig_stream_enc *e, const struct devmig_dev_desc *desc,
				  uint64_t expected_size, const uint8_t *key, devmig_write_fn out,
				  void *ctx);
/* A sealed stream: the payload encrypted (AES-256-CTR) and MACed, both
 * under keys derived from key and a fresh nonce. -ENOTSUP without AES-NI. */
int devmig_stream_enc_begin_sealed(struct devmig_stream_enc *e, const struct devmig_dev_desc *desc,
				   uint64_t expected_size, const uint8_t *key, devmig_write_fn out,
				   void *ctx);
/* Frame buf (split at DEVMIG_STREAM_MAX_FRAME). -EINVAL on a sealed
 * stream, which encrypts in place: use devmig_stream_enc_data_mut. */
int devmig_stream_enc_data(struct devmig_stream_enc *e, const void *buf, size_t len);
/* As devmig_stream_enc_data; a sealed stream encrypts buf in place. */
int devmig_stream_enc_data_mut(struct devmig_stream_enc *e, void *buf, size_t len);
int devmig_stream_enc_finish(struct devmig_stream_enc *e);

/* Verified payload goes here, in order; returns 0 or -errno. */
typedef int (*devmig_payload_fn)(void *ctx, const void *buf, size_t len);

struct devmig_stream_dec;
/* The decoder refuses a stream from a device unlike `want` (NULL: any). */
int devmig_stream_dec_new(const struct devmig_dev_desc *want, devmig_payload_fn fn, void *ctx,
			  struct devmig_stream_dec **out);
/* With key: only a MAC stream under that key verifies (-EBADMSG for a
 * SHA-256 stream or another key); NULL: as devmig_stream_dec_new, which
 * accepts only SHA-256 streams. */
int devmig_stream_dec_new_keyed(const struct devmig_dev_desc *want, const uint8_t *key,
				devmig_payload_fn fn, void *ctx, struct devmig_stream_dec **out);
/* Only a sealed stream under key verifies; its payload reaches fn
 * decrypted (and, like any payload, before the trailer has verified). */
int devmig_stream_dec_new_sealed(const struct devmig_dev_desc *want, const uint8_t *key,
				 devmig_payload_fn fn, void *ctx, struct devmig_stream_dec **out);
void devmig_stream_dec_free(struct devmig_stream_dec *dec);
/* Feed any number of bytes. Errors stick: once refused, every later call
 * returns the same -errno.
 *   -EPROTO           not a devmig stream (magic)
 *   -EPROTONOSUPPORT  a format version this build does not read
 *   -EXDEV            from a different kind of device
 *   -EBADMSG          a corrupted header, frame or trailer; bytes after
 *                     the trailer; a trailer whose length or digest does
 *                     not match the payload
 *   -EILSEQ           a frame out of sequence (reordered, replayed, lost)
 * or the payload callback's own -errno. */
int devmig_stream_dec_feed(struct devmig_stream_dec *dec, const void *buf, size_t len);
/* The input ended: 0 when the trailer verified, -ENODATA when the stream
 * was cut short, or the earlier error. */
int devmig_stream_dec_finish(struct devmig_stream_dec *dec);
/* Why the decoder refused, for logs ("" while it has not). */
const char *devmig_stream_dec_why(const struct devmig_stream_dec *dec);
/* The header's fields, once read. */
int devmig_stream_dec_header(const struct devmig_stream_dec *dec, struct devmig_dev_desc *desc,
			     uint64_t *expected_size);
uint64_t devmig_stream_dec_payload_bytes(const struct devmig_stream_dec *dec);

/* Source: write the device's data into a stream on out_fd. From PRE_COPY
 * (or PRE_COPY_P2P) it sends the data available now, moves the device to
 * STOP_COPY and sends the rest; from STOP_COPY just the rest. The device
 * is left in STOP_COPY (the caller stops it once the target committed).
 * Returns the payload bytes sent or -errno. */
long devmig_stream_save(struct devmig_dev *d, int out_fd);
/* Target: read a stream from in_fd into a RESUMING device. The device
 * leaves RESUMING (for STOP) only when the whole stream verified; on any
 * failure it is poisoned and reset, and the error returned. */
int devmig_stream_load(struct devmig_dev *d, int in_fd);
/* As devmig_stream_load, storing in *received (atomically, relaxed) the
 * payload bytes written into the device so far, after each frame: the
 * target's progress, readable from another thread while the load runs. */
int devmig_stream_load_counted(struct devmig_dev *d, int in_fd, uint64_t *received);
/* As devmig_stream_load_counted for a stream keyed with key (NULL: SHA-256). */
int devmig_stream_load_keyed(struct devmig_dev *d, int in_fd, uint64_t *received,
			     const uint8_t *key);
/* As devmig_stream_load_keyed for a sealed stream. */
int devmig_stream_load_sealed(struct devmig_dev *d, int in_fd, uint64_t *received,
			      const uint8_t *key);

#ifdef __cplusplus
}
#endif
#endif
