/* devmig's own definitions of the parts of the Linux iommufd uAPI it uses
 * (include/uapi/linux/iommufd.h; /dev/iommu). Bookworm's headers (6.1)
 * lack most of it. Prefixed DEVMIG_ / devmig_ like vfio_uapi.h, and
 * checked against the 6.12 header by tests/test_native_uapi_612.py. */
#ifndef DEVMIG_IOMMUFD_UAPI_H
#define DEVMIG_IOMMUFD_UAPI_H

#include <stdint.h>
#include <sys/ioctl.h>

/* The kernel's __aligned_u64: 8-byte alignment on every ABI. */
typedef uint64_t devmig_iommufd_u64 __attribute__((aligned(8)));

/* iommufd ioctls are _IO(';', command): the structs carry their size. */
#define DEVMIG_IOMMUFD_TYPE ';'
#define DEVMIG_IOMMUFD_CMD_DESTROY 0x80
#define DEVMIG_IOMMUFD_CMD_IOAS_ALLOC 0x81
#define DEVMIG_IOMMU_DESTROY _IO(DEVMIG_IOMMUFD_TYPE, DEVMIG_IOMMUFD_CMD_DESTROY)
#define DEVMIG_IOMMU_IOAS_ALLOC _IO(DEVMIG_IOMMUFD_TYPE, DEVMIG_IOMMUFD_CMD_IOAS_ALLOC)

struct devmig_iommu_destroy {
	uint32_t size;
	uint32_t id;
};

struct devmig_iommu_ioas_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t out_ioas_id;
};

/* ---- mapping memory into an IOAS ---- */
#define DEVMIG_IOMMUFD_CMD_IOAS_MAP 0x85
#define DEVMIG_IOMMU_IOAS_MAP _IO(DEVMIG_IOMMUFD_TYPE, DEVMIG_IOMMUFD_CMD_IOAS_MAP)
#define DEVMIG_IOMMU_IOAS_MAP_FIXED_IOVA (1u << 0)
#define DEVMIG_IOMMU_IOAS_MAP_WRITEABLE (1u << 1)
#define DEVMIG_IOMMU_IOAS_MAP_READABLE (1u << 2)
struct devmig_iommu_ioas_map {
	uint32_t size;
	uint32_t flags;
	uint32_t ioas_id;
	uint32_t __reserved;
	devmig_iommufd_u64 user_va;
	devmig_iommufd_u64 length;
	devmig_iommufd_u64 iova; /* in with FIXED_IOVA, else out */
};

/* ---- hardware page tables with dirty tracking ---- */
#define DEVMIG_IOMMUFD_CMD_HWPT_ALLOC 0x89
#define DEVMIG_IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING 0x8b
#define DEVMIG_IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP 0x8c
#define DEVMIG_IOMMU_HWPT_ALLOC _IO(DEVMIG_IOMMUFD_TYPE, DEVMIG_IOMMUFD_CMD_HWPT_ALLOC)
#define DEVMIG_IOMMU_HWPT_SET_DIRTY_TRACKING \
	_IO(DEVMIG_IOMMUFD_TYPE, DEVMIG_IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)
#define DEVMIG_IOMMU_HWPT_GET_DIRTY_BITMAP \
	_IO(DEVMIG_IOMMUFD_TYPE, DEVMIG_IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)
#define DEVMIG_IOMMU_HWPT_ALLOC_DIRTY_TRACKING (1u << 1)
#define DEVMIG_IOMMU_HWPT_DIRTY_TRACKING_ENABLE 1u
#define DEVMIG_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR 1u
struct devmig_iommu_hwpt_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t dev_id; /* a device bound to this iommufd */
	uint32_t pt_id;  /* the IOAS the page table maps */
	uint32_t out_hwpt_id;
	uint32_t __reserved;
	uint32_t data_type; /* 0: a plain (not nested) page table */
	uint32_t data_len;
	devmig_iommufd_u64 data_uptr;
	uint32_t fault_id;
	uint32_t __reserved2;
};
struct devmig_iommu_hwpt_set_dirty_tracking {
	uint32_t size;
	uint32_t flags; /* DEVMIG_IOMMU_HWPT_DIRTY_TRACKING_ENABLE or 0 */
	uint32_t hwpt_id;
	uint32_t __reserved;
};
struct devmig_iommu_hwpt_get_dirty_bitmap {
	uint32_t size;
	uint32_t hwpt_id;
	uint32_t flags;
	uint32_t __reserved;
	devmig_iommufd_u64 iova;
	devmig_iommufd_u64 length;
	devmig_iommufd_u64 page_size;
	devmig_iommufd_u64 data; /* user pointer to the bitmap */
};

#endif
