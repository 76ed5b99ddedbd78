/* src/ioctl.c and the VFIO backend of struct devmig_dev against a fake
 * kernel: this executable defines ioctl(), so every ioctl libdevmig issues
 * on the fake device fd lands here and is answered the way
 * drivers/vfio/vfio_main.c frames its answers (argsz checks, the argsz
 * two-call pattern with capability chains, feature GET/SET). Other fds go
 * to the real system call. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "check.h"
#include "devmig/devmig.h"
#include "devmig/dirty.h"
#include "devmig/vfio.h"

static int fake_fd = -1, fake_data_fd = -1;

/* Is fd (perhaps a dup) the same open file as ref? memfds have an inode
 * each, so the inode tells them apart. */
static int same_file(int fd, int ref)
{
	struct stat a, b;

	return ref >= 0 && fstat(fd, &a) == 0 && fstat(ref, &b) == 0 && a.st_ino == b.st_ino &&
	       a.st_dev == b.st_dev;
}
static int ioctl_calls;
static uint64_t fake_flags = DEVMIG_MIG_STOP_COPY | DEVMIG_MIG_P2P | DEVMIG_MIG_PRE_COPY;
static uint32_t fake_state = DEVMIG_STATE_RUNNING;
static int fake_set_errno;   /* next SET fails with this */
static uint32_t fake_state_after_failure = DEVMIG_STATE_ERROR;
static int fake_caps_loop;
static int32_t fake_irq_fds[16];
static uint32_t fake_irq_count = 99, fake_irq_start;   /* make region 0's chain point at itself */

/* Region 0: BAR0 of 64 KiB, mmappable except a trapped hole, i.e. a
 * sparse cap with 2 areas, then a type cap. Region 1: no caps. */
static int fake_region_info(struct devmig_vfio_region_info *ri)
{
	uint32_t full = sizeof(*ri) + 16 + 2 * 16 + 16;

	if (ri->argsz < sizeof(*ri))
		return -EINVAL;
	ri->flags = DEVMIG_VFIO_REGION_INFO_FLAG_READ | DEVMIG_VFIO_REGION_INFO_FLAG_WRITE;
	ri->size = 65536;
	ri->offset = (uint64_t)ri->index << 40;
	ri->cap_offset = 0;
	if (ri->index == 1)
		return 0;
	if (ri->index != 0)
		return -EINVAL;
	ri->flags |= DEVMIG_VFIO_REGION_INFO_FLAG_MMAP | DEVMIG_VFIO_REGION_INFO_FLAG_CAPS;
	if (ri->argsz < full) {
		/* The kernel reports the size it needs and no chain. */
		ri->argsz = full;
		return 0;
	}
	uint8_t *b = (uint8_t *)ri;
	struct devmig_vfio_region_info_cap_sparse_mmap *sp = (void *)(b + sizeof(*ri));
	struct devmig_vfio_region_info_cap_type *ty = (void *)(b + sizeof(*ri) + 16 + 32);

	ri->cap_offset = sizeof(*ri);
	sp->header.id = DEVMIG_VFIO_REGION_INFO_CAP_SPARSE_MMAP;
	sp->header.version = 1;
	sp->header.next = fake_caps_loop ? sizeof(*ri) : sizeof(*ri) + 16 + 32;
	sp->nr_areas = 2;
	sp->areas[0].offset = 0;
	sp->areas[0].size = 4096;
	sp->areas[1].offset = 8192;
	sp->areas[1].size = 57344;
	ty->header.id = DEVMIG_VFIO_REGION_INFO_CAP_TYPE;
	ty->header.next = 0;
	ty->type = 3;
	ty->subtype = 1;
	return 0;
}

static int fake_feature(struct devmig_vfio_device_feature *f)
{
	uint32_t id = f->flags & DEVMIG_VFIO_DEVICE_FEATURE_MASK;
	uint32_t gs = f->flags & (DEVMIG_VFIO_DEVICE_FEATURE_GET | DEVMIG_VFIO_DEVICE_FEATURE_SET);

	if (f->argsz < sizeof(*f) || (f->flags & ~(0xffffu | 0x70000u)))
		return -EINVAL;
	if (f->flags & DEVMIG_VFIO_DEVICE_FEATURE_PROBE)
		return id == 1 || id == 2 || id == 9 ? 0 : -ENOTTY;
	if (gs == (DEVMIG_VFIO_DEVICE_FEATURE_GET | DEVMIG_VFIO_DEVICE_FEATURE_SET))
		return -EINVAL;
	switch (id) {
	case DEVMIG_VFIO_DEVICE_FEATURE_MIGRATION: {
		struct devmig_vfio_device_feature_migration *m = (void *)f->data;

		if (gs != DEVMIG_VFIO_DEVICE_FEATURE_GET || f->argsz < sizeof(*f) + sizeof(*m))
			return -EINVAL;
		m->flags = fake_flags;
		return 0;
	}
	case DEVMIG_VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: {
		struct devmig_vfio_device_feature_mig_state *m = (void *)f->data;

		if (f->argsz < sizeof(*f) + sizeof(*m))
			return -EINVAL;
		if (gs == DEVMIG_VFIO_DEVICE_FEATURE_GET) {
			m->device_state = fake_state;
			m->data_fd = -1;
			return 0;
		}
		if (fake_set_errno) {
			int e = fake_set_errno;

			fake_set_errno = 0;
			fake_state = fake_state_after_failure;
			m->data_fd = -1;
			return -e;
		}
		m->data_fd = -1;
		if ((fake_state == DEVMIG_STATE_STOP || fake_state == DEVMIG_STATE_RUNNING_P2P ||
		     fake_state == DEVMIG_STATE_RUNNING) &&
		    (m->device_state == DEVMIG_STATE_STOP_COPY || m->device_state == DEVMIG_STATE_RESUMING ||
		     m->device_state == DEVMIG_STATE_PRE_COPY)) {
			fake_data_fd = memfd_create("fake-vfio-data", MFD_CLOEXEC);
			m->data_fd = fake_data_fd;
		}
		fake_state = m->device_state;
		return 0;
	}
	case DEVMIG_VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: {
		struct devmig_vfio_device_feature_mig_data_size *m = (void *)f->data;

		if (gs != DEVMIG_VFIO_DEVICE_FEATURE_GET || f->argsz < sizeof(*f) + sizeof(*m))
			return -EINVAL;
		m->stop_copy_length = 123456;
		return 0;
	}
	}
	return -ENOTTY;
}

int ioctl(int fd, unsigned long req, ...);
int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	void *arg;
	int r = -ENOTTY;

	va_start(ap, req);
	arg = va_arg(ap, void *);
	va_end(ap);
	int is_dev = same_file(fd, fake_fd), is_data = !is_dev && same_file(fd, fake_data_fd);

	if (!is_dev && !is_data)
		return (int)syscall(SYS_ioctl, fd, req, arg);
	ioctl_calls++;
	if (is_data && req == DEVMIG_VFIO_MIG_GET_PRECOPY_INFO) {
		struct devmig_vfio_precopy_info *pi = arg;

		if (pi->argsz < sizeof(*pi))
			r = -EINVAL;
		else if (fake_state != DEVMIG_STATE_PRE_COPY && fake_state != DEVMIG_STATE_PRE_COPY_P2P)
			r = -EINVAL;
		else {
			pi->initial_bytes = 7;
			pi->dirty_bytes = 9;
			r = 0;
		}
	} else if (is_dev && req == DEVMIG_VFIO_DEVICE_GET_REGION_INFO) {
		r = fake_region_info(arg);
	} else if (is_dev && req == DEVMIG_VFIO_DEVICE_FEATURE) {
		r = fake_feature(arg);
	} else if (is_dev && req == DEVMIG_VFIO_DEVICE_GET_INFO) {
		struct devmig_vfio_device_info *di = arg;

		/* A 6.1 kernel's struct ends at cap_offset: 20 bytes suffice. */
		if (di->argsz < 20) {
			r = -EINVAL;
		} else {
			di->flags = DEVMIG_VFIO_DEVICE_FLAGS_PCI | DEVMIG_VFIO_DEVICE_FLAGS_RESET;
			di->num_regions = 9;
			di->num_irqs = 5;
			r = 0;
		}
	} else if (is_dev && req == DEVMIG_VFIO_DEVICE_GET_IRQ_INFO) {
		struct devmig_vfio_irq_info *ii = arg;

		if (ii->argsz < sizeof(*ii) || ii->index > DEVMIG_VFIO_PCI_REQ_IRQ_INDEX) {
			r = -EINVAL;
		} else {
			ii->flags = DEVMIG_VFIO_IRQ_INFO_EVENTFD | DEVMIG_VFIO_IRQ_INFO_NORESIZE;
			ii->count = ii->index == DEVMIG_VFIO_PCI_MSIX_IRQ_INDEX ? 16 : 1;
			r = 0;
		}
	} else if (is_dev && req == DEVMIG_VFIO_DEVICE_SET_IRQS) {
		struct devmig_vfio_irq_set *is = arg;
		uint32_t per = is->flags & DEVMIG_VFIO_IRQ_SET_DATA_EVENTFD ? 4 : 0;

		/* The kernel's checks: argsz covers count entries, one data
		 * type, and start + count within the index. */
		r = -EINVAL;
		if (is->argsz == sizeof(*is) + (size_t)per * is->count && is->start + is->count <= 16 &&
		    (is->flags & DEVMIG_VFIO_IRQ_SET_ACTION_TRIGGER)) {
			memcpy(fake_irq_fds, is->data, (size_t)per * is->count);
			fake_irq_count = is->count;
			fake_irq_start = is->start;
			r = 0;
		}
	} else if (is_dev && req == DEVMIG_VFIO_GROUP_GET_DEVICE_FD) {
		/* The fake device fd doubles as its group's fd. */
		r = strcmp(arg, "0000:3b:00.1") == 0 ? fcntl(fake_fd, F_DUPFD_CLOEXEC, 0) : -ENODEV;
	} else if (is_dev && req == DEVMIG_VFIO_DEVICE_RESET) {
		fake_state = DEVMIG_STATE_RUNNING;
		r = 0;
	}
	if (r < 0) {
		errno = -r;
		return -1;
	}
	return r;
}

static char logbuf[4096];
static void capture(void *ctx, const char *line)
{
	(void)ctx;
	strncat(logbuf, line, sizeof(logbuf) - strlen(logbuf) - 2);
	strcat(logbuf, "\n");
}

/* Opening fails cleanly: the step that failed is named, -errno comes
 * back, and nothing stays open. (The successful paths run against the real
 * kernel: tests/kernel, open_*_group_type1 and open_cdev_iommufd.) */
static void open_failures_name_the_step_and_leak_nothing(void)
{
	struct devmig_vfio_handle h;
	char why[160];
	int before = 0, after = 0;

	for (int fd = 0; fd < 1024; fd++)
		before += fcntl(fd, F_GETFD) >= 0;
	CHECK(devmig_vfio_open_cdev("/nonexistent/vfio0", "/dev/null", &h, why, sizeof(why)) == -ENOENT);
	CHECK(strstr(why, "open /nonexistent/vfio0") != NULL);
	CHECK(h.device_fd == -1 && h.iommufd == -1);
	/* /dev/null opens but is no VFIO device: the bind is refused. */
	CHECK(devmig_vfio_open_cdev("/dev/null", "/dev/null", &h, why, sizeof(why)) < 0);
	CHECK(strstr(why, "VFIO_DEVICE_BIND_IOMMUFD") != NULL);
	CHECK(h.device_fd == -1 && h.iommufd == -1);
	CHECK(devmig_vfio_open_group("/nonexistent/12", "0000:00:00.0", &h, NULL, 0) < 0);
	CHECK(h.device_fd == -1 && h.group_fd == -1 && h.container_fd == -1);
	devmig_vfio_handle_close(&h); /* idempotent */
	for (int fd = 0; fd < 1024; fd++)
		after += fcntl(fd, F_GETFD) >= 0;
	CHECK(after == before);
}

/* The dirty reader refuses, before any ioctl, what the kernel would answer
 * with a misleading "clean": tracking off; and bad ranges. */
static void dirty_reads_refuse_without_tracking(void)
{
	struct devmig_hwpt_dirty t = { .iommufd = -1, .hwpt_id = 1, .tracking = 0 };
	uint64_t bm[2] = { ~0ULL, ~0ULL };

	CHECK(devmig_hwpt_dirty_read(&t, 0, 128 * 4096, 4096, bm, 2, 1) == -ENODATA);
	CHECK(bm[0] == ~0ULL); /* untouched: nothing was read */
	CHECK(devmig_hwpt_dirty_read(&t, 0, 129 * 4096, 4096, bm, 2, 1) == -ENOSPC);
	CHECK(devmig_hwpt_dirty_read(&t, 100, 4096, 4096, bm, 2, 1) == -EINVAL);
	CHECK(devmig_hwpt_dirty_read(&t, 0, 4096, 3000, bm, 2, 1) == -EINVAL);
	/* A start the kernel refuses (no iommufd here) leaves tracking off. */
	CHECK(devmig_hwpt_dirty_start(&t) == -EBADF && !t.tracking);
}

int main(void)
{
	struct devmig_region_info ri;
	struct devmig_dev *d;

	open_failures_name_the_step_and_leak_nothing();
	dirty_reads_refuse_without_tracking();
	uint64_t v;
	uint32_t st;
	int dfd, calls;

	fake_fd = memfd_create("fake-vfio-device", MFD_CLOEXEC);
	CHECK(fake_fd >= 0);

	/* No place for a data fd the kernel may return: refused before any
	 * ioctl (calls stays as it was). */
	calls = ioctl_calls;
	CHECK(devmig_vfio_mig_set_state(fake_fd, DEVMIG_STATE_RUNNING, NULL) == -EINVAL);
	CHECK(ioctl_calls == calls);

	/* Region info: the two-call pattern reads the whole chain. */
	CHECK(devmig_vfio_get_region_info(fake_fd, 0, &ri) == 0);
	CHECK(ri.size == 65536 && ri.offset == 0);
	CHECK(ri.flags & DEVMIG_VFIO_REGION_INFO_FLAG_MMAP);
	CHECK(ri.has_sparse && ri.nr_sparse == 2);
	CHECK(ri.sparse && ri.sparse[1].offset == 8192 && ri.sparse[1].size == 57344);
	CHECK(ri.has_type && ri.type == 3 && ri.subtype == 1);
	devmig_region_info_free(&ri);
	CHECK(ri.sparse == NULL && ri.nr_sparse == 0);
	/* One call when there are no caps. */
	calls = ioctl_calls;
	CHECK(devmig_vfio_get_region_info(fake_fd, 1, &ri) == 0);
	CHECK(ioctl_calls == calls + 1);
	CHECK(!ri.has_sparse && ri.offset == 1ull << 40);
	devmig_region_info_free(&ri);
	CHECK(devmig_vfio_get_region_info(fake_fd, 9, &ri) == -EINVAL);
	/* A chain that loops is refused, not followed forever. */
	fake_caps_loop = 1;
	CHECK(devmig_vfio_get_region_info(fake_fd, 0, &ri) == -EPROTO);
	CHECK(ri.sparse == NULL);
	fake_caps_loop = 0;

	/* Device and IRQ info, SET_IRQS framing. */
	struct devmig_vfio_device_info di;
	CHECK(devmig_vfio_device_get_info(fake_fd, &di) == 0);
	CHECK(di.num_regions == 9 && di.num_irqs == 5 && (di.flags & DEVMIG_VFIO_DEVICE_FLAGS_PCI));
	struct devmig_vfio_irq_info ii;
	CHECK(devmig_vfio_get_irq_info(fake_fd, DEVMIG_VFIO_PCI_MSIX_IRQ_INDEX, &ii) == 0);
	CHECK(ii.count == 16 && (ii.flags & DEVMIG_VFIO_IRQ_INFO_EVENTFD));
	CHECK(devmig_vfio_get_irq_info(fake_fd, 7, &ii) == -EINVAL);
	int32_t efds[3] = { 11, 12, 13 };
	CHECK(devmig_vfio_set_irqs_eventfd(fake_fd, DEVMIG_VFIO_PCI_MSIX_IRQ_INDEX, 2, 3, efds) == 0);
	CHECK(fake_irq_count == 3 && fake_irq_start == 2 && fake_irq_fds[2] == 13);
	CHECK(devmig_vfio_set_irqs_eventfd(fake_fd, DEVMIG_VFIO_PCI_MSIX_IRQ_INDEX, 0, 0, NULL) == 0);
	CHECK(fake_irq_count == 0);
	CHECK(devmig_vfio_set_irqs_eventfd(fake_fd, DEVMIG_VFIO_PCI_MSIX_IRQ_INDEX, 15, 2, efds) == -EINVAL);
	/* The group hands out a device fd by name. */
	int gdev = devmig_vfio_group_get_device_fd(fake_fd, "0000:3b:00.1");
	CHECK(gdev >= 0 && same_file(gdev, fake_fd));
	close(gdev);
	CHECK(devmig_vfio_group_get_device_fd(fake_fd, "0000:3b:00.2") == -ENODEV);

	/* Feature framing. */
	CHECK(devmig_vfio_feature_probe(fake_fd, 1, DEVMIG_VFIO_DEVICE_FEATURE_GET) == 0);
	CHECK(devmig_vfio_feature_probe(fake_fd, 6, DEVMIG_VFIO_DEVICE_FEATURE_SET) == -ENOTTY);
	CHECK(devmig_vfio_mig_flags(fake_fd, &v) == 0 && v == fake_flags);
	CHECK(devmig_vfio_mig_data_size(fake_fd, &v) == 0 && v == 123456);
	CHECK(devmig_vfio_reset(fake_fd) == 0);

	/* A fd that is not a VFIO device: the kernel's ENOTTY comes through. */
	int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
	CHECK(devmig_vfio_mig_flags(nul, &v) == -ENOTTY);
	CHECK(devmig_dev_open_vfio(nul, NULL, &d) == -ENOTTY);
	close(nul);

	/* The VFIO backend of struct devmig_dev. */
	struct devmig_dev_desc desc = { 0x15b3, 0x101e, "mlx5_vfio_pci" };
	CHECK(devmig_dev_open_vfio(fake_fd, &desc, &d) == 0);
	devmig_dev_set_log(d, capture, NULL);
	CHECK(devmig_dev_flags(d) == fake_flags);
	CHECK(devmig_dev_state(d) == DEVMIG_STATE_RUNNING);
	CHECK_STREQ(devmig_dev_desc(d)->driver, "mlx5_vfio_pci");

	CHECK(devmig_set_state(d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, &dfd) == 0);
	CHECK(dfd >= 0 && dfd == devmig_data_fd(d));
	CHECK(fake_state == DEVMIG_STATE_STOP_COPY);
	CHECK(strstr(logbuf, "RUNNING -> STOP_COPY (via RUNNING_P2P, STOP)") != NULL);

	/* STOP_COPY -> PRE_COPY hangs real kernels: refused with no ioctl. */
	calls = ioctl_calls;
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_ERROR, NULL) == -EINVAL);
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_ERROR, NULL) == -EINVAL);
	CHECK(ioctl_calls == calls);
	CHECK(devmig_dev_state(d) == DEVMIG_STATE_STOP_COPY);
	CHECK(strstr(logbuf, "STOP_COPY -> PRE_COPY refused") != NULL);

	/* A failure: GET, then recovery to the requested state. */
	CHECK(devmig_set_state(d, DEVMIG_STATE_STOP, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_data_fd(d) == -1);
	fake_set_errno = EIO;
	fake_state_after_failure = DEVMIG_STATE_STOP;
	CHECK(devmig_set_state(d, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL) == -EIO);
	CHECK(devmig_get_state(d, &st) == 0 && st == DEVMIG_STATE_RUNNING);
	/* In ERROR: recovery is impossible, so reset. */
	fake_set_errno = ENODEV;
	fake_state_after_failure = DEVMIG_STATE_ERROR;
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == -ENODEV);
	CHECK(devmig_dev_state(d) == DEVMIG_STATE_RUNNING && fake_state == DEVMIG_STATE_RUNNING);
	CHECK(strstr(logbuf, "(reset)") != NULL);

	/* PRE_COPY info goes to the data fd. */
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, &dfd) == 0);
	CHECK(dfd >= 0);
	struct devmig_precopy_info pi;
	CHECK(devmig_precopy_info(d, &pi) == 0 && pi.initial_bytes == 7 && pi.dirty_bytes == 9);
	CHECK(devmig_precopy_initial_done(d, &v) == 0 && v == 9);
	CHECK(devmig_set_state(d, DEVMIG_STATE_RUNNING, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_precopy_info(d, &pi) == -EINVAL);
	devmig_dev_close(d);
	close(fake_fd);
	CHECK_DONE();
}
