/* Every VFIO ioctl devmig issues, and nothing else: each wrapper frames the
 * request, issues it and converts the answer, returning 0 or -errno. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "devmig/vfio.h"

/* ioctl() with EINTR retried and the result as 0/positive or -errno. */
static int xioctl(int fd, unsigned long req, void *arg)
{
	int r;

	do
		r = ioctl(fd, req, arg);
	while (r < 0 && errno == EINTR);
	return r < 0 ? -errno : r;
}

/* A VFIO_DEVICE_FEATURE request: the 8-byte header and up to 16 bytes of
 * payload (the largest fixed payload devmig sends is the 32-byte DMA
 * logging report; the rest are 8 to 24 bytes; 32 bytes, no more, leaves
 * room), 8-byte aligned because the payloads hold __aligned_u64. */
#define FEATURE_HDR sizeof(struct devmig_vfio_device_feature)
#define FEATURE_MAX_PAYLOAD 32

static int feature(int fd, uint32_t flags, void *payload, size_t len)
{
	union {
		uint64_t align;
		uint8_t b[FEATURE_HDR + FEATURE_MAX_PAYLOAD];
	} fb;
	struct devmig_vfio_device_feature *hdr = (void *)fb.b;
	int r;

	if (len > FEATURE_MAX_PAYLOAD)
		return -EINVAL;
	memset(&fb, 0, sizeof(fb));
	hdr->argsz = (uint32_t)(FEATURE_HDR + len);
	hdr->flags = flags;
	if (len)
		memcpy(fb.b + FEATURE_HDR, payload, len);
	r = xioctl(fd, DEVMIG_VFIO_DEVICE_FEATURE, &fb);
	if (r >= 0 && len)
		memcpy(payload, fb.b + FEATURE_HDR, len);
	return r < 0 ? r : 0;
}

int devmig_vfio_group_get_device_fd(int group_fd, const char *name)
{
	/* The argument is the device name string itself, not a struct. */
	return xioctl(group_fd, DEVMIG_VFIO_GROUP_GET_DEVICE_FD, (void *)name);
}

int devmig_vfio_device_get_info(int fd, struct devmig_vfio_device_info *info)
{
	memset(info, 0, sizeof(*info));
	info->argsz = sizeof(*info);
	int r = xioctl(fd, DEVMIG_VFIO_DEVICE_GET_INFO, info);

	return r < 0 ? r : 0;
}

void devmig_region_info_free(struct devmig_region_info *ri)
{
	if (!ri)
		return;
	free(ri->sparse);
	ri->sparse = NULL;
	ri->nr_sparse = 0;
}

int devmig_region_info_parse(const void *buf, size_t len, struct devmig_region_info *out)
{
	const struct devmig_vfio_region_info *ri = buf;
	const uint8_t *base = buf;
	/* A chain longer than this is a loop: each header takes at least 8
	 * bytes of a buffer the kernel bounds to argsz. */
	size_t max_caps = len / sizeof(struct devmig_vfio_info_cap_header);

	memset(out, 0, sizeof(*out));
	if (len < sizeof(*ri))
		return -EPROTO;
	out->index = ri->index;
	out->flags = ri->flags;
	out->size = ri->size;
	out->offset = ri->offset;
	if (!(ri->flags & DEVMIG_VFIO_REGION_INFO_FLAG_CAPS))
		return 0;
	for (uint32_t off = ri->cap_offset; off; max_caps--) {
		const struct devmig_vfio_info_cap_header *h;

		/* Headers follow the fixed struct and must lie inside the buffer. */
		if (!max_caps || off < sizeof(*ri) || off > len || len - off < sizeof(*h))
			goto bad;
		h = (const void *)(base + off);
		if (h->id == DEVMIG_VFIO_REGION_INFO_CAP_SPARSE_MMAP && !out->has_sparse) {
			const struct devmig_vfio_region_info_cap_sparse_mmap *sp = (const void *)h;

			if (len - off < sizeof(*sp) ||
			    (len - off - sizeof(*sp)) / sizeof(sp->areas[0]) < sp->nr_areas)
				goto bad;
			out->has_sparse = 1;
			out->nr_sparse = sp->nr_areas;
			if (sp->nr_areas) {
				out->sparse = calloc(sp->nr_areas, sizeof(sp->areas[0]));
				if (!out->sparse)
					return -ENOMEM;
				memcpy(out->sparse, sp->areas, sp->nr_areas * sizeof(sp->areas[0]));
			}
		} else if (h->id == DEVMIG_VFIO_REGION_INFO_CAP_TYPE) {
			const struct devmig_vfio_region_info_cap_type *ty = (const void *)h;

			if (len - off < sizeof(*ty))
				goto bad;
			out->has_type = 1;
			out->type = ty->type;
			out->subtype = ty->subtype;
		}
		off = h->next;
	}
	return 0;
bad:
	devmig_region_info_free(out);
	return -EPROTO;
}

int devmig_vfio_get_region_info(int fd, uint32_t index, struct devmig_region_info *out)
{
	struct devmig_vfio_region_info probe = { .argsz = sizeof(probe), .index = index };
	void *buf;
	uint32_t need;
	int r;

	memset(out, 0, sizeof(*out));
	r = xioctl(fd, DEVMIG_VFIO_DEVICE_GET_REGION_INFO, &probe);
	if (r < 0)
		return r;
	if (probe.argsz <= sizeof(probe))
		return devmig_region_info_parse(&probe, sizeof(probe), out);
	/* The caps did not fit: the kernel told us the size they need. A
	 * second call can still report a bigger argsz if the chain grew in
	 * between; then the answer is incomplete and we ask again. */
	for (;;) {
		need = probe.argsz;
		buf = calloc(1, need);
		if (!buf)
			return -ENOMEM;
		((struct devmig_vfio_region_info *)buf)->argsz = need;
		((struct devmig_vfio_region_info *)buf)->index = index;
		r = xioctl(fd, DEVMIG_VFIO_DEVICE_GET_REGION_INFO, buf);
		if (r < 0) {
			free(buf);
			return r;
		}
		probe.argsz = ((struct devmig_vfio_region_info *)buf)->argsz;
		if (probe.argsz <= need)
			break;
		free(buf);
	}
	r = devmig_region_info_parse(buf, need, out);
	free(buf);
	return r;
}

int devmig_vfio_get_irq_info(int fd, uint32_t index, struct devmig_vfio_irq_info *info)
{
	memset(info, 0, sizeof(*info));
	info->argsz = sizeof(*info);
	info->index = index;
	int r = xioctl(fd, DEVMIG_VFIO_DEVICE_GET_IRQ_INFO, info);

	return r < 0 ? r : 0;
}

int devmig_vfio_set_irqs_eventfd(int fd, uint32_t index, uint32_t start, uint32_t count,
				 const int32_t *eventfds)
{
	struct devmig_vfio_irq_set *set;
	size_t sz = sizeof(*set) + (size_t)count * sizeof(int32_t);
	int r;

	set = calloc(1, sz);
	if (!set)
		return -ENOMEM;
	set->argsz = (uint32_t)sz;
	set->index = index;
	set->start = start;
	set->count = count;
	/* count == 0 with DATA_NONE|ACTION_TRIGGER is the documented way to
	 * disable every vector of the index. */
	set->flags = DEVMIG_VFIO_IRQ_SET_ACTION_TRIGGER |
		     (count ? DEVMIG_VFIO_IRQ_SET_DATA_EVENTFD : DEVMIG_VFIO_IRQ_SET_DATA_NONE);
	if (count)
		memcpy(set->data, eventfds, (size_t)count * sizeof(int32_t));
	r = xioctl(fd, DEVMIG_VFIO_DEVICE_SET_IRQS, set);
	free(set);
	return r < 0 ? r : 0;
}

int devmig_vfio_reset(int fd)
{
	int r = xioctl(fd, DEVMIG_VFIO_DEVICE_RESET, NULL);

	return r < 0 ? r : 0;
}

int devmig_vfio_feature_probe(int fd, uint32_t feat, uint32_t get_set)
{
	return feature(fd, (feat & DEVMIG_VFIO_DEVICE_FEATURE_MASK) | get_set |
				   DEVMIG_VFIO_DEVICE_FEATURE_PROBE,
		       NULL, 0);
}

int devmig_vfio_mig_flags(int fd, uint64_t *flags)
{
	struct devmig_vfio_device_feature_migration m = { 0 };
	int r = feature(fd, DEVMIG_VFIO_DEVICE_FEATURE_MIGRATION | DEVMIG_VFIO_DEVICE_FEATURE_GET,
			&m, sizeof(m));

	if (r == 0)
		*flags = m.flags;
	return r;
}

int devmig_vfio_mig_get_state(int fd, uint32_t *state)
{
	struct devmig_vfio_device_feature_mig_state m = { .data_fd = -1 };
	int r = feature(fd, DEVMIG_VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | DEVMIG_VFIO_DEVICE_FEATURE_GET,
			&m, sizeof(m));

	if (r == 0)
		*state = m.device_state;
	return r;
}

int devmig_vfio_mig_set_state(int fd, uint32_t state, int *data_fd)
{
	struct devmig_vfio_device_feature_mig_state m = { .device_state = state, .data_fd = -1 };
	int r;

	/* The kernel may hand back a new data fd on any arc; without a place to
	 * put it, it would leak (and its session with it). */
	if (!data_fd)
		return -EINVAL;
	r = feature(fd, DEVMIG_VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | DEVMIG_VFIO_DEVICE_FEATURE_SET,
		    &m, sizeof(m));
	*data_fd = r == 0 ? m.data_fd : -1;
	return r;
}

int devmig_vfio_mig_data_size(int fd, uint64_t *bytes)
{
	struct devmig_vfio_device_feature_mig_data_size m = { 0 };
	int r = feature(fd, DEVMIG_VFIO_DEVICE_FEATURE_MIG_DATA_SIZE | DEVMIG_VFIO_DEVICE_FEATURE_GET,
			&m, sizeof(m));

	if (r == 0)
		*bytes = m.stop_copy_length;
	return r;
}

int devmig_vfio_precopy_info(int data_fd, uint64_t *initial_bytes, uint64_t *dirty_bytes)
{
	struct devmig_vfio_precopy_info pi = { .argsz = sizeof(pi) };
	int r = xioctl(data_fd, DEVMIG_VFIO_MIG_GET_PRECOPY_INFO, &pi);

	if (r < 0)
		return r;
	*initial_bytes = pi.initial_bytes;
	*dirty_bytes = pi.dirty_bytes;
	return 0;
}

/* ---- containers and groups (type1), device cdevs and iommufd ---- */

/* These pass a plain integer, not a pointer, as the ioctl argument. */
static int xioctl_int(int fd, unsigned long req, unsigned long arg)
{
	int r;

	do
		r = ioctl(fd, req, arg);
	while (r < 0 && errno == EINTR);
	return r < 0 ? -errno : r;
}

int devmig_vfio_get_api_version(int container_fd)
{
	return xioctl_int(container_fd, DEVMIG_VFIO_GET_API_VERSION, 0);
}

int devmig_vfio_check_extension(int container_fd, uint32_t ext)
{
	return xioctl_int(container_fd, DEVMIG_VFIO_CHECK_EXTENSION, ext);
}

int devmig_vfio_set_iommu(int container_fd, uint32_t type)
{
	return xioctl_int(container_fd, DEVMIG_VFIO_SET_IOMMU, type);
}

int devmig_vfio_group_get_status(int group_fd, uint32_t *flags)
{
	struct devmig_vfio_group_status st = { .argsz = sizeof(st) };
	int r = xioctl(group_fd, DEVMIG_VFIO_GROUP_GET_STATUS, &st);

	if (r >= 0)
		*flags = st.flags;
	return r < 0 ? r : 0;
}

int devmig_vfio_group_set_container(int group_fd, int container_fd)
{
	/* The argument points at the container fd. */
	int r = xioctl(group_fd, DEVMIG_VFIO_GROUP_SET_CONTAINER, &container_fd);

	return r < 0 ? r : 0;
}

int devmig_vfio_device_bind_iommufd(int device_fd, int iommufd, uint32_t *devid)
{
	struct devmig_vfio_device_bind_iommufd b = { .argsz = sizeof(b), .iommufd = iommufd };
	int r = xioctl(device_fd, DEVMIG_VFIO_DEVICE_BIND_IOMMUFD, &b);

	if (r >= 0 && devid)
		*devid = b.out_devid;
	return r < 0 ? r : 0;
}

int devmig_vfio_device_attach_pt(int device_fd, uint32_t *pt_id)
{
	struct devmig_vfio_device_attach_iommufd_pt a = { .argsz = sizeof(a), .pt_id = *pt_id };
	int r = xioctl(device_fd, DEVMIG_VFIO_DEVICE_ATTACH_IOMMUFD_PT, &a);

	if (r >= 0)
		*pt_id = a.pt_id;
	return r < 0 ? r : 0;
}

int devmig_iommu_ioas_alloc(int iommufd, uint32_t *ioas_id)
{
	struct devmig_iommu_ioas_alloc a = { .size = sizeof(a) };
	int r = xioctl(iommufd, DEVMIG_IOMMU_IOAS_ALLOC, &a);

	if (r >= 0)
		*ioas_id = a.out_ioas_id;
	return r < 0 ? r : 0;
}

int devmig_iommu_destroy(int iommufd, uint32_t id)
{
	struct devmig_iommu_destroy d = { .size = sizeof(d), .id = id };
	int r = xioctl(iommufd, DEVMIG_IOMMU_DESTROY, &d);

	return r < 0 ? r : 0;
}

/* ---- iommufd: mappings and dirty-tracking page tables ---- */

int devmig_iommu_ioas_map(int iommufd, uint32_t ioas_id, void *va, uint64_t length, uint64_t *iova,
			  uint32_t flags)
{
	struct devmig_iommu_ioas_map m = {
		.size = sizeof(m),
		.flags = flags,
		.ioas_id = ioas_id,
		.user_va = (uint64_t)(uintptr_t)va,
		.length = length,
		.iova = *iova,
	};
	int r = xioctl(iommufd, DEVMIG_IOMMU_IOAS_MAP, &m);

	if (r >= 0)
		*iova = m.iova;
	return r < 0 ? r : 0;
}

int devmig_iommu_hwpt_alloc(int iommufd, uint32_t flags, uint32_t dev_id, uint32_t pt_id,
			    uint32_t *hwpt_id)
{
	struct devmig_iommu_hwpt_alloc a = {
		.size = sizeof(a), .flags = flags, .dev_id = dev_id, .pt_id = pt_id
	};
	int r = xioctl(iommufd, DEVMIG_IOMMU_HWPT_ALLOC, &a);

	if (r >= 0)
		*hwpt_id = a.out_hwpt_id;
	return r < 0 ? r : 0;
}

int devmig_iommu_hwpt_set_dirty_tracking(int iommufd, uint32_t hwpt_id, int enable)
{
	struct devmig_iommu_hwpt_set_dirty_tracking s = {
		.size = sizeof(s),
		.flags = enable ? DEVMIG_IOMMU_HWPT_DIRTY_TRACKING_ENABLE : 0,
		.hwpt_id = hwpt_id,
	};
	int r = xioctl(iommufd, DEVMIG_IOMMU_HWPT_SET_DIRTY_TRACKING, &s);

	return r < 0 ? r : 0;
}

int devmig_iommu_hwpt_get_dirty_bitmap(int iommufd, uint32_t hwpt_id, uint32_t flags, uint64_t iova,
				       uint64_t length, uint64_t page_size, void *bitmap)
{
	struct devmig_iommu_hwpt_get_dirty_bitmap g = {
		.size = sizeof(g),
		.hwpt_id = hwpt_id,
		.flags = flags,
		.iova = iova,
		.length = length,
		.page_size = page_size,
		.data = (uint64_t)(uintptr_t)bitmap,
	};
	int r = xioctl(iommufd, DEVMIG_IOMMU_HWPT_GET_DIRTY_BITMAP, &g);

	return r < 0 ? r : 0;
}

/* ---- type1 containers: DMA mappings and dirty pages ---- */

int devmig_vfio_dma_map(int container_fd, void *va, uint64_t iova, uint64_t size, uint32_t flags)
{
	struct devmig_vfio_iommu_type1_dma_map m = {
		.argsz = sizeof(m), .flags = flags, .vaddr = (uint64_t)(uintptr_t)va, .iova = iova, .size = size
	};
	int r = xioctl(container_fd, DEVMIG_VFIO_IOMMU_MAP_DMA, &m);

	return r < 0 ? r : 0;
}

int devmig_vfio_dma_unmap(int container_fd, uint64_t iova, uint64_t size)
{
	struct devmig_vfio_iommu_type1_dma_unmap u = { .argsz = sizeof(u), .iova = iova, .size = size };
	int r = xioctl(container_fd, DEVMIG_VFIO_IOMMU_UNMAP_DMA, &u);

	return r < 0 ? r : 0;
}

int devmig_vfio_dirty_pages(int container_fd, uint32_t flags)
{
	struct devmig_vfio_iommu_type1_dirty_bitmap d = { .argsz = sizeof(d), .flags = flags };
	int r = xioctl(container_fd, DEVMIG_VFIO_IOMMU_DIRTY_PAGES, &d);

	return r < 0 ? r : 0;
}

int devmig_vfio_dirty_get_bitmap(int container_fd, uint64_t iova, uint64_t size, uint64_t pgsize,
				 void *bitmap, uint64_t bitmap_bytes)
{
	/* The request header followed by its GET_BITMAP payload, in one
	 * 8-byte aligned buffer. */
	union {
		uint64_t align;
		uint8_t b[sizeof(struct devmig_vfio_iommu_type1_dirty_bitmap) +
			  sizeof(struct devmig_vfio_iommu_type1_dirty_bitmap_get)];
	} req;
	struct devmig_vfio_iommu_type1_dirty_bitmap *d = (void *)req.b;
	struct devmig_vfio_iommu_type1_dirty_bitmap_get g = {
		.iova = iova,
		.size = size,
		.bitmap = { .pgsize = pgsize, .size = bitmap_bytes, .data = (uint64_t)(uintptr_t)bitmap },
	};
	int r;

	memset(&req, 0, sizeof(req));
	d->argsz = sizeof(req.b);
	d->flags = DEVMIG_VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
	memcpy(req.b + sizeof(*d), &g, sizeof(g));
	r = xioctl(container_fd, DEVMIG_VFIO_IOMMU_DIRTY_PAGES, &req);
	return r < 0 ? r : 0;
}

/* ---- device DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*) ---- */

int devmig_vfio_dma_logging_start(int fd, const struct devmig_vfio_device_feature_dma_logging_range *ranges,
				  uint32_t n, uint64_t *page_size)
{
	struct devmig_vfio_device_feature_dma_logging_control c = {
		.page_size = *page_size,
		.num_ranges = n,
		.ranges = (uint64_t)(uintptr_t)ranges,
	};
	int r = feature(fd, DEVMIG_VFIO_DEVICE_FEATURE_SET | DEVMIG_VFIO_DEVICE_FEATURE_DMA_LOGGING_START, &c,
			sizeof(c));

	if (r == 0)
		*page_size = c.page_size; /* the granularity the device chose */
	return r;
}

int devmig_vfio_dma_logging_stop(int fd)
{
	return feature(fd, DEVMIG_VFIO_DEVICE_FEATURE_SET | DEVMIG_VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, NULL, 0);
}

int devmig_vfio_dma_logging_report(int fd, uint64_t iova, uint64_t length, uint64_t page_size, void *bitmap)
{
	struct devmig_vfio_device_feature_dma_logging_report rep = {
		.iova = iova,
		.length = length,
		.page_size = page_size,
		.bitmap = (uint64_t)(uintptr_t)bitmap,
	};

	return feature(fd, DEVMIG_VFIO_DEVICE_FEATURE_GET | DEVMIG_VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, &rep,
		       sizeof(rep));
}
