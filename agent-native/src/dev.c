/* struct devmig_dev: one migratable device behind an ops table, plus the
 * real-VFIO backend (every call goes to src/ioctl.c or read/write). */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "devmig/dirty.h"
#include "devmig/vfio.h"
#include "internal.h"

static void log_stderr(void *ctx, const char *line)
{
	(void)ctx;
	fprintf(stderr, "devmig: %s\n", line);
}

void devmig_logf(struct devmig_dev *d, const char *fmt, ...)
{
	/* 256 bytes holds the longest line devmig writes (a path of at most
	 * 8 state names plus an errno text); longer lines are cut, never lost
	 * entirely. */
	char line[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	d->log(d->log_ctx, line);
}

void devmig_dev_set_log(struct devmig_dev *d, devmig_log_fn fn, void *ctx)
{
	d->log = fn ? fn : log_stderr;
	d->log_ctx = fn ? ctx : NULL;
}

int devmig_dev_init(const struct devmig_dev_ops *ops, void *priv, int fd,
		    const struct devmig_dev_desc *desc, struct devmig_dev **out)
{
	struct devmig_dev *d = calloc(1, sizeof(*d));
	int r;

	if (!d)
		return -ENOMEM;
	d->ops = ops;
	d->priv = priv;
	d->fd = fd;
	d->data_fd = -1;
	d->log = log_stderr;
	if (desc)
		d->desc = *desc;
	d->desc.driver[sizeof(d->desc.driver) - 1] = '\0';
	r = ops->mig_flags(d, &d->flags);
	if (r == 0 && !(d->flags & DEVMIG_MIG_STOP_COPY))
		r = -EOPNOTSUPP; /* STOP_COPY is mandatory for a migratable device */
	if (r == 0)
		r = ops->get_state(d, &d->state);
	if (r < 0) {
		/* The caller keeps ownership of priv and fd on failure. */
		free(d);
		return r;
	}
	*out = d;
	return 0;
}

void devmig_dev_end_session(struct devmig_dev *d)
{
	if (d->data_fd >= 0)
		close(d->data_fd);
	d->data_fd = -1;
}

void devmig_dev_close(struct devmig_dev *d)
{
	if (!d)
		return;
	devmig_dev_end_session(d);
	d->ops->destroy(d);
	free(d);
}

const struct devmig_dev_desc *devmig_dev_desc(const struct devmig_dev *d)
{
	return &d->desc;
}

uint64_t devmig_dev_flags(const struct devmig_dev *d)
{
	return d->flags;
}

uint32_t devmig_dev_state(const struct devmig_dev *d)
{
	return d->state;
}

int devmig_probe_flags(struct devmig_dev *d, uint64_t *flags)
{
	int r = d->ops->mig_flags(d, flags);

	if (r == 0)
		d->flags = *flags;
	return r;
}

int devmig_get_state(struct devmig_dev *d, uint32_t *state)
{
	int r = d->ops->get_state(d, state);

	if (r == 0)
		d->state = *state;
	return r;
}

void devmig_dev_poison(struct devmig_dev *d)
{
	d->poisoned = true;
}

int devmig_dev_poisoned(const struct devmig_dev *d)
{
	return d->poisoned;
}

int devmig_data_fd(const struct devmig_dev *d)
{
	return d->data_fd;
}

/* ---- the real VFIO backend ---- */

static int vfio_mig_flags(struct devmig_dev *d, uint64_t *flags)
{
	return devmig_vfio_mig_flags(d->fd, flags);
}

static int vfio_get_state(struct devmig_dev *d, uint32_t *state)
{
	return devmig_vfio_mig_get_state(d->fd, state);
}

static int vfio_set_state(struct devmig_dev *d, uint32_t state, int *data_fd)
{
	return devmig_vfio_mig_set_state(d->fd, state, data_fd);
}

static int vfio_reset(struct devmig_dev *d)
{
	return devmig_vfio_reset(d->fd);
}

static int vfio_precopy_info(struct devmig_dev *d, int data_fd, uint64_t *initial, uint64_t *dirty)
{
	(void)d;
	return devmig_vfio_precopy_info(data_fd, initial, dirty);
}

static int vfio_data_size(struct devmig_dev *d, uint64_t *bytes)
{
	return devmig_vfio_mig_data_size(d->fd, bytes);
}

static ssize_t vfio_data_read(struct devmig_dev *d, int data_fd, void *buf, size_t len)
{
	(void)d;
	ssize_t n = read(data_fd, buf, len);

	return n < 0 ? -errno : n;
}

static ssize_t vfio_data_write(struct devmig_dev *d, int data_fd, const void *buf, size_t len)
{
	(void)d;
	ssize_t n = write(data_fd, buf, len);

	return n < 0 ? -errno : n;
}

static int vfio_region_info(struct devmig_dev *d, uint32_t index, struct devmig_region_info *ri)
{
	return devmig_vfio_get_region_info(d->fd, index, ri);
}

int devmig_dev_region_info(struct devmig_dev *d, uint32_t index, struct devmig_region_info *ri)
{
	return d->ops->region_info ? d->ops->region_info(d, index, ri) : -ENOTTY;
}

static int vfio_dma_log_start(struct devmig_dev *d, const struct devmig_vfio_device_feature_dma_logging_range *r,
			      uint32_t n, uint64_t *page_size)
{
	return devmig_vfio_dma_logging_start(d->fd, r, n, page_size);
}

static int vfio_dma_log_stop(struct devmig_dev *d)
{
	return devmig_vfio_dma_logging_stop(d->fd);
}

static int vfio_dma_log_report(struct devmig_dev *d, uint64_t iova, uint64_t length, uint64_t page_size,
			       uint64_t *bitmap)
{
	return devmig_vfio_dma_logging_report(d->fd, iova, length, page_size, bitmap);
}

int devmig_dma_log_start(struct devmig_dev *d, const struct devmig_vfio_device_feature_dma_logging_range *r,
			 uint32_t n, uint64_t *page_size)
{
	int rc;

	if (!d->ops->dma_log_start)
		return -ENOTTY;
	rc = d->ops->dma_log_start(d, r, n, page_size);
	if (rc == 0)
		d->dma_logging = true; /* recorded only once the device accepted it */
	return rc;
}

int devmig_dma_log_stop(struct devmig_dev *d)
{
	int rc;

	if (!d->ops->dma_log_stop)
		return -ENOTTY;
	rc = d->ops->dma_log_stop(d);
	if (rc == 0)
		d->dma_logging = false;
	return rc;
}

int devmig_dma_log_report(struct devmig_dev *d, uint64_t iova, uint64_t length, uint64_t page_size,
			  uint64_t *bitmap, size_t nwords)
{
	if (!d->ops->dma_log_report)
		return -ENOTTY;
	/* The uAPI's minimum report granularity is 4 KiB. */
	if (page_size < 4096 || (page_size & (page_size - 1)) || !length || iova % page_size ||
	    length % page_size)
		return -EINVAL;
	if ((uint64_t)nwords < (length / page_size + 63) / 64)
		return -ENOSPC;
	if (!d->dma_logging)
		return -ENODATA; /* no log to read: never report "clean" */
	memset(bitmap, 0, nwords * sizeof(*bitmap));
	return d->ops->dma_log_report(d, iova, length, page_size, bitmap);
}

static void vfio_destroy(struct devmig_dev *d)
{
	close(d->fd);
}

static const struct devmig_dev_ops vfio_ops = {
	.kind = "vfio",
	.region_info = vfio_region_info,
	.dma_log_start = vfio_dma_log_start,
	.dma_log_stop = vfio_dma_log_stop,
	.dma_log_report = vfio_dma_log_report,
	.mig_flags = vfio_mig_flags,
	.get_state = vfio_get_state,
	.set_state = vfio_set_state,
	.reset = vfio_reset,
	.precopy_info = vfio_precopy_info,
	.data_size = vfio_data_size,
	.data_read = vfio_data_read,
	.data_write = vfio_data_write,
	.destroy = vfio_destroy,
};

int devmig_dev_open_vfio(int device_fd, const struct devmig_dev_desc *desc, struct devmig_dev **out)
{
	/* Our own reference, close-on-exec: the VMM keeps its duplicate, and
	 * the device state lives as long as either is open. */
	int fd = fcntl(device_fd, F_DUPFD_CLOEXEC, 0);
	int r;

	if (fd < 0)
		return -errno;
	r = devmig_dev_init(&vfio_ops, NULL, fd, desc, out);
	if (r < 0)
		close(fd);
	return r;
}
