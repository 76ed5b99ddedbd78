/* Binding for the SCM_RIGHTS fd handoff (include/devmig/fdpass.h). Both
 * calls may block on the socket, so they run without the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>

#include "devmig/fdpass.h"
#include "_native_fdpass.h"

static PyObject *oserror(int r)
{
	errno = -r;
	return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *py_send_fd(PyObject *self, PyObject *args)
{
	int sock, fd, r;
	unsigned int kind;
	const char *name;

	(void)self;
	if (!PyArg_ParseTuple(args, "iiIs", &sock, &fd, &kind, &name))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	r = devmig_fd_send(sock, fd, kind, name);
	Py_END_ALLOW_THREADS
	if (r < 0)
		return oserror(r);
	Py_RETURN_NONE;
}

static PyObject *py_recv_fd(PyObject *self, PyObject *arg)
{
	char name[DEVMIG_FD_NAME_MAX + 1];
	uint32_t kind = 0;
	long sock = PyLong_AsLong(arg);
	int fd, r;

	(void)self;
	if (sock == -1 && PyErr_Occurred())
		return NULL;
	if (sock < 0 || sock > INT_MAX) {
		PyErr_SetString(PyExc_ValueError, "not a file descriptor");
		return NULL;
	}
	Py_BEGIN_ALLOW_THREADS
	r = devmig_fd_recv((int)sock, &fd, &kind, name, sizeof(name));
	Py_END_ALLOW_THREADS
	if (r < 0)
		return oserror(r);
	if (fd < 0)
		Py_RETURN_NONE;
	return Py_BuildValue("(iIs)", fd, kind, name);
}

PyMethodDef devmig_py_fdpass_methods[] = {
	{ "send_fd", py_send_fd, METH_VARARGS, "send_fd(sock, fd, kind, name): hand fd over (SCM_RIGHTS)." },
	{ "recv_fd", py_recv_fd, METH_O,
	  "recv_fd(sock) -> (fd, kind, name), or None when the peer closed first." },
	{ NULL, NULL, 0, NULL },
};
