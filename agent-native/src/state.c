#include <errno.h>
#include <string.h>

#include "devmig/devmig.h"

/* Indexed by enum devmig_mig_state; the kernel's spelling. */
static const char *const state_names[DEVMIG_STATE_COUNT] = {
	[DEVMIG_STATE_ERROR] = "ERROR",
	[DEVMIG_STATE_STOP] = "STOP",
	[DEVMIG_STATE_RUNNING] = "RUNNING",
	[DEVMIG_STATE_STOP_COPY] = "STOP_COPY",
	[DEVMIG_STATE_RESUMING] = "RESUMING",
	[DEVMIG_STATE_RUNNING_P2P] = "RUNNING_P2P",
	[DEVMIG_STATE_PRE_COPY] = "PRE_COPY",
	[DEVMIG_STATE_PRE_COPY_P2P] = "PRE_COPY_P2P",
};

const char *devmig_state_name(uint32_t state)
{
	return state < DEVMIG_STATE_COUNT ? state_names[state] : NULL;
}

int devmig_state_from_name(const char *name)
{
	if (!name)
		return -EINVAL;
	for (int i = 0; i < DEVMIG_STATE_COUNT; i++)
		if (strcmp(name, state_names[i]) == 0)
			return i;
	return -EINVAL;
}
