/* The arc table: every path the reference (vfio-migration.md §1.6) lists,
 * the flag-set variants, the refused requests and the data-fd arcs. */
#include <errno.h>

#include "check.h"
#include "devmig/devmig.h"

#define SCF DEVMIG_MIG_STOP_COPY
#define P2P DEVMIG_MIG_P2P
#define PRE DEVMIG_MIG_PRE_COPY
#define ALL (SCF | P2P | PRE)

enum { E, S, R, SC, RS, RP, PC, PP };

/* path(flags, from, to) == the listed states, in order. */
static int path_is(uint64_t flags, uint32_t from, uint32_t to, int n, const uint32_t *want)
{
	uint32_t got[DEVMIG_STATE_COUNT];
	int k = devmig_fsm_path(flags, from, to, got, DEVMIG_STATE_COUNT);

	if (k != n) {
		fprintf(stderr, "%s -> %s: %d steps, want %d\n", devmig_state_name(from),
			devmig_state_name(to), k, n);
		return 0;
	}
	for (int i = 0; i < n; i++)
		if (got[i] != want[i])
			return 0;
	return 1;
}
#define PATH(flags, from, to, ...)                                                   \
	CHECK(path_is(flags, from, to, sizeof((uint32_t[]){ __VA_ARGS__ }) / sizeof(uint32_t), \
		      (uint32_t[]){ __VA_ARGS__ }))

int main(void)
{
	uint32_t p[DEVMIG_STATE_COUNT];

	/* §1.6, all features. */
	PATH(ALL, R, SC, RP, S, SC);
	PATH(ALL, R, RS, RP, S, RS);
	PATH(ALL, PC, SC, PP, SC);
	PATH(ALL, PC, S, R, RP, S);
	PATH(ALL, PP, S, RP, S);
	PATH(ALL, RS, R, S, RP, R);
	PATH(ALL, RS, PP, S, RP, PP);
	PATH(ALL, SC, R, S, RP, R);
	PATH(ALL, S, PC, RP, R, PC);
	PATH(ALL, RP, PC, R, PC);
	/* Not through PRE_COPY: the data fd must come from the last arc. */
	PATH(ALL, R, PP, RP, PP);
	PATH(ALL, PP, R, RP, R);
	PATH(ALL, PC, RP, R, RP);
	/* Without P2P the P2P states drop out. */
	PATH(SCF, R, S, S);
	PATH(SCF, R, SC, S, SC);
	PATH(SCF | PRE, PC, SC, SC);
	PATH(SCF | PRE, S, PC, R, PC);
	PATH(SCF | PRE, PC, S, R, S);
	PATH(SCF | P2P, R, SC, RP, S, SC);
	/* Nothing to do. */
	CHECK(devmig_fsm_path(ALL, R, R, p, DEVMIG_STATE_COUNT) == 0);

	/* Refused: the blocked arcs, ERROR either side, missing features. */
	CHECK(devmig_fsm_path(ALL, SC, PC, p, DEVMIG_STATE_COUNT) == -EINVAL);
	CHECK(devmig_fsm_path(ALL, SC, PP, p, DEVMIG_STATE_COUNT) == -EINVAL);
	CHECK(devmig_fsm_path(SCF | PRE, SC, PC, p, DEVMIG_STATE_COUNT) == -EINVAL);
	CHECK(devmig_fsm_path(ALL, E, R, p, DEVMIG_STATE_COUNT) == -EINVAL);
	CHECK(devmig_fsm_path(ALL, R, E, p, DEVMIG_STATE_COUNT) == -EINVAL);
	CHECK(devmig_fsm_path(SCF, R, PC, p, DEVMIG_STATE_COUNT) == -EINVAL);
	CHECK(devmig_fsm_path(SCF | PRE, R, PP, p, DEVMIG_STATE_COUNT) == -EINVAL);
	CHECK(devmig_fsm_path(SCF, R, RP, p, DEVMIG_STATE_COUNT) == -EINVAL);
	CHECK(devmig_fsm_path(P2P | PRE, R, S, p, DEVMIG_STATE_COUNT) == -EINVAL); /* no STOP_COPY */
	CHECK(devmig_fsm_path(ALL, R, 8, p, DEVMIG_STATE_COUNT) == -EINVAL);

	/* Every path: a saving state is an intermediate only for a path that
	 * starts in the saving group (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY). */
	for (uint64_t fl = 1; fl < 8; fl += 2)
		for (uint32_t a = 1; a < 8; a++)
			for (uint32_t b = 1; b < 8; b++) {
				int n = devmig_fsm_path(fl, a, b, p, DEVMIG_STATE_COUNT);

				for (int i = 0; i + 1 < n; i++) {
					if (!devmig_state_is_saving(a) && devmig_state_is_saving(p[i]))
						fprintf(stderr, "flags %llu: %s -> %s via %s\n",
							(unsigned long long)fl, devmig_state_name(a),
							devmig_state_name(b), devmig_state_name(p[i]));
					CHECK(devmig_state_is_saving(a) || !devmig_state_is_saving(p[i]));
				}
				for (int i = 0; i < n; i++)
					CHECK(devmig_state_supported(fl, p[i]));
				if (n > 0)
					CHECK(p[n - 1] == b);
				/* Only the final step may open a data fd: the fd
				 * the request returns comes from it. */
				for (int i = 0; i + 1 < n; i++)
					CHECK(!devmig_arc_opens_data_fd(i ? p[i - 1] : a, p[i]));
			}

	CHECK(devmig_arc_opens_data_fd(S, SC) && devmig_arc_opens_data_fd(R, PC) &&
	      devmig_arc_opens_data_fd(RP, PP) && devmig_arc_opens_data_fd(S, RS));
	CHECK(!devmig_arc_opens_data_fd(PC, SC) && !devmig_arc_opens_data_fd(PP, SC) &&
	      !devmig_arc_opens_data_fd(PC, PP));
	CHECK(devmig_state_supported(ALL, PP) && !devmig_state_supported(SCF | PRE, PP));
	CHECK(!devmig_state_supported(ALL, E));
	CHECK_DONE();
}
