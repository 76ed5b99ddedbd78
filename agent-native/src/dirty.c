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

int devmig_hwpt_dirty_read(struct devmig_hwpt_dirty *t, uint64_t iova, uint64_t length,
			   uint64_t page_size, uint64_t *bitmap, size_t nwords, int clear)
{
	uint64_t pages;

	if (!page_size || (page_size & (page_size - 1)) || iova % page_size || length % page_size ||
	    !length)
		return -EINVAL;
	pages = length / page_size;
	if ((uint64_t)nwords < (pages + 63) / 64)
		return -ENOSPC;
	if (!t->tracking)
		return -ENODATA;
	memset(bitmap, 0, nwords * sizeof(*bitmap));
	return devmig_iommu_hwpt_get_dirty_bitmap(t->iommufd, t->hwpt_id,
						  clear ? 0 : DEVMIG_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
						  iova, length, page_size, bitmap);
}
