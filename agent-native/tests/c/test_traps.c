/* Trap switching on the simulated device: its BAR's sparse-mmap areas
 * follow the state, the plan/apply helpers keep a VMM's mappings in step,
 * and the founding problem shown both ways: with the safe order (unmap,
 * change state, re-read, map) a vCPU hammering the DMA registers across
 * RUNNING -> PRE_COPY records no missed trap and a guest memory copy built
 * from the logged dirty pages equals the guest's; with the mapping kept
 * across the change, traps are missed and a dirty page is lost. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sys/mman.h>
#include <stdint.h>
#include <unistd.h>

#include "check.h"
#include "devmig/devmig.h"
#include "devmig/dirty.h"
#include "devmig/sim.h"
#include "devmig/trap.h"

#define GUEST (256u * 4096u) /* 256 guest pages */
#define WORDS (256 / 64)

static struct devmig_dev *open_dev(void)
{
	struct devmig_sim_config cfg = { .mem_size = 64 * 1024, .guest_mem_size = GUEST };
	struct devmig_dev *d = NULL;

	CHECK(devmig_dev_open_sim(&cfg, &d) == 0);
	devmig_dev_set_log(d, NULL, NULL);
	return d;
}

static int reeval_fired(struct devmig_dev *d)
{
	struct pollfd p = { .fd = devmig_sim_reeval_eventfd(d), .events = POLLIN };
	uint64_t v;

	if (poll(&p, 1, 0) != 1)
		return 0;
	return read(p.fd, &v, sizeof(v)) == sizeof(v);
}

static void sparse_areas_follow_the_state(void)
{
	struct devmig_dev *d = open_dev();
	struct devmig_region_info ri;

	CHECK(devmig_dev_region_info(d, 0, &ri) == 0);
	CHECK(ri.size == DEVMIG_SIM_BAR_SIZE && ri.has_sparse && ri.nr_sparse == 1);
	CHECK(ri.sparse[0].offset == 0x1000 && ri.sparse[0].size == 0xf000);
	devmig_region_info_free(&ri);
	CHECK(devmig_dev_region_info(d, 1, &ri) == -EINVAL);
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(reeval_fired(d));
	CHECK(devmig_dev_region_info(d, 0, &ri) == 0);
	CHECK(ri.nr_sparse == 1 && ri.sparse[0].offset == 0x2000 && ri.sparse[0].size == 0xe000);
	devmig_region_info_free(&ri);
	CHECK(devmig_set_state(d, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(!reeval_fired(d)); /* same areas: no hint */
	CHECK(devmig_set_state(d, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL) == 0);
	CHECK(reeval_fired(d));
	CHECK(devmig_dev_region_info(d, 0, &ri) == 0);
	CHECK(ri.sparse[0].offset == 0x1000); /* back on RUNNING */
	devmig_region_info_free(&ri);
	devmig_dev_close(d);
}

/* ---- a VMM's mappings, modelled: the view decides mapped or trapped ---- */

struct vmm {
	struct devmig_dev *d;
	struct devmig_trap_view view;
	pthread_mutex_t mu; /* the VMM's mapping table */
	int maps, unmaps, fail_map;
};

static int vmm_map(void *ctx, uint64_t off, uint64_t size, void **addr)
{
	struct vmm *m = ctx;

	(void)size;
	if (m->fail_map)
		return -ENOMEM;
	m->maps++;
	*addr = (void *)(uintptr_t)(0x7f0000000000ULL + off);
	return 0;
}

static int vmm_unmap(void *ctx, uint64_t off, uint64_t size, void *addr)
{
	struct vmm *m = ctx;

	(void)off;
	(void)size;
	(void)addr;
	m->unmaps++;
	return 0;
}

/* A vCPU store: through the mapping when the view has the page mapped,
 * else it faults into the VMM, which forwards it through the device fd. */
static void vcpu_store(struct vmm *m, uint64_t off, uint64_t val)
{
	int mapped = 0;

	pthread_mutex_lock(&m->mu);
	for (uint32_t i = 0; i < m->view.n; i++)
		mapped |= off >= m->view.areas[i].offset &&
			  off < m->view.areas[i].offset + m->view.areas[i].size;
	CHECK(devmig_sim_bar_access(m->d, mapped, 1, off, &val) == 0);
	pthread_mutex_unlock(&m->mu);
}

static void vcpu_dma(struct vmm *m, uint64_t page, uint64_t pages)
{
	vcpu_store(m, DEVMIG_SIM_REG_DMA_ADDR, page * 4096);
	vcpu_store(m, DEVMIG_SIM_REG_DMA_LEN, pages * 4096);
	vcpu_store(m, DEVMIG_SIM_REG_DMA_GO, 1);
}

/* Map what the device allows now. */
static int sync_maps(struct vmm *m)
{
	struct devmig_region_info ri;
	struct devmig_trap_plan p;
	int r = devmig_dev_region_info(m->d, 0, &ri);

	if (r < 0)
		return r;
	r = devmig_trap_plan(&m->view, &ri, &p);
	devmig_region_info_free(&ri);
	if (r == 0) {
		pthread_mutex_lock(&m->mu);
		r = devmig_trap_apply(&m->view, &p, vmm_map, vmm_unmap, m);
		pthread_mutex_unlock(&m->mu);
	}
	return r;
}

static void vmm_init(struct vmm *m)
{
	memset(m, 0, sizeof(*m));
	m->d = open_dev();
	m->view.region = 0;
	pthread_mutex_init(&m->mu, NULL);
	CHECK(sync_maps(m) == 0 && m->view.n == 1 && m->maps == 1);
}

static void plans_are_the_difference(void)
{
	struct vmm m;
	struct devmig_region_info ri;
	struct devmig_trap_plan p;

	vmm_init(&m);
	/* Nothing changed: an empty plan. */
	CHECK(devmig_dev_region_info(m.d, 0, &ri) == 0);
	CHECK(devmig_trap_plan(&m.view, &ri, &p) == 0 && p.n_map == 0 && p.n_unmap == 0);
	devmig_region_info_free(&ri);
	/* PRE_COPY: the big area goes, the smaller one comes. */
	CHECK(devmig_set_state(m.d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_dev_region_info(m.d, 0, &ri) == 0);
	CHECK(devmig_trap_plan(&m.view, &ri, &p) == 0 && p.n_unmap == 1 && p.n_map == 1);
	CHECK(p.unmap[0].offset == 0x1000 && p.map[0].offset == 0x2000);
	/* A map that fails leaves the view saying exactly what is mapped. */
	m.fail_map = 1;
	CHECK(devmig_trap_apply(&m.view, &p, vmm_map, vmm_unmap, &m) == -ENOMEM);
	CHECK(m.view.n == 0 && m.unmaps == 1);
	m.fail_map = 0;
	CHECK(devmig_trap_plan(&m.view, &ri, &p) == 0 && p.n_unmap == 0 && p.n_map == 1);
	CHECK(devmig_trap_apply(&m.view, &p, vmm_map, vmm_unmap, &m) == 0 && m.view.n == 1);
	/* Another region's info is refused. */
	ri.index = 3;
	CHECK(devmig_trap_plan(&m.view, &ri, &p) == -EINVAL);
	devmig_region_info_free(&ri);
	devmig_dev_close(m.d);
}

static int subset(const uint64_t *a, const uint64_t *b)
{
	for (int i = 0; i < WORDS; i++)
		if (a[i] & ~b[i])
			return 0;
	return 1;
}

/* The migration of guest memory as a VMM does it with the exported dirty
 * pages: a full copy first, then the logged pages, round by round. */
static void copy_pages(uint8_t *dst, const uint8_t *src, const uint64_t *bm)
{
	for (unsigned p = 0; p < 256; p++)
		if (bm[p / 64] & (1ULL << (p % 64)))
			memcpy(dst + p * 4096, src + p * 4096, 4096);
}

static void switch_order(int safe, uint64_t *missed, int *equal)
{
	struct vmm m;
	struct devmig_sim_stats st;
	uint64_t dma[WORDS], logged[WORDS], all_logged[WORDS] = { 0 };
	uint8_t *guest, *copy = malloc(GUEST);
	uint64_t size;

	vmm_init(&m);
	CHECK(devmig_sim_guest_mem(m.d, &guest, &size) == 0 && size == GUEST);
	vcpu_dma(&m, 10, 2); /* RUNNING: mapped, nothing to log */
	CHECK(devmig_sim_dirty_take(m.d, DEVMIG_SIM_DIRTY_DMA, dma, WORDS) == 0);
	CHECK(devmig_sim_dirty_take(m.d, DEVMIG_SIM_DIRTY_LOGGED, logged, WORDS) == 0);
	CHECK(dma[0] == (3ULL << 10) && logged[0] == 0);
	memcpy(copy, guest, GUEST); /* the first full pass */

	if (safe) {
		pthread_mutex_lock(&m.mu);
		CHECK(devmig_trap_unmap_all(&m.view, vmm_unmap, &m) == 0);
		pthread_mutex_unlock(&m.mu);
	}
	CHECK(devmig_set_state(m.d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	/* The unsafe order lets the vCPU run before the mappings change. */
	if (!safe)
		vcpu_dma(&m, 40, 1);
	CHECK(sync_maps(&m) == 0);
	vcpu_dma(&m, 50, 3);
	CHECK(devmig_sim_dirty_take(m.d, DEVMIG_SIM_DIRTY_LOGGED, logged, WORDS) == 0);
	copy_pages(copy, guest, logged);
	for (int w = 0; w < WORDS; w++)
		all_logged[w] |= logged[w];
	/* Quiesce (P2P): registers still answer, no DMA starts. */
	CHECK(devmig_set_state(m.d, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_PRE_COPY, NULL) == 0);
	vcpu_dma(&m, 60, 1);
	CHECK(devmig_set_state(m.d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_sim_dirty_take(m.d, DEVMIG_SIM_DIRTY_LOGGED, logged, WORDS) == 0);
	copy_pages(copy, guest, logged);
	for (int w = 0; w < WORDS; w++)
		all_logged[w] |= logged[w];
	CHECK(devmig_sim_dirty_take(m.d, DEVMIG_SIM_DIRTY_DMA, dma, WORDS) == 0);
	CHECK(devmig_sim_stats(m.d, &st) == 0);
	CHECK(st.dma_deferred == 1 && !(dma[0] & (1ULL << 60)));
	/* Every page DMA wrote since PRE_COPY was logged, or it was not. */
	CHECK(subset(dma, all_logged) == safe);
	*missed = st.missed_traps;
	*equal = !memcmp(copy, guest, GUEST);
	free(copy);
	devmig_dev_close(m.d);
}

static void the_founding_problem_both_ways(void)
{
	uint64_t missed;
	int equal;

	switch_order(1, &missed, &equal);
	CHECK(missed == 0 && equal);
	switch_order(0, &missed, &equal);
	CHECK(missed == 3 && !equal); /* three stores through the stale map; page 40 lost */
}

/* ---- a vCPU thread hammering the DMA registers across the switch ---- */

struct hammer {
	struct vmm *m;
	volatile int stop;
	uint64_t n;
};

static void *vcpu_thread(void *arg)
{
	struct hammer *h = arg;

	while (!h->stop) {
		vcpu_dma(h->m, (h->n * 7) % 256, 1 + h->n % 3);
		h->n++;
	}
	return NULL;
}

static void a_hammering_vcpu_misses_no_trap_and_no_page(void)
{
	struct vmm m;
	struct hammer h = { .m = &m };
	struct devmig_sim_stats st;
	uint64_t logged[WORDS], dma[WORDS], n0;
	uint8_t *guest, *copy = malloc(GUEST);
	uint64_t size;
	pthread_t t;

	vmm_init(&m);
	CHECK(devmig_sim_guest_mem(m.d, &guest, &size) == 0);
	CHECK(pthread_create(&t, NULL, vcpu_thread, &h) == 0);
	while (h.n < 1000)
		sched_yield();
	/* The first full copy may run while the vCPU runs: every page DMA
	 * writes from PRE_COPY on is logged and copied again. */
	pthread_mutex_lock(&m.mu);
	CHECK(devmig_trap_unmap_all(&m.view, vmm_unmap, &m) == 0);
	CHECK(devmig_set_state(m.d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	memcpy(copy, guest, GUEST);
	CHECK(devmig_sim_dirty_take(m.d, DEVMIG_SIM_DIRTY_DMA, dma, WORDS) == 0);
	pthread_mutex_unlock(&m.mu);
	CHECK(sync_maps(&m) == 0);
	for (int round = 0; round < 5; round++) {
		n0 = h.n;
		while (h.n < n0 + 500)
			sched_yield();
		CHECK(devmig_sim_dirty_take(m.d, DEVMIG_SIM_DIRTY_LOGGED, logged, WORDS) == 0);
		copy_pages(copy, guest, logged);
	}
	/* Quiesce: DMA stops; then the last logged pages. */
	CHECK(devmig_set_state(m.d, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_PRE_COPY, NULL) == 0);
	n0 = h.n;
	while (h.n < n0 + 200)
		sched_yield();
	h.stop = 1;
	pthread_join(t, NULL);
	CHECK(devmig_sim_dirty_take(m.d, DEVMIG_SIM_DIRTY_LOGGED, logged, WORDS) == 0);
	copy_pages(copy, guest, logged);
	CHECK(devmig_sim_stats(m.d, &st) == 0);
	CHECK(st.missed_traps == 0);
	CHECK(st.dma_deferred > 0);
	CHECK(!memcmp(copy, guest, GUEST));
	free(copy);
	devmig_dev_close(m.d);
}

/* ---- device DMA logging ---- */

static void dma_logging_reports_what_dma_wrote_in_its_ranges(void)
{
	struct vmm m;
	struct devmig_vfio_device_feature_dma_logging_range r[2] = {
		{ .iova = 0, .length = 64 * 4096 },
		{ .iova = 128 * 4096, .length = 64 * 4096 },
	}, overlap[2] = { { .iova = 0, .length = 8192 }, { .iova = 4096, .length = 8192 } };
	uint64_t ps = 2 * 1024 * 1024, bm[WORDS], bm2[1];

	vmm_init(&m);
	/* Off: the core refuses to report, the device errs as the uAPI says. */
	CHECK(devmig_dma_log_report(m.d, 0, 256 * 4096, 4096, bm, WORDS) == -ENODATA);
	CHECK(devmig_dma_log_start(m.d, overlap, 2, &ps) == -EINVAL);
	CHECK(devmig_dma_log_start(m.d, r, 0, &ps) == -EINVAL);
	ps = 3000;
	CHECK(devmig_dma_log_start(m.d, r, 2, &ps) == -EINVAL);
	ps = 2 * 1024 * 1024; /* a hint: the device answers with its 4 KiB */
	CHECK(devmig_dma_log_start(m.d, r, 2, &ps) == 0 && ps == 4096);
	CHECK(devmig_dma_log_start(m.d, r, 2, &ps) == -EBUSY);
	vcpu_dma(&m, 3, 2);    /* pages 3, 4: in range 0 */
	vcpu_dma(&m, 100, 1);  /* page 100: in no range */
	vcpu_dma(&m, 130, 1);  /* page 130: in range 1 */
	/* Bits are relative to the report's iova. */
	memset(bm, 0xff, sizeof(bm)); /* the core zeroes: the device only sets */
	CHECK(devmig_dma_log_report(m.d, 0, 256 * 4096, 4096, bm, WORDS) == 0);
	CHECK(bm[0] == (3ULL << 3) && bm[1] == 0 && bm[2] == (1ULL << 2) && bm[3] == 0);
	/* Read and cleared. */
	CHECK(devmig_dma_log_report(m.d, 0, 256 * 4096, 4096, bm, WORDS) == 0);
	CHECK(!bm[0] && !bm[1] && !bm[2] && !bm[3]);
	/* A coarser report: 64 KiB units (16 pages) from iova 0. */
	vcpu_dma(&m, 17, 1);
	CHECK(devmig_dma_log_report(m.d, 0, 64 * 4096, 16 * 4096, bm2, 1) == 0 && bm2[0] == 2);
	/* The log sees a DMA requested through a missed trap too. */
	CHECK(devmig_set_state(m.d, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	vcpu_dma(&m, 20, 1); /* through the stale mapping of page 1 */
	CHECK(devmig_dma_log_report(m.d, 0, 64 * 4096, 4096, bm2, 1) == 0 && bm2[0] == (1ULL << 20));
	CHECK(devmig_dma_log_report(m.d, 0, 64 * 4096, 2048, bm2, 1) == -EINVAL); /* under 4 KiB */
	CHECK(devmig_dma_log_stop(m.d) == 0);
	CHECK(devmig_dma_log_report(m.d, 0, 64 * 4096, 4096, bm2, 1) == -ENODATA);
	/* A reset ends logging; it can start again. */
	CHECK(devmig_dma_log_start(m.d, r, 2, &ps) == 0);
	CHECK(devmig_reset(m.d) == 0);
	CHECK(devmig_dma_log_report(m.d, 0, 64 * 4096, 4096, bm2, 1) == -ENODATA);
	CHECK(devmig_dma_log_start(m.d, r, 2, &ps) == 0);
	devmig_dev_close(m.d);
}

/* The real mapping callbacks, on a memfd standing in for a device fd: a
 * mapped area reads what the file holds at region offset + area offset, and
 * unmapping it takes it away. */
static void the_mmap_callbacks_map_at_the_region_offset(void)
{
	int fd = memfd_create("devmig-bar", MFD_CLOEXEC);
	struct devmig_trap_fd tf = { .fd = fd, .region_offset = 0x10000 };
	struct devmig_trap_view v = { .region = 0 };
	struct devmig_trap_plan p = { .n_map = 1, .map = { { .offset = 0x2000, .size = 0x1000 } } };
	struct devmig_trap_plan q = { .n_unmap = 1, .unmap = { { .offset = 0x2000, .size = 0x1000 } } };
	uint64_t mark = 0x5a5a1234, got = 0;

	CHECK(fd >= 0 && ftruncate(fd, 0x20000) == 0);
	CHECK(pwrite(fd, &mark, 8, 0x12000) == 8);
	CHECK(devmig_trap_apply(&v, &p, devmig_trap_mmap, devmig_trap_munmap, &tf) == 0 && v.n == 1);
	memcpy(&got, v.addrs[0], 8);
	CHECK(got == mark);
	CHECK(devmig_trap_apply(&v, &q, devmig_trap_mmap, devmig_trap_munmap, &tf) == 0 && v.n == 0);
	/* A bad offset: mmap's errno comes back, nothing recorded. */
	tf.fd = -1;
	CHECK(devmig_trap_apply(&v, &p, devmig_trap_mmap, devmig_trap_munmap, &tf) == -EBADF && v.n == 0);
	close(fd);
}

int main(void)
{
	sparse_areas_follow_the_state();
	plans_are_the_difference();
	the_founding_problem_both_ways();
	a_hammering_vcpu_misses_no_trap_and_no_page();
	dma_logging_reports_what_dma_wrote_in_its_ranges();
	the_mmap_callbacks_map_at_the_region_offset();
	CHECK_DONE();
}
