/*
 * publisher.c: the C publisher (sc_pub_*, slabcast.h "Publishing"), a port of src/slabcast/client/publisher.py
 * and the rules of client/_pubstate.py (grants, the carry, the notice cap per slab), over the connection of
 * slabcast.c (internal.h).
 *
 * A write copies the frame into the granted slab, writes its descriptor into the segment's ring and stores the
 * ring's position (docs/protocol.md 7.7; core/ring.py); then it wakes sleeping subscribers: FUTEX_WAKE for those
 * counted in futex_waiters, a NOTICE for version-2 subscribers (notices_wanted) and for doorbell subscribers
 * whose sleeper byte it sees after a full barrier (7.8); and PUBLISHED to the broker when a slab starts, while
 * the broker cuts chunks itself (frames_wanted), and before a CARRIED that waited for a slab change (section 9).
 * Unlike Python it sends one NOTICE per write when one is needed (no batching: nothing here runs between calls
 * to flush a batch), and it answers JOINED and the broker's messages inside its calls and sc_pub_service, not
 * from a thread of its own.
 */
#define _GNU_SOURCE             /* F_OFD_SETLK, syscall */
#define _FILE_OFFSET_BITS 64    /* lock offsets past 2^40 in struct flock */

#include "slabcast.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <linux/futex.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include <msgpack.h>
#include <zmq.h>

#include "internal.h"
#include "slabcast_wire.h"

/* Frames of at least STREAM_MIN bytes go into the slab by streaming (non-temporal) stores on x86-64, which write
 * whole lines without first reading them: the pool is larger than the caches, so a frame's destination is cold
 * (src/slabcast/core/_hot.c, copy_frame, has the figures).  The store fence orders them before the descriptor and
 * the position, which publish() stores after (a release store orders ordinary stores only). */
#define STREAM_MIN 65536

static void copy_frame(char *to, const char *from, size_t n)
{
#if defined(__x86_64__)
    if (n >= STREAM_MIN) {  /* (>= 64: the head never passes the frame's end) */
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
#endif
    memcpy(to, from, n);
}

/* A message field as (position, name) for the sci_field_* readers, as slabcast.c's AT. */
#define FIELD(msg, field) SCW_##msg##_##field, #field

/* Values of src/slabcast/client/_pubargs.py, core/shm.py, core/ring.py and core/geometry.py, which the wire
 * header does not carry (checked by tests/integration/test_c_publisher.py). */
#define DEFAULT_SLAB_BYTES (4ull << 20)    /* _pubargs.py DEFAULT_SLAB_BYTES */
#define DEFAULT_NSLABS 8
#define DEFAULT_CHUNK_LIMIT (64ull << 20)  /* the largest chunk subscribers may grow a default pool to */
#define DEFAULT_TIMEOUT_MS 10000
#define DEFAULT_STATISTICS 10.0
#define CONNECT_TIMEOUT_MS 5000            /* connection.py CONNECT_TIMEOUT: the answer to HELLO */
#define JOIN_WAIT_MS 5000                  /* the most sc_pub_open waits for OPENED's tokens (_notices.py) */
#define NOTICE_LINGER_MS 500               /* the notice socket's linger at close (_notices.py) */
#define PAGE 4096
#define MAX_SLAB_BYTES (1ull << 30)
#define PUBLISHER_BYTE ((1ull << 41) + 1)  /* core/shm.py PUBLISHER_BYTE: the publisher's liveness lock */
#define GEN_OFFSET 256                     /* u32 gen[nslabs] in the segment header */
#define SEG_LAYOUT 3
#define LOOK_MS 5                          /* a write looks at joins and the broker's messages this often */
#define MAX_META 64                        /* characters of a channel type or unit */
#define MAX_SOURCE_ID 256

/* Segment header words (docs/protocol.md 7.2). */
#define HDR_LAYOUT 8
#define HDR_HEADER_BYTES 12
#define HDR_SLAB_BYTES 16
#define HDR_NSLABS 24
#define HDR_SAMPLE_BYTES 28
#define HDR_RING_SLOTS 136
#define HDR_DESC_BYTES 140
#define HDR_RING_OFFSET 144
#define HDR_POSITION 152                   /* u64; single writer: the publisher.  Low 32 bits: the futex word */
#define HDR_NOTICES 160                    /* u32 notices_wanted (the broker's) */
#define HDR_FUTEX 164                      /* u32 futex_waiters (the broker's) */
#define HDR_FRAMES 168                     /* u32 frames_wanted (the broker's) */
#define HDR_CLOSED 172                     /* u32 closed; the publisher's */
#define HDR_DOORBELLS 176                  /* u32 doorbells (the broker's) */
#define HDR_SLEEP_FUTEX 180                /* u32 sleep_futex; the publisher's: 1, it wakes futex sleepers */
#define SLEEPERS 256                       /* bytes of the sleeper table, just after the ring; then as many of the
                                              futex sleeper table (docs/protocol.md 7.8) */
#define DESC_BYTES 64

/* One descriptor of the ring (64 bytes, little-endian, every field aligned: core/ring.py DESCRIPTOR). */
typedef struct pub_desc {
    uint64_t seq, index;
    double t0;
    uint64_t offset, floor;
    uint32_t n, slab, gen, flags;
    uint64_t zero;
} pub_desc;
_Static_assert(sizeof(pub_desc) == DESC_BYTES && offsetof(pub_desc, t0) == 16 && offsetof(pub_desc, floor) == 32 &&
               offsetof(pub_desc, n) == 40 && offsetof(pub_desc, flags) == 52,
               "pub_desc is the descriptor as core/ring.py lays it out");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the segment's words are little-endian");
/* The ABI rules of slabcast.h: struct_size first, no tail padding. */
_Static_assert(offsetof(sc_pub_options, struct_size) == 0 && offsetof(sc_pub_info, struct_size) == 0 &&
               offsetof(sc_pub_stats, struct_size) == 0, "struct_size comes first in every public struct");
_Static_assert(offsetof(sc_pub_options, label) + sizeof(const char *) == sizeof(sc_pub_options) &&
               offsetof(sc_pub_info, address) + sizeof(const char *) == sizeof(sc_pub_info) &&
               offsetof(sc_pub_stats, wakes) + sizeof(uint64_t) == sizeof(sc_pub_stats),
               "a public struct has tail padding: fill it with a reserved field");

struct sc_pub {
    sc_client *conn;             /* the DEALER to the broker (slabcast.c) */
    pthread_mutex_t lock;        /* orders sc_pub_service on another thread with the other calls */
    unsigned forks;              /* fork generation when opened: a child must not use it */
    char where[160];             /* "stream 'x'", for messages */
    char err[1024];              /* the message of the current call's failure */
    int failure;                 /* sticky: the broker's death, ERROR or END */
    char failure_msg[1024];
    sc_pub_info info;
    char name[65], dtype[8], segment[256], endpoint[300], address[128];

    /* The segment. */
    int fd;                      /* O_RDWR: mapped, and holds the liveness lock while open */
    unsigned char *map;
    size_t map_bytes;
    uint64_t header_bytes, slab_bytes, reserve, sample_bytes, frame_limit, times_offset, slots_per_slab;
    bool chunk_given;            /* max_chunk_bytes was given (the frame limit's rule, in its message) */
    uint32_t nslabs;
    const uint32_t *gens;
    unsigned char *ring;
    uint64_t ring_mask;
    uint64_t *position;          /* the header's position word */
    const uint32_t *notices_wanted, *futex_waiters, *frames_wanted, *doorbells;
    uint32_t *closed;
    const uint64_t *sleepers;    /* the sleeper table, 32 words, then the futex sleeper table, 32 more */

    /* The notice socket. */
    void *notices;               /* XPUB bound at `endpoint` */
    bool bound;
    unsigned char topic[66];     /* name + NUL */
    size_t topic_len;
    msgpack_sbuffer nbuf;        /* topic + one message */
    msgpack_packer npk;
    uint64_t sid;                /* stream_id */
    uint64_t nseq;               /* notices sent (NOTICE and NOTICE_END) */

    /* PublisherState (client/_pubstate.py). */
    uint32_t *grants;            /* slabs granted and not written yet, in order: a queue of nslabs */
    uint32_t ghead, gcount;
    uint64_t carry;              /* bytes of the old slab's tail to copy into each new one */
    uint64_t slab_carry;         /* what was carried into the slab being written */
    uint64_t slab_data;          /* where the slab being written starts its frames */
    uint64_t offset;             /* where the next frame goes */
    uint64_t end;                /* just past the slab being written; 0: no slab yet */
    uint64_t slab_frames, frame_cap;
    bool switch_unsent;          /* a slab change whose PUBLISHED has not gone to the broker yet */
    bool carried_due;            /* a CARRIED(carried_value) to send right after that PUBLISHED */
    uint64_t carried_value;
    uint32_t slab, gen;
    uint64_t floor;              /* lowest stream index readable contiguously in the current slab */
    uint64_t pos;                /* descriptors published */
    int64_t next_look;           /* ms: when a write looks at joins and messages again */
    uint64_t sync_token, synced;
    bool loaned;
    bool loan_times;             /* the caller fills the loan's times (sc_pub_loan_times) */
    uint64_t loan_offset, loan_n;
    int timeout_ms;
    sc_pub_stats stats;
};

/* ------------------------------------------------------------------ errors */

/* The message of the last failed call on this thread, and the publisher it was made on (NULL: open or close). */
static _Thread_local const sc_pub *last_pub;
static _Thread_local char last_msg[1024];

static int pfail(sc_pub *p, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int pfail(sc_pub *p, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof p->err, fmt, ap);
    va_end(ap);
    return code;
}

/* A helper of slabcast.c failed with `rc`: its message is the connection's. */
static int from_conn(sc_pub *p, int rc)
{
    snprintf(p->err, sizeof p->err, "%s", sc_errmsg(p->conn));
    return rc;
}

/* The failure is the publisher's end: every later call returns it. */
static int stick(sc_pub *p, int rc)
{
    if (rc != SC_OK && rc != SC_ETIMEOUT && p->failure == SC_OK) {
        p->failure = rc;
        memcpy(p->failure_msg, p->err, sizeof p->failure_msg);
    }
    return rc;
}

/* The end of a public call: note its message for sc_pub_errmsg on this thread. */
static int done(const sc_pub *key, const char *msg, int rc)
{
    if (rc != SC_OK) {
        last_pub = key;
        snprintf(last_msg, sizeof last_msg, "%s", msg);
    }
    return rc;
}

const char *sc_pub_errmsg(const sc_pub *pub)
{
    return last_pub == pub && last_msg[0] ? last_msg : "no error";
}

/* fork() generations of this process: a publisher made before the last one is its parent's. */
static unsigned forks;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void forked(void) { forks++; }
static void watch_forks(void) { pthread_atfork(NULL, NULL, forked); }

/* --------------------------------------------------------------- options */

static void options_defaults(sc_pub_options *o)
{
    memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->dtype = "float32";
    o->channels = 1;
    o->nslabs = DEFAULT_NSLABS;
    o->timeout_ms = DEFAULT_TIMEOUT_MS;
    o->statistics = DEFAULT_STATISTICS;
}

void sc_pub_options_init_sized(sc_pub_options *opts, size_t struct_size)
{
    if (opts == NULL || struct_size < sizeof opts->struct_size)
        return;
    sc_pub_options d;
    options_defaults(&d);
    if (struct_size > sizeof d) {
        memset((char *)opts + sizeof d, 0, struct_size - sizeof d);
        memcpy(opts, &d, sizeof d);
    } else {
        memcpy(opts, &d, struct_size);
    }
    opts->struct_size = struct_size;
}

/* The caller's options over the defaults (the first struct_size bytes of theirs; a newer caller's struct when
 * what this library does not know is zero). */
static int read_options(char *err, size_t cap, const sc_pub_options *opts, sc_pub_options *out)
{
    options_defaults(out);
    if (opts == NULL)
        return SC_OK;
    size_t n = opts->struct_size;
    if (n < sizeof opts->struct_size || n > 4096) {
        snprintf(err, cap, "sc_pub_options.struct_size must be the size of the caller's sc_pub_options (%zu in this "
                 "library's header; set it with sc_pub_options_init), got %zu", sizeof *out, n);
        return SC_EINVAL;
    }
    if (n > sizeof *out) {
        const unsigned char *extra = (const unsigned char *)opts + sizeof *out;
        for (size_t i = 0; i < n - sizeof *out; i++)
            if (extra[i] != 0) {
                snprintf(err, cap, "sc_pub_options of %zu bytes sets an option this library (version %s, %zu-byte "
                         "sc_pub_options) does not know: byte %zu is not zero; use a newer libslabcast", n,
                         SC_VERSION_STRING, sizeof *out, sizeof *out + i);
                return SC_EINVAL;
            }
        n = sizeof *out;
    }
    memcpy(out, opts, n);
    out->struct_size = sizeof *out;
    return SC_OK;
}

/* A numpy dtype string as numpy spells it (dtype.str: "<f4", "|u1", ">i2"), from a string or a name; its size. */
static bool parse_dtype(const char *s, char out[8], unsigned *itemsize)
{
    static const struct { const char *name, *str; } NAMES[] = {
        {"bool", "|b1"}, {"int8", "|i1"}, {"uint8", "|u1"}, {"int16", "<i2"}, {"uint16", "<u2"}, {"int32", "<i4"},
        {"uint32", "<u4"}, {"int64", "<i8"}, {"uint64", "<u8"}, {"float16", "<f2"}, {"float32", "<f4"},
        {"float64", "<f8"}, {"complex64", "<c8"}, {"complex128", "<c16"},
    };
    for (size_t i = 0; i < sizeof NAMES / sizeof NAMES[0]; i++)
        if (strcmp(s, NAMES[i].name) == 0)
            s = NAMES[i].str;
    char order = '=';
    const char *p = s;
    if (*p == '<' || *p == '>' || *p == '|' || *p == '=')
        order = *p++;
    char kind = *p++;
    if (kind == '\0' || strchr("biufc", kind) == NULL || *p < '1' || *p > '9' || strlen(p) > 2)
        return false;
    unsigned size = (unsigned)strtoul(p, NULL, 10);
    bool ok = false;
    switch (kind) {
    case 'b': ok = size == 1; break;
    case 'i':
    case 'u': ok = size == 1 || size == 2 || size == 4 || size == 8; break;
    case 'f': ok = size == 2 || size == 4 || size == 8 || size == 16; break;
    case 'c': ok = size == 8 || size == 16 || size == 32; break;
    }
    if (!ok || p[strspn(p, "0123456789")] != '\0')
        return false;
    if (size == 1)
        order = '|';
    else if (order != '>')
        order = '<';  /* native (this host is little-endian) */
    snprintf(out, 8, "%c%c%u", order, kind, size);
    *itemsize = size;
    return true;
}

/* _pubargs.py pool_layout: the slabs asked for (*layout bytes each) and their carried part (*carried). */
static int pool_layout(sc_pub *p, uint64_t slab_bytes, uint64_t max_chunk, uint64_t *layout, uint64_t *carried)
{
    if (slab_bytes == 0) {  /* 4 MiB, or room for frames as long as the longest chunk asked for */
        slab_bytes = DEFAULT_SLAB_BYTES;
        uint64_t room = max_chunk ? ((2 * max_chunk + PAGE - 1) / PAGE) * PAGE : 0;
        if (room > slab_bytes)
            slab_bytes = room;
    } else if (slab_bytes % PAGE || slab_bytes > MAX_SLAB_BYTES) {
        return pfail(p, SC_EINVAL, "slab_bytes must be a multiple of 4096 up to 2**30, got %llu",
                     (unsigned long long)slab_bytes);
    }
    if (max_chunk != 0) {
        *layout = slab_bytes;
        *carried = max_chunk;
        return SC_OK;
    }
    /* Frames up to half the slab, chunks up to the limit: address space, memory on demand. */
    uint64_t half = slab_bytes / 2, chunks = half > DEFAULT_CHUNK_LIMIT ? half : DEFAULT_CHUNK_LIMIT;
    *layout = ((half + chunks + PAGE - 1) / PAGE) * PAGE;
    *carried = *layout - half;
    return SC_OK;
}

/* Characters (code points) of a UTF-8 string. */
static size_t utf8_length(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

/* check_metadata: `channels` strings of at most MAX_META characters, or none. */
static int check_strings(sc_pub *p, const char *key, const char *const *values, unsigned channels, size_t most)
{
    if (values == NULL)
        return SC_OK;
    for (unsigned i = 0; i < channels; i++)
        if (values[i] == NULL || (most && utf8_length(values[i]) > most))
            return pfail(p, SC_EINVAL, "%s must be %u strings%s, got %s at %u", key, channels,
                         most ? " of at most 64 characters" : "", values[i] ? "a longer one" : "NULL", i);
    return SC_OK;
}

static void pack_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void pack_strings(msgpack_packer *pk, const char *const *values, unsigned count)
{
    msgpack_pack_array(pk, values ? count : 0);
    for (unsigned i = 0; values && i < count; i++)
        pack_str(pk, values[i]);
}

/* ---------------------------------------------------------------- address */

/* The default broker address (slabcast.c, sci_default_address), its refusal as this publisher's error. */
static int default_address(sc_pub *p, char *out, size_t cap)
{
    return sci_default_address(out, cap, p->err, sizeof p->err);
}

/* ------------------------------------------------------------- the socket */

/* Pack `topic` + the message the caller packs next into nbuf, to send on the notice socket. */
static msgpack_packer *notice_packer(sc_pub *p, const void *topic, size_t len)
{
    msgpack_sbuffer_clear(&p->nbuf);
    msgpack_sbuffer_write(&p->nbuf, topic, len);
    return &p->npk;
}

/* Send nbuf on the notice socket; a subscriber whose queue is full loses it (it sees the gap), nobody waits. */
static void send_notice(sc_pub *p)
{
    zmq_send(p->notices, p->nbuf.data, p->nbuf.size, ZMQ_DONTWAIT);
}

/* A subscription event on the notice socket (0x01, then the topic): answer a new token topic (0x01 + token) with
 * JOINED on it (_notices.py _answer_join): the subscriber then knows that every later notice reaches it. */
static void answer_join(sc_pub *p, const unsigned char *ev, size_t size)
{
    if (size > 2 && ev[0] == 1 && ev[1] == 1) {
        msgpack_packer *pk = notice_packer(p, ev + 1, size - 1);
        _Static_assert(SCW_JOINED_FIELDS == 0, "JOINED has no fields");
        msgpack_pack_array(pk, 1 + SCW_JOINED_FIELDS);
        msgpack_pack_uint64(pk, SCW_JOINED);
        send_notice(p);
    }
}

/* Answer every join waiting on the notice socket. */
static void serve_joins(sc_pub *p)
{
    for (;;) {
        zmq_msg_t ev;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, p->notices, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return;
        }
        answer_join(p, zmq_msg_data(&ev), zmq_msg_size(&ev));
        zmq_msg_close(&ev);
    }
}

static int send_uint_msg(sc_pub *p, uint64_t kind, uint32_t fields, uint64_t value, const char *what)
{
    msgpack_packer *pk = sci_packer(p->conn);
    msgpack_pack_array(pk, 1 + fields);
    msgpack_pack_uint64(pk, kind);
    if (fields)
        msgpack_pack_uint64(pk, value);
    int rc = sci_send_packed(p->conn, what);
    return rc ? stick(p, from_conn(p, rc)) : SC_OK;
}

static int send_carried(sc_pub *p, uint64_t nbytes)
{
    _Static_assert(SCW_CARRIED_FIELDS == 1 && SCW_CARRIED_NBYTES == 1, "CARRIED is packed in this order");
    return send_uint_msg(p, SCW_CARRIED, SCW_CARRIED_FIELDS, nbytes, "CARRIED");
}

/* Whether msgpack str `o` is `s`. */
static bool str_is(const msgpack_object *o, const char *s)
{
    return o->type == MSGPACK_OBJECT_STR && o->via.str.size == strlen(s) &&
           memcmp(o->via.str.ptr, s, o->via.str.size) == 0;
}

/* An END to the publisher (the broker's shutdown; its end of our stream after an ERROR). */
static int end_error(sc_pub *p, const msgview *m)
{
    char code[64] = "?", text[768] = "";
    if (m->nf >= SCW_END_CODE)
        sci_field_text(p->conn, m, FIELD(END, CODE), code, sizeof code);
    if (m->nf >= SCW_END_MESSAGE)
        sci_field_text(p->conn, m, FIELD(END, MESSAGE), text, sizeof text);
    int rc = SC_EEND;
    if (strcmp(code, SCW_END_BROKER_SHUTDOWN) == 0)
        rc = SC_EBROKERGONE;
    else if (strcmp(code, SCW_END_PUBLISHER_GONE) == 0)
        rc = SC_EPUBGONE;
    else if (strcmp(code, SCW_END_EVICTED) == 0)
        rc = SC_EEVICTED;
    else if (strcmp(code, SCW_END_CLOSED) == 0)
        rc = SC_EOF;
    return pfail(p, rc, "the broker ended %s (END %s): %s", p->where, code, text);
}

/* One message from the broker (PublisherState's events: GRANT, CARRY; SYNCED; ERROR and END end us). */
static int on_message(sc_pub *p, const msgview *m)
{
    int rc;
    uint64_t v;
    switch (m->kind) {
    case SCW_GRANT:
        if ((rc = sci_need_fields(p->conn, m, SCW_GRANT_REQUIRED)) ||
            (rc = sci_field_uint(p->conn, m, FIELD(GRANT, SLAB), &v)))
            return from_conn(p, rc);
        if (v >= p->nslabs || p->gcount >= p->nslabs)
            return pfail(p, SC_EPROTO, "GRANT of slab %llu: the pool has %u slabs and %u are granted already (%s)",
                         (unsigned long long)v, p->nslabs, p->gcount, p->where);
        p->grants[(p->ghead + p->gcount++) % p->nslabs] = (uint32_t)v;
        return SC_OK;
    case SCW_CARRY:
        /* From the next slab on; confirmed at once, unless a slab change made with the old carry has not reached
         * the broker yet: then right after its PUBLISHED (PublisherState.on_carry). */
        if ((rc = sci_need_fields(p->conn, m, SCW_CARRY_REQUIRED)) ||
            (rc = sci_field_uint(p->conn, m, FIELD(CARRY, NBYTES), &v)))
            return from_conn(p, rc);
        p->carry = v < p->reserve ? v : p->reserve;
        if (p->switch_unsent) {
            p->carried_due = true;
            p->carried_value = p->carry;
            return SC_OK;
        }
        return send_carried(p, p->carry);
    case SCW_SYNCED:
        if ((rc = sci_need_fields(p->conn, m, SCW_SYNCED_REQUIRED)) ||
            (rc = sci_field_uint(p->conn, m, FIELD(SYNCED, TOKEN), &v)))
            return from_conn(p, rc);
        if (v > p->synced)
            p->synced = v;
        return SC_OK;
    case SCW_ERROR:
        return from_conn(p, sci_broker_error(p->conn, m));
    case SCW_END:
        return end_error(p, m);
    default:
        return pfail(p, SC_EPROTO, "expected GRANT, CARRY, SYNCED, ERROR or END from the broker, got %s (kind %llu) "
                     "(%s)",
                     sci_kind_name(m->kind), (unsigned long long)m->kind, p->where);
    }
}

/* Take the broker's messages until none is waiting (deadline_ms past), or until one comes (a later deadline). */
static int take(sc_pub *p, int64_t deadline_ms)
{
    for (;;) {
        msgview m;
        int rc = sci_next_msg(p->conn, deadline_ms, &m);
        if (rc == SC_ETIMEOUT)
            return SC_OK;
        if (rc)
            return stick(p, from_conn(p, rc));
        if ((rc = on_message(p, &m)))
            return stick(p, rc);
        deadline_ms = 0;  /* then only what is waiting */
    }
}

/* Joins, the broker's messages, the broker's death: what the Python publisher's background thread does. */
static int service(sc_pub *p)
{
    if (p->failure)
        return pfail(p, p->failure, "%s", p->failure_msg);
    serve_joins(p);
    if (sci_gone(p->conn)) {
        int rc = take(p, 0);  /* what it sent before it died (an ERROR, an END) says more */
        if (rc)
            return rc;
        return stick(p, pfail(p, SC_EBROKERGONE, "the broker at %s went away (%s)", p->address, p->where));
    }
    return take(p, 0);
}

/* Wait until `deadline_ms` for input on the broker connection or the notice socket, and handle it. */
static int wait_input(sc_pub *p, int64_t deadline_ms)
{
    int64_t left = deadline_ms - sci_now_ms();
    if (left < 0)
        left = 0;
    zmq_pollitem_t items[3] = {{sci_socket(p->conn), 0, ZMQ_POLLIN, 0},
                               {sci_monitor(p->conn), 0, ZMQ_POLLIN, 0},
                               {p->notices, 0, ZMQ_POLLIN, 0}};
    if (zmq_poll(items, 3, (long)left) < 0 && zmq_errno() != EINTR)
        return stick(p, pfail(p, SC_ESYS, "cannot poll the sockets of %s: %s", p->where, zmq_strerror(zmq_errno())));
    return service(p);
}

/* ---------------------------------------------------------------- opening */

static int check_header(sc_pub *p, uint64_t nbytes, uint64_t *ring_offset, uint32_t *slots)
{
    const unsigned char *h = p->map;
    uint32_t layout, header, nslabs, sample_bytes, desc;
    uint64_t slab_bytes;
    memcpy(&layout, h + HDR_LAYOUT, 4);
    memcpy(&header, h + HDR_HEADER_BYTES, 4);
    memcpy(&slab_bytes, h + HDR_SLAB_BYTES, 8);
    memcpy(&nslabs, h + HDR_NSLABS, 4);
    memcpy(&sample_bytes, h + HDR_SAMPLE_BYTES, 4);
    memcpy(slots, h + HDR_RING_SLOTS, 4);
    memcpy(&desc, h + HDR_DESC_BYTES, 4);
    memcpy(ring_offset, h + HDR_RING_OFFSET, 8);
    /* Where the ring must be (core/geometry.py ring_offset): after the slabs and the time tables, on a page. */
    uint64_t times = p->info.timestamps ? 8 * (p->slab_bytes / p->sample_bytes) * p->nslabs : 0;
    uint64_t want = ((p->times_offset + times + PAGE - 1) / PAGE) * PAGE;
    if (memcmp(h, "SLABCAST", 8) != 0 || layout != SEG_LAYOUT || header != p->header_bytes ||
        slab_bytes != p->slab_bytes || nslabs != p->nslabs || sample_bytes != p->sample_bytes || desc != DESC_BYTES ||
        *slots < 2 || (*slots & (*slots - 1)) != 0 || *ring_offset != want ||
        *ring_offset + (uint64_t)*slots * DESC_BYTES + SLEEPERS > nbytes)
        return pfail(p, SC_EPROTO,
                     "segment %s's header says layout %u, header_bytes %u, slab_bytes %llu, nslabs %u, "
                     "sample_bytes %u, "
                     "a ring of %u descriptors of %u bytes at %llu; expected layout %d and OPENED's header_bytes %llu, "
                     "slab_bytes %llu, nslabs %u, sample_bytes %llu, a ring at %llu inside %llu bytes (%s)", p->segment,
                     layout, header, (unsigned long long)slab_bytes, nslabs, sample_bytes, *slots, desc,
                     (unsigned long long)*ring_offset, SEG_LAYOUT, (unsigned long long)p->header_bytes,
                     (unsigned long long)p->slab_bytes, p->nslabs, (unsigned long long)p->sample_bytes,
                     (unsigned long long)want, (unsigned long long)nbytes, p->where);
    return SC_OK;
}

/* Map the segment read-write, check it, take the publisher's liveness lock (held while fd stays open). */
static int map_segment(sc_pub *p, uint64_t nbytes)
{
    char shm_name[sizeof p->segment + 1];
    snprintf(shm_name, sizeof shm_name, "/%s", p->segment);
    p->fd = shm_open(shm_name, O_RDWR, 0);
    if (p->fd < 0)
        return pfail(p, SC_ESYS, "cannot open shared-memory segment %s read-write: %s (%s)", shm_name, strerror(errno),
                     p->where);
    struct stat st;
    if (fstat(p->fd, &st) != 0 || (uint64_t)st.st_size < nbytes)
        return pfail(p, SC_EPROTO, "segment %s has %lld bytes, OPENED announced %llu (%s)", shm_name,
                     (long long)st.st_size, (unsigned long long)nbytes, p->where);
    void *m = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, MAP_SHARED, p->fd, 0);
    if (m == MAP_FAILED)
        return pfail(p, SC_ESYS, "cannot map segment %s (%llu bytes) read-write: %s (%s)", shm_name,
                     (unsigned long long)nbytes, strerror(errno), p->where);
    p->map = m;
    p->map_bytes = nbytes;
    uint64_t at;
    uint32_t slots;
    int rc = check_header(p, nbytes, &at, &slots);
    if (rc)
        return rc;
    unsigned char *h = p->map;
    p->gens = (const uint32_t *)(h + GEN_OFFSET);
    p->ring = h + at;
    p->ring_mask = slots - 1;
    p->position = (uint64_t *)(h + HDR_POSITION);
    p->notices_wanted = (const uint32_t *)(h + HDR_NOTICES);
    p->futex_waiters = (const uint32_t *)(h + HDR_FUTEX);
    p->frames_wanted = (const uint32_t *)(h + HDR_FRAMES);
    p->doorbells = (const uint32_t *)(h + HDR_DOORBELLS);
    p->closed = (uint32_t *)(h + HDR_CLOSED);
    p->sleepers = (const uint64_t *)(h + at + (uint64_t)slots * DESC_BYTES);
    /* We wake doorbell subscribers asleep on the futex word (7.8): they may sleep there from now on. */
    __atomic_store_n((uint32_t *)(h + HDR_SLEEP_FUTEX), 1, __ATOMIC_RELAXED);
    p->pos = __atomic_load_n(p->position, __ATOMIC_ACQUIRE);  /* 0 for a new stream */
    /* "This stream's publisher is alive", as the broker tells it in any PID namespace (docs/protocol.md 3). */
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)PUBLISHER_BYTE;
    fl.l_len = 1;
    if (fcntl(p->fd, F_OFD_SETLK, &fl) != 0)
        return pfail(p, SC_ESYS, "cannot take the publisher's liveness lock on %s: %s (%s)", shm_name, strerror(errno),
                     p->where);
    return SC_OK;
}

/* Bind the notice socket; wait (bounded) until the subscribers that came before the stream joined it. */
static int bind_notices(sc_pub *p, const msgpack_object *tokens, int timeout_ms)
{
    p->notices = zmq_socket(sci_context(p->conn), ZMQ_XPUB);
    if (p->notices == NULL)
        return pfail(p, SC_ESYS, "cannot create the notice socket: %s (%s)", zmq_strerror(zmq_errno()), p->where);
    int hwm = SCW_NOTICE_HWM, verbose = 1, linger = NOTICE_LINGER_MS;
    zmq_setsockopt(p->notices, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(p->notices, ZMQ_XPUB_VERBOSE, &verbose, sizeof verbose);
    zmq_setsockopt(p->notices, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_bind(p->notices, p->endpoint) != 0)
        return pfail(p, SC_ESYS, "cannot bind the notice socket at %s: %s (%s)", p->endpoint, zmq_strerror(zmq_errno()),
                     p->where);
    p->bound = true;
    /* Whoever may reach the broker may join: the socket file gets the broker socket's read/write bits. */
    struct stat st;
    if (stat(p->address + 6, &st) == 0)
        chmod(p->endpoint + 6, st.st_mode & 0666);
    uint32_t waiting = tokens ? tokens->via.array.size : 0;
    bool *seen = calloc(waiting + 1, sizeof *seen);
    if (seen == NULL)
        return pfail(p, SC_ENOMEM, "out of memory");
    int64_t deadline = sci_now_ms() + (timeout_ms < JOIN_WAIT_MS ? timeout_ms : JOIN_WAIT_MS);
    uint32_t left = waiting;
    while (left > 0) {
        int64_t wait = deadline - sci_now_ms();
        if (wait <= 0)
            break;
        zmq_pollitem_t item = {p->notices, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, (long)wait) <= 0)
            continue;
        zmq_msg_t ev;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, p->notices, ZMQ_DONTWAIT) >= 0) {
            const unsigned char *d = zmq_msg_data(&ev);
            size_t n = zmq_msg_size(&ev);
            answer_join(p, d, n);
            /* OPENED's tokens are token *topics* (0x01 + token, protocol 6): the event is 0x01 (subscribe)
             * then the topic.  (Compared against the bare token, none matched: sc_pub_open waited out its
             * 5 s whenever a subscriber was waiting for the stream.) */
            for (uint32_t i = 0; n > 2 && d[0] == 1 && i < waiting; i++) {
                const msgpack_object *t = &tokens->via.array.ptr[i];
                if (!seen[i] && t->via.bin.size == n - 1 && memcmp(t->via.bin.ptr, d + 1, n - 1) == 0) {
                    seen[i] = true;
                    left--;
                }
            }
        }
        zmq_msg_close(&ev);
    }
    free(seen);
    return SC_OK;
}

/* Send OPEN, read OPENED: the stream's pool. */
static int open_stream(sc_pub *p, const sc_pub_options *o, uint64_t layout, uint64_t carried)
{
    _Static_assert(SCW_OPEN_NAME == 1 && SCW_OPEN_DTYPE == 2 && SCW_OPEN_CHANNELS == 3 && SCW_OPEN_RATE == 4 &&
                   SCW_OPEN_SLAB_BYTES == 5 && SCW_OPEN_NSLABS == 6 && SCW_OPEN_MAX_CHUNK_BYTES == 7 &&
                   SCW_OPEN_CHANNEL_NAMES == 8 && SCW_OPEN_STATS_SECONDS == 9 && SCW_OPEN_META == 10 &&
                   SCW_OPEN_FIELDS == 10, "OPEN is packed in this order");
    msgpack_packer *pk = sci_packer(p->conn);
    msgpack_pack_array(pk, 1 + SCW_OPEN_FIELDS);
    msgpack_pack_uint64(pk, SCW_OPEN);
    pack_str(pk, p->name);
    pack_str(pk, p->dtype);
    msgpack_pack_uint64(pk, o->channels);
    if (o->rate > 0)
        msgpack_pack_double(pk, o->rate);
    else
        msgpack_pack_nil(pk);
    msgpack_pack_uint64(pk, layout);
    msgpack_pack_uint64(pk, o->nslabs);
    msgpack_pack_uint64(pk, carried);
    if (o->channel_names)
        pack_strings(pk, o->channel_names, o->channels);
    else
        msgpack_pack_nil(pk);
    msgpack_pack_double(pk, o->statistics);
    /* The metadata as Python's StreamInfo.check_metadata gives it: all four keys. */
    msgpack_pack_map(pk, 4);
    pack_str(pk, "channel_types");
    pack_strings(pk, o->channel_types, o->channels);
    pack_str(pk, "channel_units");
    pack_strings(pk, o->channel_units, o->channels);
    pack_str(pk, "source_id");
    pack_str(pk, o->source_id ? o->source_id : "");
    pack_str(pk, "timestamps");
    if (o->timestamps)
        msgpack_pack_true(pk);
    else
        msgpack_pack_false(pk);
    int rc = sci_send_packed(p->conn, "OPEN");
    if (rc)
        return from_conn(p, rc);
    msgview m;
    rc = sci_next_msg(p->conn, sci_now_ms() + o->timeout_ms, &m);
    if (rc == SC_ETIMEOUT)
        return pfail(p, SC_EBROKERGONE, "no answer to OPEN from the broker at %s within %d ms (%s)", p->address,
                     o->timeout_ms, p->where);
    if (rc)
        return from_conn(p, rc);
    if (m.kind == SCW_ERROR) {
        rc = from_conn(p, sci_broker_error(p->conn, &m));
        if (m.nf >= SCW_ERROR_CODE && str_is(&m.a[SCW_ERROR_CODE], SCW_ERR_STREAM_EXISTS))
            return SC_EEXISTS;
        if (m.nf >= SCW_ERROR_CODE && str_is(&m.a[SCW_ERROR_CODE], SCW_ERR_SHM_FULL))
            return SC_ESHMFULL;
        return rc;
    }
    if (m.kind != SCW_OPENED)
        return pfail(p, SC_EPROTO, "expected OPENED, got %s (kind %llu) (%s)", sci_kind_name(m.kind),
                     (unsigned long long)m.kind, p->where);
    uint64_t seg_bytes, header, slab_bytes, nslabs, reserve, sample_bytes, carry;
    sc_client *c = p->conn;
    if ((rc = sci_need_fields(c, &m, SCW_OPENED_CARRY)) ||
        (rc = sci_field_str(c, &m, FIELD(OPENED, SEGMENT), p->segment, sizeof p->segment)) ||
        (rc = sci_field_uint(c, &m, FIELD(OPENED, SEGMENT_BYTES), &seg_bytes)) ||
        (rc = sci_field_uint(c, &m, FIELD(OPENED, HEADER_BYTES), &header)) ||
        (rc = sci_field_uint(c, &m, FIELD(OPENED, SLAB_BYTES), &slab_bytes)) ||
        (rc = sci_field_uint(c, &m, FIELD(OPENED, NSLABS), &nslabs)) ||
        (rc = sci_field_uint(c, &m, FIELD(OPENED, RESERVE), &reserve)) ||
        (rc = sci_field_uint(c, &m, FIELD(OPENED, SAMPLE_BYTES), &sample_bytes)) ||
        (rc = sci_field_str(c, &m, FIELD(OPENED, NOTICE_ENDPOINT), p->endpoint, sizeof p->endpoint)) ||
        (rc = sci_field_uint(c, &m, FIELD(OPENED, STREAM_ID), &p->sid)) ||
        (rc = sci_field_uint(c, &m, FIELD(OPENED, CARRY), &carry)))
        return from_conn(p, rc);
    const msgpack_object *tokens = NULL;
    if (m.nf >= SCW_OPENED_TOKENS) {
        tokens = &m.a[SCW_OPENED_TOKENS];
        bool ok = tokens->type == MSGPACK_OBJECT_ARRAY;
        for (uint32_t i = 0; ok && i < tokens->via.array.size; i++)
            ok = tokens->via.array.ptr[i].type == MSGPACK_OBJECT_BIN;
        if (!ok)
            return pfail(p, SC_EPROTO, "OPENED field %d (tokens) must be an array of bin (%s)", SCW_OPENED_TOKENS,
                         p->where);
    }
    if (sample_bytes != p->info.sample_bytes || nslabs < 2 || nslabs > 4096 || slab_bytes % PAGE ||
        reserve % sample_bytes || reserve + sample_bytes > slab_bytes || header < PAGE ||
        strncmp(p->endpoint, "ipc://", 6) != 0)
        return pfail(p, SC_EPROTO, "OPENED says sample_bytes %llu, nslabs %llu, slab_bytes %llu, reserve %llu, "
                     "notice endpoint %s; expected %zu bytes per sample (%s x %u), 2..4096 slabs of whole pages with "
                     "room for a frame, an ipc:// endpoint (%s)", (unsigned long long)sample_bytes,
                     (unsigned long long)nslabs, (unsigned long long)slab_bytes, (unsigned long long)reserve,
                     p->endpoint, p->info.sample_bytes, p->dtype, p->info.channels, p->where);
    p->header_bytes = header;
    p->slab_bytes = slab_bytes;
    p->nslabs = (uint32_t)nslabs;
    p->reserve = reserve;
    p->sample_bytes = sample_bytes;
    p->frame_limit = slab_bytes - reserve;
    p->times_offset = header + nslabs * slab_bytes;
    p->slots_per_slab = slab_bytes / sample_bytes;
    p->carry = carry < reserve ? carry : reserve;
    p->frame_cap = SCW_NOTICE_BACKLOG / nslabs ? SCW_NOTICE_BACKLOG / nslabs : 1;  /* notices_per_slab */
    p->grants = calloc(nslabs, sizeof *p->grants);
    if (p->grants == NULL)
        return pfail(p, SC_ENOMEM, "out of memory");
    if ((rc = map_segment(p, seg_bytes)))
        return rc;
    /* tokens point into the received message: bind before receiving anything else. */
    return bind_notices(p, tokens, o->timeout_ms);
}

static void free_pub(sc_pub *p, bool sockets)
{
    if (sockets && p->notices != NULL)
        zmq_close(p->notices);  /* before sc_close ends the context: it lingers there (NOTICE_LINGER_MS) */
    if (sockets)
        sc_close(p->conn);  /* BYE, END bye */
    else
        sci_forget(p->conn);  /* a forked child: the memory only */
    if (p->bound)
        unlink(p->endpoint + 6);
    if (p->map != NULL)
        munmap(p->map, p->map_bytes);
    if (p->fd >= 0)
        close(p->fd);  /* gives the liveness lock back */
    msgpack_sbuffer_destroy(&p->nbuf);
    pthread_mutex_destroy(&p->lock);
    free(p->grants);
    free(p);
}

int sc_pub_open(const char *address, const char *stream, const sc_pub_options *opts, sc_pub **out)
{
    pthread_once(&fork_once, watch_forks);
    if (out == NULL)
        return done(NULL, "sc_pub_open: out is NULL", SC_EINVAL);
    *out = NULL;
    sc_pub *p = calloc(1, sizeof *p);
    if (p == NULL)
        return done(NULL, "out of memory", SC_ENOMEM);
    p->fd = -1;
    p->forks = forks;
    pthread_mutex_init(&p->lock, NULL);
    msgpack_sbuffer_init(&p->nbuf);
    msgpack_packer_init(&p->npk, &p->nbuf, msgpack_sbuffer_write);
    sc_pub_options o;
    int rc = read_options(p->err, sizeof p->err, opts, &o);
    if (rc == SC_OK && (stream == NULL || !sci_valid_stream_name(stream)))
        rc = pfail(p, SC_EINVAL, "stream name must be 1 to 64 characters from A-Z a-z 0-9 _ . : -, got '%s'",
                   stream ? stream : "(null)");
    unsigned itemsize = 0;
    if (rc == SC_OK && (o.dtype == NULL || !parse_dtype(o.dtype, p->dtype, &itemsize)))
        rc = pfail(p, SC_EINVAL, "dtype must be a numeric numpy dtype string (byte order < > | =, kind b i u f c, size "
                   "in bytes: \"<f4\", \"<i2\", \"|u1\") or name (\"float32\", \"int16\", \"uint8\", ...), got '%s'",
                   o.dtype ? o.dtype : "(null)");
    if (rc == SC_OK && (o.channels < 1 || o.channels > 65535))
        rc = pfail(p, SC_EINVAL, "channels must be 1..65535, got %u", o.channels);
    if (rc == SC_OK && !(o.rate >= 0 && isfinite(o.rate)))
        rc = pfail(p, SC_EINVAL, "rate must be a positive number of samples per second, or 0.0 for none, got %g",
                   o.rate);
    if (rc == SC_OK && o.timeout_ms < 0)
        rc = pfail(p, SC_EINVAL, "timeout_ms must be >= 0, got %d", o.timeout_ms);
    if (rc == SC_OK && o.source_id != NULL && utf8_length(o.source_id) > MAX_SOURCE_ID)
        rc = pfail(p, SC_EINVAL, "source_id must be a string of at most 256 characters, got %zu",
                   utf8_length(o.source_id));
    if (rc == SC_OK)
        rc = check_strings(p, "channel_names", o.channel_names, o.channels, 0);
    if (rc == SC_OK)
        rc = check_strings(p, "channel_types", o.channel_types, o.channels, MAX_META);
    if (rc == SC_OK)
        rc = check_strings(p, "channel_units", o.channel_units, o.channels, MAX_META);
    uint64_t layout = 0, carried = 0;
    if (rc == SC_OK)
        rc = pool_layout(p, o.slab_bytes, o.max_chunk_bytes, &layout, &carried);
    p->chunk_given = o.max_chunk_bytes != 0;
    char addr[sizeof p->address];
    if (rc == SC_OK && (address == NULL || *address == '\0'))
        rc = default_address(p, addr, sizeof addr);
    else if (rc == SC_OK)
        snprintf(addr, sizeof addr, "%s", address);
    if (rc) {
        rc = done(NULL, p->err, rc);
        free_pub(p, false);
        return rc;
    }
    snprintf(p->name, sizeof p->name, "%s", stream);
    snprintf(p->where, sizeof p->where, "stream '%s'", stream);
    p->timeout_ms = o.timeout_ms;
    p->info.struct_size = sizeof p->info;
    p->info.name = p->name;
    p->info.dtype = p->dtype;
    p->info.itemsize = itemsize;
    p->info.channels = o.channels;
    p->info.sample_bytes = (size_t)itemsize * o.channels;
    p->info.rate = o.rate;
    p->info.timestamps = o.timestamps != 0;

    p->conn = sc_new();
    if (p->conn == NULL) {
        free_pub(p, false);
        return done(NULL, "out of memory", SC_ENOMEM);
    }
    char label[129];
    if (o.label != NULL)
        snprintf(label, sizeof label, "%s", o.label);
    else
        snprintf(label, sizeof label, "publisher:%s", stream);
    if ((rc = sc_set_label(p->conn, label)) || (rc = sc_set_timeout(p->conn, CONNECT_TIMEOUT_MS)) ||
        (rc = sci_connect(p->conn, addr, "pub"))) {
        from_conn(p, rc);
    } else {
        snprintf(p->address, sizeof p->address, "%s", sci_address(p->conn));
        char where[300];
        snprintf(where, sizeof where, "publisher of stream '%s' at %s", stream, p->address);
        sci_set_where(p->conn, where);
        rc = open_stream(p, &o, layout, carried);
    }
    if (rc) {
        rc = done(NULL, p->err, rc);
        free_pub(p, true);
        return rc;
    }
    p->topic_len = strlen(stream) + 1;
    memcpy(p->topic, stream, p->topic_len);  /* name + NUL */
    p->info.slab_bytes = p->slab_bytes;
    p->info.reserve = p->reserve;
    p->info.max_frame = p->frame_limit / p->sample_bytes;
    p->info.segment = p->segment;
    p->info.segment_bytes = p->map_bytes;
    p->info.nslabs = p->nslabs;
    p->info.address = p->address;
    *out = p;
    return SC_OK;
}

/* ---------------------------------------------------------------- writing */

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Where the time of the sample at segment byte `offset` is kept (core/geometry.py time_at). */
static double *time_at(sc_pub *p, uint64_t offset)
{
    uint64_t slab = (offset - p->header_bytes) / p->slab_bytes;
    uint64_t within = offset - p->header_bytes - slab * p->slab_bytes;
    return (double *)(p->map + p->times_offset + 8 * (slab * p->slots_per_slab + within / p->sample_bytes));
}

/* Start writing the oldest granted slab (publisher.py _switch_to, PublisherState.switch): copy the tail that
 * subscribers may still be accumulating to just before its frames, at most what lies contiguously before the
 * write position in the slab it leaves (what that slab carried in, then its frames); return its data start. */
static uint64_t switch_slab(sc_pub *p)
{
    uint32_t slab = p->grants[p->ghead];
    p->ghead = (p->ghead + 1) % p->nslabs;
    p->gcount--;
    p->slab = slab;
    p->gen = __atomic_load_n(&p->gens[slab], __ATOMIC_ACQUIRE);  /* bumped by the broker before GRANT */
    uint64_t start = p->header_bytes + (uint64_t)slab * p->slab_bytes, data = start + p->reserve;
    uint64_t old = p->offset;
    uint64_t contiguous = p->end ? old - (p->slab_data - p->slab_carry) : 0;
    uint64_t carry = p->carry < contiguous ? p->carry : contiguous;
    p->slab_carry = carry;
    p->slab_frames = 0;
    p->switch_unsent = p->end != 0;  /* its first PUBLISHED tells the broker of the change */
    p->slab_data = data;
    p->end = start + p->slab_bytes;
    if (carry) {
        copy_frame((char *)p->map + data - carry, (const char *)p->map + old - carry, carry);  /* (other slabs) */
        if (p->info.timestamps)  /* with their times (copy_carry) */
            copy_frame((char *)time_at(p, data - carry), (const char *)time_at(p, old - carry),
                       8 * (carry / p->sample_bytes));
    }
    p->floor = p->stats.samples - carry / p->sample_bytes;
    p->offset = data;
    p->stats.slabs++;
    return data;
}

/* A frame of `nbytes` must go to a new slab: it does not fit, or this slab had its frames (notices_per_slab: then
 * at most a pool's worth of descriptors lie ahead of a block subscriber, fewer than the ring holds). */
static bool needs_slab(const sc_pub *p, uint64_t nbytes)
{
    return p->offset + nbytes > p->end || p->slab_frames >= p->frame_cap;
}

/* The byte where the next frame of `nbytes` goes, in the next granted slab when it must (waiting for a GRANT up
 * to the timeout: SC_EWRITETIMEOUT, nothing written). */
static int place(sc_pub *p, uint64_t nbytes, uint64_t *offset)
{
    if (!needs_slab(p, nbytes)) {
        *offset = p->offset;
        return SC_OK;
    }
    int rc = service(p);
    if (rc)
        return rc;
    int64_t deadline = sci_now_ms() + p->timeout_ms;
    while (p->gcount == 0) {
        if (sci_now_ms() >= deadline)
            return pfail(p, SC_EWRITETIMEOUT,
                         "no free slab for %s within %d ms: a policy='block' subscriber is behind, or subscribers "
                         "hold chunks in every slab; nothing of this frame was written", p->where, p->timeout_ms);
        if ((rc = wait_input(p, deadline)))
            return rc;
    }
    *offset = switch_slab(p);
    return SC_OK;
}

/* A write looks at joins and the broker's messages at most every LOOK_MS (and whenever it waits). */
static int look(sc_pub *p)
{
    if (p->failure)
        return pfail(p, p->failure, "%s", p->failure_msg);
    int64_t now = sci_now_ms();
    if (now < p->next_look)
        return SC_OK;
    p->next_look = now + LOOK_MS;
    return service(p);
}

static int send_published(sc_pub *p)
{
    _Static_assert(SCW_PUBLISHED_FIELDS == 1 && SCW_PUBLISHED_POSITION == 1, "PUBLISHED is packed in this order");
    int rc = send_uint_msg(p, SCW_PUBLISHED, SCW_PUBLISHED_FIELDS, p->pos, "PUBLISHED");
    if (rc)
        return rc;
    p->stats.published++;
    p->switch_unsent = false;
    if (p->carried_due) {  /* a CARRY that came while the slab change was untold: confirmed right after it */
        p->carried_due = false;
        return send_carried(p, p->carried_value);
    }
    return SC_OK;
}

/* Describe the frame of `n` samples just copied to `offset` in the ring, publish it, wake whoever sleeps, tell the
 * broker what it must know now (docs/protocol.md 9.4). */
static int publish(sc_pub *p, uint64_t offset, uint64_t n, double t0, unsigned flags)
{
    uint64_t seq = p->pos, index = p->stats.samples;
    pub_desc d = {seq, index, t0, offset, p->floor, (uint32_t)n, p->slab, p->gen, flags, 0};
    memcpy(p->ring + (seq & p->ring_mask) * DESC_BYTES, &d, sizeof d);
    /* Samples, descriptor, then the position: one aligned 8-byte store, after the frame's stores and before the
     * next descriptor's (a reader's lap check relies on the latter: 7.7). */
#if defined(__x86_64__) || defined(__i386__)
    __atomic_store_n(p->position, seq + 1, __ATOMIC_RELEASE);  /* a plain store: x86-64 keeps stores in order */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);                   /* (and the compiler keeps the next ones after it) */
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(p->position, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
    p->pos = seq + 1;
    p->slab_frames++;
    p->stats.frames++;
    p->stats.samples += n;
    /* Who must hear of it, from the words the broker keeps. */
    uint32_t futex = __atomic_load_n(p->futex_waiters, __ATOMIC_RELAXED);
    uint32_t doorbells = __atomic_load_n(p->doorbells, __ATOMIC_RELAXED);
    bool notify = __atomic_load_n(p->notices_wanted, __ATOMIC_RELAXED) != 0;
    if (futex) {
        /* Futex subscribers asleep on the position's low word; the system call is also a full barrier. */
        syscall(SYS_futex, (void *)p->position, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
        p->stats.wakes++;
    }
    if (doorbells) {
        /* The sleeper handshake (7.8): position stored, a full barrier, then the tables: either a subscriber about
         * to sleep sees the new position, or we see its byte. */
        if (!futex)
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint64_t any = 0, on_futex = 0;
        for (int i = 0; i < SLEEPERS / 8; i++) {
            any |= __atomic_load_n(&p->sleepers[i], __ATOMIC_RELAXED);
            on_futex |= __atomic_load_n(&p->sleepers[SLEEPERS / 8 + i], __ATOMIC_RELAXED);
        }
        notify = notify || any != 0;
        if (on_futex) {
            /* Asleep on the futex word: wake them after this look (a wake above may have come before they slept). */
            syscall(SYS_futex, (void *)p->position, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
            p->stats.wakes++;
        }
    }
    if (notify) {
        _Static_assert(SCW_NOTICE_STREAM_ID == 1 && SCW_NOTICE_NOTICE_SEQ == 2 && SCW_NOTICE_INDEX == 3 &&
                       SCW_NOTICE_SLAB == 4 && SCW_NOTICE_GEN == 5 && SCW_NOTICE_OFFSET == 6 && SCW_NOTICE_N == 7 &&
                       SCW_NOTICE_T0 == 8 && SCW_NOTICE_FLAGS == 9 && SCW_NOTICE_FLOOR == 10 &&
                       SCW_NOTICE_FIELDS == 10, "NOTICE is packed in this order");
        msgpack_packer *pk = notice_packer(p, p->topic, p->topic_len);
        msgpack_pack_array(pk, 1 + SCW_NOTICE_FIELDS);
        msgpack_pack_uint64(pk, SCW_NOTICE);
        msgpack_pack_uint64(pk, p->sid);
        msgpack_pack_uint64(pk, p->nseq++);
        msgpack_pack_uint64(pk, index);
        msgpack_pack_uint64(pk, p->slab);
        msgpack_pack_uint64(pk, p->gen);
        msgpack_pack_uint64(pk, offset);
        msgpack_pack_uint64(pk, n);
        msgpack_pack_double(pk, t0);
        msgpack_pack_uint64(pk, flags);
        msgpack_pack_uint64(pk, p->floor);
        send_notice(p);
        p->stats.notices++;
    }
    if (p->switch_unsent || __atomic_load_n(p->frames_wanted, __ATOMIC_RELAXED))
        return send_published(p);
    return SC_OK;
}

/* The checks every write and commit make (nothing is written when one fails). */
static int check_call(sc_pub *p, const char *call)
{
    if (p->forks != forks)
        return pfail(p, SC_EINVAL, "%s: the publisher of %s was opened before this process forked; its sockets and "
                     "locks are the parent's: open a publisher in the process that writes", call, p->where);
    return SC_OK;
}

static int check_t0(sc_pub *p, double *t0)
{
    if (isnan(*t0))
        *t0 = wall_now();
    else if (!isfinite(*t0))
        return pfail(p, SC_EINVAL, "t0 must be a finite number of seconds, got %g (%s); nothing was written", *t0,
                     p->where);
    return SC_OK;
}

static int check_flags(sc_pub *p, unsigned flags)
{
    if (flags & ~(unsigned)SC_FLAG_DISCONTINUITY)
        return pfail(p, SC_EINVAL, "flags may hold only SC_FLAG_DISCONTINUITY (1), got %u (%s); nothing was written",
                     flags, p->where);
    return SC_OK;
}

static int check_frame(sc_pub *p, uint64_t n)
{
    if (n < 1)
        return pfail(p, SC_EINVAL, "a frame must hold at least one sample, got n=0 (%s)", p->where);
    if (n > p->frame_limit / p->sample_bytes)
        return pfail(p, SC_EINVAL, "a frame of %llu samples (%llu bytes) is larger than %s allows (%llu bytes: a "
                     "slab's room for frames, %s); split it, or open the stream with a larger sc_pub_options.slab_bytes "
                     "(slabcast-pub --slab-bytes; docs/up.md, Sizing); nothing was written", (unsigned long long)n, (unsigned long long)(n * p->sample_bytes),
                     p->where, (unsigned long long)p->frame_limit,
                     p->chunk_given ? "slab_bytes - max_chunk_bytes" : "half of slab_bytes when max_chunk_bytes is not "
                     "given");
    return SC_OK;
}

/* `n` times, each finite (Python's check_times), or SC_EINVAL naming the first that is not. */
static int check_times(sc_pub *p, const double *times, uint64_t n)
{
    for (uint64_t k = 0; k < n; k++)
        if (!isfinite(times[k]))
            return pfail(p, SC_EINVAL, "times must be finite seconds, got %g at sample %llu (%s); nothing was written",
                         times[k], (unsigned long long)k, p->where);
    return SC_OK;
}

/* The times of the frame at `offset`: `times`, or t0 + k / rate (_pubargs.py check_times: start + k * step). */
static void write_times(sc_pub *p, uint64_t offset, uint64_t n, double t0, const double *times)
{
    double *at = time_at(p, offset);
    if (times != NULL) {
        memcpy(at, times, 8 * n);
        return;
    }
    double step = p->info.rate > 0 ? 1.0 / p->info.rate : 0.0;
    for (uint64_t k = 0; k < n; k++)
        at[k] = t0 + (double)k * step;
}

static int write_locked(sc_pub *p, const void *data, uint64_t n, double t0, unsigned flags, const double *times)
{
    int rc;
    if ((rc = check_call(p, "sc_pub_write")) || (rc = check_frame(p, n)) || (rc = check_flags(p, flags)))
        return rc;
    if (data == NULL)
        return pfail(p, SC_EINVAL, "sc_pub_write: data is NULL (%s)", p->where);
    if (p->loaned)
        return pfail(p, SC_EINVAL, "sc_pub_write while a loan of %s is open: sc_pub_commit it first", p->where);
    if (times != NULL) {
        if (!p->info.timestamps)
            return pfail(p, SC_EINVAL, "times need a stream opened with timestamps=1; %s was not", p->where);
        if ((rc = check_times(p, times, n)))
            return rc;
        if (isnan(t0))
            t0 = times[0];
    }
    if ((rc = check_t0(p, &t0)) || (rc = look(p)))
        return rc;
    uint64_t nbytes = n * p->sample_bytes, offset;
    if ((rc = place(p, nbytes, &offset)))
        return rc;
    copy_frame((char *)p->map + offset, data, nbytes);
    if (p->info.timestamps)
        write_times(p, offset, n, t0, times);
    p->offset = offset + nbytes;
    return publish(p, offset, n, t0, flags);
}

int sc_pub_write(sc_pub *pub, const void *data, uint64_t n, double t0, unsigned flags, const double *times)
{
    if (pub == NULL)
        return done(NULL, "sc_pub_write: pub is NULL", SC_EINVAL);
    pthread_mutex_lock(&pub->lock);
    int rc = write_locked(pub, data, n, t0, flags, times);
    rc = done(pub, pub->err, rc);
    pthread_mutex_unlock(&pub->lock);
    return rc;
}

int sc_pub_loan(sc_pub *pub, uint64_t n, void **data)
{
    if (pub == NULL || data == NULL)
        return done(pub, "sc_pub_loan: pub or data is NULL", SC_EINVAL);
    pthread_mutex_lock(&pub->lock);
    int rc;
    uint64_t offset = 0;
    if (!(rc = check_call(pub, "sc_pub_loan")) && !(rc = check_frame(pub, n))) {
        if (pub->loaned)
            rc = pfail(pub, SC_EINVAL, "sc_pub_loan while a loan of %s is open: sc_pub_commit it first", pub->where);
        else if (!(rc = look(pub)))
            rc = place(pub, n * pub->sample_bytes, &offset);
    }
    if (rc == SC_OK) {
        pub->loaned = true;
        pub->loan_times = false;
        pub->loan_offset = offset;
        pub->loan_n = n;
        *data = pub->map + offset;
    }
    rc = done(pub, pub->err, rc);
    pthread_mutex_unlock(&pub->lock);
    return rc;
}

static int commit_locked(sc_pub *p, uint64_t n, double t0, unsigned flags)
{
    int rc;
    if ((rc = check_call(p, "sc_pub_commit")))
        return rc;
    if (!p->loaned)
        return pfail(p, SC_EINVAL, "sc_pub_commit without a loan (%s): call sc_pub_loan first", p->where);
    if (p->failure) {
        p->loaned = false;
        return pfail(p, p->failure, "%s", p->failure_msg);
    }
    if (n == 0) {  /* given back: the next frame goes where it would have */
        p->loaned = false;
        return SC_OK;
    }
    if (n > p->loan_n)
        return pfail(p, SC_EINVAL, "sc_pub_commit of %llu samples, but the loan holds %llu (%s)",
                     (unsigned long long)n, (unsigned long long)p->loan_n, p->where);
    if ((rc = check_flags(p, flags)))
        return rc;
    const double *times = p->loan_times ? time_at(p, p->loan_offset) : NULL;
    if (times != NULL) {
        if ((rc = check_times(p, times, n)))
            return rc;
        if (isnan(t0))
            t0 = times[0];
    }
    if ((rc = check_t0(p, &t0)))
        return rc;
    p->loaned = false;
    if (p->info.timestamps && times == NULL)
        write_times(p, p->loan_offset, n, t0, NULL);
    p->offset = p->loan_offset + n * p->sample_bytes;
#if defined(__x86_64__)
    _mm_sfence();  /* (the caller may have filled the loan by streaming stores: ordered before the position too) */
#endif
    if ((rc = publish(p, p->loan_offset, n, t0, flags)))
        return rc;
    return look(p);
}

int sc_pub_loan_times(sc_pub *pub, double **times)
{
    if (pub == NULL || times == NULL)
        return done(pub, "sc_pub_loan_times: pub or times is NULL", SC_EINVAL);
    pthread_mutex_lock(&pub->lock);
    int rc = SC_OK;
    if (!pub->loaned)
        rc = pfail(pub, SC_EINVAL, "sc_pub_loan_times without a loan (%s): call sc_pub_loan first", pub->where);
    else if (!pub->info.timestamps)
        rc = pfail(pub, SC_EINVAL, "times need a stream opened with timestamps=1; %s was not", pub->where);
    if (rc == SC_OK) {
        pub->loan_times = true;
        *times = time_at(pub, pub->loan_offset);
    }
    rc = done(pub, pub->err, rc);
    pthread_mutex_unlock(&pub->lock);
    return rc;
}

int sc_pub_commit(sc_pub *pub, uint64_t n, double t0, unsigned flags)
{
    if (pub == NULL)
        return done(NULL, "sc_pub_commit: pub is NULL", SC_EINVAL);
    pthread_mutex_lock(&pub->lock);
    int rc = commit_locked(pub, n, t0, flags);
    rc = done(pub, pub->err, rc);
    pthread_mutex_unlock(&pub->lock);
    return rc;
}

static int flush_locked(sc_pub *p, int timeout_ms)
{
    int rc;
    if ((rc = check_call(p, "sc_pub_flush")) || (rc = look(p)))
        return rc;
    _Static_assert(SCW_SYNC_FIELDS == 1 && SCW_SYNC_TOKEN == 1, "SYNC is packed in this order");
    uint64_t token = ++p->sync_token;
    if ((rc = send_uint_msg(p, SCW_SYNC, SCW_SYNC_FIELDS, token, "SYNC")))
        return rc;
    if (timeout_ms < 0)
        timeout_ms = p->timeout_ms;
    int64_t deadline = sci_now_ms() + timeout_ms;
    while (p->synced < token) {
        if (sci_now_ms() >= deadline)
            return pfail(p, SC_EWRITETIMEOUT, "the broker did not confirm the frames of %s within %d ms", p->where,
                         timeout_ms);
        if ((rc = wait_input(p, deadline)))
            return rc;
    }
    return SC_OK;
}

int sc_pub_flush(sc_pub *pub, int timeout_ms)
{
    if (pub == NULL)
        return done(NULL, "sc_pub_flush: pub is NULL", SC_EINVAL);
    pthread_mutex_lock(&pub->lock);
    int rc = flush_locked(pub, timeout_ms);
    rc = done(pub, pub->err, rc);
    pthread_mutex_unlock(&pub->lock);
    return rc;
}

int sc_pub_service(sc_pub *pub)
{
    if (pub == NULL)
        return done(NULL, "sc_pub_service: pub is NULL", SC_EINVAL);
    pthread_mutex_lock(&pub->lock);
    int rc = pub->forks != forks ? check_call(pub, "sc_pub_service") : service(pub);
    rc = done(pub, pub->err, rc);
    pthread_mutex_unlock(&pub->lock);
    return rc;
}

const sc_pub_info *sc_pub_get_info(const sc_pub *pub)
{
    return pub ? &pub->info : NULL;
}

void sc_pub_get_stats_sized(const sc_pub *pub, sc_pub_stats *out, size_t out_size)
{
    if (pub == NULL || out == NULL || out_size < sizeof out->struct_size)
        return;
    sc_pub_stats full = pub->stats;
    full.struct_size = sizeof full;
    size_t n = out_size < sizeof full ? out_size : sizeof full;
    memcpy(out, &full, n);
    if (out_size > n)
        memset((char *)out + n, 0, out_size - n);
    out->struct_size = n;
}

/* ---------------------------------------------------------------- closing */

/* docs/protocol.md 9.6: the ring closed, sleepers woken, NOTICE_END, CLOSE, the broker's END. */
static int close_stream(sc_pub *p)
{
    p->loaned = false;  /* an open loan is given back: nothing describes it */
    __atomic_store_n(p->closed, 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, (void *)p->position, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    /* In order after the last notice: subscribers end once they have read everything. */
    _Static_assert(SCW_NOTICE_END_STREAM_ID == 1 && SCW_NOTICE_END_NOTICE_SEQ == 2 && SCW_NOTICE_END_CODE == 3 &&
                   SCW_NOTICE_END_MESSAGE == 4 && SCW_NOTICE_END_HEAD == 5 && SCW_NOTICE_END_FIELDS == 5,
                   "NOTICE_END is packed in this order");
    char text[128];
    snprintf(text, sizeof text, "stream '%s' closed", p->name);
    msgpack_packer *pk = notice_packer(p, p->topic, p->topic_len);
    msgpack_pack_array(pk, 1 + SCW_NOTICE_END_FIELDS);
    msgpack_pack_uint64(pk, SCW_NOTICE_END);
    msgpack_pack_uint64(pk, p->sid);
    msgpack_pack_uint64(pk, p->nseq++);
    pack_str(pk, SCW_END_CLOSED);
    pack_str(pk, text);
    msgpack_pack_uint64(pk, p->stats.samples);
    send_notice(p);
    if (p->failure)
        return pfail(p, p->failure, "%s", p->failure_msg);
    if (sci_gone(p->conn))
        return pfail(p, SC_EBROKERGONE, "no stream to close: the broker at %s is gone (%s)", p->address, p->where);
    _Static_assert(SCW_CLOSE_FIELDS == 0, "CLOSE has no fields");
    int rc = send_uint_msg(p, SCW_CLOSE, SCW_CLOSE_FIELDS, 0, "CLOSE");
    if (rc)
        return rc;
    /* CLOSE is answered by END closed once every frame published before it was read. */
    int64_t deadline = sci_now_ms() + p->timeout_ms;
    for (;;) {
        msgview m;
        rc = sci_next_msg(p->conn, deadline, &m);
        if (rc == SC_ETIMEOUT)
            return pfail(p, SC_EBROKERGONE, "the broker at %s did not confirm the end of %s within %d ms", p->address,
                         p->where, p->timeout_ms);
        if (rc)
            return from_conn(p, rc);
        if (m.kind == SCW_END) {
            rc = end_error(p, &m);
            return rc == SC_EOF ? SC_OK : rc;
        }
        if (m.kind == SCW_ERROR)
            return from_conn(p, sci_broker_error(p->conn, &m));
    }
}

int sc_pub_close(sc_pub *pub)
{
    if (pub == NULL)
        return SC_OK;
    if (pub->forks != forks) {
        /* Inherited through fork(): the sockets, the notice socket's file and the stream are the parent's. */
        pub->bound = false;
        free_pub(pub, false);
        return SC_OK;
    }
    pthread_mutex_lock(&pub->lock);
    int rc = close_stream(pub);
    rc = done(NULL, pub->err, rc);
    pthread_mutex_unlock(&pub->lock);
    free_pub(pub, true);
    return rc;
}
