/* Opening a VFIO device the two ways the kernel offers, as a VMM does:
 * through its group and a type1 container, or through its cdev bound to
 * an iommufd. Only the ioctl wrappers of ioctl.c touch the kernel. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "devmig/vfio.h"

static void reset_handle(struct devmig_vfio_handle *h)
{
	memset(h, 0, sizeof(*h));
	h->device_fd = h->container_fd = h->group_fd = h->iommufd = -1;
}

/* Record why a step failed and close what was opened; returns r. */
__attribute__((format(printf, 5, 6))) static int fail(struct devmig_vfio_handle *h, int r,
						      char *why, size_t why_len, const char *fmt, ...)
{
	va_list ap;

	if (why && why_len) {
		char step[320];

		va_start(ap, fmt);
		vsnprintf(step, sizeof(step), fmt, ap);
		va_end(ap);
		snprintf(why, why_len, "%s: %s", step, strerror(-r));
	}
	devmig_vfio_handle_close(h);
	return r;
}

static int open_rw(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);

	return fd < 0 ? -errno : fd;
}

int devmig_vfio_open_group(const char *group_path, const char *name, struct devmig_vfio_handle *h,
			   char *why, size_t why_len)
{
	uint32_t flags = 0;
	int r;

	reset_handle(h);
	if ((r = open_rw("/dev/vfio/vfio")) < 0)
		return fail(h, r, why, why_len, "open /dev/vfio/vfio");
	h->container_fd = r;
	if ((r = devmig_vfio_get_api_version(h->container_fd)) != DEVMIG_VFIO_API_VERSION)
		return fail(h, r < 0 ? r : -EPROTONOSUPPORT, why, why_len, "VFIO API version %d", r);
	if ((r = devmig_vfio_check_extension(h->container_fd, DEVMIG_VFIO_TYPE1v2_IOMMU)) != 1)
		return fail(h, r < 0 ? r : -EOPNOTSUPP, why, why_len, "container without type1v2");
	if ((r = open_rw(group_path)) < 0)
		return fail(h, r, why, why_len, "open %.200s", group_path);
	h->group_fd = r;
	if ((r = devmig_vfio_group_get_status(h->group_fd, &flags)) < 0)
		return fail(h, r, why, why_len, "VFIO_GROUP_GET_STATUS");
	/* Not viable: some device of the group is bound to a host driver,
	 * so the group cannot be given to userspace. */
	if (!(flags & DEVMIG_VFIO_GROUP_FLAGS_VIABLE))
		return fail(h, -EBUSY, why, why_len, "group %.64s not viable", group_path);
	if ((r = devmig_vfio_group_set_container(h->group_fd, h->container_fd)) < 0)
		return fail(h, r, why, why_len, "VFIO_GROUP_SET_CONTAINER");
	if ((r = devmig_vfio_set_iommu(h->container_fd, DEVMIG_VFIO_TYPE1v2_IOMMU)) < 0)
		return fail(h, r, why, why_len, "VFIO_SET_IOMMU type1v2");
	if ((r = devmig_vfio_group_get_device_fd(h->group_fd, name)) < 0)
		return fail(h, r, why, why_len, "VFIO_GROUP_GET_DEVICE_FD %.64s", name);
	h->device_fd = r;
	return 0;
}

int devmig_vfio_open_cdev(const char *cdev_path, const char *iommufd_path,
			  struct devmig_vfio_handle *h, char *why, size_t why_len)
{
	int r;

	reset_handle(h);
	if ((r = open_rw(cdev_path)) < 0)
		return fail(h, r, why, why_len, "open %.200s", cdev_path);
	h->device_fd = r;
	if ((r = open_rw(iommufd_path)) < 0)
		return fail(h, r, why, why_len, "open %.200s", iommufd_path);
	h->iommufd = r;
	/* Bind first: a cdev does nothing else until it is bound. */
	if ((r = devmig_vfio_device_bind_iommufd(h->device_fd, h->iommufd, &h->devid)) < 0)
		return fail(h, r, why, why_len, "VFIO_DEVICE_BIND_IOMMUFD");
	if ((r = devmig_iommu_ioas_alloc(h->iommufd, &h->ioas_id)) < 0)
		return fail(h, r, why, why_len, "IOMMU_IOAS_ALLOC");
	h->hwpt_id = h->ioas_id;
	if ((r = devmig_vfio_device_attach_pt(h->device_fd, &h->hwpt_id)) < 0)
		return fail(h, r, why, why_len, "VFIO_DEVICE_ATTACH_IOMMUFD_PT");
	return 0;
}

void devmig_vfio_handle_close(struct devmig_vfio_handle *h)
{
	/* The device first: it holds references to the container or IOAS. */
	int *fds[] = { &h->device_fd, &h->group_fd, &h->container_fd, &h->iommufd };

	for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
		if (*fds[i] >= 0)
			close(*fds[i]);
		*fds[i] = -1;
	}
}
