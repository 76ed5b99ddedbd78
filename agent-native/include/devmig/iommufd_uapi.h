/* devmig's own definitions of the parts of the Linux iommufd uAPI it uses
 * (include/uapi/linux/iommufd.h; /dev/iommu). Bookworm's headers (6.1)
 * lack most of it. Prefixed DEVMIG_ / devmig_ like vfio_uapi.h, and
 * checked against the 6.12 header by tests/test_native_uapi_612.py. */
#ifndef DEVMIG_IOMMUFD_UAPI_H
#define DEVMIG_IOMMUFD_UAPI_H

#include <stdint.h>
#include <sys/ioctl.h>

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

#endif
