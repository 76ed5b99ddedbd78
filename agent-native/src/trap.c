/* Trap switching (include/devmig/trap.h): plan and apply the difference
 * between what a VMM has mapped of a region and what the device allows. */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "devmig/trap.h"

static int same(const struct devmig_vfio_region_sparse_mmap_area *a,
		const struct devmig_vfio_region_sparse_mmap_area *b)
{
	return a->offset == b->offset && a->size == b->size;
}

static int contains(const struct devmig_vfio_region_sparse_mmap_area *set, uint32_t n,
		    const struct devmig_vfio_region_sparse_mmap_area *a)
{
	for (uint32_t i = 0; i < n; i++)
		if (same(&set[i], a))
			return 1;
	return 0;
}

int devmig_trap_plan(const struct devmig_trap_view *v, const struct devmig_region_info *ri,
		     struct devmig_trap_plan *p)
{
	uint32_t n = ri->has_sparse ? ri->nr_sparse : 0;

	memset(p, 0, sizeof(*p));
	if (ri->index != v->region)
		return -EINVAL;
	if (!ri->has_sparse && (ri->flags & DEVMIG_VFIO_REGION_INFO_FLAG_MMAP))
		return -EINVAL;
	if (n > DEVMIG_TRAP_MAX_AREAS)
		return -E2BIG;
	/* Without MMAP nothing may be mapped, whatever the capability says. */
	if (!(ri->flags & DEVMIG_VFIO_REGION_INFO_FLAG_MMAP))
		n = 0;
	for (uint32_t i = 0; i < v->n; i++)
		if (!contains(ri->sparse, n, &v->areas[i]))
			p->unmap[p->n_unmap++] = v->areas[i];
	for (uint32_t i = 0; i < n; i++)
		if (ri->sparse[i].size && !contains(v->areas, v->n, &ri->sparse[i]))
			p->map[p->n_map++] = ri->sparse[i];
	return 0;
}

static void drop(struct devmig_trap_view *v, uint32_t i)
{
	v->n--;
	v->areas[i] = v->areas[v->n];
	v->addrs[i] = v->addrs[v->n];
}

int devmig_trap_apply(struct devmig_trap_view *v, const struct devmig_trap_plan *p,
		      devmig_trap_map_fn map, devmig_trap_unmap_fn unmap, void *ctx)
{
	int r;

	for (uint32_t k = 0; k < p->n_unmap; k++)
		for (uint32_t i = 0; i < v->n; i++)
			if (same(&v->areas[i], &p->unmap[k])) {
				r = unmap(ctx, v->areas[i].offset, v->areas[i].size, v->addrs[i]);
				if (r < 0)
					return r;
				drop(v, i);
				break;
			}
	for (uint32_t k = 0; k < p->n_map; k++) {
		void *addr = NULL;

		if (v->n == DEVMIG_TRAP_MAX_AREAS)
			return -E2BIG;
		r = map(ctx, p->map[k].offset, p->map[k].size, &addr);
		if (r < 0)
			return r;
		v->areas[v->n] = p->map[k];
		v->addrs[v->n] = addr;
		v->n++;
	}
	return 0;
}

int devmig_trap_unmap_all(struct devmig_trap_view *v, devmig_trap_unmap_fn unmap, void *ctx)
{
	while (v->n) {
		int r = unmap(ctx, v->areas[v->n - 1].offset, v->areas[v->n - 1].size, v->addrs[v->n - 1]);

		if (r < 0)
			return r;
		v->n--;
	}
	return 0;
}

int devmig_trap_mmap(void *ctx, uint64_t offset, uint64_t size, void **addr)
{
	const struct devmig_trap_fd *t = ctx;
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, t->fd, (off_t)(t->region_offset + offset));

	if (p == MAP_FAILED)
		return -errno;
	*addr = p;
	return 0;
}

int devmig_trap_munmap(void *ctx, uint64_t offset, uint64_t size, void *addr)
{
	(void)ctx;
	(void)offset;
	return munmap(addr, size) < 0 ? -errno : 0;
}
