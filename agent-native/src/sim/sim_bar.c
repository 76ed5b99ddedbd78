/* The simulated device's BAR (include/devmig/sim.h, "BAR, DMA, traps").
 *
 * Page 0 of the BAR holds control registers and is never mappable. Page 1
 * holds the DMA registers: mappable while the device runs normally, and
 * trapped in the migration states (PRE_COPY, PRE_COPY_P2P, STOP_COPY,
 * RUNNING_P2P), where the device must see every DMA it is asked for so it
 * can log the guest pages that DMA writes. The rest is mappable always.
 * An access through a mapping to a page the device currently requires
 * trapped bypassed the trap: it is counted, and a DMA started that way is
 * not logged (a lost dirty page). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "sim_bar.h"

#define BAR_PAGE 4096u
#define GUEST_PAGE 4096u

static int migrating(uint32_t st)
{
	return st == DEVMIG_STATE_PRE_COPY || st == DEVMIG_STATE_PRE_COPY_P2P ||
	       st == DEVMIG_STATE_STOP_COPY || st == DEVMIG_STATE_RUNNING_P2P;
}

/* The device starts DMA only while it runs and is not quiesced for P2P. */
static int initiates_dma(uint32_t st)
{
	return st == DEVMIG_STATE_RUNNING || st == DEVMIG_STATE_PRE_COPY;
}

static uint32_t sparse_for(uint32_t st, struct devmig_vfio_region_sparse_mmap_area *a)
{
	uint64_t first = migrating(st) ? 2 * BAR_PAGE : BAR_PAGE;

	a[0].offset = first;
	a[0].size = DEVMIG_SIM_BAR_SIZE - first;
	return 1;
}

int sim_bar_init(struct sim_bar *b, uint64_t guest_size, uint32_t state)
{
	memset(b, 0, sizeof(*b));
	b->guest_pages = (guest_size ? guest_size : (1u << 20)) / GUEST_PAGE;
	if (!b->guest_pages)
		b->guest_pages = 1;
	b->guest = calloc(b->guest_pages, GUEST_PAGE);
	b->dma_written = calloc(b->guest_pages, 1);
	b->trap_logged = calloc(b->guest_pages, 1);
	b->dma_logged = calloc(b->guest_pages, 1);
	/* The re-evaluate hint is optional, as on real devices: a kernel
	 * without eventfd (a minimal guest) gets a device without it. */
	b->reeval_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	b->reeval_err = b->reeval_efd < 0 ? -errno : 0;
	if (!b->guest || !b->dma_written || !b->trap_logged || !b->dma_logged) {
		sim_bar_destroy(b);
		return -ENOMEM;
	}
	b->state = state;
	pthread_mutex_init(&b->mu, NULL);
	return 0;
}

void sim_bar_destroy(struct sim_bar *b)
{
	free(b->guest);
	free(b->dma_written);
	free(b->trap_logged);
	free(b->dma_logged);
	b->dma_logged = NULL;
	if (b->reeval_efd >= 0)
		close(b->reeval_efd);
	b->guest = b->dma_written = b->trap_logged = NULL;
	b->reeval_efd = -1;
}

void sim_bar_set_state(struct sim_bar *b, uint32_t state)
{
	int changed;

	pthread_mutex_lock(&b->mu);
	changed = migrating(b->state) != migrating(state);
	b->state = state;
	pthread_mutex_unlock(&b->mu);
	if (changed && b->reeval_efd >= 0) {
		uint64_t one = 1;

		/* A hint for the VMM: re-read the sparse-mmap capability. */
		if (write(b->reeval_efd, &one, sizeof(one)) < 0) {
			/* a full counter still wakes the reader */
		}
	}
}

uint32_t sim_bar_sparse(struct sim_bar *b, struct devmig_vfio_region_sparse_mmap_area *areas)
{
	uint32_t n;

	pthread_mutex_lock(&b->mu);
	n = sparse_for(b->state, areas);
	pthread_mutex_unlock(&b->mu);
	return n;
}

static uint64_t reg64(struct sim_bar *b, uint64_t off)
{
	uint64_t v;

	memcpy(&v, b->regs + off, 8);
	return v;
}

/* The DMA engine: write [addr, addr + len) of guest memory. mu held. */
static void dma(struct sim_bar *b, int logged)
{
	uint64_t addr = reg64(b, DEVMIG_SIM_REG_DMA_ADDR), len = reg64(b, DEVMIG_SIM_REG_DMA_LEN);
	uint64_t first, last;

	if (!initiates_dma(b->state)) {
		b->dma_deferred++; /* quiesced: answers registers, starts no DMA */
		return;
	}
	if (!len || addr / GUEST_PAGE >= b->guest_pages)
		return;
	first = addr / GUEST_PAGE;
	last = (addr + len - 1) / GUEST_PAGE;
	if (last >= b->guest_pages || last < first)
		last = b->guest_pages - 1;
	b->dma_ops++;
	for (uint64_t p = first; p <= last; p++) {
		/* A value that changes with every DMA, at a place that moves:
		 * each DMA changes the page's content. */
		uint64_t v = (b->dma_ops << 32) ^ p;

		memcpy(b->guest + p * GUEST_PAGE + (b->dma_ops % (GUEST_PAGE / 8)) * 8, &v, 8);
		b->dma_written[p] = 1;
		if (logged)
			b->trap_logged[p] = 1;
		/* DMA logging sees every write the device makes in its ranges,
		 * whichever way the DMA was requested. */
		if (b->log_on)
			for (uint32_t i = 0; i < b->log_n; i++)
				if (p * GUEST_PAGE >= b->log_ranges[i].iova &&
				    p * GUEST_PAGE < b->log_ranges[i].iova + b->log_ranges[i].length)
					b->dma_logged[p] = 1;
		b->dma_pages++;
	}
}

int sim_bar_access(struct sim_bar *b, int mapped, int write, uint64_t off, uint64_t *val)
{
	struct devmig_vfio_region_sparse_mmap_area a[2];
	int inside = 0, bypass = 0;
	uint32_t n;

	if (off % 8 || off + 8 > DEVMIG_SIM_BAR_SIZE)
		return -EINVAL;
	pthread_mutex_lock(&b->mu);
	if (mapped) {
		if (off < BAR_PAGE) {
			pthread_mutex_unlock(&b->mu);
			return -EFAULT; /* never mappable: no VMM could have mapped it */
		}
		n = sparse_for(b->state, a);
		for (uint32_t i = 0; i < n; i++)
			inside |= off >= a[i].offset && off < a[i].offset + a[i].size;
		if (!inside) {
			b->missed_traps++;
			bypass = 1;
		}
	}
	if (!write) {
		memcpy(val, b->regs + off, 8);
	} else {
		memcpy(b->regs + off, val, 8);
		/* The device logs a DMA's pages when it saw the request through
		 * a trap in a migration state; a bypassing write is not seen. */
		if (off == DEVMIG_SIM_REG_DMA_GO)
			dma(b, migrating(b->state) && !mapped && !bypass);
	}
	pthread_mutex_unlock(&b->mu);
	return 0;
}

/* ---- device DMA logging ---- */

int sim_bar_log_start(struct sim_bar *b, const struct devmig_vfio_device_feature_dma_logging_range *r,
		      uint32_t n, uint64_t *page_size)
{
	/* The kernel core's checks, in its order: a power-of-two page size,
	 * one to SIM_LOG_MAX_RANGES ranges, none wrapping or overlapping. */
	if (!*page_size || (*page_size & (*page_size - 1)) || !n)
		return -EINVAL;
	if (n > SIM_LOG_MAX_RANGES)
		return -E2BIG;
	for (uint32_t i = 0; i < n; i++) {
		if (!r[i].length || r[i].iova + r[i].length < r[i].iova)
			return -EOVERFLOW;
		for (uint32_t j = 0; j < i; j++)
			if (r[i].iova < r[j].iova + r[j].length && r[j].iova < r[i].iova + r[i].length)
				return -EINVAL;
	}
	pthread_mutex_lock(&b->mu);
	if (b->log_on) {
		pthread_mutex_unlock(&b->mu);
		return -EBUSY; /* one start at a time */
	}
	memcpy(b->log_ranges, r, n * sizeof(*r));
	b->log_n = n;
	b->log_on = 1;
	memset(b->dma_logged, 0, b->guest_pages);
	pthread_mutex_unlock(&b->mu);
	/* The device logs at its own 4 KiB page, whatever the hint. */
	*page_size = GUEST_PAGE;
	return 0;
}

int sim_bar_log_stop(struct sim_bar *b)
{
	pthread_mutex_lock(&b->mu);
	b->log_on = 0;
	pthread_mutex_unlock(&b->mu);
	return 0;
}

int sim_bar_log_report(struct sim_bar *b, uint64_t iova, uint64_t length, uint64_t page_size,
		       uint64_t *bitmap)
{
	if (page_size < GUEST_PAGE || (page_size & (page_size - 1)))
		return -EINVAL;
	if (iova + length < iova)
		return -EOVERFLOW;
	pthread_mutex_lock(&b->mu);
	if (!b->log_on) {
		pthread_mutex_unlock(&b->mu);
		return -EINVAL; /* "If DMA logging is not enabled, an error will be returned" */
	}
	/* Only set bits; clear what was reported (read and clear). A report
	 * unit is dirty when any 4 KiB page inside it is. */
	for (uint64_t a = iova; a < iova + length; a += GUEST_PAGE) {
		uint64_t p = a / GUEST_PAGE, bit = (a - iova) / page_size;

		if (p < b->guest_pages && b->dma_logged[p]) {
			bitmap[bit / 64] |= 1ULL << (bit % 64);
			b->dma_logged[p] = 0;
		}
	}
	pthread_mutex_unlock(&b->mu);
	return 0;
}

void sim_bar_reset(struct sim_bar *b)
{
	pthread_mutex_lock(&b->mu);
	b->log_on = 0;
	memset(b->regs, 0, sizeof(b->regs));
	pthread_mutex_unlock(&b->mu);
}
