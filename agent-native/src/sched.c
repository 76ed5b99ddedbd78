#include <sched.h>

#include "internal.h"

/* The data path's bulk threads (the pump, its sender, a stream's loader)
 * run as SCHED_BATCH. The policy keeps the thread's weight (same nice,
 * same share of the CPU); it only stops a woken bulk thread from
 * preempting the thread running on its CPU. A transfer's threads wake
 * each other about once per frame (1 MiB): with both ends of a transfer
 * on two CPUs, each wake-up preempted the pump mid-frame, and the
 * threads took turns with a CPU idle between them. As SCHED_BATCH they
 * ran 10% faster on average over twenty 1 GiB transfers, the builds with
 * and without taking turns, and with less spread (docs/benchmarks.md,
 * "Bulk threads").
 *
 * Only a SCHED_OTHER thread is changed: a real-time or idle policy set by
 * whoever runs the agent is theirs to keep. A refusal (a seccomp filter)
 * leaves the thread as it was: this is a hint, not a requirement. */
int devmig_sched_bulk_begin(void)
{
	struct sched_param sp = { 0 };

	if (sched_getscheduler(0) != SCHED_OTHER)
		return -1;
	if (sched_setscheduler(0, SCHED_BATCH, &sp) < 0)
		return -1;
	return SCHED_OTHER;
}

void devmig_sched_bulk_end(int saved)
{
	struct sched_param sp = { 0 };

	if (saved < 0)
		return;
	(void)sched_setscheduler(0, saved, &sp);
}
