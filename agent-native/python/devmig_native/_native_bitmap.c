/* Binding for the dirty-page bitmap utilities (include/devmig/bitmap.h).
 * Bitmaps cross as buffers of little-endian 64-bit words; the heavy work
 * runs with the GIL released, on buffers the caller keeps alive. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "devmig/bitmap.h"
#include "_native_bitmap.h"

/* A readable (or writable) buffer holding at least the words npages needs. */
static int get_bitmap(PyObject *obj, Py_buffer *view, uint64_t npages, int writable)
{
	if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE | (writable ? PyBUF_WRITABLE : 0)) < 0)
		return -1;
	if ((uint64_t)view->len < devmig_bitmap_words(npages) * 8) {
		PyErr_Format(PyExc_ValueError, "bitmap of %zd bytes is too short for %llu pages",
			     view->len, (unsigned long long)npages);
		PyBuffer_Release(view);
		return -1;
	}
	return 0;
}

static PyObject *bm_count(PyObject *self, PyObject *args)
{
	PyObject *obj;
	unsigned long long npages;
	Py_buffer v;
	uint64_t n;

	(void)self;
	if (!PyArg_ParseTuple(args, "OK", &obj, &npages) || get_bitmap(obj, &v, npages, 0) < 0)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	n = devmig_bitmap_count(v.buf, npages);
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&v);
	return PyLong_FromUnsignedLongLong(n);
}

static PyObject *bm_ranges(PyObject *self, PyObject *args)
{
	/* Ranges are fetched in batches of 4096 (64 KiB of structs): bounded
	 * memory whatever the bitmap, few round trips into C. */
	enum { BATCH = 4096 };
	struct devmig_page_range *batch;
	PyObject *obj, *list;
	unsigned long long npages;
	uint64_t pos = 0;
	Py_buffer v;
	size_t n;

	(void)self;
	if (!PyArg_ParseTuple(args, "OK", &obj, &npages) || get_bitmap(obj, &v, npages, 0) < 0)
		return NULL;
	batch = malloc(BATCH * sizeof(*batch));
	list = PyList_New(0);
	if (!batch || !list) {
		free(batch);
		Py_XDECREF(list);
		PyBuffer_Release(&v);
		return PyErr_NoMemory();
	}
	do {
		n = devmig_bitmap_ranges(v.buf, npages, &pos, batch, BATCH);
		for (size_t i = 0; i < n; i++) {
			PyObject *t = Py_BuildValue("(KK)", (unsigned long long)batch[i].first,
						    (unsigned long long)batch[i].count);

			if (!t || PyList_Append(list, t) < 0) {
				Py_XDECREF(t);
				Py_DECREF(list);
				free(batch);
				PyBuffer_Release(&v);
				return NULL;
			}
			Py_DECREF(t);
		}
	} while (n == BATCH);
	free(batch);
	PyBuffer_Release(&v);
	return list;
}

static PyObject *bm_or(PyObject *self, PyObject *args)
{
	PyObject *dst_obj, *src_obj;
	Py_buffer dst, src;

	(void)self;
	if (!PyArg_ParseTuple(args, "OO", &dst_obj, &src_obj))
		return NULL;
	if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0)
		return NULL;
	if (PyObject_GetBuffer(src_obj, &src, PyBUF_SIMPLE) < 0) {
		PyBuffer_Release(&dst);
		return NULL;
	}
	if (dst.len != src.len || dst.len % 8) {
		PyErr_SetString(PyExc_ValueError, "bitmaps must be the same whole number of 64-bit words");
	} else {
		Py_BEGIN_ALLOW_THREADS
		devmig_bitmap_or(dst.buf, src.buf, (uint64_t)dst.len / 8);
		Py_END_ALLOW_THREADS
	}
	PyBuffer_Release(&src);
	PyBuffer_Release(&dst);
	if (PyErr_Occurred())
		return NULL;
	Py_RETURN_NONE;
}

/* ENOTSUP (an implementation this CPU lacks) as OSError, like the
 * checksums; bad input as ValueError. */
static PyObject *encode_error(long n)
{
	if (n == -ENOTSUP) {
		errno = ENOTSUP;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	return PyErr_Format(PyExc_ValueError, "cannot encode the bitmap: %s%s", strerror((int)-n),
			    n == -EINVAL ? " (bad page size, or a bit beyond the page count)" : "");
}

static PyObject *bm_impl(PyObject *self, PyObject *unused)
{
	(void)self;
	(void)unused;
	return PyUnicode_FromString(devmig_bitmap_impl_name());
}

static PyObject *bm_encode(PyObject *self, PyObject *args)
{
	PyObject *obj, *out;
	unsigned long long npages;
	unsigned int page_size = 4096;
	int impl = DEVMIG_BITMAP_IMPL_AUTO;
	Py_buffer v;
	uint64_t bound;
	long n;
	void *buf;

	(void)self;
	if (!PyArg_ParseTuple(args, "OK|Ii", &obj, &npages, &page_size, &impl) ||
	    get_bitmap(obj, &v, npages, 0) < 0)
		return NULL;
	bound = devmig_bitmap_encode_bound(npages);
	buf = malloc(bound);
	if (!buf) {
		PyBuffer_Release(&v);
		return PyErr_NoMemory();
	}
	Py_BEGIN_ALLOW_THREADS
	n = devmig_bitmap_encode_impl(impl, v.buf, npages, page_size, buf, bound);
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&v);
	if (n < 0) {
		free(buf);
		return encode_error(n);
	}
	out = PyBytes_FromStringAndSize(buf, n);
	free(buf);
	return out;
}

static PyObject *bm_encode_into(PyObject *self, PyObject *args)
{
	PyObject *obj, *out_obj;
	unsigned long long npages;
	unsigned int page_size = 4096;
	int impl = DEVMIG_BITMAP_IMPL_AUTO;
	Py_buffer v, out;
	long n;

	(void)self;
	if (!PyArg_ParseTuple(args, "OKO|Ii", &obj, &npages, &out_obj, &page_size, &impl) ||
	    get_bitmap(obj, &v, npages, 0) < 0)
		return NULL;
	if (PyObject_GetBuffer(out_obj, &out, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0) {
		PyBuffer_Release(&v);
		return NULL;
	}
	Py_BEGIN_ALLOW_THREADS
	n = devmig_bitmap_encode_impl(impl, v.buf, npages, page_size, out.buf, (size_t)out.len);
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&out);
	PyBuffer_Release(&v);
	if (n < 0)
		return encode_error(n);
	return PyLong_FromLong(n);
}

static PyObject *bm_encode_bound(PyObject *self, PyObject *arg)
{
	unsigned long long npages = PyLong_AsUnsignedLongLong(arg);

	(void)self;
	if (PyErr_Occurred())
		return NULL;
	return PyLong_FromUnsignedLongLong(devmig_bitmap_encode_bound(npages));
}

static PyObject *bm_decode(PyObject *self, PyObject *args)
{
	struct devmig_bitmap_header h;
	PyObject *obj, *into = Py_None, *out = NULL;
	Py_buffer in, bm;
	int r;

	(void)self;
	if (!PyArg_ParseTuple(args, "O|O", &obj, &into))
		return NULL;
	if (PyObject_GetBuffer(obj, &in, PyBUF_SIMPLE) < 0)
		return NULL;
	r = devmig_bitmap_decode_header(in.buf, (size_t)in.len, &h);
	if (r < 0)
		goto refused;
	if (into == Py_None) {
		/* A new bitmap is allocated from the header's page count, so
		 * bound it: 2^33 pages (32 TiB of guest memory at 4 KiB, a 1 GiB
		 * bitmap) is beyond any guest devmig migrates, and keeps a hostile
		 * header from asking for unbounded memory. */
		if (h.npages > (1ULL << 33)) {
			PyErr_Format(PyExc_ValueError,
				     "bitmap encoding refused: %llu pages is more than the 2^33 supported",
				     (unsigned long long)h.npages);
			goto fail;
		}
		out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)devmig_bitmap_words(h.npages) * 8);
		if (!out)
			goto fail;
		memset(PyByteArray_AS_STRING(out), 0, (size_t)PyByteArray_GET_SIZE(out));
		into = out;
	}
	if (PyObject_GetBuffer(into, &bm, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0)
		goto fail;
	Py_BEGIN_ALLOW_THREADS
	r = devmig_bitmap_decode(in.buf, (size_t)in.len, bm.buf, (uint64_t)bm.len / 8, &h);
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&bm);
	if (r < 0)
		goto refused;
	PyBuffer_Release(&in);
	if (!out) {
		out = into;
		Py_INCREF(out);
	}
	return Py_BuildValue("(KIN)", (unsigned long long)h.npages, h.page_size, out);
refused:
	PyErr_Format(PyExc_ValueError, "bitmap encoding refused: %s",
		     r == -ENOSPC ? "the target bitmap is too small" : strerror(-r));
fail:
	Py_XDECREF(out);
	PyBuffer_Release(&in);
	return NULL;
}

PyMethodDef devmig_py_bitmap_methods[] = {
	{ "bitmap_count", bm_count, METH_VARARGS, "bitmap_count(bitmap, npages) -> set bits." },
	{ "bitmap_ranges", bm_ranges, METH_VARARGS,
	  "bitmap_ranges(bitmap, npages) -> [(first_page, count), ...]." },
	{ "bitmap_or", bm_or, METH_VARARGS, "bitmap_or(dst, src): dst |= src." },
	{ "bitmap_encode", bm_encode, METH_VARARGS,
	  "bitmap_encode(bitmap, npages, page_size=4096, impl=0) -> bytes (devmig's DMDB encoding)." },
	{ "bitmap_encode_into", bm_encode_into, METH_VARARGS,
	  "bitmap_encode_into(bitmap, npages, out, page_size=4096, impl=0) -> bytes written into out." },
	{ "bitmap_impl", bm_impl, METH_NOARGS,
	  "bitmap_impl() -> the encoder implementation this CPU uses." },
	{ "bitmap_encode_bound", bm_encode_bound, METH_O,
	  "bitmap_encode_bound(npages) -> the largest encoding of npages." },
	{ "bitmap_decode", bm_decode, METH_VARARGS,
	  "bitmap_decode(data, into=None) -> (npages, page_size, bitmap), OR-ing into `into`." },
	{ NULL, NULL, 0, NULL },
};
