/* Baseline for the data-path benchmarks: a plain C copy of N bytes from one
 * memfd to another through a loopback TCP connection, with nothing but
 * read(), write(), send() and recv() on the way.
 *
 * The endpoints match what devmig's pump moves: the source reads a data fd
 * (a memfd, as the simulated device's is) into a buffer and sends it; the
 * receiver reads the socket into a buffer and writes it into a second memfd
 * whose pages were reserved beforehand (as the simulated device reserves its
 * resuming buffer on entering RESUMING). No framing, no checksums: what is
 * left is the cost of moving the bytes, which the pump's figure is divided
 * by.
 *
 *   rawcopy BYTES  ->  prints {"bytes": N, "seconds": S, "cpu_seconds": C}
 *
 * Timing runs from the first read to the last byte written at the
 * receiver; filling the source and reserving the target are outside it.
 * Built by the benchmark scripts with the system C compiler (-O2).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* 1 MiB: the pump's read size, so both do the same number of syscalls. */
#define BUF (1u << 20)

struct rx {
	int sock, out;
	uint64_t want, got;
	int err;
};

static void die(const char *what)
{
	fprintf(stderr, "rawcopy: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t k = write(fd, p, n);

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

static void *receiver(void *arg)
{
	struct rx *r = arg;
	char *buf = malloc(BUF);

	if (!buf) {
		r->err = ENOMEM;
		return NULL;
	}
	for (;;) {
		ssize_t k = recv(r->sock, buf, BUF, 0);

		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0) {
			r->err = errno;
			break;
		}
		if (k == 0)
			break;
		if (write_all(r->out, buf, (size_t)k) < 0) {
			r->err = errno;
			break;
		}
		r->got += (uint64_t)k;
	}
	free(buf);
	return NULL;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t alen = sizeof(a);
	struct rx r = { 0 };
	pthread_t t;
	uint64_t n, off;
	char *buf;
	int lsn, tx, src;

	if (argc != 2 || (n = strtoull(argv[1], NULL, 0)) == 0) {
		fprintf(stderr, "usage: rawcopy BYTES\n");
		return 2;
	}
	buf = malloc(BUF);
	if (!buf)
		die("malloc");
	/* The source: real pages with a pattern, written before timing. */
	src = memfd_create("rawcopy-src", MFD_CLOEXEC);
	r.out = memfd_create("rawcopy-dst", MFD_CLOEXEC);
	if (src < 0 || r.out < 0)
		die("memfd_create");
	for (size_t i = 0; i < BUF; i++)
		buf[i] = (char)(i * 131u + 7u);
	for (off = 0; off < n; off += BUF) {
		size_t k = n - off < BUF ? (size_t)(n - off) : BUF;

		if (write_all(src, buf, k) < 0)
			die("filling the source");
	}
	if (lseek(src, 0, SEEK_SET) < 0)
		die("lseek");
	if (fallocate(r.out, FALLOC_FL_KEEP_SIZE, 0, (off_t)n) < 0)
		die("reserving the target");

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	lsn = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lsn < 0 || bind(lsn, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lsn, 1) < 0 ||
	    getsockname(lsn, (struct sockaddr *)&a, &alen) < 0)
		die("listening on loopback");
	tx = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (tx < 0 || connect(tx, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("connecting");
	r.sock = accept4(lsn, NULL, NULL, SOCK_CLOEXEC);
	if (r.sock < 0)
		die("accept");
	r.want = n;

	double c0 = cpu(), t0 = now();

	if (pthread_create(&t, NULL, receiver, &r))
		die("pthread_create");
	for (off = 0; off < n;) {
		ssize_t k = read(src, buf, BUF);

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			die("reading the source");
		if (write_all(tx, buf, (size_t)k) < 0)
			die("sending");
		off += (uint64_t)k;
	}
	shutdown(tx, SHUT_WR);
	pthread_join(t, NULL);
	double dt = now() - t0, dc = cpu() - c0;

	if (r.err || r.got != n) {
		errno = r.err;
		die("receiving");
	}
	printf("{\"bytes\": %llu, \"seconds\": %.6f, \"cpu_seconds\": %.6f}\n", (unsigned long long)n, dt, dc);
	return 0;
}
