/* Thin wrappers over the VFIO ioctls (src/ioctl.c). Each returns 0 (or a
 * positive value where stated) on success and -errno on failure; none keeps
 * state. Higher layers use struct devmig_dev instead of calling these on a
 * device fd themselves. */
#ifndef DEVMIG_VFIO_H
#define DEVMIG_VFIO_H

#include <stddef.h>
#include <stdint.h>

#include "devmig/vfio_uapi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Region info with its capability chain read into owned memory. */
struct devmig_region_info {
	uint32_t index;
	uint32_t flags; /* DEVMIG_VFIO_REGION_INFO_FLAG_* */
	uint64_t size;
	uint64_t offset; /* of the region within the device fd */
	int has_sparse;  /* a SPARSE_MMAP capability was present */
	uint32_t nr_sparse;
	struct devmig_vfio_region_sparse_mmap_area *sparse; /* malloc'd, nr_sparse entries */
	int has_type;
	uint32_t type, subtype;
};
void devmig_region_info_free(struct devmig_region_info *ri);
/* Parse what VFIO_DEVICE_GET_REGION_INFO returned (`buf`, `len` bytes) into
 * `out`, walking the capability chain. -EPROTO on a malformed chain. */
int devmig_region_info_parse(const void *buf, size_t len, struct devmig_region_info *out);

int devmig_vfio_group_get_device_fd(int group_fd, const char *name);
int devmig_vfio_device_get_info(int fd, struct devmig_vfio_device_info *info);
/* Two calls: the first learns argsz (caps make the answer bigger than the
 * struct), the second reads it all. Free with devmig_region_info_free. */
int devmig_vfio_get_region_info(int fd, uint32_t index, struct devmig_region_info *out);
int devmig_vfio_get_irq_info(int fd, uint32_t index, struct devmig_vfio_irq_info *info);
/* Attach (fd >= 0) or detach (fd == -1) eventfds to count vectors from
 * start with ACTION_TRIGGER; count == 0 disables the whole index. */
int devmig_vfio_set_irqs_eventfd(int fd, uint32_t index, uint32_t start, uint32_t count,
				 const int32_t *eventfds);
int devmig_vfio_reset(int fd);
/* 0 when the device implements `feature` for the given GET/SET flags. */
int devmig_vfio_feature_probe(int fd, uint32_t feature, uint32_t get_set);
int devmig_vfio_mig_flags(int fd, uint64_t *flags);
int devmig_vfio_mig_get_state(int fd, uint32_t *state);
/* *data_fd receives the new data fd, or -1. */
int devmig_vfio_mig_set_state(int fd, uint32_t state, int *data_fd);
int devmig_vfio_mig_data_size(int fd, uint64_t *bytes);
/* Issued on the data fd. */
int devmig_vfio_precopy_info(int data_fd, uint64_t *initial_bytes, uint64_t *dirty_bytes);

#ifdef __cplusplus
}
#endif
#endif
