/* SCM_RIGHTS handoff: the received fd is the same open file (not a copy),
 * close-on-exec, on stream and seqpacket sockets, and every malformed
 * message is refused with all fds that came along closed. */
#include <errno.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "devmig/fdpass.h"

static int same_file(int a, int b)
{
	struct stat sa, sb;

	return fstat(a, &sa) == 0 && fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
	       sa.st_ino == sb.st_ino;
}

static int open_fds(void)
{
	int n = 0;

	for (int fd = 0; fd < 1024; fd++)
		if (fcntl(fd, F_GETFD) >= 0)
			n++;
	return n;
}

static void round_trip(int type)
{
	int sv[2], mfd = memfd_create("devmig-test", MFD_CLOEXEC), got = -1;
	uint32_t kind = 0;
	char name[DEVMIG_FD_NAME_MAX + 1];
	off_t off;

	CHECK(socketpair(AF_UNIX, type, 0, sv) == 0);
	CHECK(devmig_fd_send(sv[0], mfd, DEVMIG_FD_KIND_VFIO_DEVICE, "0000:3b:00.1") == 0);
	CHECK(devmig_fd_send(sv[0], mfd, DEVMIG_FD_KIND_DATA, "") == 0);
	CHECK(devmig_fd_recv(sv[1], &got, &kind, name, sizeof(name)) == 0);
	CHECK(got >= 0 && got != mfd && same_file(got, mfd));
	CHECK(kind == DEVMIG_FD_KIND_VFIO_DEVICE && check_streq(name, "0000:3b:00.1"));
	CHECK(fcntl(got, F_GETFD) & FD_CLOEXEC);
	/* One open file: a write through one moves the other's offset. */
	CHECK(write(got, "abc", 3) == 3);
	off = lseek(mfd, 0, SEEK_CUR);
	CHECK(off == 3);
	close(got);
	/* The second message, right behind the first, arrives whole. */
	CHECK(devmig_fd_recv(sv[1], &got, &kind, name, sizeof(name)) == 0);
	CHECK(kind == DEVMIG_FD_KIND_DATA && name[0] == '\0' && same_file(got, mfd));
	close(got);
	/* The peer closes: 0 and no fd. */
	close(sv[0]);
	CHECK(devmig_fd_recv(sv[1], &got, &kind, name, sizeof(name)) == 0 && got == -1);
	close(sv[1]);
	close(mfd);
}

/* Send raw bytes with nfd copies of fd attached. */
static void send_raw(int sock, const void *buf, size_t len, int fd, int nfd)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(4 * sizeof(int))];
	} ctl;
	struct iovec iov = { (void *)(uintptr_t)buf, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

	if (nfd) {
		struct cmsghdr *c;

		memset(&ctl, 0, sizeof(ctl));
		mh.msg_control = ctl.buf;
		mh.msg_controllen = CMSG_SPACE((size_t)nfd * sizeof(int));
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN((size_t)nfd * sizeof(int));
		for (int i = 0; i < nfd; i++)
			memcpy(CMSG_DATA(c) + (size_t)i * sizeof(int), &fd, sizeof(int));
	}
	CHECK(sendmsg(sock, &mh, 0) == (ssize_t)len);
}

static int refused(const uint8_t *msg, size_t len, int nfd)
{
	int sv[2], efd = eventfd(0, EFD_CLOEXEC), got = 7, before, r;
	uint32_t kind;
	char name[DEVMIG_FD_NAME_MAX + 1];

	CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) == 0);
	send_raw(sv[0], msg, len, efd, nfd);
	close(sv[0]);
	before = open_fds();
	r = devmig_fd_recv(sv[1], &got, &kind, name, sizeof(name));
	CHECK(got == -1);
	CHECK(open_fds() == before); /* whatever came along was closed */
	close(sv[1]);
	close(efd);
	return r;
}

static void malformed_messages_are_refused(void)
{
	uint8_t ok[16 + 3] = { 'D', 'M', 'F', 'D', 1, 0, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 'a', 'b', 'c' };
	uint8_t m[sizeof(ok)];

	CHECK(refused(ok, sizeof(ok), 0) == -EPROTO); /* no fd */
	CHECK(refused(ok, sizeof(ok), 2) == -EPROTO); /* two fds */
	memcpy(m, ok, sizeof(m));
	m[0] = 'X';
	CHECK(refused(m, sizeof(m), 1) == -EPROTO);
	memcpy(m, ok, sizeof(m));
	m[4] = 2;
	CHECK(refused(m, sizeof(m), 1) == -EPROTONOSUPPORT);
	memcpy(m, ok, sizeof(m));
	m[6] = 0; /* kind UNSPECIFIED */
	CHECK(refused(m, sizeof(m), 1) == -EPROTO);
	memcpy(m, ok, sizeof(m));
	m[12] = 1; /* reserved */
	CHECK(refused(m, sizeof(m), 1) == -EPROTO);
	memcpy(m, ok, sizeof(m));
	m[8] = 4; /* name longer than the message */
	CHECK(refused(m, sizeof(m), 1) == -EPROTO);
	memcpy(m, ok, sizeof(m));
	m[9] = 1; /* name_len 259 > 255 */
	CHECK(refused(m, sizeof(m), 1) == -EPROTO);
	CHECK(refused(ok, 10, 1) == -EPROTO); /* a short header */
}

static void a_stream_cut_mid_message_is_refused(void)
{
	uint8_t hdr[16] = { 'D', 'M', 'F', 'D', 1, 0, 1, 0, 9, 0, 0, 0, 0, 0, 0, 0 };
	int sv[2], efd = eventfd(0, EFD_CLOEXEC), got;
	uint32_t kind;
	char name[DEVMIG_FD_NAME_MAX + 1];

	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	send_raw(sv[0], hdr, sizeof(hdr), efd, 1);
	CHECK(write(sv[0], "abc", 3) == 3); /* 3 of the 9 name bytes */
	close(sv[0]);
	CHECK(devmig_fd_recv(sv[1], &got, &kind, name, sizeof(name)) == -ECONNRESET && got == -1);
	close(sv[1]);
	close(efd);
}

static void sender_refuses_bad_arguments(void)
{
	char longname[DEVMIG_FD_NAME_MAX + 2];
	int sv[2];

	memset(longname, 'x', sizeof(longname) - 1);
	longname[sizeof(longname) - 1] = '\0';
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	CHECK(devmig_fd_send(sv[0], -1, DEVMIG_FD_KIND_DATA, "x") == -EINVAL);
	CHECK(devmig_fd_send(sv[0], 0, DEVMIG_FD_KIND_UNSPECIFIED, "x") == -EINVAL);
	CHECK(devmig_fd_send(sv[0], 0, 9, "x") == -EINVAL);
	CHECK(devmig_fd_send(sv[0], 0, DEVMIG_FD_KIND_DATA, longname) == -EINVAL);
	close(sv[1]);
	/* The peer is gone: EPIPE, and no SIGPIPE kills the test. */
	CHECK(devmig_fd_send(sv[0], 0, DEVMIG_FD_KIND_DATA, "x") == -EPIPE);
	close(sv[0]);
}

int main(void)
{
	round_trip(SOCK_STREAM);
	round_trip(SOCK_SEQPACKET);
	malformed_messages_are_refused();
	a_stream_cut_mid_message_is_refused();
	sender_refuses_bad_arguments();
	CHECK_DONE();
}
