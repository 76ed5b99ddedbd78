/* The simulated migratable device: the kernel's migration semantics with
 * no hardware, behind the same struct devmig_dev as a real VFIO device.
 *
 * Device memory (mem_size bytes in 4 KiB pages) is the state it migrates.
 * Its data fd is a real fd (a memfd): read() and write() work on it, a read
 * at the end of what is available returns 0 (PRE_COPY's temporary end, as
 * mtty does), and the stream grows when the device has more to send.
 *
 * The device's own stream format (opaque to devmig, like any driver's):
 * a 32-byte header, one 4112-byte record per page sent (16-byte record
 * header with the page's digest + the page), and a 16-byte end record with
 * a digest over every page's digest in page order (the memory as it
 * stopped). A resuming device checks each record against its digest and
 * installs it as it is written (as drivers that load incrementally do);
 * RESUMING -> STOP checks the end record, that every page arrived and that
 * no record was bad, or fails into ERROR, whose reset clears the memory. */
#ifndef DEVMIG_SIM_H
#define DEVMIG_SIM_H

#include <stdint.h>

#include "devmig/devmig.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DEVMIG_SIM_PAGE_SIZE 4096u

struct devmig_sim_config {
	uint64_t flags;    /* DEVMIG_MIG_*; 0 means STOP_COPY|P2P|PRE_COPY */
	uint64_t mem_size; /* bytes; 0 means 1 MiB; rounded up to whole pages */
	/* Workload while PRE_COPY runs: pages the device dirties for each MiB
	 * userspace reads from the data fd. Tied to read progress rather than
	 * to time so every run is reproducible. */
	uint32_t dirty_pages_per_mib;
	uint64_t seed; /* initial memory content and workload page choice */
	/* PRE_COPY's temporary end through the device's read op: 0 (mtty's
	 * way, and what a raw read() of the fd gives) or, when set, -ENOMSG
	 * as the uAPI documents it (mlx5, virtio). */
	int precopy_end_enomsg;
	struct devmig_dev_desc desc; /* all zero: 1b36:0001 "devmig-sim" */
	/* Guest memory the device's DMA engine writes (see the BAR below);
	 * 0 means 1 MiB. */
	uint64_t guest_mem_size;
};

int devmig_dev_open_sim(const struct devmig_sim_config *cfg, struct devmig_dev **out);
/* 1 when d is a simulated device. Every devmig_sim_* call below returns
 * -ENODEV for a device that is not. */
int devmig_dev_is_sim(const struct devmig_dev *d);

/* Fault injection. */
/* Faults stay armed until devmig_sim_clear_faults, like broken hardware.
 * Make the arc from -> to (one step of a path) fail with -err; the device
 * stays in `from`, or lands in ERROR when end_in_error. */
int devmig_sim_fail_arc(struct devmig_dev *d, uint32_t from, uint32_t to, int err, int end_in_error);
/* The resuming write that reaches stream byte `offset` fails with -err
 * (bytes before it are accepted). */
int devmig_sim_fail_write(struct devmig_dev *d, uint64_t offset, int err);
/* Flip byte `offset` of the next saving stream as the device produces it
 * (once). */
int devmig_sim_corrupt(struct devmig_dev *d, uint64_t offset);
int devmig_sim_clear_faults(struct devmig_dev *d);

/* Another holder of the device fd (the VMM's duplicate) requests `to`:
 * the device moves with the kernel's semantics, and devmig's record of its
 * state goes stale. Any new data fd is closed, as that holder would. */
int devmig_sim_external_set_state(struct devmig_dev *d, uint32_t to);

/* The workload: write to one page of device memory (as the running device
 * would), dirtying it. -EBUSY when the device is not running. */
int devmig_sim_touch(struct devmig_dev *d, uint64_t page);

struct devmig_sim_stats {
	uint64_t set_state_calls; /* requests that reached the device */
	uint64_t reset_calls;
	uint32_t last_path[DEVMIG_STATE_COUNT]; /* states entered by the last request */
	int last_path_len;
	uint64_t pages_dirtied;   /* by the workload, since open */
	uint64_t loads;           /* RESUMING -> STOP that installed memory */
	/* The BAR (below), since open. */
	uint64_t missed_traps;    /* mapped accesses to pages the device required trapped */
	uint64_t dma_ops;         /* DMAs the device ran */
	uint64_t dma_pages;       /* guest pages those DMAs wrote */
	uint64_t dma_deferred;    /* DMA requests while quiesced (not run) */
};
int devmig_sim_stats(struct devmig_dev *d, struct devmig_sim_stats *st);
/* Only the BAR's counters (the fields after "The BAR"), under the BAR's own
 * lock: safe while another thread drives the device (a pump). */
int devmig_sim_bar_stats(struct devmig_dev *d, struct devmig_sim_stats *st);

/* ---- the BAR, its DMA engine and trap-based dirty logging ----
 * Region DEVMIG_SIM_BAR_INDEX, 64 KiB, 8-byte registers. Page 0 (control)
 * is never mappable. Page 1 holds the DMA registers: writing DMA_GO makes
 * the device write guest memory [DMA_ADDR, DMA_ADDR + DMA_LEN) (whole
 * 4 KiB pages, clipped to the guest memory). Page 1 is mappable while the
 * device runs normally and must be trapped in PRE_COPY, PRE_COPY_P2P,
 * STOP_COPY and RUNNING_P2P: there the region's sparse-mmap capability
 * leaves it out, the re-evaluate eventfd fires, and the device logs the
 * guest pages of every DMA it was asked for through a trap. Pages 2-15 are
 * always mappable. The device starts DMA only in RUNNING and PRE_COPY;
 * quiesced (the P2P states) it still answers register accesses. */
#define DEVMIG_SIM_BAR_INDEX 0u
#define DEVMIG_SIM_BAR_SIZE 0x10000u
#define DEVMIG_SIM_REG_DMA_ADDR 0x1000u /* guest address, bytes */
#define DEVMIG_SIM_REG_DMA_LEN 0x1008u  /* bytes */
#define DEVMIG_SIM_REG_DMA_GO 0x1010u   /* write: run the DMA */
#define DEVMIG_SIM_REG_SCRATCH 0x2000u  /* a plain register, always mappable */
/* One 8-byte register access at off: mapped != 0 for an access through the
 * VMM's mmap of the BAR (a vCPU's load or store), 0 for a trapped one
 * (through the device fd). A mapped access to a page the device requires
 * trapped now is counted in missed_traps, and a DMA it starts is not
 * logged. -EINVAL for an unaligned or out-of-range offset, -EFAULT for a
 * mapped access to page 0. Safe from any thread. */
int devmig_sim_bar_access(struct devmig_dev *d, int mapped, int write, uint64_t off, uint64_t *val);
/* The eventfd the device signals when its sparse-mmap areas change (the
 * "re-evaluate" hint); owned by the device. -errno when the kernel has no
 * eventfd (the device then offers no hint, as many real ones do not). */
int devmig_sim_reeval_eventfd(struct devmig_dev *d);
/* Guest memory (owned by the device) and its size in bytes. */
int devmig_sim_guest_mem(struct devmig_dev *d, uint8_t **mem, uint64_t *size);
/* Take (and clear) the guest pages written by DMA (DEVMIG_SIM_DIRTY_DMA,
 * the ground truth) or logged by the device through traps
 * (DEVMIG_SIM_DIRTY_LOGGED) since the last take, as a bitmap of nwords
 * words (bit i = guest page i). -ENOSPC when short. */
#define DEVMIG_SIM_DIRTY_DMA 0
#define DEVMIG_SIM_DIRTY_LOGGED 1
int devmig_sim_dirty_take(struct devmig_dev *d, int which, uint64_t *bitmap, uint64_t nwords);
/* A 64-bit digest of device memory (the device's digest, see
 * sim_digest.c): equal digests, equal memory. */
int devmig_sim_mem_digest(struct devmig_dev *d, uint64_t *digest);
/* The digest itself, from seed 0, with one implementation (enum
 * devmig_impl: AUTO, PORTABLE, X86_512), for tests that check they agree;
 * with dst (64-byte aligned, len a multiple of 64) the bytes are also copied
 * there, as a resuming device installs a page. -ENOTSUP when this CPU lacks
 * impl. */
int devmig_sim_digest_impl(int impl, void *dst, const void *src, size_t len, uint64_t *out);

#ifdef __cplusplus
}
#endif
#endif
