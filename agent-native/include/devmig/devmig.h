/* devmig native core: public API.
 *
 * Every function that can fail returns 0 or a positive count on success and
 * -errno on failure, like the kernel interfaces it wraps. State names are the
 * kernel's own (enum vfio_device_mig_state), so logs, protos and CRDs all
 * speak the same words.
 */
#ifndef DEVMIG_DEVMIG_H
#define DEVMIG_DEVMIG_H

#include <stddef.h>
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


/* Migration flags reported by VFIO_DEVICE_FEATURE_MIGRATION. */
#define DEVMIG_MIG_STOP_COPY (1u << 0)
#define DEVMIG_MIG_P2P (1u << 1)
#define DEVMIG_MIG_PRE_COPY (1u << 2)

/* ---- the arc table (fsm.c) ----
 * devmig's own copy of the kernel's vfio_from_fsm_table, so a request is
 * validated, and its path known, before any ioctl is issued. */

/* Does a device with `flags` support `state`? ERROR never counts: it can be
 * neither requested nor passed through. */
int devmig_state_supported(uint64_t flags, uint32_t state);
/* The path the kernel takes from `from` to `to` on a device with `flags`:
 * fills path[0..n) with the states entered after `from` (path[n-1] == to)
 * and returns n (0 when from == to), or -EINVAL when the kernel refuses the
 * request (state unsupported, from == ERROR, or a blocked arc such as
 * STOP_COPY -> PRE_COPY). `max` must be at least DEVMIG_STATE_COUNT. */
int devmig_fsm_path(uint64_t flags, uint32_t from, uint32_t to, uint32_t *path, int max);
/* Does the single arc from -> to (a direct step) hand out a new data fd? */
int devmig_arc_opens_data_fd(uint32_t from, uint32_t to);
/* Is `state` one of the saving states (PRE_COPY, PRE_COPY_P2P, STOP_COPY)? */
int devmig_state_is_saving(uint32_t state);

/* ---- devices (dev.c) ----
 * A migratable device: a real VFIO device fd or the simulated device,
 * chosen at open. Everything above this layer goes through it. A device is
 * used by one thread at a time. */
struct devmig_dev;

/* What the peer has to match before it accepts a stream. */
struct devmig_dev_desc {
	uint16_t vendor_id;
	uint16_t device_id;
	char driver[32]; /* NUL-terminated kernel driver name */
};

/* Log sink: one line, no trailing newline. */
typedef void (*devmig_log_fn)(void *ctx, const char *line);

/* Take a VFIO device fd (dup'ed: the caller keeps its own). Reads the
 * migration flags and the current state. -ENOTTY/-EINVAL: not migratable. */
int devmig_dev_open_vfio(int device_fd, const struct devmig_dev_desc *desc, struct devmig_dev **out);
void devmig_dev_close(struct devmig_dev *d);
/* Route this device's log lines; NULL restores the default (stderr). */
void devmig_dev_set_log(struct devmig_dev *d, devmig_log_fn fn, void *ctx);
const struct devmig_dev_desc *devmig_dev_desc(const struct devmig_dev *d);

/* The migration flags read at open (DEVMIG_MIG_*). */
uint64_t devmig_dev_flags(const struct devmig_dev *d);
/* Ask the device again (VFIO_DEVICE_FEATURE_MIGRATION GET). */
int devmig_probe_flags(struct devmig_dev *d, uint64_t *flags);
/* The state as the device reports it now; also refreshes the recorded one. */
int devmig_get_state(struct devmig_dev *d, uint32_t *state);
/* The state last confirmed by the device, without asking it. */
uint32_t devmig_dev_state(const struct devmig_dev *d);

/* The one state setter. Validates `to` against the arc table for this
 * device (a refused request returns -EINVAL before any ioctl; a request
 * for PRE_COPY or PRE_COPY_P2P first reads the actual state, unless the
 * record already says STOP_COPY, because STOP_COPY -> PRE_COPY* hangs
 * unfixed kernels and the record can be stale), logs
 * "FROM -> TO", issues the request and records the new state only once the
 * device accepted it. On failure it reads the actual state, tries
 * `recover_to` from there (skipped when recover_to is DEVMIG_STATE_ERROR),
 * and resets the device if that fails as well; the return value is the
 * original -errno. A poisoned device (a resuming write failed) refuses
 * every target but ERROR with -EIO until reset.
 * *data_fd_out (may be NULL) receives the data fd of the session the
 * request opened or continues (owned by the device, valid until the
 * session ends), or -1. */
int devmig_set_state(struct devmig_dev *d, uint32_t to, uint32_t recover_to, int *data_fd_out);
/* VFIO_DEVICE_RESET: the device is RUNNING afterwards, any data session is
 * closed, and poisoning is cleared. */
int devmig_reset(struct devmig_dev *d);
/* Mark the device unfit to leave RESUMING (see devmig_set_state). */
void devmig_dev_poison(struct devmig_dev *d);
int devmig_dev_poisoned(const struct devmig_dev *d);

/* ---- the data fd (data.c) ---- */
struct devmig_precopy_info {
	uint64_t initial_bytes;
	uint64_t dirty_bytes;
};
/* The data fd of the open session, or -1. */
int devmig_data_fd(const struct devmig_dev *d);
/* One read from the data fd. Returns the byte count (>0); 0 at the end of
 * the stream in STOP_COPY; -ENOMSG at a temporary end in PRE_COPY and
 * PRE_COPY_P2P (the kernel reports it as -ENOMSG, some drivers as a read of
 * 0: both come back as -ENOMSG); -errno otherwise. EINTR is retried. */
long devmig_data_read(struct devmig_dev *d, void *buf, size_t len);
/* Read until the end (permanent or temporary), handing each chunk to
 * `sink` (which returns 0 or -errno). Returns 1 at the permanent end
 * (STOP_COPY drained), 0 at a temporary end (PRE_COPY), or -errno.
 * *total (may be NULL) is increased by the bytes read. */
typedef int (*devmig_sink_fn)(void *ctx, const void *buf, size_t len);
int devmig_data_drain(struct devmig_dev *d, devmig_sink_fn sink, void *ctx, uint64_t *total);
/* VFIO_MIG_GET_PRECOPY_INFO; -EINVAL outside PRE_COPY / PRE_COPY_P2P. */
int devmig_precopy_info(struct devmig_dev *d, struct devmig_precopy_info *info);
/* Is PRE_COPY done for now: the fd is at a temporary end and the initial
 * data has all been read (initial_bytes == 0)? 1 yes, 0 no, -errno. The
 * dirty bytes it leaves are *dirty_left (may be NULL). */
int devmig_precopy_initial_done(struct devmig_dev *d, uint64_t *dirty_left);
/* VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: bytes STOP_COPY still has to send. */
int devmig_data_size(struct devmig_dev *d, uint64_t *bytes);
/* Write all of buf into the data fd of a RESUMING device. Any failure
 * poisons the device (see devmig_set_state). Returns len or -errno. */
long devmig_data_write(struct devmig_dev *d, const void *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
