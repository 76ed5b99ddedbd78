/* Module functions of the bitmap binding (_native_bitmap.c), added to the
 * module by PyInit__native. */
#ifndef DEVMIG_NATIVE_BITMAP_H
#define DEVMIG_NATIVE_BITMAP_H

#include <Python.h>

extern PyMethodDef devmig_py_bitmap_methods[];

#endif
