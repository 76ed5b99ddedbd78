/* Dirty-page tracking at the IOMMU: an iommufd hardware page table (HWPT)
 * allocated with dirty tracking, switched on and off, and read as a
 * bitmap (bit i = page i of the range, include/devmig/bitmap.h).
 *
 * Two kernel facts (seen on 6.12) shape the reader: GET_DIRTY_BITMAP only
 * sets bits, so the bitmap is zeroed before every read; and it answers
 * success with nothing set when tracking is off (6.12.117; 6.12.118 refuses
 * with EINVAL instead), so the tracker keeps its own record of whether
 * tracking is on (changed only after the kernel accepted the change) and
 * refuses to read while it is off rather than report "clean". A range that
 * was never mapped also reads clean (6.12.117) or EINVAL (6.12.118): track
 * what you mapped. */
#ifndef DEVMIG_DIRTY_H
#define DEVMIG_DIRTY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct devmig_hwpt_dirty {
	int iommufd;      /* not owned */
	uint32_t hwpt_id; /* the dirty-tracking HWPT */
	int tracking;     /* 1 once the kernel accepted "enable" */
};

/* Allocate a dirty-tracking HWPT over IOAS ioas_id for device dev_id (a
 * device bound to iommufd, whose IOMMU must support dirty tracking:
 * -EOPNOTSUPP otherwise). Tracking starts off. */
int devmig_hwpt_dirty_alloc(int iommufd, uint32_t dev_id, uint32_t ioas_id,
			    struct devmig_hwpt_dirty *t);
int devmig_hwpt_dirty_start(struct devmig_hwpt_dirty *t);
int devmig_hwpt_dirty_stop(struct devmig_hwpt_dirty *t);
/* The dirty pages of [iova, iova + length) at page_size (a power of two;
 * iova and length multiples of it) into bitmap (nwords 64-bit words, at
 * least length / page_size bits), zeroed first. clear: also clear what was
 * read (the next read reports only newer writes); else leave it (NO_CLEAR).
 * -ENODATA while tracking is off (the kernel would say "clean"), -EINVAL
 * for a misaligned range, -ENOSPC for a short bitmap. */
int devmig_hwpt_dirty_read(struct devmig_hwpt_dirty *t, uint64_t iova, uint64_t length,
			   uint64_t page_size, uint64_t *bitmap, size_t nwords, int clear);

/* The same at a type1 container (VFIO_IOMMU_DIRTY_PAGES): tracking covers
 * every mapping of the container; a read must cover whole mappings. Where
 * every device of the container declared its pinned-page scope (mdevs do),
 * only pages a device pinned are reported. */
struct devmig_type1_dirty {
	int container_fd; /* not owned */
	int tracking;
};
int devmig_type1_dirty_start(struct devmig_type1_dirty *t);
int devmig_type1_dirty_stop(struct devmig_type1_dirty *t);
/* As devmig_hwpt_dirty_read; type1 always clears what it reports. */
int devmig_type1_dirty_read(struct devmig_type1_dirty *t, uint64_t iova, uint64_t length,
			    uint64_t page_size, uint64_t *bitmap, size_t nwords);

/* Device DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*), on a real VFIO
 * device or the simulated one: the device itself records the pages its
 * DMA writes inside the given IOVA ranges. start: *page_size in as a hint
 * (a power of two), out as the device chose; one start at a time (a second
 * is -EBUSY on the simulated device). -ENOTTY when the device has no DMA
 * logging. A reset ends logging. */
struct devmig_dev;
struct devmig_vfio_device_feature_dma_logging_range;
int devmig_dma_log_start(struct devmig_dev *d, const struct devmig_vfio_device_feature_dma_logging_range *r,
			 uint32_t n, uint64_t *page_size);
int devmig_dma_log_stop(struct devmig_dev *d);
/* The logged pages of [iova, iova + length) at page_size (>= 4 KiB, a power
 * of two, iova and length multiples of it), read and cleared, into bitmap
 * (zeroed first: the device only sets bits). -ENODATA while logging is off
 * (no log to read), -EINVAL / -ENOSPC for a bad request. Any other error
 * means the log is lost: treat all memory as dirty. */
int devmig_dma_log_report(struct devmig_dev *d, uint64_t iova, uint64_t length, uint64_t page_size,
			  uint64_t *bitmap, size_t nwords);

#ifdef __cplusplus
}
#endif
#endif
