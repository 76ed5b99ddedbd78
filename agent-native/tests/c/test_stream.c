/* The devmig stream: round trips, every refusal the decoder promises, and
 * the device paths: a target never leaves RESUMING on a stream that did not
 * verify, and is reset instead. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "check.h"
#include "devmig/devmig.h"
#include "devmig/sim.h"
#include "devmig/stream.h"

struct mem {
	uint8_t *b;
	size_t len, cap;
};
static int mem_write(void *ctx, const void *buf, size_t len)
{
	struct mem *m = ctx;

	if (m->len + len > m->cap) {
		m->cap = (m->len + len) * 2;
		m->b = realloc(m->b, m->cap);
	}
	memcpy(m->b + m->len, buf, len);
	m->len += len;
	return 0;
}

static const struct devmig_dev_desc DESC = { 0x10de, 0x2331, "nvidia-vfio" };

/* A stream of `nframes` frames of `fsz` bytes each. */
static struct mem make_stream(const struct devmig_dev_desc *desc, int nframes, size_t fsz)
{
	struct devmig_stream_enc e;
	struct mem m = { 0 };
	uint8_t *p = malloc(fsz);

	for (size_t i = 0; i < fsz; i++)
		p[i] = (uint8_t)(i * 31 + 7);
	CHECK(devmig_stream_enc_begin(&e, desc, (uint64_t)nframes * fsz, mem_write, &m) == 0);
	for (int f = 0; f < nframes; f++) {
		p[0] = (uint8_t)f;
		CHECK(devmig_stream_enc_data(&e, p, fsz) == 0);
	}
	CHECK(devmig_stream_enc_finish(&e) == 0);
	CHECK(devmig_stream_enc_data(&e, p, 1) == -EINVAL);
	free(p);
	return m;
}

/* Decode buf in pieces of `step` bytes; the error, or 0 if it verified. */
static int decode(const uint8_t *buf, size_t len, size_t step, struct mem *out, const char **why)
{
	struct devmig_stream_dec *d;
	int r = 0;

	CHECK(devmig_stream_dec_new(&DESC, out ? mem_write : NULL, out, &d) == 0);
	for (size_t off = 0; off < len && r == 0; off += step)
		r = devmig_stream_dec_feed(d, buf + off, len - off < step ? len - off : step);
	if (r == 0)
		r = devmig_stream_dec_finish(d);
	if (why)
		*why = devmig_stream_dec_why(d);
	devmig_stream_dec_free(d);
	return r;
}

#define FRAME(i, fsz) (DEVMIG_STREAM_HEADER_LEN + (size_t)(i) * (DEVMIG_STREAM_FRAME_HDR_LEN + (fsz)))

/* Rewrite the header CRC after editing the header (to reach the checks
 * behind it). */
static void fix_header(uint8_t *b)
{
	uint32_t c = devmig_crc32c(0, b, DEVMIG_STREAM_HEADER_LEN - 4);

	memcpy(b + DEVMIG_STREAM_HEADER_LEN - 4, &c, 4);
}

static void test_decoder(void)
{
	struct mem s = make_stream(&DESC, 5, 1000), out = { 0 };
	const char *why;
	uint8_t *b = malloc(s.len + 2000);

	CHECK(s.len == DEVMIG_STREAM_HEADER_LEN + 5 * 1020 + 60);
	/* Any split verifies and yields the payload. */
	for (size_t step = 1; step < s.len + 1; step = step * 3 + 1) {
		out.len = 0;
		CHECK(decode(s.b, s.len, step, &out, NULL) == 0);
		CHECK(out.len == 5000 && out.b[1000] == 1 && out.b[4001] == (uint8_t)(1 * 31 + 7));
	}
	free(out.b);

	memcpy(b, s.b, s.len);
	b[0] = 'X';
	CHECK(decode(b, s.len, 4096, NULL, &why) == -EPROTO);
	memcpy(b, s.b, s.len);
	b[8] = DEVMIG_STREAM_VERSION + 1;
	fix_header(b);
	CHECK(decode(b, s.len, 4096, NULL, NULL) == -EPROTONOSUPPORT);
	memcpy(b, s.b, s.len);
	b[8] = 1; /* version 1: refused by version, whatever its checksum */
	CHECK(decode(b, s.len, 4096, NULL, NULL) == -EPROTONOSUPPORT);
	memcpy(b, s.b, s.len);
	b[20] ^= 1; /* without fixing: a corrupted header */
	CHECK(decode(b, s.len, 4096, NULL, NULL) == -EBADMSG);
	memcpy(b, s.b, s.len);
	b[56] = 9; /* an unknown digest */
	fix_header(b);
	CHECK(decode(b, s.len, 4096, NULL, &why) == -EBADMSG);
	CHECK(strstr(why, "unknown stream digest") != NULL);

	/* A different device. */
	struct devmig_dev_desc other = DESC;
	other.device_id++;
	struct mem o = make_stream(&other, 1, 10);
	CHECK(decode(o.b, o.len, 4096, NULL, &why) == -EXDEV);
	CHECK(strstr(why, "different kind of device") != NULL);
	free(o.b);
	strcpy(other.driver, "nvidia-vfiox");
	other.device_id--;
	o = make_stream(&other, 1, 10);
	CHECK(decode(o.b, o.len, 4096, NULL, NULL) == -EXDEV);
	free(o.b);

	/* Every single flipped byte anywhere is refused. */
	for (size_t i = 0; i < s.len; i++) {
		memcpy(b, s.b, s.len);
		b[i] ^= 0x10;
		int r = decode(b, s.len, 777, NULL, NULL);

		CHECK(r < 0);
		if (r == 0)
			fprintf(stderr, "flip at %zu accepted\n", i);
	}

	/* Truncated anywhere: -ENODATA at the end of input. */
	for (size_t cut = 0; cut < s.len; cut += 37)
		CHECK(decode(s.b, cut, 100, NULL, NULL) == -ENODATA);
	CHECK(decode(s.b, s.len - 1, 100, NULL, &why) == -ENODATA);
	CHECK(strstr(why, "truncated") != NULL);

	/* Frames 1 and 2 swapped: -EILSEQ. */
	memcpy(b, s.b, s.len);
	memcpy(b + FRAME(1, 1000), s.b + FRAME(2, 1000), 1020);
	memcpy(b + FRAME(2, 1000), s.b + FRAME(1, 1000), 1020);
	CHECK(decode(b, s.len, 500, NULL, &why) == -EILSEQ);
	CHECK(strstr(why, "sequence") != NULL);
	/* Frame 1 replayed after itself. */
	memcpy(b, s.b, FRAME(2, 1000));
	memcpy(b + FRAME(2, 1000), s.b + FRAME(1, 1000), s.len - FRAME(1, 1000));
	CHECK(decode(b, s.len + 1020, 500, NULL, NULL) == -EILSEQ);
	/* Frame 3 lost. */
	memcpy(b, s.b, FRAME(3, 1000));
	memcpy(b + FRAME(3, 1000), s.b + FRAME(4, 1000), s.len - FRAME(4, 1000));
	CHECK(decode(b, s.len - 1020, 500, NULL, NULL) == -EILSEQ);

	/* Bytes after the trailer. */
	memcpy(b, s.b, s.len);
	b[s.len] = 0;
	CHECK(decode(b, s.len + 1, 500, NULL, &why) == -EBADMSG);
	CHECK(strstr(why, "after the trailer") != NULL);

	/* A trailer whose digest or length lies, with a valid frame CRC. */
	for (int field = 0; field < 2; field++) {
		size_t t = FRAME(5, 1000);
		uint32_t c;

		memcpy(b, s.b, s.len);
		b[t + 20 + (field ? 8 : 0)] ^= 1;
		c = devmig_crc32c(devmig_crc32c(0, b + t, 16), b + t + 20, 40);
		memcpy(b + t + 16, &c, 4);
		CHECK(decode(b, s.len, 500, NULL, &why) == -EBADMSG);
		CHECK(strstr(why, field ? "digest" : "length") != NULL);
	}

	/* Errors stick. */
	struct devmig_stream_dec *d;
	CHECK(devmig_stream_dec_new(NULL, NULL, NULL, &d) == 0);
	CHECK(devmig_stream_dec_header(d, NULL, NULL) == -ENODATA);
	uint8_t xs[DEVMIG_STREAM_HEADER_LEN];

	memset(xs, 'X', sizeof(xs));
	CHECK(devmig_stream_dec_feed(d, xs, sizeof(xs)) == -EPROTO);
	CHECK(devmig_stream_dec_header(d, NULL, NULL) == -ENODATA);
	CHECK(devmig_stream_dec_feed(d, s.b, s.len) == -EPROTO);
	CHECK(devmig_stream_dec_finish(d) == -EPROTO);
	devmig_stream_dec_free(d);
	/* Without a wanted device, any device's stream decodes. */
	CHECK(devmig_stream_dec_new(NULL, NULL, NULL, &d) == 0);
	CHECK(devmig_stream_dec_feed(d, s.b, s.len) == 0 && devmig_stream_dec_finish(d) == 0);
	struct devmig_dev_desc got;
	uint64_t exp;
	CHECK(devmig_stream_dec_header(d, &got, &exp) == 0 && exp == 5000 && got.device_id == 0x2331);
	CHECK(devmig_stream_dec_payload_bytes(d) == 5000);
	devmig_stream_dec_free(d);
	free(b);
	free(s.b);
}

/* Random damage, deterministic seed: 2000 streams of random frame sizes,
 * each cut, spliced or overwritten at random places, fed in random
 * pieces. A damaged stream is never accepted, an intact one always is,
 * and no payload byte reaches the sink that was not in the original. */
static void test_decoder_random_damage(void)
{
	uint64_t rng = 0x2545F4914F6CDD1Dull;
#define RND() (rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17, rng)

	for (int iter = 0; iter < 2000; iter++) {
		int nframes = (int)(RND() % 4) + 1;
		size_t fsz = RND() % 300 + 1;
		struct mem s = make_stream(&DESC, nframes, fsz), out = { 0 };
		uint8_t *b = malloc(s.len + 64);
		size_t len = s.len;
		int kind = (int)(RND() % 4);

		memcpy(b, s.b, s.len);
		if (kind == 1) {
			len = RND() % s.len; /* cut */
		} else if (kind == 2) {
			size_t at = RND() % s.len, n = RND() % 8 + 1;

			for (size_t i = 0; i < n && at + i < len; i++)
				b[at + i] ^= (uint8_t)(RND() % 255 + 1); /* never a no-op */
		} else if (kind == 3) {
			size_t from = RND() % s.len, to = RND() % s.len, n = RND() % 40 + 1;

			if (from + n > s.len)
				n = s.len - from;
			if (to + n > s.len)
				n = s.len - to;
			memmove(b + to, s.b + from, n); /* splice bytes of itself */
			if (memcmp(b, s.b, s.len) == 0)
				kind = 0;
		}
		int r = decode(b, len, RND() % 700 + 1, &out, NULL);

		if (kind == 0)
			CHECK(r == 0 && out.len == (size_t)nframes * fsz);
		else
			CHECK(r < 0);
		/* Whatever was handed on is a prefix of the true payload. */
		for (size_t i = 0; i < out.len; i++)
			if (out.b[i] != (uint8_t)(i % fsz == 0 ? i / fsz : (i % fsz) * 31 + 7)) {
				CHECK(!"payload byte not from the original");
				break;
			}
		free(out.b);
		free(b);
		free(s.b);
	}
#undef RND
}

/* ---- device paths ---- */

static struct devmig_dev *sim(uint64_t seed, uint32_t rate)
{
	struct devmig_sim_config cfg = { .mem_size = 64 * 1024, .seed = seed, .dirty_pages_per_mib = rate };
	struct devmig_dev *d = NULL;

	CHECK(devmig_dev_open_sim(&cfg, &d) == 0);
	devmig_dev_set_log(d, NULL, NULL);
	return d;
}
static uint64_t digest(struct devmig_dev *d)
{
	uint64_t v = 0;

	devmig_sim_mem_digest(d, &v);
	return v;
}
static struct devmig_sim_stats stats(struct devmig_dev *d)
{
	struct devmig_sim_stats st;

	devmig_sim_stats(d, &st);
	return st;
}

static void quiet(void *ctx, const char *line)
{
	(void)ctx;
	(void)line;
}

/* Save src (from `from` state) into a memfd; returns the fd at offset 0. */
static int save(struct devmig_dev *src, uint32_t from)
{
	int fd = memfd_create("stream", MFD_CLOEXEC);

	CHECK(devmig_set_state(src, from, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_stream_save(src, fd) > 0);
	CHECK(devmig_dev_state(src) == DEVMIG_STATE_STOP_COPY);
	lseek(fd, 0, SEEK_SET);
	return fd;
}

/* Load `fd` into a fresh target; returns the result. */
static int load(struct devmig_dev *dst, int fd)
{
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL) == 0);
	return devmig_stream_load(dst, fd);
}

static void expect_refused(struct devmig_dev *dst, int r, int want, uint64_t resets_before)
{
	uint32_t s;

	CHECK(r == want);
	if (r != want)
		fprintf(stderr, "got %d want %d\n", r, want);
	/* Reset, not RUNNING on the data, not poisoned any more. */
	CHECK(stats(dst).reset_calls == resets_before + 1);
	CHECK(stats(dst).loads == 0);
	CHECK(devmig_get_state(dst, &s) == 0 && s == DEVMIG_STATE_RUNNING);
	CHECK(!devmig_dev_poisoned(dst));
	CHECK(devmig_data_fd(dst) == -1);
}

static void test_device_paths(void)
{
	struct devmig_dev *src = sim(1, 64), *dst = sim(2, 0);
	uint64_t want;
	int fd;

	devmig_dev_set_log(src, quiet, NULL);
	devmig_dev_set_log(dst, quiet, NULL);
	/* From PRE_COPY: initial data, then STOP_COPY, in one stream. */
	fd = save(src, DEVMIG_STATE_PRE_COPY);
	want = digest(src);
	CHECK(load(dst, fd) == 0);
	CHECK(devmig_dev_state(dst) == DEVMIG_STATE_STOP);
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL) == 0);
	CHECK(digest(dst) == want && stats(dst).loads == 1);
	close(fd);
	CHECK(devmig_set_state(src, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == 0);
	devmig_dev_close(dst);

	/* Each damaged stream: refused, target reset, never started. */
	static const struct {
		off_t at;
		int want;
	} damage[] = {
		{ 0, -EPROTO },       /* magic */
		{ 20, -EBADMSG },     /* header (driver name) */
		{ DEVMIG_STREAM_HEADER_LEN + 3, -EBADMSG }, /* frame header */
		{ 5000, -EBADMSG },   /* payload */
		{ -10, -EBADMSG },    /* trailer */
	};
	for (size_t i = 0; i < sizeof(damage) / sizeof(damage[0]); i++) {
		uint8_t byte;

		dst = sim(2, 0);
		devmig_dev_set_log(dst, quiet, NULL);
		fd = save(src, DEVMIG_STATE_STOP_COPY);
		off_t end = lseek(fd, 0, SEEK_END);
		off_t at = damage[i].at < 0 ? end + damage[i].at : damage[i].at;
		CHECK(pread(fd, &byte, 1, at) == 1);
		byte ^= 0x01;
		CHECK(pwrite(fd, &byte, 1, at) == 1);
		lseek(fd, 0, SEEK_SET);
		expect_refused(dst, load(dst, fd), damage[i].want, 0);
		close(fd);
		CHECK(devmig_set_state(src, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == 0);
		devmig_dev_close(dst);
	}

	/* Truncated: the payload so far was written, yet the device is reset. */
	dst = sim(2, 0);
	devmig_dev_set_log(dst, quiet, NULL);
	fd = save(src, DEVMIG_STATE_STOP_COPY);
	CHECK(ftruncate(fd, lseek(fd, 0, SEEK_END) - 60) == 0); /* the trailer */
	lseek(fd, 0, SEEK_SET);
	expect_refused(dst, load(dst, fd), -ENODATA, 0);
	close(fd);
	CHECK(devmig_set_state(src, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == 0);

	/* The stream of another kind of device. */
	struct devmig_sim_config other = { .mem_size = 64 * 1024, .desc = { 0x1b36, 0x0002, "devmig-sim" } };
	struct devmig_dev *odst;
	CHECK(devmig_dev_open_sim(&other, &odst) == 0);
	devmig_dev_set_log(odst, quiet, NULL);
	fd = save(src, DEVMIG_STATE_STOP_COPY);
	expect_refused(odst, load(odst, fd), -EXDEV, 0);
	close(fd);
	CHECK(devmig_set_state(src, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == 0);
	devmig_dev_close(odst);

	/* The target refuses a write midway: reset. */
	CHECK(devmig_sim_fail_write(dst, 10000, EIO) == 0);
	fd = save(src, DEVMIG_STATE_STOP_COPY);
	expect_refused(dst, load(dst, fd), -EIO, 1);
	close(fd);
	devmig_sim_clear_faults(dst);
	CHECK(devmig_set_state(src, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == 0);

	/* The source device corrupts its own data: the stream verifies (it
	 * carries what the device gave), the target driver refuses it on
	 * RESUMING -> STOP, and the device is reset. */
	CHECK(devmig_sim_corrupt(src, 9000) == 0);
	fd = save(src, DEVMIG_STATE_STOP_COPY);
	expect_refused(dst, load(dst, fd), -EIO, 2);
	close(fd);
	CHECK(devmig_set_state(src, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == 0);

	/* A peer that went away is an error, not a SIGPIPE (which would end
	 * this test process). */
	int sv[2];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	close(sv[1]);
	CHECK(devmig_set_state(src, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_stream_save(src, sv[0]) == -EPIPE);
	close(sv[0]);
	CHECK(devmig_set_state(src, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == 0);

	/* Not RESUMING: nothing is read. */
	fd = memfd_create("empty", MFD_CLOEXEC);
	CHECK(devmig_stream_load(dst, fd) == -EINVAL);
	CHECK(devmig_stream_save(dst, fd) == -EINVAL);
	close(fd);
	devmig_dev_close(dst);
	devmig_dev_close(src);
}

/* ---- the encoder on an fd: whole frames in one system call each, and
 * writes cut short by signals resumed where they stopped ---- */

static void on_alarm(int sig)
{
	(void)sig;
}

struct slow_reader {
	int fd;
	struct mem got;
};

static void *slow_read(void *arg)
{
	struct slow_reader *s = arg;
	uint8_t buf[3000];
	ssize_t n;

	/* Small reads with pauses keep the writer blocked on a full socket,
	 * where the timer's signals interrupt it part way. */
	while ((n = read(s->fd, buf, sizeof(buf))) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			break;
		mem_write(&s->got, buf, (size_t)n);
		if (s->got.len % 7 == 0)
			usleep(50);
	}
	return NULL;
}

static void test_fd_writes(void)
{
	struct sigaction sa = { 0 }, old;
	struct itimerval it = { { 0, 300 }, { 0, 300 } }, off = { { 0, 0 }, { 0, 0 } };
	struct slow_reader sr = { 0 };
	struct mem want = make_stream(&DESC, 5, 300000);
	struct devmig_stream_enc e;
	pthread_t th;
	int sv[2], sndbuf = 4096, fd;
	uint8_t *p = malloc(300000);

	for (size_t i = 0; i < 300000; i++)
		p[i] = (uint8_t)(i * 31 + 7);
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	sr.fd = sv[1];
	CHECK(pthread_create(&th, NULL, slow_read, &sr) == 0);
	sa.sa_handler = on_alarm; /* no SA_RESTART: sendmsg returns short */
	sigaction(SIGALRM, &sa, &old);
	setitimer(ITIMER_REAL, &it, NULL);
	fd = sv[0];
	CHECK(devmig_stream_enc_begin(&e, &DESC, 5 * 300000, devmig_fd_write_all, &fd) == 0);
	for (int f = 0; f < 5; f++) {
		p[0] = (uint8_t)f;
		CHECK(devmig_stream_enc_data(&e, p, 300000) == 0);
	}
	CHECK(devmig_stream_enc_finish(&e) == 0);
	setitimer(ITIMER_REAL, &off, NULL);
	sigaction(SIGALRM, &old, NULL);
	close(sv[0]);
	pthread_join(th, NULL);
	close(sv[1]);
	/* Byte for byte the stream the in-memory sink got. */
	CHECK(sr.got.len == want.len);
	CHECK(sr.got.len == want.len && memcmp(sr.got.b, want.b, want.len) == 0);
	CHECK(decode(sr.got.b, sr.got.len, 65536, NULL, NULL) == 0);
	free(sr.got.b);
	free(want.b);
	free(p);
}

static const uint8_t KEY[DEVMIG_STREAM_KEY_LEN] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
						     17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32 };

static struct mem make_keyed(const uint8_t *key, size_t len)
{
	struct devmig_stream_enc e;
	struct mem m = { 0 };
	uint8_t *p = malloc(len + 1);

	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)(i * 13 + 1);
	CHECK(devmig_stream_enc_begin_keyed(&e, &DESC, len, key, mem_write, &m) == 0);
	CHECK(devmig_stream_enc_data(&e, p, len) == 0);
	CHECK(devmig_stream_enc_finish(&e) == 0);
	free(p);
	return m;
}

/* Feed a whole stream to d and finish it; frees d. */
static int run_decoder(struct devmig_stream_dec *d, const uint8_t *buf, size_t len,
		       const char **why)
{
	int r = devmig_stream_dec_feed(d, buf, len);

	if (r == 0)
		r = devmig_stream_dec_finish(d);
	if (why)
		*why = devmig_stream_dec_why(d);
	devmig_stream_dec_free(d);
	return r;
}

static int decode_keyed(const uint8_t *buf, size_t len, const uint8_t *key, const char **why)
{
	struct devmig_stream_dec *d;

	CHECK(devmig_stream_dec_new_keyed(&DESC, key, NULL, NULL, &d) == 0);
	return run_decoder(d, buf, len, why);
}

/* The keyed MAC: verifies under its key only, never mixes with SHA-256
 * streams, covers the header, and uses a fresh nonce per stream. */
static void test_keyed(void)
{
	uint8_t other[DEVMIG_STREAM_KEY_LEN];
	struct mem s = make_keyed(KEY, 3000), t = make_keyed(KEY, 3000), u = make_stream(&DESC, 1, 3000);
	const char *why;
	uint8_t *b = malloc(s.len);

	memcpy(other, KEY, sizeof(other));
	other[31] ^= 1;
	CHECK(decode_keyed(s.b, s.len, KEY, NULL) == 0);
	CHECK(decode_keyed(s.b, s.len, other, &why) == -EBADMSG);
	CHECK(strstr(why, "MAC") != NULL);
	CHECK(decode(s.b, s.len, 4096, NULL, &why) == -EBADMSG); /* no key */
	CHECK(strstr(why, "has no key") != NULL);
	CHECK(decode_keyed(u.b, u.len, KEY, &why) == -EBADMSG); /* SHA-256 stream */
	CHECK(strstr(why, "needs the MAC") != NULL);
	/* Two streams of the same bytes: different nonces, different tags. */
	CHECK(s.len == t.len && memcmp(s.b + 60, t.b + 60, 16) != 0);
	CHECK(memcmp(s.b + s.len - 32, t.b + t.len - 32, 16) != 0);
	/* A header field changed with its CRC fixed: the MAC still refuses. */
	memcpy(b, s.b, s.len);
	b[48] ^= 1; /* the expected size */
	fix_header(b);
	CHECK(decode_keyed(b, s.len, KEY, &why) == -EBADMSG);
	/* A payload byte changed with the frame CRC fixed: refused. */
	memcpy(b, s.b, s.len);
	b[FRAME(0, 3000) + DEVMIG_STREAM_FRAME_HDR_LEN + 7] ^= 0x40;
	uint32_t c = devmig_crc32c(devmig_crc32c(0, b + FRAME(0, 3000), 16),
				   b + FRAME(0, 3000) + DEVMIG_STREAM_FRAME_HDR_LEN, 3000);
	memcpy(b + FRAME(0, 3000) + 16, &c, 4);
	CHECK(decode_keyed(b, s.len, KEY, &why) == -EBADMSG);
	CHECK(strstr(why, "MAC") != NULL);
	free(b);
	free(s.b);
	free(t.b);
	free(u.b);
}

/* GHASH: the portable and carry-less implementations agree on every
 * length and split (the Python tests check both against AES-GCM). */
static void test_ghash_impls(void)
{
	/* Lengths and splits around the aggregation boundaries: 8 blocks
	 * (PCLMULQDQ), 64 blocks = 1024 bytes (VPCLMULQDQ). */
	static const size_t lens[] = { 0, 7, 21, 49, 105, 217, 441, 889, 1023, 1024, 1025, 1785,
				       2048, 2064, 3079, 4096, 4999 };
	static uint8_t data[5000];
	uint8_t h[16], a[16], b[16];
	struct devmig_ghash g1, g2;

	for (int i = 0; i < 16; i++)
		h[i] = (uint8_t)(i * 37 + 5);
	for (size_t i = 0; i < sizeof(data); i++)
		data[i] = (uint8_t)(i * 101 + 3);
	for (int impl = DEVMIG_IMPL_X86; impl <= DEVMIG_IMPL_X86_512; impl++) {
	if (devmig_ghash_init_impl(&g2, h, impl) == -ENOTSUP)
		continue; /* not on this CPU */
	for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
		size_t len = lens[li];

		for (size_t split = 1; split < 3000; split = split * 3 + 2) {
			CHECK(devmig_ghash_init_impl(&g1, h, DEVMIG_IMPL_PORTABLE) == 0);
			CHECK(devmig_ghash_init_impl(&g2, h, impl) == 0);
			devmig_ghash_update(&g1, data, len);
			for (size_t o = 0; o < len; o += split)
				devmig_ghash_update(&g2, data + o, len - o < split ? len - o : split);
			devmig_ghash_final(&g1, a);
			devmig_ghash_final(&g2, b);
			CHECK(memcmp(a, b, 16) == 0);
		}
	}
	}
}

struct collect {
	struct mem m;
	int calls;
};

static int collect_payload(void *ctx, const void *buf, size_t len)
{
	struct collect *c = ctx;

	c->calls++;
	return mem_write(&c->m, buf, len);
}

/* A sealed stream of len bytes (i * 13 + 1), framed in pieces of piece. */
static struct mem make_sealed(const uint8_t *key, size_t len, size_t piece)
{
	struct devmig_stream_enc e;
	struct mem m = { 0 };
	uint8_t *p = malloc(len + 1);

	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)(i * 13 + 1);
	CHECK(devmig_stream_enc_begin_sealed(&e, &DESC, len, key, mem_write, &m) == 0);
	CHECK(devmig_stream_enc_data(&e, p, len) == -EINVAL); /* would need to encrypt in place */
	for (size_t o = 0; o < len; o += piece)
		CHECK(devmig_stream_enc_data_mut(&e, p + o, len - o < piece ? len - o : piece) == 0);
	CHECK(devmig_stream_enc_finish(&e) == 0);
	free(p);
	return m;
}

static int decode_sealed(const uint8_t *buf, size_t len, const uint8_t *key, struct collect *c,
			 const char **why)
{
	struct devmig_stream_dec *d;

	CHECK(devmig_stream_dec_new_sealed(&DESC, key, collect_payload, c, &d) == 0);
	return run_decoder(d, buf, len, why);
}

/* Sealed streams: the payload never appears on the wire, decrypts to
 * itself across any framing, and a receiver with another key, or of
 * another kind, refuses the stream at its header, before any payload. */
static void test_sealed(void)
{
	uint8_t other[DEVMIG_STREAM_KEY_LEN], plain[64];
	const char *why;

	if (!devmig_aes256_available())
		return; /* no AES-NI: sealed streams are not offered (checked in Python) */
	memcpy(other, KEY, sizeof(other));
	other[0] ^= 0x80;
	for (size_t i = 0; i < sizeof(plain); i++)
		plain[i] = (uint8_t)(i * 13 + 1);
	for (size_t piece = 1; piece < 5000; piece = piece * 7 + 3) {
		struct mem s = make_sealed(KEY, 5000, piece);
		struct collect c = { 0 };

		CHECK(decode_sealed(s.b, s.len, KEY, &c, NULL) == 0);
		CHECK(c.m.len == 5000);
		for (size_t i = 0; i < c.m.len; i++)
			if (c.m.b[i] != (uint8_t)(i * 13 + 1)) {
				CHECK(!"sealed payload decrypted wrong");
				break;
			}
		CHECK(memmem(s.b, s.len, plain, 16) == NULL); /* the wire never shows it */
		free(c.m.b);
		free(s.b);
	}
	struct mem s = make_sealed(KEY, 3000, 1000), t = make_keyed(KEY, 3000);
	struct collect c = { 0 };

	CHECK(s.b[56] == DEVMIG_DIGEST_SEALED);
	CHECK(decode_sealed(s.b, s.len, other, &c, &why) == -EBADMSG);
	CHECK(strstr(why, "another key") != NULL && c.calls == 0); /* refused at the header */
	CHECK(decode_keyed(s.b, s.len, KEY, &why) == -EBADMSG);    /* a MAC-only receiver */
	CHECK(strstr(why, "sealed") != NULL);
	CHECK(decode(s.b, s.len, 4096, NULL, &why) == -EBADMSG); /* no key at all */
	CHECK(decode_sealed(t.b, t.len, KEY, &c, &why) == -EBADMSG); /* MAC only, to a sealed one */
	CHECK(strstr(why, "needs it sealed") != NULL && c.calls == 0);
	/* A ciphertext byte changed with its frame CRC fixed: the MAC refuses. */
	s.b[FRAME(0, 1000) + DEVMIG_STREAM_FRAME_HDR_LEN + 5] ^= 1;
	uint32_t crc = devmig_crc32c(devmig_crc32c(0, s.b + FRAME(0, 1000), 16),
				     s.b + FRAME(0, 1000) + DEVMIG_STREAM_FRAME_HDR_LEN, 1000);
	memcpy(s.b + FRAME(0, 1000) + 16, &crc, 4);
	CHECK(decode_sealed(s.b, s.len, KEY, &c, &why) == -EBADMSG);
	CHECK(strstr(why, "MAC") != NULL);
	free(c.m.b);
	free(s.b);
	free(t.b);
}

/* AES-256-CTR: AES-NI and VAES agree at every offset and length, and
 * any split of a run gives the same bytes (OpenSSL checks the values, in
 * Python). */
static void test_aes_impls(void)
{
	static uint8_t a[5000], b[5000];
	struct devmig_aes256 x, y;
	const uint8_t iv[8] = { 9, 8, 7, 6, 5, 4, 3, 2 };

	if (devmig_aes256_init_impl(&x, KEY, DEVMIG_IMPL_X86) == -ENOTSUP)
		return;
	CHECK(devmig_aes256_init_impl(&y, KEY, DEVMIG_IMPL_PORTABLE) == -ENOTSUP); /* by design */
	if (devmig_aes256_init_impl(&y, KEY, DEVMIG_IMPL_X86_512) == -ENOTSUP)
		CHECK(devmig_aes256_init_impl(&y, KEY, DEVMIG_IMPL_X86) == 0);
	for (uint64_t off = 0; off < 70; off += 13) {
		for (size_t len = 0; len < sizeof(a); len = len * 3 + 5) {
			memset(a, 0, sizeof(a));
			memset(b, 0, sizeof(b));
			devmig_aes256_ctr_xor(&x, iv, off, a, len);
			for (size_t o = 0; o < len; o += 37 + o / 3)
				devmig_aes256_ctr_xor(&y, iv, off + o, b + o,
						      len - o < 37 + o / 3 ? len - o : 37 + o / 3);
			CHECK(memcmp(a, b, len) == 0);
			/* and twice is the identity */
			devmig_aes256_ctr_xor(&x, iv, off, a, len);
			for (size_t i = 0; i < len; i++)
				if (a[i]) {
					CHECK(!"CTR twice is not the identity");
					break;
				}
		}
	}
}

int main(void)
{
	test_keyed();
	test_sealed();
	test_aes_impls();
	test_ghash_impls();
	test_decoder();
	test_decoder_random_damage();
	test_device_paths();
	test_fd_writes();
	CHECK_DONE();
}
