/* Trap switching: keeping a VMM's mmaps of a device region in step with
 * what the device allows to be mapped, state by state.
 *
 * A device states, in its region's sparse-mmap capability, which areas may
 * be mapped (accessed directly by vCPUs); everything else must be trapped
 * (accessed through the device fd, so the device sees it). The areas can
 * change with the migration state: a device that must see its DMA being
 * programmed during PRE_COPY takes those registers out of the mappable set.
 * The safe order around a state change that may shrink the set:
 *   1. unmap everything the change could take away (devmig_trap_unmap_all
 *      or the plan for the worst case), so no vCPU access bypasses a trap;
 *   2. change the state;
 *   3. re-read the capability (devmig_dev_region_info) and map what is
 *      allowed now (devmig_trap_plan + devmig_trap_apply).
 * A re-evaluate eventfd, where the device offers one, is a hint to redo 3;
 * correctness never depends on it. */
#ifndef DEVMIG_TRAP_H
#define DEVMIG_TRAP_H

#include <stdint.h>

#include "devmig/vfio.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Areas one region may have mapped at once; the drivers devmig knows use
 * one to three (a BAR around its MSI-X table). */
#define DEVMIG_TRAP_MAX_AREAS 16

/* What the VMM has mapped of one region now. */
struct devmig_trap_view {
	uint32_t region;
	uint32_t n;
	struct devmig_vfio_region_sparse_mmap_area areas[DEVMIG_TRAP_MAX_AREAS];
	void *addrs[DEVMIG_TRAP_MAX_AREAS]; /* where each is mapped (the callback's) */
};

/* The change from a view to what a region info allows: areas to unmap
 * (mapped now, not allowed as they are) and areas to map (allowed, not
 * mapped). An area that changed size is unmapped and mapped again. */
struct devmig_trap_plan {
	uint32_t n_unmap, n_map;
	struct devmig_vfio_region_sparse_mmap_area unmap[DEVMIG_TRAP_MAX_AREAS];
	struct devmig_vfio_region_sparse_mmap_area map[DEVMIG_TRAP_MAX_AREAS];
};

/* -E2BIG when the region allows more than DEVMIG_TRAP_MAX_AREAS areas;
 * -EINVAL when ri is another region's, or has no sparse-mmap capability
 * while it is mappable (map the whole region: not a trap-switching case). */
int devmig_trap_plan(const struct devmig_trap_view *v, const struct devmig_region_info *ri,
		     struct devmig_trap_plan *p);

/* Map or unmap one area (region-relative offset and size); map returns the
 * address in *addr. 0 or -errno. */
typedef int (*devmig_trap_map_fn)(void *ctx, uint64_t offset, uint64_t size, void **addr);
typedef int (*devmig_trap_unmap_fn)(void *ctx, uint64_t offset, uint64_t size, void *addr);

/* Callbacks that really map: ctx is a struct devmig_trap_fd naming the
 * device fd and the region's offset within it (from its region info); an
 * area is mmap'd shared, read-write, at fd offset region_offset + offset. */
struct devmig_trap_fd {
	int fd;
	uint64_t region_offset;
};
int devmig_trap_mmap(void *ctx, uint64_t offset, uint64_t size, void **addr);
int devmig_trap_munmap(void *ctx, uint64_t offset, uint64_t size, void *addr);

/* Carry out a plan: every unmap first, then the maps; the view follows
 * each step that succeeded, so after an error it still says exactly what
 * is mapped. */
int devmig_trap_apply(struct devmig_trap_view *v, const struct devmig_trap_plan *p,
		      devmig_trap_map_fn map, devmig_trap_unmap_fn unmap, void *ctx);
/* Unmap every area of the view (step 1 of the safe order). */
int devmig_trap_unmap_all(struct devmig_trap_view *v, devmig_trap_unmap_fn unmap, void *ctx);

#ifdef __cplusplus
}
#endif
#endif
