/* The source pump: pre-copy rounds over a socket while the device runs,
 * stop-and-copy on request, the target's memory equal to the source's at
 * the stop; P2P quiescing; cancel; a failing STOP_COPY arc recovers; the
 * data threads' scheduling policy and the reader's low mark. */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "devmig/devmig.h"
#include "devmig/pump.h"
#include "devmig/sim.h"
#include "devmig/stream.h"

struct target {
	struct devmig_dev *d;
	int fd;
	int result;
	pthread_t th;
	bool counted; /* load with a received counter */
	uint64_t received; /* payload loaded so far (atomic) */
	int policy_before; /* 0, or a policy the loading thread takes first */
	volatile pid_t tid; /* the loading thread, once it runs */
	int policy_after; /* its scheduling policy once the load returned */
};

static void *load_main(void *arg)
{
	struct target *t = arg;

	struct sched_param sp = { 0 };

	if (t->policy_before)
		CHECK(sched_setscheduler(0, t->policy_before, &sp) == 0);
	t->tid = gettid();
	t->result = t->counted ? devmig_stream_load_counted(t->d, t->fd, &t->received)
			       : devmig_stream_load(t->d, t->fd);
	t->policy_after = sched_getscheduler(0);
	return NULL;
}

/* Field `field` (numbered as in proc(5), 3 or more) of a thread's stat
 * line into out; false if it cannot be read. Fields are counted after the
 * parenthesised name, which may itself hold spaces. */
static bool stat_field(pid_t tid, int field, char *out, size_t len)
{
	char path[64], line[1024];
	FILE *f;
	char *q, *save = NULL;

	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
	f = fopen(path, "r");
	if (!f)
		return false;
	q = fgets(line, sizeof(line), f) ? strrchr(line, ')') : NULL;
	fclose(f);
	for (q = q ? strtok_r(q + 1, " ", &save) : NULL; q; q = strtok_r(NULL, " ", &save), field--)
		if (field == 3) {
			snprintf(out, len, "%s", q);
			return true;
		}
	return false;
}

/* A thread's scheduling policy (field 41), -1 if it cannot be read. */
static int policy_of(pid_t tid)
{
	char v[32];

	return stat_field(tid, 41, v, sizeof(v)) ? atoi(v) : -1;
}

/* A thread's scheduler state letter (field 3; 'S': asleep), 0 if none. */
static char state_of(pid_t tid)
{
	char v[8];

	return stat_field(tid, 3, v, sizeof(v)) ? v[0] : 0;
}

/* The thread of this process with that name, 0 if none. */
static pid_t task_named(const char *name)
{
	DIR *dir = opendir("/proc/self/task");
	struct dirent *e;
	pid_t found = 0;

	while (dir && !found && (e = readdir(dir))) {
		char path[300], comm[64] = "";
		FILE *f;

		snprintf(path, sizeof(path), "/proc/self/task/%s/comm", e->d_name);
		f = fopen(path, "r");
		if (f && fgets(comm, sizeof(comm), f) && strcmp(comm, name) == 0)
			found = (pid_t)atoi(e->d_name);
		if (f)
			fclose(f);
	}
	if (dir)
		closedir(dir);
	return found;
}

static struct devmig_dev *sim(uint64_t seed, uint32_t dirty)
{
	struct devmig_sim_config c = { 0 };
	struct devmig_dev *d = NULL;

	c.mem_size = 4u << 20; /* 4 MiB: several 1 MiB reads per round */
	c.dirty_pages_per_mib = dirty;
	c.seed = seed;
	CHECK(devmig_dev_open_sim(&c, &d) == 0);
	return d;
}

/* Poll the pump's progress (the thread moves on its own) until `rounds`
 * pre-copy rounds are done; bounded so a broken pump fails, not hangs. */
static int wait_rounds(struct devmig_pump *p, uint64_t rounds)
{
	struct devmig_pump_progress pr;
	struct timespec ms = { 0, 1000000 };

	for (int i = 0; i < 10000; i++) {
		devmig_pump_progress(p, &pr);
		if (pr.rounds >= rounds || pr.done)
			return pr.rounds >= rounds;
		nanosleep(&ms, NULL);
	}
	return 0;
}

static void start_target(struct target *t, struct devmig_dev *d, int fd)
{
	t->d = d;
	t->fd = fd;
	CHECK(devmig_set_state(d, DEVMIG_STATE_RESUMING, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(pthread_create(&t->th, NULL, load_main, t) == 0);
}

/* A transfer that went through: the source's end closed, the target
 * loaded the whole stream and holds the source's memory. */
static void expect_loaded(struct target *t, struct devmig_dev *src, int src_fd)
{
	uint64_t a, b;

	close(src_fd);
	pthread_join(t->th, NULL);
	CHECK(t->result == 0 && devmig_dev_state(t->d) == DEVMIG_STATE_STOP);
	CHECK(devmig_sim_mem_digest(src, &a) == 0 && devmig_sim_mem_digest(t->d, &b) == 0);
	CHECK(a == b);
}

/* Everything a pump test opened. */
static void release(struct devmig_pump *p, int dst_fd, struct devmig_dev *src, struct devmig_dev *dst)
{
	devmig_pump_free(p);
	close(dst_fd);
	devmig_dev_close(src);
	devmig_dev_close(dst);
}

static void test_pre_copy_then_stop_copy_moves_the_state(void)
{
	struct devmig_dev *src = sim(1, 64), *dst = sim(2, 0);
	struct devmig_pump *p = NULL;
	struct devmig_pump_progress pr;
	struct target t = { 0 };
	int sv[2];

	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	start_target(&t, dst, sv[1]);
	CHECK(devmig_set_state(src, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_pump_start(src, sv[0], 0, 2, &p) == 0);
	CHECK(wait_rounds(p, 3));
	devmig_pump_progress(p, &pr);
	CHECK(pr.state == DEVMIG_STATE_PRE_COPY);
	CHECK(pr.bytes_sent >= 4u << 20); /* the initial state went out while running */
	CHECK(pr.stopped_at_ns == 0);

	CHECK(devmig_pump_stop_copy(p) == 0);
	CHECK(devmig_dev_state(src) == DEVMIG_STATE_STOP_COPY);
	CHECK(devmig_pump_wait(p, -1) == 1);
	devmig_pump_progress(p, &pr);
	CHECK(pr.done && pr.error == 0 && pr.stopped_at_ns > 0);
	CHECK(devmig_pump_result(p) == (long)pr.bytes_sent);
	CHECK(devmig_pump_stop_copy(p) == 0); /* repeated: already done */
	expect_loaded(&t, src, sv[0]);
	release(p, sv[1], src, dst);
}

static void test_p2p_is_reached_before_the_stop(void)
{
	struct devmig_dev *src = sim(3, 0), *dst = sim(4, 0);
	struct devmig_pump *p = NULL;
	struct target t = { 0 };
	int sv[2];

	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	start_target(&t, dst, sv[1]);
	CHECK(devmig_set_state(src, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_pump_start(src, sv[0], 0, 2, &p) == 0);
	CHECK(devmig_pump_quiesce_p2p(p) == 0);
	CHECK(devmig_dev_state(src) == DEVMIG_STATE_PRE_COPY_P2P);
	CHECK(devmig_pump_stop_copy(p) == 0);
	CHECK(devmig_dev_state(src) == DEVMIG_STATE_STOP_COPY);
	CHECK(devmig_pump_wait(p, -1) == 1 && devmig_pump_result(p) > 0);
	expect_loaded(&t, src, sv[0]);
	release(p, sv[1], src, dst);
}

static void test_cancel_sends_no_trailer_and_the_target_is_reset(void)
{
	struct devmig_dev *src = sim(5, 64), *dst = sim(6, 0);
	struct devmig_pump *p = NULL;
	struct target t = { 0 };
	int sv[2];

	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	start_target(&t, dst, sv[1]);
	CHECK(devmig_set_state(src, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_pump_start(src, sv[0], 0, 2, &p) == 0);
	CHECK(wait_rounds(p, 1));
	devmig_pump_cancel(p);
	/* What the agent does with a socket a pump may be blocked on. */
	shutdown(sv[0], SHUT_RDWR);
	CHECK(devmig_pump_wait(p, -1) == 1);
	CHECK(devmig_pump_result(p) < 0);
	pthread_join(t.th, NULL);
	CHECK(t.result < 0);
	CHECK(devmig_dev_state(dst) != DEVMIG_STATE_STOP);
	CHECK(devmig_dev_state(dst) == DEVMIG_STATE_RUNNING); /* reset */
	/* The source is untouched: still PRE_COPY, for the caller to roll back. */
	CHECK(devmig_dev_state(src) == DEVMIG_STATE_PRE_COPY);
	CHECK(devmig_set_state(src, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL) == 0);
	devmig_pump_free(p);
	close(sv[0]);
	close(sv[1]);
	devmig_dev_close(src);
	devmig_dev_close(dst);
}

static void test_a_failing_stop_copy_arc_recovers_to_running(void)
{
	struct devmig_dev *src = sim(7, 0), *dst = sim(8, 0);
	struct devmig_pump *p = NULL;
	struct target t = { 0 };
	int sv[2];

	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	start_target(&t, dst, sv[1]);
	CHECK(devmig_set_state(src, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	/* The device walks PRE_COPY -> PRE_COPY_P2P -> STOP_COPY (it has P2P). */
	CHECK(devmig_sim_fail_arc(src, DEVMIG_STATE_PRE_COPY_P2P, DEVMIG_STATE_STOP_COPY, EIO, 0) == 0);
	CHECK(devmig_pump_start(src, sv[0], 0, 2, &p) == 0);
	CHECK(devmig_pump_stop_copy(p) == -EIO);
	CHECK(devmig_pump_wait(p, -1) == 1 && devmig_pump_result(p) == -EIO);
	CHECK(devmig_dev_state(src) == DEVMIG_STATE_RUNNING);
	shutdown(sv[0], SHUT_RDWR);
	pthread_join(t.th, NULL);
	CHECK(t.result < 0 && devmig_dev_state(dst) == DEVMIG_STATE_RUNNING);
	devmig_pump_free(p);
	close(sv[0]);
	close(sv[1]);
	devmig_dev_close(src);
	devmig_dev_close(dst);
}

static void test_the_data_threads_run_as_bulk_and_the_loader_gets_its_policy_back(void)
{
	struct devmig_dev *src = sim(5, 16), *dst = sim(6, 0);
	struct devmig_pump *p = NULL;
	struct target t = { 0 };
	int sv[2];

	CHECK(sched_getscheduler(0) == SCHED_OTHER);
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	start_target(&t, dst, sv[1]);
	CHECK(devmig_set_state(src, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_pump_start(src, sv[0], 0, 2, &p) == 0);
	/* Once a round is through, the loader is inside its load. */
	CHECK(wait_rounds(p, 1));
	CHECK(t.tid > 0);
	CHECK(policy_of(task_named("devmig-pump\n")) == SCHED_BATCH);
	CHECK(policy_of(task_named("devmig-send\n")) == SCHED_BATCH);
	CHECK(policy_of(t.tid) == SCHED_BATCH);
	CHECK(devmig_pump_stop_copy(p) == 0);
	CHECK(devmig_pump_wait(p, -1) == 1);
	expect_loaded(&t, src, sv[0]);
	/* The loader's thread is the caller's: back to its own policy. */
	CHECK(t.policy_after == SCHED_OTHER);
	CHECK(sched_getscheduler(0) == SCHED_OTHER);
	release(p, sv[1], src, dst);
}

/* A thread whose policy is not SCHED_OTHER keeps it through a load. */
static void test_a_loader_with_its_own_policy_keeps_it(void)
{
	struct devmig_dev *src = sim(7, 0), *dst = sim(8, 0);
	struct devmig_pump *p = NULL;
	struct target t = { .policy_before = SCHED_IDLE }; /* unprivileged, like BATCH */
	int sv[2];

	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	start_target(&t, dst, sv[1]);
	CHECK(devmig_set_state(src, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	CHECK(devmig_pump_start(src, sv[0], 0, 2, &p) == 0);
	CHECK(devmig_pump_wait(p, -1) == 1);
	expect_loaded(&t, src, sv[0]);
	CHECK(t.policy_after == SCHED_IDLE);
	release(p, sv[1], src, dst);
}

/* A connected TCP pair on loopback (the agents' data path). */
static int tcp_pair(int sv[2])
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int l = socket(AF_INET, SOCK_STREAM, 0), ok;

	ok = l >= 0 && bind(l, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(l, 1) == 0 &&
	     getsockname(l, (struct sockaddr *)&a, &len) == 0;
	sv[0] = ok ? socket(AF_INET, SOCK_STREAM, 0) : -1;
	ok = ok && sv[0] >= 0 && connect(sv[0], (struct sockaddr *)&a, sizeof(a)) == 0;
	sv[1] = ok ? accept(l, NULL, NULL) : -1;
	if (l >= 0)
		close(l);
	return ok && sv[1] >= 0 ? 0 : -1;
}

/* Wait (bounded) until the target has loaded n bytes of payload. */
static uint64_t wait_received(struct target *t, uint64_t n)
{
	struct timespec ms = { 0, 1000000 };
	uint64_t got = 0;

	for (int i = 0; i < 5000; i++) {
		got = __atomic_load_n(&t->received, __ATOMIC_RELAXED);
		if (got >= n)
			break;
		nanosleep(&ms, NULL);
	}
	return got;
}

/* The reader's wake-up mark is what it needs: a round of less than a
 * frame, sent while the reader sleeps, is loaded at once, not when more
 * data comes. (With the mark at a whole 1 MiB frame, TCP does not wake
 * the reader for it, and this fails.) */
static void test_a_round_shorter_than_a_frame_is_loaded_at_once_over_tcp(void)
{
	struct devmig_dev *src = sim(9, 16), *dst = sim(10, 0);
	struct devmig_pump *p = NULL;
	struct devmig_pump_progress pr;
	struct target t = { .counted = true };
	uint64_t a; /* bytes sent by the first round */
	int sv[2];

	CHECK(tcp_pair(sv) == 0);
	start_target(&t, dst, sv[1]);
	CHECK(devmig_set_state(src, DEVMIG_STATE_PRE_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	/* A minute between rounds: the next round comes only when asked. */
	CHECK(devmig_pump_start(src, sv[0], 0, 60000, &p) == 0);
	CHECK(wait_rounds(p, 1));
	devmig_pump_progress(p, &pr);
	CHECK(wait_received(&t, pr.bytes_sent) == pr.bytes_sent);
	/* The reader now sleeps for the next frame. Quiescing starts the
	 * next round at once: the pages dirtied meanwhile, under 1 MiB. */
	CHECK(devmig_pump_quiesce_p2p(p) == 0);
	CHECK(wait_rounds(p, 2));
	a = pr.bytes_sent;
	devmig_pump_progress(p, &pr);
	CHECK(pr.bytes_sent > a && pr.bytes_sent - a < DEVMIG_STREAM_MAX_FRAME);
	CHECK(wait_received(&t, pr.bytes_sent) == pr.bytes_sent);
	CHECK(devmig_pump_stop_copy(p) == 0);
	CHECK(devmig_pump_wait(p, -1) == 1);
	expect_loaded(&t, src, sv[0]);
	release(p, sv[1], src, dst);
}

/* A frame whose first part was already queued when the reader got to it,
 * and whose rest came while it slept: loaded as soon as the rest is
 * there. (TCP counts its wake-up mark from what is unread: a reader that
 * took the first part and slept for the rest, with the mark at the whole
 * payload, would not wake for the rest alone; this fails then.) */
static void test_a_frame_split_around_the_readers_sleep_is_loaded_at_once(void)
{
	/* 64 KiB: one frame, well inside the receive window. */
	struct devmig_sim_config c = { .mem_size = 64u << 10, .seed = 11 };
	struct devmig_dev *src = NULL, *dst = NULL;
	struct target t = { .counted = true };
	int mfd = memfd_create("stream", MFD_CLOEXEC), sv[2];
	long payload;
	off_t len;
	uint8_t *all;
	const size_t hdrs = DEVMIG_STREAM_HEADER_LEN + DEVMIG_STREAM_FRAME_HDR_LEN;
	size_t first = 0;
	uint32_t flen;

	CHECK(devmig_dev_open_sim(&c, &src) == 0);
	c.seed = 12;
	CHECK(devmig_dev_open_sim(&c, &dst) == 0);
	CHECK(devmig_set_state(src, DEVMIG_STATE_STOP_COPY, DEVMIG_STATE_RUNNING, NULL) == 0);
	payload = devmig_stream_save(src, mfd);
	len = lseek(mfd, 0, SEEK_END);
	all = malloc((size_t)len);
	CHECK(all && pread(mfd, all, (size_t)len, 0) == len);
	/* The first frame's length (little-endian, after its type). */
	memcpy(&flen, all + DEVMIG_STREAM_HEADER_LEN + 4, 4);
	CHECK(flen > 16384 && hdrs + flen < (size_t)len);
	/* All of the frame but its last 8 KiB is queued before the reader
	 * starts; the rest of the stream (that 8 KiB, the trailer) is far
	 * less than the frame, and all of it far less than the receive
	 * window, so nothing but the reader's mark decides when it wakes. */
	first = hdrs + flen - 8192;
	CHECK(tcp_pair(sv) == 0);
	CHECK(write(sv[0], all, first) == (ssize_t)first);
	start_target(&t, dst, sv[1]);
	for (int i = 0; i < 5000 && !(t.tid && state_of(t.tid) == 'S'); i++)
		nanosleep(&(struct timespec){ 0, 1000000 }, NULL);
	CHECK(t.tid && state_of(t.tid) == 'S');
	/* The rest, the connection kept open: the reader must not need more. */
	CHECK(write(sv[0], all + first, (size_t)len - first) == (ssize_t)(len - (off_t)first));
	CHECK(wait_received(&t, (uint64_t)payload) == (uint64_t)payload);
	expect_loaded(&t, src, sv[0]);
	free(all);
	close(mfd);
	release(NULL, sv[1], src, dst);
}

static void test_bad_arguments_are_refused(void)
{
	struct devmig_dev *src = sim(9, 0);
	struct devmig_pump *p = NULL;

	/* Not saving: nothing to pump. */
	CHECK(devmig_pump_start(src, 1, 0, 2, &p) == -EINVAL);
	CHECK(devmig_pump_start(NULL, 1, 0, 2, &p) == -EINVAL);
	devmig_dev_close(src);
}

int main(void)
{
	test_pre_copy_then_stop_copy_moves_the_state();
	test_p2p_is_reached_before_the_stop();
	test_cancel_sends_no_trailer_and_the_target_is_reset();
	test_a_failing_stop_copy_arc_recovers_to_running();
	test_the_data_threads_run_as_bulk_and_the_loader_gets_its_policy_back();
	test_a_loader_with_its_own_policy_keeps_it();
	test_a_round_shorter_than_a_frame_is_loaded_at_once_over_tcp();
	test_a_frame_split_around_the_readers_sleep_is_loaded_at_once();
	test_bad_arguments_are_refused();
	CHECK_DONE();
}
