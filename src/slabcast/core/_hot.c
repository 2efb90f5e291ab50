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
 *   copy(to, at, data) -> None
 *   Writer(segment, ring_offset, slots, seen, fmt, itemsize, channels, frame_limit).put(data, t0, flags, offset,
 *       end, position, index, floor, slab, gen, frame_max, first) -> int
 *   Rechunker(size, clip, rate, sampler): core/rechunk.py's rules (.feed, .needed)
 *   Reader(segment, ring_offset, slots[, chunk, view_ref, frombuffer]).take_one(start, noticed, cur_slab, hist_slab,
 *       chunker) -> tuple | None;  .take_chunk(receiver) -> Chunk | tuple | None
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
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

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
#define SLEEPER_BIT 64  /* a futex sleeper table byte SLEEPER_BIT + b: asleep with the mask 1 << b only */
#define RING_NOW (1LL << 32)  /* put's result: send the doorbell notice (a sleeper byte changed) */
#define FULL (1LL << 33)      /* put's result: a plain frame that does not fit before end: a new slab first */
#define SWITCHED (1LL << 34)  /* put's result: ... so it went into the next slab the caller prepared */

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


PyDoc_STRVAR(reader_runs_doc,
"reader_runs(raw, noticed, hist_slab, hist_gen, hist_floor, sample_bytes) -> (entries, noticed)\n\n"
"A local subscriber's look at descriptors copied from the ring (raw: 64 bytes each), as\n"
"client/_local.py's _reader_runs does it: descriptors before stream index `noticed` skipped, a gap before\n"
"one past it as (noticed, index) and that frame flagged a discontinuity, the floor of slab hist_slab's\n"
"generation hist_gen lowered to hist_floor, and frames grouped into runs back to back in one slab (the\n"
"same slab, generation and end byte, no flag) as [index, slab, gen, offset, ns, t0s, flags, floor, end]\n"
"(ns and t0s lists).  Returns them in order and the stream index past the last frame.");

/* A run's entry gets the end byte of its last frame (its item 8 said its first frame's). */
static int
close_run(PyObject *run, uint64_t end)
{
    PyObject *e = PyLong_FromUnsignedLongLong(end);
    return e == NULL ? -1 : PyList_SetItem(run, 8, e);  /* (steals e, also when it fails) */
}

static PyObject *
hot_reader_runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "reader_runs takes 6 arguments, got %zd", nargs);
        return NULL;
    }
    /* Stream indices and bytes are u64, as in the descriptors (Python's twin has no bound): unsigned throughout.
     * The history's slab, generation and floor are -1 (or any negative) when there is none. */
    uint64_t noticed = PyLong_AsUnsignedLongLong(args[1]);
    if (noticed == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    long long hist[3];
    for (int k = 0; k < 3; k++) {
        hist[k] = PyLong_AsLongLong(args[k + 2]);
        if (hist[k] == -1 && PyErr_Occurred())
            return NULL;
    }
    long long hist_slab = hist[0], hist_gen = hist[1], hist_floor = hist[2];
    uint64_t sample_bytes = PyLong_AsUnsignedLongLong(args[5]);
    if (sample_bytes == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL, *list = NULL;
    PyObject *ns = NULL, *t0s = NULL, *run = NULL;  /* the open run, its lists (borrowed: the list holds them) */
    uint64_t run_slab = 0, run_gen = 0, run_end = 0;
    int open = 0;
    if (view.len % DESCRIPTOR_BYTES) {
        PyErr_Format(PyExc_ValueError, "reader_runs: raw must be whole descriptors of %d bytes, got %zd bytes",
                     DESCRIPTOR_BYTES, view.len);
        goto done;
    }
    list = PyList_New(0);
    if (list == NULL)
        goto done;
    const char *raw = (const char *)view.buf;
    Py_ssize_t count = view.len / DESCRIPTOR_BYTES;
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *d = raw + i * DESCRIPTOR_BYTES;
        uint64_t index, offset, floor_;
        uint32_t n, slab, gen, flags;
        double t0;
        memcpy(&index, d + 8, 8);
        memcpy(&t0, d + 16, 8);
        memcpy(&offset, d + 24, 8);
        memcpy(&floor_, d + 32, 8);
        memcpy(&n, d + 40, 4);
        memcpy(&slab, d + 44, 4);
        memcpy(&gen, d + 48, 4);
        memcpy(&flags, d + 52, 4);
        if (index < noticed)
            continue;  /* before this subscription's start (told of in its history) */
        if (index > noticed) {  /* lapped: the samples never seen */
            PyObject *gap = Py_BuildValue("(KK)", (unsigned long long)noticed, (unsigned long long)index);
            if (gap == NULL || PyList_Append(list, gap) < 0) {
                Py_XDECREF(gap);
                goto done;
            }
            Py_DECREF(gap);
            flags |= 1;  /* FLAG_DISCONTINUITY */
            if (open && close_run(run, run_end) < 0)
                goto done;
            open = 0;
        }
        if ((long long)slab == hist_slab && (long long)gen == hist_gen && hist_floor >= 0
            && (uint64_t)hist_floor < floor_)
            floor_ = (uint64_t)hist_floor;
        uint64_t end = offset + (uint64_t)n * sample_bytes;
        PyObject *k = PyLong_FromUnsignedLong(n), *t = PyFloat_FromDouble(t0);
        if (k == NULL || t == NULL) {
            Py_XDECREF(k);
            Py_XDECREF(t);
            goto done;
        }
        if (open && !flags && slab == run_slab && gen == run_gen && offset == run_end) {
            int rc = PyList_Append(ns, k) < 0 || PyList_Append(t0s, t) < 0 ? -1 : 0;
            Py_DECREF(k);
            Py_DECREF(t);
            if (rc < 0)
                goto done;
        }
        else {
            if (open && close_run(run, run_end) < 0) {
                Py_DECREF(k);
                Py_DECREF(t);
                goto done;
            }
            open = 0;
            ns = PyList_New(1);
            t0s = PyList_New(1);
            if (ns == NULL || t0s == NULL) {
                Py_XDECREF(ns);
                Py_XDECREF(t0s);
                Py_DECREF(k);
                Py_DECREF(t);
                goto done;
            }
            PyList_SET_ITEM(ns, 0, k);
            PyList_SET_ITEM(t0s, 0, t);
            /* ("N" takes the lists' references; the entry keeps them, we borrow them while the run is open) */
            PyObject *entry = Py_BuildValue("[KIIKNNIKK]", (unsigned long long)index, slab, gen,
                                            (unsigned long long)offset, ns, t0s, flags,
                                            (unsigned long long)floor_, (unsigned long long)end);
            if (entry == NULL || PyList_Append(list, entry) < 0) {
                Py_XDECREF(entry);
                goto done;
            }
            Py_DECREF(entry);
            run = entry;
            open = 1;
            run_slab = slab;
            run_gen = gen;
        }
        run_end = end;
        noticed = index + n;
    }
    if (open && close_run(run, run_end) < 0)
        goto done;
    result = Py_BuildValue("(OK)", list, (unsigned long long)noticed);
done:
    Py_XDECREF(list);
    PyBuffer_Release(&view);
    return result;
}


/* ------------------------------------------------------------------ the publisher's frame */

/* Frames of at least this many bytes go into the slab by non-temporal stores (x86-64). */
#define STREAM_MIN 65536

/* Copy a frame into its slab.  The pool is larger than the caches by design (it keeps history, and the writer
 * goes round it), so a frame's destination is cold: ordinary stores first read each line they fill.  Streaming
 * stores write whole lines without that read: on the 2-vCPU test machine 1 MiB into a 96 MiB pool 91-105 us
 * against 50 (memcpy / these), 64 KiB 3.6-6.6 against 3.0-3.3.  The lines end up in memory, not in the writer's
 * cache: a subscriber reading all of a frame reads it from there (64 KiB frames read whole: 1-2 us more a frame
 * in the subscriber, 2-3 us less in the publisher).  Below STREAM_MIN a frame is as often read at once as it is
 * small: memcpy.  The store fence orders the streaming stores before the descriptor and the position (a release
 * store orders ordinary stores only). */
static void
copy_frame(char *to, const char *from, size_t n, size_t stream_min)
{
#if defined(__x86_64__)
    if (n >= stream_min && n >= 64) {  /* (a frame shorter than a line: memcpy; the head never passes its end) */
        size_t head = (size_t)(-(uintptr_t)to) & 15;  /* to a 16-byte boundary */
        memcpy(to, from, head);
        to += head;
        from += head;
        n -= head;
        size_t i = 0;
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(from + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(from + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(from + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(from + i + 48));
            _mm_stream_si128((__m128i *)(to + i), a);
            _mm_stream_si128((__m128i *)(to + i + 16), b);
            _mm_stream_si128((__m128i *)(to + i + 32), c);
            _mm_stream_si128((__m128i *)(to + i + 48), d);
        }
        memcpy(to + i, from + i, n - i);
        _mm_sfence();
        return;
    }
#else
    (void)stream_min;
#endif
    memcpy(to, from, n);
}

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
    Py_ssize_t stream_min;  /* frames of this many bytes and more are copied by streaming stores (copy_frame) */
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
    w->stream_min = STREAM_MIN;
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
"end (0: no slab, or the slab's frames are all written): the caller starts a new slab and puts it again.\n\n"
"switch (optional; None: none): the next slab, prepared, as (offset, end, floor, slab, gen): a plain frame that\n"
"does not fit before end goes there instead, as that slab's first frame, and SWITCHED (2**34) is added to\n"
"the result (the caller then makes the slab change its own); FULL if it does not fit there either.");

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

/* Whether a wake with mask can wake a subscriber of the futex sleeper table (core/ring.py, wakes_a_sleeper): a
 * byte SLEEPER_BIT + b sleeps with the mask 1 << b only, any other one but 0 with every bit. */
static int
wakes_a_sleeper(const unsigned char *table, uint32_t mask)
{
    int bit = mask == WAKE_ALL ? -1 : __builtin_ctz(mask);
    for (int i = 0; i < SLEEPERS; i++) {
        unsigned b = table[i];
        if (b && (bit < 0 || b == SLEEPER_BIT + (unsigned)bit || b < SLEEPER_BIT || b >= SLEEPER_BIT + 32))
            return 1;
    }
    return 0;
}

static PyObject *
writer_put(Writer *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 12 && nargs != 13) {
        PyErr_Format(PyExc_TypeError, "put takes 12 or 13 arguments, got %zd", nargs);
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
    int64_t next_at[5];  /* the prepared next slab: offset, end, floor, slab, gen */
    int prepared = nargs == 13 && args[12] != Py_None;
    if (prepared) {
        if (!PyTuple_Check(args[12]) || PyTuple_GET_SIZE(args[12]) != 5) {
            PyErr_SetString(PyExc_TypeError, "put's switch must be None or (offset, end, floor, slab, gen)");
            return NULL;
        }
        for (int i = 0; i < 5; i++)
            if (as_i64(PyTuple_GET_ITEM(args[12], i), &next_at[i]) < 0)
                return NULL;
    }
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
    long long switched = 0;
    if (full && prepared && next_at[0] + view.len <= next_at[1]) {
        /* Into the next slab, as its first frame: what the caller's slab change would have put us to. */
        offset = next_at[0];
        end = next_at[1];
        floor_ = next_at[2];
        slab = next_at[3];
        gen = next_at[4];
        first = 1;
        full = 0;
        switched = SWITCHED;
    }
    if (!plain || full || offset < HEADER_BYTES || end > (int64_t)(w->ring - w->base)) {
        PyBuffer_Release(&view);
        return PyLong_FromLongLong(full ? FULL : 0);
    }
    copy_frame(w->base + offset, view.buf, (size_t)view.len, (size_t)w->stream_min);
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
        return PyLong_FromLongLong(-(switched + n));
    /* Wake those whose next chunk this frame can complete (wake targets); every one when it raised frame_max or
     * starts a slab (a block subscriber asleep toward a later position posts its cursor once a slab). */
    uint32_t mask = grew || first ? WAKE_ALL : (uint32_t)1 << (next & 31);
    if (waiters)
        wake(w->base + POSITION_AT, mask);  /* (the kernel's futex_wake is a full barrier before it looks) */
    if (!doorbells)
        return PyLong_FromLongLong(switched + n);
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
    if (wakes_a_sleeper(table, mask))
        wake(w->base + POSITION_AT, mask);  /* (after the look: the one above may precede their sleep) */
    return PyLong_FromLongLong(switched + (ring_now ? RING_NOW + n : (long long)n));
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

static PyObject *
writer_get_stream_min(Writer *w, void *closure)
{
    return PyLong_FromSsize_t(w->stream_min);
}

static int
writer_set_stream_min(Writer *w, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "stream_min cannot be deleted");
        return -1;
    }
    Py_ssize_t v = PyBool_Check(value) ? -1 : PyLong_AsSsize_t(value);
    if (v < 0) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "stream_min must be an int >= 0 (bytes), got %R", value);
        }
        return -1;
    }
    w->stream_min = v;
    return 0;
}

static PyGetSetDef writer_getset[] = {
    {"puts", (getter)writer_get_puts, NULL, "Frames this writer published.", NULL},
    {"stream_min", (getter)writer_get_stream_min, (setter)writer_set_stream_min,
     "Frames of this many bytes and more are copied by streaming (non-temporal) stores on x86-64 (default 65536; "
     "0: every frame of 64 bytes or more, as the ordering stress test does).", NULL},
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

/* ------------------------------------------------------------------ a subscriber's chunks */

/* core/rechunk.py's rules, the same steps in the same order and the same double arithmetic (setup.py builds with
 * -ffp-contract=off: no fused multiply-add where Python rounds twice).  tests/unit/test_rechunk_compiled.py feeds
 * both the same random frames and compares every chunk, bit for bit. */
#define RECHUNK_EPS 1e-9

typedef struct {
    PyObject_HEAD
    int64_t size;
    int clip;
    int has_rate;
    double rate;
    PyObject *sampler;      /* None or a callable */
    int has_start;
    int64_t start;          /* index of the first pending sample */
    double t0;              /* time of the first pending sample */
    int has_pause_until;
    double pause_until;     /* no rate: the sampler's pause ends at this frame time */
    int has_pause_at;
    int64_t pause_at;       /* with a rate: the pause ends at this stream index */
    double last_t0;
    int jumped;
} Rechunker;

static int
rechunker_init(Rechunker *r, PyObject *args, PyObject *kwargs)
{
    long long size;
    int clip = 0;
    PyObject *rate = Py_None, *sampler = Py_None;
    static char *kw[] = {"size", "clip", "rate", "sampler", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "L|pOO:Rechunker", kw, &size, &clip, &rate, &sampler))
        return -1;
    if (size <= 0) {
        PyErr_Format(PyExc_ValueError, "size must be a positive integer number of samples, got %lld", size);
        return -1;
    }
    double v = 0.0;
    if (rate != Py_None) {
        v = PyFloat_AsDouble(rate);
        if (v == -1.0 && PyErr_Occurred())
            return -1;
    }
    r->size = size;
    r->clip = clip;
    r->has_rate = v != 0.0;  /* (Python: float(rate) if rate else None) */
    r->rate = v;
    Py_INCREF(sampler);
    Py_XSETREF(r->sampler, sampler);
    r->has_start = 0;
    r->start = 0;
    r->t0 = 0.0;
    r->has_pause_until = 0;
    r->has_pause_at = 0;
    r->last_t0 = -INFINITY;
    r->jumped = 0;
    return 0;
}

static PyObject *
rechunker_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    /* A valid rechunker before __init__ (a subclass's __init__ may never call ours): size 1, no sampler. */
    Rechunker *r = (Rechunker *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    r->size = 1;
    r->sampler = Py_NewRef(Py_None);
    r->last_t0 = -INFINITY;
    return (PyObject *)r;
}

static int
rechunker_traverse(Rechunker *r, visitproc visit, void *arg)
{
    Py_VISIT(r->sampler);
    return 0;
}

static int
rechunker_clear(Rechunker *r)
{
    Py_CLEAR(r->sampler);
    return 0;
}

static void
rechunker_dealloc(Rechunker *r)
{
    PyObject_GC_UnTrack(r);
    rechunker_clear(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* Append (start, length, t0) to out; -1 with an exception set. */
static int
append_chunk(PyObject *out, int64_t start, int64_t length, double t0)
{
    PyObject *item = Py_BuildValue("(LLd)", (long long)start, (long long)length, t0);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(out, item);
    Py_DECREF(item);
    return rc;
}

/* Rechunker.feed's steps: the chunks frame (index, n, t0) completes appended to out; -1 with an exception set (a
 * sampler that raised or returned a bad value: what was cut so far stays cut, as in Python). */
static int
rechunk_feed(Rechunker *r, int64_t index, int64_t n, double t0, PyObject *out)
{
    int64_t end = index + n;
    if (!r->has_pause_until && !r->has_pause_at && r->has_start && end - r->start < r->size)
        return 0;
    if (!r->has_rate) {
        if (t0 < r->last_t0 && r->has_pause_until) {
            r->has_pause_until = 0;
            r->jumped = 1;
        }
        r->last_t0 = t0;
    }
    int64_t pos = index;
    for (;;) {
        if (r->has_pause_until) {
            if (pos != index || t0 < r->pause_until)
                break;
            r->has_pause_until = 0;
        }
        else if (r->has_pause_at) {
            if (r->pause_at >= end)
                break;
            if (r->pause_at > pos)
                pos = r->pause_at;
            r->has_pause_at = 0;
        }
        if (!r->has_start) {
            r->has_start = 1;
            r->start = pos;
            r->t0 = r->has_rate ? t0 + (double)(pos - index) / r->rate : t0;
        }
        int64_t start = r->start;
        if (end - start < r->size)
            break;
        int64_t length = r->clip ? r->size : end - start;
        if (append_chunk(out, start, length, r->t0) < 0)
            return -1;
        int64_t stop = start + length;
        if (r->sampler != NULL && r->sampler != Py_None) {  /* (NULL: cleared by the collector) */
            PyObject *sampler = Py_NewRef(r->sampler);  /* (held across the call: it may reset this rechunker) */
            PyObject *got = PyObject_CallNoArgs(sampler);
            Py_DECREF(sampler);
            if (got == NULL)
                return -1;
            PyObject *f = PyNumber_Float(got);
            Py_DECREF(got);
            if (f == NULL)
                return -1;
            double pause = PyFloat_AS_DOUBLE(f);
            if (!(pause >= 0 && pause < INFINITY)) {  /* (also NaN; inf: as a constant sampler=inf, refused) */
                PyErr_Format(PyExc_ValueError, "sampler must return a finite number of seconds >= 0, got %R", f);
                Py_DECREF(f);
                return -1;
            }
            if (r->has_rate) {
                Py_DECREF(f);
                double at = ceil(pause * r->rate - RECHUNK_EPS);
                if (isinf(at) || isnan(at)) {  /* (Python: math.ceil says so) */
                    PyErr_SetString(isnan(at) ? PyExc_ValueError : PyExc_OverflowError,
                                    isnan(at) ? "cannot convert float NaN to integer"
                                              : "cannot convert float infinity to integer");
                    return -1;
                }
                /* Python's ints hold any pause; an index never reaches INT64_MAX, so that is "never" here. */
                int64_t pause_at;
                if (!(at > -9.2e18))
                    pause_at = INT64_MIN;  /* (a negative rate, refused everywhere: over at once, as in Python) */
                else if (!(at < 9.2e18) || __builtin_add_overflow(stop, (int64_t)at, &pause_at))
                    pause_at = INT64_MAX;
                r->has_pause_at = 1;
                r->pause_at = pause_at;
            }
            else {
                Py_DECREF(f);
                r->has_pause_until = 1;
                r->pause_until = t0 + pause;
            }
            r->has_start = 0;
            pos = stop;
            continue;
        }
        if (stop >= end) {
            r->has_start = 0;
            break;
        }
        r->start = pos = stop;
        r->t0 = r->has_rate ? t0 + (double)(stop - index) / r->rate : t0;
    }
    return 0;
}

PyDoc_STRVAR(feed_until_doc,
"feed_until(index, ns, t0s, i) -> (j, index_j, chunks)\n\n"
"feed() the frames of a run from its frame i on (ns: samples per frame, t0s: their times in seconds; frame i\n"
"starts at stream index `index`, the next right after it), up to the first one that completes a chunk, or\n"
"the run's last: that frame's place j in the run, its stream index and what feed() returned for it.");

static PyObject *
rechunker_feed_until(Rechunker *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "feed_until takes 4 arguments, got %zd", nargs);
        return NULL;
    }
    long long index = PyLong_AsLongLong(args[0]);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t i = PyLong_AsSsize_t(args[3]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    PyObject *ns = PySequence_Fast(args[1], "feed_until: ns must be a sequence");
    if (ns == NULL)
        return NULL;
    PyObject *t0s = PySequence_Fast(args[2], "feed_until: t0s must be a sequence");
    if (t0s == NULL) {
        Py_DECREF(ns);
        return NULL;
    }
    PyObject *result = NULL, *out = NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(ns);
    if (i < 0 || i >= count || PySequence_Fast_GET_SIZE(t0s) != count) {
        PyErr_Format(PyExc_ValueError, "feed_until: frame %zd of a run of %zd frames (%zd times)", i, count,
                     PySequence_Fast_GET_SIZE(t0s));
        goto done;
    }
    out = PyList_New(0);
    if (out == NULL)
        goto done;
    PyObject **nv = PySequence_Fast_ITEMS(ns), **tv = PySequence_Fast_ITEMS(t0s);
    for (;; i++) {
        long long n = PyLong_AsLongLong(nv[i]);
        if (n == -1 && PyErr_Occurred())
            goto done;
        double t0 = PyFloat_AsDouble(tv[i]);
        if (t0 == -1.0 && PyErr_Occurred())
            goto done;
        if (rechunk_feed(r, index, n, t0, out) < 0)
            goto done;
        if (PyList_GET_SIZE(out) || i == count - 1)
            break;
        index += n;
    }
    result = Py_BuildValue("(nLO)", i, index, out);
done:
    Py_XDECREF(out);
    Py_DECREF(ns);
    Py_DECREF(t0s);
    return result;
}

PyDoc_STRVAR(feed_doc,
"feed(index, n, t0) -> list\n\n"
"core/rechunk.py's Rechunker.feed: the chunks a frame of n samples from stream index `index` at time t0\n"
"(seconds) completes, as (start_index, length, t0), oldest first.");

static PyObject *
rechunker_feed(Rechunker *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "feed takes 3 arguments, got %zd", nargs);
        return NULL;
    }
    long long index = PyLong_AsLongLong(args[0]);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    long long n = PyLong_AsLongLong(args[1]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    double t0 = PyFloat_AsDouble(args[2]);
    if (t0 == -1.0 && PyErr_Occurred())
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (rechunk_feed(r, index, n, t0, out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

PyDoc_STRVAR(needed_doc,
"needed(end) -> int | None\n\n"
"core/rechunk.py's Rechunker.needed: samples past stream index `end` the next chunk needs, at least; None\n"
"when that depends on the frames' times (a sampler's pause without a rate).");

static PyObject *
rechunker_needed(Rechunker *r, PyObject *arg)
{
    long long end = PyLong_AsLongLong(arg);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    if (r->has_pause_until)
        Py_RETURN_NONE;
    int64_t start;
    if (r->has_start)
        start = r->start;
    else if (!r->has_pause_at)
        start = end;
    else
        start = r->pause_at > end ? r->pause_at : end;
    return PyLong_FromLongLong(start + r->size - end);
}

/* Optional attributes: None or a value. */
static PyObject *
opt_int(int has, int64_t v)
{
    if (!has)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(v);
}

static int
set_opt_int(PyObject *value, int *has, int64_t *v, const char *what)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "%s cannot be deleted", what);
        return -1;
    }
    if (value == Py_None) {
        *has = 0;
        return 0;
    }
    long long x = PyLong_AsLongLong(value);
    if (x == -1 && PyErr_Occurred())
        return -1;
    *v = x;
    *has = 1;
    return 0;
}

static int
set_double(PyObject *value, double *v, const char *what)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "%s cannot be deleted", what);
        return -1;
    }
    double x = PyFloat_AsDouble(value);
    if (x == -1.0 && PyErr_Occurred())
        return -1;
    *v = x;
    return 0;
}

static PyObject *get_start(Rechunker *r, void *c) { return opt_int(r->has_start, r->start); }
static int set_start(Rechunker *r, PyObject *v, void *c) { return set_opt_int(v, &r->has_start, &r->start, "start"); }
static PyObject *get_pause_at(Rechunker *r, void *c) { return opt_int(r->has_pause_at, r->pause_at); }
static int set_pause_at(Rechunker *r, PyObject *v, void *c)
{
    return set_opt_int(v, &r->has_pause_at, &r->pause_at, "pause_at");
}
static PyObject *get_pause_until(Rechunker *r, void *c)
{
    if (!r->has_pause_until)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(r->pause_until);
}
static int set_pause_until(Rechunker *r, PyObject *v, void *c)
{
    if (v == Py_None) {
        r->has_pause_until = 0;
        return 0;
    }
    if (set_double(v, &r->pause_until, "pause_until") < 0)
        return -1;
    r->has_pause_until = 1;
    return 0;
}
static PyObject *get_t0(Rechunker *r, void *c) { return PyFloat_FromDouble(r->t0); }
static int set_t0(Rechunker *r, PyObject *v, void *c) { return set_double(v, &r->t0, "t0"); }
static PyObject *get_last_t0(Rechunker *r, void *c) { return PyFloat_FromDouble(r->last_t0); }
static int set_last_t0(Rechunker *r, PyObject *v, void *c) { return set_double(v, &r->last_t0, "last_t0"); }
static PyObject *get_jumped(Rechunker *r, void *c) { return PyBool_FromLong(r->jumped); }
static int set_jumped(Rechunker *r, PyObject *v, void *c)
{
    int x = v == NULL ? -1 : PyObject_IsTrue(v);
    if (x < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_AttributeError, "jumped cannot be deleted");
        return -1;
    }
    r->jumped = x;
    return 0;
}
static PyObject *get_size(Rechunker *r, void *c) { return PyLong_FromLongLong(r->size); }
static PyObject *get_clip(Rechunker *r, void *c) { return PyBool_FromLong(r->clip); }
static PyObject *get_rate(Rechunker *r, void *c)
{
    if (!r->has_rate)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(r->rate);
}
static PyObject *get_sampler(Rechunker *r, void *c) { return Py_NewRef(r->sampler ? r->sampler : Py_None); }

static PyGetSetDef rechunker_getset[] = {
    {"size", (getter)get_size, NULL, "Chunk size in samples.", NULL},
    {"clip", (getter)get_clip, NULL, "Every chunk exactly size samples, the remainder carried.", NULL},
    {"rate", (getter)get_rate, NULL, "Samples per second, or None.", NULL},
    {"sampler", (getter)get_sampler, NULL, "Seconds to skip after each chunk (a callable), or None.", NULL},
    {"start", (getter)get_start, (setter)set_start, "Index of the first pending sample, or None.", NULL},
    {"t0", (getter)get_t0, (setter)set_t0, "Time of the first pending sample.", NULL},
    {"pause_until", (getter)get_pause_until, (setter)set_pause_until, "No rate: the pause ends at this frame time.",
     NULL},
    {"pause_at", (getter)get_pause_at, (setter)set_pause_at, "With a rate: the pause ends at this index.", NULL},
    {"last_t0", (getter)get_last_t0, (setter)set_last_t0, "The previous frame's time.", NULL},
    {"jumped", (getter)get_jumped, (setter)set_jumped, "The schedule restarted on a clock step back.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef rechunker_methods[] = {
    {"feed", (PyCFunction)(void (*)(void))rechunker_feed, METH_FASTCALL, feed_doc},
    {"feed_until", (PyCFunction)(void (*)(void))rechunker_feed_until, METH_FASTCALL, feed_until_doc},
    {"needed", (PyCFunction)rechunker_needed, METH_O, needed_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RechunkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "slabcast.core._hot.Rechunker",
    .tp_basicsize = sizeof(Rechunker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Rechunker(size, clip=False, rate=None, sampler=None): core/rechunk.py's rules, compiled.",
    .tp_new = rechunker_new,
    .tp_init = (initproc)rechunker_init,
    .tp_dealloc = (destructor)rechunker_dealloc,
    .tp_traverse = (traverseproc)rechunker_traverse,
    .tp_clear = (inquiry)rechunker_clear,
    .tp_methods = rechunker_methods,
    .tp_getset = rechunker_getset,
};


/* ------------------------------------------------------------------ a subscriber's look at the ring */

typedef struct {
    PyObject_HEAD
    Py_buffer segment;      /* the stream's segment (read-only is enough); released by close() */
    int held;
    const char *header;     /* the segment's first byte: the position at POSITION_AT */
    const char *ring;       /* the first descriptor */
    uint64_t mask;          /* slots - 1 */
    uint64_t slots;
    PyObject *chunk_type;   /* take_chunk's: the Chunk class, the view's weak reference class, numpy.frombuffer */
    PyObject *view_ref;
    PyObject *frombuffer;
} Reader;

static void
reader_release(Reader *r)
{
    if (r->held) {
        PyBuffer_Release(&r->segment);
        r->held = 0;
        r->header = r->ring = NULL;
    }
}

static int
reader_init(Reader *r, PyObject *args, PyObject *kwargs)
{
    PyObject *segment, *chunk_type = NULL, *view_ref = NULL, *frombuffer = NULL;
    Py_ssize_t ring_offset, slots;
    static char *kw[] = {"segment", "ring_offset", "slots", "chunk", "view_ref", "frombuffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Onn|OOO:Reader", kw, &segment, &ring_offset, &slots, &chunk_type,
                                     &view_ref, &frombuffer))
        return -1;
    if (r->held || r->chunk_type != NULL) {  /* (take_chunk uses what it was made with while it calls Python code) */
        PyErr_SetString(PyExc_TypeError, "Reader: already made; make another");
        return -1;
    }
    if ((chunk_type != NULL || view_ref != NULL || frombuffer != NULL)
        && !(chunk_type != NULL && view_ref != NULL && frombuffer != NULL && PyCallable_Check(chunk_type)
             && PyCallable_Check(view_ref) && PyCallable_Check(frombuffer))) {
        PyErr_SetString(PyExc_TypeError, "Reader: chunk, view_ref and frombuffer go together, each a callable");
        return -1;
    }
    Py_XINCREF(chunk_type);
    Py_XINCREF(view_ref);
    Py_XINCREF(frombuffer);
    Py_XSETREF(r->chunk_type, chunk_type);
    Py_XSETREF(r->view_ref, view_ref);
    Py_XSETREF(r->frombuffer, frombuffer);
    if (slots < 2 || (slots & (slots - 1))) {
        PyErr_Format(PyExc_ValueError, "Reader: slots must be a power of two >= 2, got %zd", slots);
        return -1;
    }
    if (PyObject_GetBuffer(segment, &r->segment, PyBUF_SIMPLE) < 0)
        return -1;
    r->held = 1;
    if (((uintptr_t)r->segment.buf & 7) || ring_offset < HEADER_BYTES || (ring_offset & 7)
        || ring_offset + slots * DESCRIPTOR_BYTES > r->segment.len) {
        Py_ssize_t len = r->segment.len;
        reader_release(r);
        PyErr_Format(PyExc_ValueError, "Reader: a ring of %zd slots at byte %zd does not lie in the segment's "
                     "%zd bytes past its header, 8-byte aligned", slots, ring_offset, len);
        return -1;
    }
    r->header = (const char *)r->segment.buf;
    r->ring = r->header + ring_offset;
    r->mask = (uint64_t)(slots - 1);
    r->slots = (uint64_t)slots;
    return 0;
}

static void
reader_dealloc(Reader *r)
{
    reader_release(r);
    Py_CLEAR(r->chunk_type);
    Py_CLEAR(r->view_ref);
    Py_CLEAR(r->frombuffer);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

PyDoc_STRVAR(take_one_doc,
"take_one(start, noticed, cur_slab, hist_slab, chunker) -> tuple | None\n\n"
"A subscriber that keeps up, in one call (client/_local.py, LocalReceiver._take_one): descriptor `start`\n"
"when it is the only one published past `start` (as Ring.read_one), continues what was read (index ==\n"
"noticed, no flags, the pending chunk's first sample not before the slab's floor) and is not the first frame\n"
"of slab hist_slab (the slab a history ends in) unless that is cur_slab: fed to chunker (a compiled\n"
"Rechunker).  Returns (index, n, t0, offset, slab, gen, chunks), chunks as feed returns them; None, having\n"
"changed nothing, otherwise (the caller's Python steps take it).");

/* take_one's steps, given C values (take_one and take_chunk): the tuple, None, or NULL with an exception set. */
static PyObject *
take_one_at(Reader *r, uint64_t start, long long noticed, long cur_slab, long hist_slab, Rechunker *chunker)
{
    if (!r->held) {
        PyErr_SetString(PyExc_ValueError, "take_one on a closed Reader");
        return NULL;
    }
    const uint64_t *position = (const uint64_t *)(r->header + POSITION_AT);
    /* The position (an acquire: the descriptor it publishes is visible after it), the descriptor copied, then
     * the position again after an acquire fence: below start + slots, no slot copied was being overwritten. */
    if (__atomic_load_n(position, __ATOMIC_ACQUIRE) != start + 1)
        Py_RETURN_NONE;
    char d[DESCRIPTOR_BYTES];
    memcpy(d, r->ring + (start & r->mask) * DESCRIPTOR_BYTES, DESCRIPTOR_BYTES);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(position, __ATOMIC_RELAXED) - start >= r->slots)
        Py_RETURN_NONE;
    /* u64 seq, u64 index, f64 t0, u64 offset, u64 floor, u32 n, slab, gen, flags */
    uint64_t index, offset, floor;
    uint32_t n, slab, gen, flags;
    double t0;
    memcpy(&index, d + 8, 8);
    memcpy(&t0, d + 16, 8);
    memcpy(&offset, d + 24, 8);
    memcpy(&floor, d + 32, 8);
    memcpy(&n, d + 40, 4);
    memcpy(&slab, d + 44, 4);
    memcpy(&gen, d + 48, 4);
    memcpy(&flags, d + 52, 4);
    if (flags || (long long)index != noticed || (chunker->has_start && (uint64_t)chunker->start < floor))
        Py_RETURN_NONE;
    if ((long)slab != cur_slab && (long)slab == hist_slab)
        Py_RETURN_NONE;  /* (the slab a history ends in: its floor may be the broker's) */
    PyObject *chunks = PyList_New(0);
    if (chunks == NULL)
        return NULL;
    if (rechunk_feed(chunker, (int64_t)index, (int64_t)n, t0, chunks) < 0) {
        Py_DECREF(chunks);
        return NULL;
    }
    return Py_BuildValue("(KIdKIIN)", (unsigned long long)index, (unsigned int)n, t0, (unsigned long long)offset,
                         (unsigned int)slab, (unsigned int)gen, chunks);
}

static PyObject *
reader_take_one(Reader *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "take_one takes 5 arguments, got %zd", nargs);
        return NULL;
    }
    if (!PyObject_TypeCheck(args[4], &RechunkerType)) {
        PyErr_Format(PyExc_TypeError, "take_one: chunker must be a compiled Rechunker, got %R", Py_TYPE(args[4]));
        return NULL;
    }
    unsigned long long start = PyLong_AsUnsignedLongLong(args[0]);
    if (start == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    long long noticed = PyLong_AsLongLong(args[1]);
    if (noticed == -1 && PyErr_Occurred())
        return NULL;
    long cur_slab = PyLong_AsLong(args[2]);
    if (cur_slab == -1 && PyErr_Occurred())
        return NULL;
    long hist_slab = PyLong_AsLong(args[3]);
    if (hist_slab == -1 && PyErr_Occurred())
        return NULL;
    return take_one_at(r, start, noticed, cur_slab, hist_slab, (Rechunker *)args[4]);
}

/* Attribute names take_chunk reads and writes (interned at import). */
static PyObject *A_rseq, *A_noticed, *A_cur_slab, *A_hist_floor, *A_chunker, *A_sampler_error, *A_jumped, *A_policy,
    *A_ready, *A_max_inflight, *A_leases, *A_seq, *A_cursor, *A_last, *A_posted, *A_mm, *A_dtype, *A_channels,
    *A_on_dead, *A_received, *A_last_seq, *A_timestamps, *A_geometry, *A_info, *A_on_release, *A_sample_bytes,
    *A_handed, *A_released, *A_guard, *A_locks, *A_slab_of, *A_refs, *A_acquire, *A_release, *A_time_at, *A_reshape,
    *A_seq_field, *S_drop;

static int
intern_names(void)
{
#define NAME(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    NAME(A_rseq, "_rseq"); NAME(A_noticed, "_noticed"); NAME(A_cur_slab, "_cur_slab");
    NAME(A_hist_floor, "_hist_floor"); NAME(A_chunker, "_chunker"); NAME(A_sampler_error, "_sampler_error");
    NAME(A_jumped, "jumped"); NAME(A_policy, "policy"); NAME(A_ready, "_ready"); NAME(A_max_inflight, "_max_inflight");
    NAME(A_leases, "_leases"); NAME(A_seq, "_seq"); NAME(A_cursor, "_cursor"); NAME(A_last, "_last");
    NAME(A_posted, "_posted"); NAME(A_mm, "_mm"); NAME(A_dtype, "_dtype"); NAME(A_channels, "_channels");
    NAME(A_on_dead, "_on_dead"); NAME(A_received, "_received"); NAME(A_last_seq, "_last_seq");
    NAME(A_timestamps, "_timestamps"); NAME(A_geometry, "_geometry"); NAME(A_info, "_info");
    NAME(A_on_release, "_on_release"); NAME(A_sample_bytes, "_sample_bytes"); NAME(A_handed, "handed");
    NAME(A_released, "released"); NAME(A_guard, "guard"); NAME(A_locks, "locks"); NAME(A_slab_of, "slab_of");
    NAME(A_refs, "refs"); NAME(A_acquire, "acquire"); NAME(A_release, "release"); NAME(A_time_at, "time_at");
    NAME(A_reshape, "reshape"); NAME(A_seq_field, "seq"); NAME(S_drop, "drop");
#undef NAME
    return 0;
}

/* getattr(obj, name) as a C long long; -1 with an exception set on failure (*ok = 0). */
static long long
attr_ll(PyObject *obj, PyObject *name, int *ok)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        *ok = 0;
        return -1;
    }
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        *ok = 0;
    return x;
}

static int
set_ll(PyObject *obj, PyObject *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return rc;
}

PyDoc_STRVAR(take_chunk_doc,
"take_chunk(rx) -> Chunk | tuple | None\n\n"
"LocalReceiver.recv's step for a subscriber that keeps up (client/_local.py), in one call: take_one with the\n"
"receiver's own _rseq, _noticed, _cur_slab, _hist_floor and _chunker; then, when the frame completes exactly one\n"
"chunk in the slab being read (its lease held with the descriptor's generation, under the leases' guard), the\n"
"cursor posted for that slab, no sampler error, and a drop subscriber with room, what _take_one, _cut_chunk and\n"
"_hand_out do for it: the receiver's state, the lease, the chunk's view, and the Chunk (built with the chunk,\n"
"view_ref and frombuffer this Reader was made with).  Otherwise take_one's tuple, the receiver unchanged but its\n"
"chunker fed (the caller finishes as for take_one), or None with nothing changed.  An exception after the feed\n"
"(the leases' guard interrupted, no memory) leaves the frame unread: the next call feeds it again.  Needs a\n"
"Reader made with chunk, view_ref and frombuffer, for a LocalReceiver and its Leases themselves (a subclass'\n"
"methods are not called).");

static PyObject *
reader_take_chunk(Reader *r, PyObject *rx)
{
    if (r->chunk_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "take_chunk needs a Reader made with chunk, view_ref and frombuffer");
        return NULL;
    }
    int ok = 1;
    long long rseq = attr_ll(rx, A_rseq, &ok);
    long long noticed = ok ? attr_ll(rx, A_noticed, &ok) : 0;
    long long cur_slab = ok ? attr_ll(rx, A_cur_slab, &ok) : 0;
    if (!ok)
        return NULL;
    PyObject *hist = PyObject_GetAttr(rx, A_hist_floor);
    if (hist == NULL)
        return NULL;
    PyObject *hist0 = PySequence_GetItem(hist, 0);
    Py_DECREF(hist);
    if (hist0 == NULL)
        return NULL;
    long hist_slab = PyLong_AsLong(hist0);
    Py_DECREF(hist0);
    if (hist_slab == -1 && PyErr_Occurred())
        return NULL;
    PyObject *chunker = PyObject_GetAttr(rx, A_chunker);
    if (chunker == NULL)
        return NULL;
    if (!PyObject_TypeCheck(chunker, &RechunkerType)) {
        PyErr_Format(PyExc_TypeError, "take_chunk: the chunker must be a compiled Rechunker, got %R", Py_TYPE(chunker));
        Py_DECREF(chunker);
        return NULL;
    }
    PyObject *got = take_one_at(r, (uint64_t)rseq, noticed, (long)cur_slab, hist_slab, (Rechunker *)chunker);
    if (got == NULL || got == Py_None) {
        Py_DECREF(chunker);
        return got;
    }
    /* (index, n, t0, offset, slab, gen, chunks) */
    PyObject *chunks = PyTuple_GET_ITEM(got, 6);
    long long slab = PyLong_AsLongLong(PyTuple_GET_ITEM(got, 4));
    if (PyList_GET_SIZE(chunks) != 1 || slab != cur_slab)
        goto slow;
    /* What _cut_chunk would refuse or count (and the ACK _take_one would send) is the Python steps' own. */
    PyObject *v = PyObject_GetAttr(rx, A_sampler_error);
    if (v == NULL)
        goto fail;
    int clean = v == Py_None;
    Py_DECREF(v);
    if (!clean)
        goto slow;
    long long posted = attr_ll(rx, A_posted, &ok);
    if (!ok)
        goto fail;
    if (posted != slab)
        goto slow;
    PyObject *leases = PyObject_GetAttr(rx, A_leases);
    if (leases == NULL)
        goto fail;
    PyObject *policy = PyObject_GetAttr(rx, A_policy);
    if (policy == NULL) {
        Py_DECREF(leases);
        goto fail;
    }
    int drop = PyUnicode_Check(policy) && PyUnicode_Compare(policy, S_drop) == 0;
    Py_DECREF(policy);
    if (drop) {
        PyObject *ready = PyObject_GetAttr(rx, A_ready);
        Py_ssize_t queued = ready == NULL ? -1 : PyObject_Length(ready);
        Py_XDECREF(ready);
        long long handed = queued < 0 ? 0 : attr_ll(leases, A_handed, &ok);
        long long released = queued < 0 || !ok ? 0 : attr_ll(leases, A_released, &ok);
        long long most = queued < 0 || !ok ? 0 : attr_ll(rx, A_max_inflight, &ok);
        if (queued < 0 || !ok) {
            Py_DECREF(leases);
            goto fail;
        }
        if (queued + handed - released >= most) {
            Py_DECREF(leases);
            goto slow;  /* (dropped: counted by _cut_chunk) */
        }
    }
    /* The lease: the slab's entry [generation, chunks], one more chunk, under the guard (leases.claim's fast case). */
    long long gen = PyLong_AsLongLong(PyTuple_GET_ITEM(got, 5));
    PyObject *guard = PyObject_GetAttr(leases, A_guard);
    if (guard == NULL) {
        Py_DECREF(leases);
        goto fail;
    }
    PyObject *res = PyObject_CallMethodNoArgs(guard, A_acquire);
    if (res == NULL) {
        Py_DECREF(guard);
        Py_DECREF(leases);
        goto fail;
    }
    Py_DECREF(res);
    int claimed = 0;
    PyObject *locks = PyObject_GetAttr(leases, A_locks);
    PyObject *slab_o = PyTuple_GET_ITEM(got, 4);
    if (locks != NULL && PyDict_Check(locks)) {
        PyObject *entry = PyDict_GetItemWithError(locks, slab_o);  /* (borrowed) */
        if (entry != NULL && PyList_CheckExact(entry) && PyList_GET_SIZE(entry) == 2) {
            long long held_gen = PyLong_AsLongLong(PyList_GET_ITEM(entry, 0));
            long long count = PyLong_AsLongLong(PyList_GET_ITEM(entry, 1));
            if (!PyErr_Occurred() && held_gen == gen) {
                PyObject *more = PyLong_FromLongLong(count + 1);
                if (more != NULL) {
                    PyList_SetItem(entry, 1, more);  /* (steals more) */
                    claimed = 1;
                }
            }
        }
    }
    Py_XDECREF(locks);
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    int failed = PyErr_Occurred() != NULL;
    if (failed)
        PyErr_Fetch(&et, &ev, &tb);
    res = PyObject_CallMethodNoArgs(guard, A_release);
    Py_DECREF(guard);
    if (failed) {
        Py_XDECREF(res);
        PyErr_Restore(et, ev, tb);  /* (the first error wins) */
    }
    if (failed || res == NULL) {
        Py_DECREF(leases);
        goto fail;
    }
    Py_DECREF(res);
    if (!claimed) {
        Py_DECREF(leases);
        goto slow;  /* (no lease yet, or another generation: leases.claim says) */
    }
    /* From here on the chunk is ours: the receiver's state as _take_one, _cut_chunk and _hand_out leave it. */
    {
        long long index = PyLong_AsLongLong(PyTuple_GET_ITEM(got, 0));
        long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(got, 1));
        long long offset = PyLong_AsLongLong(PyTuple_GET_ITEM(got, 3));
        PyObject *item = PyList_GET_ITEM(chunks, 0);
        long long cstart = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
        long long length = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 1));
        PyObject *ct0 = PyTuple_GET_ITEM(item, 2);
        long long sb = attr_ll(rx, A_sample_bytes, &ok);
        long long seq = ok ? attr_ll(rx, A_seq, &ok) : 0;
        long long end = index + n;
        long long coffset = offset - (index - cstart) * sb;
        long long flags = 0;
        PyObject *base = NULL, *ref = NULL, *data = NULL, *chunk = NULL, *times_at = NULL;
        PyObject *mm = NULL, *dtype = NULL, *seq_o = NULL, *last = NULL, *info = NULL, *on_release = NULL;
        long long channels = 0;
        if (!ok || set_ll(rx, A_rseq, rseq + 1) < 0 || set_ll(rx, A_noticed, end) < 0)
            goto out;
        if (((Rechunker *)chunker)->jumped) {  /* the clock stepped back (no rate): the sampler's schedule restarted */
            ((Rechunker *)chunker)->jumped = 0;
            if (PyObject_SetAttr(rx, A_jumped, Py_True) < 0)
                goto out;
        }
        if (set_ll(rx, A_seq, seq + 1) < 0)
            goto out;
        PyObject *jumped = PyObject_GetAttr(rx, A_jumped);
        if (jumped == NULL)
            goto out;
        int j = PyObject_IsTrue(jumped);
        Py_DECREF(jumped);
        if (j < 0)
            goto out;
        if (j) {
            if (PyObject_SetAttr(rx, A_jumped, Py_False) < 0)
                goto out;
            flags |= 1;  /* FLAG_DISCONTINUITY */
        }
        if (set_ll(rx, A_cursor, end) < 0)
            goto out;
        last = Py_BuildValue("(LLL)", slab, gen, offset + n * sb);
        if (last == NULL || PyObject_SetAttr(rx, A_last, last) < 0)
            goto out;
        /* _hand_out */
        mm = PyObject_GetAttr(rx, A_mm);
        dtype = mm == NULL ? NULL : PyObject_GetAttr(rx, A_dtype);
        channels = dtype == NULL ? 0 : attr_ll(rx, A_channels, &ok);
        if (dtype == NULL || !ok)
            goto out;
        {
            PyObject *count = PyLong_FromLongLong(length * channels), *at = PyLong_FromLongLong(coffset);
            if (count != NULL && at != NULL) {
                PyObject *fargs[4] = {mm, dtype, count, at};
                base = PyObject_Vectorcall(r->frombuffer, fargs, 4, NULL);
            }
            Py_XDECREF(count);
            Py_XDECREF(at);
            if (base == NULL)
                goto out;
        }
        seq_o = PyLong_FromLongLong(seq);
        if (seq_o == NULL)
            goto out;
        {
            PyObject *slab_of = PyObject_GetAttr(leases, A_slab_of);
            int rc = slab_of == NULL ? -1 : PyObject_SetItem(slab_of, seq_o, slab_o);
            Py_XDECREF(slab_of);
            if (rc < 0)
                goto out;
            PyObject *on_dead = PyObject_GetAttr(rx, A_on_dead);
            if (on_dead == NULL)
                goto out;
            PyObject *rargs[2] = {base, on_dead};
            ref = PyObject_Vectorcall(r->view_ref, rargs, 2, NULL);
            Py_DECREF(on_dead);
            if (ref == NULL || PyObject_SetAttr(ref, A_seq_field, seq_o) < 0)
                goto out;
            PyObject *refs = PyObject_GetAttr(leases, A_refs);
            rc = refs == NULL ? -1 : PyObject_SetItem(refs, seq_o, ref);
            Py_XDECREF(refs);
            if (rc < 0)
                goto out;
        }
        {
            long long handed = attr_ll(leases, A_handed, &ok);
            long long received = ok ? attr_ll(rx, A_received, &ok) : 0;
            if (!ok || set_ll(leases, A_handed, handed + 1) < 0 || set_ll(rx, A_received, received + 1) < 0
                || PyObject_SetAttr(rx, A_last_seq, seq_o) < 0)
                goto out;
        }
        if (channels > 1) {
            PyObject *shape = Py_BuildValue("(LL)", length, channels);
            if (shape == NULL)
                goto out;
            data = PyObject_CallMethodOneArg(base, A_reshape, shape);
            Py_DECREF(shape);
            if (data == NULL)
                goto out;
        }
        else
            data = Py_NewRef(base);
        info = PyObject_GetAttr(rx, A_info);
        on_release = info == NULL ? NULL : PyObject_GetAttr(rx, A_on_release);
        if (on_release == NULL)
            goto out;
        PyObject *stamps = PyObject_GetAttr(rx, A_timestamps);
        if (stamps == NULL)
            goto out;
        int timed = PyObject_IsTrue(stamps);
        Py_DECREF(stamps);
        if (timed < 0)
            goto out;
        if (timed) {
            PyObject *geometry = PyObject_GetAttr(rx, A_geometry);
            PyObject *at_o = PyLong_FromLongLong(coffset);
            PyObject *at = geometry == NULL || at_o == NULL ? NULL : PyObject_CallMethodOneArg(geometry, A_time_at, at_o);
            Py_XDECREF(geometry);
            Py_XDECREF(at_o);
            if (at == NULL)
                goto out;
            times_at = PyTuple_Pack(2, mm, at);
            Py_DECREF(at);
            if (times_at == NULL)
                goto out;
        }
        {
            PyObject *start_o = PyLong_FromLongLong(cstart), *flags_o = PyLong_FromLongLong(flags);
            if (start_o != NULL && flags_o != NULL) {
                PyObject *cargs[8] = {data, seq_o, start_o, ct0, flags_o, info, on_release, times_at};
                chunk = PyObject_Vectorcall(r->chunk_type, cargs, timed ? 8 : 7, NULL);
            }
            Py_XDECREF(start_o);
            Py_XDECREF(flags_o);
        }
    out:
        Py_XDECREF(base);
        Py_XDECREF(ref);
        Py_XDECREF(data);
        Py_XDECREF(times_at);
        Py_XDECREF(mm);
        Py_XDECREF(dtype);
        Py_XDECREF(seq_o);
        Py_XDECREF(last);
        Py_XDECREF(info);
        Py_XDECREF(on_release);
        Py_DECREF(leases);
        Py_DECREF(chunker);
        Py_DECREF(got);
        return chunk;
    }
slow:
    Py_DECREF(chunker);
    return got;
fail:
    Py_DECREF(chunker);
    Py_DECREF(got);
    return NULL;
}

static PyObject *
reader_close(Reader *r, PyObject *unused)
{
    reader_release(r);
    Py_RETURN_NONE;
}

static PyMethodDef reader_methods[] = {
    {"take_one", (PyCFunction)(void (*)(void))reader_take_one, METH_FASTCALL, take_one_doc},
    {"take_chunk", (PyCFunction)reader_take_chunk, METH_O, take_chunk_doc},
    {"close", (PyCFunction)reader_close, METH_NOARGS, "Release the segment (take_one refuses from then on)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "slabcast.core._hot.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reader(segment, ring_offset, slots, chunk=None, view_ref=None, frombuffer=None): a subscriber's look at "
              "its stream's ring (a buffer of the "
              "segment, read-only is enough, held until close()).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_methods = reader_methods,
};

/* ------------------------------------------------------------------ a copy into the segment */

PyDoc_STRVAR(copy_doc,
"copy(to, at, data) -> None: data's bytes into the writable buffer `to` from byte `at`, as copy_frame does\n"
"(streaming stores for 64 KiB and more on x86-64, then a store fence); overlapping regions: memmove.\n"
"The Python steps of a publisher's frame and a slab change's carried part (core/geometry.py).");

static PyObject *
hot_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "copy takes (to, at, data), got %zd arguments", nargs);
        return NULL;
    }
    int64_t at;
    if (as_i64(args[1], &at) < 0)
        return NULL;
    Py_buffer to, data;
    if (PyObject_GetBuffer(args[0], &to, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &data, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&to);
        return NULL;
    }
    if (at < 0 || at > to.len || data.len > to.len - at) {
        PyErr_Format(PyExc_ValueError, "copy: %zd bytes at byte %lld do not fit a buffer of %zd bytes", data.len,
                     (long long)at, to.len);
        PyBuffer_Release(&data);
        PyBuffer_Release(&to);
        return NULL;
    }
    char *dst = (char *)to.buf + at;
    const char *src = (const char *)data.buf;
    size_t n = (size_t)data.len;
    if (n) {
        if (src < dst + n && dst < src + n)
            memmove(dst, src, n);
        else
            copy_frame(dst, src, n, STREAM_MIN);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&to);
    Py_RETURN_NONE;
}

static PyMethodDef hot_methods[] = {
    {"futex_wait", (PyCFunction)(void (*)(void))hot_futex_wait, METH_FASTCALL, futex_wait_doc},
    {"futex_wake", (PyCFunction)(void (*)(void))hot_futex_wake, METH_FASTCALL, futex_wake_doc},
    {"barrier", hot_barrier, METH_NOARGS, barrier_doc},
    {"runs", (PyCFunction)(void (*)(void))hot_runs, METH_FASTCALL, runs_doc},
    {"reader_runs", (PyCFunction)(void (*)(void))hot_reader_runs, METH_FASTCALL, reader_runs_doc},
    {"copy", (PyCFunction)(void (*)(void))hot_copy, METH_FASTCALL, copy_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hot_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_hot",
    .m_doc = "The frame's path in C: futex waits and wakes, a full barrier, a publisher's frame (core/ring.py), "
              "the broker's look at the ring's descriptors (broker/state.py), a subscriber's chunks "
              "(core/rechunk.py, client/_local.py).",
    .m_size = 0,
    .m_methods = hot_methods,
};

PyMODINIT_FUNC
PyInit__hot(void)
{
    if (PyType_Ready(&WriterType) < 0 || PyType_Ready(&RechunkerType) < 0 || PyType_Ready(&ReaderType) < 0
        || intern_names() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&hot_module);
    if (m == NULL)
        return NULL;
    /* ABI: what core/ring.py checks before it takes this module (a module built from an older source is not
       used); raise it with any change of a function's arguments or results. */
    if (PyModule_AddObjectRef(m, "Writer", (PyObject *)&WriterType) < 0
        || PyModule_AddObjectRef(m, "Rechunker", (PyObject *)&RechunkerType) < 0
        || PyModule_AddObjectRef(m, "Reader", (PyObject *)&ReaderType) < 0
        || PyModule_AddIntConstant(m, "RING_NOW", RING_NOW) < 0
        || PyModule_AddIntConstant(m, "FULL", FULL) < 0
        || PyModule_AddIntConstant(m, "SWITCHED", SWITCHED) < 0
        || PyModule_AddIntConstant(m, "ABI", 8) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
