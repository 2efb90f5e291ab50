/* slabcast.core._hot: the frame's path in C (optional; core/ring.py falls back to ctypes and Python).
 *
 * What a paced frame spends is mostly a cold interpreter: after a 1 ms sleep a ctypes FUTEX_WAKE costs
 * 7.7 us on the 2-vCPU test machine against under 1 us for the system call itself, and the publisher's
 * copy, descriptor and position 10 us in Python.  These functions do the same steps as their Python
 * twins in core/ring.py, in one call each; the protocol (docs/protocol.md) does not change.
 *
 *   futex_wait(address, expected, timeout, mask=WAKE_ALL) -> bool
 *   futex_wake(address, mask=WAKE_ALL) -> int
 *   barrier() -> None
 *   runs(raw, seq, head, sample_bytes) -> list | int
 *   Writer(segment, ring_offset, slots, seen, fmt, itemsize, channels, frame_limit).put(data, t0, flags, offset,
 *       end, position, index, floor, slab, gen, frame_max, first) -> int
 *
 * Linux only (futex(2)); any architecture the compiler's __atomic builtins cover.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/futex.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ring is little-endian (docs/protocol.md) and these functions read and write it natively"
#endif

#define WAKE_ALL 0xFFFFFFFFu

/* docs/protocol.md, the ring: a 256-byte header, then descriptors of 64 bytes. */
#define POSITION_AT 152
#define NOTICES_AT 160
#define FUTEX_AT 164
#define FRAMES_AT 168
#define DOORBELLS_AT 176
#define FRAME_MAX_AT 188
#define HEADER_BYTES 256
#define DESCRIPTOR_BYTES 64
#define SLEEPERS 256
#define RING_NOW (1LL << 32)  /* put's result: send the doorbell notice (a sleeper byte changed) */
#define FULL (1LL << 33)      /* put's result: a plain frame that does not fit before end: a new slab first */

static int
as_address(PyObject *obj, char **out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (char *)(uintptr_t)v;
    return 0;
}

static int
as_u32(PyObject *obj, uint32_t *out)
{
    /* The low 32 bits, as the Python versions take them (expected & 0xFFFFFFFF). */
    unsigned long long v = PyLong_AsUnsignedLongLongMask(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint32_t)v;
    return 0;
}

static int
as_i64(PyObject *obj, int64_t *out)
{
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = (int64_t)v;
    return 0;
}

PyDoc_STRVAR(futex_wait_doc,
"futex_wait(address, expected, timeout, mask=WAKE_ALL) -> bool\n\n"
"Sleep while the u32 at address holds expected, at most timeout seconds, until a futex_wake whose mask\n"
"shares a bit with mask.  False on a timeout, True otherwise (woken, changed, or a signal).  The GIL is\n"
"released while asleep.");

static PyObject *
hot_futex_wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    char *address;
    uint32_t expected, mask = WAKE_ALL;
    double timeout;
    if (nargs < 3 || nargs > 4) {
        PyErr_Format(PyExc_TypeError, "futex_wait takes 3 or 4 arguments, got %zd", nargs);
        return NULL;
    }
    if (as_address(args[0], &address) < 0 || as_u32(args[1], &expected) < 0)
        return NULL;
    timeout = PyFloat_AsDouble(args[2]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (nargs == 4 && as_u32(args[3], &mask) < 0)
        return NULL;
    if (!(timeout >= 0.0))  /* (NaN too) */
        timeout = 0.0;
    if (timeout > 1e9)  /* (a time_t and the absolute deadline stay in range; callers' waits are bounded) */
        timeout = 1e9;
    struct timespec ts;
    long r;
    int err;
    if (mask == WAKE_ALL) {
        ts.tv_sec = (time_t)timeout;
        ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
        Py_BEGIN_ALLOW_THREADS
        r = syscall(SYS_futex, address, FUTEX_WAIT, expected, &ts, NULL, 0);
        err = errno;
        Py_END_ALLOW_THREADS
    } else {
        /* FUTEX_WAIT_BITSET's timeout is absolute, on CLOCK_MONOTONIC. */
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double until = (double)now.tv_sec + (double)now.tv_nsec * 1e-9 + timeout;
        ts.tv_sec = (time_t)until;
        ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
        Py_BEGIN_ALLOW_THREADS
        r = syscall(SYS_futex, address, FUTEX_WAIT_BITSET, expected, &ts, NULL, mask);
        err = errno;
        Py_END_ALLOW_THREADS
    }
    if (r == 0 || err != ETIMEDOUT)
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

PyDoc_STRVAR(futex_wake_doc,
"futex_wake(address, mask=WAKE_ALL) -> int\n\n"
"Wake every process asleep on the u32 at address whose wait mask shares a bit with mask; return how many\n"
"were woken (-1 on an error, as the system call).  The kernel makes a full barrier before it looks.");

static PyObject *
hot_futex_wake(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    char *address;
    uint32_t mask = WAKE_ALL;
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "futex_wake takes 1 or 2 arguments, got %zd", nargs);
        return NULL;
    }
    if (as_address(args[0], &address) < 0 || (nargs == 2 && as_u32(args[1], &mask) < 0))
        return NULL;
    long r;
    if (mask == WAKE_ALL)
        r = syscall(SYS_futex, address, FUTEX_WAKE, 0x7FFFFFFF, NULL, NULL, 0);
    else
        r = syscall(SYS_futex, address, FUTEX_WAKE_BITSET, 0x7FFFFFFF, NULL, NULL, mask);
    return PyLong_FromLong(r);
}

PyDoc_STRVAR(barrier_doc,
"barrier() -> None\n\n"
"A full memory barrier: every store before it is visible to other cores before any load after it.");

static PyObject *
hot_barrier(PyObject *self, PyObject *unused)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}


/* ------------------------------------------------------------------ the broker's look at the ring */

/* The run of rows a..b-1 (descriptors back to back in one slab): (offset, index, floor, flags, n, ns, t0s) of
 * runs() below; a new reference, or NULL with an exception set. */
static PyObject *
run_of(const char *raw, Py_ssize_t a, Py_ssize_t b)
{
    PyObject *ns = PyTuple_New(b - a), *t0s = PyTuple_New(b - a);
    if (ns == NULL || t0s == NULL)
        goto fail;
    unsigned long long total = 0;
    for (Py_ssize_t j = a; j < b; j++) {
        const char *d = raw + j * DESCRIPTOR_BYTES;
        uint32_t n;
        double t0;
        memcpy(&n, d + 40, 4);
        memcpy(&t0, d + 16, 8);
        total += n;
        PyObject *k = PyLong_FromUnsignedLong(n);
        if (k == NULL)
            goto fail;
        PyTuple_SET_ITEM(ns, j - a, k);
        PyObject *t = PyFloat_FromDouble(t0);
        if (t == NULL)
            goto fail;
        PyTuple_SET_ITEM(t0s, j - a, t);
    }
    const char *d = raw + a * DESCRIPTOR_BYTES;
    uint64_t index, offset, floor;
    uint32_t flags;
    memcpy(&index, d + 8, 8);
    memcpy(&offset, d + 24, 8);
    memcpy(&floor, d + 32, 8);
    memcpy(&flags, d + 52, 4);
    /* ("N" takes the tuples' references, also when it fails) */
    return Py_BuildValue("(KKKIKNN)", (unsigned long long)offset, (unsigned long long)index,
                         (unsigned long long)floor, (unsigned int)flags, total, ns, t0s);
fail:
    Py_XDECREF(ns);
    Py_XDECREF(t0s);
    return NULL;
}

PyDoc_STRVAR(runs_doc,
"runs(raw, seq, head, sample_bytes) -> list | int\n\n"
"The frames described by descriptors copied from the ring (raw: 64 bytes each, descriptor seq first; the\n"
"stream's next sample is index head), checked and grouped as the broker accounts for them: runs of frames\n"
"back to back in one slab, a new run at a flag or where a frame does not start at the previous one's end\n"
"byte.  Each run is (offset, index, floor, flags, n, ns, t0s): its first frame's byte, stream index, floor\n"
"and flags, its samples in all, and its frames' samples and t0 (seconds) as tuples.  A descriptor out of\n"
"sequence (seq not the next, index not where the previous frame ended, no samples): its row, an int; the\n"
"caller's Python twin (broker/state.py) names what is wrong.");

static PyObject *
hot_runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "runs takes 4 arguments, got %zd", nargs);
        return NULL;
    }
    unsigned long long seq0 = PyLong_AsUnsignedLongLong(args[1]);
    if (seq0 == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long head0 = PyLong_AsUnsignedLongLong(args[2]);
    if (head0 == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t sample_bytes = PyLong_AsSsize_t(args[3]);
    if (sample_bytes == -1 && PyErr_Occurred())
        return NULL;
    if (sample_bytes < 1) {
        PyErr_Format(PyExc_ValueError, "runs: sample_bytes must be >= 1, got %zd", sample_bytes);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL;
    if (view.len % DESCRIPTOR_BYTES) {
        PyErr_Format(PyExc_ValueError, "runs: raw must be whole descriptors of %d bytes, got %zd bytes",
                     DESCRIPTOR_BYTES, view.len);
        goto done;
    }
    const char *raw = (const char *)view.buf;
    Py_ssize_t count = view.len / DESCRIPTOR_BYTES;
    /* A descriptor: u64 seq, u64 index, f64 t0, u64 offset, u64 floor, u32 n, slab, gen, flags (little-endian). */
    uint64_t seq = seq0, head = head0, end = 0;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        goto done;
    Py_ssize_t first = 0;  /* the row that starts the current run */
    for (Py_ssize_t i = 0; i <= count; i++) {
        const char *d = raw + i * DESCRIPTOR_BYTES;
        uint64_t dseq = 0, index = 0, offset = 0;
        uint32_t n = 0, flags = 0;
        if (i < count) {
            memcpy(&dseq, d, 8);
            memcpy(&index, d + 8, 8);
            memcpy(&offset, d + 24, 8);
            memcpy(&n, d + 40, 4);
            memcpy(&flags, d + 52, 4);
            if (dseq != seq || index != head || n < 1) {
                Py_DECREF(list);
                result = PyLong_FromSsize_t(i);
                goto done;
            }
        }
        /* A run ends before a flag, where a frame does not start at the previous one's end byte, and at the end. */
        if (i > 0 && (i == count || flags || offset != end)) {
            PyObject *run = run_of(raw, first, i);
            if (run == NULL || PyList_Append(list, run) < 0) {
                Py_XDECREF(run);
                Py_DECREF(list);
                goto done;
            }
            Py_DECREF(run);
            first = i;
        }
        end = offset + (uint64_t)n * (uint64_t)sample_bytes;
        seq++;
        head += n;
    }
    result = list;
done:
    PyBuffer_Release(&view);
    return result;
}


/* ------------------------------------------------------------------ the publisher's frame */

typedef struct {
    PyObject_HEAD
    Py_buffer segment;      /* the stream's segment, writable; released by close() */
    int held;
    char *base;
    Py_ssize_t size;
    char *ring;             /* the first descriptor */
    char *sleepers;         /* the sleeper table (SLEEPERS bytes), then the futex sleeper table */
    Py_buffer seen;         /* the sleeper table at the previous look: Ring.seen, shared with Python's look */
    uint64_t mask;          /* slots - 1 */
    char fmt[16];           /* the buffer format of one sample's element ("h", "f", "B", ...) */
    Py_ssize_t itemsize;
    Py_ssize_t channels;
    Py_ssize_t sample_bytes;
    Py_ssize_t frame_limit;
    unsigned long long puts; /* frames this writer published (tests: which path wrote) */
} Writer;

static void
writer_release(Writer *w)
{
    if (w->held) {
        PyBuffer_Release(&w->seen);
        PyBuffer_Release(&w->segment);
        w->held = 0;
        w->base = NULL;
    }
}

static int
writer_init(Writer *w, PyObject *args, PyObject *kwargs)
{
    PyObject *segment, *seen;
    Py_ssize_t ring_offset, slots, itemsize, channels, frame_limit;
    const char *fmt;
    static char *kw[] = {"segment", "ring_offset", "slots", "seen", "fmt", "itemsize", "channels", "frame_limit",
                         NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OnnOsnnn:Writer", kw, &segment, &ring_offset, &slots, &seen,
                                     &fmt, &itemsize, &channels, &frame_limit))
        return -1;
    writer_release(w);
    if (slots < 2 || (slots & (slots - 1)) || itemsize < 1 || channels < 1 || frame_limit < 0
        || strlen(fmt) >= sizeof w->fmt) {
        PyErr_Format(PyExc_ValueError, "Writer: slots must be a power of two >= 2 (got %zd), itemsize and "
                     "channels >= 1 (got %zd, %zd), a format under 16 characters (got '%s')",
                     slots, itemsize, channels, fmt);
        return -1;
    }
    if (PyObject_GetBuffer(segment, &w->segment, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (PyObject_GetBuffer(seen, &w->seen, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&w->segment);
        return -1;
    }
    if (w->seen.len != SLEEPERS) {
        PyBuffer_Release(&w->seen);
        PyBuffer_Release(&w->segment);
        PyErr_Format(PyExc_ValueError, "Writer: seen must be %d bytes, got %zd", SLEEPERS, w->seen.len);
        return -1;
    }
    w->held = 1;
    w->base = (char *)w->segment.buf;
    w->size = w->segment.len;
    if (((uintptr_t)w->base & 7) || ring_offset < HEADER_BYTES || (ring_offset & 7)
        || ring_offset + slots * DESCRIPTOR_BYTES + 2 * SLEEPERS > w->size) {
        writer_release(w);
        PyErr_Format(PyExc_ValueError, "Writer: a ring of %zd slots at byte %zd does not lie in the segment's "
                     "%zd bytes past its header, 8-byte aligned", slots, ring_offset, w->size);
        return -1;
    }
    w->ring = w->base + ring_offset;
    w->sleepers = w->ring + slots * DESCRIPTOR_BYTES;
    w->mask = (uint64_t)(slots - 1);
    strcpy(w->fmt, fmt);
    w->itemsize = itemsize;
    w->channels = channels;
    w->sample_bytes = itemsize * channels;
    w->frame_limit = frame_limit;
    return 0;
}

static void
writer_dealloc(Writer *w)
{
    writer_release(w);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static int
same_format(const char *got, const char *want)
{
    if (got == NULL)
        got = "B";
    if (got[0] == '@' || (got[0] == '<' && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)
        || (got[0] == '>' && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__) || got[0] == '=')
        got++;
    return strcmp(got, want) == 0;
}

PyDoc_STRVAR(put_doc,
"put(data, t0, flags, offset, end, position, index, floor, slab, gen, frame_max, first) -> int\n\n"
"Publish one frame, as Publisher.write's Python steps do: copy data (C-contiguous, the stream's element\n"
"format, (n,) or (n, channels), n >= 1) to segment byte offset, write descriptor `position` (t0: seconds,\n"
"None for CLOCK_REALTIME now), store frame_max if n raised it, then position + 1 (a release store).  Then\n"
"the header's words: wake futex waiters (every bit if n raised frame_max or `first`: the frame starts a\n"
"slab; else the bit of position + 1),\n"
"look at the doorbell subscribers' sleeper tables as Ring.sleeping does (waking those asleep on the futex\n"
"word) and return n, or n + 2**32 when a doorbell notice is due (the caller sends it).  With version-2\n"
"notices or the broker cutting chunks, return -n: the caller tells them.  Return 0, having written nothing,\n"
"when the frame\n"
"is not such a buffer, t0 not a finite number or None, or over frame_limit: the caller's Python path takes\n"
"it (and says what was wrong); FULL (2**33), having written nothing, when such a frame does not fit before\n"
"end (0: no slab, or the slab's frames are all written): the caller starts a new slab and puts it again.");

static void
wake(char *word, uint32_t mask)
{
    if (mask == WAKE_ALL)
        syscall(SYS_futex, word, FUTEX_WAKE, 0x7FFFFFFF, NULL, NULL, 0);
    else
        syscall(SYS_futex, word, FUTEX_WAKE_BITSET, 0x7FFFFFFF, NULL, NULL, mask);
}

static int
all_zero(const unsigned char *table)
{
    for (int i = 0; i < SLEEPERS; i++)
        if (table[i])
            return 0;
    return 1;
}

static PyObject *
writer_put(Writer *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "put takes 12 arguments, got %zd", nargs);
        return NULL;
    }
    if (!w->held) {
        PyErr_SetString(PyExc_ValueError, "put on a closed Writer");
        return NULL;
    }
    double t0;
    PyObject *t0_obj = args[1];
    if (t0_obj == Py_None) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        t0 = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
    } else if (PyFloat_Check(t0_obj)) {  /* (numpy's float64 too) */
        t0 = PyFloat_AS_DOUBLE(t0_obj);
    } else if (PyLong_CheckExact(t0_obj)) {
        t0 = PyLong_AsDouble(t0_obj);
        if (t0 == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return PyLong_FromLong(0);
        }
    } else {
        return PyLong_FromLong(0);  /* (a bool, a numpy scalar, anything else: the Python path says) */
    }
    if (!isfinite(t0))
        return PyLong_FromLong(0);
    int64_t flags, offset, end, position, index, floor_, slab, gen, frame_max;
    if (as_i64(args[2], &flags) < 0 || as_i64(args[3], &offset) < 0 || as_i64(args[4], &end) < 0
        || as_i64(args[5], &position) < 0 || as_i64(args[6], &index) < 0 || as_i64(args[7], &floor_) < 0
        || as_i64(args[8], &slab) < 0 || as_i64(args[9], &gen) < 0 || as_i64(args[10], &frame_max) < 0)
        return NULL;
    int first = PyObject_IsTrue(args[11]);
    if (first < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return PyLong_FromLong(0);
    }
    Py_ssize_t n = view.ndim >= 1 ? view.shape[0] : 0;
    int plain = view.itemsize == w->itemsize && same_format(view.format, w->fmt) && n >= 1
        && ((view.ndim == 1 && w->channels == 1) || (view.ndim == 2 && view.shape[1] == w->channels))
        && view.len == n * w->sample_bytes && view.len <= w->frame_limit && n <= 0xFFFFFFFFLL;
    int full = plain && offset + view.len > end;  /* (end 0: no slab yet, or its frames are all written) */
    if (!plain || full || offset < HEADER_BYTES || end > (int64_t)(w->ring - w->base)) {
        PyBuffer_Release(&view);
        return PyLong_FromLongLong(full ? FULL : 0);
    }
    memcpy(w->base + offset, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    w->puts++;
    /* The descriptor (docs/protocol.md): not visible until the position, so its own order does not matter. */
    char *d = w->ring + ((uint64_t)position & w->mask) * DESCRIPTOR_BYTES;
    uint64_t u;
    u = (uint64_t)position; memcpy(d + 0, &u, 8);
    u = (uint64_t)index; memcpy(d + 8, &u, 8);
    memcpy(d + 16, &t0, 8);
    u = (uint64_t)offset; memcpy(d + 24, &u, 8);
    u = (uint64_t)floor_; memcpy(d + 32, &u, 8);
    uint32_t v;
    v = (uint32_t)n; memcpy(d + 40, &v, 4);
    v = (uint32_t)slab; memcpy(d + 44, &v, 4);
    v = (uint32_t)gen; memcpy(d + 48, &v, 4);
    v = (uint32_t)flags; memcpy(d + 52, &v, 4);
    u = 0; memcpy(d + 56, &u, 8);
    int grew = n > frame_max;
    if (grew)  /* (before the position: a subscriber's wake target counts frames of at most frame_max) */
        __atomic_store_n((uint32_t *)(w->base + FRAME_MAX_AT), (uint32_t)n, __ATOMIC_RELAXED);
    uint64_t next = (uint64_t)position + 1;
    /* Samples, descriptor, then the position (a release), and the position before the next frame's stores. */
    __atomic_store_n((uint64_t *)(w->base + POSITION_AT), next, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    uint32_t notices = __atomic_load_n((uint32_t *)(w->base + NOTICES_AT), __ATOMIC_RELAXED);
    uint32_t waiters = __atomic_load_n((uint32_t *)(w->base + FUTEX_AT), __ATOMIC_RELAXED);
    uint32_t frames = __atomic_load_n((uint32_t *)(w->base + FRAMES_AT), __ATOMIC_RELAXED);
    uint32_t doorbells = __atomic_load_n((uint32_t *)(w->base + DOORBELLS_AT), __ATOMIC_RELAXED);
    if (notices || frames)
        return PyLong_FromSsize_t(-n);
    /* Wake those whose next chunk this frame can complete (wake targets); every one when it raised frame_max or
     * starts a slab (a block subscriber asleep toward a later position posts its cursor once a slab). */
    uint32_t mask = grew || first ? WAKE_ALL : (uint32_t)1 << (next & 31);
    if (waiters)
        wake(w->base + POSITION_AT, mask);  /* (the kernel's futex_wake is a full barrier before it looks) */
    if (!doorbells)
        return PyLong_FromSsize_t(n);
    /* Doorbell subscribers: a full barrier (the wake's, else a fence), then the sleeper tables (core/ring.py:
     * Dekker's handshake).  The notice is the caller's to send (RING_NOW): only when a byte is set and the table
     * differs from the previous look's, which is kept in Ring.seen (Ring.sleeping does the same look). */
    if (!waiters)
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    unsigned char table[SLEEPERS];
    memcpy(table, w->sleepers, SLEEPERS);
    int ring_now = !all_zero(table) && memcmp(table, w->seen.buf, SLEEPERS) != 0;
    memcpy(w->seen.buf, table, SLEEPERS);
    memcpy(table, w->sleepers + SLEEPERS, SLEEPERS);
    if (!all_zero(table))
        wake(w->base + POSITION_AT, mask);  /* (after the look: the one above may precede their sleep) */
    return PyLong_FromLongLong(ring_now ? RING_NOW + n : (long long)n);
}

static PyObject *
writer_close(Writer *w, PyObject *unused)
{
    writer_release(w);
    Py_RETURN_NONE;
}

static PyMethodDef writer_methods[] = {
    {"put", (PyCFunction)(void (*)(void))writer_put, METH_FASTCALL, put_doc},
    {"close", (PyCFunction)writer_close, METH_NOARGS, "Release the segment (put refuses from then on)."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
writer_get_puts(Writer *w, void *closure)
{
    return PyLong_FromUnsignedLongLong(w->puts);
}

static PyGetSetDef writer_getset[] = {
    {"puts", (getter)writer_get_puts, NULL, "Frames this writer published.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "slabcast.core._hot.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Writer(segment, ring_offset, slots, seen, fmt, itemsize, channels, frame_limit): a publisher's "
              "frames into its stream's segment (a writable buffer it holds until close(); seen: Ring.seen).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)writer_init,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_methods = writer_methods,
    .tp_getset = writer_getset,
};

static PyMethodDef hot_methods[] = {
    {"futex_wait", (PyCFunction)(void (*)(void))hot_futex_wait, METH_FASTCALL, futex_wait_doc},
    {"futex_wake", (PyCFunction)(void (*)(void))hot_futex_wake, METH_FASTCALL, futex_wake_doc},
    {"barrier", hot_barrier, METH_NOARGS, barrier_doc},
    {"runs", (PyCFunction)(void (*)(void))hot_runs, METH_FASTCALL, runs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hot_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_hot",
    .m_doc = "The frame's path in C: futex waits and wakes, a full barrier, a publisher's frame (core/ring.py), "
              "the broker's look at the ring's descriptors (broker/state.py).",
    .m_size = 0,
    .m_methods = hot_methods,
};

PyMODINIT_FUNC
PyInit__hot(void)
{
    if (PyType_Ready(&WriterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&hot_module);
    if (m == NULL)
        return NULL;
    /* ABI: what core/ring.py checks before it takes this module (a module built from an older source is not
       used); raise it with any change of a function's arguments or results. */
    if (PyModule_AddObjectRef(m, "Writer", (PyObject *)&WriterType) < 0
        || PyModule_AddIntConstant(m, "RING_NOW", RING_NOW) < 0
        || PyModule_AddIntConstant(m, "FULL", FULL) < 0
        || PyModule_AddIntConstant(m, "ABI", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
