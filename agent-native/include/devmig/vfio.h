/* Thin wrappers over the VFIO ioctls (src/ioctl.c). Each returns 0 (or a
 * positive value where stated) on success and -errno on failure; none keeps
 * state. Higher layers use struct devmig_dev instead of calling these on a
 * device fd themselves. */
#ifndef DEVMIG_VFIO_H
#define DEVMIG_VFIO_H

#include <stddef.h>
#include <stdint.h>

#include "devmig/iommufd_uapi.h"
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

/* Containers and groups (type1). */
int devmig_vfio_get_api_version(int container_fd);
/* 1 when the container supports extension `ext` (an IOMMU type), 0 not. */
int devmig_vfio_check_extension(int container_fd, uint32_t ext);
int devmig_vfio_set_iommu(int container_fd, uint32_t type);
int devmig_vfio_group_get_status(int group_fd, uint32_t *flags);
int devmig_vfio_group_set_container(int group_fd, int container_fd);
/* Device cdevs and iommufd. *pt_id: the IOAS (or HWPT) to attach in, the
 * HWPT the kernel attached out. */
int devmig_vfio_device_bind_iommufd(int device_fd, int iommufd, uint32_t *devid);
int devmig_vfio_device_attach_pt(int device_fd, uint32_t *pt_id);
int devmig_iommu_ioas_alloc(int iommufd, uint32_t *ioas_id);
int devmig_iommu_destroy(int iommufd, uint32_t id);
/* Map length bytes at va into the IOAS; *iova in with
 * DEVMIG_IOMMU_IOAS_MAP_FIXED_IOVA in flags, else chosen by the kernel. */
int devmig_iommu_ioas_map(int iommufd, uint32_t ioas_id, void *va, uint64_t length, uint64_t *iova,
			  uint32_t flags);
int devmig_iommu_hwpt_alloc(int iommufd, uint32_t flags, uint32_t dev_id, uint32_t pt_id,
			    uint32_t *hwpt_id);
int devmig_iommu_hwpt_set_dirty_tracking(int iommufd, uint32_t hwpt_id, int enable);
/* Raw: the kernel only sets bits (zero the bitmap first) and answers 0
 * with nothing set when tracking is off; use devmig_hwpt_dirty_read. */
int devmig_iommu_hwpt_get_dirty_bitmap(int iommufd, uint32_t hwpt_id, uint32_t flags, uint64_t iova,
				       uint64_t length, uint64_t page_size, void *bitmap);

/* Type1 containers: DMA mappings and dirty-page tracking. Raw: see
 * devmig_type1_dirty_* (dirty.h) for the tracker. */
int devmig_vfio_dma_map(int container_fd, void *va, uint64_t iova, uint64_t size, uint32_t flags);
int devmig_vfio_dma_unmap(int container_fd, uint64_t iova, uint64_t size);
/* DEVMIG_VFIO_IOMMU_DIRTY_PAGES_FLAG_START or _STOP. */
int devmig_vfio_dirty_pages(int container_fd, uint32_t flags);
int devmig_vfio_dirty_get_bitmap(int container_fd, uint64_t iova, uint64_t size, uint64_t pgsize,
				 void *bitmap, uint64_t bitmap_bytes);

/* Region info of an opened device, real (VFIO_DEVICE_GET_REGION_INFO) or
 * simulated, read now: the sparse-mmap areas may differ from one state to
 * the next. Free with devmig_region_info_free. */
struct devmig_dev;
int devmig_dev_region_info(struct devmig_dev *d, uint32_t index, struct devmig_region_info *ri);

/* Device DMA logging. start: *page_size in as a hint, out as chosen. The
 * report only sets bits: zero the bitmap first (devmig_dma_log_report). */
int devmig_vfio_dma_logging_start(int fd, const struct devmig_vfio_device_feature_dma_logging_range *ranges,
				  uint32_t n, uint64_t *page_size);
int devmig_vfio_dma_logging_stop(int fd);
int devmig_vfio_dma_logging_report(int fd, uint64_t iova, uint64_t length, uint64_t page_size, void *bitmap);

/* ---- opening a device (open.c) ----
 * What an opened device holds on to: its fd and whatever keeps its IOMMU
 * context alive (a container and group, or an iommufd and IOAS). Every
 * fd is -1 when not used. */
struct devmig_vfio_handle {
	int device_fd;
	int container_fd, group_fd; /* group + type1 */
	int iommufd;                /* cdev + iommufd */
	uint32_t ioas_id, devid, hwpt_id;
};
/* Through the group (e.g. "/dev/vfio/12") and a new type1v2 container; the
 * device by its name in the group (PCI address or mdev UUID). On failure
 * everything opened is closed; -errno, with *why (may be NULL, 160 bytes)
 * naming the step that failed. */
int devmig_vfio_open_group(const char *group_path, const char *name, struct devmig_vfio_handle *h,
			   char *why, size_t why_len);
/* Through the device cdev (e.g. "/dev/vfio/devices/vfio0") bound to a new
 * iommufd (iommufd_path, normally "/dev/iommu") and attached to a new IOAS. */
int devmig_vfio_open_cdev(const char *cdev_path, const char *iommufd_path,
			  struct devmig_vfio_handle *h, char *why, size_t why_len);
/* Close what the handle holds, device first; idempotent. */
void devmig_vfio_handle_close(struct devmig_vfio_handle *h);

#ifdef __cplusplus
}
#endif
#endif
