/* SCM_RIGHTS fd handoff (include/devmig/fdpass.h). */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "devmig/fdpass.h"

static const char MAGIC[4] = { 'D', 'M', 'F', 'D' };
/* The receiver makes room for more fds than a message may carry, so a
 * peer that sends several is seen (and all of them closed) rather than
 * silently truncated by the kernel: 8 is plenty for that. */
#define RECV_FDS 8

int devmig_fd_send(int sock, int fd, uint32_t kind, const char *name)
{
	uint8_t hdr[DEVMIG_FD_HEADER_LEN] = { 0 };
	size_t nlen = name ? strlen(name) : 0;
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} ctl;
	uint16_t ver = DEVMIG_FD_VERSION, k = (uint16_t)kind;
	uint32_t nl = (uint32_t)nlen;
	struct iovec iov[2] = { { hdr, sizeof(hdr) }, { (void *)(uintptr_t)name, nlen } };
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = nlen ? 2 : 1 };
	struct cmsghdr *c;
	size_t sent = 0, total = sizeof(hdr) + nlen;

	if (fd < 0 || kind == DEVMIG_FD_KIND_UNSPECIFIED || kind > DEVMIG_FD_KIND_EVENTFD ||
	    nlen > DEVMIG_FD_NAME_MAX)
		return -EINVAL;
	memcpy(hdr, MAGIC, 4);
	memcpy(hdr + 4, &ver, 2);
	memcpy(hdr + 6, &k, 2);
	memcpy(hdr + 8, &nl, 4);
	memset(&ctl, 0, sizeof(ctl));
	mh.msg_control = ctl.buf;
	mh.msg_controllen = sizeof(ctl.buf);
	c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	while (sent < total) {
		ssize_t n = sendmsg(sock, &mh, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		sent += (size_t)n;
		/* The fd went with the first byte; the rest goes without it. */
		mh.msg_control = NULL;
		mh.msg_controllen = 0;
		while (n > 0 && mh.msg_iovlen) {
			size_t k2 = (size_t)n < mh.msg_iov->iov_len ? (size_t)n : mh.msg_iov->iov_len;

			mh.msg_iov->iov_base = (uint8_t *)mh.msg_iov->iov_base + k2;
			mh.msg_iov->iov_len -= k2;
			n -= (ssize_t)k2;
			if (!mh.msg_iov->iov_len) {
				mh.msg_iov++;
				mh.msg_iovlen--;
			}
		}
	}
	return 0;
}

static void close_all(int *fds, int n)
{
	for (int i = 0; i < n; i++)
		close(fds[i]);
}

/* Read exactly len bytes (no fds expected); -ECONNRESET at end of file. */
static int read_exact(int sock, uint8_t *p, size_t len)
{
	while (len) {
		ssize_t n = recv(sock, p, len, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int devmig_fd_recv(int sock, int *fd_out, uint32_t *kind, char *name, size_t name_cap)
{
	uint8_t hdr[DEVMIG_FD_HEADER_LEN];
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(RECV_FDS * sizeof(int))];
	} ctl;
	/* A stream socket is read a header first and then the name, so no
	 * byte of the next message is taken; a seqpacket one must be read in
	 * one call, or the rest of its message is lost. */
	struct iovec iov[2] = { { hdr, sizeof(hdr) }, { name, DEVMIG_FD_NAME_MAX } };
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 1 };
	int fds[RECV_FDS], nfds = 0, r, type;
	socklen_t tl = sizeof(type);
	uint16_t ver, k;
	uint32_t nl, reserved;
	ssize_t n;

	*fd_out = -1;
	if (name_cap < DEVMIG_FD_NAME_MAX + 1)
		return -EINVAL;
	if (getsockopt(sock, SOL_SOCKET, SO_TYPE, &type, &tl) < 0)
		return -errno;
	if (type == SOCK_SEQPACKET)
		mh.msg_iovlen = 2;
	mh.msg_control = ctl.buf;
	mh.msg_controllen = sizeof(ctl.buf);
	do
		n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		int cnt = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));

		for (int i = 0; i < cnt && nfds < RECV_FDS; i++)
			memcpy(&fds[nfds++], CMSG_DATA(c) + (size_t)i * sizeof(int), sizeof(int));
	}
	if (n == 0) {
		close_all(fds, nfds);
		return 0; /* the peer closed before a message */
	}
	r = -EPROTO;
	if (type == SOCK_SEQPACKET && ((mh.msg_flags & MSG_TRUNC) || (size_t)n < sizeof(hdr)))
		goto refuse;
	/* The rest of the header, if the stream delivered it in pieces. */
	r = (size_t)n < sizeof(hdr) ? read_exact(sock, hdr + n, sizeof(hdr) - (size_t)n) : 0;
	if (r < 0)
		goto refuse;
	memcpy(&ver, hdr + 4, 2);
	memcpy(&k, hdr + 6, 2);
	memcpy(&nl, hdr + 8, 4);
	memcpy(&reserved, hdr + 12, 4);
	r = -EPROTO;
	if (memcmp(hdr, MAGIC, 4) != 0)
		goto refuse;
	if (ver != DEVMIG_FD_VERSION) {
		r = -EPROTONOSUPPORT;
		goto refuse;
	}
	if (reserved || k == DEVMIG_FD_KIND_UNSPECIFIED || k > DEVMIG_FD_KIND_EVENTFD ||
	    nl > DEVMIG_FD_NAME_MAX || (mh.msg_flags & MSG_CTRUNC) || nfds != 1)
		goto refuse;
	if (type == SOCK_SEQPACKET)
		r = (size_t)n == sizeof(hdr) + nl ? 0 : -EPROTO;
	else
		r = read_exact(sock, (uint8_t *)name, nl);
	if (r < 0)
		goto refuse;
	name[nl] = '\0';
	*kind = k;
	*fd_out = fds[0];
	return 0;
refuse:
	close_all(fds, nfds);
	return r;
}
