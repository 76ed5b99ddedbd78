/* The migration state machine: devmig's copy of the kernel's arc table and
 * the one function that changes a device's state. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

#define E DEVMIG_STATE_ERROR
#define S DEVMIG_STATE_STOP
#define R DEVMIG_STATE_RUNNING
#define SC DEVMIG_STATE_STOP_COPY
#define RS DEVMIG_STATE_RESUMING
#define RP DEVMIG_STATE_RUNNING_P2P
#define PC DEVMIG_STATE_PRE_COPY
#define PP DEVMIG_STATE_PRE_COPY_P2P

/* next[from][to]: the first step from `from` towards `to` on a device that
 * has every feature. Shortest paths that never pass through a saving state
 * (PRE_COPY, PRE_COPY_P2P, STOP_COPY) as an intermediate; E marks an arc
 * the uAPI forbids (STOP_COPY -> PRE_COPY(_P2P), anything from ERROR).
 * Same semantics as the kernel's vfio_from_fsm_table. */
static const uint8_t next_table[DEVMIG_STATE_COUNT][DEVMIG_STATE_COUNT] = {
	/*          to: E  S   R   SC  RS  RP  PC  PP */
	[S] = { [E] = E, [S] = S, [R] = RP, [SC] = SC, [RS] = RS, [RP] = RP, [PC] = RP, [PP] = RP },
	[R] = { [E] = E, [S] = RP, [R] = R, [SC] = RP, [RS] = RP, [RP] = RP, [PC] = PC, [PP] = RP },
	[SC] = { [E] = E, [S] = S, [R] = S, [SC] = SC, [RS] = S, [RP] = S, [PC] = E, [PP] = E },
	[RS] = { [E] = E, [S] = S, [R] = S, [SC] = S, [RS] = RS, [RP] = S, [PC] = S, [PP] = S },
	[RP] = { [E] = E, [S] = S, [R] = R, [SC] = S, [RS] = S, [RP] = RP, [PC] = R, [PP] = PP },
	[PC] = { [E] = E, [S] = R, [R] = R, [SC] = PP, [RS] = R, [RP] = R, [PC] = PC, [PP] = PP },
	[PP] = { [E] = E, [S] = RP, [R] = RP, [SC] = SC, [RS] = RP, [RP] = RP, [PC] = PC, [PP] = PP },
	[E] = { E, E, E, E, E, E, E, E },
};

/* Flags a device must report for each state to exist on it. */
static const uint64_t state_needs[DEVMIG_STATE_COUNT] = {
	[S] = DEVMIG_MIG_STOP_COPY,
	[R] = DEVMIG_MIG_STOP_COPY,
	[SC] = DEVMIG_MIG_STOP_COPY,
	[RS] = DEVMIG_MIG_STOP_COPY,
	[RP] = DEVMIG_MIG_STOP_COPY | DEVMIG_MIG_P2P,
	[PC] = DEVMIG_MIG_STOP_COPY | DEVMIG_MIG_PRE_COPY,
	[PP] = DEVMIG_MIG_STOP_COPY | DEVMIG_MIG_P2P | DEVMIG_MIG_PRE_COPY,
};

int devmig_state_supported(uint64_t flags, uint32_t state)
{
	if (state >= DEVMIG_STATE_COUNT || state == E)
		return 0;
	return (flags & state_needs[state]) == state_needs[state];
}

int devmig_state_is_saving(uint32_t state)
{
	return state == PC || state == PP || state == SC;
}

int devmig_arc_opens_data_fd(uint32_t from, uint32_t to)
{
	return (from == S && to == SC) || (from == R && to == PC) || (from == RP && to == PP) ||
	       (from == S && to == RS);
}

/* Does the arc end the data session (the device disables the fd)? */
static int arc_ends_session(uint32_t from, uint32_t to)
{
	return (from == SC && to == S) || (from == RS && to == S) || (from == PC && to == R) ||
	       (from == PP && to == RP);
}

int devmig_fsm_path(uint64_t flags, uint32_t from, uint32_t to, uint32_t *path, int max)
{
	int n = 0;

	if (!devmig_state_supported(flags, from) || !devmig_state_supported(flags, to))
		return -EINVAL;
	while (from != to) {
		uint32_t next = next_table[from][to];

		/* Skip states this device lacks, as the kernel does; unlike
		 * the kernel before its 2026 fix, stop at ERROR instead of
		 * spinning on it. */
		while (next != E && !devmig_state_supported(flags, next))
			next = next_table[next][to];
		if (next == E || n >= max)
			return -EINVAL;
		path[n++] = next;
		from = next;
	}
	return n;
}

/* A state's kernel name, "?" for a value out of range (logs only). */
static const char *sname(uint32_t s)
{
	return devmig_state_name(s) ? devmig_state_name(s) : "?";
}

/* "RUNNING -> STOP_COPY (via RUNNING_P2P, STOP)" */
static void format_path(char *buf, size_t sz, uint32_t from, const uint32_t *path, int n)
{
	int off = snprintf(buf, sz, "%s -> %s", devmig_state_name(from),
			   n > 0 ? devmig_state_name(path[n - 1]) : devmig_state_name(from));

	for (int i = 0; i + 1 < n && off > 0 && (size_t)off < sz; i++)
		off += snprintf(buf + off, sz - (size_t)off, "%s%s", i ? ", " : " (via ",
				devmig_state_name(path[i]));
	if (n > 1 && off > 0 && (size_t)off < sz)
		snprintf(buf + off, sz - (size_t)off, ")");
}

/* Keep the session fd consistent with a state change the device accepted
 * along `path` from `from`: an arc that ends the session closes the old fd;
 * a fresh fd from the device becomes the session. */
static void track_session(struct devmig_dev *d, uint32_t from, const uint32_t *path, int n, int new_fd)
{
	for (int i = 0; i < n; i++) {
		if (arc_ends_session(from, path[i]))
			devmig_dev_end_session(d);
		from = path[i];
	}
	if (new_fd >= 0) {
		devmig_dev_end_session(d);
		d->data_fd = new_fd;
	}
}

/* Issue one request the table allows. Records the state only on success. */
static int request(struct devmig_dev *d, uint32_t to, const char *why, bool *issued)
{
	uint32_t path[DEVMIG_STATE_COUNT];
	/* A path has at most 4 steps of names up to 12 characters, plus
	 * separators: under 100 bytes. */
	char desc[160];
	int fd = -1, n, r;
	uint32_t from = d->state;

	*issued = false;
	if ((to == PC || to == PP) && from != SC) {
		uint32_t actual;

		/* The one request that hangs unfixed kernels (STOP_COPY ->
		 * PRE_COPY*) must be judged from the state the device is in,
		 * not from our record: the VMM holds a duplicate fd, and a
		 * reset (FLR, AER) moves the device too. One GET is cheap next
		 * to a soft lockup. From a recorded STOP_COPY there is nothing
		 * to ask: the request is refused without any ioctl. */
		if (d->ops->get_state(d, &actual) == 0 && actual != from) {
			devmig_logf(d, "device is in %s, not %s as recorded", sname(actual), sname(from));
			d->state = from = actual;
			if (!devmig_state_is_saving(actual) && actual != RS)
				devmig_dev_end_session(d);
		}
	}
	n = devmig_fsm_path(d->flags, from, to, path, DEVMIG_STATE_COUNT);
	if (n < 0) {
		devmig_logf(d, "%s -> %s refused: not an allowed transition for this device%s",
			    sname(from), sname(to), why);
		return -EINVAL;
	}
	if (n == 0)
		return 0;
	format_path(desc, sizeof(desc), from, path, n);
	devmig_logf(d, "%s%s", desc, why);
	*issued = true;
	r = d->ops->set_state(d, to, &fd);
	if (r < 0) {
		devmig_logf(d, "%s failed: %s", desc, strerror(-r));
		return r;
	}
	track_session(d, from, path, n, fd);
	d->state = to;
	return 0;
}

int devmig_reset(struct devmig_dev *d)
{
	int r;

	devmig_logf(d, "%s -> RUNNING (reset)", sname(d->state));
	r = d->ops->reset(d);
	if (r < 0) {
		uint32_t s;

		devmig_logf(d, "reset failed: %s", strerror(-r));
		if (d->ops->get_state(d, &s) == 0)
			d->state = s;
		return r;
	}
	/* The kernel disables every open data fd on reset. */
	devmig_dev_end_session(d);
	d->state = DEVMIG_STATE_RUNNING;
	d->poisoned = false;
	/* A log kept across a reset cannot be trusted: the caller starts
	 * logging again (the simulated device ends it on reset). */
	d->dma_logging = false;
	return 0;
}

int devmig_set_state(struct devmig_dev *d, uint32_t to, uint32_t recover_to, int *data_fd_out)
{
	uint32_t actual;
	bool issued;
	int r;

	if (data_fd_out)
		*data_fd_out = -1;
	if (d->poisoned) {
		devmig_logf(d, "%s -> %s refused: resuming data was not accepted; reset first",
			    sname(d->state), sname(to));
		return -EIO;
	}
	r = request(d, to, "", &issued);
	if (r == 0) {
		if (data_fd_out && (devmig_state_is_saving(to) || to == DEVMIG_STATE_RESUMING))
			*data_fd_out = d->data_fd;
		return 0;
	}
	if (!issued)
		return r; /* refused by the table: nothing was issued, nothing moved */

	/* The device may be anywhere on the path, ERROR included. */
	if (d->ops->get_state(d, &actual) < 0) {
		devmig_reset(d);
		return r;
	}
	if (actual != d->state)
		devmig_logf(d, "device is in %s after the failure", sname(actual));
	d->state = actual;
	if (!devmig_state_is_saving(actual) && actual != DEVMIG_STATE_RESUMING)
		devmig_dev_end_session(d);
	/* Only reset leaves ERROR, whatever recovery was asked for. */
	if (actual == recover_to && actual != DEVMIG_STATE_ERROR)
		return r;
	if (request(d, recover_to, " (recovery)", &issued) < 0)
		devmig_reset(d);
	return r;
}
