/* The simulated device's BAR, DMA engine and trap-based dirty logging
 * (sim_bar.c); internal to the simulated device. The BAR is used from
 * other threads (a VMM's vCPUs) while the device changes state, so it has
 * its own lock and its own copy of the state. */
#ifndef DEVMIG_SIM_BAR_H
#define DEVMIG_SIM_BAR_H

#include <pthread.h>
#include <stdint.h>

#include "devmig/sim.h"
#include "devmig/vfio.h"

/* Ranges one DMA logging start may give: what the kernel core guarantees
 * (a 4 KiB page of 16-byte ranges). */
#define SIM_LOG_MAX_RANGES 256

struct sim_bar {
	pthread_mutex_t mu;
	uint32_t state;
	uint8_t regs[DEVMIG_SIM_BAR_SIZE];
	uint8_t *guest;         /* guest memory the DMA engine writes */
	uint64_t guest_pages;
	uint8_t *dma_written;   /* per guest page: written by DMA since the last take */
	uint8_t *trap_logged;   /* per guest page: logged by the device since the last take */
	uint64_t missed_traps, dma_ops, dma_pages, dma_deferred;
	int reeval_efd;         /* signalled when the sparse-mmap areas change, or -1 */
	int reeval_err;         /* why there is none: eventfd()'s -errno */
	/* Device DMA logging: on, its ranges, and the pages logged. */
	int log_on;
	uint32_t log_n;
	struct devmig_vfio_device_feature_dma_logging_range log_ranges[SIM_LOG_MAX_RANGES];
	uint8_t *dma_logged;
};

int sim_bar_init(struct sim_bar *b, uint64_t guest_size, uint32_t state);
void sim_bar_destroy(struct sim_bar *b);
/* The device entered `state`: recompute which pages need trapping and
 * signal the re-evaluate eventfd when that changed. */
void sim_bar_set_state(struct sim_bar *b, uint32_t state);
/* Device DMA logging with the uAPI's semantics (see dirty.h). */
int sim_bar_log_start(struct sim_bar *b, const struct devmig_vfio_device_feature_dma_logging_range *r,
		      uint32_t n, uint64_t *page_size);
int sim_bar_log_stop(struct sim_bar *b);
int sim_bar_log_report(struct sim_bar *b, uint64_t iova, uint64_t length, uint64_t page_size,
		       uint64_t *bitmap);
/* A reset: logging ends, registers clear. */
void sim_bar_reset(struct sim_bar *b);
/* A register access; see devmig_sim_bar_access. */
int sim_bar_access(struct sim_bar *b, int mapped, int write, uint64_t off, uint64_t *val);
/* The mmap-able areas now (at most 2); returns how many. */
uint32_t sim_bar_sparse(struct sim_bar *b, struct devmig_vfio_region_sparse_mmap_area *areas);

#endif
