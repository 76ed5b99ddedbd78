/* Module functions of the fd handoff binding (_native_fdpass.c), added to
 * the module by PyInit__native. */
#ifndef DEVMIG_NATIVE_FDPASS_H
#define DEVMIG_NATIVE_FDPASS_H

#include <Python.h>

extern PyMethodDef devmig_py_fdpass_methods[];

#endif
