/* The native core against the real kernel: the mtty sample driver's
 * migration support (samples/vfio-mdev/mtty.c), two mtty-2 mdevs.
 *
 *   devmig-kernel-test SOURCE_UUID TARGET_UUID
 *
 * Runs as PID 1's child inside the test kernel's initramfs and prints one
 * line per check, "ok NAME" or "not ok NAME: why" (and "skip NAME: why"),
 * then "devmig-kernel-test: N ok, M not ok". Lines starting with "#" are
 * the core's own log. Exit status 0 only when every check passed.
 *
 * The migration: bytes written into the source's UARTs (1-byte writes to
 * BAR0/BAR1 offset 0, the transmit register; mtty loops them back into its
 * receive FIFO), RUNNING -> PRE_COPY, devmig_stream_save (PRE_COPY's data,
 * then STOP_COPY's) into a file, devmig_stream_load into the target in
 * RESUMING, STOP, RUNNING, and the target's UARTs must give the same bytes.
 * Then the refusals: STOP_COPY -> PRE_COPY* refused by the core without an
 * ioctl, and streams the core or the driver reject leave the target reset
 * (RUNNING) with nothing of them loaded. */
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* Only the container and group ioctls come from the system header: they
 * are unchanged since Linux 3.6. Everything about devices and migration
 * goes through the native core and its own uAPI definitions. */
#include <linux/vfio.h>

#include "devmig/devmig.h"
#include "devmig/dirty.h"
#include "devmig/fdpass.h"
#include "devmig/sim.h"
#include "devmig/stream.h"
#include "devmig/vfio.h"

#define UART_RX_TX 0 /* receive/transmit holding register */
#define UART_LSR 5   /* line status register */
#define UART_LSR_DR 0x01
#define UART_IER 1          /* interrupt enable register */
#define UART_IER_RDI 0x01   /* interrupt on received data */
#define UART_FCR 2          /* FIFO control register */
#define UART_FCR_TRIGGER_1 0x01 /* FIFO on, interrupt at 1 byte */

static int n_ok, n_bad;

static void check(const char *name, int cond, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void check(const char *name, int cond, const char *fmt, ...)
{
	va_list ap;

	if (cond) {
		printf("ok %s\n", name);
		n_ok++;
	} else {
		printf("not ok %s: ", name);
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
		printf("\n");
		n_bad++;
	}
	fflush(stdout);
}

static void skip(const char *name, const char *why)
{
	printf("skip %s: %s\n", name, why);
	fflush(stdout);
}

/* ---- the core's log: printed as comments, and counted ---- */

struct logcap {
	const char *who;
	int lines;
	char last[256];
};

static void log_line(void *ctx, const char *line)
{
	struct logcap *c = ctx;

	printf("# %s: %s\n", c->who, line);
	fflush(stdout);
	c->lines++;
	snprintf(c->last, sizeof(c->last), "%s", line);
}

/* ---- opening an mdev: group + type1 container, or cdev + iommufd ---- */

struct vdev {
	const char *uuid;
	struct devmig_vfio_handle h;
	int fd; /* h.device_fd */
	uint64_t bar_off[2];
	struct devmig_dev *dev;
	struct logcap log;
};

static int open_group_type1(struct vdev *v, char *why, size_t whylen)
{
	char link[160], target[PATH_MAX], path[64];
	ssize_t n;
	int r;

	snprintf(link, sizeof(link), "/sys/bus/mdev/devices/%s/iommu_group", v->uuid);
	n = readlink(link, target, sizeof(target) - 1);
	if (n < 0) {
		snprintf(why, whylen, "readlink %.160s: %s", link, strerror(errno));
		return -1;
	}
	target[n] = 0;
	snprintf(path, sizeof(path), "/dev/vfio/%.40s", basename(target));
	r = devmig_vfio_open_group(path, v->uuid, &v->h, why, whylen);
	v->fd = v->h.device_fd;
	return r < 0 ? -1 : 0;
}

/* The mdev's cdev: /sys/bus/mdev/devices/UUID/vfio-dev/vfioN names
 * /dev/vfio/devices/vfioN. */
static int cdev_path(const char *uuid, char *out, size_t len)
{
	char dir[160];
	struct dirent *e;
	DIR *d;

	snprintf(dir, sizeof(dir), "/sys/bus/mdev/devices/%s/vfio-dev", uuid);
	d = opendir(dir);
	if (!d)
		return -errno;
	while ((e = readdir(d)))
		if (!strncmp(e->d_name, "vfio", 4)) {
			snprintf(out, len, "/dev/vfio/devices/%.40s", e->d_name);
			closedir(d);
			return 0;
		}
	closedir(d);
	return -ENOENT;
}

static int open_cdev_iommufd(struct vdev *v, char *why, size_t whylen)
{
	char path[80];
	int r = cdev_path(v->uuid, path, sizeof(path));

	if (r < 0) {
		snprintf(why, whylen, "no cdev for %s: %s", v->uuid, strerror(-r));
		return -1;
	}
	r = devmig_vfio_open_cdev(path, "/dev/iommu", &v->h, why, whylen);
	v->fd = v->h.device_fd;
	return r < 0 ? -1 : 0;
}

/* The descriptor a stream carries: the ids from the device's own PCI
 * config space (region 7), the driver by name. */
static int read_desc(struct vdev *v, struct devmig_dev_desc *desc, char *why, size_t whylen)
{
	struct devmig_region_info ri;
	uint8_t id[4];
	int r = devmig_vfio_get_region_info(v->fd, DEVMIG_VFIO_PCI_CONFIG_REGION_INDEX, &ri);

	if (r < 0) {
		snprintf(why, whylen, "config region info: %s", strerror(-r));
		return -1;
	}
	if (pread(v->fd, id, sizeof(id), (off_t)ri.offset) != (ssize_t)sizeof(id)) {
		snprintf(why, whylen, "config space read: %s", strerror(errno));
		devmig_region_info_free(&ri);
		return -1;
	}
	devmig_region_info_free(&ri);
	memset(desc, 0, sizeof(*desc));
	desc->vendor_id = (uint16_t)(id[0] | id[1] << 8);
	desc->device_id = (uint16_t)(id[2] | id[3] << 8);
	snprintf(desc->driver, sizeof(desc->driver), "mtty");
	for (uint32_t i = 0; i < 2; i++) {
		r = devmig_vfio_get_region_info(v->fd, DEVMIG_VFIO_PCI_BAR0_REGION_INDEX + i, &ri);
		if (r < 0) {
			snprintf(why, whylen, "BAR%u region info: %s", i, strerror(-r));
			return -1;
		}
		v->bar_off[i] = ri.offset;
		devmig_region_info_free(&ri);
	}
	return 0;
}

static int open_vdev(struct vdev *v, const char *who, const char *check_name, int cdev)
{
	char why[512] = "";
	struct devmig_dev_desc desc;
	int r;

	v->fd = -1;
	v->log.who = who;
	if ((cdev ? open_cdev_iommufd(v, why, sizeof(why)) : open_group_type1(v, why, sizeof(why))) < 0 ||
	    read_desc(v, &desc, why, sizeof(why)) < 0) {
		check(check_name, 0, "%s", why);
		return -1;
	}
	r = devmig_dev_open_vfio(v->fd, &desc, &v->dev);
	if (r < 0) {
		check(check_name, 0, "devmig_dev_open_vfio: %s", strerror(-r));
		return -1;
	}
	devmig_dev_set_log(v->dev, log_line, &v->log);
	check(check_name, 1, "%s", "");
	return 0;
}

/* ---- the UART: one byte at a time, as a guest driver would ---- */

static int uart_write(struct vdev *v, int port, const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (pwrite(v->fd, &s[i], 1, (off_t)(v->bar_off[port] + UART_RX_TX)) != 1)
			return -errno;
	return 0;
}

/* Read until the receive FIFO is empty (LSR.DR clear); returns the count. */
static int uart_drain(struct vdev *v, int port, char *buf, size_t max)
{
	size_t n = 0;

	for (;;) {
		uint8_t lsr, c;

		if (pread(v->fd, &lsr, 1, (off_t)(v->bar_off[port] + UART_LSR)) != 1)
			return -errno;
		if (!(lsr & UART_LSR_DR))
			return (int)n;
		if (n == max)
			return -EOVERFLOW;
		if (pread(v->fd, &c, 1, (off_t)(v->bar_off[port] + UART_RX_TX)) != 1)
			return -errno;
		buf[n++] = (char)c;
	}
}

static const char *state_name(uint32_t s)
{
	const char *n = devmig_state_name(s);

	return n ? n : "?";
}

/* The state as the kernel reports it (not the core's record). */
static uint32_t kstate(struct vdev *v)
{
	uint32_t s = 0xffffffffu;

	if (devmig_vfio_mig_get_state(v->fd, &s) < 0)
		return 0xffffffffu;
	return s;
}

static int copy_file(const char *from, const char *to)
{
	char buf[4096];
	int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	ssize_t n;
	int r = 0;

	if (in < 0 || out < 0)
		r = -1;
	while (!r && (n = read(in, buf, sizeof(buf))) > 0)
		if (write(out, buf, (size_t)n) != n)
			r = -1;
	if (in >= 0)
		close(in);
	if (out >= 0)
		close(out);
	return r;
}

/* The device's own payload out of a devmig stream file. */
struct payload {
	uint8_t buf[4096];
	size_t len;
};

static int collect(void *ctx, const void *buf, size_t len)
{
	struct payload *p = ctx;

	if (p->len + len > sizeof(p->buf))
		return -ENOSPC;
	memcpy(p->buf + p->len, buf, len);
	p->len += len;
	return 0;
}

static int read_payload(const char *path, struct payload *p)
{
	struct devmig_stream_dec *dec;
	uint8_t buf[4096];
	ssize_t n;
	int fd = open(path, O_RDONLY), r;

	if (fd < 0)
		return -errno;
	p->len = 0;
	r = devmig_stream_dec_new(NULL, collect, p, &dec);
	while (r == 0 && (n = read(fd, buf, sizeof(buf))) > 0)
		r = devmig_stream_dec_feed(dec, buf, (size_t)n);
	if (r == 0)
		r = devmig_stream_dec_finish(dec);
	if (dec)
		devmig_stream_dec_free(dec);
	close(fd);
	return r;
}

/* Try to load `path` into the running target, which must refuse it: the
 * load fails with `want_err`, the device is reset (RUNNING, not poisoned)
 * and its UART still holds only its own marker. */
static void refused_load(struct vdev *t, const char *name, const char *path, int want_err)
{
	static const char marker[] = "T";
	char got[32];
	int fd, r, n;
	uint32_t ks;

	r = uart_write(t, 0, marker, 1);
	if (r == 0)
		r = devmig_set_state(t->dev, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL);
	if (r < 0) {
		check(name, 0, "setting up: %s", strerror(-r));
		return;
	}
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		check(name, 0, "open %s: %s", path, strerror(errno));
		return;
	}
	r = devmig_stream_load(t->dev, fd);
	close(fd);
	ks = kstate(t);
	n = uart_drain(t, 0, got, sizeof(got));
	check(name,
	      r == want_err && ks == DEVMIG_STATE_RUNNING && devmig_dev_state(t->dev) == DEVMIG_STATE_RUNNING &&
		      !devmig_dev_poisoned(t->dev) && n == 1 && got[0] == marker[0],
	      "load returned %d (%s), want %d (%s); kernel state %s; poisoned %d; UART gave %d bytes",
	      r, r < 0 ? strerror(-r) : "ok", want_err, strerror(-want_err), state_name(ks),
	      devmig_dev_poisoned(t->dev), n);
}

/* ---- cdev + iommufd: exclusivity, a migration, fd handoff ---- */

/* Bind a fresh open of `cdev` to a fresh iommufd: 0 or -errno, and which
 * step refused ("open" or "bind"). */
static int bind_again(const char *cdev, const char **step)
{
	int dfd = open(cdev, O_RDWR | O_CLOEXEC), ifd, r;

	*step = "open";
	if (dfd < 0)
		return -errno;
	ifd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	if (ifd < 0) {
		r = -errno;
		close(dfd);
		return r;
	}
	*step = "bind";
	r = devmig_vfio_device_bind_iommufd(dfd, ifd, NULL);
	close(dfd);
	close(ifd);
	return r;
}

/* In a forked child: keep only the fds named, as a separate VMM process
 * would hold nothing of ours but what it was handed. */
static void keep_only(int a, int b)
{
	for (int fd = 3; fd < 1024; fd++)
		if (fd != a && fd != b)
			close(fd);
}

static void cdev_checks(struct vdev *grp, struct vdev *cs, struct vdev *cd)
{
	static const char msg[] = "via cdev";
	const char *cstream = "/devmig-cdev.bin", *step = "";
	char path[80], got[64];
	int r, n, fd, sv[2], pipefd[2], held;
	pid_t pid;
	long saved;

	if (!cs->dev || !cd->uuid) {
		skip("cdev_second_bind_einval", "no cdev-opened device");
		return;
	}
	/* A cdev already bound: another open of it may not bind too. */
	r = cdev_path(cs->uuid, path, sizeof(path));
	r = r < 0 ? r : bind_again(path, &step);
	check("cdev_second_bind_einval", r == -EINVAL, "%s returned %d (%s), want -EINVAL", step, r,
	      r < 0 ? strerror(-r) : "ok");
	/* A device opened through its group: its cdev may not bind. */
	r = cdev_path(grp->uuid, path, sizeof(path));
	r = r < 0 ? r : bind_again(path, &step);
	check("group_and_cdev_exclusive_ebusy", r == -EBUSY, "%s returned %d (%s), want -EBUSY", step, r,
	      r < 0 ? strerror(-r) : "ok");

	/* A whole migration between two cdev-opened devices. */
	if (open_vdev(cd, "cdev-target", "open_cdev_target", 1) < 0)
		return;
	r = uart_write(cs, 0, msg, strlen(msg));
	if (r == 0)
		r = devmig_set_state(cs->dev, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL);
	fd = r < 0 ? -1 : open(cstream, O_RDWR | O_CREAT | O_TRUNC, 0600);
	saved = r < 0 ? r : fd < 0 ? -errno : devmig_stream_save(cs->dev, fd);
	if (fd >= 0)
		close(fd);
	r = saved < 0 ? (int)saved : devmig_set_state(cs->dev, DEVMIG_STATE_STOP, DEVMIG_STATE_ERROR, NULL);
	if (r == 0)
		r = devmig_set_state(cd->dev, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL);
	fd = r < 0 ? -1 : open(cstream, O_RDONLY);
	if (r == 0)
		r = fd < 0 ? -errno : devmig_stream_load(cd->dev, fd);
	if (fd >= 0)
		close(fd);
	if (r == 0)
		r = devmig_set_state(cd->dev, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL);
	n = r < 0 ? 0 : uart_drain(cd, 0, got, sizeof(got));
	check("cdev_migration_uart_bytes", r == 0 && n == (int)strlen(msg) && !memcmp(got, msg, strlen(msg)),
	      "%s; target UART gave %d bytes \"%.*s\", want \"%s\"", r ? strerror(-r) : "ok", n, n > 0 ? n : 0,
	      got, msg);
	/* The source goes on running (STOP -> RUNNING) for the handoff. */
	if (devmig_set_state(cs->dev, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL) < 0)
		return;

	/* Hand the device fd to another process; both drive the device. The
	 * source's UART still holds what it sent: empty it first. */
	(void)uart_drain(cs, 0, got, sizeof(got));
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0 || pipe(pipefd) < 0) {
		check("fd_handoff_both_drive", 0, "socketpair/pipe: %s", strerror(errno));
		return;
	}
	pid = fork();
	if (pid == 0) {
		uint32_t kind, st = 0;
		char name[DEVMIG_FD_NAME_MAX + 1];
		int vfd;

		keep_only(sv[1], -1);
		if (devmig_fd_recv(sv[1], &vfd, &kind, name, sizeof(name)) < 0 || vfd < 0)
			_exit(10);
		if (devmig_vfio_mig_get_state(vfd, &st) < 0 || st != DEVMIG_STATE_RUNNING)
			_exit(11);
		if (pwrite(vfd, "C", 1, (off_t)(cs->bar_off[0] + UART_RX_TX)) != 1)
			_exit(12);
		_exit(0);
	}
	close(sv[1]);
	r = devmig_fd_send(sv[0], cs->fd, DEVMIG_FD_KIND_VFIO_DEVICE, cs->uuid);
	{
		int status = 0;

		waitpid(pid, &status, 0);
		n = uart_drain(cs, 0, got, sizeof(got));
		check("fd_handoff_both_drive",
		      r == 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0 && n == 1 && got[0] == 'C',
		      "send %d; child exit %d; our UART read %d bytes (want the child's \"C\")", r,
		      WIFEXITED(status) ? WEXITSTATUS(status) : -1, n);
	}
	close(sv[0]);

	/* The device outlives our close while the other process holds its
	 * duplicate; once the last duplicate closes, a data fd still held
	 * reads ENODEV. */
	r = devmig_set_state(cs->dev, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, &fd);
	held = r < 0 ? -1 : dup(fd);
	if (held < 0 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		check("device_lives_while_a_duplicate_is_open", 0, "setting up: %s", strerror(r < 0 ? -r : errno));
		return;
	}
	pid = fork();
	if (pid == 0) {
		uint32_t kind, st = 0;
		char name[DEVMIG_FD_NAME_MAX + 1], go;
		int vfd;

		keep_only(sv[1], pipefd[0]);
		if (devmig_fd_recv(sv[1], &vfd, &kind, name, sizeof(name)) < 0 || vfd < 0)
			_exit(10);
		/* Wait until the parent has closed every reference of its own. */
		if (read(pipefd[0], &go, 1) != 1)
			_exit(11);
		if (devmig_vfio_mig_get_state(vfd, &st) < 0 || st != DEVMIG_STATE_PRE_COPY)
			_exit(12);
		close(vfd);
		_exit(0);
	}
	close(sv[1]);
	close(pipefd[0]);
	r = devmig_fd_send(sv[0], cs->fd, DEVMIG_FD_KIND_VFIO_DEVICE, cs->uuid);
	devmig_dev_close(cs->dev);
	cs->dev = NULL;
	devmig_vfio_handle_close(&cs->h);
	cs->fd = -1;
	{
		int status = 0;
		char c;
		ssize_t rd;

		if (write(pipefd[1], "g", 1) != 1)
			r = -errno;
		waitpid(pid, &status, 0);
		check("device_lives_while_a_duplicate_is_open",
		      r == 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "send %d; child exit %d (0: it saw PRE_COPY after our last close)", r,
		      WIFEXITED(status) ? WEXITSTATUS(status) : -1);
		rd = read(held, &c, 1);
		check("data_fd_enodev_after_last_close", rd < 0 && errno == ENODEV,
		      "read returned %zd (%s), want ENODEV", rd, rd < 0 ? strerror(errno) : "data");
	}
	close(held);
	close(sv[0]);
	close(pipefd[1]);
}

/* ---- iommufd dirty tracking against the IOMMUFD_TEST mock domain ---- */

/* The iommufd selftest command (CONFIG_IOMMUFD_TEST), written from the
 * 6.12 kernel's drivers/iommu/iommufd/iommufd_test.h: only the ops used
 * here. Test-only: the product never issues it. */
#define MOCK_TEST_CMD _IO(';', 0x80 + 32)
#define MOCK_OP_MOCK_DOMAIN 2
#define MOCK_OP_MOCK_DOMAIN_REPLACE 10
#define MOCK_OP_DIRTY 13
#define MOCK_APERTURE_START (1ULL << 24) /* the mock domain's lowest IOVA */
#define MOCK_PAGE 2048ULL                 /* the mock's IO page: half a CPU page */
#define MOCK_PAGES 128ULL                 /* 256 KiB mapped */
struct mock_cmd {
	uint32_t size, op, id, reserved;
	union {
		struct {
			uint32_t out_stdev_id, out_hwpt_id, out_idev_id;
		} mock_domain;
		struct {
			uint32_t pt_id;
		} replace;
		struct {
			uint32_t flags;
			uint64_t iova __attribute__((aligned(8)));
			uint64_t length, page_size, uptr, out_nr_dirty;
		} dirty;
		uint64_t union_size[6]; /* the kernel's union is 48 bytes */
	};
	uint32_t last;
};

static int mock_cmd(int ifd, struct mock_cmd *c)
{
	c->size = sizeof(*c);
	return ioctl(ifd, MOCK_TEST_CMD, c) < 0 ? -errno : 0;
}

/* Mark `pages` (indexes into the mapping) dirty through the mock; returns
 * how many the mock marked, or -errno. */
static int mock_mark(int ifd, uint32_t hwpt, const int *pages, int n)
{
	uint64_t want[MOCK_PAGES / 64] = { 0 };
	struct mock_cmd c = { .op = MOCK_OP_DIRTY, .id = hwpt };
	int r;

	for (int i = 0; i < n; i++)
		want[pages[i] / 64] |= 1ULL << (pages[i] % 64);
	c.dirty.iova = MOCK_APERTURE_START;
	c.dirty.length = MOCK_PAGES * MOCK_PAGE;
	c.dirty.page_size = MOCK_PAGE;
	c.dirty.uptr = (uint64_t)(uintptr_t)want;
	r = mock_cmd(ifd, &c);
	return r < 0 ? r : (int)c.dirty.out_nr_dirty;
}

static int bits_are(const uint64_t *bm, const int *pages, int n)
{
	uint64_t want[MOCK_PAGES / 64] = { 0 };

	for (int i = 0; i < n; i++)
		want[pages[i] / 64] |= 1ULL << (pages[i] % 64);
	return !memcmp(bm, want, sizeof(want));
}

static void iommufd_dirty_checks(const char *mdev_uuid)
{
	static const int marked[] = { 0, 3, 4, 5, 127 };
	uint64_t bm[MOCK_PAGES / 64], iova = MOCK_APERTURE_START;
	const uint64_t len = MOCK_PAGES * MOCK_PAGE;
	struct mock_cmd c = { .op = MOCK_OP_MOCK_DOMAIN };
	struct devmig_hwpt_dirty t;
	uint32_t ioas = 0;
	int ifd = open("/dev/iommu", O_RDWR | O_CLOEXEC), r, r2;
	void *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

	r = ifd < 0 ? -errno : devmig_iommu_ioas_alloc(ifd, &ioas);
	if (r == 0) {
		c.id = ioas;
		r = mock_cmd(ifd, &c);
	}
	if (r == 0)
		r = devmig_hwpt_dirty_alloc(ifd, c.mock_domain.out_idev_id, ioas, &t);
	if (r == 0) {
		struct mock_cmd rep = { .op = MOCK_OP_MOCK_DOMAIN_REPLACE, .id = c.mock_domain.out_stdev_id };

		rep.replace.pt_id = t.hwpt_id;
		r = mock_cmd(ifd, &rep);
	}
	if (r == 0)
		r = buf == MAP_FAILED ? -ENOMEM
				      : devmig_iommu_ioas_map(ifd, ioas, buf, len, &iova,
							      DEVMIG_IOMMU_IOAS_MAP_FIXED_IOVA |
								      DEVMIG_IOMMU_IOAS_MAP_READABLE |
								      DEVMIG_IOMMU_IOAS_MAP_WRITEABLE);
	check("iommufd_dirty_hwpt_on_mock_domain", r == 0, "%s", r ? strerror(-r) : "");
	if (r < 0)
		goto done;

	/* Tracking off: the kernel answers "nothing dirty" (6.12.117) or
	 * EINVAL (6.12.118), never a bit; the core refuses either way. */
	memset(bm, 0, sizeof(bm));
	r = devmig_iommu_hwpt_get_dirty_bitmap(ifd, t.hwpt_id, 0, iova, len, MOCK_PAGE, bm);
	r2 = devmig_hwpt_dirty_read(&t, iova, len, MOCK_PAGE, bm, MOCK_PAGES / 64, 1);
	check("iommufd_dirty_off_kernel_says_clean_core_refuses",
	      (r == 0 || r == -EINVAL) && bits_are(bm, NULL, 0) && r2 == -ENODATA,
	      "kernel %d with %s bits; core %d (want -ENODATA)", r, bits_are(bm, NULL, 0) ? "no" : "some", r2);

	r = devmig_hwpt_dirty_start(&t);
	r2 = r < 0 ? r : mock_mark(ifd, t.hwpt_id, marked, 5);
	check("iommufd_dirty_start_and_mark", r == 0 && r2 == 5 && t.tracking,
	      "start %d, mock marked %d of 5", r, r2);
	/* NO_CLEAR: read without clearing, then read and clear, then nothing. */
	r = devmig_hwpt_dirty_read(&t, iova, len, MOCK_PAGE, bm, MOCK_PAGES / 64, 0);
	int first = r == 0 && bits_are(bm, marked, 5);
	r = r < 0 ? r : devmig_hwpt_dirty_read(&t, iova, len, MOCK_PAGE, bm, MOCK_PAGES / 64, 1);
	int second = r == 0 && bits_are(bm, marked, 5);
	r = r < 0 ? r : devmig_hwpt_dirty_read(&t, iova, len, MOCK_PAGE, bm, MOCK_PAGES / 64, 1);
	int third = r == 0 && bits_are(bm, NULL, 0);
	check("iommufd_dirty_bitmap_no_clear_then_clear", first && second && third,
	      "%s; NO_CLEAR read exact %d, clearing read exact %d, then empty %d", r ? strerror(-r) : "ok", first,
	      second, third);

	/* The kernel only sets bits: a buffer not zeroed keeps its garbage. */
	{
		static const int one[] = { 7 };

		r = mock_mark(ifd, t.hwpt_id, one, 1);
		memset(bm, 0xff, sizeof(bm));
		r2 = r < 0 ? r : devmig_iommu_hwpt_get_dirty_bitmap(ifd, t.hwpt_id, DEVMIG_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
									 iova, len, MOCK_PAGE, bm);
		int garbage = r2 == 0 && bm[0] == ~0ULL && bm[1] == ~0ULL;

		r = r2 < 0 ? r2 : devmig_hwpt_dirty_read(&t, iova, len, MOCK_PAGE, bm, MOCK_PAGES / 64, 1);
		check("iommufd_dirty_kernel_only_sets_bits_core_zeroes", garbage && r == 0 && bits_are(bm, one, 1),
		      "raw read kept the 0xff fill: %d; core read %d exact %d", garbage, r, bits_are(bm, one, 1));
	}
	/* A range never mapped reads clean, with success (6.12.117), or is
	 * refused with EINVAL (6.12.118); never a bit. */
	memset(bm, 0, sizeof(bm));
	r = devmig_iommu_hwpt_get_dirty_bitmap(ifd, t.hwpt_id, 0, iova + (64ULL << 20), len, MOCK_PAGE, bm);
	check("iommufd_dirty_unmapped_range_reads_clean", (r == 0 || r == -EINVAL) && bits_are(bm, NULL, 0),
	      "kernel %d", r);
	/* Pages dirtied, then tracking stopped: the kernel reports nothing
	 * (6.12.117) or refuses with EINVAL (6.12.118). */
	{
		static const int nine[] = { 9 };

		r = mock_mark(ifd, t.hwpt_id, nine, 1);
		r2 = r < 0 ? r : devmig_hwpt_dirty_stop(&t);
		memset(bm, 0, sizeof(bm));
		int raw = r2 < 0 ? r2 : devmig_iommu_hwpt_get_dirty_bitmap(ifd, t.hwpt_id, 0, iova, len, MOCK_PAGE, bm);
		int core = devmig_hwpt_dirty_read(&t, iova, len, MOCK_PAGE, bm, MOCK_PAGES / 64, 1);

		check("iommufd_dirty_stopped_kernel_says_clean_core_refuses",
		      r == 1 && r2 == 0 && (raw == 0 || raw == -EINVAL) && bits_are(bm, NULL, 0) &&
			      core == -ENODATA && !t.tracking,
		      "mark %d, stop %d, raw read %d (%s bits), core %d (want -ENODATA)", r, r2, raw,
		      bits_are(bm, NULL, 0) ? "no" : "some", core);
	}
	/* An mdev (an emulated device, no IOMMU of its own) cannot attach to a
	 * dirty-tracking page table. */
	{
		char path[80];
		uint32_t pt = t.hwpt_id;
		int dfd = -1;

		r = cdev_path(mdev_uuid, path, sizeof(path));
		if (r == 0) {
			dfd = open(path, O_RDWR | O_CLOEXEC);
			r = dfd < 0 ? -errno : devmig_vfio_device_bind_iommufd(dfd, ifd, NULL);
		}
		r2 = r < 0 ? r : devmig_vfio_device_attach_pt(dfd, &pt);
		check("mdev_cannot_attach_dirty_hwpt", r == 0 && r2 == -ENOENT,
		      "bind %d (%s), attach %d (%s), want -ENOENT", r, r < 0 ? strerror(-r) : "ok", r2,
		      r2 < 0 ? strerror(-r2) : "ok");
		if (dfd >= 0)
			close(dfd);
	}
done:
	if (buf != MAP_FAILED)
		munmap(buf, len);
	if (ifd >= 0)
		close(ifd);
}

/* ---- type1 dirty-page tracking on the source's container ---- */

static void type1_dirty_checks(struct vdev *v)
{
	/* 1 MiB at IOVA 1 MiB: any range the container has free. */
	const uint64_t iova = 1ULL << 20, len = 1ULL << 20, pg = 4096;
	uint64_t bm[(1ULL << 20) / 4096 / 64];
	struct devmig_type1_dirty t = { .container_fd = v->h.container_fd };
	void *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int r, raw, core;

	r = buf == MAP_FAILED ? -ENOMEM
			      : devmig_vfio_dma_map(t.container_fd, buf, iova, len,
						    DEVMIG_VFIO_DMA_MAP_FLAG_READ | DEVMIG_VFIO_DMA_MAP_FLAG_WRITE);
	core = r < 0 ? r : devmig_type1_dirty_read(&t, iova, len, pg, bm, sizeof(bm) / 8);
	raw = r < 0 ? r : devmig_vfio_dirty_get_bitmap(t.container_fd, iova, len, pg, bm, sizeof(bm));
	check("type1_dirty_off_refused", r == 0 && core == -ENODATA && raw == -EINVAL,
	      "map %d; core %d (want -ENODATA), kernel %d (want -EINVAL: type1 refuses, unlike iommufd)", r,
	      core, raw);
	if (r < 0)
		goto done;
	r = devmig_type1_dirty_start(&t);
	memset(bm, 0xff, sizeof(bm));
	core = r < 0 ? r : devmig_type1_dirty_read(&t, iova, len, pg, bm, sizeof(bm) / 8);
	{
		int clean = 1;

		for (size_t i = 0; i < sizeof(bm) / 8; i++)
			clean &= bm[i] == 0;
		/* An mdev-only container reports the pages a device pinned;
		 * mtty pins none. */
		check("type1_dirty_pinned_scope_reports_nothing", r == 0 && core == 0 && clean && t.tracking,
		      "start %d, read %d, bitmap %s", r, core, clean ? "clear" : "has bits");
	}
	raw = devmig_vfio_dirty_get_bitmap(t.container_fd, iova, len / 2, pg, bm, sizeof(bm) / 2);
	check("type1_dirty_read_must_cover_whole_mappings", raw == -EINVAL, "half a mapping: %d (want -EINVAL)",
	      raw);
	r = devmig_type1_dirty_stop(&t);
	core = devmig_type1_dirty_read(&t, iova, len, pg, bm, sizeof(bm) / 8);
	check("type1_dirty_stop", r == 0 && !t.tracking && core == -ENODATA, "stop %d, read after %d", r, core);
	devmig_vfio_dma_unmap(t.container_fd, iova, len);
done:
	if (buf != MAP_FAILED)
		munmap(buf, len);
}

/* ---- IRQs: INTx through an eventfd ---- */

/* mtty raises its interrupt when received data reaches the FIFO's trigger
 * level with IER.RDI set; with an eventfd attached
 * to INTx through VFIO_DEVICE_SET_IRQS, that is a count on the eventfd. */
static void irq_checks(struct vdev *v)
{
	struct devmig_vfio_irq_info ii = { 0 };
	char junk[64];
	uint64_t count = 0;
	uint8_t ier = UART_IER_RDI, fcr = UART_FCR_TRIGGER_1, zero = 0;
	int32_t efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	int r, fired, off;

	/* As a VMM does, device info first: mtty keeps the IRQ count from the
	 * last VFIO_DEVICE_GET_INFO and refuses every IRQ index before one
	 * (EINVAL), a quirk of the sample driver. */
	struct devmig_vfio_device_info di;

	r = devmig_vfio_device_get_info(v->fd, &di);
	if (r == 0)
		r = devmig_vfio_get_irq_info(v->fd, DEVMIG_VFIO_PCI_INTX_IRQ_INDEX, &ii);
	check("irq_info_intx", r == 0 && ii.count == 1 && (ii.flags & DEVMIG_VFIO_IRQ_INFO_EVENTFD),
	      "%s; count %u flags 0x%x", r ? strerror(-r) : "ok", ii.count, ii.flags);
	(void)uart_drain(v, 0, junk, sizeof(junk));
	r = efd < 0 ? -errno : devmig_vfio_set_irqs_eventfd(v->fd, DEVMIG_VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &efd);
	/* The trigger level starts at 0 (never reached): set it as a guest
	 * driver does, through the FIFO control register. */
	if (r == 0 && pwrite(v->fd, &fcr, 1, (off_t)(v->bar_off[0] + UART_FCR)) != 1)
		r = -errno;
	if (r == 0 && pwrite(v->fd, &ier, 1, (off_t)(v->bar_off[0] + UART_IER)) != 1)
		r = -errno;
	if (r == 0)
		r = uart_write(v, 0, "I", 1);
	fired = r == 0 && read(efd, &count, sizeof(count)) == (ssize_t)sizeof(count) && count >= 1;
	/* Detach (count 0 disables the index) and quiet the UART again. */
	off = devmig_vfio_set_irqs_eventfd(v->fd, DEVMIG_VFIO_PCI_INTX_IRQ_INDEX, 0, 0, NULL);
	if (pwrite(v->fd, &zero, 1, (off_t)(v->bar_off[0] + UART_IER)) != 1)
		off = off ? off : -errno;
	(void)uart_drain(v, 0, junk, sizeof(junk));
	check("irq_intx_eventfd_fires", fired && off == 0, "%s; eventfd count %llu; detach %d",
	      r ? strerror(-r) : "ok", (unsigned long long)count, off);
	if (efd >= 0)
		close(efd);
}

int main(int argc, char **argv)
{
	static const char msg0[] = "devmig mtty 0!", msg1[] = "port-1";
	const char *stream = "/devmig-stream.bin", *bad = "/devmig-bad.bin";
	struct vdev src = { 0 }, dst = { 0 }, csrc = { 0 }, cdst = { 0 };
	struct devmig_precopy_info pi;
	uint64_t flags, expect_size = 0;
	char got[64];
	uint32_t ks;
	long saved;
	int r, n, fd, lines;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 3 && argc != 5) {
		fprintf(stderr, "usage: %s SOURCE_UUID TARGET_UUID [CDEV_SOURCE_UUID CDEV_TARGET_UUID]\n", argv[0]);
		return 2;
	}
	src.uuid = argv[1];
	dst.uuid = argv[2];
	printf("# devmig native core %s\n", devmig_version());

	if (open_vdev(&src, "source", "open_source_group_type1", 0) < 0 ||
	    open_vdev(&dst, "target", "open_target_group_type1", 0) < 0)
		goto out;
	if (argc == 5) {
		csrc.uuid = argv[3];
		cdst.uuid = argv[4];
		if (open_vdev(&csrc, "cdev-source", "open_cdev_iommufd", 1) == 0 &&
		    devmig_dev_flags(csrc.dev) != (DEVMIG_MIG_STOP_COPY | DEVMIG_MIG_P2P | DEVMIG_MIG_PRE_COPY))
			check("open_cdev_iommufd", 0, "flags 0x%llx", (unsigned long long)devmig_dev_flags(csrc.dev));
	} else {
		check("open_cdev_iommufd", 0, "%s", "the guest made no third and fourth mdev");
	}

	flags = devmig_dev_flags(src.dev);
	check("migration_flags", flags == (DEVMIG_MIG_STOP_COPY | DEVMIG_MIG_P2P | DEVMIG_MIG_PRE_COPY),
	      "flags 0x%llx, want STOP_COPY|P2P|PRE_COPY (0x7)", (unsigned long long)flags);
	check("initial_state_running",
	      devmig_dev_state(src.dev) == DEVMIG_STATE_RUNNING && kstate(&dst) == DEVMIG_STATE_RUNNING,
	      "source %s, target %s", state_name(kstate(&src)), state_name(kstate(&dst)));

	r = uart_write(&src, 0, msg0, strlen(msg0));
	if (r == 0)
		r = uart_write(&src, 1, msg1, strlen(msg1));
	check("uart_write_source", r == 0, "%s", strerror(-r));

	/* The kernel refuses a request for ERROR itself; the core refuses it
	 * first, with the same errno, and nothing moves. */
	{
		int raw = devmig_vfio_mig_set_state(src.fd, DEVMIG_STATE_ERROR, &fd);

		r = devmig_set_state(src.dev, DEVMIG_STATE_ERROR, DEVMIG_STATE_RUNNING, NULL);
		ks = kstate(&src);
		check("refused_error_same_errno", raw == -EINVAL && r == -EINVAL && ks == DEVMIG_STATE_RUNNING,
		      "kernel %d, core %d, want -EINVAL from both; state now %s", raw, r, state_name(ks));
	}

	/* PRE_COPY and back: an aborted pre-copy keeps the device's state.
	 * On the way, PRE_COPY's temporary end as mtty gives it: a read of 0
	 * once the initial bytes are read, which the core reports as ENOMSG,
	 * and PRECOPY_INFO then says the initial data is done (0 dirty: mtty
	 * does no DMA and its ports only travel in STOP_COPY). */
	r = devmig_set_state(src.dev, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL);
	if (r == 0) {
		char hdr[256];
		uint64_t dirty = 1;
		int before = devmig_precopy_initial_done(src.dev, NULL);
		long n1 = devmig_data_read(src.dev, hdr, sizeof(hdr));
		long n2 = devmig_data_read(src.dev, hdr, sizeof(hdr));
		int after = devmig_precopy_initial_done(src.dev, &dirty);

		check("precopy_temporary_end",
		      before == 0 && n1 > 0 && n2 == -ENOMSG && after == 1 && dirty == 0,
		      "initial done before %d (want 0), first read %ld (want > 0), second read %ld (want -ENOMSG), "
		      "initial done after %d (want 1), dirty %llu",
		      before, n1, n2, after, (unsigned long long)dirty);
		r = devmig_set_state(src.dev, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL);
	}
	ks = kstate(&src);
	check("abort_precopy_to_running", r == 0 && ks == DEVMIG_STATE_RUNNING && devmig_data_fd(src.dev) < 0,
	      "%s; kernel state %s; data fd %d", r ? strerror(-r) : "ok", state_name(ks),
	      devmig_data_fd(src.dev));

	/* The migration proper. */
	r = devmig_set_state(src.dev, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, &fd);
	check("source_to_precopy", r == 0 && fd >= 0 && kstate(&src) == DEVMIG_STATE_PRE_COPY,
	      "%s; data fd %d; kernel state %s", r ? strerror(-r) : "ok", fd, state_name(kstate(&src)));
	if (r < 0)
		goto out;
	r = devmig_precopy_info(src.dev, &pi);
	check("precopy_info_initial", r == 0 && pi.initial_bytes > 0 && pi.dirty_bytes == 0,
	      "%s; initial %llu dirty %llu (want initial > 0: the stream header)", r ? strerror(-r) : "ok",
	      (unsigned long long)pi.initial_bytes, (unsigned long long)pi.dirty_bytes);
	r = devmig_data_size(src.dev, &expect_size);
	check("mig_data_size", r == 0 && expect_size > 0, "%s; %llu bytes", r ? strerror(-r) : "ok",
	      (unsigned long long)expect_size);

	fd = open(stream, O_RDWR | O_CREAT | O_TRUNC, 0600);
	saved = fd < 0 ? -errno : devmig_stream_save(src.dev, fd);
	if (fd >= 0)
		close(fd);
	ks = kstate(&src);
	check("save_precopy_stopcopy", saved > 0 && (uint64_t)saved == expect_size && ks == DEVMIG_STATE_STOP_COPY,
	      "devmig_stream_save: %ld%s%s, want %llu payload bytes; kernel state %s", saved,
	      saved < 0 ? " " : "", saved < 0 ? strerror((int)-saved) : "", (unsigned long long)expect_size,
	      state_name(ks));
	if (saved <= 0)
		goto out;

	/* STOP_COPY -> PRE_COPY / PRE_COPY_P2P: refused by the core's own arc
	 * table with EINVAL, before any ioctl (the core logs each request it
	 * issues as "FROM -> TO"; a refusal logs only the refusal). */
	for (int i = 0; i < 2; i++) {
		uint32_t to = i ? DEVMIG_STATE_PRE_COPY_P2P : DEVMIG_STATE_PRE_COPY;
		const char *name = i ? "stopcopy_to_precopy_p2p_refused" : "stopcopy_to_precopy_refused";

		lines = src.log.lines;
		r = devmig_set_state(src.dev, to, DEVMIG_STATE_STOP_COPY, NULL);
		ks = kstate(&src);
		check(name,
		      r == -EINVAL && ks == DEVMIG_STATE_STOP_COPY && src.log.lines == lines + 1 &&
			      strstr(src.log.last, "refused"),
		      "core returned %d, want -EINVAL; kernel state %s; log: %s", r, state_name(ks), src.log.last);
	}
	/* The arc table is the kernel's: this kernel (6.12, whose core
	 * refuses the arc from its own table) answers the raw request with the
	 * same EINVAL, leaving the device in STOP_COPY, and so does the
	 * simulated device asked the same way. */
	{
		struct devmig_sim_config cfg = { 0 };
		struct devmig_dev *sim = NULL;
		int raw = devmig_vfio_mig_set_state(src.fd, DEVMIG_STATE_PRE_COPY, &fd);
		int simr = devmig_dev_open_sim(&cfg, &sim);

		ks = kstate(&src);
		if (simr == 0) {
			devmig_dev_set_log(sim, log_line, &src.log);
			simr = devmig_set_state(sim, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL);
		}
		if (simr == 0)
			simr = devmig_sim_external_set_state(sim, DEVMIG_STATE_PRE_COPY);
		check("kernel_and_sim_refuse_stopcopy_to_precopy",
		      raw == -EINVAL && simr == -EINVAL && ks == DEVMIG_STATE_STOP_COPY,
		      "kernel %d, simulated device %d, want -EINVAL from both; kernel state %s", raw, simr,
		      state_name(ks));
		if (sim)
			devmig_dev_close(sim);
	}
	r = devmig_set_state(src.dev, DEVMIG_STATE_STOP, DEVMIG_STATE_ERROR, NULL);
	check("source_stopcopy_to_stop", r == 0 && kstate(&src) == DEVMIG_STATE_STOP, "%s; kernel state %s",
	      r ? strerror(-r) : "ok", state_name(kstate(&src)));

	/* Target: RUNNING -> RESUMING (through STOP), the stream, STOP, RUNNING. */
	r = devmig_set_state(dst.dev, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, &fd);
	check("target_to_resuming", r == 0 && fd >= 0 && kstate(&dst) == DEVMIG_STATE_RESUMING,
	      "%s; data fd %d; kernel state %s", r ? strerror(-r) : "ok", fd, state_name(kstate(&dst)));
	if (r < 0)
		goto out;
	fd = open(stream, O_RDONLY);
	r = fd < 0 ? -errno : devmig_stream_load(dst.dev, fd);
	if (fd >= 0)
		close(fd);
	ks = kstate(&dst);
	check("load_resuming_to_stop", r == 0 && ks == DEVMIG_STATE_STOP, "devmig_stream_load: %s; kernel state %s",
	      r ? strerror(-r) : "ok", state_name(ks));
	if (r < 0)
		goto out;
	r = devmig_set_state(dst.dev, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL);
	check("target_to_running", r == 0 && kstate(&dst) == DEVMIG_STATE_RUNNING, "%s; kernel state %s",
	      r ? strerror(-r) : "ok", state_name(kstate(&dst)));

	n = uart_drain(&dst, 0, got, sizeof(got));
	check("target_uart0_bytes", n == (int)strlen(msg0) && !memcmp(got, msg0, strlen(msg0)),
	      "read %d bytes \"%.*s\", want \"%s\"", n, n > 0 ? n : 0, got, msg0);
	n = uart_drain(&dst, 1, got, sizeof(got));
	check("target_uart1_bytes", n == (int)strlen(msg1) && !memcmp(got, msg1, strlen(msg1)),
	      "read %d bytes \"%.*s\", want \"%s\"", n, n > 0 ? n : 0, got, msg1);

	/* Streams the target must refuse. The source's stream carries its
	 * UART bytes, so a target UART holding only its own marker afterwards
	 * proves nothing of a refused stream was loaded. */
	{
		uint8_t b;
		struct stat st;
		off_t at = 0;

		/* A flipped byte in the last frame's payload (10 bytes before
		 * the trailer; mtty's ports are larger): that frame's CRC32C
		 * fails before it reaches the device, while the frames before
		 * it (PRE_COPY's part) are already in the device. */
		r = copy_file(stream, bad);
		if (r == 0 && stat(bad, &st) == 0)
			at = st.st_size - (DEVMIG_STREAM_FRAME_HDR_LEN + DEVMIG_STREAM_TRAILER_LEN) - 10;
		fd = open(bad, O_RDWR);
		if (r < 0 || at <= 0 || fd < 0 || pread(fd, &b, 1, at) != 1) {
			check("corrupt_stream_refused_target_reset", 0, "preparing %s", bad);
		} else {
			b ^= 0x40;
			r = pwrite(fd, &b, 1, at) == 1 ? 0 : -errno;
			close(fd);
			refused_load(&dst, "corrupt_stream_refused_target_reset", bad, -EBADMSG);
		}
		/* Cut before the trailer: every frame verified and went into
		 * the device, but the stream is incomplete. */
		r = copy_file(stream, bad);
		if (r == 0) {
			r = stat(bad, &st) < 0 ? -errno : 0;
			if (r == 0 && truncate(bad, st.st_size - (DEVMIG_STREAM_FRAME_HDR_LEN +
								  DEVMIG_STREAM_TRAILER_LEN)) < 0)
				r = -errno;
		}
		if (r < 0)
			check("truncated_stream_refused_target_reset", 0, "preparing %s: %s", bad, strerror(-r));
		else
			refused_load(&dst, "truncated_stream_refused_target_reset", bad, -ENODATA);
	}
	/* A well-formed devmig stream whose payload the driver rejects (mtty
	 * checks its own header's magic: EFAULT on the write): the write
	 * error is fatal, the device is reset, never started on the data. */
	{
		struct devmig_stream_enc e;
		uint8_t junk[256];

		memset(junk, 0xa5, sizeof(junk));
		fd = open(bad, O_RDWR | O_CREAT | O_TRUNC, 0600);
		r = fd < 0 ? -errno : devmig_stream_enc_begin(&e, devmig_dev_desc(src.dev), sizeof(junk),
								 devmig_fd_write_all, &fd);
		if (r == 0)
			r = devmig_stream_enc_data(&e, junk, expect_size < sizeof(junk) ? expect_size : sizeof(junk));
		if (r == 0)
			r = devmig_stream_enc_finish(&e);
		if (fd >= 0)
			close(fd);
		if (r < 0)
			check("driver_rejected_write_target_reset", 0, "preparing %s: %s", bad, strerror(-r));
		else
			refused_load(&dst, "driver_rejected_write_target_reset", bad, -EFAULT);
	}

	/* Why a rejected resuming write must be fatal, on this kernel: mtty
	 * fails the write that completes a bad header (EFAULT) but counts its
	 * bytes anyway, and RESUMING -> STOP then loads whatever followed.
	 * Here the header is corrupted and the ports are the source's: the
	 * raw kernel accepts STOP and the target's UART gives the source's
	 * bytes. The core, given the same writes, poisons the device, refuses
	 * STOP with EIO without asking the kernel, and a reset leaves the
	 * target with its own marker only. */
	{
		static struct payload pl;
		static const char marker[] = "T";
		const size_t hdr = 24; /* struct mtty_data up to its ports */
		int dfd = -1, nofd, raw1 = 0, raw2 = 0, rawstop = 0, c1 = 0, c2 = 0;

		r = read_payload(stream, &pl);
		if (r < 0 || pl.len <= hdr) {
			check("kernel_loads_after_rejected_write", 0, "reading the saved payload: %d, %zu bytes", r,
			      pl.len);
			check("core_refuses_stop_after_rejected_write", 0, "%s", "no payload");
			goto after_hazard;
		}
		pl.buf[0] ^= 0xff; /* mtty's magic */
		r = devmig_vfio_mig_set_state(dst.fd, DEVMIG_STATE_STOP, &nofd);
		if (r == 0)
			r = devmig_vfio_mig_set_state(dst.fd, DEVMIG_STATE_RESUMING, &dfd);
		if (r == 0 && dfd >= 0) {
			raw1 = write(dfd, pl.buf, hdr) < 0 ? -errno : 0;
			raw2 = write(dfd, pl.buf + hdr, pl.len - hdr) < 0 ? -errno : 0;
			rawstop = devmig_vfio_mig_set_state(dst.fd, DEVMIG_STATE_STOP, &nofd);
			if (rawstop == 0)
				rawstop = devmig_vfio_mig_set_state(dst.fd, DEVMIG_STATE_RUNNING, &nofd);
			close(dfd);
		}
		n = rawstop == 0 ? uart_drain(&dst, 0, got, sizeof(got)) : -1;
		check("kernel_loads_after_rejected_write",
		      r == 0 && raw1 == -EFAULT && raw2 == 0 && rawstop == 0 && n == (int)strlen(msg0) &&
			      !memcmp(got, msg0, strlen(msg0)),
		      "setup %d; header write %d (want -EFAULT), ports write %d, STOP/RUNNING %d; UART gave %d "
		      "bytes (want the source's %zu)",
		      r, raw1, raw2, rawstop, n, strlen(msg0));
		/* The core's record is stale after the raw requests: refresh it. */
		devmig_reset(dst.dev);
		uart_drain(&dst, 1, got, sizeof(got));

		r = uart_write(&dst, 0, marker, 1);
		if (r == 0)
			r = devmig_set_state(dst.dev, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL);
		if (r == 0) {
			long w1 = devmig_data_write(dst.dev, pl.buf, hdr);
			long w2 = devmig_data_write(dst.dev, pl.buf + hdr, pl.len - hdr);

			c1 = devmig_set_state(dst.dev, DEVMIG_STATE_STOP, DEVMIG_STATE_ERROR, NULL);
			ks = kstate(&dst);
			c2 = devmig_reset(dst.dev);
			n = uart_drain(&dst, 0, got, sizeof(got));
			check("core_refuses_stop_after_rejected_write",
			      w1 == -EFAULT && w2 == -EIO && c1 == -EIO && ks == DEVMIG_STATE_RESUMING && c2 == 0 &&
				      kstate(&dst) == DEVMIG_STATE_RUNNING && n == 1 && got[0] == marker[0],
			      "writes %ld (want -EFAULT), %ld (want -EIO: poisoned); STOP %d (want -EIO), kernel "
			      "state then %s (want RESUMING); reset %d; UART gave %d bytes (want the marker)",
			      w1, w2, c1, state_name(ks), c2, n);
		} else {
			check("core_refuses_stop_after_rejected_write", 0, "setting up: %s", strerror(-r));
		}
	}
after_hazard:

	/* The source, after all that, still holds its bytes: saving does not
	 * consume the UART, and STOP -> RUNNING restarts it as it was. */
	r = devmig_set_state(src.dev, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL);
	n = uart_drain(&src, 0, got, sizeof(got));
	check("source_resumes_with_its_bytes",
	      r == 0 && n == (int)strlen(msg0) && !memcmp(got, msg0, strlen(msg0)),
	      "%s; read %d bytes \"%.*s\", want \"%s\"", r ? strerror(-r) : "ok", n, n > 0 ? n : 0, got, msg0);

	type1_dirty_checks(&src);
	irq_checks(&dst);
	cdev_checks(&src, &csrc, &cdst);
	if (csrc.uuid)
		iommufd_dirty_checks(csrc.uuid);

out:
	if (src.dev)
		devmig_dev_close(src.dev);
	if (dst.dev)
		devmig_dev_close(dst.dev);
	if (csrc.dev)
		devmig_dev_close(csrc.dev);
	if (cdst.dev)
		devmig_dev_close(cdst.dev);
	devmig_vfio_handle_close(&src.h);
	devmig_vfio_handle_close(&dst.h);
	devmig_vfio_handle_close(&csrc.h);
	devmig_vfio_handle_close(&cdst.h);
	printf("devmig-kernel-test: %d ok, %d not ok\n", n_ok, n_bad);
	return n_bad ? 1 : 0;
}
