/* The source side of a migration's data path: a thread that streams a
 * device's state, in devmig's stream format, to an fd (a socket to the
 * target agent), from PRE_COPY through STOP_COPY.
 *
 * While the device is in PRE_COPY the pump sends what the device has, then
 * waits a round interval (or for a request) and sends what became dirty,
 * round after round, keeping counters the agent reports as progress. When
 * asked to stop-and-copy it moves the device to STOP_COPY itself (through
 * the one state setter, recovering to RUNNING), sends the rest and the
 * trailer, and ends. The pump thread is the only user of the device while
 * it runs; state changes the caller needs meanwhile (PRE_COPY_P2P for a
 * multi-device VM, STOP_COPY) are requests the thread carries out between
 * reads, and the request returns once the device has made them.
 *
 * A second thread writes the stream to the fd: the pump thread reads the
 * device into one of two buffers and checksums (and seals) it while the
 * frame of the other is still being written, so the device read and the
 * crypto run beside the socket's copy. A round counts as complete, and the
 * pump as done, only once everything queued is written.
 *
 * Every function returns 0 or -errno unless it says otherwise. */
#ifndef DEVMIG_PUMP_H
#define DEVMIG_PUMP_H

#include <stdint.h>

#include "devmig/devmig.h"

#ifdef __cplusplus
extern "C" {
#endif

struct devmig_pump;

struct devmig_pump_progress {
	uint64_t bytes_sent;     /* device payload bytes written so far */
	uint64_t rounds;         /* pre-copy rounds completed */
	uint64_t initial_bytes;  /* last PRECOPY_INFO initial_bytes */
	uint64_t dirty_bytes;    /* last PRECOPY_INFO dirty_bytes */
	uint64_t throughput_bps; /* payload bytes/s over the last window */
	uint64_t dirty_rate_bps; /* newly dirty bytes/s over the last window */
	int64_t stopped_at_ns;   /* CLOCK_REALTIME when STOP_COPY was entered, or 0 */
	uint32_t state;          /* device state the pump last confirmed */
	int done;                /* the thread has ended */
	int error;               /* -errno it ended with, or 0 */
};

/* Start pumping device d (in PRE_COPY, PRE_COPY_P2P or STOP_COPY) to
 * out_fd. bandwidth_bps caps payload bytes per second; 0 means no cap.
 * round_interval_ms: how long to wait at a pre-copy temporary end before
 * asking the device again. */
int devmig_pump_start(struct devmig_dev *d, int out_fd, uint64_t bandwidth_bps,
		      uint32_t round_interval_ms, struct devmig_pump **out);
/* As devmig_pump_start, the stream keyed with key (DEVMIG_STREAM_KEY_LEN
 * bytes, copied; NULL: SHA-256): see stream.h. */
int devmig_pump_start_keyed(struct devmig_dev *d, int out_fd, uint64_t bandwidth_bps,
			    uint32_t round_interval_ms, const uint8_t *key, struct devmig_pump **out);
/* As devmig_pump_start_keyed, the stream sealed (encrypted and MACed) under
 * key; -ENOTSUP without AES-NI. */
int devmig_pump_start_sealed(struct devmig_dev *d, int out_fd, uint64_t bandwidth_bps,
			     uint32_t round_interval_ms, const uint8_t *key, struct devmig_pump **out);
void devmig_pump_progress(struct devmig_pump *p, struct devmig_pump_progress *out);
/* PRE_COPY -> PRE_COPY_P2P, carried out by the pump thread. */
int devmig_pump_quiesce_p2p(struct devmig_pump *p);
/* Move to STOP_COPY and finish the stream. Returns once the device is in
 * STOP_COPY (or the change failed and the device recovered to RUNNING). */
int devmig_pump_stop_copy(struct devmig_pump *p);
/* Stop at the next chance, sending nothing more (no trailer: the target
 * refuses the stream). The caller rolls the device back afterwards. */
void devmig_pump_cancel(struct devmig_pump *p);
/* Wait for the end, up to timeout_ms (-1: forever). 1 ended, 0 not yet. */
int devmig_pump_wait(struct devmig_pump *p, int timeout_ms);
/* Payload bytes sent, or -errno, once ended. */
long devmig_pump_result(struct devmig_pump *p);
/* Join and free. Cancels first if still running. */
void devmig_pump_free(struct devmig_pump *p);

#ifdef __cplusplus
}
#endif
#endif
