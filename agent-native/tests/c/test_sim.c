/* The simulated device driven through the public API: the one setter,
 * recovery and reset, the data fd in PRE_COPY and STOP_COPY, PRE_COPY
 * info, the data size estimate, resuming validation and fault injection. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "devmig/devmig.h"
#include "devmig/sim.h"
#include "devmig/stream.h"

#define ALL (DEVMIG_MIG_STOP_COPY | DEVMIG_MIG_P2P | DEVMIG_MIG_PRE_COPY)

static char logbuf[8192];
static void capture(void *ctx, const char *line)
{
	(void)ctx;
	strncat(logbuf, line, sizeof(logbuf) - strlen(logbuf) - 2);
	strcat(logbuf, "\n");
}

static struct devmig_dev *open_sim(uint64_t flags, uint64_t mem, uint32_t rate, uint64_t seed)
{
	struct devmig_sim_config cfg = { .flags = flags, .mem_size = mem, .dirty_pages_per_mib = rate,
					 .seed = seed };
	struct devmig_dev *d = NULL;

	CHECK(devmig_dev_open_sim(&cfg, &d) == 0);
	if (d)
		devmig_dev_set_log(d, capture, NULL);
	return d;
}

static int to_dev(void *ctx, const void *buf, size_t len)
{
	long n = devmig_data_write(ctx, buf, len);

	return n < 0 ? (int)n : 0;
}

static uint64_t calls(struct devmig_dev *d)
{
	struct devmig_sim_stats st;

	devmig_sim_stats(d, &st);
	return st.set_state_calls;
}

static uint64_t digest(struct devmig_dev *d)
{
	uint64_t v = 0;

	devmig_sim_mem_digest(d, &v);
	return v;
}

/* Live migration with PRE_COPY rounds, source to target, in one process. */
static void test_live_migration(void)
{
	struct devmig_dev *src = open_sim(ALL, 256 * 1024, 16, 1), *dst = open_sim(ALL, 256 * 1024, 0, 2);
	struct devmig_precopy_info pi;
	uint64_t moved = 0, left, size0, size1, want;
	int fd, rounds = 0, r;

	CHECK(digest(src) != digest(dst));
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, &fd) == 0 && fd >= 0);
	CHECK(devmig_data_size(src, &size0) == 0 && size0 == 32 + 64 * 4112 + 16);
	CHECK(devmig_set_state(src, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, &fd) == 0 && fd >= 0);

	/* initial_bytes counts down as the fd is read. */
	CHECK(devmig_precopy_info(src, &pi) == 0 && pi.initial_bytes == 32 + 64 * 4112 && pi.dirty_bytes == 0);
	uint8_t buf[10000];
	CHECK(devmig_data_read(src, buf, sizeof(buf)) == (long)sizeof(buf));
	CHECK(to_dev(dst, buf, sizeof(buf)) == 0);
	moved += sizeof(buf);
	CHECK(devmig_precopy_info(src, &pi) == 0 && pi.initial_bytes == 32 + 64 * 4112 - sizeof(buf));

	/* Read to the temporary end; the workload dirtied pages meanwhile. */
	while ((r = devmig_data_drain(src, to_dev, dst, &moved)) == 0) {
		CHECK(devmig_precopy_initial_done(src, &left) == 1);
		rounds++;
		if (left == 0 || rounds > 50)
			break;
	}
	CHECK(r == 0);
	CHECK(rounds >= 2); /* 16 pages per MiB read: more rounds than one */
	/* A raw read() at the temporary end returns 0, like mtty. */
	CHECK(read(devmig_data_fd(src), buf, 1) == 0);
	CHECK(devmig_data_read(src, buf, 1) == -ENOMSG);

	/* The guest keeps writing: dirty_bytes grows. */
	CHECK(devmig_sim_touch(src, 3) == 0 && devmig_sim_touch(src, 9) == 0);
	CHECK(devmig_precopy_info(src, &pi) == 0 && pi.initial_bytes == 0 && pi.dirty_bytes >= 2 * 4112);
	CHECK(devmig_data_size(src, &size1) == 0 && size1 >= 2 * 4112 + 16);

	/* Stop and copy: through PRE_COPY_P2P, same fd. */
	int fd_before = devmig_data_fd(src);
	CHECK(devmig_set_state(src, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, &fd) == 0);
	CHECK(fd == fd_before);
	CHECK(strstr(logbuf, "PRE_COPY -> STOP_COPY (via PRE_COPY_P2P)") != NULL);
	CHECK(devmig_sim_touch(src, 1) == -EBUSY); /* stopped: nothing changes */
	want = digest(src);
	CHECK(devmig_precopy_info(src, &pi) == -EINVAL);
	/* The STOP_COPY estimate shrinks as the rest is read. */
	CHECK(devmig_data_size(src, &size0) == 0 && size0 >= 2 * 4112 + 16);
	CHECK(devmig_data_read(src, buf, 4112) == 4112);
	CHECK(to_dev(dst, buf, 4112) == 0);
	CHECK(devmig_data_size(src, &size1) == 0 && size1 == size0 - 4112);
	CHECK(devmig_data_drain(src, to_dev, dst, &moved) == 1);
	CHECK(devmig_data_size(src, &size1) == 0 && size1 == 0);
	CHECK(devmig_data_read(src, buf, 1) == 0);
	CHECK(devmig_set_state(src, DEVMIG_STATE_STOP, DEVMIG_STATE_ERROR, NULL) == 0);
	CHECK(devmig_data_fd(src) == -1);

	/* The target validates and installs it. */
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL) == 0);
	CHECK(strstr(logbuf, "RESUMING -> RUNNING (via STOP, RUNNING_P2P)") != NULL);
	CHECK(digest(dst) == want);
	struct devmig_sim_stats st;
	CHECK(devmig_sim_stats(dst, &st) == 0 && st.loads == 1);
	devmig_dev_close(src);
	devmig_dev_close(dst);
}

static void test_refusals(void)
{
	struct devmig_dev *d = open_sim(ALL, 0, 0, 0);
	uint64_t c;

	CHECK(devmig_set_state(d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	c = calls(d);
	logbuf[0] = 0;
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	CHECK(devmig_set_state(d, DEVMIG_STATE_ERROR, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	CHECK(devmig_set_state(d, 9, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	CHECK(calls(d) == c); /* none reached the device */
	CHECK(devmig_dev_state(d) == DEVMIG_STATE_STOP_COPY);
	CHECK(strstr(logbuf, "STOP_COPY -> PRE_COPY refused") != NULL);
	devmig_dev_close(d);

	/* The VMM moved the device to STOP_COPY through its own fd: the
	 * record says RUNNING, yet a PRE_COPY request is judged from the
	 * device's real state and refused before any set reaches it. */
	d = open_sim(ALL, 8192, 0, 0);
	CHECK(devmig_sim_external_set_state(d, DEVMIG_STATE_STOP_COPY) == 0);
	CHECK(devmig_dev_state(d) == DEVMIG_STATE_RUNNING);
	c = calls(d);
	logbuf[0] = 0;
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	CHECK(calls(d) == c);
	CHECK(devmig_dev_state(d) == DEVMIG_STATE_STOP_COPY);
	CHECK(strstr(logbuf, "device is in STOP_COPY, not RUNNING as recorded") != NULL);
	CHECK(strstr(logbuf, "STOP_COPY -> PRE_COPY refused") != NULL);
	/* A stale STOP_COPY record errs on the safe side: refused until the
	 * state is read again. */
	CHECK(devmig_sim_external_set_state(d, DEVMIG_STATE_RUNNING) == 0);
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	uint32_t now;
	CHECK(devmig_get_state(d, &now) == 0 && now == DEVMIG_STATE_RUNNING);
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_dev_state(d) == DEVMIG_STATE_PRE_COPY_P2P);
	devmig_dev_close(d);

	/* A device without PRE_COPY or P2P. */
	d = open_sim(DEVMIG_MIG_STOP_COPY, 8192, 0, 0);
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	CHECK(devmig_set_state(d, DEVMIG_STATE_RUNNING_P2P, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	CHECK(calls(d) == 0);
	CHECK(devmig_set_state(d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	struct devmig_sim_stats st;
	devmig_sim_stats(d, &st);
	CHECK(st.last_path_len == 2 && st.last_path[0] == DEVMIG_STATE_STOP &&
	      st.last_path[1] == DEVMIG_STATE_STOP_COPY);
	devmig_dev_close(d);
}

static void test_failure_recovery(void)
{
	struct devmig_dev *d = open_sim(ALL, 8192, 0, 0);
	struct devmig_sim_stats st;
	uint32_t s;

	/* Fails midway (in RUNNING_P2P): recovered to RUNNING, errno kept. */
	CHECK(devmig_sim_fail_arc(d, DEVMIG_STATE_RUNNING_P2P, DEVMIG_STATE_STOP, EIO, 0) == 0);
	logbuf[0] = 0;
	CHECK(devmig_set_state(d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == -EIO);
	CHECK(devmig_get_state(d, &s) == 0 && s == DEVMIG_STATE_RUNNING);
	CHECK(strstr(logbuf, "device is in RUNNING_P2P after the failure") != NULL);
	CHECK(strstr(logbuf, "RUNNING_P2P -> RUNNING (recovery)") != NULL);
	devmig_sim_stats(d, &st);
	CHECK(st.reset_calls == 0);
	/* The fault stays armed. */
	CHECK(devmig_set_state(d, DEVMIG_STATE_STOP, DEVMIG_STATE_RUNNING, NULL) == -EIO);
	CHECK(devmig_sim_clear_faults(d) == 0);

	/* Fails into ERROR: only reset gets out. */
	CHECK(devmig_sim_fail_arc(d, DEVMIG_STATE_STOP, DEVMIG_STATE_STOP_COPY, ENODEV, 1) == 0);
	CHECK(devmig_set_state(d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == -ENODEV);
	CHECK(devmig_get_state(d, &s) == 0 && s == DEVMIG_STATE_RUNNING);
	devmig_sim_stats(d, &st);
	CHECK(st.reset_calls == 1);
	CHECK(devmig_sim_clear_faults(d) == 0);

	/* Recovery itself fails: reset. */
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_sim_fail_arc(d, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_STOP_COPY, EIO, 0) == 0);
	CHECK(devmig_set_state(d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_STOP_COPY, NULL) == -EIO);
	CHECK(devmig_dev_state(d) == DEVMIG_STATE_RUNNING);
	CHECK(devmig_data_fd(d) == -1);
	devmig_sim_stats(d, &st);
	CHECK(st.reset_calls == 2);
	CHECK(devmig_sim_clear_faults(d) == 0);

	/* Recovery to the state it is already in is no request at all. */
	CHECK(devmig_sim_fail_arc(d, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING_P2P, EAGAIN, 0) == 0);
	uint64_t c = calls(d);
	CHECK(devmig_set_state(d, DEVMIG_STATE_STOP, DEVMIG_STATE_RUNNING, NULL) == -EAGAIN);
	CHECK(calls(d) == c + 1);
	devmig_dev_close(d);
}

static int no_data_expected(void *ctx, const void *p, size_t len)
{
	(void)ctx;
	(void)p;
	(void)len;
	return -EIO; /* nothing is expected to arrive */
}

/* A full STOP_COPY image of src into a buffer. */
struct image {
	uint8_t buf[64 * 1024];
	size_t len;
};
static int to_image(void *ctx, const void *p, size_t len)
{
	struct image *im = ctx;

	if (im->len + len > sizeof(im->buf))
		return -ENOSPC;
	memcpy(im->buf + im->len, p, len);
	im->len += len;
	return 0;
}

static void save(struct devmig_dev *src, struct image *im)
{
	im->len = 0;
	CHECK(devmig_set_state(src, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_data_drain(src, to_image, im, NULL) == 1);
	CHECK(devmig_set_state(src, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == 0);
}

static void test_resume_validation(void)
{
	struct devmig_dev *src = open_sim(ALL, 8192, 0, 5), *dst = open_sim(ALL, 8192, 0, 6);
	static struct image im;
	struct devmig_sim_stats st;
	uint32_t s;

	save(src, &im);
	CHECK(im.len == 32 + 2 * 4112 + 16);

	/* Short data: RESUMING -> STOP refuses, the device lands in ERROR,
	 * and since recovery from ERROR is impossible it is reset. */
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_data_write(dst, im.buf, im.len - 20) == (long)(im.len - 20));
	CHECK(devmig_set_state(dst, DEVMIG_STATE_STOP, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	CHECK(devmig_get_state(dst, &s) == 0 && s == DEVMIG_STATE_RUNNING);
	CHECK(digest(dst) != digest(src));
	devmig_sim_stats(dst, &st);
	CHECK(st.loads == 0 && st.reset_calls == 1);

	/* A flipped byte in a page: -EIO. */
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL) == 0);
	im.buf[100] ^= 1;
	CHECK(devmig_data_write(dst, im.buf, im.len) == (long)im.len);
	im.buf[100] ^= 1;
	CHECK(devmig_set_state(dst, DEVMIG_STATE_STOP, DEVMIG_STATE_RUNNING, NULL) == -EIO);
	CHECK(devmig_dev_state(dst) == DEVMIG_STATE_RUNNING);

	/* A bad header is refused by the write (-EFAULT, as mtty), which
	 * poisons the device: it may not leave RESUMING until reset. */
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL) == 0);
	im.buf[0] ^= 1;
	CHECK(devmig_data_write(dst, im.buf, im.len) == -EFAULT);
	im.buf[0] ^= 1;
	CHECK(devmig_dev_poisoned(dst));
	uint64_t c = calls(dst);
	CHECK(devmig_set_state(dst, DEVMIG_STATE_STOP, DEVMIG_STATE_RUNNING, NULL) == -EIO);
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == -EIO);
	CHECK(calls(dst) == c && devmig_dev_state(dst) == DEVMIG_STATE_RESUMING);
	CHECK(devmig_data_write(dst, im.buf, 1) == -EIO);
	CHECK(devmig_reset(dst) == 0 && !devmig_dev_poisoned(dst));
	CHECK(devmig_dev_state(dst) == DEVMIG_STATE_RUNNING && devmig_data_fd(dst) == -1);

	/* A refused write (fault injection) poisons as well. */
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_sim_fail_write(dst, 5000, ENOSPC) == 0);
	CHECK(devmig_data_write(dst, im.buf, im.len) == -ENOSPC);
	CHECK(devmig_dev_poisoned(dst));
	CHECK(devmig_reset(dst) == 0);
	CHECK(devmig_sim_clear_faults(dst) == 0);

	/* The device itself corrupting its stream is caught on resume. */
	CHECK(devmig_sim_corrupt(src, 4200) == 0);
	save(src, &im);
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_data_write(dst, im.buf, im.len) == (long)im.len);
	CHECK(devmig_set_state(dst, DEVMIG_STATE_STOP, DEVMIG_STATE_RUNNING, NULL) == -EIO);

	/* And a good image loads. */
	save(src, &im);
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_data_write(dst, im.buf, 7) == 7); /* any segmentation */
	CHECK(devmig_data_write(dst, im.buf + 7, im.len - 7) == (long)im.len - 7);
	CHECK(devmig_set_state(dst, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL) == 0);
	CHECK(digest(dst) == digest(src));
	devmig_dev_close(src);
	devmig_dev_close(dst);
}

/* Both spellings of PRE_COPY's temporary end come out as -ENOMSG, and
 * neither is taken for the end of the stream. */
static void test_temporary_end_variants(void)
{
	for (int enomsg = 0; enomsg < 2; enomsg++) {
		struct devmig_sim_config cfg = { .mem_size = 8192, .precopy_end_enomsg = enomsg };
		struct devmig_dev *d;
		uint8_t buf[16384];
		uint64_t n = 0;

		CHECK(devmig_dev_open_sim(&cfg, &d) == 0);
		devmig_dev_set_log(d, capture, NULL);
		CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
		CHECK(devmig_data_read(d, buf, sizeof(buf)) == 32 + 2 * 4112);
		CHECK(devmig_data_read(d, buf, sizeof(buf)) == -ENOMSG);
		CHECK(devmig_data_drain(d, no_data_expected, NULL, &n) == 0 && n == 0);
		CHECK(devmig_set_state(d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
		CHECK(devmig_data_read(d, buf, sizeof(buf)) == 16); /* the end record */
		CHECK(devmig_data_read(d, buf, sizeof(buf)) == 0);  /* the real end */
		devmig_dev_close(d);
	}
}

static void test_misc(void)
{
	struct devmig_dev *d = open_sim(ALL, 4096, 0, 0);
	int fd;

	CHECK(devmig_dev_is_sim(d));
	CHECK(devmig_dev_flags(d) == ALL);
	CHECK_STREQ(devmig_dev_desc(d)->driver, "devmig-sim");
	/* No session: nothing to read or write. */
	uint8_t b[4];
	CHECK(devmig_data_read(d, b, 4) == -EBADF);
	CHECK(devmig_data_write(d, b, 4) == -EBADF);
	/* Reset closes the session; its fd is the kernel's to disable. */
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_RUNNING, &fd) == 0 && fd >= 0);
	CHECK(devmig_reset(d) == 0 && devmig_data_fd(d) == -1);
	CHECK(devmig_sim_touch(d, 1) == -EINVAL); /* one page only */
	devmig_dev_close(d);
}

/* The device's digest: every implementation gives the portable one's value
 * at every length (whole 64-byte steps and tails), copying or not, and it
 * changes when one bit changes or two blocks swap. */
static void test_digest(void)
{
	size_t n = 3 * 4096;
	uint8_t *src = malloc(n), *dst = NULL;
	uint64_t want, got, x = 0x243f6a8885a308d3ull;
	int impls[] = { DEVMIG_IMPL_AUTO, DEVMIG_IMPL_X86_512 };

	CHECK(src != NULL && posix_memalign((void **)&dst, 64, n) == 0);
	if (!src || !dst)
		return;
	for (size_t i = 0; i < n; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		src[i] = (uint8_t)x;
	}
	CHECK(devmig_sim_digest_impl(99, NULL, src, n, &got) == -ENOTSUP);
	for (size_t i = 0; i < sizeof(impls) / sizeof(impls[0]); i++) {
		if (devmig_sim_digest_impl(impls[i], NULL, src, 1, &got) == -ENOTSUP) {
			printf("sim digest impl %d not on this CPU\n", impls[i]);
			continue;
		}
		for (size_t len = 0; len < 300; len++) {
			CHECK(devmig_sim_digest_impl(DEVMIG_IMPL_PORTABLE, NULL, src + 1, len, &want) == 0);
			CHECK(devmig_sim_digest_impl(impls[i], NULL, src + 1, len, &got) == 0);
			CHECK(got == want);
		}
		memset(dst, 0, n);
		CHECK(devmig_sim_digest_impl(DEVMIG_IMPL_PORTABLE, NULL, src + 3, n - 64, &want) == 0);
		CHECK(devmig_sim_digest_impl(impls[i], dst, src + 3, n - 64, &got) == 0);
		CHECK(got == want && memcmp(dst, src + 3, n - 64) == 0);
		printf("sim digest impl %d checked\n", impls[i]);
	}
	CHECK(devmig_sim_digest_impl(DEVMIG_IMPL_AUTO, NULL, src, 4096, &want) == 0);
	src[100] ^= 0x10;
	CHECK(devmig_sim_digest_impl(DEVMIG_IMPL_AUTO, NULL, src, 4096, &got) == 0 && got != want);
	src[100] ^= 0x10;
	memcpy(dst, src, 64);
	memcpy(src, src + 64, 64);
	memcpy(src + 64, dst, 64);
	CHECK(devmig_sim_digest_impl(DEVMIG_IMPL_AUTO, NULL, src, 4096, &got) == 0 && got != want);
	/* A page of zeros and a page of ones differ too (no half-zero blind spot). */
	memset(src, 0, 4096);
	CHECK(devmig_sim_digest_impl(DEVMIG_IMPL_AUTO, NULL, src, 4096, &want) == 0);
	src[4095] = 1;
	CHECK(devmig_sim_digest_impl(DEVMIG_IMPL_AUTO, NULL, src, 4096, &got) == 0 && got != want);
	free(src);
	free(dst);
}

/* The device's reads copy from its own view of the stream, which maps
 * four images of it; read() on the data fd reads the same stream, from the
 * same offset. Taking turns, each chunk equals the fd's bytes at its
 * offset, in the view and past its end (the initial image and seven rounds
 * of every page dirtied make eight images). */
static void test_reads_and_raw_reads_share_one_stream(void)
{
	const uint64_t pages = 16, image = 32 + pages * 4112 + 16;
	struct devmig_dev *d = open_sim(ALL, pages * 4096, 0, 3);
	struct devmig_precopy_info pi;
	uint8_t got[4096], want[4096];
	uint64_t off = 0;
	int fd = -1, turn = 0;

	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, &fd) == 0);
	fd = devmig_data_fd(d);
	CHECK(fd >= 0);
	for (int round = 0; round < 8; round++) {
		for (;; turn++) {
			/* Odd sizes, so chunks straddle records and pages. */
			long n = turn % 2 ? (long)read(fd, got, 1000) : devmig_data_read(d, got, 3001);

			if (n == 0 || n == -ENOMSG)
				break;
			CHECK(n > 0);
			if (n <= 0)
				break;
			CHECK(pread(fd, want, (size_t)n, (off_t)off) == n);
			CHECK(memcmp(got, want, (size_t)n) == 0);
			off += (uint64_t)n;
		}
		for (uint64_t p = 0; p < pages; p++)
			CHECK(devmig_sim_touch(d, p) == 0);
		CHECK(devmig_precopy_info(d, &pi) == 0 && pi.dirty_bytes == pages * 4112);
	}
	CHECK(off == image - 16 + 7 * pages * 4112);
	CHECK(off > 4 * image); /* past the view's end */
	devmig_dev_close(d);
}

int main(void)
{
	test_digest();
	test_live_migration();
	test_refusals();
	test_failure_recovery();
	test_resume_validation();
	test_temporary_end_variants();
	test_reads_and_raw_reads_share_one_stream();
	test_misc();
	CHECK_DONE();
}
