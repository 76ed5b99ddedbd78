/* devmig's own definitions of the parts of the Linux VFIO uAPI it uses.
 *
 * Written from the documented uAPI (include/uapi/linux/vfio.h of a recent
 * kernel). devmig carries its own copy because the distribution header
 * (Debian bookworm: Linux 6.1) predates PRE_COPY, MIG_DATA_SIZE and the
 * __aligned_u64 fields. Every name is prefixed DEVMIG_ / devmig_ so this
 * header can be included beside <linux/vfio.h> without a clash.
 *
 * Layouts are the kernel's exactly: the structs are passed to ioctl() as is.
 * tests/c/test_vfio_uapi.c pins every size, offset and ioctl number, and
 * tests/test_native_uapi_612.py checks every definition here against the
 * Linux 6.12 header (Debian's linux-source-6.12).
 */
#ifndef DEVMIG_VFIO_UAPI_H
#define DEVMIG_VFIO_UAPI_H

#include <stdint.h>
#include <sys/ioctl.h>

/* The kernel's __aligned_u64: 8-byte alignment even on 32-bit ABIs, so the
 * layout is the same for every userspace. */
typedef uint64_t devmig_aligned_u64 __attribute__((aligned(8)));

/* Every VFIO ioctl is _IO(';', 100 + n): no size or direction is encoded,
 * the structs carry their own argsz instead. */
#define DEVMIG_VFIO_TYPE ';'
#define DEVMIG_VFIO_BASE 100
#define DEVMIG_VFIO_IO(n) _IO(DEVMIG_VFIO_TYPE, DEVMIG_VFIO_BASE + (n))

#define DEVMIG_VFIO_GET_API_VERSION DEVMIG_VFIO_IO(0)        /* container fd */
#define DEVMIG_VFIO_CHECK_EXTENSION DEVMIG_VFIO_IO(1)        /* container fd */
#define DEVMIG_VFIO_GROUP_GET_DEVICE_FD DEVMIG_VFIO_IO(6)    /* group fd */
#define DEVMIG_VFIO_DEVICE_GET_INFO DEVMIG_VFIO_IO(7)        /* device fd */
#define DEVMIG_VFIO_DEVICE_GET_REGION_INFO DEVMIG_VFIO_IO(8) /* device fd */
#define DEVMIG_VFIO_DEVICE_GET_IRQ_INFO DEVMIG_VFIO_IO(9)    /* device fd */
#define DEVMIG_VFIO_DEVICE_SET_IRQS DEVMIG_VFIO_IO(10)       /* device fd */
#define DEVMIG_VFIO_DEVICE_RESET DEVMIG_VFIO_IO(11)          /* device fd */
#define DEVMIG_VFIO_DEVICE_FEATURE DEVMIG_VFIO_IO(17)        /* device fd */
/* Issued on the migration data fd, not the device fd; shares its number
 * with VFIO_EEH_PE_OP, which is a container ioctl. */
#define DEVMIG_VFIO_MIG_GET_PRECOPY_INFO DEVMIG_VFIO_IO(21)

/* ---- VFIO_DEVICE_GET_INFO ---- */
struct devmig_vfio_device_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t num_regions;
	uint32_t num_irqs;
	uint32_t cap_offset; /* offset of the first capability, if FLAGS_CAPS */
	uint32_t pad;
};
#define DEVMIG_VFIO_DEVICE_FLAGS_RESET (1u << 0)
#define DEVMIG_VFIO_DEVICE_FLAGS_PCI (1u << 1)
#define DEVMIG_VFIO_DEVICE_FLAGS_CAPS (1u << 7)

/* ---- VFIO_DEVICE_GET_REGION_INFO ---- */
struct devmig_vfio_region_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t cap_offset; /* from the start of this struct; 0 = no caps */
	devmig_aligned_u64 size;
	devmig_aligned_u64 offset; /* of the region within the device fd */
};
#define DEVMIG_VFIO_REGION_INFO_FLAG_READ (1u << 0)
#define DEVMIG_VFIO_REGION_INFO_FLAG_WRITE (1u << 1)
#define DEVMIG_VFIO_REGION_INFO_FLAG_MMAP (1u << 2)
#define DEVMIG_VFIO_REGION_INFO_FLAG_CAPS (1u << 3)

/* vfio-pci region indexes. */
#define DEVMIG_VFIO_PCI_BAR0_REGION_INDEX 0
#define DEVMIG_VFIO_PCI_BAR5_REGION_INDEX 5
#define DEVMIG_VFIO_PCI_ROM_REGION_INDEX 6
#define DEVMIG_VFIO_PCI_CONFIG_REGION_INDEX 7
#define DEVMIG_VFIO_PCI_VGA_REGION_INDEX 8

/* Capability chain header, shared by device, region and IOMMU info. `next`
 * is the offset of the next header from the start of the info struct;
 * 0 ends the chain. */
struct devmig_vfio_info_cap_header {
	uint16_t id;
	uint16_t version;
	uint32_t next;
};

#define DEVMIG_VFIO_REGION_INFO_CAP_SPARSE_MMAP 1
#define DEVMIG_VFIO_REGION_INFO_CAP_TYPE 2
#define DEVMIG_VFIO_REGION_INFO_CAP_MSIX_MAPPABLE 3

/* Areas of a region that may be mmapped; the rest must go through pread/
 * pwrite on the device fd (trapped). */
struct devmig_vfio_region_sparse_mmap_area {
	devmig_aligned_u64 offset; /* from the start of the region */
	devmig_aligned_u64 size;
};
struct devmig_vfio_region_info_cap_sparse_mmap {
	struct devmig_vfio_info_cap_header header;
	uint32_t nr_areas;
	uint32_t reserved;
	struct devmig_vfio_region_sparse_mmap_area areas[];
};

struct devmig_vfio_region_info_cap_type {
	struct devmig_vfio_info_cap_header header;
	uint32_t type;
	uint32_t subtype;
};

/* ---- VFIO_DEVICE_GET_IRQ_INFO / SET_IRQS ---- */
struct devmig_vfio_irq_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t count; /* number of vectors at this index */
};
#define DEVMIG_VFIO_IRQ_INFO_EVENTFD (1u << 0)
#define DEVMIG_VFIO_IRQ_INFO_MASKABLE (1u << 1)
#define DEVMIG_VFIO_IRQ_INFO_AUTOMASKED (1u << 2)
#define DEVMIG_VFIO_IRQ_INFO_NORESIZE (1u << 3)

struct devmig_vfio_irq_set {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t start;
	uint32_t count;
	uint8_t data[]; /* count bools or count int32 eventfds, per flags */
};
#define DEVMIG_VFIO_IRQ_SET_DATA_NONE (1u << 0)
#define DEVMIG_VFIO_IRQ_SET_DATA_BOOL (1u << 1)
#define DEVMIG_VFIO_IRQ_SET_DATA_EVENTFD (1u << 2)
#define DEVMIG_VFIO_IRQ_SET_ACTION_MASK (1u << 3)
#define DEVMIG_VFIO_IRQ_SET_ACTION_UNMASK (1u << 4)
#define DEVMIG_VFIO_IRQ_SET_ACTION_TRIGGER (1u << 5)

/* vfio-pci IRQ indexes. */
#define DEVMIG_VFIO_PCI_INTX_IRQ_INDEX 0
#define DEVMIG_VFIO_PCI_MSI_IRQ_INDEX 1
#define DEVMIG_VFIO_PCI_MSIX_IRQ_INDEX 2
#define DEVMIG_VFIO_PCI_ERR_IRQ_INDEX 3
#define DEVMIG_VFIO_PCI_REQ_IRQ_INDEX 4

/* ---- VFIO_DEVICE_FEATURE framing ---- */
struct devmig_vfio_device_feature {
	uint32_t argsz;
	uint32_t flags; /* feature id in the low 16 bits, GET/SET/PROBE above */
	uint8_t data[];
};
#define DEVMIG_VFIO_DEVICE_FEATURE_MASK 0xffffu
#define DEVMIG_VFIO_DEVICE_FEATURE_GET (1u << 16)
#define DEVMIG_VFIO_DEVICE_FEATURE_SET (1u << 17)
#define DEVMIG_VFIO_DEVICE_FEATURE_PROBE (1u << 18)

/* Feature ids. */
#define DEVMIG_VFIO_DEVICE_FEATURE_MIGRATION 1
#define DEVMIG_VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE 2
#define DEVMIG_VFIO_DEVICE_FEATURE_DMA_LOGGING_START 6
#define DEVMIG_VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP 7
#define DEVMIG_VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT 8
#define DEVMIG_VFIO_DEVICE_FEATURE_MIG_DATA_SIZE 9

/* MIGRATION (GET only): which optional parts of the FSM the device has. */
struct devmig_vfio_device_feature_migration {
	devmig_aligned_u64 flags;
};
#define DEVMIG_VFIO_MIGRATION_STOP_COPY (1u << 0) /* mandatory */
#define DEVMIG_VFIO_MIGRATION_P2P (1u << 1)
#define DEVMIG_VFIO_MIGRATION_PRE_COPY (1u << 2)

/* MIG_DEVICE_STATE (GET/SET). SET writes data_fd back: a new fd for arcs
 * that open a data session, -1 otherwise; GET returns -1. */
struct devmig_vfio_device_feature_mig_state {
	uint32_t device_state; /* enum devmig_mig_state */
	int32_t data_fd;
};

/* MIG_DATA_SIZE (GET): estimate of the bytes STOP_COPY still has to send. */
struct devmig_vfio_device_feature_mig_data_size {
	devmig_aligned_u64 stop_copy_length;
};

/* DMA logging (ids 6, 7, 8). */
struct devmig_vfio_device_feature_dma_logging_range {
	devmig_aligned_u64 iova;
	devmig_aligned_u64 length;
};
struct devmig_vfio_device_feature_dma_logging_control {
	devmig_aligned_u64 page_size; /* hint in, granularity used out */
	uint32_t num_ranges;
	uint32_t reserved;
	devmig_aligned_u64 ranges; /* user pointer to the range array */
};
struct devmig_vfio_device_feature_dma_logging_report {
	devmig_aligned_u64 iova;
	devmig_aligned_u64 length;
	devmig_aligned_u64 page_size;
	devmig_aligned_u64 bitmap; /* user pointer to a zeroed u64 array */
};

/* ---- VFIO_MIG_GET_PRECOPY_INFO (on the data fd) ---- */
struct devmig_vfio_precopy_info {
	uint32_t argsz;
	uint32_t flags;
	devmig_aligned_u64 initial_bytes; /* unread initial data; counts down */
	devmig_aligned_u64 dirty_bytes;   /* re-dirtied data estimate; may never reach 0 */
};

/* ---- containers, groups (type1) and device cdevs (iommufd) ---- */
#define DEVMIG_VFIO_API_VERSION 0
#define DEVMIG_VFIO_TYPE1v2_IOMMU 3 /* the container IOMMU model devmig uses */
#define DEVMIG_VFIO_SET_IOMMU DEVMIG_VFIO_IO(2)           /* container fd */
#define DEVMIG_VFIO_GROUP_GET_STATUS DEVMIG_VFIO_IO(3)    /* group fd */
#define DEVMIG_VFIO_GROUP_SET_CONTAINER DEVMIG_VFIO_IO(4) /* group fd */
struct devmig_vfio_group_status {
	uint32_t argsz;
	uint32_t flags;
};
#define DEVMIG_VFIO_GROUP_FLAGS_VIABLE (1u << 0) /* every device of the group is bound to VFIO */
#define DEVMIG_VFIO_GROUP_FLAGS_CONTAINER_SET (1u << 1)

/* A device cdev (/dev/vfio/devices/vfioN) is bound to an iommufd, then
 * attached to an IO address space (or hardware page table) in it. */
#define DEVMIG_VFIO_DEVICE_BIND_IOMMUFD DEVMIG_VFIO_IO(18)      /* device cdev fd */
#define DEVMIG_VFIO_DEVICE_ATTACH_IOMMUFD_PT DEVMIG_VFIO_IO(19) /* device cdev fd */
#define DEVMIG_VFIO_DEVICE_DETACH_IOMMUFD_PT DEVMIG_VFIO_IO(20) /* device cdev fd */
struct devmig_vfio_device_bind_iommufd {
	uint32_t argsz;
	uint32_t flags;
	int32_t iommufd;
	uint32_t out_devid; /* the device's id inside that iommufd */
};
struct devmig_vfio_device_attach_iommufd_pt {
	uint32_t argsz;
	uint32_t flags;
	uint32_t pt_id; /* an IOAS or HWPT id; out: the HWPT actually attached */
};

/* ---- type1 containers: DMA mappings and dirty-page tracking ---- */
#define DEVMIG_VFIO_IOMMU_MAP_DMA DEVMIG_VFIO_IO(13)     /* container fd */
#define DEVMIG_VFIO_IOMMU_UNMAP_DMA DEVMIG_VFIO_IO(14)   /* container fd */
#define DEVMIG_VFIO_IOMMU_DIRTY_PAGES DEVMIG_VFIO_IO(17) /* container fd */
#define DEVMIG_VFIO_DMA_MAP_FLAG_READ (1u << 0)  /* the device may read it */
#define DEVMIG_VFIO_DMA_MAP_FLAG_WRITE (1u << 1) /* the device may write it */
struct devmig_vfio_iommu_type1_dma_map {
	uint32_t argsz;
	uint32_t flags;
	uint64_t vaddr; /* process address */
	uint64_t iova;
	uint64_t size; /* bytes */
};
struct devmig_vfio_iommu_type1_dma_unmap {
	uint32_t argsz;
	uint32_t flags;
	uint64_t iova;
	uint64_t size;
	uint8_t data[];
};
#define DEVMIG_VFIO_IOMMU_DIRTY_PAGES_FLAG_START (1u << 0)
#define DEVMIG_VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP (1u << 1)
#define DEVMIG_VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP (1u << 2)
struct devmig_vfio_bitmap {
	uint64_t pgsize; /* bytes per bit */
	uint64_t size;   /* bytes of bitmap */
	uint64_t data;   /* user pointer to the bitmap */
};
struct devmig_vfio_iommu_type1_dirty_bitmap {
	uint32_t argsz;
	uint32_t flags;
	uint8_t data[]; /* GET_BITMAP: a struct devmig_vfio_iommu_type1_dirty_bitmap_get */
};
struct devmig_vfio_iommu_type1_dirty_bitmap_get {
	uint64_t iova;
	uint64_t size; /* of the IOVA range */
	struct devmig_vfio_bitmap bitmap;
};

#endif
