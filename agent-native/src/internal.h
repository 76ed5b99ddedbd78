/* Shared between libdevmig's sources; not installed. */
#ifndef DEVMIG_INTERNAL_H
#define DEVMIG_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "devmig/devmig.h"
#include "devmig/vfio.h"

/* What a device backend provides. Each op is one device operation with the
 * kernel's semantics and returns 0/positive or -errno; the state machine
 * logic, logging and recovery live above, in fsm.c and data.c. Regions
 * (info with sparse mmap, read/write, mmap), IRQs and DMA dirty logging
 * join as further ops beside these, implemented by both backends. */
struct devmig_dev_ops {
	const char *kind; /* "vfio", "sim" */
	int (*mig_flags)(struct devmig_dev *d, uint64_t *flags);
	int (*get_state)(struct devmig_dev *d, uint32_t *state);
	/* One request for the final state; the device walks the path itself
	 * as the kernel does. *data_fd: new fd or -1. */
	int (*set_state)(struct devmig_dev *d, uint32_t state, int *data_fd);
	int (*reset)(struct devmig_dev *d);
	int (*precopy_info)(struct devmig_dev *d, int data_fd, uint64_t *initial, uint64_t *dirty);
	int (*data_size)(struct devmig_dev *d, uint64_t *bytes);
	ssize_t (*data_read)(struct devmig_dev *d, int data_fd, void *buf, size_t len);
	ssize_t (*data_write)(struct devmig_dev *d, int data_fd, const void *buf, size_t len);
	void (*destroy)(struct devmig_dev *d);
	/* Region info with its capabilities as the device states them now. */
	int (*region_info)(struct devmig_dev *d, uint32_t index, struct devmig_region_info *ri);
	/* Device DMA logging, with the kernel's semantics (report only sets
	 * bits and clears what it reported). */
	int (*dma_log_start)(struct devmig_dev *d, const struct devmig_vfio_device_feature_dma_logging_range *r,
			     uint32_t n, uint64_t *page_size);
	int (*dma_log_stop)(struct devmig_dev *d);
	int (*dma_log_report)(struct devmig_dev *d, uint64_t iova, uint64_t length, uint64_t page_size,
			      uint64_t *bitmap);
};

struct devmig_dev {
	const struct devmig_dev_ops *ops;
	void *priv;  /* backend state (the simulated device) */
	int fd;      /* VFIO device fd, or -1 */
	uint64_t flags;
	uint32_t state; /* last state the device confirmed */
	int data_fd;    /* open data session, or -1 */
	bool poisoned;
	bool dma_logging; /* the device accepted a DMA logging start */
	struct devmig_dev_desc desc;
	devmig_log_fn log;
	void *log_ctx;
};

/* Allocate a device around a backend and read its flags and state. */
int devmig_dev_init(const struct devmig_dev_ops *ops, void *priv, int fd,
		    const struct devmig_dev_desc *desc, struct devmig_dev **out);
void devmig_logf(struct devmig_dev *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Close the data session fd, if any. */
void devmig_dev_end_session(struct devmig_dev *d);
struct iovec;
/* All of iov (cnt entries, modified as it goes) to fd: sendmsg without
 * SIGPIPE on a socket, writev otherwise; 0 or -errno (stream.c). */
int devmig_fd_writev_all(int fd, struct iovec *iov, int cnt);
/* The calling thread to SCHED_BATCH for bulk data work (sched.c): returns
 * what devmig_sched_bulk_end needs to put it back (-1: left unchanged). */
int devmig_sched_bulk_begin(void);
void devmig_sched_bulk_end(int saved);
#if defined(__x86_64__)
/* The CPU has VPCLMULQDQ and AVX-512F/BW, and the OS saves their state
 * (ghash.c; crc32c.c uses it too). */
bool devmig_cpu_has_vpclmul512(void);
/* The CRC32C fold's multipliers, reflected (crc32c.c). */
void devmig_crc32c_fold_consts(uint64_t *lo, uint64_t *hi);
#endif
struct devmig_ghash;
/* g runs the 512-bit GHASH (ghash.c). */
bool devmig_ghash_is_512(const struct devmig_ghash *g);

#endif
