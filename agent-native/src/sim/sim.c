/* The simulated migratable device (see include/devmig/sim.h). It follows
 * the kernel's rules: the same paths for its flag set (the same arc table
 * as fsm.c, walked one step at a time as a driver's migration_set_state
 * does), -EINVAL for refused requests, ERROR left only by reset, a data fd
 * per session, PRE_COPY info, and validation of resumed data. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "devmig/sim.h"
#include "devmig/vfio.h"
#include "../internal.h"
#include "sim_bar.h"
#include "sim_digest.h"

#define PAGE DEVMIG_SIM_PAGE_SIZE
/* Stream layout, little-endian as the host (the sim never crosses hosts). */
#define SIM_MAGIC 0x5645444d4953444dull /* "MDSIMDEV" */
/* 2: word-wise page and memory digests. 3: the end record's digest is over
 * the pages' own digests, in page order, not over the memory again: the
 * saver keeps each page's digest from its last record, so stopping costs
 * O(pages) instead of a pass over all memory, and so does the check. 4: the
 * digest in four lanes (sim_digest); the end record's digest the sum of
 * every page's digest mixed with its index (page_digest_mix), kept as pages
 * are recorded, so the stop costs nothing per page. 5: the digest in eight
 * multiply-accumulate lanes (sim_digest.c), vectorised, and a resuming
 * device checks and installs a page in one pass. */
#define SIM_VERSION 5u
#define HDR_LEN 32u     /* magic 8, version 4, page size 4, pages 8, reserved 8 */
#define REC_HDR_LEN 16u /* tag 4, page index 4, page digest 8 */
#define REC_LEN (REC_HDR_LEN + PAGE)
#define END_LEN 16u /* tag 4, reserved 4, digest of the page digests 8 */
#define TAG_PAGE 1u
#define TAG_END 2u
/* Largest memory the sim models: page indexes are 32-bit in its records. */
#define MAX_PAGES (1ull << 32)

enum sess { SESS_NONE, SESS_SAVE, SESS_RESUME };

struct sim {
	uint64_t flags;
	uint64_t npages;
	uint8_t *mem;
	uint8_t *dirty; /* one byte per page: written since the last send */
	uint8_t *batch; /* saving: BATCH_PAGES page records, written at once */
	/* Saving: each page's digest in its last record. A page changed since
	 * is dirty and is sent again before the end record, so at the end
	 * these are the digests of the memory as it stops. */
	uint64_t *page_dg;
	/* The sum (mod 2^64) of every page's mixed digest (page_digest_mix),
	 * kept as page_dg changes: the end record's digest, O(1) at the stop. */
	uint64_t dg_sum;
	uint64_t ndirty;
	uint32_t dirty_per_mib;
	bool end_enomsg;
	uint64_t rng;
	uint64_t touches;
	uint32_t state;

	enum sess sess;
	int sess_fd;          /* the device's own reference to the session memfd */
	/* Saving: the device's read-only view of its stream (a shared mapping
	 * of the session memfd, never moved while the session lasts), which
	 * reads copy from, as a driver copies from its own buffers. NULL when
	 * it could not be mapped: reads then go through the fd. */
	const uint8_t *view;
	size_t view_len;
	uint64_t appended;    /* saving: bytes in the stream so far */
	uint64_t initial_end; /* saving: where PRE_COPY's initial data ends */
	uint64_t read_seen;   /* saving: reader offset the workload last saw */
	uint64_t dirty_frac;  /* workload: fraction of a page owed, in 1/MiB units */
	/* Saving in STOP_COPY after PRE_COPY: the dirty pages' records (and
	 * then the end record) are made as the reader reaches the end of what
	 * was made, as drivers that save in chunks do, so the stop does not
	 * wait for a copy of every dirty page (the device is stopped: its
	 * memory no longer changes, so when a record is made does not matter). */
	bool stop_lazy;
	bool end_appended;
	bool hdr_checked;     /* resuming: the header was checked */

	/* Resuming: the stream is parsed and installed as it is written, as
	 * drivers that load incrementally do (mlx5), so RESUMING -> STOP only
	 * checks the end record instead of loading the whole image inside the
	 * stop-and-copy window. Bad records are remembered, not installed, and
	 * refused at RESUMING -> STOP; the device then goes to ERROR, and its
	 * reset clears the memory, so no partial load ever runs. page_dg holds
	 * the digest of each page's last record (saving uses it the same way). */
	uint64_t rx_off;          /* bytes accepted */
	uint8_t rx_part[REC_LEN]; /* a record (or the header) split across writes */
	size_t rx_have;           /* bytes of it held */
	uint8_t *rx_seen;         /* one byte per page: a record arrived */
	uint64_t rx_nseen;        /* pages with a record */
	bool rx_ended;            /* the end record arrived */
	uint64_t rx_end_dg;       /* its digest */
	int rx_err;               /* first bad record: -EIO at RESUMING -> STOP */

	bool arc_fault;
	uint32_t fault_from, fault_to;
	int fault_err;
	bool fault_to_error;
	bool write_fault;
	uint64_t write_fault_at;
	int write_fault_err;
	bool corrupt;
	uint64_t corrupt_at;

	struct devmig_sim_stats st;
	struct sim_bar bar; /* the BAR, DMA engine and trap logging (sim_bar.c) */
};

static const struct devmig_dev_ops sim_ops;

static struct sim *to_sim(const struct devmig_dev *d)
{
	return d && d->ops == &sim_ops ? d->priv : NULL;
}

int devmig_dev_is_sim(const struct devmig_dev *d)
{
	return to_sim(d) != NULL;
}

static uint64_t sim_digest(const void *buf, size_t len, uint64_t h)
{
	return sim_digest_copy(NULL, buf, len, h);
}
#define DIGEST_BASIS 0xcbf29ce484222325ull

/* A page's digest mixed with its index, so the sum of all pages' mixes
 * tells a page installed at the wrong index; 0 (no record yet) adds nothing. */
static uint64_t page_digest_mix(uint64_t dg, uint64_t page)
{
	return dg ? sim_digest_fold(sim_digest_fold(DIGEST_BASIS, dg), page) : 0;
}

static void set_page_dg(struct sim *s, uint64_t page, uint64_t dg)
{
	s->dg_sum += page_digest_mix(dg, page) - page_digest_mix(s->page_dg[page], page);
	s->page_dg[page] = dg;
}

/* Marsaglia's xorshift64 (shifts 13, 7, 17: a full-period triple): a
 * reproducible page choice for the workload. */
static uint64_t rng_next(struct sim *s)
{
	s->rng ^= s->rng << 13;
	s->rng ^= s->rng >> 7;
	s->rng ^= s->rng << 17;
	return s->rng;
}

/* Every state change goes through here, so the BAR follows the device. */
static void set_st(struct sim *s, uint32_t st)
{
	s->state = st;
	sim_bar_set_state(&s->bar, st);
}

static bool running(uint32_t st)
{
	return st == DEVMIG_STATE_RUNNING || st == DEVMIG_STATE_RUNNING_P2P ||
	       st == DEVMIG_STATE_PRE_COPY || st == DEVMIG_STATE_PRE_COPY_P2P;
}

static void touch(struct sim *s, uint64_t page)
{
	uint64_t v = ++s->touches ^ s->rng;

	/* One 8-byte store at a place that moves with the count: enough to
	 * change the page's digest every time. */
	memcpy(s->mem + page * PAGE + (s->touches % (PAGE / 8)) * 8, &v, 8);
	if (!s->dirty[page]) {
		s->dirty[page] = 1;
		s->ndirty++;
	}
	s->st.pages_dirtied++;
}

static uint64_t reader_offset(struct sim *s)
{
	off_t o = lseek(s->sess_fd, 0, SEEK_CUR);

	return o < 0 ? 0 : (uint64_t)o;
}

/* The running device dirties pages in proportion to what was read. */
static void workload(struct sim *s)
{
	uint64_t off;

	if (s->sess != SESS_SAVE || !running(s->state))
		return;
	off = reader_offset(s);
	if (off > s->read_seen && s->dirty_per_mib) {
		s->dirty_frac += (off - s->read_seen) * s->dirty_per_mib;
		for (; s->dirty_frac >= (1u << 20); s->dirty_frac -= (1u << 20))
			touch(s, rng_next(s) % s->npages);
	}
	if (off > s->read_seen)
		s->read_seen = off;
}

/* Map what was just appended into the view, in one call for the whole
 * batch. Left to fault-around (one fault per 64 KiB read), the faults cost
 * the pump a tenth of its CPU in a 1 GiB transfer (0.275 against 0.241 CPU
 * s/GiB, six transfers each). Only a hint: whatever is left unmapped is
 * faulted in as it is read. */
static void populate_view(struct sim *s, uint64_t from)
{
	uint64_t lo = from & ~(uint64_t)(PAGE - 1), hi = s->appended;

	if (!s->view || hi > s->view_len || hi <= lo)
		return;
	(void)madvise((void *)(uintptr_t)(s->view + lo), (size_t)(hi - lo), MADV_POPULATE_READ);
}

static int append(struct sim *s, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	uint64_t start = s->appended;
	uint8_t flipped;
	ssize_t n;

	if (s->corrupt && s->corrupt_at >= s->appended && s->corrupt_at < s->appended + len) {
		size_t at = (size_t)(s->corrupt_at - s->appended);

		/* Write the stream in three parts with the one byte changed;
		 * the caller's buffer is device memory and stays intact. */
		s->corrupt = false;
		if (at && append(s, p, at) < 0)
			return -EIO;
		flipped = p[at] ^ 0x5a; /* any non-zero mask changes the byte */
		if (append(s, &flipped, 1) < 0)
			return -EIO;
		return len - at - 1 ? append(s, p + at + 1, len - at - 1) : 0;
	}
	while (len) {
		n = pwrite(s->sess_fd, p, len, (off_t)s->appended);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		p += n;
		len -= (size_t)n;
		s->appended += (uint64_t)n;
	}
	populate_view(s, start);
	return 0;
}

static int append_header(struct sim *s)
{
	uint8_t h[HDR_LEN] = { 0 };
	uint64_t magic = SIM_MAGIC;
	uint32_t ver = SIM_VERSION, ps = PAGE;

	memcpy(h, &magic, 8);
	memcpy(h + 8, &ver, 4);
	memcpy(h + 12, &ps, 4);
	memcpy(h + 16, &s->npages, 8);
	return append(s, h, sizeof(h));
}

/* Page records written per pwrite when saving: 64 (about 257 KiB), one
 * system call per 64 pages instead of two per page. */
#define BATCH_PAGES 64u

/* Append the records of every page (all) or of the dirty ones, in page
 * order, at most limit of them, BATCH_PAGES records per write. A page
 * counts as sent (its digest kept, its dirty mark cleared) only once its
 * batch is written. */
static int append_pages(struct sim *s, bool all, uint64_t limit)
{
	uint32_t idx[BATCH_PAGES];
	uint64_t dg[BATCH_PAGES];
	uint64_t want = all ? s->npages : s->ndirty, found = 0;

	if (want > limit)
		want = limit;
	size_t n = 0;

	for (uint64_t p = 0; p < s->npages && found < want; p++) {
		if (!all && !s->dirty[p])
			continue;
		uint8_t *rec = s->batch + n * REC_LEN;
		uint32_t tag = TAG_PAGE;

		found++;
		idx[n] = (uint32_t)p;
		dg[n] = sim_digest(s->mem + p * PAGE, PAGE, DIGEST_BASIS);
		memcpy(rec, &tag, 4);
		memcpy(rec + 4, &idx[n], 4);
		memcpy(rec + 8, &dg[n], 8);
		memcpy(rec + REC_HDR_LEN, s->mem + p * PAGE, PAGE);
		if (++n < BATCH_PAGES && found < want)
			continue;
		if (append(s, s->batch, n * REC_LEN) < 0)
			return -EIO;
		for (size_t i = 0; i < n; i++) {
			set_page_dg(s, idx[i], dg[i]);
			if (s->dirty[idx[i]]) {
				s->dirty[idx[i]] = 0;
				s->ndirty--;
			}
		}
		n = 0;
	}
	return 0;
}

static int append_dirty(struct sim *s)
{
	return s->ndirty ? append_pages(s, false, UINT64_MAX) : 0;
}

static int append_end(struct sim *s)
{
	uint8_t h[END_LEN] = { 0 };
	uint32_t tag = TAG_END;
	/* Every page was sent in this session (the initial data holds all of
	 * them), and every change since is dirty and sent again first. */
	memcpy(h, &tag, 4);
	memcpy(h + 8, &s->dg_sum, 8);
	if (append(s, h, sizeof(h)) < 0)
		return -EIO;
	s->end_appended = true;
	return 0;
}

static void end_session(struct sim *s)
{
	if (s->sess == SESS_NONE)
		return;
	if (s->view)
		munmap((void *)s->view, s->view_len);
	s->view = NULL;
	s->view_len = 0;
	/* Like a driver disabling the fd: userspace's copy reads nothing more. */
	if (ftruncate(s->sess_fd, 0) < 0) {
		/* a memfd without seals always truncates; nothing to undo */
	}
	close(s->sess_fd);
	s->sess_fd = -1;
	s->sess = SESS_NONE;
	free(s->rx_seen);
	s->rx_seen = NULL;
}

/* Bytes of a saving session's stream the view maps: four whole images
 * (the initial data and three rounds' worth of dirty pages) before reads
 * fall back to the fd. Address space only: pages are mapped as they are
 * read, and a shared read-only mapping commits no memory. */
#define VIEW_IMAGES 4u
/* Largest view, bytes: 1 TiB, far inside the 128 TiB of a 47-bit user
 * address space, so views of many devices' sessions always fit. */
#define VIEW_MAX (1ull << 40)

static void map_view(struct sim *s)
{
	uint64_t image = HDR_LEN + s->npages * REC_LEN + END_LEN;
	uint64_t len = image * VIEW_IMAGES;
	void *m;

	if (len > VIEW_MAX)
		return; /* reads go through the fd */
	/* Beyond the memfd's end is allowed: only what was appended is read. */
	m = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, s->sess_fd, 0);
	if (m == MAP_FAILED)
		return;
	s->view = m;
	s->view_len = (size_t)len;
}

/* A new session: a fresh memfd, the device's reference kept, a duplicate
 * for userspace (close-on-exec, as the kernel installs it). */
static int open_session(struct sim *s, enum sess kind, int *user_fd)
{
	int fd = memfd_create("devmig-sim-data", MFD_CLOEXEC);

	if (fd < 0)
		return -errno;
	*user_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (*user_fd < 0) {
		int e = -errno;

		close(fd);
		return e;
	}
	end_session(s);
	s->sess = kind;
	s->sess_fd = fd;
	s->appended = 0;
	s->initial_end = 0;
	s->read_seen = 0;
	s->dirty_frac = 0;
	s->stop_lazy = false;
	s->end_appended = false;
	s->hdr_checked = false;
	s->rx_off = 0;
	s->rx_have = 0;
	s->rx_nseen = 0;
	s->rx_ended = false;
	s->rx_err = 0;
	if (kind == SESS_SAVE)
		map_view(s);
	if (kind == SESS_RESUME) {
		/* Set up before the data arrives, as drivers do on entering
		 * RESUMING: nothing of this is left to the stop-and-copy window. */
		s->rx_seen = calloc(s->npages, 1);
		if (!s->rx_seen) {
			end_session(s);
			close(*user_fd);
			*user_fd = -1;
			return -ENOMEM;
		}
	}
	return 0;
}

static int check_header(const uint8_t *h, uint64_t npages)
{
	uint64_t magic, pages;
	uint32_t ver, ps;

	memcpy(&magic, h, 8);
	memcpy(&ver, h + 8, 4);
	memcpy(&ps, h + 12, 4);
	memcpy(&pages, h + 16, 8);
	return magic == SIM_MAGIC && ver == SIM_VERSION && ps == PAGE && pages == npages ? 0 : -EFAULT;
}

/* One complete page record from the stream: check it against its digest
 * and install it, or remember that the stream is bad. */
static void rx_page(struct sim *s, const uint8_t *rec)
{
	uint32_t idx;
	uint64_t h;

	memcpy(&idx, rec + 4, 4);
	memcpy(&h, rec + 8, 8);
	if (idx >= s->npages) {
		s->rx_err = -EIO;
		return;
	}
	/* Checked and installed in one pass. A page whose digest does not
	 * match is in memory now, but the error is kept: RESUMING -> STOP
	 * refuses it and the device goes to ERROR, whose reset clears the
	 * memory, so the device never runs on it (nor on any page of this
	 * load: a refused stream is never partly used). */
	if (sim_digest_copy(s->mem + (uint64_t)idx * PAGE, rec + REC_HDR_LEN, PAGE, DIGEST_BASIS) != h) {
		s->rx_err = -EIO;
		return;
	}
	set_page_dg(s, idx, h);
	if (!s->rx_seen[idx]) {
		s->rx_seen[idx] = 1;
		s->rx_nseen++;
	}
}

/* How many bytes the record being assembled needs: the header, a tag, a
 * page record or the end record; 0 for an unknown tag. */
static size_t rx_need(const struct sim *s)
{
	uint32_t tag;

	if (!s->hdr_checked)
		return HDR_LEN;
	if (s->rx_have < 4)
		return 4;
	memcpy(&tag, s->rx_part, 4);
	return tag == TAG_PAGE ? REC_LEN : tag == TAG_END ? END_LEN : 0;
}

/* Parse what userspace wrote. Whole page records straight from its buffer
 * (the common case: the pump writes large aligned chunks), anything split
 * across writes through rx_part. Returns -EFAULT for a bad header (as mtty
 * does, on the write that completes it); every other fault is kept for
 * RESUMING -> STOP, where the kernel's drivers report it. */
static int rx_feed(struct sim *s, const uint8_t *p, size_t len)
{
	uint32_t tag;

	while (len && !s->rx_err) {
		size_t need, take;

		if (s->rx_ended) {
			s->rx_err = -EIO; /* bytes after the end record */
			break;
		}
		if (s->hdr_checked && s->rx_have == 0 && len >= REC_LEN) {
			memcpy(&tag, p, 4);
			if (tag == TAG_PAGE) {
				rx_page(s, p);
				p += REC_LEN;
				len -= REC_LEN;
				continue;
			}
		}
		need = rx_need(s);
		if (!need) {
			s->rx_err = -EIO;
			break;
		}
		take = need - s->rx_have < len ? need - s->rx_have : len;
		memcpy(s->rx_part + s->rx_have, p, take);
		s->rx_have += take;
		p += take;
		len -= take;
		if (s->rx_have < need || (s->hdr_checked && need == 4))
			continue;
		if (!s->hdr_checked) {
			s->hdr_checked = true;
			if (check_header(s->rx_part, s->npages) < 0) {
				s->rx_err = -EIO; /* nothing after it is parsed */
				return -EFAULT;
			}
		} else if (need == REC_LEN) {
			rx_page(s, s->rx_part);
		} else {
			memcpy(&s->rx_end_dg, s->rx_part + 8, 8);
			s->rx_ended = true;
		}
		s->rx_have = 0;
	}
	return 0;
}

/* RESUMING -> STOP: the pages were checked and installed as they arrived;
 * what is left is the stream's end. Short data is -EINVAL (as mtty); data
 * that does not verify is -EIO: a bad record, bytes after the end record,
 * a page never sent, or an end digest (over each page's last record's
 * digest, mixed with its index: page_digest_mix) that does not match. */
static int load(struct sim *s)
{
	if (s->rx_err)
		return s->rx_err;
	if (!s->rx_ended)
		return -EINVAL;
	if (s->rx_nseen != s->npages || s->dg_sum != s->rx_end_dg)
		return -EIO;
	s->st.loads++;
	return 0;
}

/* One arc, as a driver implements it. */
static int step(struct sim *s, uint32_t from, uint32_t to, int *new_fd)
{
	const uint32_t S = DEVMIG_STATE_STOP, R = DEVMIG_STATE_RUNNING, SC = DEVMIG_STATE_STOP_COPY,
		       RS = DEVMIG_STATE_RESUMING, RP = DEVMIG_STATE_RUNNING_P2P,
		       PC = DEVMIG_STATE_PRE_COPY, PP = DEVMIG_STATE_PRE_COPY_P2P;
	int r = 0;

	if (s->arc_fault && s->fault_from == from && s->fault_to == to) {
		if (s->fault_to_error) {
			end_session(s);
			set_st(s, DEVMIG_STATE_ERROR);
		}
		return -s->fault_err;
	}
	if (from == S && to == SC) {
		r = open_session(s, SESS_SAVE, new_fd);
		if (r == 0)
			r = append_header(s);
		if (r == 0)
			r = append_pages(s, true, UINT64_MAX);
		if (r == 0)
			r = append_end(s);
	} else if ((from == R && to == PC) || (from == RP && to == PP)) {
		r = open_session(s, SESS_SAVE, new_fd);
		/* Dirty tracking starts with the session: everything is in
		 * the initial data, only later writes are dirty. */
		memset(s->dirty, 0, s->npages);
		s->ndirty = 0;
		if (r == 0)
			r = append_header(s);
		if (r == 0)
			r = append_pages(s, true, UINT64_MAX);
		s->initial_end = s->appended;
	} else if ((from == PC || from == PP) && to == SC) {
		s->stop_lazy = true; /* the rest is made as it is read */
	} else if (from == S && to == RS) {
		r = open_session(s, SESS_RESUME, new_fd);
	} else if (from == RS && to == S) {
		r = load(s);
		end_session(s);
		if (r < 0) {
			set_st(s, DEVMIG_STATE_ERROR);
			return r;
		}
	} else if ((from == SC && to == S) || (from == PC && to == R) || (from == PP && to == RP)) {
		end_session(s);
	}
	if (r < 0) {
		if (*new_fd >= 0) {
			/* The session this arc opened dies with it. */
			close(*new_fd);
			end_session(s);
		}
		*new_fd = -1;
		return r;
	}
	set_st(s, to);
	return 0;
}

static int sim_set_state(struct devmig_dev *d, uint32_t to, int *data_fd)
{
	struct sim *s = d->priv;
	uint32_t path[DEVMIG_STATE_COUNT];
	int n, r = 0, fd = -1;

	*data_fd = -1;
	s->st.set_state_calls++;
	s->st.last_path_len = 0;
	workload(s);
	/* The kernel's checks: current and target supported, no blocked arc. */
	n = devmig_fsm_path(s->flags, s->state, to, path, DEVMIG_STATE_COUNT);
	if (n < 0)
		return -EINVAL;
	for (int i = 0; i < n; i++) {
		if (fd >= 0) {
			/* Only the final step may hand out a file (mlx5 WARNs
			 * and fails otherwise); the table never does this. */
			close(fd);
			return -EINVAL;
		}
		r = step(s, s->state, path[i], &fd);
		if (r < 0)
			return r;
		s->st.last_path[s->st.last_path_len++] = path[i];
	}
	*data_fd = fd;
	return 0;
}

static int sim_mig_flags(struct devmig_dev *d, uint64_t *flags)
{
	*flags = to_sim(d)->flags;
	return 0;
}

static int sim_get_state(struct devmig_dev *d, uint32_t *state)
{
	*state = to_sim(d)->state;
	return 0;
}

static int sim_reset(struct devmig_dev *d)
{
	struct sim *s = d->priv;

	s->st.reset_calls++;
	end_session(s);
	/* A reset device holds none of the state it had or was loading. */
	memset(s->mem, 0, s->npages * PAGE);
	memset(s->dirty, 0, s->npages);
	s->ndirty = 0;
	sim_bar_reset(&s->bar);
	set_st(s, DEVMIG_STATE_RUNNING);
	return 0;
}

static bool is_session_fd(struct sim *s, int fd)
{
	struct stat a, b;

	if (s->sess == SESS_NONE || fstat(fd, &a) < 0 || fstat(s->sess_fd, &b) < 0)
		return false;
	return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

static int sim_precopy_info(struct devmig_dev *d, int data_fd, uint64_t *initial, uint64_t *dirty)
{
	struct sim *s = d->priv;
	uint64_t off;

	if (!is_session_fd(s, data_fd))
		return -ENODEV;
	if (s->state != DEVMIG_STATE_PRE_COPY && s->state != DEVMIG_STATE_PRE_COPY_P2P)
		return -EINVAL;
	workload(s);
	off = reader_offset(s);
	/* Everything sent was read: queue what was dirtied since. */
	if (off >= s->appended && s->ndirty && append_dirty(s) < 0)
		return -EIO;
	*initial = s->initial_end > off ? s->initial_end - off : 0;
	*dirty = s->appended - (off > s->initial_end ? off : s->initial_end) + s->ndirty * REC_LEN;
	return 0;
}

static int sim_data_size(struct devmig_dev *d, uint64_t *bytes)
{
	struct sim *s = d->priv;
	uint64_t off;

	workload(s);
	if (s->sess == SESS_SAVE) {
		off = reader_offset(s);
		*bytes = (s->appended > off ? s->appended - off : 0) + s->ndirty * REC_LEN;
		if (!s->end_appended)
			*bytes += END_LEN;
	} else {
		*bytes = HDR_LEN + s->npages * REC_LEN + END_LEN;
	}
	return 0;
}

/* A read of the stream at the data fd's offset, which it advances, as
 * read() does. Copied from the view: read() on the memfd costs a page-cache
 * lookup, a reference and an LRU activation per 4 KiB page (the saved pages
 * were written once, so the read is their second use), about 0.1 CPU s per
 * GiB on top of the copy's own 0.12 here, and no driver's read has that
 * bookkeeping. The fd's content is the same, so a raw read() reads the same
 * stream. */
static ssize_t copy_out(struct sim *s, int data_fd, void *buf, size_t len)
{
	off_t o = lseek(data_fd, 0, SEEK_CUR);
	uint64_t off, n;

	if (o < 0)
		return -1;
	off = (uint64_t)o;
	if (!s->view || off > s->view_len || len > s->view_len - off)
		return read(data_fd, buf, len);
	n = off < s->appended ? s->appended - off : 0;
	if (n > len)
		n = len;
	memcpy(buf, s->view + off, (size_t)n);
	if (n && lseek(data_fd, (off_t)(off + n), SEEK_SET) < 0)
		return -1;
	return (ssize_t)n;
}

static ssize_t sim_data_read(struct devmig_dev *d, int data_fd, void *buf, size_t len)
{
	struct sim *s = d->priv;
	ssize_t n;

	if (!is_session_fd(s, data_fd))
		return -ENODEV;
	if (s->sess != SESS_SAVE)
		return -EINVAL;
	workload(s);
	if (s->stop_lazy && s->state == DEVMIG_STATE_STOP_COPY && reader_offset(s) >= s->appended) {
		/* Enough records for this read (whole batches), or the end. */
		uint64_t pages = (len / REC_LEN + BATCH_PAGES) / BATCH_PAGES * BATCH_PAGES;
		int r = s->ndirty ? append_pages(s, false, pages) : 0;

		if (r == 0 && !s->ndirty)
			r = append_end(s); /* with the last records, so it comes in the same read */
		if (r < 0)
			return r;
		if (s->end_appended)
			s->stop_lazy = false;
	}
	n = copy_out(s, data_fd, buf, len);
	if (n == 0 && len && s->end_enomsg &&
	    (s->state == DEVMIG_STATE_PRE_COPY || s->state == DEVMIG_STATE_PRE_COPY_P2P))
		return -ENOMSG;
	return n < 0 ? -errno : n;
}

static ssize_t sim_data_write(struct devmig_dev *d, int data_fd, const void *buf, size_t len)
{
	struct sim *s = d->priv;
	uint64_t off;
	int r;

	if (!is_session_fd(s, data_fd))
		return -ENODEV;
	if (s->sess != SESS_RESUME)
		return -EINVAL;
	off = s->rx_off;
	if (s->write_fault && off + len > s->write_fault_at) {
		if (off >= s->write_fault_at)
			return -s->write_fault_err;
		len = (size_t)(s->write_fault_at - off); /* accept what comes before */
	}
	r = rx_feed(s, buf, len);
	sim_digest_fence(); /* the pages installed are in memory before write() returns */
	if (r < 0)
		return r;
	s->rx_off += len;
	return (ssize_t)len;
}

static void sim_destroy(struct devmig_dev *d)
{
	struct sim *s = d->priv;

	end_session(s);
	sim_bar_destroy(&s->bar);
	free(s->mem);
	free(s->dirty);
	free(s->page_dg);
	free(s->batch);
	free(s);
}

static int sim_region_info(struct devmig_dev *d, uint32_t index, struct devmig_region_info *ri);

static int sim_dma_log_start(struct devmig_dev *d, const struct devmig_vfio_device_feature_dma_logging_range *r,
			     uint32_t n, uint64_t *page_size)
{
	return sim_bar_log_start(&((struct sim *)d->priv)->bar, r, n, page_size);
}

static int sim_dma_log_stop(struct devmig_dev *d)
{
	return sim_bar_log_stop(&((struct sim *)d->priv)->bar);
}

static int sim_dma_log_report(struct devmig_dev *d, uint64_t iova, uint64_t length, uint64_t page_size,
			      uint64_t *bitmap)
{
	return sim_bar_log_report(&((struct sim *)d->priv)->bar, iova, length, page_size, bitmap);
}

static const struct devmig_dev_ops sim_ops = {
	.kind = "sim",
	.region_info = sim_region_info,
	.dma_log_start = sim_dma_log_start,
	.dma_log_stop = sim_dma_log_stop,
	.dma_log_report = sim_dma_log_report,
	.mig_flags = sim_mig_flags,
	.get_state = sim_get_state,
	.set_state = sim_set_state,
	.reset = sim_reset,
	.precopy_info = sim_precopy_info,
	.data_size = sim_data_size,
	.data_read = sim_data_read,
	.data_write = sim_data_write,
	.destroy = sim_destroy,
};

int devmig_dev_open_sim(const struct devmig_sim_config *cfg, struct devmig_dev **out)
{
	static const struct devmig_sim_config defaults = { 0 };
	struct devmig_dev_desc desc = { .vendor_id = 0x1b36, .device_id = 0x0001, .driver = "devmig-sim" };
	struct sim *s;
	uint64_t size;
	int r;

	if (!cfg)
		cfg = &defaults;
	/* 1 MiB by default: 256 pages, big enough for multi-round PRE_COPY,
	 * small enough for thousands of test runs. */
	size = cfg->mem_size ? cfg->mem_size : (1u << 20);
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->bar.reeval_efd = -1;
	s->npages = (size + PAGE - 1) / PAGE;
	if (s->npages > MAX_PAGES) {
		free(s);
		return -EINVAL;
	}
	s->flags = cfg->flags ? cfg->flags : (DEVMIG_MIG_STOP_COPY | DEVMIG_MIG_P2P | DEVMIG_MIG_PRE_COPY);
	s->dirty_per_mib = cfg->dirty_pages_per_mib;
	s->end_enomsg = cfg->precopy_end_enomsg != 0;
	s->rng = cfg->seed ? cfg->seed : 0x9e3779b97f4a7c15ull; /* non-zero (xorshift's fixed point is 0): 2^64 / golden ratio */
	set_st(s, DEVMIG_STATE_RUNNING);
	s->sess_fd = -1;
	/* Page-aligned: a loaded page is written with 64-byte aligned
	 * streaming stores (sim_digest_copy). */
	if (posix_memalign((void **)&s->mem, PAGE, s->npages * PAGE) != 0)
		s->mem = NULL;
	s->dirty = calloc(s->npages, 1);
	s->page_dg = calloc(s->npages, sizeof(*s->page_dg));
	s->batch = malloc(BATCH_PAGES * REC_LEN);
	if (!s->mem || !s->dirty || !s->page_dg || !s->batch ||
	    sim_bar_init(&s->bar, cfg->guest_mem_size, DEVMIG_STATE_RUNNING) < 0) {
		free(s->mem);
		free(s->dirty);
		free(s->page_dg);
		free(s->batch);
		sim_bar_destroy(&s->bar);
		free(s);
		return -ENOMEM;
	}
	/* Memory starts with a seed-derived pattern, so two devices with
	 * different seeds never hold the same state by accident. */
	for (uint64_t i = 0; i < s->npages * PAGE / 8; i++) {
		uint64_t v = rng_next(s);

		memcpy(s->mem + i * 8, &v, 8);
	}
	if (cfg->desc.driver[0] || cfg->desc.vendor_id || cfg->desc.device_id)
		desc = cfg->desc;
	r = devmig_dev_init(&sim_ops, s, -1, &desc, out);
	if (r < 0)
		sim_destroy(&(struct devmig_dev){ .priv = s });
	return r;
}

int devmig_sim_fail_arc(struct devmig_dev *d, uint32_t from, uint32_t to, int err, int end_in_error)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	if (from >= DEVMIG_STATE_COUNT || to >= DEVMIG_STATE_COUNT || err <= 0)
		return -EINVAL;
	s->arc_fault = true;
	s->fault_from = from;
	s->fault_to = to;
	s->fault_err = err;
	s->fault_to_error = end_in_error;
	return 0;
}

int devmig_sim_fail_write(struct devmig_dev *d, uint64_t offset, int err)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	if (err <= 0)
		return -EINVAL;
	s->write_fault = true;
	s->write_fault_at = offset;
	s->write_fault_err = err;
	return 0;
}

int devmig_sim_corrupt(struct devmig_dev *d, uint64_t offset)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	s->corrupt = true;
	s->corrupt_at = offset;
	return 0;
}

int devmig_sim_clear_faults(struct devmig_dev *d)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	s->arc_fault = s->write_fault = s->corrupt = false;
	return 0;
}

int devmig_sim_external_set_state(struct devmig_dev *d, uint32_t to)
{
	int fd = -1, r;

	if (!to_sim(d))
		return -ENODEV;
	r = sim_set_state(d, to, &fd);
	if (fd >= 0)
		close(fd);
	return r;
}

int devmig_sim_touch(struct devmig_dev *d, uint64_t page)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	if (page >= s->npages)
		return -EINVAL;
	if (!running(s->state))
		return -EBUSY; /* a stopped device changes nothing */
	touch(s, page);
	return 0;
}

int devmig_sim_stats(struct devmig_dev *d, struct devmig_sim_stats *st)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	*st = s->st;
	return devmig_sim_bar_stats(d, st);
}

int devmig_sim_bar_stats(struct devmig_dev *d, struct devmig_sim_stats *st)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	pthread_mutex_lock(&s->bar.mu);
	st->missed_traps = s->bar.missed_traps;
	st->dma_ops = s->bar.dma_ops;
	st->dma_pages = s->bar.dma_pages;
	st->dma_deferred = s->bar.dma_deferred;
	pthread_mutex_unlock(&s->bar.mu);
	return 0;
}

int devmig_sim_bar_access(struct devmig_dev *d, int mapped, int write, uint64_t off, uint64_t *val)
{
	struct sim *s = to_sim(d);

	return s ? sim_bar_access(&s->bar, mapped, write, off, val) : -ENODEV;
}

int devmig_sim_reeval_eventfd(struct devmig_dev *d)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	return s->bar.reeval_efd >= 0 ? s->bar.reeval_efd : s->bar.reeval_err;
}

int devmig_sim_guest_mem(struct devmig_dev *d, uint8_t **mem, uint64_t *size)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	*mem = s->bar.guest;
	*size = s->bar.guest_pages * PAGE;
	return 0;
}

int devmig_sim_dirty_take(struct devmig_dev *d, int which, uint64_t *bitmap, uint64_t nwords)
{
	struct sim *s = to_sim(d);
	uint8_t *src;

	if (!s)
		return -ENODEV;
	if (which != DEVMIG_SIM_DIRTY_DMA && which != DEVMIG_SIM_DIRTY_LOGGED)
		return -EINVAL;
	if (nwords < (s->bar.guest_pages + 63) / 64)
		return -ENOSPC;
	memset(bitmap, 0, nwords * 8);
	pthread_mutex_lock(&s->bar.mu);
	src = which == DEVMIG_SIM_DIRTY_DMA ? s->bar.dma_written : s->bar.trap_logged;
	for (uint64_t p = 0; p < s->bar.guest_pages; p++)
		if (src[p]) {
			bitmap[p / 64] |= 1ULL << (p % 64);
			src[p] = 0;
		}
	pthread_mutex_unlock(&s->bar.mu);
	return 0;
}

/* The BAR's region info, its sparse-mmap capability as the device states
 * it now. */
static int sim_region_info(struct devmig_dev *d, uint32_t index, struct devmig_region_info *ri)
{
	struct sim *s = d->priv;
	struct devmig_vfio_region_sparse_mmap_area a[2];
	uint32_t n;

	if (index != DEVMIG_SIM_BAR_INDEX)
		return -EINVAL;
	n = sim_bar_sparse(&s->bar, a);
	memset(ri, 0, sizeof(*ri));
	ri->index = index;
	ri->flags = DEVMIG_VFIO_REGION_INFO_FLAG_READ | DEVMIG_VFIO_REGION_INFO_FLAG_WRITE |
		    DEVMIG_VFIO_REGION_INFO_FLAG_MMAP | DEVMIG_VFIO_REGION_INFO_FLAG_CAPS;
	ri->size = DEVMIG_SIM_BAR_SIZE;
	ri->has_sparse = 1;
	ri->nr_sparse = n;
	ri->sparse = malloc(n * sizeof(*ri->sparse));
	if (!ri->sparse)
		return -ENOMEM;
	memcpy(ri->sparse, a, n * sizeof(*a));
	return 0;
}

int devmig_sim_mem_digest(struct devmig_dev *d, uint64_t *digest)
{
	struct sim *s = to_sim(d);

	if (!s)
		return -ENODEV;
	*digest = sim_digest(s->mem, s->npages * PAGE, DIGEST_BASIS);
	return 0;
}
