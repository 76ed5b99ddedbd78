/* The migration data fd: reading the saving stream, writing the resuming
 * one, PRE_COPY info and the STOP_COPY size estimate. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Read buffer for devmig_data_drain: 1 MiB. QEMU found that buffers of
 * 128 MiB or 1 GiB move mlx5's hundreds of MB of state no faster than
 * 1 MiB, and 1 MiB keeps per-device memory small. */
#define DRAIN_BUF (1u << 20)

static int in_precopy(const struct devmig_dev *d)
{
	return d->state == DEVMIG_STATE_PRE_COPY || d->state == DEVMIG_STATE_PRE_COPY_P2P;
}

long devmig_data_read(struct devmig_dev *d, void *buf, size_t len)
{
	ssize_t n;

	if (d->data_fd < 0 || !devmig_state_is_saving(d->state))
		return -EBADF;
	do
		n = d->ops->data_read(d, d->data_fd, buf, len);
	while (n == -EINTR);
	/* The uAPI says ENOMSG is PRE_COPY's temporary end; some drivers
	 * (mtty) return 0 there instead. In PRE_COPY both mean "nothing more
	 * for now", never the end of the stream. */
	if (n == 0 && len && in_precopy(d))
		return -ENOMSG;
	return n;
}

int devmig_data_drain(struct devmig_dev *d, devmig_sink_fn sink, void *ctx, uint64_t *total)
{
	uint8_t *buf = malloc(DRAIN_BUF);
	long n;
	int r = 0;

	if (!buf)
		return -ENOMEM;
	for (;;) {
		n = devmig_data_read(d, buf, DRAIN_BUF);
		if (n == 0) {
			r = 1;
			break;
		}
		if (n == -ENOMSG) {
			r = 0;
			break;
		}
		if (n < 0) {
			r = (int)n;
			break;
		}
		r = sink(ctx, buf, (size_t)n);
		if (r < 0)
			break;
		if (total)
			*total += (uint64_t)n;
	}
	free(buf);
	return r;
}

int devmig_precopy_info(struct devmig_dev *d, struct devmig_precopy_info *info)
{
	if (d->data_fd < 0 || !in_precopy(d))
		return -EINVAL; /* what the kernel answers outside PRE_COPY */
	return d->ops->precopy_info(d, d->data_fd, &info->initial_bytes, &info->dirty_bytes);
}

int devmig_precopy_initial_done(struct devmig_dev *d, uint64_t *dirty_left)
{
	struct devmig_precopy_info pi;
	int r = devmig_precopy_info(d, &pi);

	if (r < 0)
		return r;
	if (dirty_left)
		*dirty_left = pi.dirty_bytes;
	return pi.initial_bytes == 0;
}

int devmig_data_size(struct devmig_dev *d, uint64_t *bytes)
{
	return d->ops->data_size(d, bytes);
}

long devmig_data_write(struct devmig_dev *d, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	size_t done = 0;

	if (d->poisoned)
		return -EIO;
	if (d->data_fd < 0 || d->state != DEVMIG_STATE_RESUMING)
		return -EBADF;
	while (done < len) {
		ssize_t n = d->ops->data_write(d, d->data_fd, p + done, len - done);

		if (n == -EINTR)
			continue;
		if (n <= 0) {
			/* The device may hold part of this buffer: what it
			 * has can no longer be completed in order, so it must
			 * never leave RESUMING with it. */
			d->poisoned = true;
			devmig_logf(d, "RESUMING write failed after %zu bytes: %s; device poisoned", done,
				    n < 0 ? strerror((int)-n) : "no progress");
			return n < 0 ? (long)n : -EIO;
		}
		done += (size_t)n;
	}
	return (long)len;
}
