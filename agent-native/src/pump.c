#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#include "devmig/pump.h"
#include "devmig/stream.h"
#include "internal.h"

/* Read size per device read: 1 MiB, the drain buffer size (see data.c) and
 * the largest stream frame, so one read becomes one frame. */
#define PUMP_BUF (1u << 20)
/* Buffers the pump reads into, in turn: one being read and sealed while the
 * other is still being written to the socket by the sender thread, so
 * reading, checksumming and encrypting run beside the socket's own copy
 * (each is about half of the work at the source) instead of after it. Two,
 * not more: the socket's own buffers (megabytes) already absorb the two
 * halves' jitter, and each buffer more is 1 MiB more for the CPU's cache
 * to hold. With both threads on one CPU (2 MiB of L2 here), a 1 GiB sealed
 * transfer ran 11% faster with two than with three (2.37 against 2.13
 * GB/s, twelve transfers each, taking turns); six or eight gained nothing. */
#define PUMP_NBUF 2
/* Writes queued for the sender: a frame is two (its header, copied in, and
 * its payload, a reference into a buffer), so this holds every frame the
 * buffers can hold, and a few small writes (the stream header, the trailer). */
#define SENDQ_LEN 16
/* Writes that are not in a pump buffer (frame headers, the stream header,
 * the trailer: the encoder's own small buffers) are copied into the queue. */
#define SENDQ_INLINE 128
_Static_assert(DEVMIG_STREAM_HEADER_LEN <= SENDQ_INLINE && DEVMIG_STREAM_FRAME_HDR_LEN <= SENDQ_INLINE &&
		       DEVMIG_STREAM_TRAILER_LEN <= SENDQ_INLINE,
	       "every write of the encoder's own fits a queue item");
/* Writes the sender gathers into one sendmsg. */
#define SENDQ_BATCH 8

/* Rates are measured over windows of at least this long, ns: one second
 * smooths the burstiness of round-based pre-copy without lagging the
 * operator's convergence decision by more than a poll. */
#define RATE_WINDOW_NS 1000000000LL

enum pump_req { REQ_NONE, REQ_P2P, REQ_STOP_COPY };

struct sendq_item {
	const uint8_t *ptr; /* a pump buffer, or inl */
	size_t len;
	uint8_t inl[SENDQ_INLINE];
};

struct devmig_pump {
	struct devmig_dev *d;
	int fd;
	uint64_t bw;
	uint32_t interval_ms;
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv; /* requests and cancel -> thread */
	pthread_cond_t done_cv; /* thread -> waiters (request results, end) */
	enum pump_req req;
	int req_result;
	uint64_t req_seq, req_done_seq;
	int cancel;
	long result;
	struct devmig_pump_progress prog;
	struct devmig_stream_enc enc;
	bool keyed, sealed;
	uint8_t key[DEVMIG_STREAM_KEY_LEN];
	uint8_t *bufs[PUMP_NBUF];
	unsigned cur; /* the buffer read into next */
	/* Sender thread: writes queued items in order; items [sq_head,
	 * sq_tail) are pending, sq_head only grows as they are written. A
	 * buffer is read into again only once every item that refers to it
	 * (up to buf_last[i]) is written. sq_err: the first write error. */
	pthread_t sender;
	pthread_cond_t sq_cv; /* items queued, or the sender told to end -> sender */
	pthread_cond_t sq_done_cv; /* items written, or the sender ended -> pump thread */
	struct sendq_item sq[SENDQ_LEN];
	uint64_t sq_head, sq_tail;
	uint64_t buf_last[PUMP_NBUF];
	int sq_err;
	bool sq_closing, sq_abort, sq_exited;
	/* rate windows */
	int64_t win_start, bw_start;
	uint64_t win_bytes, bw_bytes;
	int64_t dirty_win_start;
	uint64_t dirty_prev_remaining, dirty_win_sent;
};

static int64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t real_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Wait on cv for up to ns, or until a request or cancel; mu held. */
static void wait_ns(struct devmig_pump *p, int64_t ns)
{
	struct timespec ts;

	if (ns <= 0 || p->cancel || p->req != REQ_NONE)
		return;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += ns / 1000000000LL;
	ts.tv_nsec += ns % 1000000000LL;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_cond_timedwait(&p->cv, &p->mu, &ts);
}

/* Account n payload bytes sent; apply the bandwidth cap. mu not held. */
static void sent(struct devmig_pump *p, uint64_t n)
{
	int64_t now = mono_ns();

	pthread_mutex_lock(&p->mu);
	p->prog.bytes_sent += n;
	p->win_bytes += n;
	p->dirty_win_sent += n;
	if (now - p->win_start >= RATE_WINDOW_NS) {
		p->prog.throughput_bps =
			(uint64_t)((double)p->win_bytes * 1e9 / (double)(now - p->win_start));
		p->win_start = now;
		p->win_bytes = 0;
	}
	if (p->bw) {
		/* Token bucket: the bytes sent since bw_start may not exceed
		 * bw per second; wait out any excess (a request or cancel cuts
		 * the wait short). */
		p->bw_bytes += n;
		int64_t allowed_ns = (int64_t)((double)p->bw_bytes * 1e9 / (double)p->bw);
		int64_t ahead = allowed_ns - (now - p->bw_start);
		wait_ns(p, ahead);
		if (now - p->bw_start > RATE_WINDOW_NS) {
			p->bw_start = mono_ns();
			p->bw_bytes = 0;
		}
	}
	pthread_mutex_unlock(&p->mu);
}

/* The receiver never writes on the data stream, so the socket turning
 * readable means it hung up (or broke the protocol). Checked between
 * pre-copy rounds: a device with nothing new to send writes nothing, and a
 * dead peer would otherwise go unnoticed until stop-and-copy. */
static int peer_gone(int fd)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN | POLLRDHUP };

	if (poll(&pfd, 1, 0) <= 0)
		return 0;
	return (pfd.revents & (POLLIN | POLLRDHUP | POLLHUP | POLLERR)) ? 1 : 0;
}

/* After a pre-copy round: record PRECOPY_INFO and the dirty rate. The
 * device's remaining bytes grow by what it dirtied and shrink by what was
 * sent, so dirtied = remaining_now - remaining_before + sent_between. */
static void round_done(struct devmig_pump *p)
{
	struct devmig_precopy_info pi = {0, 0};
	int64_t now = mono_ns();

	if (devmig_precopy_info(p->d, &pi) < 0)
		return;
	pthread_mutex_lock(&p->mu);
	uint64_t remaining = pi.initial_bytes + pi.dirty_bytes;
	p->prog.rounds++;
	p->prog.initial_bytes = pi.initial_bytes;
	p->prog.dirty_bytes = pi.dirty_bytes;
	if (now - p->dirty_win_start >= RATE_WINDOW_NS) {
		int64_t dirtied = (int64_t)remaining - (int64_t)p->dirty_prev_remaining +
				  (int64_t)p->dirty_win_sent;
		if (dirtied < 0)
			dirtied = 0;
		p->prog.dirty_rate_bps =
			(uint64_t)((double)dirtied * 1e9 / (double)(now - p->dirty_win_start));
		p->dirty_win_start = now;
		p->dirty_prev_remaining = remaining;
		p->dirty_win_sent = 0;
	}
	pthread_mutex_unlock(&p->mu);
}

static int take_request(struct devmig_pump *p, enum pump_req *req)
{
	int cancel;

	pthread_mutex_lock(&p->mu);
	*req = p->req;
	cancel = p->cancel;
	pthread_mutex_unlock(&p->mu);
	return cancel;
}

static void answer(struct devmig_pump *p, int r)
{
	pthread_mutex_lock(&p->mu);
	p->req = REQ_NONE;
	p->req_result = r;
	p->req_done_seq = p->req_seq;
	p->prog.state = p->d->state;
	pthread_cond_broadcast(&p->done_cv);
	pthread_mutex_unlock(&p->mu);
}

static bool in_pump_buf(const struct devmig_pump *p, const void *ptr, size_t len)
{
	const uint8_t *q = ptr;

	for (int i = 0; i < PUMP_NBUF; i++)
		if (q >= p->bufs[i] && q + len <= p->bufs[i] + PUMP_BUF)
			return true;
	return false;
}

static void *sender_main(void *arg)
{
	struct devmig_pump *p = arg;
	struct iovec iov[SENDQ_BATCH];

	/* Named for top -H and the tests; a bulk thread for its whole life. */
	pthread_setname_np(pthread_self(), "devmig-send");
	(void)devmig_sched_bulk_begin();
	pthread_mutex_lock(&p->mu);
	for (;;) {
		while (p->sq_head == p->sq_tail && !p->sq_closing && !p->sq_abort && !p->cancel)
			pthread_cond_wait(&p->sq_cv, &p->mu);
		if (p->sq_abort || p->cancel || p->sq_head == p->sq_tail)
			break; /* told to drop what is left, or closing with nothing left */
		int n = 0;

		/* Items between head and tail stay put until head passes them. */
		for (uint64_t i = p->sq_head; i < p->sq_tail && n < SENDQ_BATCH; i++, n++) {
			const struct sendq_item *it = &p->sq[i % SENDQ_LEN];

			iov[n].iov_base = (void *)(uintptr_t)it->ptr;
			iov[n].iov_len = it->len;
		}
		pthread_mutex_unlock(&p->mu);
		int r = devmig_fd_writev_all(p->fd, iov, n);
		pthread_mutex_lock(&p->mu);
		if (r < 0) {
			p->sq_err = r;
			break;
		}
		p->sq_head += (uint64_t)n;
		pthread_cond_broadcast(&p->sq_done_cv);
	}
	p->sq_exited = true;
	pthread_cond_broadcast(&p->sq_done_cv);
	pthread_mutex_unlock(&p->mu);
	return NULL;
}

/* The encoder's sink: queue the write for the sender. A payload stays in
 * the pump buffer it was read into (not reused until written); the
 * encoder's own small writes are copied. */
static int sendq_out(void *ctx, const void *buf, size_t len)
{
	struct devmig_pump *p = ctx;
	bool ref = in_pump_buf(p, buf, len);
	int r;

	if (!len)
		return 0;
	if (!ref && len > SENDQ_INLINE)
		return -EINVAL; /* neither a payload nor the encoder's own (see above) */
	pthread_mutex_lock(&p->mu);
	for (;;) {
		if (p->sq_err || p->sq_exited) {
			r = p->sq_err ? p->sq_err : -ECANCELED;
			pthread_mutex_unlock(&p->mu);
			return r;
		}
		if (p->cancel) {
			pthread_mutex_unlock(&p->mu);
			return -ECANCELED;
		}
		if (p->sq_tail - p->sq_head < SENDQ_LEN)
			break;
		pthread_cond_signal(&p->sq_cv); /* a full queue: the sender has work */
		pthread_cond_wait(&p->sq_done_cv, &p->mu);
	}
	struct sendq_item *it = &p->sq[p->sq_tail % SENDQ_LEN];

	if (ref) {
		it->ptr = buf;
	} else {
		memcpy(it->inl, buf, len);
		it->ptr = it->inl;
	}
	it->len = len;
	p->sq_tail++;
	/* The sender is woken by a payload, which comes right after its
	 * frame's header: woken by the header alone it would send 20 bytes
	 * on their own, and sleep again at once. Whoever waits for the queue
	 * to drain wakes it too (sendq_wait), so a small write at the end of
	 * a stream or round is never left behind. */
	if (ref)
		pthread_cond_signal(&p->sq_cv);
	pthread_mutex_unlock(&p->mu);
	return 0;
}

/* Wait until the sender has written everything up to item seq: 0, or its
 * error (-ECANCELED when cancelled). */
static int sendq_wait(struct devmig_pump *p, uint64_t seq)
{
	int r = 0;

	pthread_mutex_lock(&p->mu);
	if (p->sq_head < seq)
		pthread_cond_signal(&p->sq_cv);
	while (p->sq_head < seq && !p->sq_err && !p->sq_exited && !p->cancel)
		pthread_cond_wait(&p->sq_done_cv, &p->mu);
	if (p->sq_head < seq)
		r = p->sq_err ? p->sq_err : -ECANCELED;
	pthread_mutex_unlock(&p->mu);
	return r;
}

static int sendq_flush(struct devmig_pump *p)
{
	uint64_t tail;

	pthread_mutex_lock(&p->mu);
	tail = p->sq_tail;
	pthread_mutex_unlock(&p->mu);
	return sendq_wait(p, tail);
}

/* Send what the device has now. 1: end of stream; 0: temporary end or a
 * request/cancel arrived; <0: error. */
static int send_available(struct devmig_pump *p)
{
	for (;;) {
		enum pump_req req;

		if (take_request(p, &req))
			return -ECANCELED;
		if (req != REQ_NONE)
			return 0;
		unsigned i = p->cur;
		/* The buffer's last frame must be on the wire before it is reused. */
		int r = sendq_wait(p, p->buf_last[i]);
		if (r < 0)
			return r;
		long n = devmig_data_read(p->d, p->bufs[i], PUMP_BUF);
		if (n == 0)
			return 1;
		if (n == -ENOMSG)
			return 0;
		if (n < 0)
			return (int)n;
		/* the pump's own buffer: a sealed stream encrypts it in place */
		r = devmig_stream_enc_data_mut(&p->enc, p->bufs[i], (size_t)n);
		if (r < 0)
			return r;
		pthread_mutex_lock(&p->mu);
		p->buf_last[i] = p->sq_tail;
		pthread_mutex_unlock(&p->mu);
		p->cur = (i + 1) % PUMP_NBUF;
		sent(p, (uint64_t)n);
	}
}

static long run(struct devmig_pump *p)
{
	uint64_t expected = 0;
	int r;

	if (devmig_data_size(p->d, &expected) < 0)
		expected = 0; /* unknown: devices without MIG_DATA_SIZE */
	if (p->sealed)
		r = devmig_stream_enc_begin_sealed(&p->enc, &p->d->desc, expected, p->key, sendq_out,
						   p);
	else
		r = devmig_stream_enc_begin_keyed(&p->enc, &p->d->desc, expected,
						  p->keyed ? p->key : NULL, sendq_out, p);
	if (r < 0)
		return r;
	/* Pre-copy rounds until asked to stop-and-copy. */
	while (p->d->state != DEVMIG_STATE_STOP_COPY) {
		enum pump_req req;

		r = send_available(p);
		if (r < 0)
			return r;
		if (r == 1)
			return -EPROTO; /* the end of the stream while running: not a device */
		if (take_request(p, &req))
			return -ECANCELED;
		if (req == REQ_P2P) {
			answer(p, devmig_set_state(p->d, DEVMIG_STATE_PRE_COPY_P2P,
						   DEVMIG_STATE_PRE_COPY, NULL));
			continue;
		}
		if (req == REQ_STOP_COPY) {
			pthread_mutex_lock(&p->mu);
			p->prog.stopped_at_ns = real_ns();
			pthread_mutex_unlock(&p->mu);
			r = devmig_set_state(p->d, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL);
			answer(p, r);
			if (r < 0)
				return r;
			break;
		}
		/* A round is complete when its bytes are on the wire. */
		r = sendq_flush(p);
		if (r < 0)
			return r;
		round_done(p);
		if (peer_gone(p->fd))
			return -EPIPE; /* the receiver hung up mid pre-copy */
		pthread_mutex_lock(&p->mu);
		wait_ns(p, (int64_t)p->interval_ms * 1000000LL);
		pthread_mutex_unlock(&p->mu);
	}
	/* STOP_COPY: the rest, up to the device's end of stream. */
	for (;;) {
		enum pump_req req;

		if (take_request(p, &req))
			return -ECANCELED;
		if (req != REQ_NONE)
			answer(p, req == REQ_STOP_COPY ? 0 : -EINVAL); /* already stopped */
		r = send_available(p);
		if (r < 0)
			return r;
		if (r == 1)
			break;
	}
	r = devmig_stream_enc_finish(&p->enc);
	if (r == 0)
		r = sendq_flush(p); /* the stream ends when its trailer is on the wire */
	return r < 0 ? r : (long)p->enc.total;
}

static void *thread_main(void *arg)
{
	struct devmig_pump *p = arg;
	long r;

	pthread_setname_np(pthread_self(), "devmig-pump");
	(void)devmig_sched_bulk_begin();
	r = run(p);

	/* The sender ends: after the last write when all went well, at once
	 * otherwise (what is still queued is not sent: the stream is
	 * abandoned, and its receiver refuses a stream without its trailer). */
	pthread_mutex_lock(&p->mu);
	p->sq_closing = true;
	if (r < 0)
		p->sq_abort = true;
	pthread_cond_broadcast(&p->sq_cv);
	pthread_mutex_unlock(&p->mu);
	pthread_join(p->sender, NULL);

	pthread_mutex_lock(&p->mu);
	p->result = r;
	p->prog.done = 1;
	p->prog.error = r < 0 ? (int)r : 0;
	p->prog.state = p->d->state;
	/* A request nobody will carry out now fails rather than hangs. */
	if (p->req != REQ_NONE) {
		p->req = REQ_NONE;
		p->req_result = r < 0 ? (int)r : -EINVAL;
		p->req_done_seq = p->req_seq;
	}
	pthread_cond_broadcast(&p->done_cv);
	pthread_mutex_unlock(&p->mu);
	return NULL;
}

int devmig_pump_start(struct devmig_dev *d, int out_fd, uint64_t bandwidth_bps,
		      uint32_t round_interval_ms, struct devmig_pump **out)
{
	return devmig_pump_start_keyed(d, out_fd, bandwidth_bps, round_interval_ms, NULL, out);
}

static int start(struct devmig_dev *d, int out_fd, uint64_t bandwidth_bps,
		 uint32_t round_interval_ms, const uint8_t *key, bool sealed, struct devmig_pump **out);

int devmig_pump_start_keyed(struct devmig_dev *d, int out_fd, uint64_t bandwidth_bps,
			    uint32_t round_interval_ms, const uint8_t *key, struct devmig_pump **out)
{
	return start(d, out_fd, bandwidth_bps, round_interval_ms, key, false, out);
}

int devmig_pump_start_sealed(struct devmig_dev *d, int out_fd, uint64_t bandwidth_bps,
			     uint32_t round_interval_ms, const uint8_t *key, struct devmig_pump **out)
{
	if (!key)
		return -EINVAL;
	if (!devmig_aes256_available())
		return -ENOTSUP;
	return start(d, out_fd, bandwidth_bps, round_interval_ms, key, true, out);
}

static int start(struct devmig_dev *d, int out_fd, uint64_t bandwidth_bps,
		 uint32_t round_interval_ms, const uint8_t *key, bool sealed, struct devmig_pump **out)
{
	struct devmig_pump *p;
	pthread_condattr_t ca;
	int r;

	if (!d || out_fd < 0 || !out)
		return -EINVAL;
	if (d->data_fd < 0 || !devmig_state_is_saving(d->state))
		return -EINVAL;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	for (int i = 0; i < PUMP_NBUF; i++) {
		p->bufs[i] = malloc(PUMP_BUF);
		if (!p->bufs[i]) {
			for (int j = 0; j < i; j++)
				free(p->bufs[j]);
			free(p);
			return -ENOMEM;
		}
	}
	p->d = d;
	p->fd = out_fd;
	if (key) {
		p->keyed = true;
		p->sealed = sealed;
		memcpy(p->key, key, sizeof(p->key));
	}
	p->bw = bandwidth_bps;
	p->interval_ms = round_interval_ms;
	p->prog.state = d->state;
	p->win_start = p->bw_start = p->dirty_win_start = mono_ns();
	/* Seed the counters before the thread runs, so progress never reads
	 * "0 bytes remaining" merely because no round has finished yet. */
	if (d->state != DEVMIG_STATE_STOP_COPY) {
		struct devmig_precopy_info pi;

		if (devmig_precopy_info(d, &pi) == 0) {
			p->prog.initial_bytes = pi.initial_bytes;
			p->prog.dirty_bytes = pi.dirty_bytes;
			p->dirty_prev_remaining = pi.initial_bytes + pi.dirty_bytes;
		}
	}
	pthread_mutex_init(&p->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&p->cv, &ca);
	pthread_cond_init(&p->done_cv, &ca);
	pthread_cond_init(&p->sq_cv, &ca);
	pthread_cond_init(&p->sq_done_cv, &ca);
	pthread_condattr_destroy(&ca);
	r = pthread_create(&p->sender, NULL, sender_main, p);
	if (r == 0) {
		r = pthread_create(&p->thread, NULL, thread_main, p);
		if (r) {
			pthread_mutex_lock(&p->mu);
			p->sq_abort = true;
			pthread_cond_broadcast(&p->sq_cv);
			pthread_mutex_unlock(&p->mu);
			pthread_join(p->sender, NULL);
		}
	}
	if (r) {
		pthread_mutex_destroy(&p->mu);
		pthread_cond_destroy(&p->cv);
		pthread_cond_destroy(&p->done_cv);
		pthread_cond_destroy(&p->sq_cv);
		pthread_cond_destroy(&p->sq_done_cv);
		for (int i = 0; i < PUMP_NBUF; i++)
			free(p->bufs[i]);
		free(p);
		return -r;
	}
	*out = p;
	return 0;
}

void devmig_pump_progress(struct devmig_pump *p, struct devmig_pump_progress *out)
{
	pthread_mutex_lock(&p->mu);
	*out = p->prog;
	pthread_mutex_unlock(&p->mu);
}

static int request(struct devmig_pump *p, enum pump_req req)
{
	int r;

	pthread_mutex_lock(&p->mu);
	if (p->prog.done) {
		r = p->prog.error ? p->prog.error : (req == REQ_STOP_COPY ? 0 : -EINVAL);
		pthread_mutex_unlock(&p->mu);
		return r;
	}
	if (p->req != REQ_NONE) {
		pthread_mutex_unlock(&p->mu);
		return -EBUSY; /* one request at a time */
	}
	uint64_t seq = ++p->req_seq;
	p->req = req;
	pthread_cond_broadcast(&p->cv);
	while (p->req_done_seq < seq)
		pthread_cond_wait(&p->done_cv, &p->mu);
	r = p->req_result;
	pthread_mutex_unlock(&p->mu);
	return r;
}

int devmig_pump_quiesce_p2p(struct devmig_pump *p)
{
	return request(p, REQ_P2P);
}

int devmig_pump_stop_copy(struct devmig_pump *p)
{
	return request(p, REQ_STOP_COPY);
}

void devmig_pump_cancel(struct devmig_pump *p)
{
	pthread_mutex_lock(&p->mu);
	p->cancel = 1;
	pthread_cond_broadcast(&p->cv);
	pthread_cond_broadcast(&p->sq_cv);
	pthread_cond_broadcast(&p->sq_done_cv);
	pthread_mutex_unlock(&p->mu);
}

int devmig_pump_wait(struct devmig_pump *p, int timeout_ms)
{
	int done;

	pthread_mutex_lock(&p->mu);
	if (timeout_ms < 0) {
		while (!p->prog.done)
			pthread_cond_wait(&p->done_cv, &p->mu);
	} else if (!p->prog.done) {
		struct timespec ts;

		clock_gettime(CLOCK_MONOTONIC, &ts);
		ts.tv_sec += timeout_ms / 1000;
		ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
		if (ts.tv_nsec >= 1000000000L) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		while (!p->prog.done &&
		       pthread_cond_timedwait(&p->done_cv, &p->mu, &ts) != ETIMEDOUT)
			;
	}
	done = p->prog.done;
	pthread_mutex_unlock(&p->mu);
	return done;
}

long devmig_pump_result(struct devmig_pump *p)
{
	long r;

	pthread_mutex_lock(&p->mu);
	r = p->prog.done ? p->result : -EBUSY;
	pthread_mutex_unlock(&p->mu);
	return r;
}

void devmig_pump_free(struct devmig_pump *p)
{
	if (!p)
		return;
	devmig_pump_cancel(p);
	pthread_join(p->thread, NULL);
	pthread_mutex_destroy(&p->mu);
	pthread_cond_destroy(&p->cv);
	pthread_cond_destroy(&p->done_cv);
	pthread_cond_destroy(&p->sq_cv);
	pthread_cond_destroy(&p->sq_done_cv);
	memset(p->key, 0, sizeof(p->key));
	memset(&p->enc.dg.aes, 0, sizeof(p->enc.dg.aes));
	for (int i = 0; i < PUMP_NBUF; i++)
		free(p->bufs[i]);
	free(p);
}
