/* devmig's uAPI header against the documented uAPI: ioctl numbers, feature
 * ids, struct sizes and offsets (reference: vfio-migration.md §1.2-1.8),
 * and, where the distribution's older <linux/vfio.h> has the same thing,
 * against it too (which also proves the two headers coexist). */
#include <linux/vfio.h>
#include <stddef.h>

#include "check.h"
#include "devmig/vfio_uapi.h"

int main(void)
{
	/* _IO(';', 100 + n) */
	CHECK(DEVMIG_VFIO_GROUP_GET_DEVICE_FD == 0x3B6A);
	CHECK(DEVMIG_VFIO_DEVICE_GET_INFO == 0x3B6B);
	CHECK(DEVMIG_VFIO_DEVICE_GET_REGION_INFO == 0x3B6C);
	CHECK(DEVMIG_VFIO_DEVICE_GET_IRQ_INFO == 0x3B6D);
	CHECK(DEVMIG_VFIO_DEVICE_SET_IRQS == 0x3B6E);
	CHECK(DEVMIG_VFIO_DEVICE_RESET == 0x3B6F);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE == 0x3B75);
	CHECK(DEVMIG_VFIO_MIG_GET_PRECOPY_INFO == 0x3B79);
	CHECK(DEVMIG_VFIO_GROUP_GET_DEVICE_FD == VFIO_GROUP_GET_DEVICE_FD);
	CHECK(DEVMIG_VFIO_DEVICE_GET_INFO == VFIO_DEVICE_GET_INFO);
	CHECK(DEVMIG_VFIO_DEVICE_GET_REGION_INFO == VFIO_DEVICE_GET_REGION_INFO);
	CHECK(DEVMIG_VFIO_DEVICE_GET_IRQ_INFO == VFIO_DEVICE_GET_IRQ_INFO);
	CHECK(DEVMIG_VFIO_DEVICE_SET_IRQS == VFIO_DEVICE_SET_IRQS);
	CHECK(DEVMIG_VFIO_DEVICE_RESET == VFIO_DEVICE_RESET);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE == VFIO_DEVICE_FEATURE);

	/* Feature framing and ids. */
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_MASK == 0xffff);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_GET == 0x10000);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_SET == 0x20000);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_PROBE == 0x40000);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_MIGRATION == 1);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE == 2);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_DMA_LOGGING_START == 6);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP == 7);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT == 8);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_MIG_DATA_SIZE == 9);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_MIGRATION == VFIO_DEVICE_FEATURE_MIGRATION);
	CHECK(DEVMIG_VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE == VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
	CHECK(DEVMIG_VFIO_MIGRATION_STOP_COPY == 1 && DEVMIG_VFIO_MIGRATION_P2P == 2 &&
	      DEVMIG_VFIO_MIGRATION_PRE_COPY == 4);

	/* Sizes (x86-64, as documented) and offsets. */
	CHECK(sizeof(struct devmig_vfio_device_feature) == 8);
	CHECK(offsetof(struct devmig_vfio_device_feature, data) == 8);
	CHECK(sizeof(struct devmig_vfio_device_feature_migration) == 8);
	CHECK(sizeof(struct devmig_vfio_device_feature_mig_state) == 8);
	CHECK(offsetof(struct devmig_vfio_device_feature_mig_state, data_fd) == 4);
	CHECK(sizeof(struct devmig_vfio_device_feature_mig_data_size) == 8);
	CHECK(sizeof(struct devmig_vfio_device_feature_dma_logging_control) == 24);
	CHECK(offsetof(struct devmig_vfio_device_feature_dma_logging_control, ranges) == 16);
	CHECK(sizeof(struct devmig_vfio_device_feature_dma_logging_range) == 16);
	CHECK(sizeof(struct devmig_vfio_device_feature_dma_logging_report) == 32);
	CHECK(offsetof(struct devmig_vfio_device_feature_dma_logging_report, bitmap) == 24);
	CHECK(sizeof(struct devmig_vfio_precopy_info) == 24);
	CHECK(offsetof(struct devmig_vfio_precopy_info, initial_bytes) == 8);
	CHECK(offsetof(struct devmig_vfio_precopy_info, dirty_bytes) == 16);
	CHECK(sizeof(struct devmig_vfio_region_info) == sizeof(struct vfio_region_info));
	CHECK(sizeof(struct devmig_vfio_region_info) == 32);
	CHECK(offsetof(struct devmig_vfio_region_info, cap_offset) == 12);
	CHECK(offsetof(struct devmig_vfio_region_info, size) == 16);
	CHECK(offsetof(struct devmig_vfio_region_info, offset) == 24);
	CHECK(sizeof(struct devmig_vfio_info_cap_header) == 8);
	CHECK(sizeof(struct devmig_vfio_region_info_cap_sparse_mmap) == 16);
	CHECK(sizeof(struct devmig_vfio_region_info_cap_sparse_mmap) ==
	      sizeof(struct vfio_region_info_cap_sparse_mmap));
	CHECK(sizeof(struct devmig_vfio_region_sparse_mmap_area) == 16);
	CHECK(sizeof(struct devmig_vfio_region_info_cap_type) == 16);
	CHECK(DEVMIG_VFIO_REGION_INFO_CAP_SPARSE_MMAP == VFIO_REGION_INFO_CAP_SPARSE_MMAP);
	CHECK(DEVMIG_VFIO_REGION_INFO_CAP_TYPE == VFIO_REGION_INFO_CAP_TYPE);
	CHECK(DEVMIG_VFIO_REGION_INFO_FLAG_CAPS == VFIO_REGION_INFO_FLAG_CAPS);
	/* Linux 6.1 ends the struct at cap_offset (20 bytes); later kernels
	 * add a pad word. argsz tells the kernel which one it got. */
	CHECK(offsetof(struct devmig_vfio_device_info, cap_offset) ==
	      offsetof(struct vfio_device_info, cap_offset));
	CHECK(sizeof(struct devmig_vfio_device_info) == 24);
	CHECK(sizeof(struct devmig_vfio_irq_info) == 16);
	CHECK(sizeof(struct devmig_vfio_irq_set) == 20);
	CHECK(offsetof(struct devmig_vfio_irq_set, data) == 20);
	CHECK(DEVMIG_VFIO_IRQ_SET_DATA_EVENTFD == VFIO_IRQ_SET_DATA_EVENTFD);
	CHECK(DEVMIG_VFIO_IRQ_SET_ACTION_TRIGGER == VFIO_IRQ_SET_ACTION_TRIGGER);
	CHECK(DEVMIG_VFIO_PCI_MSIX_IRQ_INDEX == VFIO_PCI_MSIX_IRQ_INDEX);
	CHECK(DEVMIG_VFIO_PCI_REQ_IRQ_INDEX == VFIO_PCI_REQ_IRQ_INDEX);
	CHECK(DEVMIG_VFIO_PCI_CONFIG_REGION_INDEX == VFIO_PCI_CONFIG_REGION_INDEX);
	CHECK(_Alignof(devmig_aligned_u64) == 8);
	CHECK_DONE();
}
