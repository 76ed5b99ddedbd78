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
};

int sim_bar_init(struct sim_bar *b, uint64_t guest_size, uint32_t state);
void sim_bar_destroy(struct sim_bar *b);
/* The device entered `state`: recompute which pages need trapping and
 * signal the re-evaluate eventfd when that changed. */
void sim_bar_set_state(struct sim_bar *b, uint32_t state);
/* A register access; see devmig_sim_bar_access. */
int sim_bar_access(struct sim_bar *b, int mapped, int write, uint64_t off, uint64_t *val);
/* The mmap-able areas now (at most 2); returns how many. */
uint32_t sim_bar_sparse(struct sim_bar *b, struct devmig_vfio_region_sparse_mmap_area *areas);

#endif
