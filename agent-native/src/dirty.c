/* IOMMU dirty tracking through an iommufd HWPT (include/devmig/dirty.h). */
#include <errno.h>
#include <string.h>

#include "devmig/dirty.h"
#include "devmig/vfio.h"

int devmig_hwpt_dirty_alloc(int iommufd, uint32_t dev_id, uint32_t ioas_id,
			    struct devmig_hwpt_dirty *t)
{
	int r;

	memset(t, 0, sizeof(*t));
	t->iommufd = iommufd;
	r = devmig_iommu_hwpt_alloc(iommufd, DEVMIG_IOMMU_HWPT_ALLOC_DIRTY_TRACKING, dev_id, ioas_id,
				    &t->hwpt_id);
	return r;
}

static int set_tracking(struct devmig_hwpt_dirty *t, int on)
{
	int r = devmig_iommu_hwpt_set_dirty_tracking(t->iommufd, t->hwpt_id, on);

	/* Recorded only once the kernel accepted it. */
	if (r == 0)
		t->tracking = on;
	return r;
}

int devmig_hwpt_dirty_start(struct devmig_hwpt_dirty *t)
{
	return set_tracking(t, 1);
}

int devmig_hwpt_dirty_stop(struct devmig_hwpt_dirty *t)
{
	return set_tracking(t, 0);
}

/* Shared checks of a read request: 0 or -errno. */
static int check_read(uint64_t iova, uint64_t length, uint64_t page_size, size_t nwords)
{
	if (!page_size || (page_size & (page_size - 1)) || iova % page_size || length % page_size ||
	    !length)
		return -EINVAL;
	if ((uint64_t)nwords < (length / page_size + 63) / 64)
		return -ENOSPC;
	return 0;
}

int devmig_type1_dirty_start(struct devmig_type1_dirty *t)
{
	int r = devmig_vfio_dirty_pages(t->container_fd, DEVMIG_VFIO_IOMMU_DIRTY_PAGES_FLAG_START);

	if (r == 0)
		t->tracking = 1;
	return r;
}

int devmig_type1_dirty_stop(struct devmig_type1_dirty *t)
{
	int r = devmig_vfio_dirty_pages(t->container_fd, DEVMIG_VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP);

	if (r == 0)
		t->tracking = 0;
	return r;
}

int devmig_type1_dirty_read(struct devmig_type1_dirty *t, uint64_t iova, uint64_t length,
			    uint64_t page_size, uint64_t *bitmap, size_t nwords)
{
	int r = check_read(iova, length, page_size, nwords);

	if (r < 0)
		return r;
	if (!t->tracking)
		return -ENODATA;
	memset(bitmap, 0, nwords * sizeof(*bitmap));
	/* The kernel wants the bitmap's size in bytes, whole 64-bit words. */
	return devmig_vfio_dirty_get_bitmap(t->container_fd, iova, length, page_size, bitmap,
					    (length / page_size + 63) / 64 * 8);
}

int devmig_hwpt_dirty_read(struct devmig_hwpt_dirty *t, uint64_t iova, uint64_t length,
			   uint64_t page_size, uint64_t *bitmap, size_t nwords, int clear)
{
	int r = check_read(iova, length, page_size, nwords);

	if (r < 0)
		return r;
	if (!t->tracking)
		return -ENODATA;
	memset(bitmap, 0, nwords * sizeof(*bitmap));
	return devmig_iommu_hwpt_get_dirty_bitmap(t->iommufd, t->hwpt_id,
						  clear ? 0 : DEVMIG_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
						  iova, length, page_size, bitmap);
}
