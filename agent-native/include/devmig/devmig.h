/* devmig native core: public API.
 *
 * Every function that can fail returns 0 or a positive count on success and
 * -errno on failure, like the kernel interfaces it wraps. State names are the
 * kernel's own (enum vfio_device_mig_state), so logs, protos and CRDs all
 * speak the same words.
 */
#ifndef DEVMIG_DEVMIG_H
#define DEVMIG_DEVMIG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Version of this library; the Python binding and the agent's version
 * handshake report it. */
#define DEVMIG_VERSION_MAJOR 0
#define DEVMIG_VERSION_MINOR 1
#define DEVMIG_VERSION_PATCH 0
const char *devmig_version(void);

/* The VFIO migration uAPI v2 device states, values as the kernel defines
 * them (include/uapi/linux/vfio.h, enum vfio_device_mig_state). */
enum devmig_mig_state {
	DEVMIG_STATE_ERROR = 0,
	DEVMIG_STATE_STOP = 1,
	DEVMIG_STATE_RUNNING = 2,
	DEVMIG_STATE_STOP_COPY = 3,
	DEVMIG_STATE_RESUMING = 4,
	DEVMIG_STATE_RUNNING_P2P = 5,
	DEVMIG_STATE_PRE_COPY = 6,
	DEVMIG_STATE_PRE_COPY_P2P = 7,
};
#define DEVMIG_STATE_COUNT 8

/* Kernel name of a state ("STOP_COPY"), or NULL for a value out of range. */
const char *devmig_state_name(uint32_t state);
/* Parse a kernel state name; returns the state value or -EINVAL. */
int devmig_state_from_name(const char *name);

#ifdef __cplusplus
}
#endif
#endif
