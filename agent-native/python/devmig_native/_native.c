/* Thin CPython binding over libdevmig. It converts arguments and results
 * and maps -errno to DevmigError (an OSError carrying the kernel state
 * names); it holds no logic of its own. Blocking calls run without the GIL,
 * under a per-device lock, because a device is used by one thread at a
 * time. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "devmig/devmig.h"
#include "devmig/sim.h"
#include "devmig/pump.h"
#include "devmig/stream.h"
#include "devmig/dirty.h"
#include "devmig/vfio.h"
#include "_native_bitmap.h"
#include "_native_fdpass.h"

static PyObject *DevmigError;
static PyObject *StreamError;

/* Set obj.name to a state name, or None. */
static int set_name(PyObject *obj, const char *name, const char *value)
{
	PyObject *v = value ? PyUnicode_FromString(value) : Py_NewRef(Py_None);
	int r;

	if (!v)
		return -1;
	r = PyObject_SetAttrString(obj, name, v);
	Py_DECREF(v);
	return r;
}

/* Raise cls(errno, strerror) with from_state/to_state (names or None). */
static PyObject *raise_err(PyObject *cls, int neg_errno, const char *from, const char *to)
{
	int e = -neg_errno;
	PyObject *exc = PyObject_CallFunction(cls, "is", e, strerror(e));

	if (!exc)
		return NULL;
	if (set_name(exc, "from_state", from) < 0 || set_name(exc, "to_state", to) < 0) {
		Py_DECREF(exc);
		return NULL;
	}
	PyErr_SetObject(cls, exc);
	Py_DECREF(exc);
	return NULL;
}

static PyObject *py_version(PyObject *self, PyObject *args)
{
	(void)self;
	(void)args;
	return PyUnicode_FromString(devmig_version());
}

/* crc32c(data, impl=0, crc=0): CRC32C with one implementation
 * (enum devmig_impl); OSError(ENOTSUP) when this CPU lacks it. Runs
 * without the GIL (benchmarks hash hundreds of MiB). */
static PyObject *py_crc32c(PyObject *self, PyObject *args)
{
	Py_buffer b;
	int impl = DEVMIG_IMPL_AUTO;
	unsigned int crc = 0;
	devmig_crc32c_fn f;
	uint32_t r;

	(void)self;
	if (!PyArg_ParseTuple(args, "y*|iI", &b, &impl, &crc))
		return NULL;
	f = devmig_crc32c_impl(impl);
	if (!f) {
		PyBuffer_Release(&b);
		errno = ENOTSUP;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	Py_BEGIN_ALLOW_THREADS r = f(crc, b.buf, (size_t)b.len);
	Py_END_ALLOW_THREADS PyBuffer_Release(&b);
	return PyLong_FromUnsignedLong(r);
}

/* sha256(data, impl=0) -> 32-byte digest, as py_crc32c. */
static PyObject *py_sha256(PyObject *self, PyObject *args)
{
	Py_buffer b;
	int impl = DEVMIG_IMPL_AUTO;
	struct devmig_sha256 s;
	uint8_t out[32];

	(void)self;
	if (!PyArg_ParseTuple(args, "y*|i", &b, &impl))
		return NULL;
	if (devmig_sha256_init_impl(&s, impl) < 0) {
		PyBuffer_Release(&b);
		errno = ENOTSUP;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	Py_BEGIN_ALLOW_THREADS devmig_sha256_update(&s, b.buf, (size_t)b.len);
	devmig_sha256_final(&s, out);
	Py_END_ALLOW_THREADS PyBuffer_Release(&b);
	return PyBytes_FromStringAndSize((const char *)out, 32);
}

/* ghash(h, data, impl=0) -> GHASH_H(data) with GCM's length block (see
 * stream.h), as py_crc32c. */
static PyObject *py_ghash(PyObject *self, PyObject *args)
{
	Py_buffer h, b;
	int impl = DEVMIG_IMPL_AUTO;
	struct devmig_ghash g;
	uint8_t out[16];

	(void)self;
	if (!PyArg_ParseTuple(args, "y*y*|i", &h, &b, &impl))
		return NULL;
	if (h.len != 16) {
		PyBuffer_Release(&h);
		PyBuffer_Release(&b);
		PyErr_SetString(PyExc_ValueError, "h: 16 bytes");
		return NULL;
	}
	if (devmig_ghash_init_impl(&g, h.buf, impl) < 0) {
		PyBuffer_Release(&h);
		PyBuffer_Release(&b);
		errno = ENOTSUP;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	Py_BEGIN_ALLOW_THREADS devmig_ghash_update(&g, b.buf, (size_t)b.len);
	devmig_ghash_final(&g, out);
	Py_END_ALLOW_THREADS PyBuffer_Release(&h);
	PyBuffer_Release(&b);
	return PyBytes_FromStringAndSize((const char *)out, 16);
}

/* aes256_ctr(key, iv, offset, data, impl=0) -> data XOR the keystream
 * from byte offset on (counter blocks iv || BE64(block)). */
static PyObject *py_aes256_ctr(PyObject *self, PyObject *args)
{
	Py_buffer k, iv, b;
	unsigned long long offset;
	int impl = DEVMIG_IMPL_AUTO, r;
	struct devmig_aes256 a;
	PyObject *out;

	(void)self;
	if (!PyArg_ParseTuple(args, "y*y*Ky*|i", &k, &iv, &offset, &b, &impl))
		return NULL;
	if (k.len != 32 || iv.len != 8) {
		PyErr_SetString(PyExc_ValueError, "key: 32 bytes, iv: 8 bytes");
		out = NULL;
		goto done;
	}
	r = devmig_aes256_init_impl(&a, k.buf, impl);
	if (r < 0) {
		errno = -r;
		out = PyErr_SetFromErrno(PyExc_OSError);
		goto done;
	}
	out = PyBytes_FromStringAndSize(b.buf, b.len);
	if (out) {
		char *p = PyBytes_AS_STRING(out);

		Py_BEGIN_ALLOW_THREADS
		devmig_aes256_ctr_xor(&a, iv.buf, offset, p, (size_t)b.len);
		Py_END_ALLOW_THREADS
	}
done:
	PyBuffer_Release(&k);
	PyBuffer_Release(&iv);
	PyBuffer_Release(&b);
	return out;
}

/* frame_pass(mode, key, nonce, data, frame, one_pass) -> (tag, crcs):
 * data (writable) taken as a stream's payload in frames of frame bytes,
 * each through devmig_frame_pass (the cipher keyed by key, counter from 0,
 * the MAC by key and nonce); tag: the MAC's tag after the last frame, crcs:
 * each frame's CRC32C (from 0), four bytes little-endian apiece. For tests
 * and benchmarks of the one-pass code against the separate passes. */
static PyObject *py_frame_pass(PyObject *self, PyObject *args)
{
	static const uint8_t iv[8];
	Py_buffer k, nonce, b;
	unsigned long long frame;
	int mode, one_pass, r;
	struct devmig_digest dg;
	uint8_t tag[16];
	PyObject *crcs = NULL, *out = NULL;

	(void)self;
	if (!PyArg_ParseTuple(args, "iy*y*w*Kp", &mode, &k, &nonce, &b, &frame, &one_pass))
		return NULL;
	if (k.len != 32 || nonce.len != 16 || frame == 0 ||
	    (mode != DEVMIG_FRAME_SEAL && mode != DEVMIG_FRAME_OPEN && mode != DEVMIG_FRAME_MAC)) {
		PyErr_SetString(PyExc_ValueError, "mode: 1 to 3, key: 32 bytes, nonce: 16 bytes, frame > 0");
		goto done;
	}
	memset(&dg, 0, sizeof(dg));
	r = devmig_mac_init(&dg.mac, k.buf, nonce.buf);
	if (r == 0 && mode != DEVMIG_FRAME_MAC)
		r = devmig_aes256_init_impl(&dg.aes, k.buf, DEVMIG_IMPL_AUTO);
	if (r < 0) {
		errno = -r;
		PyErr_SetFromErrno(PyExc_OSError);
		goto done;
	}
	size_t n = (size_t)b.len, frames = n ? (n + frame - 1) / frame : 0;

	crcs = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(4 * frames));
	if (!crcs)
		goto done;
	uint8_t *c = (uint8_t *)PyBytes_AS_STRING(crcs), *p = b.buf;

	Py_BEGIN_ALLOW_THREADS
	for (size_t off = 0; off < n; off += frame) {
		size_t len = n - off < frame ? n - off : frame;
		uint32_t crc = devmig_frame_pass(&dg, (enum devmig_frame_mode)mode, iv, off, 0, p + off, len,
						 one_pass != 0);

		for (int i = 0; i < 4; i++)
			*c++ = (uint8_t)(crc >> (8 * i));
	}
	devmig_mac_final(&dg.mac, tag);
	Py_END_ALLOW_THREADS
	out = Py_BuildValue("(y#O)", (const char *)tag, (Py_ssize_t)16, crcs);
done:
	Py_XDECREF(crcs);
	PyBuffer_Release(&k);
	PyBuffer_Release(&nonce);
	PyBuffer_Release(&b);
	return out;
}

static PyObject *py_aes_impl(PyObject *self, PyObject *args)
{
	(void)self;
	(void)args;
	return PyUnicode_FromString(devmig_aes_impl_name());
}

/* hmac_sha256(key, data) -> 32 bytes. */
static PyObject *py_hmac_sha256(PyObject *self, PyObject *args)
{
	Py_buffer k, b;
	uint8_t out[32];

	(void)self;
	if (!PyArg_ParseTuple(args, "y*y*", &k, &b))
		return NULL;
	devmig_hmac_sha256(k.buf, (size_t)k.len, b.buf, (size_t)b.len, out);
	PyBuffer_Release(&k);
	PyBuffer_Release(&b);
	return PyBytes_FromStringAndSize((const char *)out, 32);
}

/* A stream key argument: None, or exactly DEVMIG_STREAM_KEY_LEN bytes
 * copied into key. 0 ok (*keyed set), -1 with an exception. */
static int stream_key(PyObject *obj, uint8_t key[DEVMIG_STREAM_KEY_LEN], int *keyed)
{
	char *p;
	Py_ssize_t n;

	*keyed = 0;
	if (obj == Py_None)
		return 0;
	if (PyBytes_AsStringAndSize(obj, &p, &n) < 0)
		return -1;
	if (n != DEVMIG_STREAM_KEY_LEN) {
		PyErr_Format(PyExc_ValueError, "mac_key: %d bytes", DEVMIG_STREAM_KEY_LEN);
		return -1;
	}
	memcpy(key, p, DEVMIG_STREAM_KEY_LEN);
	*keyed = 1;
	return 0;
}

static PyObject *py_crypto_impls(PyObject *self, PyObject *args)
{
	(void)self;
	(void)args;
	return PyUnicode_FromString(devmig_crypto_impls());
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

static PyObject *py_fsm_path(PyObject *self, PyObject *args)
{
	unsigned long long flags;
	unsigned int from, to;
	uint32_t path[DEVMIG_STATE_COUNT];
	int n;

	(void)self;
	if (!PyArg_ParseTuple(args, "KII", &flags, &from, &to))
		return NULL;
	n = devmig_fsm_path(flags, from, to, path, DEVMIG_STATE_COUNT);
	if (n < 0)
		return raise_err(DevmigError, n, devmig_state_name(from), devmig_state_name(to));
	PyObject *l = PyList_New(n);
	for (int i = 0; l && i < n; i++)
		PyList_SET_ITEM(l, i, PyLong_FromUnsignedLong(path[i]));
	return l;
}

/* ---- Device ---- */

typedef struct {
	PyObject_HEAD
	struct devmig_dev *dev;
	PyThread_type_lock lock;
	/* Calls that may run while a pump holds `lock` (the BAR, region info,
	 * the DMA log report, guest memory) take only this one; close takes
	 * both, so none of them runs on a closed device. Order: lock, then side. */
	PyThread_type_lock side;
	PyObject *log_cb;
} DeviceObject;

/* Run `stmt` without the GIL, holding the device's lock. */
#define LOCKED(self, stmt)                                                   \
	do {                                                                 \
		Py_BEGIN_ALLOW_THREADS PyThread_acquire_lock((self)->lock, WAIT_LOCK); \
		stmt;                                                        \
		PyThread_release_lock((self)->lock);                         \
		Py_END_ALLOW_THREADS                                         \
	} while (0)

/* Run `stmt` without the GIL, holding only the device's side lock. */
#define SIDE(self, stmt)                                                     \
	do {                                                                 \
		Py_BEGIN_ALLOW_THREADS PyThread_acquire_lock((self)->side, WAIT_LOCK); \
		stmt;                                                        \
		PyThread_release_lock((self)->side);                         \
		Py_END_ALLOW_THREADS                                         \
	} while (0)

/* Both: for calls that change what side calls read. */
#define BOTH(self, stmt)                                                     \
	do {                                                                 \
		Py_BEGIN_ALLOW_THREADS PyThread_acquire_lock((self)->lock, WAIT_LOCK); \
		PyThread_acquire_lock((self)->side, WAIT_LOCK);              \
		stmt;                                                        \
		PyThread_release_lock((self)->side);                         \
		PyThread_release_lock((self)->lock);                         \
		Py_END_ALLOW_THREADS                                         \
	} while (0)

static PyTypeObject DeviceType;

static int alive(DeviceObject *self)
{
	if (!self->dev) {
		PyErr_SetString(PyExc_ValueError, "device is closed");
		return 0;
	}
	return 1;
}

static PyObject *dev_err(DeviceObject *self, int r)
{
	return raise_err(DevmigError, r, devmig_state_name(devmig_dev_state(self->dev)), NULL);
}

static PyObject *wrap(struct devmig_dev *d)
{
	DeviceObject *o = PyObject_New(DeviceObject, &DeviceType);

	if (!o) {
		devmig_dev_close(d);
		return NULL;
	}
	o->dev = d;
	o->log_cb = NULL;
	o->lock = PyThread_allocate_lock();
	o->side = PyThread_allocate_lock();
	if (!o->lock || !o->side) {
		Py_DECREF(o);
		return PyErr_NoMemory();
	}
	return (PyObject *)o;
}

static void fill_desc(struct devmig_dev_desc *desc, unsigned int vendor, unsigned int device,
		      const char *driver)
{
	memset(desc, 0, sizeof(*desc));
	desc->vendor_id = (uint16_t)vendor;
	desc->device_id = (uint16_t)device;
	if (driver)
		strncpy(desc->driver, driver, sizeof(desc->driver) - 1);
}

static PyObject *py_open_sim(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "flags", "mem_size", "dirty_pages_per_mib", "seed", "vendor_id",
				  "device_id", "driver", "precopy_end_enomsg", "guest_mem_size", NULL };
	unsigned long long flags = 0, mem = 0, seed = 0, guest = 0;
	unsigned int rate = 0, vendor = 0, device = 0;
	int enomsg = 0;
	const char *driver = NULL;
	struct devmig_sim_config cfg;
	struct devmig_dev *d;
	int r;

	(void)self;
	if (!PyArg_ParseTupleAndKeywords(args, kw, "|KKIKIIzpK", kwlist, &flags, &mem, &rate, &seed, &vendor,
					 &device, &driver, &enomsg, &guest))
		return NULL;
	memset(&cfg, 0, sizeof(cfg));
	cfg.flags = flags;
	cfg.mem_size = mem;
	cfg.dirty_pages_per_mib = rate;
	cfg.seed = seed;
	cfg.precopy_end_enomsg = enomsg;
	cfg.guest_mem_size = guest;
	fill_desc(&cfg.desc, vendor, device, driver);
	r = devmig_dev_open_sim(&cfg, &d);
	if (r < 0)
		return raise_err(DevmigError, r, NULL, NULL);
	return wrap(d);
}

static PyObject *py_open_vfio(PyObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "fd", "vendor_id", "device_id", "driver", NULL };
	unsigned int vendor = 0, device = 0;
	const char *driver = NULL;
	struct devmig_dev_desc desc;
	struct devmig_dev *d;
	int fd, r;

	(void)self;
	if (!PyArg_ParseTupleAndKeywords(args, kw, "i|IIz", kwlist, &fd, &vendor, &device, &driver))
		return NULL;
	fill_desc(&desc, vendor, device, driver);
	Py_BEGIN_ALLOW_THREADS r = devmig_dev_open_vfio(fd, &desc, &d);
	Py_END_ALLOW_THREADS if (r < 0) return raise_err(DevmigError, r, NULL, NULL);
	return wrap(d);
}

static void dev_dealloc(DeviceObject *self)
{
	if (self->dev)
		devmig_dev_close(self->dev);
	if (self->lock)
		PyThread_free_lock(self->lock);
	if (self->side)
		PyThread_free_lock(self->side);
	Py_XDECREF(self->log_cb);
	PyObject_Free(self);
}

static PyObject *dev_close(DeviceObject *self, PyObject *unused)
{
	(void)unused;
	if (self->dev) {
		struct devmig_dev *d = self->dev;

		BOTH(self, devmig_dev_close(d));
		self->dev = NULL;
	}
	Py_RETURN_NONE;
}

/* Log lines arrive without the GIL: take it to call Python. */
static void log_to_python(void *ctx, const char *line)
{
	PyGILState_STATE g = PyGILState_Ensure();
	PyObject *res = PyObject_CallFunction((PyObject *)ctx, "s", line);

	if (!res)
		PyErr_WriteUnraisable((PyObject *)ctx);
	Py_XDECREF(res);
	PyGILState_Release(g);
}

static PyObject *dev_set_log(DeviceObject *self, PyObject *cb)
{
	if (!alive(self))
		return NULL;
	if (cb != Py_None && !PyCallable_Check(cb))
		return PyErr_Format(PyExc_TypeError, "log callback must be callable or None");
	LOCKED(self, devmig_dev_set_log(self->dev, cb == Py_None ? NULL : log_to_python, cb));
	Py_XDECREF(self->log_cb);
	self->log_cb = cb == Py_None ? NULL : Py_NewRef(cb);
	Py_RETURN_NONE;
}

static PyObject *dev_probe(DeviceObject *self, PyObject *unused)
{
	uint64_t flags;
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	LOCKED(self, r = devmig_probe_flags(self->dev, &flags));
	if (r < 0)
		return dev_err(self, r);
	return PyLong_FromUnsignedLongLong(flags);
}

static PyObject *dev_get_state(DeviceObject *self, PyObject *unused)
{
	uint32_t st;
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	LOCKED(self, r = devmig_get_state(self->dev, &st));
	if (r < 0)
		return dev_err(self, r);
	return PyLong_FromUnsignedLong(st);
}

static PyObject *dev_set_state(DeviceObject *self, PyObject *args)
{
	unsigned int to, recover;
	uint32_t from;
	int r, fd;

	if (!alive(self) || !PyArg_ParseTuple(args, "II", &to, &recover))
		return NULL;
	from = devmig_dev_state(self->dev);
	LOCKED(self, r = devmig_set_state(self->dev, to, recover, &fd));
	if (r < 0)
		return raise_err(DevmigError, r, devmig_state_name(from), devmig_state_name(to));
	return PyLong_FromLong(fd);
}

static PyObject *dev_reset(DeviceObject *self, PyObject *unused)
{
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	LOCKED(self, r = devmig_reset(self->dev));
	if (r < 0)
		return raise_err(DevmigError, r, devmig_state_name(devmig_dev_state(self->dev)), "RUNNING");
	Py_RETURN_NONE;
}

/* bytes; b"" at the end of the stream; None at PRE_COPY's temporary end. */
static PyObject *dev_read(DeviceObject *self, PyObject *arg)
{
	Py_ssize_t n = PyLong_AsSsize_t(arg);
	PyObject *b;
	long got;

	if ((n < 0 && PyErr_Occurred()) || !alive(self))
		return NULL;
	if (n < 0)
		return PyErr_Format(PyExc_ValueError, "negative size");
	b = PyBytes_FromStringAndSize(NULL, n);
	if (!b)
		return NULL;
	LOCKED(self, got = devmig_data_read(self->dev, PyBytes_AS_STRING(b), (size_t)n));
	if (got == -ENOMSG) {
		Py_DECREF(b);
		Py_RETURN_NONE;
	}
	if (got < 0) {
		Py_DECREF(b);
		return dev_err(self, (int)got);
	}
	if (_PyBytes_Resize(&b, got) < 0)
		return NULL;
	return b;
}

static PyObject *dev_write(DeviceObject *self, PyObject *arg)
{
	Py_buffer view;
	long r;

	if (!alive(self) || PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
		return NULL;
	LOCKED(self, r = devmig_data_write(self->dev, view.buf, (size_t)view.len));
	PyBuffer_Release(&view);
	if (r < 0)
		return dev_err(self, (int)r);
	return PyLong_FromLong(r);
}

static PyObject *dev_precopy_info(DeviceObject *self, PyObject *unused)
{
	struct devmig_precopy_info pi;
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	LOCKED(self, r = devmig_precopy_info(self->dev, &pi));
	if (r < 0)
		return dev_err(self, r);
	return Py_BuildValue("KK", (unsigned long long)pi.initial_bytes, (unsigned long long)pi.dirty_bytes);
}

static PyObject *dev_data_size(DeviceObject *self, PyObject *unused)
{
	uint64_t v;
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	LOCKED(self, r = devmig_data_size(self->dev, &v));
	if (r < 0)
		return dev_err(self, r);
	return PyLong_FromUnsignedLongLong(v);
}

static PyObject *dev_save_stream(DeviceObject *self, PyObject *arg)
{
	PyObject *path;
	long r;
	int fd;

	if (!alive(self) || !PyUnicode_FSConverter(arg, &path))
		return NULL;
	Py_BEGIN_ALLOW_THREADS fd = open(PyBytes_AS_STRING(path), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	Py_END_ALLOW_THREADS if (fd < 0)
	{
		PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
		Py_DECREF(path);
		return NULL;
	}
	Py_DECREF(path);
	LOCKED(self, r = devmig_stream_save(self->dev, fd); if (r >= 0 && fsync(fd) < 0) r = -errno;
	       close(fd));
	if (r < 0)
		return dev_err(self, (int)r);
	return PyLong_FromLong(r);
}

static PyObject *dev_load_stream(DeviceObject *self, PyObject *arg)
{
	PyObject *path;
	int r, fd;

	if (!alive(self) || !PyUnicode_FSConverter(arg, &path))
		return NULL;
	Py_BEGIN_ALLOW_THREADS fd = open(PyBytes_AS_STRING(path), O_RDONLY | O_CLOEXEC);
	Py_END_ALLOW_THREADS if (fd < 0)
	{
		PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
		Py_DECREF(path);
		return NULL;
	}
	Py_DECREF(path);
	LOCKED(self, r = devmig_stream_load(self->dev, fd); close(fd));
	if (r < 0)
		return raise_err(StreamError, r, "RESUMING", "STOP");
	Py_RETURN_NONE;
}

/* The same paths over a caller's fd (a socket to the peer agent). */
static PyObject *dev_send_stream(DeviceObject *self, PyObject *arg)
{
	int fd = PyObject_AsFileDescriptor(arg);
	long r;

	if (fd < 0 || !alive(self))
		return NULL;
	LOCKED(self, r = devmig_stream_save(self->dev, fd));
	if (r < 0)
		return dev_err(self, (int)r);
	return PyLong_FromLong(r);
}

static PyObject *dev_receive_stream(DeviceObject *self, PyObject *args)
{
	PyObject *fobj, *counter = Py_None, *keyobj = Py_None;
	Py_buffer cb = { 0 };
	uint64_t *received = NULL;
	uint8_t key[DEVMIG_STREAM_KEY_LEN];
	int fd, r, keyed, seal = 0;

	if (!PyArg_ParseTuple(args, "O|OOp", &fobj, &counter, &keyobj, &seal))
		return NULL;
	if (stream_key(keyobj, key, &keyed) < 0)
		return NULL;
	if (seal && !keyed) {
		PyErr_SetString(PyExc_ValueError, "a sealed stream needs mac_key");
		return NULL;
	}
	fd = PyObject_AsFileDescriptor(fobj);
	if (fd < 0 || !alive(self))
		return NULL;
	/* The counter: a writable 8-byte buffer the C side stores the bytes
	 * loaded so far into; held (so not resizable) for the whole load. */
	if (counter != Py_None) {
		if (PyObject_GetBuffer(counter, &cb, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0)
			return NULL;
		if (cb.len != 8 || ((uintptr_t)cb.buf % 8)) {
			PyBuffer_Release(&cb);
			PyErr_SetString(PyExc_ValueError, "counter: an aligned 8-byte writable buffer");
			return NULL;
		}
		received = cb.buf;
	}
	LOCKED(self, r = seal ? devmig_stream_load_sealed(self->dev, fd, received, key)
			      : devmig_stream_load_keyed(self->dev, fd, received, keyed ? key : NULL));
	memset(key, 0, sizeof(key));
	if (received)
		PyBuffer_Release(&cb);
	if (r < 0)
		return raise_err(StreamError, r, "RESUMING", "STOP");
	Py_RETURN_NONE;
}

/* An atomic read of a counter receive_stream updates from another thread. */
static PyObject *py_read_counter(PyObject *self, PyObject *arg)
{
	Py_buffer cb;
	uint64_t v;

	(void)self;
	if (PyObject_GetBuffer(arg, &cb, PyBUF_SIMPLE) < 0)
		return NULL;
	if (cb.len != 8 || ((uintptr_t)cb.buf % 8)) {
		PyBuffer_Release(&cb);
		PyErr_SetString(PyExc_ValueError, "counter: an aligned 8-byte buffer");
		return NULL;
	}
	v = __atomic_load_n((uint64_t *)cb.buf, __ATOMIC_RELAXED);
	PyBuffer_Release(&cb);
	return PyLong_FromUnsignedLongLong(v);
}

/* ---- simulated device controls ---- */

static PyObject *sim_fail_arc(DeviceObject *self, PyObject *args)
{
	unsigned int from, to;
	int err, to_error = 0, r;

	if (!alive(self) || !PyArg_ParseTuple(args, "IIi|p", &from, &to, &err, &to_error))
		return NULL;
	LOCKED(self, r = devmig_sim_fail_arc(self->dev, from, to, err, to_error));
	return r < 0 ? dev_err(self, r) : Py_NewRef(Py_None);
}

static PyObject *sim_fail_write(DeviceObject *self, PyObject *args)
{
	unsigned long long off;
	int err, r;

	if (!alive(self) || !PyArg_ParseTuple(args, "Ki", &off, &err))
		return NULL;
	LOCKED(self, r = devmig_sim_fail_write(self->dev, off, err));
	return r < 0 ? dev_err(self, r) : Py_NewRef(Py_None);
}

static PyObject *sim_corrupt(DeviceObject *self, PyObject *arg)
{
	unsigned long long off = PyLong_AsUnsignedLongLong(arg);
	int r;

	if ((off == (unsigned long long)-1 && PyErr_Occurred()) || !alive(self))
		return NULL;
	LOCKED(self, r = devmig_sim_corrupt(self->dev, off));
	return r < 0 ? dev_err(self, r) : Py_NewRef(Py_None);
}

static PyObject *sim_clear_faults(DeviceObject *self, PyObject *unused)
{
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	LOCKED(self, r = devmig_sim_clear_faults(self->dev));
	return r < 0 ? dev_err(self, r) : Py_NewRef(Py_None);
}

static PyObject *sim_touch(DeviceObject *self, PyObject *arg)
{
	unsigned long long page = PyLong_AsUnsignedLongLong(arg);
	int r;

	if ((page == (unsigned long long)-1 && PyErr_Occurred()) || !alive(self))
		return NULL;
	LOCKED(self, r = devmig_sim_touch(self->dev, page));
	return r < 0 ? dev_err(self, r) : Py_NewRef(Py_None);
}

/* The BAR's counters alone: the side lock, so a vCPU-facing caller never
 * waits for a pump. */
static PyObject *sim_bar_stats(DeviceObject *self, PyObject *unused)
{
	struct devmig_sim_stats st;
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	memset(&st, 0, sizeof(st));
	SIDE(self, r = devmig_sim_bar_stats(self->dev, &st));
	if (r < 0)
		return dev_err(self, r);
	return Py_BuildValue("{sKsKsKsK}", "missed_traps", (unsigned long long)st.missed_traps, "dma_ops",
			     (unsigned long long)st.dma_ops, "dma_pages", (unsigned long long)st.dma_pages,
			     "dma_deferred", (unsigned long long)st.dma_deferred);
}

static PyObject *sim_stats(DeviceObject *self, PyObject *unused)
{
	struct devmig_sim_stats st;
	uint64_t dg = 0;
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	LOCKED(self, r = devmig_sim_stats(self->dev, &st); if (r == 0) r = devmig_sim_mem_digest(self->dev, &dg));
	if (r < 0)
		return dev_err(self, r);
	PyObject *path = PyList_New(st.last_path_len);
	for (int i = 0; path && i < st.last_path_len; i++)
		PyList_SET_ITEM(path, i, PyLong_FromUnsignedLong(st.last_path[i]));
	if (!path)
		return NULL;
	return Py_BuildValue("{sKsKsNsKsKsKsKsKsKsK}", "set_state_calls", (unsigned long long)st.set_state_calls,
			     "reset_calls", (unsigned long long)st.reset_calls, "last_path", path,
			     "pages_dirtied", (unsigned long long)st.pages_dirtied, "loads",
			     (unsigned long long)st.loads, "mem_digest", (unsigned long long)dg, "missed_traps",
			     (unsigned long long)st.missed_traps, "dma_ops", (unsigned long long)st.dma_ops,
			     "dma_pages", (unsigned long long)st.dma_pages, "dma_deferred",
			     (unsigned long long)st.dma_deferred);
}

/* ---- regions, DMA logging, the simulated BAR ---- */

static PyObject *dev_region_info(DeviceObject *self, PyObject *arg)
{
	struct devmig_region_info ri;
	unsigned long idx = PyLong_AsUnsignedLong(arg);
	PyObject *areas;
	int r;

	if (PyErr_Occurred() || !alive(self))
		return NULL;
	SIDE(self, r = devmig_dev_region_info(self->dev, (uint32_t)idx, &ri));
	if (r < 0)
		return dev_err(self, r);
	areas = PyList_New(0);
	for (uint32_t i = 0; areas && ri.has_sparse && i < ri.nr_sparse; i++) {
		PyObject *t = Py_BuildValue("(KK)", (unsigned long long)ri.sparse[i].offset,
					    (unsigned long long)ri.sparse[i].size);

		if (!t || PyList_Append(areas, t) < 0)
			Py_CLEAR(areas);
		Py_XDECREF(t);
	}
	devmig_region_info_free(&ri);
	if (!areas)
		return NULL;
	return Py_BuildValue("{sIsIsKsKsOsNsOsIsI}", "index", ri.index, "flags", ri.flags, "size",
			     (unsigned long long)ri.size, "offset", (unsigned long long)ri.offset, "has_sparse",
			     ri.has_sparse ? Py_True : Py_False, "sparse", areas, "has_type",
			     ri.has_type ? Py_True : Py_False, "type", ri.type, "subtype", ri.subtype);
}

static PyObject *dev_dma_log_start(DeviceObject *self, PyObject *args)
{
	struct devmig_vfio_device_feature_dma_logging_range *rg;
	unsigned long long ps;
	PyObject *list, *seq;
	Py_ssize_t n;
	int r;

	if (!PyArg_ParseTuple(args, "OK", &list, &ps) || !alive(self))
		return NULL;
	seq = PySequence_Fast(list, "ranges: a sequence of (iova, length)");
	if (!seq)
		return NULL;
	n = PySequence_Fast_GET_SIZE(seq);
	rg = PyMem_Calloc(n ? (size_t)n : 1, sizeof(*rg));
	if (!rg) {
		Py_DECREF(seq);
		return PyErr_NoMemory();
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		unsigned long long iova, len;

		if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK", &iova, &len)) {
			PyMem_Free(rg);
			Py_DECREF(seq);
			return NULL;
		}
		rg[i].iova = iova;
		rg[i].length = len;
	}
	Py_DECREF(seq);
	uint64_t page = ps;
	BOTH(self, r = devmig_dma_log_start(self->dev, rg, (uint32_t)n, &page));
	PyMem_Free(rg);
	if (r < 0)
		return dev_err(self, r);
	return PyLong_FromUnsignedLongLong(page);
}

static PyObject *dev_dma_log_stop(DeviceObject *self, PyObject *unused)
{
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	BOTH(self, r = devmig_dma_log_stop(self->dev));
	if (r < 0)
		return dev_err(self, r);
	Py_RETURN_NONE;
}

static PyObject *dev_dma_log_report(DeviceObject *self, PyObject *args)
{
	unsigned long long iova, len, ps;
	PyObject *out;
	uint64_t words;
	int r;

	if (!PyArg_ParseTuple(args, "KKK", &iova, &len, &ps) || !alive(self))
		return NULL;
	if (!ps || len / ps > (1ULL << 33)) {
		PyErr_SetString(PyExc_ValueError, "page_size 0, or more than 2^33 pages");
		return NULL;
	}
	words = (len / ps + 63) / 64;
	out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(words ? words * 8 : 8));
	if (!out)
		return NULL;
	uint64_t *bm = (uint64_t *)(void *)PyByteArray_AS_STRING(out);
	SIDE(self, r = devmig_dma_log_report(self->dev, iova, len, ps, bm, words ? words : 1));
	if (r < 0) {
		Py_DECREF(out);
		return dev_err(self, r);
	}
	return out;
}

/* The BAR is thread-safe in C and used by vCPU threads while a pump may
 * hold the device: the side lock only. */
static PyObject *sim_bar_access(DeviceObject *self, PyObject *args)
{
	int mapped, write, r;
	unsigned long long off, val = 0;
	uint64_t v;

	if (!PyArg_ParseTuple(args, "ppK|K", &mapped, &write, &off, &val) || !alive(self))
		return NULL;
	v = val;
	SIDE(self, r = devmig_sim_bar_access(self->dev, mapped, write, off, &v));
	if (r < 0)
		return dev_err(self, r);
	return PyLong_FromUnsignedLongLong(v);
}

static PyObject *sim_reeval_eventfd(DeviceObject *self, PyObject *unused)
{
	int r;

	(void)unused;
	if (!alive(self))
		return NULL;
	r = devmig_sim_reeval_eventfd(self->dev);
	if (r < 0)
		return dev_err(self, r);
	return PyLong_FromLong(r);
}

static PyObject *sim_guest_read(DeviceObject *self, PyObject *args)
{
	unsigned long long off, len;
	uint8_t *mem;
	uint64_t size;
	int r;

	PyObject *out;

	if (!PyArg_ParseTuple(args, "KK", &off, &len) || !alive(self))
		return NULL;
	r = devmig_sim_guest_mem(self->dev, &mem, &size);
	if (r < 0)
		return dev_err(self, r);
	if (off > size || len > size - off) {
		PyErr_SetString(PyExc_ValueError, "outside the guest memory");
		return NULL;
	}
	out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
	if (!out)
		return NULL;
	/* Under the side lock: the device's DMA engine writes this memory,
	 * and a close frees it. */
	SIDE(self, memcpy(PyBytes_AS_STRING(out), mem + off, len));
	return out;
}

static PyObject *sim_dirty_take(DeviceObject *self, PyObject *arg)
{
	long which = PyLong_AsLong(arg);
	uint8_t *mem;
	uint64_t size, words;
	PyObject *out;
	int r;

	if (PyErr_Occurred() || !alive(self))
		return NULL;
	r = devmig_sim_guest_mem(self->dev, &mem, &size);
	if (r < 0)
		return dev_err(self, r);
	words = (size / 4096 + 63) / 64;
	out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(words * 8));
	if (!out)
		return NULL;
	SIDE(self, r = devmig_sim_dirty_take(self->dev, (int)which, (uint64_t *)(void *)PyByteArray_AS_STRING(out), words));
	if (r < 0) {
		Py_DECREF(out);
		return dev_err(self, r);
	}
	return out;
}

/* DevmigError(errno, "the step that failed: strerror") */
static PyObject *raise_why(int r, const char *why)
{
	PyObject *exc = PyObject_CallFunction(DevmigError, "is", -r, why);

	if (!exc)
		return NULL;
	if (set_name(exc, "from_state", NULL) < 0 || set_name(exc, "to_state", NULL) < 0) {
		Py_DECREF(exc);
		return NULL;
	}
	PyErr_SetObject(DevmigError, exc);
	Py_DECREF(exc);
	return NULL;
}

static PyObject *py_vfio_open_group(PyObject *self, PyObject *args)
{
	struct devmig_vfio_handle h;
	const char *group, *name;
	char why[512];
	int r;

	(void)self;
	if (!PyArg_ParseTuple(args, "ss", &group, &name))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	r = devmig_vfio_open_group(group, name, &h, why, sizeof(why));
	Py_END_ALLOW_THREADS
	if (r < 0)
		return raise_why(r, why);
	return Py_BuildValue("(iii)", h.device_fd, h.container_fd, h.group_fd);
}

static PyObject *py_vfio_open_cdev(PyObject *self, PyObject *args)
{
	struct devmig_vfio_handle h;
	const char *cdev, *iommufd = "/dev/iommu";
	char why[512];
	int r;

	(void)self;
	if (!PyArg_ParseTuple(args, "s|s", &cdev, &iommufd))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	r = devmig_vfio_open_cdev(cdev, iommufd, &h, why, sizeof(why));
	Py_END_ALLOW_THREADS
	if (r < 0)
		return raise_why(r, why);
	return Py_BuildValue("(iiII)", h.device_fd, h.iommufd, h.ioas_id, h.devid);
}

static PyObject *dev_get_flags(DeviceObject *self, void *c)
{
	(void)c;
	return alive(self) ? PyLong_FromUnsignedLongLong(devmig_dev_flags(self->dev)) : NULL;
}
static PyObject *dev_get_cached_state(DeviceObject *self, void *c)
{
	(void)c;
	return alive(self) ? PyLong_FromUnsignedLong(devmig_dev_state(self->dev)) : NULL;
}
static PyObject *dev_get_data_fd(DeviceObject *self, void *c)
{
	(void)c;
	return alive(self) ? PyLong_FromLong(devmig_data_fd(self->dev)) : NULL;
}
static PyObject *dev_get_poisoned(DeviceObject *self, void *c)
{
	(void)c;
	return alive(self) ? PyBool_FromLong(devmig_dev_poisoned(self->dev)) : NULL;
}
static PyObject *dev_get_is_sim(DeviceObject *self, void *c)
{
	(void)c;
	return alive(self) ? PyBool_FromLong(devmig_dev_is_sim(self->dev)) : NULL;
}
static PyObject *dev_get_desc(DeviceObject *self, void *c)
{
	(void)c;
	if (!alive(self))
		return NULL;
	const struct devmig_dev_desc *d = devmig_dev_desc(self->dev);
	return Py_BuildValue("IIs", d->vendor_id, d->device_id, d->driver);
}

static PyMethodDef dev_methods[] = {
	{ "close", (PyCFunction)dev_close, METH_NOARGS, "Release the device." },
	{ "set_log", (PyCFunction)dev_set_log, METH_O, "Route log lines to a callable(str), or None for stderr." },
	{ "probe", (PyCFunction)dev_probe, METH_NOARGS, "Read the migration flags from the device." },
	{ "get_state", (PyCFunction)dev_get_state, METH_NOARGS, "The state the device reports." },
	{ "set_state", (PyCFunction)dev_set_state, METH_VARARGS, "set_state(to, recover_to) -> data fd or -1." },
	{ "reset", (PyCFunction)dev_reset, METH_NOARGS, "VFIO_DEVICE_RESET." },
	{ "read", (PyCFunction)dev_read, METH_O, "Read the data fd: bytes, b'' at the end, None at a temporary end." },
	{ "write", (PyCFunction)dev_write, METH_O, "Write all of a buffer to the data fd of a RESUMING device." },
	{ "precopy_info", (PyCFunction)dev_precopy_info, METH_NOARGS, "(initial_bytes, dirty_bytes)." },
	{ "data_size", (PyCFunction)dev_data_size, METH_NOARGS, "Bytes STOP_COPY still has to send." },
	{ "save_stream", (PyCFunction)dev_save_stream, METH_O, "Write the device's data as a devmig stream to a path." },
	{ "load_stream", (PyCFunction)dev_load_stream, METH_O, "Load a devmig stream from a path into a RESUMING device." },
	{ "send_stream", (PyCFunction)dev_send_stream, METH_O, "Write the device's data as a devmig stream to a fd." },
	{ "receive_stream", (PyCFunction)dev_receive_stream, METH_VARARGS, "receive_stream(fd, counter=None): load a devmig stream from a fd (until EOF)." },
	{ "sim_fail_arc", (PyCFunction)sim_fail_arc, METH_VARARGS, "Simulated device: fail an arc." },
	{ "sim_fail_write", (PyCFunction)sim_fail_write, METH_VARARGS, "Simulated device: refuse a write." },
	{ "sim_corrupt", (PyCFunction)sim_corrupt, METH_O, "Simulated device: corrupt a stream byte." },
	{ "sim_clear_faults", (PyCFunction)sim_clear_faults, METH_NOARGS, "Simulated device: clear faults." },
	{ "sim_touch", (PyCFunction)sim_touch, METH_O, "Simulated device: the workload writes a page." },
	{ "sim_stats", (PyCFunction)sim_stats, METH_NOARGS, "Simulated device: counters." },
	{ "region_info", (PyCFunction)dev_region_info, METH_O, "Region info (dict) with its sparse-mmap areas." },
	{ "dma_log_start", (PyCFunction)dev_dma_log_start, METH_VARARGS, "dma_log_start(ranges, page_size) -> page size chosen." },
	{ "dma_log_stop", (PyCFunction)dev_dma_log_stop, METH_NOARGS, "Stop device DMA logging." },
	{ "dma_log_report", (PyCFunction)dev_dma_log_report, METH_VARARGS, "dma_log_report(iova, length, page_size) -> bitmap." },
	{ "sim_bar_access", (PyCFunction)sim_bar_access, METH_VARARGS, "Simulated device: sim_bar_access(mapped, write, off, val=0) -> value." },
	{ "sim_reeval_eventfd", (PyCFunction)sim_reeval_eventfd, METH_NOARGS, "Simulated device: the re-evaluate eventfd." },
	{ "sim_guest_read", (PyCFunction)sim_guest_read, METH_VARARGS, "Simulated device: sim_guest_read(offset, length) -> bytes." },
	{ "sim_bar_stats", (PyCFunction)sim_bar_stats, METH_NOARGS, "Simulated device: the BAR's counters, without waiting for a pump." },
	{ "sim_dirty_take", (PyCFunction)sim_dirty_take, METH_O, "Simulated device: take the DMA-written (0) or logged (1) pages." },
	{ NULL, NULL, 0, NULL },
};

static PyGetSetDef dev_getset[] = {
	{ "flags", (getter)dev_get_flags, NULL, "migration flags read at open", NULL },
	{ "state", (getter)dev_get_cached_state, NULL, "last state the device confirmed", NULL },
	{ "data_fd", (getter)dev_get_data_fd, NULL, "data fd of the open session or -1", NULL },
	{ "poisoned", (getter)dev_get_poisoned, NULL, "a resuming write failed; reset first", NULL },
	{ "is_sim", (getter)dev_get_is_sim, NULL, "a simulated device", NULL },
	{ "desc", (getter)dev_get_desc, NULL, "(vendor_id, device_id, driver)", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject DeviceType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "devmig_native._native.Device",
	.tp_basicsize = sizeof(DeviceObject),
	.tp_dealloc = (destructor)dev_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "A migratable device (VFIO or simulated); made by open_vfio/open_sim.",
	.tp_methods = dev_methods,
	.tp_getset = dev_getset,
};


/* ---- Pump: the source side of the data path ---- */

/* A pump owns its device while it runs: it holds the device's lock from
 * start until a wait() sees it ended (or close), so no other call can touch
 * the device under the pump thread. State changes meanwhile are requests to
 * the pump (quiesce_p2p, stop_copy). */
typedef struct {
	PyObject_HEAD
	struct devmig_pump *p;
	DeviceObject *dev;
	int holds_lock;
} PumpObject;

static PyTypeObject PumpType;

static void pump_release(PumpObject *self)
{
	if (self->holds_lock) {
		PyThread_release_lock(self->dev->lock);
		self->holds_lock = 0;
	}
}

static PyObject *pump_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "device",  "fd",   "bandwidth_bps", "round_interval_ms",
				  "mac_key", "seal", NULL };
	PyObject *devobj, *fdobj, *keyobj = Py_None;
	unsigned long long bw = 0;
	unsigned int interval = 50;
	uint8_t key[DEVMIG_STREAM_KEY_LEN];
	int fd, r, keyed, seal = 0;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O|KIOp", kwlist, &DeviceType, &devobj, &fdobj,
					 &bw, &interval, &keyobj, &seal))
		return NULL;
	if (stream_key(keyobj, key, &keyed) < 0)
		return NULL;
	if (seal && !keyed) {
		PyErr_SetString(PyExc_ValueError, "a sealed stream needs mac_key");
		return NULL;
	}
	fd = PyObject_AsFileDescriptor(fdobj);
	if (fd < 0 || !alive((DeviceObject *)devobj))
		return NULL;
	PumpObject *self = (PumpObject *)type->tp_alloc(type, 0);
	if (!self)
		return NULL;
	self->dev = (DeviceObject *)devobj;
	Py_INCREF(devobj);
	Py_BEGIN_ALLOW_THREADS PyThread_acquire_lock(self->dev->lock, WAIT_LOCK);
	r = seal ? devmig_pump_start_sealed(self->dev->dev, fd, bw, interval, key, &self->p)
		 : devmig_pump_start_keyed(self->dev->dev, fd, bw, interval, keyed ? key : NULL,
					   &self->p);
	memset(key, 0, sizeof(key));
	if (r < 0)
		PyThread_release_lock(self->dev->lock);
	Py_END_ALLOW_THREADS
	if (r < 0) {
		Py_DECREF(self);
		return dev_err((DeviceObject *)devobj, r);
	}
	self->holds_lock = 1;
	return (PyObject *)self;
}

static void pump_dealloc(PumpObject *self)
{
	if (self->p) {
		Py_BEGIN_ALLOW_THREADS devmig_pump_free(self->p);
		Py_END_ALLOW_THREADS
		self->p = NULL;
	}
	if (self->dev)
		pump_release(self);
	Py_XDECREF(self->dev);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *pump_progress(PumpObject *self, PyObject *unused)
{
	struct devmig_pump_progress pr;

	(void)unused;
	if (!self->p)
		return PyErr_Format(PyExc_ValueError, "pump is closed");
	devmig_pump_progress(self->p, &pr);
	return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:L,s:s,s:O,s:i}", "bytes_sent",
			     (unsigned long long)pr.bytes_sent, "rounds", (unsigned long long)pr.rounds,
			     "initial_bytes", (unsigned long long)pr.initial_bytes, "dirty_bytes",
			     (unsigned long long)pr.dirty_bytes, "throughput_bps",
			     (unsigned long long)pr.throughput_bps, "dirty_rate_bps",
			     (unsigned long long)pr.dirty_rate_bps, "stopped_at_ns",
			     (long long)pr.stopped_at_ns, "state", devmig_state_name(pr.state), "done",
			     pr.done ? Py_True : Py_False, "error", pr.error);
}

static PyObject *pump_request(PumpObject *self, int stop, const char *to)
{
	int r;

	if (!self->p)
		return PyErr_Format(PyExc_ValueError, "pump is closed");
	Py_BEGIN_ALLOW_THREADS r = stop ? devmig_pump_stop_copy(self->p) : devmig_pump_quiesce_p2p(self->p);
	Py_END_ALLOW_THREADS
	if (r < 0)
		return raise_err(DevmigError, r, devmig_state_name(devmig_dev_state(self->dev->dev)), to);
	Py_RETURN_NONE;
}

static PyObject *pump_stop_copy(PumpObject *self, PyObject *unused)
{
	(void)unused;
	return pump_request(self, 1, "STOP_COPY");
}

static PyObject *pump_quiesce_p2p(PumpObject *self, PyObject *unused)
{
	(void)unused;
	return pump_request(self, 0, "PRE_COPY_P2P");
}

static PyObject *pump_cancel(PumpObject *self, PyObject *unused)
{
	(void)unused;
	if (self->p)
		devmig_pump_cancel(self->p);
	Py_RETURN_NONE;
}

static PyObject *pump_wait(PumpObject *self, PyObject *arg)
{
	int ms = -1, done;

	if (!self->p)
		return PyErr_Format(PyExc_ValueError, "pump is closed");
	if (arg != Py_None) {
		double s = PyFloat_AsDouble(arg);
		if (s == -1.0 && PyErr_Occurred())
			return NULL;
		ms = s <= 0 ? 0 : (int)(s * 1000.0);
	}
	Py_BEGIN_ALLOW_THREADS done = devmig_pump_wait(self->p, ms);
	Py_END_ALLOW_THREADS
	if (done)
		pump_release(self);
	return PyBool_FromLong(done);
}

static PyObject *pump_result(PumpObject *self, PyObject *unused)
{
	long r;

	(void)unused;
	if (!self->p)
		return PyErr_Format(PyExc_ValueError, "pump is closed");
	r = devmig_pump_result(self->p);
	if (r == -EBUSY)
		return PyErr_Format(PyExc_RuntimeError, "pump still running");
	if (r < 0)
		return raise_err(DevmigError, (int)r, devmig_state_name(devmig_dev_state(self->dev->dev)), NULL);
	return PyLong_FromLong(r);
}

static PyObject *pump_close(PumpObject *self, PyObject *unused)
{
	(void)unused;
	if (self->p) {
		Py_BEGIN_ALLOW_THREADS devmig_pump_free(self->p);
		Py_END_ALLOW_THREADS
		self->p = NULL;
	}
	pump_release(self);
	Py_RETURN_NONE;
}

static PyMethodDef pump_methods[] = {
	{ "progress", (PyCFunction)pump_progress, METH_NOARGS, "Counters (dict), readable while it runs." },
	{ "stop_copy", (PyCFunction)pump_stop_copy, METH_NOARGS, "Move to STOP_COPY and finish; returns once stopped." },
	{ "quiesce_p2p", (PyCFunction)pump_quiesce_p2p, METH_NOARGS, "PRE_COPY -> PRE_COPY_P2P." },
	{ "cancel", (PyCFunction)pump_cancel, METH_NOARGS, "Stop sending (no trailer)." },
	{ "wait", (PyCFunction)pump_wait, METH_O, "wait(timeout_s or None) -> ended." },
	{ "result", (PyCFunction)pump_result, METH_NOARGS, "Payload bytes sent; raises on failure." },
	{ "close", (PyCFunction)pump_close, METH_NOARGS, "Cancel if running, join, free." },
	{ NULL, NULL, 0, NULL },
};

static PyTypeObject PumpType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "devmig_native._native.Pump",
	.tp_basicsize = sizeof(PumpObject),
	.tp_dealloc = (destructor)pump_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Pump(device, fd, bandwidth_bps=0, round_interval_ms=50): stream a saving device to fd.",
	.tp_methods = pump_methods,
	.tp_new = pump_new,
};

static PyMethodDef methods[] = {
	{ "version", py_version, METH_NOARGS, "Version of the native core." },
	{ "crc32c", py_crc32c, METH_VARARGS, "crc32c(data, impl=0, crc=0) -> CRC32C." },
	{ "sha256", py_sha256, METH_VARARGS, "sha256(data, impl=0) -> SHA-256 digest." },
	{ "ghash", py_ghash, METH_VARARGS, "ghash(h, data, impl=0) -> GHASH with GCM's length block." },
	{ "hmac_sha256", py_hmac_sha256, METH_VARARGS, "hmac_sha256(key, data) -> HMAC-SHA-256." },
	{ "frame_pass", py_frame_pass, METH_VARARGS,
	  "frame_pass(mode, key, nonce, data, frame, one_pass) -> (tag, crcs)." },
	{ "aes256_ctr", py_aes256_ctr, METH_VARARGS,
	  "aes256_ctr(key, iv, offset, data, impl=0) -> data XOR the AES-256-CTR keystream." },
	{ "aes_impl", py_aes_impl, METH_NOARGS, "aes_impl() -> 'vaes', 'aes-ni' or 'none'." },
	{ "crypto_impls", py_crypto_impls, METH_NOARGS, "The checksum implementations in use." },
	{ "state_name", py_state_name, METH_O, "Kernel name of a VFIO migration state value." },
	{ "state_from_name", py_state_from_name, METH_O, "Value of a VFIO migration state name." },
	{ "fsm_path", py_fsm_path, METH_VARARGS, "fsm_path(flags, from, to) -> states entered." },
	{ "open_sim", (PyCFunction)(void (*)(void))py_open_sim, METH_VARARGS | METH_KEYWORDS, "Open a simulated device." },
	{ "open_vfio", (PyCFunction)(void (*)(void))py_open_vfio, METH_VARARGS | METH_KEYWORDS, "Take a VFIO device fd." },
	{ "read_counter", py_read_counter, METH_O, "read_counter(buf) -> the 8-byte counter, read atomically." },
	{ "vfio_open_group", py_vfio_open_group, METH_VARARGS, "vfio_open_group(group_path, name) -> (device_fd, container_fd, group_fd)." },
	{ "vfio_open_cdev", py_vfio_open_cdev, METH_VARARGS, "vfio_open_cdev(cdev_path, iommufd_path) -> (device_fd, iommufd, ioas_id, devid)." },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "devmig_native._native", "devmig native core binding", -1, methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void);
PyMODINIT_FUNC PyInit__native(void)
{
	PyObject *m;

	if (PyType_Ready(&DeviceType) < 0 || PyType_Ready(&PumpType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	DevmigError = PyErr_NewExceptionWithDoc("devmig_native.DevmigError",
						"A device operation failed; errno, from_state, to_state.",
						PyExc_OSError, NULL);
	StreamError = PyErr_NewExceptionWithDoc("devmig_native.StreamError",
						"A devmig stream was refused; the device was reset.", DevmigError, NULL);
	if (!DevmigError || !StreamError || PyModule_AddObjectRef(m, "DevmigError", DevmigError) < 0 ||
	    PyModule_AddObjectRef(m, "StreamError", StreamError) < 0 ||
	    PyModule_AddObjectRef(m, "Device", (PyObject *)&DeviceType) < 0 ||
	    PyModule_AddObjectRef(m, "Pump", (PyObject *)&PumpType) < 0 ||
	    PyModule_AddFunctions(m, devmig_py_bitmap_methods) < 0 ||
	    PyModule_AddFunctions(m, devmig_py_fdpass_methods) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
