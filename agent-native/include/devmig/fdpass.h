/* Handing a file descriptor to another process over a Unix socket
 * (SCM_RIGHTS), so the VMM gets its own duplicate of a VFIO device fd while
 * the agent keeps its reference and goes on driving the migration; and the
 * way back, when a restarted agent takes the fd from the VMM.
 *
 * One message per fd, version 1, all integers little-endian:
 *   0  magic "DMFD"
 *   4  u16 version  1
 *   6  u16 kind     DEVMIG_FD_KIND_*
 *   8  u32 name_len  0..DEVMIG_FD_NAME_MAX
 *  12  u32 reserved  0
 *  16  name (name_len bytes, no NUL): what the fd is, e.g. the device's
 *      PCI address or mdev UUID
 * with exactly one fd attached (SCM_RIGHTS) to its first byte. Works on
 * SOCK_STREAM and SOCK_SEQPACKET sockets. */
#ifndef DEVMIG_FDPASS_H
#define DEVMIG_FDPASS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DEVMIG_FD_VERSION 1
#define DEVMIG_FD_HEADER_LEN 16
/* Room for a PCI address (12), an mdev UUID (36) or a /dev path. */
#define DEVMIG_FD_NAME_MAX 255

enum devmig_fd_kind {
	DEVMIG_FD_KIND_UNSPECIFIED = 0,
	DEVMIG_FD_KIND_VFIO_DEVICE = 1, /* a VFIO device fd (group or cdev) */
	DEVMIG_FD_KIND_DATA = 2,        /* a migration data fd */
	DEVMIG_FD_KIND_EVENTFD = 3,     /* an IRQ eventfd */
};

/* Send fd (which the caller keeps) with its kind and name. 0 or -errno;
 * -EINVAL for a bad kind or a name over DEVMIG_FD_NAME_MAX. A peer that
 * went away is -EPIPE, never a SIGPIPE. */
int devmig_fd_send(int sock, int fd, uint32_t kind, const char *name);
/* Receive one message: *fd_out gets the new fd (close-on-exec), *kind and
 * name (NUL-terminated, name_cap >= DEVMIG_FD_NAME_MAX + 1) what it is.
 * Refused, with every fd that came along closed: -EPROTO for a bad magic,
 * reserved field, kind or name length, or a message with no fd or more
 * than one; -EPROTONOSUPPORT for another version; -ECONNRESET when the
 * peer closed mid-message; 0 with *fd_out = -1 when the peer closed before
 * a message began. */
int devmig_fd_recv(int sock, int *fd_out, uint32_t *kind, char *name, size_t name_cap);

#ifdef __cplusplus
}
#endif
#endif
