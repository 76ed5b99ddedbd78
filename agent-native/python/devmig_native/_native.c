/* Thin CPython binding over libdevmig. It converts arguments and results
 * and maps -errno to OSError; it holds no logic of its own. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>

#include "devmig/devmig.h"

static PyObject *py_version(PyObject *self, PyObject *args)
{
	(void)self;
	(void)args;
	return PyUnicode_FromString(devmig_version());
}

static PyObject *py_state_name(PyObject *self, PyObject *arg)
{
	(void)self;
	unsigned long v = PyLong_AsUnsignedLong(arg);
	if (v == (unsigned long)-1 && PyErr_Occurred())
		return NULL;
	const char *name = v <= UINT32_MAX ? devmig_state_name((uint32_t)v) : NULL;
	if (!name)
		return PyErr_Format(PyExc_ValueError, "not a VFIO migration state: %lu", v);
	return PyUnicode_FromString(name);
}

static PyObject *py_state_from_name(PyObject *self, PyObject *arg)
{
	(void)self;
	const char *name = PyUnicode_AsUTF8(arg);
	if (!name)
		return NULL;
	int v = devmig_state_from_name(name);
	if (v < 0)
		return PyErr_Format(PyExc_ValueError, "not a VFIO migration state name: %R", arg);
	return PyLong_FromLong(v);
}

static PyMethodDef methods[] = {
	{"version", py_version, METH_NOARGS, "Version of the native core."},
	{"state_name", py_state_name, METH_O, "Kernel name of a VFIO migration state value."},
	{"state_from_name", py_state_from_name, METH_O, "Value of a VFIO migration state name."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "devmig_native._native", "devmig native core binding", -1, methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void);
PyMODINIT_FUNC PyInit__native(void)
{
	return PyModule_Create(&module);
}
