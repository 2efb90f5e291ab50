/*
 * slabcast.c: a subscriber of the slabcast wire protocol over libzmq and msgpack-c.
 *
 * Version 3 (the default, docs/protocol.md sections 6 and 10): the client reads the frame descriptors the
 * publisher writes into the segment's descriptor ring (src/slabcast/core/ring.py), cuts its own chunks from
 * them (rechunk_feed is a port of src/slabcast/core/rechunk.py's Rechunker.feed), leases them with OFD
 * record locks checked against the segment's generation table, and reports how far it has read with ACK.
 * The publisher's NOTICEs only wake it.  The receive loop (pump_ring) mirrors LocalReceiver.recv in
 * src/slabcast/client/_local.py.  Version 2 (sc_set_protocol_version(c, 2)): the same, cut from the
 * contents of the NOTICEs (pump_notices).  Version 1: the broker cuts the chunks (CHUNK) and the client
 * gives each back (RELEASE).
 */
#define _GNU_SOURCE             /* F_OFD_SETLK, getrandom, syscall */
#define _FILE_OFFSET_BITS 64    /* lock offsets past 2^40 in struct flock */

#include "slabcast.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <linux/futex.h>

#include <msgpack.h>
#include <zmq.h>

/*
 * The wire protocol: message kinds (SCW_HELLO...), each message's field positions (SCW_<MESSAGE>_<FIELD>,
 * 1 = the first field after the kind, so that `a[SCW_X_Y]` of the whole array is that field), END and ERROR
 * codes, chunk flags, limits.  GENERATED from src/slabcast/wire/messages.py, the single table of every
 * message (tests/unit/test_messages.py keeps it equal); internal: slabcast.h does not include it.
 */
#include "slabcast_wire.h"
#include "internal.h"        /* msgview, and the sci_ helpers lent to publisher.c (at the end of this file) */

/* What the public header promises is what the wire says. */
_Static_assert(SC_PROTOCOL_VERSION == SCW_VERSION, "slabcast.h's SC_PROTOCOL_VERSION is the wire version");
_Static_assert(SC_FLAG_DISCONTINUITY == SCW_FLAG_DISCONTINUITY, "slabcast.h's SC_FLAG_DISCONTINUITY is the wire's");

/* A message field as (position, name) for the field_* readers: AT(SUBSCRIBED, RATE) is
 * SCW_SUBSCRIBED_RATE, "RATE" (errors spell the name in lower case, as the protocol does). */
#define AT(msg, field) SCW_##msg##_##field, #field

#define IPC_PATH_MAX 107         /* sun_path holds 108 bytes with the NUL */
#define MAX_INFLIGHT 1024
#define MAX_SAMPLER_SECONDS 1e9  /* src/slabcast/wire/protocol.py's MAX_SAMPLER_SECONDS */
#define BYE_TIMEOUT_MS 1000      /* how long sc_close waits for END bye */
#define CLOSE_LINGER_MS 200      /* bounded linger when closing the socket */
#define DEFAULT_TIMEOUT_MS 5000
#define KEEPALIVE_MS 1000        /* tcp://: a SYNC after this long without sending (the broker drops 10 s of silence) */
/* A public function given no client (sc_new() failed: sc_errmsg(NULL) says so) returns SC_EINVAL. */
#define NEED_CLIENT(c)          \
    do {                        \
        if ((c) == NULL)        \
            return SC_EINVAL;   \
    } while (0)

#define HEARTBEAT_IVL_MS 1000    /* tcp://: ZeroMQ's heartbeat (wire/protocol.py HEARTBEAT_IVL, HEARTBEAT_TIMEOUT): a */
#define HEARTBEAT_TIMEOUT_MS 15000 /* dead peer is seen within 15 s; a client paused up to the broker's 10 s of
                                    * silence keeps its connection (one paused longer is told END evicted) */

/* Versions 2 and 3 (values of src/slabcast/client/_local.py, core/shm.py, core/ring.py and core/rechunk.py, which
 * the wire header does not carry; checked by tests/integration/test_c_client.py). */
#define TOKEN_BYTES 8            /* random token sent in SUBSCRIBE (1..32 bytes allowed); its topic is 0x01 + token */
#define ACK_INTERVAL_MS 100      /* ACKs that only refresh counters: at most this often */
#define COUNTS_INTERVAL_MS 400   /* ... when our cursor is in the ring's cursor table and the broker does not ask */
#define END_GRACE_MS 1000        /* version 2: once the end is known, wait this long for notices still on their way */
#define LOOK_MS 100              /* while waiting, look at the broker connection at least this often */
#define RECHUNK_EPS 1e-9         /* a sample within this of the pause end counts as after it */
#define GEN_OFFSET 256           /* u32 gen[nslabs] in the segment header */
#define LOCK_BASE (1ull << 40)   /* lease lock byte of slab i: LOCK_BASE + i */
#define CLIENT_BASE (1ull << 42) /* liveness lock byte of a local subscriber: CLIENT_BASE + its ATTACH slot */
#define SEG_LAYOUT 3             /* segment layout: 2 added the generation table, 3 the descriptor ring */

/* Segment header (docs/protocol.md 7.2), little-endian; only what we check is read. */
#define HDR_MAGIC 0              /* 8 bytes "SLABCAST" */
#define HDR_LAYOUT 8             /* u32, 3 (1 before the generation table, 2 before the ring; same fields) */
#define HDR_HEADER_BYTES 12      /* u32, where slab 0 starts */
#define HDR_SLAB_BYTES 16        /* u64 */
#define HDR_NSLABS 24            /* u32 */
#define HDR_SAMPLE_BYTES 28      /* u32, dtype size * channels */
#define HDR_MIN_BYTES 136
/* Version 3: the descriptor ring's header words (src/slabcast/core/ring.py).  The publisher is their only
 * writer but for the counts the broker writes; we only read them. */
#define HDR_RING_SLOTS 136       /* u32, descriptors in the ring (a power of two) */
#define HDR_DESC_BYTES 140       /* u32, bytes per descriptor: DESC_BYTES */
#define HDR_RING_OFFSET 144      /* u64, where the ring starts in the segment (after the slabs and time tables) */
#define HDR_POSITION 152         /* u64, descriptors published; its low 32 bits are the futex word */
#define HDR_CLOSED 172           /* u32, 1 once the publisher wrote its last descriptor */
#define HDR_SLEEP_FUTEX 180      /* u32, 1 once the publisher wakes subscribers asleep on the futex word with a byte */
#define HDR_FRAME_MAX 188        /* u32, the most samples in one frame so far (0: not kept): wake targets (10.7) */
#define HDR_ACKS_WANTED 184      /* u32, 1 while the broker asks for ACKs (the publisher short of slabs): 7.9 */
#define HDR_ACK_TARGET 192       /* u32, whom: 0 every subscriber, 1 + e the one at cursor table entry e */
#define HDR_ACK_AT 200           /* u64, from which cursor the one asked sends ACK (0: any) */
#define CURSOR_TAG_SHIFT 48      /* a cursor table entry: (tag << 48) | (cursor - start) */
#define WAKE_ALL 0xFFFFFFFFu     /* a futex bitset matching every waiter */
#define SLEEPER_BIT 64           /* a futex sleeper table byte 64 + b: asleep with the mask 1 << b (7.8) */
#define RING_READ 1024           /* the most descriptors copied from the ring at a time */
#define SLEEPERS 256             /* bytes of the sleeper table, just after the ring: one per doorbell subscriber */

/* One descriptor of the ring as the publisher writes it (64 bytes, little-endian, every field aligned). */
#define DESC_BYTES 64
#define DESC_SEQ 0               /* u64, the ring position it was published at */
#define DESC_INDEX 8             /* u64, stream index of the frame's first sample */
#define DESC_T0 16               /* f64, time of the frame's first sample */
#define DESC_OFFSET 24           /* u64, segment byte of the frame's first sample */
#define DESC_FLOOR 32            /* u64, the lowest stream index readable contiguously in the frame's slab */
#define DESC_N 40                /* u32, samples in the frame (>= 1) */
#define DESC_SLAB 44             /* u32 */
#define DESC_GEN 48              /* u32, the slab's generation when the frame was written */
#define DESC_FLAGS 52            /* u32, FLAG_DISCONTINUITY: the stream jumps before this frame */
typedef struct ring_desc {
    uint64_t seq, index;
    double t0;
    uint64_t offset, floor;
    uint32_t n, slab, gen, flags;
    uint64_t zero;
} ring_desc;
_Static_assert(sizeof(ring_desc) == DESC_BYTES && offsetof(ring_desc, seq) == DESC_SEQ &&
               offsetof(ring_desc, index) == DESC_INDEX && offsetof(ring_desc, t0) == DESC_T0 &&
               offsetof(ring_desc, offset) == DESC_OFFSET && offsetof(ring_desc, floor) == DESC_FLOOR &&
               offsetof(ring_desc, n) == DESC_N && offsetof(ring_desc, slab) == DESC_SLAB &&
               offsetof(ring_desc, gen) == DESC_GEN && offsetof(ring_desc, flags) == DESC_FLAGS,
               "ring_desc is the descriptor as core/ring.py lays it out");
/* The segment's words are little-endian and read in place (the ring, the generation table, the position). */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the C client reads the segment's little-endian words "
               "in place: a little-endian host (x86-64, aarch64) is required");

/* How a version-3 subscriber waits for the next frame (sc_sub_options.wake; SUBSCRIBE's wake). */
typedef enum wake_kind { WAKE_DOORBELL, WAKE_FUTEX, WAKE_BUSY } wake_kind;
static const char *const WAKE_NAMES[] = {"doorbell", "futex", "busy"};

/* A chunk handed out and not yet released. */
typedef struct held_chunk {
    uint64_t seq;
    uint32_t slab;               /* version 2: the slab whose lease it counts in */
    zmq_msg_t *payload;          /* tcp://: the message part holding its bytes (freed at its release), or NULL */
} held_chunk;

/* A chunk cut (version 2) and leased, not yet handed out by sc_recv. */
typedef struct ready_chunk {
    uint64_t seq, index, n, offset;
    double t0;
    uint32_t slab;
    unsigned flags;
} ready_chunk;

/* This client's lease on one slab: a shared OFD lock while `locked`. */
typedef struct slab_lease {
    uint32_t gen;                /* the generation the lock was taken for */
    uint32_t count;              /* chunks of it handed out and not released, or cut and not handed out */
    bool locked;
} slab_lease;

/* The rechunking rules of docs/protocol.md section 8: src/slabcast/core/rechunk.py's Rechunker. */
typedef struct rechunker {
    uint64_t size;
    bool clip;
    double rate;                 /* 0.0: the stream has none */
    bool sampler;                /* a constant pause after each chunk (sc_sub_options.sampler) */
    double pause;
    bool has_start;              /* Rechunker.start is not None */
    uint64_t start;              /* index of the first pending sample */
    double t0;                   /* time of the first pending sample */
    bool pausing;                /* Rechunker.pause_until is not None (no rate) */
    double pause_until;
    bool pausing_at;             /* Rechunker.pause_at is not None (with a rate: the pause in samples) */
    uint64_t pause_at;
    bool has_last;               /* a frame was fed: last_t0 is its time */
    double last_t0;
} rechunker;

struct sc_client {
    void *ctx;
    void *sock;                  /* DEALER connected to the broker's ROUTER */
    void *mon;                   /* PAIR receiving the DEALER's monitor events */
    zmq_msg_t msg;               /* the last message received; decoded objects point into it */
    bool msg_live;
    msgpack_unpacked unp;
    msgpack_sbuffer sbuf;
    msgpack_packer pk;
    unsigned version;
    bool local;                  /* versions 2 and 3: this client cuts its own chunks */
    bool ring;                   /* version 3: ... from the segment's descriptor ring (version 2: the notices) */
    int timeout_ms;
    bool connected;              /* WELCOME received */
    bool gone;                   /* the connection dropped (monitor) or END broker-shutdown */
    bool subscribed;
    int end_code;                /* sticky result once the subscription ended, else 0 */
    uint64_t broker_pid;
    uint64_t epoch;
    char address[IPC_PATH_MAX + 8];
    char label[129];
    char stream[65];
    char dtype[17];
    char segment[256];
    char where[256];             /* "subscriber of stream 'x' at ipc://..." for messages */
    sc_stream_info info;
    const unsigned char *map;
    size_t map_bytes;
    size_t header_bytes;
    held_chunk *held;            /* chunks received and not released */
    size_t nheld, held_cap;
    unsigned max_held;           /* max_inflight */
    bool drop;                   /* policy "drop" */
    sc_stats stats;

    /* Versions 2 and 3. */
    void *notices;               /* SUB connected to the publisher's notice socket */
    msgpack_unpacked nunp;       /* the last notice decoded */
    int lock_fd;                 /* the segment opened O_RDONLY: holds our lease locks */
    uint64_t sid;                /* stream_id of SUBSCRIBED: notices of other ids are ignored */
    uint64_t slab_bytes;
    uint32_t nslabs;
    char endpoint[256];          /* the notice socket */
    unsigned char topic[66];     /* stream name + NUL */
    size_t topic_len;
    unsigned char token[1 + TOKEN_BYTES];  /* token topic: 0x01 + token */
    rechunker rk;
    slab_lease *leases;          /* nslabs entries */
    uint32_t *locked;            /* the slabs we hold a lock on */
    uint32_t nlocked;
    bool unlocked;               /* a lock was given back since the last ACK */
    /* The notice being cut (at most one at a time: the next is read once it is done). */
    bool have_frames;
    uint64_t fr_index, fr_slab, fr_gen, fr_offset, fr_floor;  /* index/offset: of frame fr_i */
    unsigned fr_flags;
    uint32_t fr_i, fr_count, fr_cap;
    uint64_t *fr_n;
    double *fr_t0;
    /* Chunks cut and leased, not yet handed out. */
    ready_chunk *ready;
    size_t rhead, rcount, rcap;
    uint64_t next_seq;           /* chunks cut, delivered or dropped */
    uint64_t dropped;
    uint64_t cursor;             /* index just past the last frame cut */
    int64_t cur_slab;            /* slab of the frames being cut, -1 before the first */
    bool jumped;                 /* the next chunk handed out is flagged as a discontinuity */
    bool partial;                /* partial_tail: partial chunks before a discontinuity and at the end */
    bool tail_cut;               /* the end's partial chunk was looked for (once) */
    uint64_t last_slab, last_gen, last_end;  /* the slab, generation and end byte of the last frame cut */
    int64_t nseq;                /* the next notice_seq expected, -1 before the first */
    int64_t acked_slab, acked_dropped, acked_held;  /* state at the last ACK */
    uint64_t acked_cursor, acked_received;
    int64_t acked_at;
    int64_t direct_due;           /* when sc_recv next looks for the broker's messages before a chunk (LOOK_MS) */
    int cut_rc;                  /* an error met while cutting a frame, returned once it is done */
    bool have_end;               /* the stream's end is known (NOTICE_END, or END with head) */
    char end_code_s[64];
    char end_text[768];
    uint64_t end_head;
    int64_t end_seen;            /* ms when the end became known */
    int64_t last_notice;         /* ms when the last notice of the stream was read */

    /* Version 3: the descriptor ring. */
    wake_kind wake;
    const unsigned char *ring_base;  /* descriptor 0 */
    const uint64_t *position;    /* the header's position word (its low 32 bits: the futex word) */
    const uint32_t *closed;      /* the header's closed word */
    const uint32_t *sleep_futex; /* the header's sleep_futex word (docs/protocol.md 7.8) */
    const uint32_t *frame_max;   /* the header's frame_max word (docs/protocol.md 10.7, wake targets) */
    bool broker_futex_table;     /* SUBSCRIBED futex_sleeper: the broker takes ATTACH's futex_sleeper */
    bool futex_table;            /* wake futex, said ATTACH futex_sleeper: it sleeps with its byte in the futex
                                  * sleeper table, as the doorbell does in a blocking call (docs/protocol.md 7.8) */
    bool woken_idle;             /* the last futex wait was woken with nothing to read: the broker (its END, an
                                  * eviction) may wake us before its message arrives, so the next wait polls */
    uint64_t ring_slots;
    uint64_t rseq;               /* the next descriptor to copy from the ring */
    ring_desc *rd;               /* descriptors copied, not yet cut: rd[rd_head..rd_count) */
    uint64_t rd_seq;             /* the seq of rd[0] */
    uint32_t rd_head, rd_count, rd_cap;
    uint64_t sleepers_at;        /* where the sleeper table starts in the segment */
    unsigned char *sleeper_map;  /* doorbell: the page(s) holding the sleeper table, mapped writable (or NULL) */
    size_t sleeper_map_bytes;
    unsigned char *sleeper;      /* our byte of the table (ATTACHED's sleeper), or NULL: a notice for every frame */
    bool armed;                  /* our sleeper byte is set (until the next sc_recv, after one that found nothing) */
    uint64_t *cursor_entry;      /* our cursor table entry (ATTACHED's cursor_tag and sleeper), or NULL: ACK per slab */
    uint64_t cursor_bits;        /* its tag << CURSOR_TAG_SHIFT */
    uint64_t cursor_start;       /* ATTACHED's start: what the entry's low bits count from */
    uint64_t posted_cursor;      /* the cursor we last posted there */
    uint32_t cursor_index;       /* the entry's index (ack_target 1 + it asks us) */
    const uint32_t *acks_wanted, *ack_target;
    const uint64_t *ack_at;
    unsigned char arm_value;     /* what we set it to, 1..255: changed only after we read (docs/protocol.md 7.8) */
    uint64_t armed_rseq;         /* the ring descriptor we had read up to when we chose it (UINT64_MAX: a
                                  * notice came since: choose another) */

    /* Since 1.3.0. */
    bool held_request;           /* a SUBSCRIBE with wait the broker may still hold (its wait expired) */
    int epfd;                    /* sc_fd's epoll instance, or -1 */
    char *meta_text;             /* every string of the stream's metadata, NUL-terminated, back to back */
    const char **meta_ptrs;      /* channel names, then types and units if given (pointers into meta_text) */
    bool timestamps;             /* the stream keeps a time per sample (SUBSCRIBED's meta) */
    uint64_t times_offset;       /* where the per-sample time tables start (docs/protocol.md 7.5) */
    /* tcp:// (docs/protocol.md 11): broker-cut chunks by value, over CURVE. */
    bool remote;
    bool handshaken;             /* the CURVE handshake succeeded (monitor) */
    bool tcp_connected;          /* tcp://: a TCP connection was made (monitor): no handshake after it is the keys' */
    bool denied;                 /* the broker refused our CURVE key (monitor: a failed handshake) */
    char curve_public[41], curve_secret[41], curve_server[41];  /* Z85 keys (sc_set_curve), "" if none */
    char curve_server_file[256];
    zmq_msg_t *payload;          /* the data part of the last CHUNK received, until take_chunk takes it */
    int64_t sent_at;             /* ms when we last sent anything: a remote client talks at least every second */

    char err[1024];
    char end_msg[1024];
};
/* ------------------------------------------------------------------ errors */

static int fail(sc_client *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Record a message for sc_errmsg() and return `code`. */
static int fail(sc_client *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return code;
}

/* Make `code` the sticky end of the subscription, with the current message. */
static int end_with(sc_client *c, int code)
{
    if (c->local)
        c->stats.cut = c->next_seq;  /* (every end says how many chunks were cut for us: broker gone too) */
    c->end_code = code;
    memcpy(c->end_msg, c->err, sizeof c->end_msg);
    return code;
}

const char *sc_errmsg(const sc_client *c)
{
    if (c == NULL)
        return "out of memory (no client)";
    return c->err[0] ? c->err : "no error";
}

const char *sc_strerror(int code)
{
    switch (code) {
    case SC_OK: return "SC_OK";
    case SC_EOF: return "SC_EOF";
    case SC_ETIMEOUT: return "SC_ETIMEOUT";
    case SC_EBROKERGONE: return "SC_EBROKERGONE";
    case SC_EPUBGONE: return "SC_EPUBGONE";
    case SC_EEVICTED: return "SC_EEVICTED";
    case SC_EEND: return "SC_EEND";
    case SC_EVERSION: return "SC_EVERSION";
    case SC_EPROTO: return "SC_EPROTO";
    case SC_ELOST: return "SC_ELOST";
    case SC_ENOSTREAM: return "SC_ENOSTREAM";
    case SC_EREQUEST: return "SC_EREQUEST";
    case SC_EINVAL: return "SC_EINVAL";
    case SC_ESYS: return "SC_ESYS";
    case SC_ENOMEM: return "SC_ENOMEM";
    case SC_EWRITETIMEOUT: return "SC_EWRITETIMEOUT";
    case SC_EEXISTS: return "SC_EEXISTS";
    case SC_ESHMFULL: return "SC_ESHMFULL";
    case SC_EDENIED: return "SC_EDENIED";
    default: return "unknown slabcast status";
    }
}

static const char *kind_name(uint64_t kind)
{
    switch (kind) {
    case SCW_HELLO: return "HELLO";
    case SCW_OPEN: return "OPEN";
    case SCW_PUBLISHED: return "PUBLISHED";
    case SCW_CLOSE: return "CLOSE";
    case SCW_SUBSCRIBE: return "SUBSCRIBE";
    case SCW_RELEASE: return "RELEASE";
    case SCW_BYE: return "BYE";
    case SCW_STATUS: return "STATUS";
    case SCW_UNSUBSCRIBE: return "UNSUBSCRIBE";
    case SCW_SYNC: return "SYNC";
    case SCW_STATS: return "STATS";
    case SCW_ACK: return "ACK";
    case SCW_CARRIED: return "CARRIED";
    case SCW_ATTACH: return "ATTACH";
    case SCW_WELCOME: return "WELCOME";
    case SCW_OPENED: return "OPENED";
    case SCW_GRANT: return "GRANT";
    case SCW_SUBSCRIBED: return "SUBSCRIBED";
    case SCW_CHUNK: return "CHUNK";
    case SCW_END: return "END";
    case SCW_ERROR: return "ERROR";
    case SCW_STATUS_REPLY: return "STATUS_REPLY";
    case SCW_SYNCED: return "SYNCED";
    case SCW_STATS_REPLY: return "STATS_REPLY";
    case SCW_CARRY: return "CARRY";
    case SCW_ATTACHED: return "ATTACHED";
    case SCW_NOTICE: return "NOTICE";
    case SCW_NOTICE_END: return "NOTICE_END";
    case SCW_JOINED: return "JOINED";
    case SCW_HISTORY: return "HISTORY";
    default: return "an unknown kind";
    }
}

static const char *type_name(const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: return "nil";
    case MSGPACK_OBJECT_BOOLEAN: return "bool";
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return "uint";
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return "negative int";
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: return "float";
    case MSGPACK_OBJECT_STR: return "str";
    case MSGPACK_OBJECT_ARRAY: return "array";
    case MSGPACK_OBJECT_MAP: return "map";
    case MSGPACK_OBJECT_BIN: return "bin";
    case MSGPACK_OBJECT_EXT: return "ext";
    default: return "?";
    }
}

/* ---------------------------------------------------------- field decoding */

/* msgview (a received message: the whole array, kind first) is in internal.h. */

/* Check that `m` has fields up to position `need` (later versions may append more, which we ignore). */
static int need_fields(sc_client *c, const msgview *m, uint32_t need)
{
    if (m->nf < need)
        return fail(c, SC_EPROTO, "%s needs at least %u fields, got %u (%s)", kind_name(m->kind), need, m->nf,
                    c->where);
    return SC_OK;
}

/* Record a protocol error naming field `pos` (its NAME as AT gives it, printed in lower case) of a `kind`
 * message; return SC_EPROTO (a macro, so that the compiler sees the code). */
static void bad_field_msg(sc_client *c, uint64_t kind, unsigned pos, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
#define bad_field(...) (bad_field_msg(__VA_ARGS__), SC_EPROTO)

static void bad_field_msg(sc_client *c, uint64_t kind, unsigned pos, const char *name, const char *fmt, ...)
{
    char low[64], what[256];
    size_t i = 0;
    for (; name[i] != '\0' && i < sizeof low - 1; i++)
        low[i] = (name[i] >= 'A' && name[i] <= 'Z') ? (char)(name[i] - 'A' + 'a') : name[i];
    low[i] = '\0';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    fail(c, SC_EPROTO, "%s field %u (%s) %s (%s)", kind_name(kind), pos, low, what, c->where);
}

/* A uint: `o` is field `pos` of a `kind` message, or an element of it (NOTICE's batched n). */
static int obj_uint(sc_client *c, const msgpack_object *o, uint64_t kind, unsigned pos, const char *name,
                    uint64_t *out)
{
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return bad_field(c, kind, pos, name, "must be a uint, got %s", type_name(o));
    *out = o->via.u64;
    return SC_OK;
}

/* A `number` or `float`: ints are accepted too (a peer may send t0 = 5 for 5.0). */
static int obj_num(sc_client *c, const msgpack_object *o, uint64_t kind, unsigned pos, const char *name, double *out)
{
    switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: *out = o->via.f64; return SC_OK;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: *out = (double)o->via.u64; return SC_OK;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: *out = (double)o->via.i64; return SC_OK;
    default: return bad_field(c, kind, pos, name, "must be a number, got %s", type_name(o));
    }
}

/* Field `pos` of `m` (AT(MESSAGE, FIELD) gives pos and name; need_fields checked that it is there). */
static int field_uint(sc_client *c, const msgview *m, unsigned pos, const char *name, uint64_t *out)
{
    return obj_uint(c, &m->a[pos], m->kind, pos, name, out);
}

static int field_num(sc_client *c, const msgview *m, unsigned pos, const char *name, double *out)
{
    return obj_num(c, &m->a[pos], m->kind, pos, name, out);
}

/* Copy a str field into `buf` (NUL-terminated); too long is a protocol error, unless `cut`: then the
 * text is cut to fit (a message meant for people). */
static int field_str_or_cut(sc_client *c, const msgview *m, unsigned pos, const char *name, char *buf, size_t cap,
                            bool cut)
{
    const msgpack_object *o = &m->a[pos];
    if (o->type != MSGPACK_OBJECT_STR)
        return bad_field(c, m->kind, pos, name, "must be a str, got %s", type_name(o));
    size_t n = o->via.str.size;
    if (n >= cap && !cut)
        return bad_field(c, m->kind, pos, name, "is %zu bytes long, at most %zu expected", n, cap - 1);
    if (n >= cap)
        n = cap - 1;
    memcpy(buf, o->via.str.ptr, n);
    buf[n] = '\0';
    return SC_OK;
}

static int field_str(sc_client *c, const msgview *m, unsigned pos, const char *name, char *buf, size_t cap)
{
    return field_str_or_cut(c, m, pos, name, buf, cap, false);
}

/* A message text: cut, not refused, when long. */
static int field_text(sc_client *c, const msgview *m, unsigned pos, const char *name, char *buf, size_t cap)
{
    return field_str_or_cut(c, m, pos, name, buf, cap, true);
}

/* Field `pos` of `m` is there and of msgpack type `type`. */
static bool field_is(const msgview *m, unsigned pos, msgpack_object_type type)
{
    return m->nf >= pos && m->a[pos].type == type;
}

/* ------------------------------------------------------------ the socket */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Read pending monitor events; a disconnection means the broker is gone. */
/* Receive and drop the rest of a multipart message (`more`: the part just read said more follow). */
static void skip_parts(void *sock, int more)
{
    while (more) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&part);
            return;
        }
        more = zmq_msg_more(&part);
        zmq_msg_close(&part);
    }
}

static void read_monitor(sc_client *c)
{
    for (;;) {
        zmq_msg_t ev;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, c->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return;
        }
        if (zmq_msg_size(&ev) >= 2) {
            uint16_t event;
            memcpy(&event, zmq_msg_data(&ev), sizeof event);
            if (event == ZMQ_EVENT_DISCONNECTED)
                c->gone = true;
            else if (event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED)
                c->handshaken = true;
            else if (event == ZMQ_EVENT_CONNECTED)
                c->tcp_connected = true;
            else if (event & (ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL))
                c->denied = c->gone = true;  /* (tcp://: our key refused, or the broker's key is not the one we hold) */
        }
        int more = zmq_msg_more(&ev);
        zmq_msg_close(&ev);
        skip_parts(c->mon, more); /* the second frame holds the endpoint */
    }
}

/* Send the message packed in c->sbuf. */
static int send_packed(sc_client *c, const char *what)
{
    if (zmq_send(c->sock, c->sbuf.data, c->sbuf.size, ZMQ_DONTWAIT) < 0)
        return fail(c, SC_EBROKERGONE, "cannot send %s to the broker at %s: %s", what, c->address,
                    zmq_strerror(zmq_errno()));
    c->sent_at = now_ms();
    return SC_OK;
}

static void pack_str(sc_client *c, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(&c->pk, n);
    msgpack_pack_str_body(&c->pk, s, n);
}

/* Decode c->msg into `m`: one msgpack array whose first element is a uint kind. */
static int decode(sc_client *c, msgview *m)
{
    const char *data = zmq_msg_data(&c->msg);
    size_t len = zmq_msg_size(&c->msg), off = 0;
    msgpack_unpack_return r = msgpack_unpack_next(&c->unp, data, len, &off);
    if (r == MSGPACK_UNPACK_NOMEM_ERROR)
        return fail(c, SC_ENOMEM, "out of memory decoding a %zu-byte message (%s)", len, c->where);
    if (r != MSGPACK_UNPACK_SUCCESS || off != len)
        return fail(c, SC_EPROTO, "expected one msgpack array, got %zu undecodable bytes from the broker (%s)", len,
                    c->where);
    const msgpack_object *o = &c->unp.data;
    if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size == 0 ||
        o->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return fail(c, SC_EPROTO, "expected a msgpack array starting with a uint kind, got a %s (%s)",
                    o->type == MSGPACK_OBJECT_ARRAY ? "different array" : type_name(o), c->where);
    m->kind = o->via.array.ptr[0].via.u64;
    m->a = o->via.array.ptr;
    m->nf = o->via.array.size - 1;
    return SC_OK;
}

/* Take the message waiting on the DEALER, if any: SC_OK (decoded into `m`), SC_ETIMEOUT (none now),
 * or an error. */
static int recv_direct(sc_client *c, msgview *m)
{
    if (c->msg_live) {
        zmq_msg_close(&c->msg);
        c->msg_live = false;
    }
    zmq_msg_init(&c->msg);
    c->msg_live = true;
    if (zmq_msg_recv(&c->msg, c->sock, ZMQ_DONTWAIT) >= 0) {
        if (c->payload != NULL) {  /* a data part no CHUNK took */
            zmq_msg_close(c->payload);
            free(c->payload);
            c->payload = NULL;
        }
        if (zmq_msg_more(&c->msg) && c->remote && (c->payload = malloc(sizeof *c->payload)) != NULL) {
            /* tcp://: an inline CHUNK's bytes, its second part (take_chunk checks it and keeps it while held). */
            zmq_msg_init(c->payload);
            if (zmq_msg_recv(c->payload, c->sock, 0) < 0 || zmq_msg_more(c->payload)) {
                skip_parts(c->sock, zmq_msg_more(c->payload));
                zmq_msg_close(c->payload);
                free(c->payload);
                c->payload = NULL;
            }
        } else if (zmq_msg_more(&c->msg)) {
            /* Only inline CHUNKs (TCP) have a second frame: drop it; take_chunk refuses the flag. */
            zmq_msg_t extra;
            int more = 1;
            while (more) {
                zmq_msg_init(&extra);
                if (zmq_msg_recv(&extra, c->sock, 0) < 0) {
                    zmq_msg_close(&extra);
                    break;
                }
                more = zmq_msg_more(&extra);
                zmq_msg_close(&extra);
            }
        }
        return decode(c, m);
    }
    int e = zmq_errno();
    if (e == EAGAIN || e == EINTR)
        return SC_ETIMEOUT;
    return fail(c, SC_ESYS, "cannot receive from the broker at %s: %s", c->address, zmq_strerror(e));
}

/* tcp://: the CURVE handshake failed (`when`), or never completed. */
static int no_handshake(sc_client *c, const char *when)
{
    return fail(c, SC_EDENIED, "no CURVE handshake with %s (%s): wrong server key (%s), or this client's key is not "
                "authorized (its public key must be in the broker's --curve-clients directory)", c->address, when,
                c->curve_server_file);
}

/* Wait until `deadline` (ms on the monotonic clock, -1: forever) for the next message.
 * Messages the broker sent before it died are returned first; then SC_EBROKERGONE. */
static int next_msg(sc_client *c, int64_t deadline, msgview *m)
{
    for (;;) {
        int rc = recv_direct(c, m);
        if (rc != SC_ETIMEOUT)
            return rc;
        if (c->gone && c->remote && (c->denied || !c->handshaken))
            return no_handshake(c, "the broker closed the connection during it");
        if (c->gone)
            return fail(c, SC_EBROKERGONE, "the broker at %s is gone (its connection dropped)", c->address);
        long wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0)
                return SC_ETIMEOUT;
            wait = (long)left;
        }
        zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {c->mon, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, wait) < 0 && zmq_errno() != EINTR)
            return fail(c, SC_ESYS, "cannot poll the connection to %s: %s", c->address, zmq_strerror(zmq_errno()));
        if (items[1].revents & ZMQ_POLLIN)
            read_monitor(c);
    }
}

static int64_t deadline_for(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

/* Turn an ERROR message into a return code with its message. */
static int broker_error(sc_client *c, const msgview *m)
{
    char code[64] = "?", text[768] = "";
    if (field_is(m, SCW_ERROR_CODE, MSGPACK_OBJECT_STR))
        field_text(c, m, AT(ERROR, CODE), code, sizeof code);
    if (field_is(m, SCW_ERROR_MESSAGE, MSGPACK_OBJECT_STR))
        field_text(c, m, AT(ERROR, MESSAGE), text, sizeof text);
    int rc = SC_EREQUEST;
    if (strcmp(code, SCW_ERR_MALFORMED) == 0)
        rc = SC_EPROTO;
    else if (strcmp(code, SCW_ERR_VERSION) == 0)
        rc = SC_EVERSION;
    else if (strcmp(code, SCW_ERR_UNKNOWN_STREAM) == 0)
        rc = SC_ENOSTREAM;
    if (rc == SC_EVERSION)  /* the broker's message names both versions */
        return fail(c, rc, "%s (%s)", text, c->where);
    return fail(c, rc, "the broker refused (%s): %s (%s)", code, text, c->where);
}

/* ---------------------------------------------------------------- versions */

/* The ABI rules of slabcast.h: the SONAME number is the major version, and no public struct has tail
 * padding (a field appended later must start past the struct's previous end, so struct_size shows it). */
_Static_assert(SC_ABI_VERSION == SC_VERSION_MAJOR, "SC_ABI_VERSION (the SONAME's N) must equal SC_VERSION_MAJOR");
_Static_assert(offsetof(sc_sub_options, struct_size) == 0 && offsetof(sc_chunk, struct_size) == 0 &&
               offsetof(sc_stats, struct_size) == 0 && offsetof(sc_stream_info, struct_size) == 0,
               "struct_size comes first in every public struct");
_Static_assert(offsetof(sc_sub_options, reserved3) + sizeof(unsigned) == sizeof(sc_sub_options) &&
               offsetof(sc_sub_options, partial_tail) == offsetof(sc_sub_options, reserved2) + sizeof(unsigned) &&
               offsetof(sc_sub_options, wake) == offsetof(sc_sub_options, reserved) + sizeof(unsigned) &&
               offsetof(sc_sub_options, sampler) == offsetof(sc_sub_options, wake) + sizeof(const char *) &&
               offsetof(sc_chunk, times) + sizeof(const double *) == sizeof(sc_chunk) &&
               offsetof(sc_chunk, times) == offsetof(sc_chunk, reserved) + sizeof(unsigned) &&
               offsetof(sc_stats, dropped) + sizeof(uint64_t) == sizeof(sc_stats) &&
               offsetof(sc_stream_info, reserved) + sizeof(unsigned) == sizeof(sc_stream_info) &&
               offsetof(sc_stream_info, channel_names) == offsetof(sc_stream_info, segment_bytes) + sizeof(size_t),
               "a public struct has tail padding: fill it with a reserved field");

const char *sc_library_version(int *major, int *minor, int *patch)
{
    if (major)
        *major = SC_VERSION_MAJOR;
    if (minor)
        *minor = SC_VERSION_MINOR;
    if (patch)
        *patch = SC_VERSION_PATCH;
    return SC_VERSION_STRING;
}

int sc_abi_version(void)
{
    return SC_ABI_VERSION;
}

/* -------------------------------------------------------------- lifecycle */

sc_client *sc_new(void)
{
    sc_client *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->version = SC_PROTOCOL_VERSION;
    c->timeout_ms = DEFAULT_TIMEOUT_MS;
    c->stats.last_seq = -1;
    c->lock_fd = -1;
    c->epfd = -1;
    snprintf(c->label, sizeof c->label, "c-subscriber");
    snprintf(c->where, sizeof c->where, "not connected");
    msgpack_unpacked_init(&c->unp);
    msgpack_unpacked_init(&c->nunp);
    msgpack_sbuffer_init(&c->sbuf);
    msgpack_packer_init(&c->pk, &c->sbuf, msgpack_sbuffer_write);
    return c;
}

int sc_set_label(sc_client *c, const char *label)
{
    NEED_CLIENT(c);
    if (c->sock != NULL)
        return fail(c, SC_EINVAL, "sc_set_label must come before sc_connect");
    if (label == NULL || strlen(label) >= sizeof c->label)
        return fail(c, SC_EINVAL, "label must be a string of at most %zu bytes", sizeof c->label - 1);
    snprintf(c->label, sizeof c->label, "%s", label);
    return SC_OK;
}

int sc_set_timeout(sc_client *c, int timeout_ms)
{
    NEED_CLIENT(c);
    if (timeout_ms < 0)
        return fail(c, SC_EINVAL, "timeout_ms must be >= 0, got %d", timeout_ms);
    c->timeout_ms = timeout_ms;
    return SC_OK;
}

int sc_set_protocol_version(sc_client *c, unsigned version)
{
    NEED_CLIENT(c);
    if (c->sock != NULL)
        return fail(c, SC_EINVAL, "sc_set_protocol_version must come before sc_connect");
    c->version = version;
    return SC_OK;
}

/* Accept "ipc://path" or a bare socket path; refuse other transports with the reason (tcp:// is remote_address's). */
static int normalize_address(sc_client *c, const char *address, char *path, size_t cap)
{
    if (address == NULL || address[0] == '\0')
        return fail(c, SC_EINVAL, "address must be an ipc:// endpoint or a socket path, got an empty string");
    const char *p = address;
    if (strncmp(address, "ipc://", 6) == 0)
        p = address + 6;
    else if (strstr(address, "://") != NULL)
        return fail(c, SC_EINVAL, "address must be an ipc:// endpoint or a socket path, got %s", address);
    int n;
    if (p[0] == '/') {
        n = snprintf(path, cap, "%s", p);
    } else {
        char cwd[4096];
        if (getcwd(cwd, sizeof cwd) == NULL)
            return fail(c, SC_ESYS, "cannot resolve the relative socket path %s: %s", p, strerror(errno));
        n = snprintf(path, cap, "%s/%s", cwd, p);
    }
    if (n < 0 || (size_t)n >= cap || n > IPC_PATH_MAX)
        return fail(c, SC_EINVAL, "ipc socket path must be at most %d bytes, got %s", IPC_PATH_MAX, p);
    return SC_OK;
}

/* One key of a ZeroMQ certificate file (`slabcast keygen`'s, zmq_cert's: `    public-key = "<40 Z85 chars>"`). */
static int read_key(sc_client *c, const char *file, const char *name, char out[41])
{
    FILE *f = fopen(file, "r");
    if (f == NULL)
        return fail(c, SC_EINVAL, "cannot read the CURVE key file %s: %s", file, strerror(errno));
    char line[512];
    size_t nlen = strlen(name);
    out[0] = '\0';
    while (fgets(line, sizeof line, f) != NULL) {
        const char *p = line + strspn(line, " \t");
        if (strncmp(p, name, nlen) != 0)
            continue;
        p += nlen + strspn(p + nlen, " \t=");
        const char *end = *p == '"' ? strchr(p + 1, '"') : NULL;
        if (end != NULL && end - p - 1 == 40) {
            memcpy(out, p + 1, 40);
            out[40] = '\0';
        }
        break;
    }
    fclose(f);
    if (out[0] == '\0')
        return fail(c, SC_EINVAL, "%s holds no %s (a ZeroMQ certificate as `slabcast keygen` writes it: %s = \"<40 "
                    "Z85 characters>\")%s", file, name, name,
                    strcmp(name, "secret-key") == 0 ? "; pass the *.key_secret file" : "");
    return SC_OK;
}

int sc_set_curve(sc_client *c, const char *secret_key_file, const char *server_public_key_file)
{
    NEED_CLIENT(c);
    if (c->sock != NULL)
        return fail(c, SC_EINVAL, "sc_set_curve must come before sc_connect");
    if (secret_key_file == NULL || server_public_key_file == NULL)
        return fail(c, SC_EINVAL, "sc_set_curve needs this client's secret key file and the broker's public key file");
    if (!zmq_has("curve"))
        return fail(c, SC_ESYS, "this libzmq was built without CURVE (zmq_has(\"curve\") is 0): it cannot reach a "
                    "tcp:// broker");
    int rc;
    if ((rc = read_key(c, secret_key_file, "public-key", c->curve_public)) ||
        (rc = read_key(c, secret_key_file, "secret-key", c->curve_secret)) ||
        (rc = read_key(c, server_public_key_file, "public-key", c->curve_server))) {
        c->curve_public[0] = c->curve_secret[0] = c->curve_server[0] = '\0';
        return rc;
    }
    snprintf(c->curve_server_file, sizeof c->curve_server_file, "%s", server_public_key_file);
    return SC_OK;
}

/* A tcp:// address: only a subscriber, with CURVE keys, speaking version 3 (docs/protocol.md 2 and 11). */
static int remote_address(sc_client *c, const char *address, const char *role)
{
    if (strcmp(role, "sub") != 0)
        return fail(c, SC_EINVAL, "a %s connects to an ipc:// broker only (it writes the stream's shared memory); "
                    "tcp:// serves subscribers, got %s", role, address);
    if (strlen(address) >= sizeof c->address || strchr(address + 6, ':') == NULL)
        return fail(c, SC_EINVAL, "a tcp:// address is tcp://HOST:PORT of at most %zu characters, got %s",
                    sizeof c->address - 1, address);
    if (c->curve_secret[0] == '\0')
        return fail(c, SC_EINVAL, "a tcp:// broker requires CURVE keys: this client's secret key file and the broker's "
                    "public key file, made by `slabcast keygen` (sc_set_curve before sc_connect; slabcast-sub "
                    "--curve SECRET PUBLIC; address %s)", address);
    if (c->version != SC_PROTOCOL_VERSION)
        return fail(c, SC_EINVAL, "a tcp:// subscriber speaks protocol version %d, got sc_set_protocol_version(%u)",
                    SC_PROTOCOL_VERSION, c->version);
    snprintf(c->address, sizeof c->address, "%s", address);
    snprintf(c->where, sizeof c->where, "broker at %s", c->address);
    c->remote = true;
    return SC_OK;
}

int sc_connect(sc_client *c, const char *address)
{
    NEED_CLIENT(c);
    return sci_connect(c, address, "sub");
}

/* wire/address.py default_address: $SLABCAST_ADDRESS, else the per-user runtime directory's socket (the
 * publisher's and, since sc_connect(c, NULL), the subscriber's default).  SC_EINVAL with the reason in `err`. */
int sci_default_address(char *out, size_t cap, char *err, size_t errcap)
{
    const char *env = getenv("SLABCAST_ADDRESS");
    if (env && *env) {
        snprintf(out, cap, "%s", env);
        return SC_OK;
    }
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    char dir[PATH_MAX];
    if (runtime && *runtime) {
        snprintf(dir, sizeof dir, "%s", runtime);
    } else {
        const char *tmp = getenv("TMPDIR");
        snprintf(dir, sizeof dir, "%s/slabcast-%u", tmp && *tmp ? tmp : "/tmp", (unsigned)getuid());
        mkdir(dir, 0700);  /* made now, by us, if nobody made it first; then whoever made it must be us */
        for (int k = 0; k < 2; k++) {
            char path[PATH_MAX + 16];
            snprintf(path, sizeof path, k ? "%s/slabcast" : "%s", dir);
            struct stat st;
            if (lstat(path, &st) != 0)
                continue;
            if (!S_ISDIR(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 022)) {
                snprintf(err, errcap, "refusing %s: it must be a directory of this user (uid %u) that only it may "
                         "write, got owner uid %u, mode %04o (another user could hold the address)", path,
                         (unsigned)getuid(), (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777));
                return SC_EINVAL;
            }
        }
    }
    int n = snprintf(out, cap, "ipc://%s/slabcast/broker.sock", dir);
    if (n < 0 || (size_t)n >= cap || n - 6 > 107) {
        snprintf(err, errcap, "the default broker address %s/slabcast/broker.sock is longer than an ipc socket path "
                 "may be (107 bytes): set SLABCAST_ADDRESS to a shorter one", dir);
        return SC_EINVAL;
    }
    return SC_OK;
}

/* Whether a process listens on the socket file at path: false only when a connection is refused (a file left by a
 * broker that was killed), where ZeroMQ would retry in silence until the HELLO's timeout.  Anything else (a
 * listener, no permission, a path too long for sockaddr_un) is left to ZeroMQ.  (client/connection.py's twin.) */
static bool listened_on(const char *path)
{
    struct sockaddr_un sa;
    if (strlen(path) >= sizeof sa.sun_path)
        return true;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return true;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    strcpy(sa.sun_path, path);
    int refused = connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0 && errno == ECONNREFUSED;
    close(fd);
    return !refused;
}

int sci_connect(sc_client *c, const char *address, const char *role)
{
    if (c->sock != NULL)
        return fail(c, SC_EINVAL, "this client is already connected to %s", c->address);
    int rc;
    char fallback[IPC_PATH_MAX + 16];
    if (address == NULL) {  /* (an empty string stays an error: a variable that was meant to be set) */
        if ((rc = sci_default_address(fallback, sizeof fallback, c->err, sizeof c->err)))
            return rc;
        address = fallback;
    }
    if (address != NULL && strncmp(address, "tcp://", 6) == 0) {
        if ((rc = remote_address(c, address, role)))
            return rc;
    } else {
        char path[IPC_PATH_MAX + 2];
        if ((rc = normalize_address(c, address, path, sizeof path)))
            return rc;
        snprintf(c->address, sizeof c->address, "ipc://%s", path);
        snprintf(c->where, sizeof c->where, "broker at %s", c->address);
        struct stat st;
        if (stat(path, &st) != 0)
            return fail(c, SC_EBROKERGONE, "no broker at %s (%s: %s); start one with `slabcast broker`", c->address,
                        path, strerror(errno));
        if (!listened_on(path))
            return fail(c, SC_EBROKERGONE, "no broker at %s: nothing listens on its socket file, left by a broker "
                        "that is gone (killed?); start one with `slabcast broker`, which takes the file over",
                        c->address);
    }

    c->ctx = zmq_ctx_new();
    if (c->ctx == NULL)
        return fail(c, SC_ESYS, "zmq_ctx_new failed: %s", zmq_strerror(zmq_errno()));
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (c->sock == NULL)
        return fail(c, SC_ESYS, "cannot create a DEALER socket: %s", zmq_strerror(zmq_errno()));
    int zero = 0, linger = CLOSE_LINGER_MS;
    zmq_setsockopt(c->sock, ZMQ_SNDHWM, &zero, sizeof zero);  /* flow control is the protocol's (max_inflight) */
    zmq_setsockopt(c->sock, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);

    /* The monitor must be listening before connect, or an early disconnection is missed. */
    char monitor_ep[96];
    snprintf(monitor_ep, sizeof monitor_ep, "inproc://slabcast-monitor-%p", (void *)c);
    int events = ZMQ_EVENT_DISCONNECTED;
    if (c->remote) {
        events |= ZMQ_EVENT_CONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                  ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL;
        int server = 0, ivl = HEARTBEAT_IVL_MS, hb_timeout = HEARTBEAT_TIMEOUT_MS;
        if (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVER, &server, sizeof server) != 0 ||
            zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, c->curve_public, 41) != 0 ||
            zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, c->curve_secret, 41) != 0 ||
            zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, c->curve_server, 41) != 0)
            return fail(c, SC_ESYS, "cannot set the CURVE keys of the connection to %s: %s", c->address,
                        zmq_strerror(zmq_errno()));
        zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_IVL, &ivl, sizeof ivl);
        zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_TIMEOUT, &hb_timeout, sizeof hb_timeout);
    }
    if (zmq_socket_monitor(c->sock, monitor_ep, events) != 0)
        return fail(c, SC_ESYS, "cannot monitor the socket: %s", zmq_strerror(zmq_errno()));
    c->mon = zmq_socket(c->ctx, ZMQ_PAIR);
    if (c->mon == NULL || zmq_connect(c->mon, monitor_ep) != 0)
        return fail(c, SC_ESYS, "cannot connect the monitor socket: %s", zmq_strerror(zmq_errno()));
    zmq_setsockopt(c->mon, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_connect(c->sock, c->address) != 0)
        return fail(c, SC_ESYS, "cannot connect to %s: %s", c->address, zmq_strerror(zmq_errno()));

    _Static_assert(SCW_HELLO_VERSION == 1 && SCW_HELLO_PID == 2 && SCW_HELLO_ROLE == 3 && SCW_HELLO_LABEL == 4 &&
                   SCW_HELLO_FIELDS == 4, "HELLO is packed in this order");
    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk, 1 + SCW_HELLO_FIELDS);
    msgpack_pack_uint64(&c->pk, SCW_HELLO);
    msgpack_pack_uint64(&c->pk, c->version);
    msgpack_pack_int64(&c->pk, (int64_t)getpid());
    pack_str(c, role);
    pack_str(c, c->label);
    if ((rc = send_packed(c, "HELLO")))
        return rc;

    msgview m;
    rc = next_msg(c, deadline_for(c->timeout_ms), &m);
    if (rc == SC_ETIMEOUT && c->remote)
        read_monitor(c);
    if (rc == SC_ETIMEOUT && c->remote && !c->handshaken && !c->tcp_connected)
        return fail(c, SC_EBROKERGONE, "no broker reachable at %s within %d ms (nothing accepted the TCP "
                    "connection: the host, the port, a firewall?)", c->address, c->timeout_ms);
    if (rc == SC_ETIMEOUT && c->remote && !c->handshaken)  /* (a broker refusing our keys hangs up: next_msg) */
        return fail(c, SC_EBROKERGONE, "a TCP connection to %s was accepted, but no broker answered within %d ms",
                    c->address, c->timeout_ms);
    if (rc == SC_ETIMEOUT)
        return fail(c, SC_EBROKERGONE, "no answer to HELLO from the broker at %s within %d ms", c->address,
                    c->timeout_ms);
    if (rc)
        return rc;
    if (m.kind == SCW_ERROR)
        return broker_error(c, &m);
    if (m.kind != SCW_WELCOME)
        return fail(c, SC_EPROTO, "expected WELCOME, got %s (kind %llu) (%s)", kind_name(m.kind),
                    (unsigned long long)m.kind, c->where);
    uint64_t version;
    if ((rc = need_fields(c, &m, SCW_WELCOME_VERSION)) || (rc = field_uint(c, &m, AT(WELCOME, VERSION), &version)))
        return rc;
    if (version != c->version)
        return fail(c, SC_EVERSION,
                    "protocol version mismatch: broker speaks version %llu, client speaks version %u (%s)",
                    (unsigned long long)version, c->version, c->where);
    if ((rc = need_fields(c, &m, SCW_WELCOME_REQUIRED)) ||
        (rc = field_uint(c, &m, AT(WELCOME, BROKER_PID), &c->broker_pid)) ||
        (rc = field_uint(c, &m, AT(WELCOME, EPOCH), &c->epoch)))
        return rc;
    c->local = c->version >= 2 && !c->remote;  /* version 1 and tcp://: the broker cuts our chunks */
    c->ring = c->local && c->version >= 3;     /* version 2: we cut them from the notices */
    c->connected = true;
    return SC_OK;
}

/* ------------------------------------------------------------- subscribing */

static void sub_options_defaults(sc_sub_options *o)
{
    memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->policy = "block";
    o->max_inflight = 8;
    o->wait_ms = -1;  /* the client's timeout */
}

void sc_sub_options_init_sized(sc_sub_options *opts, size_t struct_size)
{
    if (opts == NULL || struct_size < sizeof opts->struct_size)
        return;  /* nothing to fill; sc_subscribe names the bad struct_size */
    sc_sub_options d;
    sub_options_defaults(&d);
    if (struct_size > sizeof d) {
        memset((char *)opts + sizeof d, 0, struct_size - sizeof d);  /* a newer caller's fields: zero */
        memcpy(opts, &d, sizeof d);
    } else {
        memcpy(opts, &d, struct_size);
    }
    opts->struct_size = struct_size;
}

/* The caller's options as this library's struct: the first struct_size bytes of theirs over the defaults
 * (an older caller's struct is a prefix); a newer caller's struct is accepted when the fields this library
 * does not know are zero. */
static int read_sub_options(sc_client *c, const sc_sub_options *opts, sc_sub_options *out)
{
    sub_options_defaults(out);
    if (opts == NULL)
        return SC_OK;
    size_t n = opts->struct_size;
    if (n < offsetof(sc_sub_options, size) + sizeof opts->size || n > 4096)
        return fail(c, SC_EINVAL,
                    "sc_sub_options.struct_size must be the size of the caller's sc_sub_options (%zu in this "
                    "library's header; set it with sc_sub_options_init), got %zu", sizeof *out, n);
    if (n > sizeof *out) {
        const unsigned char *extra = (const unsigned char *)opts + sizeof *out;
        for (size_t i = 0; i < n - sizeof *out; i++)
            if (extra[i] != 0)
                return fail(c, SC_EINVAL,
                            "sc_sub_options of %zu bytes sets an option this library (version %s, %zu-byte "
                            "sc_sub_options) does not know: byte %zu is not zero; use a newer libslabcast",
                            n, SC_VERSION_STRING, sizeof *out, sizeof *out + i);
        n = sizeof *out;
    }
    memcpy(out, opts, n);
    out->struct_size = sizeof *out;
    return SC_OK;
}

static bool valid_stream_name(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        bool ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_' ||
                  ch == '.' || ch == ':' || ch == '-';
        if (!ok)
            return false;
    }
    return true;
}

/* Item size of a numpy dtype string: byte order, kind (b i u f c, or S: fixed-width bytes, a marker stream's
 * NUL-padded UTF-8 strings), size in bytes; 0 if invalid. */
static unsigned dtype_itemsize(const char *dtype)
{
    const char *p = dtype;
    if (*p == '<' || *p == '>' || *p == '|' || *p == '=')
        p++;
    if (*p == '\0' || strchr("biufcS", *p) == NULL)
        return 0;
    p++;
    if (*p < '1' || *p > '9')
        return 0;
    unsigned size = 0;
    for (; *p; p++) {
        if (*p < '0' || *p > '9' || size > 1000)
            return 0;
        size = size * 10 + (unsigned)(*p - '0');
    }
    return size;
}

static uint32_t read_u32le(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t read_u64le(const unsigned char *p)
{
    return (uint64_t)read_u32le(p) | (uint64_t)read_u32le(p + 4) << 32;
}

static int take_end(sc_client *c, const msgview *m);
static int on_direct(sc_client *c, const msgview *m);
static int end_from(sc_client *c, const char *code, const char *text);

/* SUBSCRIBED named a segment that is gone: the stream ended between SUBSCRIBED and the map (its pool went with
 * it); the broker's END follows on the connection, and ends the subscription (docs/protocol.md 10.2). */
static int ended_before_map(sc_client *c, const char *shm_name)
{
    msgview m;
    int rc = next_msg(c, deadline_for(c->timeout_ms), &m);
    if (rc == SC_OK && m.kind == SCW_END)
        return take_end(c, &m);
    if (rc == SC_OK && m.kind == SCW_ERROR)
        return broker_error(c, &m);
    return fail(c, SC_ESYS, "cannot open shared-memory segment %s: it is gone and no END followed (does this "
                "process see the broker's /dev/shm?) (%s)", shm_name, c->where);
}

/* Map the segment read-only and check its header against SUBSCRIBED.  Never unlinks.
 * Version 2 keeps the descriptor (a read-only open file description of its own) for the
 * lease locks and checks the layout with the generation table. */
static int map_segment(sc_client *c, size_t nbytes)
{
    if (c->map != NULL) {  /* left by a failed earlier attempt */
        munmap((void *)c->map, c->map_bytes);
        c->map = NULL;
    }
    if (c->lock_fd >= 0) {
        close(c->lock_fd);
        c->lock_fd = -1;
    }
    char shm_name[sizeof c->segment + 1];
    snprintf(shm_name, sizeof shm_name, "/%s", c->segment);
    int fd = shm_open(shm_name, O_RDONLY, 0);
    if (fd < 0 && errno == ENOENT)
        return ended_before_map(c, shm_name);
    if (fd < 0)
        return fail(c, SC_ESYS,
                    "cannot open shared-memory segment %s read-only: %s (segments are mode 0600 unless the broker "
                    "runs with --shm-mode 660) (%s)", shm_name, strerror(errno), c->where);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return fail(c, SC_ESYS, "cannot stat segment %s: %s (%s)", shm_name, strerror(e), c->where);
    }
    if ((uint64_t)st.st_size < nbytes || nbytes < HDR_MIN_BYTES) {
        close(fd);
        return fail(c, SC_EPROTO, "segment %s has %lld bytes, SUBSCRIBED announced %zu (%s)", shm_name,
                    (long long)st.st_size, nbytes, c->where);
    }
    void *p = mmap(NULL, nbytes, PROT_READ, MAP_SHARED, fd, 0);
    int e = errno;
    if (c->local)
        c->lock_fd = fd;  /* shm_open sets FD_CLOEXEC: a program we exec never inherits our leases */
    else
        close(fd);  /* the mapping stays valid without the descriptor */
    if (p == MAP_FAILED)
        return fail(c, SC_ESYS, "cannot map segment %s (%zu bytes) read-only: %s (%s)", shm_name, nbytes,
                    strerror(e), c->where);
    c->map = p;
    c->map_bytes = nbytes;
    const unsigned char *h = c->map;
    uint32_t layout = read_u32le(h + HDR_LAYOUT), header = read_u32le(h + HDR_HEADER_BYTES);
    uint32_t sample_bytes = read_u32le(h + HDR_SAMPLE_BYTES);
    if (memcmp(h + HDR_MAGIC, "SLABCAST", 8) != 0 || layout < 1 || layout > SEG_LAYOUT)
        return fail(c, SC_EPROTO, "segment %s does not start with magic SLABCAST and layout 1 to 3 (%s)", shm_name,
                    c->where);
    if (sample_bytes != c->info.sample_bytes || header < HDR_MIN_BYTES || header > nbytes)
        return fail(c, SC_EPROTO,
                    "segment %s header says sample_bytes=%u header_bytes=%u; SUBSCRIBED said dtype %s x %u "
                    "(%zu bytes per sample) (%s)", shm_name, sample_bytes, header, c->dtype, c->info.channels,
                    c->info.sample_bytes, c->where);
    if (c->local) {
        uint64_t slab_bytes = read_u64le(h + HDR_SLAB_BYTES);
        uint32_t nslabs = read_u32le(h + HDR_NSLABS);
        if (layout < 2)
            return fail(c, SC_EPROTO, "segment %s has layout %u; version 2 needs layout 2 or later (the generation "
                        "table) (%s)", shm_name, layout, c->where);
        if (header != c->header_bytes || slab_bytes != c->slab_bytes || nslabs != c->nslabs ||
            (uint64_t)GEN_OFFSET + 4ull * nslabs > header || (uint64_t)header + (uint64_t)nslabs * slab_bytes > nbytes)
            return fail(c, SC_EPROTO,
                        "segment %s header says header_bytes=%u slab_bytes=%llu nslabs=%u; SUBSCRIBED said "
                        "header_bytes=%zu slab_bytes=%llu nslabs=%u for %zu bytes (%s)", shm_name, header,
                        (unsigned long long)slab_bytes, nslabs, c->header_bytes, (unsigned long long)c->slab_bytes,
                        c->nslabs, nbytes, c->where);
    }
    if (c->ring) {
        uint32_t slots = read_u32le(h + HDR_RING_SLOTS), desc_bytes = read_u32le(h + HDR_DESC_BYTES);
        uint64_t at = read_u64le(h + HDR_RING_OFFSET);
        if (layout < 3)
            return fail(c, SC_EPROTO, "segment %s has layout %u; version 3 needs layout 3 (the descriptor ring) (%s)",
                        shm_name, layout, c->where);
        if (slots < 2 || (slots & (slots - 1)) != 0 || desc_bytes != DESC_BYTES || at % 8 != 0 ||
            at < (uint64_t)header + (uint64_t)c->nslabs * c->slab_bytes || at > nbytes ||
            (uint64_t)slots * DESC_BYTES > nbytes - at)
            return fail(c, SC_EPROTO,
                        "segment %s header says its ring has %u descriptors of %u bytes at byte %llu: not a ring "
                        "(a power of two of %d-byte descriptors after the slabs, inside the %zu bytes) (%s)",
                        shm_name, slots, desc_bytes, (unsigned long long)at, DESC_BYTES, nbytes, c->where);
        c->ring_slots = slots;
        c->ring_base = h + at;
        c->sleepers_at = at + (uint64_t)slots * DESC_BYTES;
        c->position = (const uint64_t *)(h + HDR_POSITION);  /* (the mapping is page aligned: so is the word) */
        c->closed = (const uint32_t *)(h + HDR_CLOSED);
        c->sleep_futex = (const uint32_t *)(h + HDR_SLEEP_FUTEX);
        c->frame_max = (const uint32_t *)(h + HDR_FRAME_MAX);
        c->acks_wanted = (const uint32_t *)(h + HDR_ACKS_WANTED);
        c->ack_target = (const uint32_t *)(h + HDR_ACK_TARGET);
        c->ack_at = (const uint64_t *)(h + HDR_ACK_AT);
    }
    c->header_bytes = header;
    return SC_OK;
}

/* Set our sleeper byte (docs/protocol.md 7.8: about to sleep), make a full barrier, load the ring's position
 * again: true if it moved past what we read (then do not sleep).  From here until disarm, a publish we did not
 * see sends us a notice (Dekker's handshake with the publisher's store, barrier, look at the table).  Without a
 * byte every publish sends one anyway: only the position is looked at. */
static bool arm(sc_client *c)
{
    if (c->sleeper != NULL && !c->armed && c->wake == WAKE_DOORBELL) {  /* (a futex one's byte: its futex table's) */
        if (c->arm_value == 0 || c->rseq != c->armed_rseq) {  /* a new value (1..255) once we read or took a notice */
            c->arm_value = (unsigned char)(c->arm_value % 255 + 1);
            c->armed_rseq = c->rseq;
        }
        __atomic_store_n(c->sleeper, c->arm_value, __ATOMIC_RELAXED);
        c->armed = true;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    return __atomic_load_n(c->position, __ATOMIC_RELAXED) != c->rseq;
}

/* We are awake: publishes need not ring for us. */
static void disarm(sc_client *c)
{
    if (c->armed) {
        __atomic_store_n(c->sleeper, 0, __ATOMIC_RELAXED);
        c->armed = false;
    }
}

static void unmap_sleepers(sc_client *c)
{
    disarm(c);
    if (c->sleeper_map != NULL)
        munmap(c->sleeper_map, c->sleeper_map_bytes);
    c->sleeper_map = NULL;
    c->sleeper = NULL;
    c->cursor_entry = NULL;
}

/* Version 3, doorbell: map the page of the sleeper table writable, so that we can say there that we sleep
 * (docs/protocol.md 7.8).  A segment this process may only read (group sharing with a read-only mode) or
 * without the table leaves it unmapped, and ATTACH says so: the publisher then sends a notice for every
 * frame instead.  Never an error. */
static void map_sleepers(sc_client *c)
{
    unmap_sleepers(c);
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), start = c->sleepers_at & ~(page - 1);
    /* (The three tables: the sleeper table, the futex sleeper table and the cursor table: 7.8, 7.9.) */
    uint64_t end = c->sleepers_at + 2 * SLEEPERS + 8 * SLEEPERS;
    size_t bytes = (size_t)((end - start + page - 1) & ~(page - 1));
    char shm_name[sizeof c->segment + 1];
    snprintf(shm_name, sizeof shm_name, "/%s", c->segment);
    int fd = shm_open(shm_name, O_RDWR, 0);
    if (fd < 0)
        return;
    struct stat st;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size >= end) {
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)start);
        if (p != MAP_FAILED) {
            c->sleeper_map = p;
            c->sleeper_map_bytes = bytes;
        }
    }
    close(fd);
}

/* TOKEN_BYTES random bytes (the kernel's; a clock-and-pid mix if it refuses). */
static void make_token(unsigned char *out)
{
    if (getrandom(out, TOKEN_BYTES, GRND_NONBLOCK) == TOKEN_BYTES)
        return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t x = (uint64_t)ts.tv_nsec ^ (uint64_t)ts.tv_sec << 30 ^ (uint64_t)getpid() << 16 ^ (uint64_t)(uintptr_t)out;
    for (int i = 0; i < TOKEN_BYTES; i++) {  /* splitmix64 */
        x += 0x9E3779B97F4A7C15ull;
        uint64_t z = x;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        out[i] = (unsigned char)(z ^ (z >> 31));
    }
}

/* Connect a SUB socket to the publisher's notice socket and wait (bounded by the client's timeout)
 * until JOINED on our token topic proves that every later notice reaches us (Subscriber._join). */
static int join_notices(sc_client *c)
{
    c->notices = zmq_socket(c->ctx, ZMQ_SUB);
    if (c->notices == NULL)
        return fail(c, SC_ESYS, "cannot create a SUB socket: %s (%s)", zmq_strerror(zmq_errno()), c->where);
    int zero = 0, ivl = 10, backlog = SCW_NOTICE_BACKLOG;
    zmq_setsockopt(c->notices, ZMQ_LINGER, &zero, sizeof zero);
    /* A paused subscriber's backlog is bounded, as the Python subscriber's: past it (and the publisher's
     * SCW_NOTICE_HWM) ZeroMQ drops notices for it alone, and it sees the gap when it comes back.  A block
     * subscriber holds the publisher back long before: a whole pool's notices fit in the backlog. */
    zmq_setsockopt(c->notices, ZMQ_RCVHWM, &backlog, sizeof backlog);
    zmq_setsockopt(c->notices, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl);  /* the publisher may bind a moment later */
    if (zmq_connect(c->notices, c->endpoint) != 0)
        return fail(c, SC_ESYS, "cannot connect to the notice socket %s: %s (%s)", c->endpoint,
                    zmq_strerror(zmq_errno()), c->where);
    if (zmq_setsockopt(c->notices, ZMQ_SUBSCRIBE, c->topic, c->topic_len) != 0 ||
        zmq_setsockopt(c->notices, ZMQ_SUBSCRIBE, c->token, sizeof c->token) != 0)
        return fail(c, SC_ESYS, "cannot subscribe on the notice socket %s: %s (%s)", c->endpoint,
                    zmq_strerror(zmq_errno()), c->where);
    int64_t deadline = deadline_for(c->timeout_ms);
    for (;;) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, c->notices, ZMQ_DONTWAIT) >= 0) {
            /* Anything before JOINED is dropped, as the Python subscriber does. */
            bool joined = zmq_msg_size(&msg) >= sizeof c->token &&
                          memcmp(zmq_msg_data(&msg), c->token, sizeof c->token) == 0;
            zmq_msg_close(&msg);
            if (joined)
                break;
            continue;
        }
        zmq_msg_close(&msg);
        int e = zmq_errno();
        if (e != EAGAIN && e != EINTR)
            return fail(c, SC_ESYS, "cannot receive from the notice socket %s: %s (%s)", c->endpoint,
                        zmq_strerror(e), c->where);
        /* The broker connection too (docs/protocol.md 10.2): a stream that ends meanwhile (END closed or
         * publisher-gone, kept in have_end) sends no JOINED; its frames are in the ring, so ATTACH at once. */
        msgview m;
        int rc = recv_direct(c, &m);
        if (rc == SC_OK) {
            if ((rc = on_direct(c, &m)))
                return rc;
            if (c->have_end && c->ring)
                break;
            if (c->have_end)  /* version 2: no JOINED comes from a publisher that left; its notices are lost */
                return end_from(c, c->end_code_s, c->end_text);
            continue;
        }
        if (rc != SC_ETIMEOUT)
            return rc;
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return fail(c, SC_EBROKERGONE,
                        "the publisher of stream '%s' did not answer on its notice socket %s within %d ms (a C "
                        "publisher answers in sc_pub_write and sc_pub_service) (%s)",
                        c->stream, c->endpoint, c->timeout_ms, c->where);
        zmq_pollitem_t items[2] = {{c->notices, 0, ZMQ_POLLIN, 0}, {c->sock, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, (long)left) < 0 && zmq_errno() != EINTR)
            return fail(c, SC_ESYS, "cannot poll the notice socket %s: %s (%s)", c->endpoint,
                        zmq_strerror(zmq_errno()), c->where);
    }
    zmq_setsockopt(c->notices, ZMQ_UNSUBSCRIBE, c->token, sizeof c->token);
    return SC_OK;
}

/* JOINED came: send ATTACH; the broker starts us at its head (0 for a subscription made before the
 * stream existed) and answers ATTACHED with that start index.  Only from now on do we hold back slabs. */
/* Send the packed request `what` and wait up to `timeout_ms` for its answer of kind `want` (SC_ETIMEOUT if none
 * came): ERROR and END (e.g. the stream ended while the broker held the request) become their errors. */
static void keepalive(sc_client *c);

static int request_within(sc_client *c, const char *what, uint64_t want, msgview *m, int timeout_ms)
{
    int rc = send_packed(c, what);
    if (rc)
        return rc;
    int64_t deadline = deadline_for(timeout_ms);
    for (;;) {
        /* tcp://: a long wait (SUBSCRIBE's for a stream not there yet) says SYNC every second, as recv_v1 does: the
         * broker drops a remote client silent for 10 s; their SYNCEDs are skipped. */
        int64_t until = deadline;
        if (c->remote && (until < 0 || c->sent_at + KEEPALIVE_MS < until))
            until = c->sent_at + KEEPALIVE_MS;
        keepalive(c);
        rc = next_msg(c, until, m);
        if (rc == SC_ETIMEOUT && until != deadline && (deadline < 0 || now_ms() < deadline))
            continue;
        if (rc)
            return rc;  /* (SC_ETIMEOUT: no answer within timeout_ms) */
        if (!(c->remote && m->kind == SCW_SYNCED))
            break;
    }
    if (m->kind == SCW_ERROR)
        return broker_error(c, m);
    if (m->kind == SCW_END)
        return take_end(c, m);
    if (m->kind != want)
        return fail(c, SC_EPROTO, "expected %s, got %s (kind %llu) (%s)", kind_name(want), kind_name(m->kind),
                    (unsigned long long)m->kind, c->where);
    return SC_OK;
}

/* After a SUBSCRIBE's wait expired: what the broker has instead, into `out` as "; streams: a, b" (a misspelled
 * name shows at once), from its answer to STATS of that name (ERROR unknown-stream, whose message lists them), or
 * "; the broker has it now" if the stream opened meanwhile; "" when it does not answer within a second.  The held
 * SUBSCRIBE's late SUBSCRIBED, if any, is skipped: the client is closed after this anyway. */
static void streams_there(sc_client *c, const char *stream, char *out, size_t cap)
{
    out[0] = '\0';
    _Static_assert(SCW_STATS_NAME == 1 && SCW_STATS_FIELDS == 1, "STATS is packed in this order");
    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk, 1 + SCW_STATS_FIELDS);
    msgpack_pack_uint64(&c->pk, SCW_STATS);
    pack_str(c, stream);
    if (send_packed(c, "STATS") != SC_OK)
        return;
    int64_t deadline = deadline_for(1000);
    msgview m;
    while (next_msg(c, deadline, &m) == SC_OK) {
        if (m.kind == SCW_STATS_REPLY) {
            snprintf(out, cap, "; the broker has a stream of that name: its publisher did not take this "
                     "subscription (a C publisher takes it in sc_pub_write and sc_pub_service), or the stream "
                     "opened as the wait ended, or ended and is still read by its subscribers");
            return;
        }
        if (m.kind != SCW_ERROR || m.nf < SCW_ERROR_MESSAGE || m.a[SCW_ERROR_MESSAGE].type != MSGPACK_OBJECT_STR)
            continue;  /* (a SYNCED, the held SUBSCRIBE's answer) */
        const msgpack_object_str *text = &m.a[SCW_ERROR_MESSAGE].via.str;
        const char *key = "(streams: ";
        size_t klen = strlen(key);
        for (uint32_t i = 0; i + klen <= text->size; i++)
            if (memcmp(text->ptr + i, key, klen) == 0) {  /* "... (streams: a, b)" -> "; streams: a, b" */
                size_t n = text->size - i - 1;            /* (the closing parenthesis left out) */
                int len = n > klen - 1 ? (int)(n - 1) : 0;
                snprintf(out, cap, "; %.*s", len, text->ptr + i + 1);
                return;
            }
        return;
    }
}

/* ATTACH, then ATTACHED: `start` (the stream index we start at) and, version 3, `seq` (its ring descriptor). */
static int attach(sc_client *c, uint64_t *start, uint64_t *seq)
{
    /* Our liveness mark, which the broker tests in any PID namespace (docs/protocol.md section 3): a shared
     * lock on CLIENT_BASE + slot of the segment, held while lock_fd is open (gone when we die). */
    uint32_t slot = 0;
    if (getrandom(&slot, sizeof slot, GRND_NONBLOCK) != (ssize_t)sizeof slot)
        slot = (uint32_t)getpid() ^ (uint32_t)now_ms();
    slot &= 0x7fffffffu;
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)(CLIENT_BASE + slot);
    fl.l_len = 1;
    if (fcntl(c->lock_fd, F_OFD_SETLK, &fl) != 0)
        return fail(c, SC_ESYS, "cannot take the liveness lock: %s (%s)", strerror(errno), c->where);
    /* `sleeper` true: a doorbell or futex subscriber that mapped the sleeper table writable; otherwise it is left
     * out (nil: the publisher sends a doorbell subscriber a notice for every frame).  `futex_sleeper` true: a
     * futex subscriber that will sleep with its byte in the futex sleeper table, once the publisher said it looks
     * there (sleep_futex); the broker then counts it with the doorbells, not in futex_waiters (a FUTEX_WAKE after
     * every frame). */
    _Static_assert(SCW_ATTACH_SLOT == 1 && SCW_ATTACH_SLEEPER == 2 && SCW_ATTACH_FUTEX_SLEEPER == 3,
                   "ATTACH is packed in this order");
    c->futex_table = c->wake == WAKE_FUTEX && c->sleeper_map != NULL && c->broker_futex_table;
    /* A subscription that waited for its stream is answered as the stream opens, while its publisher maps the segment:
     * wait a moment (100 ms at most) for it to say it looks at the futex sleeper table (sleep_futex). */
    for (int k = 0; c->futex_table && __atomic_load_n(c->sleep_futex, __ATOMIC_ACQUIRE) != 1; k++) {
        if (k == 100) {
            c->futex_table = false;  /* (a publisher that never says it: counted in futex_waiters) */
            break;
        }
        struct timespec ms = {.tv_sec = 0, .tv_nsec = 1000000L};
        nanosleep(&ms, NULL);
    }
    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk, 1 + (c->futex_table ? SCW_ATTACH_FUTEX_SLEEPER
                                    : c->sleeper_map != NULL ? SCW_ATTACH_SLEEPER : SCW_ATTACH_SLOT));
    msgpack_pack_uint64(&c->pk, SCW_ATTACH);
    msgpack_pack_uint32(&c->pk, slot);
    if (c->sleeper_map != NULL)
        msgpack_pack_true(&c->pk);
    if (c->futex_table)
        msgpack_pack_true(&c->pk);
    int rc = send_packed(c, "ATTACH");
    if (rc)
        return rc;
    msgview m;
    int64_t deadline = deadline_for(c->timeout_ms);
    for (;;) {
        if ((rc = next_msg(c, deadline, &m)) == SC_ETIMEOUT)
            return fail(c, SC_EBROKERGONE, "no answer to ATTACH from the broker within %d ms (%s)", c->timeout_ms,
                        c->where);
        if (rc)
            return rc;
        if (m.kind == SCW_SYNCED)
            continue;
        /* A short stream may end before our ATTACH is answered (docs/protocol.md 10.2): END closed or
         * publisher-gone is kept (have_end), its frames are in the ring; other ENDs end us here. */
        if (m.kind == SCW_END && !c->have_end) {
            if ((rc = on_direct(c, &m)))
                return rc;
            if (c->have_end)
                continue;
        }
        break;
    }
    if (m.kind == SCW_ERROR && c->have_end)
        return end_from(c, c->end_code_s, c->end_text);  /* it ended before the broker started us: nothing after */
    if (m.kind == SCW_ERROR)
        return broker_error(c, &m);
    if (m.kind == SCW_END)
        return take_end(c, &m);
    if (m.kind != SCW_ATTACHED)
        return fail(c, SC_EPROTO, "expected ATTACHED, got %s (kind %llu) (%s)", kind_name(m.kind),
                    (unsigned long long)m.kind, c->where);
    if ((rc = need_fields(c, &m, SCW_ATTACHED_START)) || (rc = field_uint(c, &m, AT(ATTACHED, START), start)))
        return rc;
    if (c->ring) {
        if (m.nf < SCW_ATTACHED_SEQ || m.a[SCW_ATTACHED_SEQ].type == MSGPACK_OBJECT_NIL)
            return fail(c, SC_EPROTO, "ATTACHED names no ring descriptor to start from (field %d, seq, is %s): "
                        "version 3 reads the ring from there (%s)", SCW_ATTACHED_SEQ,
                        m.nf >= SCW_ATTACHED_SEQ ? "nil" : "absent", c->where);
        if ((rc = field_uint(c, &m, AT(ATTACHED, SEQ), seq)))
            return rc;
    }
    if (c->sleeper_map != NULL) {
        uint64_t byte;
        if (m.nf < SCW_ATTACHED_SLEEPER || m.a[SCW_ATTACHED_SLEEPER].type == MSGPACK_OBJECT_NIL) {
            unmap_sleepers(c);  /* none for us (the table is full): a notice for every frame */
            return SC_OK;
        }
        if ((rc = field_uint(c, &m, AT(ATTACHED, SLEEPER), &byte)))
            return rc;
        if (byte >= SLEEPERS)
            return bad_field(c, m.kind, AT(ATTACHED, SLEEPER), "must be below %d (the bytes of the sleeper table), "
                             "got %llu", SLEEPERS, (unsigned long long)byte);
        uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
        unsigned char *tables = c->sleeper_map + (c->sleepers_at & (page - 1));
        c->sleeper = tables + byte;
        /* cursor_tag: post our cursor in the cursor table instead of an ACK per slab (7.9); nil: a broker that
         * does not read the table, ACK per slab. */
        uint64_t tag = 0;
        if (m.nf >= SCW_ATTACHED_CURSOR_TAG && m.a[SCW_ATTACHED_CURSOR_TAG].type != MSGPACK_OBJECT_NIL) {
            if ((rc = field_uint(c, &m, AT(ATTACHED, CURSOR_TAG), &tag)))
                return rc;
            if (tag == 0 || tag > 0xFFFF)
                return bad_field(c, m.kind, AT(ATTACHED, CURSOR_TAG), "must be 1..65535, got %llu",
                                 (unsigned long long)tag);
            c->cursor_entry = (uint64_t *)(void *)(tables + 2 * SLEEPERS + 8 * byte);
            c->cursor_bits = tag << CURSOR_TAG_SHIFT;
            c->cursor_start = *start;
            c->cursor_index = (uint32_t)byte;
            c->posted_cursor = UINT64_MAX;  /* (none yet: the first wait posts its start) */
        }
    }
    return SC_OK;
}

/* Room for a run (version 2: a notice batch) of `count` frames in fr_n / fr_t0. */
static int grow_frames(sc_client *c, uint32_t count)
{
    if (count <= c->fr_cap)
        return SC_OK;
    uint64_t *pn = realloc(c->fr_n, count * sizeof *pn);
    if (pn == NULL)
        return fail(c, SC_ENOMEM, "out of memory");
    c->fr_n = pn;
    double *pt = realloc(c->fr_t0, count * sizeof *pt);
    if (pt == NULL)
        return fail(c, SC_ENOMEM, "out of memory");
    c->fr_t0 = pt;
    c->fr_cap = count;
    return SC_OK;
}

/* Forget what a failed earlier sc_subscribe left (it may be retried). */
static void reset_subscription(sc_client *c)
{
    unmap_sleepers(c);
    if (c->notices != NULL) {
        zmq_close(c->notices);
        c->notices = NULL;
    }
    free(c->held);
    c->held = NULL;
    c->nheld = c->held_cap = 0;
    free(c->leases);
    c->leases = NULL;
    free(c->locked);
    c->locked = NULL;
    c->nlocked = 0;
}

/* ................................................. the stream's metadata */

/* Forget the metadata of an earlier SUBSCRIBED. */
static void free_metadata(sc_client *c)
{
    free(c->meta_text);
    free(c->meta_ptrs);
    c->meta_text = NULL;
    c->meta_ptrs = NULL;
    c->info.channel_names = c->info.channel_types = c->info.channel_units = NULL;
    c->info.source_id = "";
    c->info.timestamps = 0;
    c->timestamps = false;
}

/* `o`, in SUBSCRIBED field `pos` (`name`, and `what` inside it), must be an array of `channels` strs (or, when
 * `optional`, an empty one: none given); add its strings' bytes, NULs included, to *bytes. */
static int meta_strings(sc_client *c, const msgpack_object *o, unsigned pos, const char *name, const char *what,
                        unsigned channels, bool optional, size_t *bytes)
{
    if (o->type != MSGPACK_OBJECT_ARRAY)
        return bad_field(c, SCW_SUBSCRIBED, pos, name, "%s must be an array of str, got %s", what, type_name(o));
    uint32_t n = o->via.array.size;
    if (n != channels && !(optional && n == 0))
        return bad_field(c, SCW_SUBSCRIBED, pos, name, "%s must have one str per channel (%u), got %u", what,
                         channels, n);
    for (uint32_t i = 0; i < n; i++) {
        const msgpack_object *e = &o->via.array.ptr[i];
        if (e->type != MSGPACK_OBJECT_STR)
            return bad_field(c, SCW_SUBSCRIBED, pos, name, "%s[%u] must be a str, got %s", what, i, type_name(e));
        *bytes += e->via.str.size + 1;
    }
    return SC_OK;
}

/* Copy the strs of array `o` (checked by meta_strings) to *text, pointing ptrs[i] at each. */
static void copy_strings(const msgpack_object *o, char **text, const char **ptrs)
{
    for (uint32_t i = 0; i < o->via.array.size; i++) {
        const msgpack_object_str *e = &o->via.array.ptr[i].via.str;
        memcpy(*text, e->ptr, e->size);
        (*text)[e->size] = '\0';
        ptrs[i] = *text;
        *text += e->size + 1;
    }
}

/* The stream's metadata from SUBSCRIBED, into one allocation the client owns (sc_info, sc_channel_name...):
 * channel_names (field 8) and, from version 2 on, meta (field 15, a map: channel_types and channel_units, arrays
 * of str, empty when not given; source_id, str; timestamps, bool).  A meta that is not a map says nothing (nil,
 * or a field another version put there); its other keys are ignored. */
static int take_metadata(sc_client *c, const msgview *m, unsigned channels)
{
    free_metadata(c);
    const msgpack_object *names = &m->a[SCW_SUBSCRIBED_CHANNEL_NAMES], *types = NULL, *units = NULL,
                         *source = NULL;
    bool timestamps = false;
    if (field_is(m, SCW_SUBSCRIBED_META, MSGPACK_OBJECT_MAP)) {
        const msgpack_object_map *map = &m->a[SCW_SUBSCRIBED_META].via.map;
        for (uint32_t i = 0; i < map->size; i++) {
            const msgpack_object *k = &map->ptr[i].key, *v = &map->ptr[i].val;
            if (k->type != MSGPACK_OBJECT_STR || v->type == MSGPACK_OBJECT_NIL)
                continue;
            const char *key = k->via.str.ptr;
            size_t klen = k->via.str.size;
#define KEY_IS(s) (klen == sizeof(s) - 1 && memcmp(key, s, klen) == 0)
            if (KEY_IS("channel_types"))
                types = v;
            else if (KEY_IS("channel_units"))
                units = v;
            else if (KEY_IS("source_id"))
                source = v;
            else if (KEY_IS("timestamps")) {
                if (v->type != MSGPACK_OBJECT_BOOLEAN)
                    return bad_field(c, m->kind, AT(SUBSCRIBED, META), "timestamps must be a bool, got %s",
                                     type_name(v));
                timestamps = v->via.boolean;
            }
#undef KEY_IS
        }
    }
    size_t bytes = 1;  /* the "" of what was not given */
    int rc;
    if ((rc = meta_strings(c, names, AT(SUBSCRIBED, CHANNEL_NAMES), "the array", channels, false, &bytes)) ||
        (types && (rc = meta_strings(c, types, AT(SUBSCRIBED, META), "channel_types", channels, true, &bytes))) ||
        (units && (rc = meta_strings(c, units, AT(SUBSCRIBED, META), "channel_units", channels, true, &bytes))))
        return rc;
    if (source != NULL) {
        if (source->type != MSGPACK_OBJECT_STR)
            return bad_field(c, m->kind, AT(SUBSCRIBED, META), "source_id must be a str, got %s", type_name(source));
        bytes += source->via.str.size + 1;
    }
    uint32_t ntypes = types ? types->via.array.size : 0, nunits = units ? units->via.array.size : 0;
    char *text = c->meta_text = malloc(bytes);
    const char **ptrs = c->meta_ptrs = malloc(((size_t)channels + ntypes + nunits) * sizeof *ptrs);
    if (text == NULL || ptrs == NULL)
        return fail(c, SC_ENOMEM, "out of memory");
    *text++ = '\0';
    copy_strings(names, &text, ptrs);
    c->info.channel_names = ptrs;
    if (ntypes) {
        copy_strings(types, &text, ptrs + channels);
        c->info.channel_types = ptrs + channels;
    }
    if (nunits) {
        copy_strings(units, &text, ptrs + channels + ntypes);
        c->info.channel_units = ptrs + channels + ntypes;
    }
    c->info.source_id = c->meta_text;
    if (source != NULL) {
        memcpy(text, source->via.str.ptr, source->via.str.size);
        text[source->via.str.size] = '\0';
        c->info.source_id = text;
    }
    c->info.timestamps = timestamps;
    return SC_OK;
}

int sc_subscribe(sc_client *c, const char *stream, const sc_sub_options *opts)
{
    NEED_CLIENT(c);
    if (!c->connected)
        return fail(c, SC_EINVAL, "sc_subscribe needs a connected client (call sc_connect first)");
    if (c->subscribed)
        return fail(c, SC_EINVAL, "this client already subscribed to stream '%s'; use one client per subscription",
                    c->stream);
    if (c->held_request)
        return fail(c, SC_EINVAL, "this client waited for stream '%s' in vain and the broker may still hold that "
                    "SUBSCRIBE: sc_close it and subscribe with a new client", c->stream);
    if (stream == NULL || !valid_stream_name(stream))
        return fail(c, SC_EINVAL, "stream name must be 1 to 64 characters from A-Z a-z 0-9 _ . : -, got '%s'",
                    stream ? stream : "(null)");
    sc_sub_options d;
    int orc = read_sub_options(c, opts, &d);
    if (orc)
        return orc;
    opts = &d;
    bool by_size = opts->size > 0, by_seconds = opts->seconds != 0.0;
    if (by_size == by_seconds)
        return fail(c, SC_EINVAL, "give exactly one of size (samples) and seconds, got size=%llu seconds=%g",
                    (unsigned long long)opts->size, opts->seconds);
    if (by_seconds && !(isfinite(opts->seconds) && opts->seconds > 0))
        return fail(c, SC_EINVAL, "seconds must be a positive number, got %g", opts->seconds);
    const char *policy = opts->policy ? opts->policy : "block";
    if (strcmp(policy, "block") != 0 && strcmp(policy, "drop") != 0)
        return fail(c, SC_EINVAL, "policy must be 'block' or 'drop', got '%s'", policy);
    if (opts->max_inflight < 1 || opts->max_inflight > MAX_INFLIGHT)
        return fail(c, SC_EINVAL, "max_inflight must be 1..%d, got %u", MAX_INFLIGHT, opts->max_inflight);
    wake_kind wake = WAKE_DOORBELL;
    if (opts->wake != NULL) {
        while (wake <= WAKE_BUSY && strcmp(opts->wake, WAKE_NAMES[wake]) != 0)
            wake++;
        if (wake > WAKE_BUSY)
            return fail(c, SC_EINVAL, "wake must be 'doorbell', 'futex' or 'busy' (or NULL: doorbell), got '%s'",
                        opts->wake);
        if (wake != WAKE_DOORBELL && !c->ring)
            return fail(c, SC_EINVAL, "wake '%s' needs protocol version 3 (it waits on the segment's descriptor "
                        "ring); this client speaks version %u", opts->wake, c->version);
    }
    if (!(opts->sampler >= 0 && opts->sampler <= MAX_SAMPLER_SECONDS))  /* (NaN too) */
        return fail(c, SC_EINVAL, "sampler must be seconds in 0..%g (0: none), got %g", MAX_SAMPLER_SECONDS,
                    opts->sampler);
    if (opts->partial_tail && !c->local)
        return fail(c, SC_EINVAL, "partial_tail needs a local subscriber (an ipc:// broker, protocol version 2 or "
                    "3: this client cuts its own chunks); this one is %s", c->remote ? "tcp://" : "version 1");
    if (opts->wait_ms < -1)
        return fail(c, SC_EINVAL, "wait_ms must be milliseconds >= 0, or -1 for the client's timeout, got %d",
                    opts->wait_ms);
    int wait_ms = opts->wait_ms < 0 ? c->timeout_ms : opts->wait_ms;
    if (!c->local && !c->remote)
        wait_ms = 0;  /* version 1 cannot wait */
    snprintf(c->stream, sizeof c->stream, "%s", stream);
    snprintf(c->where, sizeof c->where, "subscriber of stream '%s' at %s", stream, c->address);
    reset_subscription(c);
    c->end_code = 0;
    c->max_held = opts->max_inflight;
    c->drop = strcmp(policy, "drop") == 0;
    c->wake = wake;
    c->topic_len = strlen(stream) + 1;  /* the NUL keeps "mic" from matching "mic2" */
    memcpy(c->topic, stream, c->topic_len);
    c->token[0] = 0x01;
    make_token(c->token + 1);

    /* Version 1 stops after the sampler (SCW_SUBSCRIBE_REQUIRED fields), version 2 after the token; version 3
     * sends them all. */
    _Static_assert(SCW_SUBSCRIBE_NAME == 1 && SCW_SUBSCRIBE_SIZE == 2 && SCW_SUBSCRIBE_SECONDS == 3 &&
                   SCW_SUBSCRIBE_CLIP == 4 && SCW_SUBSCRIBE_POLICY == 5 && SCW_SUBSCRIBE_MAX_INFLIGHT == 6 &&
                   SCW_SUBSCRIBE_SAMPLER == 7 && SCW_SUBSCRIBE_REQUIRED == SCW_SUBSCRIBE_SAMPLER &&
                   SCW_SUBSCRIBE_CUT == 8 && SCW_SUBSCRIBE_WAIT == 9 && SCW_SUBSCRIBE_TOKEN == 10 &&
                   SCW_SUBSCRIBE_HISTORY == 11 && SCW_SUBSCRIBE_WAKE == 12 && SCW_SUBSCRIBE_FIELDS == 12,
                   "SUBSCRIBE is packed in this order");
    /* `history` is nil: this client starts at the head and is never sent HISTORY. */
    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk,
                       1 + (c->ring || c->remote ? SCW_SUBSCRIBE_WAKE
                            : c->local         ? SCW_SUBSCRIBE_TOKEN
                                               : SCW_SUBSCRIBE_REQUIRED));
    msgpack_pack_uint64(&c->pk, SCW_SUBSCRIBE);
    pack_str(c, stream);
    if (by_size) {
        msgpack_pack_uint64(&c->pk, opts->size);
        msgpack_pack_nil(&c->pk);
    } else {
        msgpack_pack_nil(&c->pk);
        msgpack_pack_double(&c->pk, opts->seconds);
    }
    if (opts->clip)
        msgpack_pack_true(&c->pk);
    else
        msgpack_pack_false(&c->pk);
    pack_str(c, policy);
    msgpack_pack_uint64(&c->pk, opts->max_inflight);
    if (!c->local && opts->sampler > 0)
        msgpack_pack_double(&c->pk, opts->sampler);  /* version 1: the broker applies it */
    else
        msgpack_pack_nil(&c->pk);  /* sampler: versions 2 and 3 apply it here (a local subscriber's stays with it) */
    if (c->local) {
        pack_str(c, "local");      /* cut: this client cuts its own chunks */
        if (wait_ms > 0)           /* wait: the broker holds the request until the stream opens */
            msgpack_pack_true(&c->pk);
        else
            msgpack_pack_false(&c->pk);
        msgpack_pack_bin(&c->pk, TOKEN_BYTES);
        msgpack_pack_bin_body(&c->pk, c->token + 1, TOKEN_BYTES);
    }
    if (c->ring) {
        msgpack_pack_nil(&c->pk);      /* history: none */
        pack_str(c, WAKE_NAMES[wake]); /* how it waits: the broker tells the publisher (futex: FUTEX_WAKE) */
    }
    if (c->remote) {
        pack_str(c, "broker");  /* cut: the broker cuts our chunks and sends them by value (docs/protocol.md 11) */
        if (wait_ms > 0)
            msgpack_pack_true(&c->pk);
        else
            msgpack_pack_false(&c->pk);
        msgpack_pack_nil(&c->pk);  /* token: none (no notice socket) */
        msgpack_pack_nil(&c->pk);  /* history: none */
        msgpack_pack_nil(&c->pk);  /* wake: the broker's messages wake it */
    }
    msgview m;
    int rc = request_within(c, "SUBSCRIBE", SCW_SUBSCRIBED, &m, wait_ms > 0 ? wait_ms : c->timeout_ms);
    if (rc == SC_ETIMEOUT) {
        c->held_request = true;
        char there[512];
        streams_there(c, stream, there, sizeof there);
        if (wait_ms <= 0) {
            /* No wait, and no answer: a broker that answers STATS holds the request for the stream's publisher
             * (its carry; a C publisher takes it in sc_pub_write and sc_pub_service), as Python's says; else it
             * is gone (it said SC_EBROKERGONE for a publisher that had not serviced its stream for 5 s). */
            if (strstr(there, "the broker has a stream of that name") != NULL)
                return fail(c, SC_ENOSTREAM, "stream '%s' is on the broker, but no SUBSCRIBED came within %d ms%s "
                            "(%s)", stream, c->timeout_ms, there, c->where);
            return fail(c, SC_EBROKERGONE, "no answer to SUBSCRIBE from the broker within %d ms (%s)",
                        c->timeout_ms, c->where);
        }
        return fail(c, SC_ENOSTREAM, "no stream named '%s' appeared within wait_ms=%d%s (the broker holds a "
                    "SUBSCRIBE that waits until the stream opens; without a wait it answers ERROR unknown-stream at "
                    "once) (%s)", stream, wait_ms, there, c->where);
    }
    if (rc)
        return rc;
    uint64_t seg_bytes, channels, size, start;
    double rate = 0.0;
    if ((rc = need_fields(c, &m, c->local ? SCW_SUBSCRIBED_NOTICE_ENDPOINT : SCW_SUBSCRIBED_REQUIRED)) ||
        (rc = field_str(c, &m, AT(SUBSCRIBED, SEGMENT), c->segment, sizeof c->segment)) ||
        (rc = field_uint(c, &m, AT(SUBSCRIBED, SEGMENT_BYTES), &seg_bytes)) ||
        (rc = field_str(c, &m, AT(SUBSCRIBED, DTYPE), c->dtype, sizeof c->dtype)) ||
        (rc = field_uint(c, &m, AT(SUBSCRIBED, CHANNELS), &channels)) ||
        (!field_is(&m, SCW_SUBSCRIBED_RATE, MSGPACK_OBJECT_NIL) &&
         (rc = field_num(c, &m, AT(SUBSCRIBED, RATE), &rate))) ||
        (rc = field_uint(c, &m, AT(SUBSCRIBED, SIZE), &size)) ||
        (rc = field_uint(c, &m, AT(SUBSCRIBED, START), &start)))
        return rc;
    if (!field_is(&m, SCW_SUBSCRIBED_CHANNEL_NAMES, MSGPACK_OBJECT_ARRAY))
        return bad_field(c, m.kind, AT(SUBSCRIBED, CHANNEL_NAMES), "must be an array, got %s",
                         type_name(&m.a[SCW_SUBSCRIBED_CHANNEL_NAMES]));
    unsigned itemsize = dtype_itemsize(c->dtype);
    if (itemsize == 0 || channels < 1 || channels > 65535 || size < 1 || seg_bytes > SIZE_MAX)
        return fail(c, SC_EPROTO, "SUBSCRIBED announced dtype '%s', %llu channels, size %llu: not a valid stream (%s)",
                    c->dtype, (unsigned long long)channels, (unsigned long long)size, c->where);
    if ((rc = take_metadata(c, &m, (unsigned)channels)))
        return rc;
    /* A broker that takes ATTACH's futex_sleeper says so (an earlier one refuses an ATTACH of three fields). */
    c->broker_futex_table = field_is(&m, SCW_SUBSCRIBED_FUTEX_SLEEPER, MSGPACK_OBJECT_BOOLEAN) &&
                            m.a[SCW_SUBSCRIBED_FUTEX_SLEEPER].via.boolean;
    if (c->local) {
        uint64_t header, slab_bytes, nslabs, sample_bytes;
        if ((rc = field_uint(c, &m, AT(SUBSCRIBED, STREAM_ID), &c->sid)) ||
            (rc = field_uint(c, &m, AT(SUBSCRIBED, HEADER_BYTES), &header)) ||
            (rc = field_uint(c, &m, AT(SUBSCRIBED, SLAB_BYTES), &slab_bytes)) ||
            (rc = field_uint(c, &m, AT(SUBSCRIBED, NSLABS), &nslabs)) ||
            (rc = field_uint(c, &m, AT(SUBSCRIBED, SAMPLE_BYTES), &sample_bytes)) ||
            (rc = field_str(c, &m, AT(SUBSCRIBED, NOTICE_ENDPOINT), c->endpoint, sizeof c->endpoint)))
            return rc;
        if (sample_bytes != (uint64_t)itemsize * channels || nslabs < 1 || nslabs > 1u << 20 || slab_bytes < 1 ||
            header > seg_bytes)
            return fail(c, SC_EPROTO,
                        "SUBSCRIBED announced sample_bytes=%llu (dtype '%s' x %llu channels), nslabs=%llu, "
                        "slab_bytes=%llu, header_bytes=%llu: not a valid stream (%s)", (unsigned long long)sample_bytes,
                        c->dtype, (unsigned long long)channels, (unsigned long long)nslabs,
                        (unsigned long long)slab_bytes, (unsigned long long)header, c->where);
        c->header_bytes = (size_t)header;
        c->slab_bytes = slab_bytes;
        c->nslabs = (uint32_t)nslabs;
    }
    c->info.struct_size = sizeof c->info;
    c->info.name = c->stream;
    c->info.dtype = c->dtype;
    c->info.itemsize = itemsize;
    c->info.channels = (unsigned)channels;
    c->info.sample_bytes = (size_t)itemsize * channels;
    c->info.rate = rate;
    c->info.size = size;
    c->info.start = start;
    c->info.segment = c->segment;
    c->info.segment_bytes = c->remote ? 0 : (size_t)seg_bytes;
    if (!c->remote && (rc = map_segment(c, (size_t)seg_bytes)))  /* (tcp://: the chunks come by value) */
        return rc;
    if (c->local && c->info.timestamps) {
        /* Per-sample times: one f64 per sample slot of every slab, after the slabs (docs/protocol.md 7.5). */
        uint64_t end = (uint64_t)c->header_bytes + (uint64_t)c->nslabs * c->slab_bytes;
        c->times_offset = end;
        end += 8 * (c->slab_bytes / c->info.sample_bytes) * c->nslabs;
        if (end > (c->ring ? (uint64_t)(c->ring_base - c->map) : (uint64_t)c->map_bytes))
            return fail(c, SC_EPROTO, "segment %s has no room for the per-sample times SUBSCRIBED announced: "
                        "their tables would end at byte %llu, past the %s (%s)", c->segment, (unsigned long long)end,
                        c->ring ? "descriptor ring" : "segment", c->where);
        c->timestamps = true;
    }
    if (c->local) {
        c->leases = calloc(c->nslabs, sizeof *c->leases);
        c->locked = calloc(c->nslabs, sizeof *c->locked);
        if (c->leases == NULL || c->locked == NULL)
            return fail(c, SC_ENOMEM, "out of memory");
        if (c->ring) {
            /* Room for RING_READ descriptors and a run of as many frames (the version-2 batch arrays). */
            uint32_t cap = c->ring_slots < RING_READ ? (uint32_t)c->ring_slots : RING_READ;
            if (c->rd_cap < cap) {
                ring_desc *rd = realloc(c->rd, cap * sizeof *rd);
                if (rd == NULL)
                    return fail(c, SC_ENOMEM, "out of memory");
                c->rd = rd;
                c->rd_cap = cap;
            }
            if ((rc = grow_frames(c, cap)))
                return rc;
            c->rd_head = c->rd_count = 0;
        }
        if (c->ring && (wake == WAKE_DOORBELL || wake == WAKE_FUTEX))
            map_sleepers(c);  /* (futex: its byte in the futex sleeper table, when the publisher looks there) */
        uint64_t seq = 0;
        c->have_end = false;  /* (an END before ATTACHED is kept: join_notices, attach) */
        if ((rc = join_notices(c)) || (rc = attach(c, &start, &seq)))
            return rc;
        c->rseq = seq;
        c->info.start = start;
        c->rk = (rechunker){.size = size, .clip = opts->clip != 0, .rate = rate, .sampler = opts->sampler > 0,
                            .pause = opts->sampler};
        c->have_frames = false;
        c->rhead = c->rcount = 0;
        c->next_seq = c->dropped = 0;
        c->cursor = start;
        c->cur_slab = -1;
        c->jumped = false;
        c->partial = opts->partial_tail != 0;
        c->tail_cut = false;
        c->nseq = -1;
        c->acked_slab = c->acked_dropped = c->acked_held = -1;
        c->acked_cursor = c->acked_received = UINT64_MAX;
        c->acked_at = 0;
        c->cut_rc = SC_OK;
        c->unlocked = false;
    }
    c->subscribed = true;
    return SC_OK;
}

const sc_stream_info *sc_info(const sc_client *c)
{
    return c->subscribed ? &c->info : NULL;
}

const char *sc_channel_name(const sc_client *c, unsigned i)
{
    return c != NULL && c->subscribed && i < c->info.channels ? c->info.channel_names[i] : NULL;
}

const char *sc_channel_type(const sc_client *c, unsigned i)
{
    if (c == NULL || !c->subscribed || i >= c->info.channels)
        return NULL;
    return c->info.channel_types ? c->info.channel_types[i] : "";
}

const char *sc_channel_unit(const sc_client *c, unsigned i)
{
    if (c == NULL || !c->subscribed || i >= c->info.channels)
        return NULL;
    return c->info.channel_units ? c->info.channel_units[i] : "";
}

/* -------------------------------------------------------------- receiving */

/* Room for one more held chunk. */
static int grow_held(sc_client *c)
{
    if (c->nheld < c->held_cap)
        return SC_OK;
    size_t cap = c->held_cap ? 2 * c->held_cap : 16;
    held_chunk *p = realloc(c->held, cap * sizeof *p);
    if (p == NULL)
        return fail(c, SC_ENOMEM, "out of memory");
    c->held = p;
    c->held_cap = cap;
    return SC_OK;
}

/* The END code `code` with text `text` as a return code, made the sticky end of the subscription. */
static int end_from(sc_client *c, const char *code, const char *text)
{
    int rc;
    if (strcmp(code, SCW_END_CLOSED) == 0)
        rc = fail(c, SC_EOF, "end of stream: %s (%s)", text, c->where);
    else if (strcmp(code, SCW_END_PUBLISHER_GONE) == 0)
        rc = fail(c, SC_EPUBGONE, "the publisher is gone: %s (%s)", text, c->where);
    else if (strcmp(code, SCW_END_BROKER_SHUTDOWN) == 0) {
        c->gone = true;
        rc = fail(c, SC_EBROKERGONE, "the broker is gone: %s (%s)", text, c->where);
    } else if (strcmp(code, SCW_END_EVICTED) == 0)
        rc = fail(c, SC_EEVICTED, "%s (%s)", text, c->where);
    else
        rc = fail(c, SC_EEND, "the stream ended (%s): %s (%s)", code, text, c->where);
    return end_with(c, rc);
}

/* An END: the subscription is over; remember why. */
static int take_end(sc_client *c, const msgview *m)
{
    char code[64], text[768];
    int rc;
    if ((rc = need_fields(c, m, SCW_END_REQUIRED)) || (rc = field_str(c, m, AT(END, CODE), code, sizeof code)) ||
        (rc = field_str(c, m, AT(END, MESSAGE), text, sizeof text)))
        return rc;
    uint64_t cut;
    if (!c->local && m->nf >= SCW_END_SEQ && field_uint(c, m, AT(END, SEQ), &cut) == SC_OK)
        c->stats.cut = cut;
    if (c->local)
        c->stats.cut = c->next_seq;
    return end_from(c, code, text);
}

/* ................................................... version 1: CHUNK, RELEASE */

/* Fill `chunk` from a CHUNK message, checking that it lies inside the mapping. */
static int take_chunk(sc_client *c, const msgview *m, sc_chunk *chunk)
{
    uint64_t seq, index, n, offset, flags;
    double t0;
    int rc;
    if ((rc = need_fields(c, m, SCW_CHUNK_REQUIRED)) || (rc = field_uint(c, m, AT(CHUNK, SEQ), &seq)) ||
        (rc = field_uint(c, m, AT(CHUNK, INDEX), &index)) || (rc = field_uint(c, m, AT(CHUNK, N), &n)) ||
        (rc = field_num(c, m, AT(CHUNK, T0), &t0)) || (rc = field_uint(c, m, AT(CHUNK, OFFSET), &offset)) ||
        (rc = field_uint(c, m, AT(CHUNK, FLAGS), &flags)))
        return rc;
    size_t sb = c->info.sample_bytes;
    if (c->remote) {
        /* tcp://: the bytes are the message's second part (recv_direct kept it), held until the release. */
        size_t got = c->payload != NULL ? zmq_msg_size(c->payload) : 0;
        if (!(flags & SCW_FLAG_INLINE) || c->payload == NULL || n < 1 || n > SIZE_MAX / sb || got != n * sb)
            return fail(c, SC_EPROTO, "CHUNK seq=%llu announced %llu samples inline (%zu bytes), got %s%zu bytes "
                        "(%s)", (unsigned long long)seq, (unsigned long long)n, (size_t)n * sb,
                        flags & SCW_FLAG_INLINE ? "" : "no inline flag and ", got, c->where);
    } else if (flags & SCW_FLAG_INLINE)
        return fail(c, SC_EPROTO,
                    "CHUNK seq=%llu has the inline flag (%d), which is for tcp:// clients; this ipc client reads "
                    "shared memory (%s)", (unsigned long long)seq, SCW_FLAG_INLINE, c->where);
    else if (n < 1 || n > (c->map_bytes / sb) || offset < c->header_bytes || offset > c->map_bytes ||
        n * sb > c->map_bytes - offset)
        return fail(c, SC_EPROTO,
                    "CHUNK seq=%llu of %llu samples (%zu bytes each) at offset %llu lies outside the %zu-byte "
                    "segment's slabs (%s)", (unsigned long long)seq, (unsigned long long)n, sb,
                    (unsigned long long)offset, c->map_bytes, c->where);
    if (c->nheld >= c->max_held)
        return fail(c, SC_EPROTO, "CHUNK seq=%llu exceeds max_inflight=%u chunks held (%s)",
                    (unsigned long long)seq, c->max_held, c->where);
    if ((rc = grow_held(c)))
        return rc;
    c->held[c->nheld++] = (held_chunk){.seq = seq, .payload = c->payload};
    chunk->data = c->payload != NULL ? zmq_msg_data(c->payload) : c->map + offset;
    c->payload = NULL;
    chunk->n = n;
    chunk->nbytes = (size_t)n * sb;
    chunk->dtype = c->dtype;
    chunk->channels = c->info.channels;
    chunk->t0 = t0;
    chunk->seq = seq;
    chunk->index = index;
    chunk->flags = (unsigned)(flags & ~(uint64_t)SCW_FLAG_INLINE);  /* (how the samples came: the wire's) */
    c->stats.received++;
    c->stats.last_seq = (int64_t)seq;
    return SC_OK;
}

/* Nothing is queued on our sockets, and the broker connection stands: what sc_recv looks at last before it
 * returns SC_ETIMEOUT.  Asking each socket's ZMQ_EVENTS also makes ZeroMQ process what it was signalled, so that
 * the edge-triggered ZMQ_FD in sc_fd's epoll set fires for whatever comes next (a send, such as an ACK, may take a
 * signal without reading the message it announced). */
static bool sockets_quiet(sc_client *c)
{
    read_monitor(c);
    if (c->gone)
        return false;
    void *socks[3] = {c->notices, c->sock, c->mon};
    for (int i = 0; i < 3; i++) {
        int events = 0;
        size_t len = sizeof events;
        if (socks[i] != NULL && zmq_getsockopt(socks[i], ZMQ_EVENTS, &events, &len) == 0 && (events & ZMQ_POLLIN))
            return false;
    }
    return true;
}

/* tcp://: a remote client proves it lives by talking (the broker drops one silent for 10 s): a SYNC when nothing
 * was sent for KEEPALIVE_MS (answered by a SYNCED, which recv_v1 skips). */
static void keepalive(sc_client *c)
{
    if (!c->remote || c->gone || now_ms() - c->sent_at < KEEPALIVE_MS)
        return;
    _Static_assert(SCW_SYNC_TOKEN == 1 && SCW_SYNC_FIELDS == 1, "SYNC is packed in this order");
    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk, 1 + SCW_SYNC_FIELDS);
    msgpack_pack_uint64(&c->pk, SCW_SYNC);
    msgpack_pack_int64(&c->pk, 0);
    if (send_packed(c, "SYNC") != SC_OK)
        c->sent_at = now_ms();  /* (not sent: again in a second, never in a spin; a broker gone is the monitor's) */
}

/* Version 1 and tcp://: the broker's CHUNKs, until one comes (SC_OK), `deadline` passes or the subscription ends. */
static int recv_v1(sc_client *c, sc_chunk *chunk, int64_t deadline)
{
    for (;;) {
        msgview m;
        int64_t until = deadline;
        if (c->remote && (until < 0 || c->sent_at + KEEPALIVE_MS < until))
            until = c->sent_at + KEEPALIVE_MS;  /* wake to say we live */
        keepalive(c);
        int rc = next_msg(c, until, &m);
        if (rc == SC_ETIMEOUT && until != deadline && (deadline < 0 || now_ms() < deadline))
            continue;
        if (rc == SC_EBROKERGONE || rc == SC_EDENIED)
            return end_with(c, rc);
        if (rc == SC_ETIMEOUT && !sockets_quiet(c))
            continue;  /* (the next look takes it; a connection gone is SC_EBROKERGONE there) */
        if (rc)
            return rc;
        switch (m.kind) {
        case SCW_CHUNK: return take_chunk(c, &m, chunk);
        case SCW_SYNCED: continue;
        case SCW_END: return take_end(c, &m);
        case SCW_ERROR: return broker_error(c, &m);
        default:
            return fail(c, SC_EPROTO, "unexpected %s (kind %llu) from the broker (%s)", kind_name(m.kind),
                        (unsigned long long)m.kind, c->where);
        }
    }
}

/* ......................................... version 2: the rechunking rules */

typedef int (*emit_fn)(sc_client *c, uint64_t start, uint64_t length, double t0);

/*
 * Account for a frame of `n` samples starting at stream index `index` at time `t0`, and call `emit`
 * for each chunk it completes, oldest first: Rechunker.feed of src/slabcast/core/rechunk.py, line for line
 * (docs/protocol.md section 8), so both clients cut the same chunks with the same float arithmetic.
 */
static int rechunk_feed(rechunker *r, uint64_t index, uint64_t n, double t0, emit_fn emit, sc_client *c)
{
    uint64_t end = index + n;
    /* Fast path: no pause, chunk still incomplete after this frame. */
    if (!r->pausing && !r->pausing_at && r->has_start && end - r->start < r->size)
        return SC_OK;
    double rate = r->rate;
    if (rate == 0.0) {
        if (r->has_last && t0 < r->last_t0 && r->pausing) {
            r->pausing = false;  /* the clock stepped back: skipping "until then" could last for hours */
            c->jumped = true;    /* (Rechunker.jumped) the next chunk is flagged */
        }
        r->has_last = true;
        r->last_t0 = t0;
    }
    uint64_t pos = index;
    for (;;) {
        if (r->pausing) {
            /* Whole-frame skipping; after a sampled chunk the rest of its frame is dropped. */
            if (pos != index || t0 < r->pause_until)
                break;
            r->pausing = false;
        } else if (r->pausing_at) {
            if (r->pause_at >= end)
                break;
            if (r->pause_at > pos)
                pos = r->pause_at;
            r->pausing_at = false;
        }
        if (!r->has_start) {
            r->has_start = true;
            r->start = pos;
            r->t0 = rate != 0.0 ? t0 + (double)(pos - index) / rate : t0;
        }
        uint64_t start = r->start;
        if (end - start < r->size)
            break;
        uint64_t length = r->clip ? r->size : end - start;
        int rc = emit(c, start, length, r->t0);
        if (rc)
            return rc;
        uint64_t stop = start + length;
        if (r->sampler) {
            if (rate != 0.0) {
                r->pause_at = stop + (uint64_t)ceil(r->pause * rate - RECHUNK_EPS);
                r->pausing_at = true;
            } else {
                r->pause_until = t0 + r->pause;
                r->pausing = true;
            }
            r->has_start = false;
            pos = stop;
            continue;
        }
        if (stop >= end) {
            r->has_start = false;
            break;
        }
        r->start = pos = stop;
        r->t0 = rate != 0.0 ? t0 + (double)(stop - index) / rate : t0;
    }
    return SC_OK;
}

/* ................................................ version 2: leases (locks) */

/* Take (F_RDLCK) or drop (F_UNLCK) our lease lock on `slab`; never waits.
 * 1: done; 0: refused (the broker holds it, handing the slab to the publisher); <0: error. */
static int lock_slab(sc_client *c, uint32_t slab, short type)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);  /* l_pid must be 0 for open file description locks */
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)(LOCK_BASE + slab);
    fl.l_len = 1;
    if (fcntl(c->lock_fd, F_OFD_SETLK, &fl) == 0)
        return 1;
    if (errno == EAGAIN || errno == EACCES)
        return 0;
    return fail(c, SC_ESYS, "cannot %s the lease lock of slab %u: %s (%s)", type == F_UNLCK ? "drop" : "take", slab,
                strerror(errno), c->where);
}

/* Lease `slab` for one more chunk: lock it, then check it still holds generation `gen`
 * (_Leases.claim).  1: leased; 0: the slab was written again (the chunk is dropped); <0: error. */
static int claim(sc_client *c, uint32_t slab, uint32_t gen)
{
    slab_lease *l = &c->leases[slab];
    if (l->locked) {
        if (l->gen != gen)
            return 0;  /* a notice older than our lease: its data is gone */
        l->count++;
        return 1;
    }
    int got = lock_slab(c, slab, F_RDLCK);
    if (got <= 0)
        return got;  /* refused: the broker is handing it to the publisher right now */
    uint32_t now = __atomic_load_n((const uint32_t *)(c->map + GEN_OFFSET + 4 * (size_t)slab), __ATOMIC_ACQUIRE);
    if (now != gen) {  /* the table is little-endian, like every host this client runs on (x86-64, aarch64) */
        lock_slab(c, slab, F_UNLCK);
        return 0;
    }
    *l = (slab_lease){.gen = gen, .count = 1, .locked = true};
    c->locked[c->nlocked++] = slab;
    return 1;
}

/* Drop the locks of slabs with no chunk left, except `keep` (the slab being read). */
static void unlock_idle(sc_client *c, int64_t keep)
{
    for (uint32_t i = 0; i < c->nlocked;) {
        uint32_t slab = c->locked[i];
        slab_lease *l = &c->leases[slab];
        if (l->count == 0 && (int64_t)slab != keep) {
            lock_slab(c, slab, F_UNLCK);
            l->locked = false;
            c->locked[i] = c->locked[--c->nlocked];
            c->unlocked = true;
        } else {
            i++;
        }
    }
}

/* Whether the broker asks us for ACKs (docs/protocol.md 7.9): acks_wanted, ack_target every subscriber or our
 * entry, and our cursor at least ack_at.  A subscriber without an entry is asked whenever anyone is. */
static bool asked(const sc_client *c)
{
    if (__atomic_load_n(c->acks_wanted, __ATOMIC_RELAXED) == 0)
        return false;
    if (c->cursor_entry == NULL)
        return true;
    uint32_t target = __atomic_load_n(c->ack_target, __ATOMIC_RELAXED);
    if (target != 0 && target != c->cursor_index + 1)
        return false;
    return c->cursor >= __atomic_load_n(c->ack_at, __ATOMIC_RELAXED);
}

/* Post our cursor in our cursor table entry, make a full barrier, and say whether an ACK must go anyway: the broker
 * asks us (7.9: Dekker's handshake with its store of the flag, barrier, read of the table), or the cursor is too
 * far from our start to post. */
static bool post_cursor(sc_client *c)
{
    uint64_t delta = c->cursor - c->cursor_start;
    if (c->cursor < c->cursor_start || delta >> CURSOR_TAG_SHIFT)
        return true;
    __atomic_store_n(c->cursor_entry, c->cursor_bits | delta, __ATOMIC_RELAXED);
    c->posted_cursor = c->cursor;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return asked(c);
}

/* Tell the broker how far we have read (Subscriber._send_ack): at once when we started on another
 * slab, gave a lock back or `force` (with a cursor table entry: the cursor posted there, and an ACK only while
 * the broker asks); otherwise (counters for `slabcast status`) at most every ACK_INTERVAL_MS, or
 * COUNTS_INTERVAL_MS while our cursor is in the table and the broker does not ask us. */
static void send_ack(sc_client *c, bool force, bool waiting)
{
    if (c->gone)
        return;
    int64_t held = (int64_t)c->nheld, dropped = (int64_t)c->dropped;
    bool urgent = force || c->unlocked || c->cur_slab != c->acked_slab;
    /* About to wait, our cursor is posted too if it moved (a status then shows us caught up, not a slab behind). */
    urgent = urgent || (waiting && c->cursor_entry != NULL && c->cursor != c->posted_cursor);
    if (urgent && !force && c->cursor_entry != NULL) {
        c->acked_slab = c->cur_slab;
        c->unlocked = false;
        urgent = post_cursor(c);  /* (an ACK too while the broker asks) */
    }
    int64_t now = now_ms();
    /* Any counter's change is sent within ACK_INTERVAL_MS (protocol 10.3): the cursor frees slabs, the others
     * are what `slabcast status` shows; a cursor in the table frees them without an ACK. */
    bool in_table = c->cursor_entry != NULL && !asked(c);
    bool changed = dropped != c->acked_dropped || held != c->acked_held ||
                   (c->cursor != c->acked_cursor && !in_table) || c->stats.received != c->acked_received;
    if (!urgent && (!changed || now - c->acked_at < (in_table ? COUNTS_INTERVAL_MS : ACK_INTERVAL_MS)))
        return;
    c->acked_slab = c->cur_slab;
    c->acked_dropped = dropped;
    c->acked_held = held;
    c->acked_cursor = c->cursor;
    c->acked_received = c->stats.received;
    c->acked_at = now;
    c->unlocked = false;
    _Static_assert(SCW_ACK_CURSOR == 1 && SCW_ACK_DELIVERED == 2 && SCW_ACK_DROPPED == 3 && SCW_ACK_HELD == 4 &&
                   SCW_ACK_FIELDS == 4, "ACK is packed in this order");
    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk, 1 + SCW_ACK_FIELDS);
    msgpack_pack_uint64(&c->pk, SCW_ACK);
    msgpack_pack_uint64(&c->pk, c->cursor);
    msgpack_pack_uint64(&c->pk, c->stats.received);
    msgpack_pack_uint64(&c->pk, c->dropped);
    msgpack_pack_uint64(&c->pk, (uint64_t)held);
    send_packed(c, "ACK");  /* a broker that is gone is noticed by the monitor */
}

/* ............................................. version 2: cutting chunks */

#define EVICTED_WAIT_MS 1000

/* A block subscriber overrun (samples it did not read are gone): the publisher goes on without it only once the
 * broker evicted it, whose END evicted is on its way: end with it (SC_EEVICTED, never a clean end).  SC_OK if
 * none came within EVICTED_WAIT_MS, or the stream ended while we were still its subscriber (the caller says
 * SC_ELOST). */
static int evicted(sc_client *c)
{
    int64_t deadline = deadline_for(EVICTED_WAIT_MS);
    msgview m;
    int rc;
    while ((rc = next_msg(c, deadline, &m)) == SC_OK) {
        if ((rc = on_direct(c, &m)))
            return rc;  /* END evicted, broker-shutdown, ERROR */
        if (m.kind == SCW_END)
            return SC_OK;  /* closed or publisher-gone, kept in have_end */
    }
    return rc == SC_ETIMEOUT ? SC_OK : rc;
}

/* Where a frame lies: the stream index of its first sample, that sample's byte, its slab and the slab's generation. */
typedef struct frame_place {
    uint64_t index, offset, slab, gen;
} frame_place;

/* A chunk of the frame at `f`: locate it, lease it, queue it with `flags` (_cut_chunk). */
static int cut_chunk_of(sc_client *c, const frame_place *f, uint64_t start, uint64_t length, double t0,
                        unsigned flags)
{
    uint64_t seq = c->next_seq++;
    if (c->drop && c->rcount + c->nheld >= c->max_held) {
        c->dropped++;
        return SC_OK;
    }
    /* At offset - (index - start) * sample_bytes (docs/protocol.md section 8), in this frame's slab, which
     * holds every sample from the notice's floor on; the chunk may also start inside the frame (clip). */
    int64_t sb = (int64_t)c->info.sample_bytes;
    int64_t slab_start = (int64_t)(c->header_bytes + f->slab * c->slab_bytes);
    int64_t at = (int64_t)f->offset - ((int64_t)f->index - (int64_t)start) * sb;
    if (at < slab_start || length > c->slab_bytes / (uint64_t)sb ||
        at + (int64_t)length * sb > slab_start + (int64_t)c->slab_bytes) {
        c->dropped++;
        if (c->cut_rc == SC_OK)
            c->cut_rc = fail(c, SC_EPROTO,
                             "chunk seq=%llu (samples %llu..%llu) does not lie in slab %llu of the segment: the %s "
                             "of the frame at index %llu, offset %llu, floor %llu is wrong (%s)",
                             (unsigned long long)seq, (unsigned long long)start,
                             (unsigned long long)(start + length - 1), (unsigned long long)f->slab,
                             c->ring ? "ring descriptor" : "notice",
                             (unsigned long long)f->index, (unsigned long long)f->offset,
                             (unsigned long long)c->fr_floor, c->where);
        return SC_OK;
    }
    int got = claim(c, (uint32_t)f->slab, (uint32_t)f->gen);
    if (got < 0)
        return got;
    if (got == 0) {
        /* The publisher already reuses this slab: a drop subscriber that fell a pool behind, or a block subscriber
         * the broker evicted (no longer holding the publisher back): that one ends here. */
        c->dropped++;
        if (!c->drop)
            c->jumped = true;  /* (the next chunk is flagged) */
        if (!c->drop && c->cut_rc == SC_OK) {
            int rc = evicted(c);
            c->cut_rc = rc ? rc : fail(c, SC_ELOST, "samples %llu..%llu of the stream were overwritten before this "
                                       "subscriber read them, and no END evicted came (%s)", (unsigned long long)start,
                                       (unsigned long long)(start + length), c->where);
        }
        return SC_OK;
    }
    if (c->rhead + c->rcount == c->rcap) {
        if (c->rhead > 0) {  /* only when empty in practice: one frame's chunks at a time */
            memmove(c->ready, c->ready + c->rhead, c->rcount * sizeof *c->ready);
            c->rhead = 0;
        } else {
            size_t cap = c->rcap ? 2 * c->rcap : 16;
            ready_chunk *p = realloc(c->ready, cap * sizeof *p);
            if (p == NULL) {
                c->leases[f->slab].count--;
                return fail(c, SC_ENOMEM, "out of memory");
            }
            c->ready = p;
            c->rcap = cap;
        }
    }
    if (c->jumped) {
        c->jumped = false;
        flags |= SC_FLAG_DISCONTINUITY;
    }
    c->ready[c->rhead + c->rcount++] = (ready_chunk){
        .seq = seq, .index = start, .n = length, .offset = (uint64_t)at, .t0 = t0,
        .slab = (uint32_t)f->slab, .flags = flags};
    return SC_OK;
}

/* A chunk the rechunker completed in the current frame (its emit_fn). */
static int cut_chunk(sc_client *c, uint64_t start, uint64_t length, double t0)
{
    frame_place f = {.index = c->fr_index, .offset = c->fr_offset, .slab = c->fr_slab, .gen = c->fr_gen};
    return cut_chunk_of(c, &f, start, length, t0, 0);
}

/* The samples gathered towards the next chunk, up to the last frame cut, as one partial chunk (SC_FLAG_PARTIAL)
 * in that frame's slab (LocalReceiver._cut_partial); nothing if there are none. */
static int cut_partial(sc_client *c)
{
    if (!c->rk.has_start || c->rk.start >= c->cursor)
        return SC_OK;
    uint64_t start = c->rk.start;
    c->rk.has_start = false;
    /* (placed by the last frame cut: it ends at stream index cursor, byte last_end) */
    frame_place last = {.index = c->cursor, .offset = c->last_end, .slab = c->last_slab, .gen = c->last_gen};
    return cut_chunk_of(c, &last, start, c->cursor - start, c->rk.t0, SC_FLAG_PARTIAL);
}

/* At the stream's end, with partial_tail: the unfinished chunk as one partial chunk, once (LocalReceiver._cut_tail). */
static int cut_tail(sc_client *c)
{
    if (!c->partial || c->tail_cut)
        return SC_OK;
    c->tail_cut = true;
    int rc = cut_partial(c);
    if (rc == SC_OK && c->cut_rc != SC_OK) {
        rc = c->cut_rc;
        c->cut_rc = SC_OK;
    }
    return rc;
}

/* Cut the chunks of the next frame of the current run (version 2: notice) (LocalReceiver._step): one frame
 * at a time, so that a drop subscriber's max_inflight counts the chunks it holds, not those of a whole run. */
static int step(sc_client *c)
{
    if (c->fr_i == 0) {
        if (c->fr_flags & SC_FLAG_DISCONTINUITY) {
            if (c->partial && c->cursor == c->fr_index) {
                /* What was gathered before the jump, as a partial chunk (rule 8): nothing is lost. */
                int rc = cut_partial(c);
                if (rc)
                    return rc;
            }
            c->rk.has_start = false;
            c->jumped = true;
        }
        if (c->rk.has_start && c->rk.start < c->fr_floor) {
            /* The slab's carry does not reach back that far; the broker makes this impossible for
             * every subscription it knew of at the slab change.  Skip, and flag the jump. */
            if (c->rk.rate != 0.0)
                c->rk.t0 += (double)(c->fr_floor - c->rk.start) / c->rk.rate;
            c->rk.start = c->fr_floor;
            c->jumped = true;
        }
        if ((int64_t)c->fr_slab != c->cur_slab) {
            c->cur_slab = (int64_t)c->fr_slab;
            unlock_idle(c, c->cur_slab);
        }
    }
    uint64_t n = c->fr_n[c->fr_i];
    int rc = rechunk_feed(&c->rk, c->fr_index, n, c->fr_t0[c->fr_i], cut_chunk, c);
    c->cursor = c->fr_index + n;
    c->last_slab = c->fr_slab;
    c->last_gen = c->fr_gen;
    c->last_end = c->fr_offset + n * c->info.sample_bytes;
    if (c->fr_i + 1 < c->fr_count) {
        c->fr_index += n;
        c->fr_offset += n * c->info.sample_bytes;
        c->fr_i++;
    } else {
        c->have_frames = false;
        if (c->acked_slab != (int64_t)c->fr_slab)
            send_ack(c, false, false);  /* the broker may free the slab we left */
    }
    if (rc == SC_OK && c->cut_rc != SC_OK) {
        rc = c->cut_rc;
        c->cut_rc = SC_OK;
    }
    return rc;
}

/* A NOTICE_END: the stream ended after `head` samples (its last notice before it). */
static int notice_end(sc_client *c, const msgview *m)
{
    uint64_t head = 0;
    int rc;
    if ((rc = need_fields(c, m, SCW_NOTICE_END_REQUIRED)) ||
        (rc = field_text(c, m, AT(NOTICE_END, CODE), c->end_code_s, sizeof c->end_code_s)) ||
        (rc = field_text(c, m, AT(NOTICE_END, MESSAGE), c->end_text, sizeof c->end_text)) ||
        (rc = field_uint(c, m, AT(NOTICE_END, HEAD), &head)))
        return rc;
    c->end_head = head;
    c->have_end = true;
    c->end_seen = now_ms();
    return SC_OK;
}

/* One message from the notice socket (LocalReceiver._on_notice).  Version 3: a NOTICE only says the ring's
 * position moved (its contents are not read: the ring has them), a NOTICE_END that the stream ended.
 * Version 2: a NOTICE becomes the frames to cut, a NOTICE_END the stream's end. */
static int on_notice(sc_client *c, const unsigned char *data, size_t len)
{
    /* A doorbell we take means the publisher saw our sleeper byte's value: the next value must differ, or its
     * next look, seeing the value it already rang for, would not ring again (docs/protocol.md 7.8). */
    c->armed_rseq = UINT64_MAX;
    if (len < c->topic_len || memcmp(data, c->topic, c->topic_len) != 0)
        return SC_OK;  /* a JOINED of another subscriber's token */
    size_t off = 0, body = len - c->topic_len;
    const unsigned char *raw = data + c->topic_len;
    /* Version 3: a NOTICE (a msgpack fixarray whose first element, the kind, is a one-byte uint) is a
     * doorbell: skipped undecoded. */
    if (c->ring && body >= 2 && (raw[0] & 0xf0) == 0x90 && raw[1] == SCW_NOTICE)
        return SC_OK;
    msgpack_unpack_return r = msgpack_unpack_next(&c->nunp, (const char *)data + c->topic_len, body, &off);
    if (r == MSGPACK_UNPACK_NOMEM_ERROR)
        return fail(c, SC_ENOMEM, "out of memory decoding a %zu-byte notice (%s)", body, c->where);
    const msgpack_object *o = &c->nunp.data;
    if (r != MSGPACK_UNPACK_SUCCESS || off != body || o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size == 0 ||
        o->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return fail(c, SC_EPROTO, "expected a msgpack array starting with a uint kind after the topic, got %zu "
                    "undecodable bytes on the notice socket %s (%s)", body, c->endpoint, c->where);
    const msgview m = {.kind = o->via.array.ptr[0].via.u64, .a = o->via.array.ptr, .nf = o->via.array.size - 1};
    _Static_assert(SCW_NOTICE_STREAM_ID == SCW_NOTICE_END_STREAM_ID && SCW_NOTICE_NOTICE_SEQ == SCW_NOTICE_END_NOTICE_SEQ,
                   "NOTICE and NOTICE_END start alike");
    if (!field_is(&m, SCW_NOTICE_STREAM_ID, MSGPACK_OBJECT_POSITIVE_INTEGER) || m.a[SCW_NOTICE_STREAM_ID].via.u64 != c->sid)
        return SC_OK;  /* an earlier stream of the same name */
    if (c->ring) {
        if (m.kind == SCW_NOTICE_END)
            return c->have_end ? SC_OK : notice_end(c, &m);  /* (END from the broker may have said it first) */
        if (m.kind == SCW_NOTICE)
            return SC_OK;
        return fail(c, SC_EPROTO, "unexpected %s (kind %llu) on the notice socket %s (%s)", kind_name(m.kind),
                    (unsigned long long)m.kind, c->endpoint, c->where);
    }
    uint64_t seq = 0;
    int rc;
    if ((rc = need_fields(c, &m, SCW_NOTICE_NOTICE_SEQ)) || (rc = field_uint(c, &m, AT(NOTICE, NOTICE_SEQ), &seq)))
        return rc;
    if (c->nseq >= 0 && seq < (uint64_t)c->nseq)
        return SC_OK;  /* duplicate or stale */
    unsigned flags = 0;
    bool first = c->nseq < 0;
    if (!first && seq > (uint64_t)c->nseq)
        flags = SC_FLAG_DISCONTINUITY;  /* notices were lost on the way: never cut across the hole */
    c->nseq = (int64_t)seq + 1;
    c->last_notice = now_ms();
    if (m.kind == SCW_NOTICE_END) {
        if ((rc = notice_end(c, &m)))
            return rc;
        /* The end, in order, with no frame notice since we joined: the frames up to `head` were all noticed
         * before (a FRAME may reach the broker after our ATTACH): not ours, not lost. */
        if (first && c->end_head > c->cursor)
            c->cursor = c->end_head;
        return SC_OK;
    }
    if (m.kind != SCW_NOTICE)
        return fail(c, SC_EPROTO, "unexpected %s (kind %llu) on the notice socket %s (%s)", kind_name(m.kind),
                    (unsigned long long)m.kind, c->endpoint, c->where);
    uint64_t index = 0, slab = 0, gen = 0, offset = 0, jump = 0, floor = 0;
    if ((rc = need_fields(c, &m, SCW_NOTICE_REQUIRED)) || (rc = field_uint(c, &m, AT(NOTICE, INDEX), &index)) ||
        (rc = field_uint(c, &m, AT(NOTICE, SLAB), &slab)) || (rc = field_uint(c, &m, AT(NOTICE, GEN), &gen)) ||
        (rc = field_uint(c, &m, AT(NOTICE, OFFSET), &offset)) || (rc = field_uint(c, &m, AT(NOTICE, FLAGS), &jump)) ||
        (rc = field_uint(c, &m, AT(NOTICE, FLOOR), &floor)))
        return rc;
    if (index < c->cursor)
        return SC_OK;  /* written before this subscription started */
    const msgpack_object *ns = &m.a[SCW_NOTICE_N], *ts = &m.a[SCW_NOTICE_T0];
    uint32_t count = 1;
    bool batch = ns->type == MSGPACK_OBJECT_ARRAY;
    if (batch) {
        count = ns->via.array.size;
        if (count == 0 || ts->type != MSGPACK_OBJECT_ARRAY || ts->via.array.size != count)
            return fail(c, SC_EPROTO, "NOTICE fields %d and %d (n, t0) must be arrays of the same non-zero length, "
                        "or a uint and a number (%s)", SCW_NOTICE_N, SCW_NOTICE_T0, c->where);
    }
    if ((rc = grow_frames(c, count)))
        return rc;
    uint64_t total = 0;
    size_t sb = c->info.sample_bytes;
    for (uint32_t i = 0; i < count; i++) {
        const msgpack_object *on = batch ? &ns->via.array.ptr[i] : ns, *ot = batch ? &ts->via.array.ptr[i] : ts;
        if ((rc = obj_uint(c, on, m.kind, AT(NOTICE, N), &c->fr_n[i])) ||
            (rc = obj_num(c, ot, m.kind, AT(NOTICE, T0), &c->fr_t0[i])))
            return rc;
        if (c->fr_n[i] < 1 || c->fr_n[i] > c->slab_bytes / sb)
            return fail(c, SC_EPROTO, "NOTICE frame of %llu samples: not 1..%llu (%s)",
                        (unsigned long long)c->fr_n[i], (unsigned long long)(c->slab_bytes / sb), c->where);
        total += c->fr_n[i];
    }
    uint64_t slab_start = c->header_bytes + slab * c->slab_bytes;
    if (slab >= c->nslabs || gen > UINT32_MAX || floor > index || offset < slab_start ||
        offset > slab_start + c->slab_bytes || total > (slab_start + c->slab_bytes - offset) / sb)
        return fail(c, SC_EPROTO,
                    "NOTICE of %llu samples at index %llu, slab %llu (gen %llu), offset %llu, floor %llu does not lie "
                    "in the segment's %u slabs of %llu bytes (%s)", (unsigned long long)total,
                    (unsigned long long)index, (unsigned long long)slab, (unsigned long long)gen,
                    (unsigned long long)offset, (unsigned long long)floor, c->nslabs,
                    (unsigned long long)c->slab_bytes, c->where);
    c->have_frames = true;
    c->fr_index = index;
    c->fr_slab = slab;
    c->fr_gen = gen;
    c->fr_offset = offset;
    c->fr_floor = floor;
    c->fr_i = 0;
    c->fr_count = count;
    /* A gap before the first notice is no loss (a frame noticed just before our notice socket joined may
     * reach the broker after our ATTACH): we start at the first frame we are told of. */
    uint64_t lost = index > c->cursor && !first ? c->cursor : index;
    if (lost < index) {
        flags = SC_FLAG_DISCONTINUITY;  /* samples whose notices were lost: name them (policy block) */
        c->cursor = index;
    }
    c->fr_flags = flags | (unsigned)(jump & SC_FLAG_DISCONTINUITY);
    if (lost < index && !c->drop)
        return fail(c, SC_ELOST, "samples %llu..%llu (%llu samples) were lost before this subscriber read them: "
                    "their notices never reached it (%s)", (unsigned long long)lost, (unsigned long long)index,
                    (unsigned long long)(index - lost), c->where);
    return SC_OK;
}

/* Take the message waiting on the notice socket, if any: SC_OK (handled), SC_ETIMEOUT (none), or an error. */
static int recv_notice(sc_client *c)
{
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, c->notices, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&msg);
        int e = zmq_errno();
        if (e == EAGAIN || e == EINTR)
            return SC_ETIMEOUT;
        return fail(c, SC_ESYS, "cannot receive from the notice socket %s: %s (%s)", c->endpoint, zmq_strerror(e),
                    c->where);
    }
    int more = zmq_msg_more(&msg);
    int rc = on_notice(c, zmq_msg_data(&msg), zmq_msg_size(&msg));
    zmq_msg_close(&msg);
    skip_parts(c->notices, more); /* notices are one part; a stray second one is skipped */
    return rc;
}

/* A message from the broker on our own connection (Subscriber._on_direct). */
static int on_direct(sc_client *c, const msgview *m)
{
    if (m->kind == SCW_SYNCED)
        return SC_OK;
    if (m->kind == SCW_END && field_is(m, SCW_END_CODE, MSGPACK_OBJECT_STR) &&
        field_is(m, SCW_END_HEAD, MSGPACK_OBJECT_POSITIVE_INTEGER)) {
        char code[64] = "";
        field_text(c, m, AT(END, CODE), code, sizeof code);
        if (strcmp(code, SCW_END_CLOSED) == 0 || strcmp(code, SCW_END_PUBLISHER_GONE) == 0) {
            /* The stream ended: finish what its notices hold first (they may still be on their way). */
            if (!c->have_end) {
                char text[768] = "";
                if (field_is(m, SCW_END_MESSAGE, MSGPACK_OBJECT_STR))
                    field_text(c, m, AT(END, MESSAGE), text, sizeof text);
                snprintf(c->end_code_s, sizeof c->end_code_s, "%s", code);
                snprintf(c->end_text, sizeof c->end_text, "%s", text);
                c->end_head = m->a[SCW_END_HEAD].via.u64;
                c->have_end = true;
                c->end_seen = now_ms();
            }
            return SC_OK;
        }
    }
    if (m->kind == SCW_END)
        return take_end(c, m);  /* evicted, broker-shutdown, ...: sticky */
    if (m->kind == SCW_ERROR)
        return broker_error(c, m);
    return fail(c, SC_EPROTO, "unexpected %s (kind %llu) from the broker (%s)", kind_name(m->kind),
                (unsigned long long)m->kind, c->where);
}

/* Everything the stream held is cut (or its publisher died with notices unsent): report its end. */
static int finish_end(sc_client *c)
{
    /* (Its END came before any death of the broker: whatever became of the broker since, the stream is complete
     * here: a clean end, as Python's.) */
    send_ack(c, true, false);
    c->stats.cut = c->next_seq;
    return end_from(c, c->end_code_s, c->end_text);
}

/* ......................................... version 3: the descriptor ring */

/*
 * Memory order (core/ring.py's "Order", for C on any architecture).  The publisher stores a frame's samples,
 * then its descriptor, then the position (seq + 1).  We load the position with __ATOMIC_ACQUIRE, then the
 * descriptors below it, then the samples they name.  An acquire load is ordered before every later load
 * of this thread on every architecture: on ARM64 it is an LDAR, which no later load may pass; on x86-64
 * loads are never reordered with each other, and the acquire only stops the compiler.  So a descriptor or
 * sample we read is the one stored before the position we loaded, given a publisher whose position store
 * is a release store (on x86-64 any store is: TSO keeps stores in order; the Python publisher relies on
 * that, and so, on ARM64, would need a release store there).  The Python reader's plain loads are correct
 * on x86-64 only: ARM64 may satisfy a later load (a descriptor) before an earlier one (the position).
 *
 * Lapping (a drop subscriber that fell a whole ring behind): we copy descriptors a..b with relaxed loads
 * (they may be being overwritten meanwhile), make an acquire fence (on ARM64 a DMB ISHLD: no later load
 * passes the copy's loads), then load the position again.  The publisher stores position a + slots
 * before it starts writing slot a again, so a copy followed by a position below a + slots holds no byte
 * of a later lap (Aeron's check), given a publisher that orders that position store before its next
 * descriptor stores (x86-64's TSO does; on ARM64 a release fence between them).
 */

/* Copy descriptors a..b of the ring into `out` (relaxed 8-byte loads: a racing writer is detected after). */
static void copy_descriptors(const sc_client *c, uint64_t a, uint64_t b, ring_desc *out)
{
    uint64_t mask = c->ring_slots - 1;
    for (uint64_t s = a; s < b; s++) {
        const uint64_t *slot = (const uint64_t *)(c->ring_base + (s & mask) * DESC_BYTES);
        uint64_t w[DESC_BYTES / 8];
        for (size_t k = 0; k < DESC_BYTES / 8; k++)
            w[k] = __atomic_load_n(slot + k, __ATOMIC_RELAXED);
        memcpy(out++, w, sizeof w);
    }
}

/* Copy the descriptors published since we last looked (at most rd_cap) into rd (LocalReceiver._read_ring):
 * 1 if the ring moved on (descriptors copied, or lapped), 0 if not, or an error. */
static int read_ring(sc_client *c)
{
    uint64_t a = c->rseq, position = __atomic_load_n(c->position, __ATOMIC_ACQUIRE);
    if (position == a)
        return 0;
    if (position < a)
        return fail(c, SC_EPROTO, "the ring's position is %llu, below descriptor %llu, which this subscriber "
                    "was told to start at or has read (%s)", (unsigned long long)position, (unsigned long long)a,
                    c->where);
    if (position - a < c->ring_slots) {
        uint64_t b = position - a > c->rd_cap ? a + c->rd_cap : position;
        copy_descriptors(c, a, b, c->rd);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        position = __atomic_load_n(c->position, __ATOMIC_RELAXED);
        if (position - a < c->ring_slots) {
            c->rd_seq = a;
            c->rd_head = 0;
            c->rd_count = (uint32_t)(b - a);
            c->rseq = b;
            return 1;
        }
    }
    /* Lapped: only a drop subscriber (a block subscriber holds back the slabs it has not read, and so their
     * descriptors).  Go on with the newest half of the ring; take_run names the samples in between. */
    c->rseq = position - c->ring_slots / 2;
    return 1;
}

/* Check descriptor rd[i] as copied: a wrong one comes from a broken publisher, never from a race. */
static int check_descriptor(sc_client *c, uint32_t i)
{
    const ring_desc *d = &c->rd[i];
    uint64_t seq = c->rd_seq + i;
    if (d->seq != seq)
        return fail(c, SC_EPROTO, "ring descriptor %llu says it is descriptor %llu: the publisher did not write it "
                    "where its position says (%s)", (unsigned long long)seq, (unsigned long long)d->seq, c->where);
    size_t sb = c->info.sample_bytes;
    uint64_t slab_start = c->header_bytes + (uint64_t)d->slab * c->slab_bytes;
    if (d->slab >= c->nslabs || d->n < 1 || d->floor > d->index || d->offset < slab_start ||
        d->offset > slab_start + c->slab_bytes || d->n > (slab_start + c->slab_bytes - d->offset) / sb)
        return fail(c, SC_EPROTO,
                    "ring descriptor %llu of %u samples at index %llu, slab %u (gen %u), offset %llu, floor %llu "
                    "does not lie in the segment's %u slabs of %llu bytes (%s)", (unsigned long long)seq, d->n,
                    (unsigned long long)d->index, d->slab, d->gen, (unsigned long long)d->offset,
                    (unsigned long long)d->floor, c->nslabs, (unsigned long long)c->slab_bytes, c->where);
    return SC_OK;
}

/* Samples start..stop will never come: a drop subscriber counts their chunks (rounded up) as dropped,
 * a block subscriber is told (SC_ELOST; the next sc_recv goes on after them).  The next chunk is flagged. */
static int lost(sc_client *c, uint64_t start, uint64_t stop, const char *why)
{
    c->jumped = true;
    if (c->drop) {
        c->dropped += (stop - start + c->info.size - 1) / c->info.size;
        return SC_OK;
    }
    int rc = evicted(c);
    if (rc)
        return rc;
    return fail(c, SC_ELOST, "samples %llu..%llu (%llu samples) were lost before this subscriber read them: %s (%s)",
                (unsigned long long)start, (unsigned long long)stop, (unsigned long long)(stop - start), why,
                c->where);
}

/* Make the next run of copied descriptors the frames to cut (fr_*): frames back to back in one slab of one
 * generation, none but the first flagged, cut as one notice batch was (version 2). */
static int take_run(sc_client *c)
{
    int rc = check_descriptor(c, c->rd_head);
    if (rc)
        return rc;
    const ring_desc *d = &c->rd[c->rd_head++];
    if (d->index < c->cursor)
        return SC_OK;  /* before this subscription's start */
    size_t sb = c->info.sample_bytes;
    uint64_t index = d->index + d->n, end = d->offset + (uint64_t)d->n * sb;
    uint32_t count = 1;
    c->fr_n[0] = d->n;
    c->fr_t0[0] = d->t0;
    while (c->rd_head < c->rd_count) {
        const ring_desc *e = &c->rd[c->rd_head];
        if ((e->flags & SC_FLAG_DISCONTINUITY) || e->slab != d->slab || e->gen != d->gen || e->offset != end ||
            e->index != index)
            break;
        if ((rc = check_descriptor(c, c->rd_head)))
            return rc;
        c->rd_head++;
        c->fr_n[count] = e->n;
        c->fr_t0[count++] = e->t0;
        index += e->n;
        end += (uint64_t)e->n * sb;
    }
    c->have_frames = true;
    c->fr_index = d->index;
    c->fr_slab = d->slab;
    c->fr_gen = d->gen;
    c->fr_offset = d->offset;
    c->fr_floor = d->floor;
    c->fr_i = 0;
    c->fr_count = count;
    c->fr_flags = d->flags & SC_FLAG_DISCONTINUITY;
    if (d->index > c->cursor) {  /* lapped: the frames in between were written over before we read them */
        uint64_t start = c->cursor;
        c->cursor = d->index;
        c->fr_flags |= SC_FLAG_DISCONTINUITY;
        return lost(c, start, d->index, "the publisher wrote over their ring descriptors first");
    }
    return SC_OK;
}

/* Read every message waiting on the notice socket: how many, or an error. */
static int drain_notices(sc_client *c)
{
    for (int n = 0;; n++) {
        int rc = recv_notice(c);
        if (rc == SC_ETIMEOUT)
            return n;
        if (rc)
            return rc;
    }
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* The futex mask to sleep with, having read everything below position rseq (docs/protocol.md 10.7, wake targets):
 * that of the first position whose publish can complete our next chunk, or every bit when the next may, when that
 * depends on the frames' times (a pause in seconds, no rate) or when the publisher keeps no frame_max. */
static uint32_t wake_target(const sc_client *c)
{
    const rechunker *r = &c->rk;
    uint32_t frame_max = __atomic_load_n(c->frame_max, __ATOMIC_ACQUIRE);  /* (after the position) */
    if (r->pausing || frame_max == 0)
        return WAKE_ALL;
    uint64_t end = c->cursor;  /* everything read is cut: the index past the last frame */
    uint64_t start = r->has_start ? r->start : (r->pausing_at && r->pause_at > end ? r->pause_at : end);
    uint64_t need = start + r->size - end;
    if (need <= frame_max)
        return WAKE_ALL;
    uint64_t k = (need + frame_max - 1) / frame_max;
    return 1u << ((c->rseq + (k < 32 ? k : 32)) & 31);
}

/* FUTEX_WAIT on the position's low word as it was at rseq, for up to wait_ms, with `mask` (FUTEX_WAIT_BITSET and an
 * absolute CLOCK_MONOTONIC timeout) unless it is every bit; the system call's result (errno set). */
static long futex_sleep(const sc_client *c, uint32_t mask, long wait_ms)
{
    void *word = (void *)(uintptr_t)c->position;
    if (mask == WAKE_ALL) {
        struct timespec ts = {.tv_sec = wait_ms / 1000, .tv_nsec = (wait_ms % 1000) * 1000000L};
        return syscall(SYS_futex, word, FUTEX_WAIT, (uint32_t)c->rseq, &ts, NULL, 0);
    }
    struct timespec at;
    clock_gettime(CLOCK_MONOTONIC, &at);
    at.tv_sec += wait_ms / 1000;
    at.tv_nsec += (wait_ms % 1000) * 1000000L;
    if (at.tv_nsec >= 1000000000L) {
        at.tv_sec++;
        at.tv_nsec -= 1000000000L;
    }
    return syscall(SYS_futex, word, FUTEX_WAIT_BITSET, (uint32_t)c->rseq, &at, NULL, mask);
}

/* Asleep on the futex word with our byte in the futex sleeper table (docs/protocol.md 7.8): the byte (64 + b for the
 * wake target's mask 1 << b, 1 for every bit), a full barrier, the position again, then FUTEX_WAIT[_BITSET] on its low
 * word with that mask: a publish we did not see here sees our byte after its own barrier and makes a FUTEX_WAKE.  Woken with nothing to read: the broker
 * (its END, an eviction, a shutdown) may wake us before its message arrives (woken_idle). */
static int sleep_on_futex_word(sc_client *c, long wait_ms)
{
    unsigned char *mine = c->sleeper + SLEEPERS;
    int rc = SC_OK;
    uint32_t mask = wake_target(c);  /* (frame_max loaded before our byte: a frame that raises it wakes every bit) */
    __atomic_store_n(mine, mask == WAKE_ALL ? 1 : (unsigned char)(SLEEPER_BIT + __builtin_ctz(mask)),
                     __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(c->position, __ATOMIC_RELAXED) == c->rseq &&
        __atomic_load_n(c->closed, __ATOMIC_ACQUIRE) == 0) {
        if (futex_sleep(c, mask, wait_ms) == 0)
            c->woken_idle = __atomic_load_n(c->position, __ATOMIC_RELAXED) == c->rseq;
        else if (errno != ETIMEDOUT && errno != EAGAIN && errno != EINTR)
            rc = fail(c, SC_ESYS, "FUTEX_WAIT on the ring's position failed: %s (%s)", strerror(errno), c->where);
    }
    __atomic_store_n(mine, 0, __ATOMIC_RELAXED);
    return rc;
}

/* Wait up to `wait_ms` for the ring's position to move past rseq, by this subscriber's wake strategy, or for
 * a message; the caller looks at everything again either way. */
static int wait_ring(sc_client *c, long wait_ms)
{
    /* A closed ring (or a known end) will not move: then only a message can come (NOTICE_END, END). */
    bool may_move = !c->have_end && __atomic_load_n(c->closed, __ATOMIC_ACQUIRE) == 0;
    if (c->wake == WAKE_FUTEX && may_move && c->futex_table && c->sleeper != NULL)
        return sleep_on_futex_word(c, wait_ms);  /* (our byte in the futex sleeper table: ATTACH futex_sleeper) */
    if (c->wake == WAKE_FUTEX && may_move) {
        /* The kernel compares the position's low word with what we read and sleeps in one step, with respect
         * to the publisher's FUTEX_WAKE after each store of the position: a publish after our look wakes us
         * (or the word differs and we do not sleep).  Shared, not FUTEX_PRIVATE_FLAG: the waker is another
         * process.  The broker's FUTEX_WAKE at the stream's end wakes us too; anything else (eviction, the
         * broker gone) is seen when the wait times out. */
        if (futex_sleep(c, wake_target(c), wait_ms) != 0 && errno != ETIMEDOUT && errno != EAGAIN && errno != EINTR)
            return fail(c, SC_ESYS, "FUTEX_WAIT on the ring's position failed: %s (%s)", strerror(errno), c->where);
        return SC_OK;
    }
    if (c->wake == WAKE_BUSY && may_move) {
        int64_t until = now_ms() + wait_ms;
        for (unsigned k = 1;; k++) {
            if (__atomic_load_n(c->position, __ATOMIC_RELAXED) != c->rseq)
                return SC_OK;  /* (read_ring loads it again, with acquire) */
            cpu_relax();
            if ((k & 1023) == 0 && now_ms() >= until)
                return SC_OK;
        }
    }
    bool poll_sockets = c->woken_idle;
    c->woken_idle = false;
    if (c->sleeper != NULL && may_move && !poll_sockets && __atomic_load_n(c->sleep_futex, __ATOMIC_RELAXED) == 1) {
        /* The doorbell in a blocking call, once the publisher wakes futex sleepers (docs/protocol.md 7.8): our
         * byte in the futex sleeper table, a full barrier, the position again, then FUTEX_WAIT on its low word
         * (as the futex strategy does): a publish we did not see here sees our byte after its own barrier and
         * makes a FUTEX_WAKE, with no ZeroMQ hop on the way.  (sc_recv without waiting, for an event loop on
         * sc_fd, keeps the notice: it never comes here.)  The broker wakes us when it ends the stream, evicts
         * us or shuts down, maybe before its END arrives: woken with nothing to read, the next wait polls the
         * sockets.  Its death (kill -9) is seen when the wait times out (LOOK_MS), as with wake=futex. */
        return sleep_on_futex_word(c, wait_ms);
    }
    /* The doorbell.  With a byte in the sleeper table (docs/protocol.md 7.8): set it, a full barrier, load the
     * position again; the publisher stores the position, makes a full barrier and looks at the table: either we
     * see its position here or it sees our byte and sends a notice, which ends the poll (Dekker's handshake;
     * each barrier orders its side's store before its load, which no weaker order does, on x86-64 either).
     * Without one, every publish is followed by a notice.  We drained the notices, then loaded the position:
     * a publish we did not see has its notice still to come.  (NOTICE_END and the broker's END are messages
     * too.) */
    if (arm(c)) {
        disarm(c);
        return SC_OK;
    }
    zmq_pollitem_t items[3] = {
        {c->notices, 0, ZMQ_POLLIN, 0}, {c->sock, 0, ZMQ_POLLIN, 0}, {c->mon, 0, ZMQ_POLLIN, 0}};
    int polled = zmq_poll(items, 3, wait_ms);
    disarm(c);
    if (polled < 0 && zmq_errno() != EINTR)
        return fail(c, SC_ESYS, "cannot poll the sockets of %s: %s", c->where, zmq_strerror(zmq_errno()));
    return SC_OK;
}

/*
 * Version 3: run until a chunk is ready (SC_OK), the subscription ends (its sticky code), `deadline` passes
 * (SC_ETIMEOUT) or an error comes.  LocalReceiver.recv: cut what was copied, copy what the ring holds beyond
 * it, read the notices (they only wake us), look at the broker connection; before waiting, give back idle
 * slab locks and send ACK.  Once the end is known and the ring is read to its position, the ring held the
 * whole stream: samples short of the end's head are lost (only a lapped drop subscriber), no grace needed.
 */

/* Before a wait: handle one message from the broker on our connection (`*took`: the caller looks at
 * everything again), or find that the broker is gone.  Returns an error code, or SC_OK. */
static int look_at_broker(sc_client *c, bool *took)
{
    msgview m;
    int rc = recv_direct(c, &m);
    if (rc == SC_OK) {
        *took = true;
        return on_direct(c, &m);
    }
    if (rc != SC_ETIMEOUT)
        return rc;
    read_monitor(c);
    if (c->gone)
        return end_with(c, fail(c, SC_EBROKERGONE, "the broker at %s is gone (its connection dropped) (%s)",
                                c->address, c->where));
    return SC_OK;
}

static int pump_ring(sc_client *c, int64_t deadline)
{
    disarm(c);  /* (set by the last call that found nothing: an event loop slept on sc_fd) */
    for (;;) {
        int rc;
        if (c->rcount > 0)
            return SC_OK;
        if (c->have_frames) {
            if ((rc = step(c)))
                return rc;
            continue;
        }
        if (c->rd_head < c->rd_count) {
            if ((rc = take_run(c)))
                return rc;
            continue;
        }
        /* The notices first (they only say the position moved; a NOTICE_END, that the stream ended), then the
         * position: a publish after this load has its notice still to come, which ends the doorbell's wait. */
        if ((rc = drain_notices(c)) < 0)
            return rc;
        if ((rc = read_ring(c)) != 0) {
            if (rc < 0)
                return rc;
            continue;
        }
        if (c->have_end) {
            if ((rc = cut_tail(c)))
                return rc;
            if (c->rcount > 0)
                continue;  /* (the end's partial chunk first) */
            if (c->cursor < c->end_head) {
                uint64_t start = c->cursor;
                c->cursor = c->end_head;
                if ((rc = lost(c, start, c->end_head, "the stream ended and the ring did not hold them")))
                    return rc;
                continue;
            }
            return finish_end(c);
        }
        bool took = false;
        if ((rc = look_at_broker(c, &took)))
            return rc;
        if (took)
            continue;
        /* About to wait: give back every slab no chunk of ours is in, tell the broker where we are. */
        unlock_idle(c, c->cur_slab);
        send_ack(c, false, true);
        long wait = LOOK_MS;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0) {
                /* Nothing now.  Whoever waits next (an event loop, on sc_fd) is woken by the next publish: our
                 * sleeper byte stays set until the next call (LocalReceiver.recv's _arm). */
                if (arm(c) || !sockets_quiet(c)) {
                    disarm(c);
                    continue;
                }
                return SC_ETIMEOUT;
            }
            if (left < wait)
                wait = (long)left;
        }
        if ((rc = wait_ring(c, wait)))
            return rc;
    }
}

/*
 * Version 2: run until a chunk is ready (SC_OK), the subscription ends (its sticky code), `deadline`
 * passes (SC_ETIMEOUT) or an error comes.  Subscriber._recv_local: cut what was read, read notices, look
 * at the broker connection; before waiting, give back idle slab locks and send ACK.
 */
static int pump_notices(sc_client *c, int64_t deadline)
{
    for (;;) {
        if (c->rcount > 0)
            return SC_OK;
        if (c->have_frames) {
            int rc = step(c);
            if (rc)
                return rc;
            continue;
        }
        if (c->have_end && c->cursor >= c->end_head) {
            int rc = cut_tail(c);
            if (rc)
                return rc;
            if (c->rcount > 0)
                continue;  /* (the end's partial chunk first) */
            return finish_end(c);
        }
        int rc = recv_notice(c);
        if (rc != SC_ETIMEOUT) {
            if (rc)
                return rc;
            continue;
        }
        bool took = false;
        if ((rc = look_at_broker(c, &took)))
            return rc;
        if (took)
            continue;
        int64_t now = now_ms();
        if (c->have_end) {
            /* No notice is waiting: end once none came for END_GRACE_MS (a publisher that died may
             * have taken some with it). */
            int64_t quiet = now - (c->last_notice > c->end_seen ? c->last_notice : c->end_seen);
            if (quiet > END_GRACE_MS) {
                if ((rc = cut_tail(c)))
                    return rc;
                if (c->rcount > 0)
                    continue;  /* (the end's partial chunk first) */
                if (c->cursor < c->end_head && !c->drop && strcmp(c->end_code_s, SCW_END_CLOSED) == 0) {
                    /* A clean end after a hole is impossible: name the samples that never came. */
                    uint64_t start = c->cursor;
                    c->cursor = c->end_head;
                    return fail(c, SC_ELOST, "samples %llu..%llu (%llu samples) of the stream were lost before "
                                "this subscriber read them: their notices never reached it (%s)",
                                (unsigned long long)start, (unsigned long long)c->end_head,
                                (unsigned long long)(c->end_head - start), c->where);
                }
                return finish_end(c);
            }
        }
        /* About to wait: give back what is no longer needed, tell the broker where we are. */
        unlock_idle(c, c->cur_slab);
        send_ack(c, false, true);
        long wait = LOOK_MS;
        if (deadline >= 0) {
            int64_t left = deadline - now;
            if (left <= 0) {
                if (!sockets_quiet(c))
                    continue;  /* (a message came meanwhile: take it; see sc_fd) */
                return SC_ETIMEOUT;
            }
            if (left < wait)
                wait = (long)left;
        }
        zmq_pollitem_t items[3] = {
            {c->notices, 0, ZMQ_POLLIN, 0}, {c->sock, 0, ZMQ_POLLIN, 0}, {c->mon, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 3, wait) < 0 && zmq_errno() != EINTR)
            return fail(c, SC_ESYS, "cannot poll the sockets of %s: %s", c->where, zmq_strerror(zmq_errno()));
    }
}

/* Versions 2 and 3: cut chunks until one is ready, the subscription ends or `deadline` passes. */
static int pump(sc_client *c, int64_t deadline)
{
    return c->ring ? pump_ring(c, deadline) : pump_notices(c, deadline);
}

/* The time of the sample at segment byte `offset` (docs/protocol.md 7.5): that of sample slot k of slab i is
 * at times_offset + 8 * (i * (slab_bytes / sample_bytes) + k); a chunk's are consecutive (one slab). */
static const double *time_of(const sc_client *c, uint64_t offset)
{
    uint64_t sb = c->info.sample_bytes, within = offset - c->header_bytes;
    uint64_t slab = within / c->slab_bytes, k = within % c->slab_bytes / sb;
    return (const double *)(c->map + c->times_offset + 8 * (slab * (c->slab_bytes / sb) + k));
}

/* Hand out the oldest chunk cut (Subscriber._hand_out). */
static int hand_out(sc_client *c, sc_chunk *chunk)
{
    int rc = grow_held(c);
    if (rc)
        return rc;
    ready_chunk r = c->ready[c->rhead++];
    if (--c->rcount == 0)
        c->rhead = 0;
    c->held[c->nheld++] = (held_chunk){.seq = r.seq, .slab = r.slab};
    chunk->data = c->map + r.offset;
    chunk->n = r.n;
    chunk->nbytes = (size_t)r.n * c->info.sample_bytes;
    chunk->dtype = c->dtype;
    chunk->channels = c->info.channels;
    chunk->t0 = r.t0;
    chunk->seq = r.seq;
    chunk->index = r.index;
    chunk->flags = r.flags;
    chunk->times = c->timestamps ? time_of(c, r.offset) : NULL;
    c->stats.received++;
    c->stats.last_seq = (int64_t)r.seq;
    return SC_OK;
}

static int recv_chunk(sc_client *c, sc_chunk *chunk, int timeout_ms)
{
    if (!c->subscribed)
        return fail(c, SC_EINVAL, "sc_recv needs a subscription (call sc_subscribe first)");
    if (c->end_code) {
        memcpy(c->err, c->end_msg, sizeof c->err);
        return c->end_code;
    }
    int64_t deadline = deadline_for(timeout_ms);
    if (!c->local)
        return recv_v1(c, chunk, deadline);
    /* Counters and cursor for `slabcast status` (every COUNTS_INTERVAL_MS at most, send_ack decides), also for
     * a subscriber behind, which never waits: they went only before a wait or at a slab change, and a C
     * subscriber holding the publisher back showed `delivered 0` meanwhile (Python's recv does the same).  Not a
     * slab change's or a lock's ACK: that goes once the run is cut (pump). */
    if (c->cur_slab == c->acked_slab && !c->unlocked)
        send_ack(c, false, false);
    /* The broker's word (END evicted above all), also for a subscriber behind, which always has a chunk to hand
     * out and never waits: evicted, one that went on taking chunks kept leasing slabs and held the publisher back
     * as before (Python's recv does the same).  Messages only: the ring, not a dropped connection, says what is
     * left to read. */
    int64_t now = now_ms();
    if (now >= c->direct_due) {
        c->direct_due = now + LOOK_MS;
        for (;;) {
            msgview m;
            int got = recv_direct(c, &m);
            if (got == SC_ETIMEOUT)
                break;
            if (got || (got = on_direct(c, &m)))
                return got;
        }
    }
    int rc = pump(c, deadline);
    if (rc)
        return rc;
    return hand_out(c, chunk);
}

/* Copy the first `size` bytes of a struct the library filled (`full`, `full_size` bytes, struct_size
 * first) to the caller's, zero the caller's bytes past ours, and record in struct_size what we filled. */
static void copy_out(void *dst, size_t size, const void *full, size_t full_size)
{
    size_t n = size < full_size ? size : full_size;
    memcpy(dst, full, n);
    if (size > full_size)
        memset((char *)dst + full_size, 0, size - full_size);
    memcpy(dst, &n, sizeof n);
}

int sc_recv_sized(sc_client *c, sc_chunk *chunk, size_t chunk_size, int timeout_ms)
{
    NEED_CLIENT(c);
    if (chunk == NULL || chunk_size < sizeof chunk->struct_size || chunk_size > 4096)
        return fail(c, SC_EINVAL,
                    "sc_recv needs a chunk and its size (sizeof(sc_chunk) = %zu in this library's header), got %s "
                    "of %zu bytes", sizeof *chunk, chunk ? "a chunk" : "NULL", chunk_size);
    sc_chunk full = {0};
    int rc = recv_chunk(c, &full, timeout_ms);
    if (rc == SC_OK)
        copy_out(chunk, chunk_size, &full, sizeof full);
    return rc;
}

int sc_wait(sc_client *c, int timeout_ms)
{
    NEED_CLIENT(c);
    if (c->sock == NULL)
        return fail(c, SC_EINVAL, "sc_wait needs a connected client");
    if (c->end_code || c->gone)
        return SC_OK;
    int64_t deadline = deadline_for(timeout_ms);
    if (c->local && c->subscribed) {
        int rc = pump(c, deadline);
        return c->end_code ? SC_OK : rc;  /* the end is for sc_recv to return */
    }
    for (;;) {
        zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {c->mon, 0, ZMQ_POLLIN, 0}};
        long wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            wait = left > 0 ? (long)left : 0;
        }
        keepalive(c);  /* (tcp://: say we live at least every second) */
        if (c->remote && (wait < 0 || wait > KEEPALIVE_MS))
            wait = KEEPALIVE_MS;
        int n = zmq_poll(items, 2, wait);
        if (n < 0 && zmq_errno() != EINTR)
            return fail(c, SC_ESYS, "cannot poll the connection to %s: %s", c->address, zmq_strerror(zmq_errno()));
        if (items[1].revents & ZMQ_POLLIN)
            read_monitor(c);
        if ((items[0].revents & ZMQ_POLLIN) || c->gone)
            return SC_OK;
        if (deadline >= 0 && now_ms() >= deadline)
            return SC_ETIMEOUT;
    }
}

/* An epoll instance holding the ZMQ_FD of our sockets: readable when one of them was signalled (slabcast.h, "waiting
 * in an event loop"). */
int sc_fd(sc_client *c)
{
    if (c == NULL)
        return SC_EINVAL;
    if (!c->subscribed)
        return fail(c, SC_EINVAL, "sc_fd needs a subscription (call sc_subscribe first)");
    if (c->ring && c->wake != WAKE_DOORBELL)
        return fail(c, SC_EINVAL, "sc_fd: a subscriber with wake '%s' sleeps on no descriptor (%s); subscribe with "
                    "wake \"doorbell\" (the default) to wait in an event loop (%s)", WAKE_NAMES[c->wake],
                    c->wake == WAKE_FUTEX ? "FUTEX_WAIT on the ring's position" : "it spins", c->where);
    if (c->epfd >= 0)
        return c->epfd;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        return fail(c, SC_ESYS, "sc_fd: epoll_create1 failed: %s (%s)", strerror(errno), c->where);
    void *socks[3] = {c->notices, c->sock, c->mon};
    for (unsigned i = 0; i < 3; i++) {
        int fd = -1;
        size_t len = sizeof fd;
        if (socks[i] == NULL)
            continue;
        if (zmq_getsockopt(socks[i], ZMQ_FD, &fd, &len) != 0) {
            close(ep);
            return fail(c, SC_ESYS, "sc_fd: cannot get a socket's ZMQ_FD: %s (%s)", zmq_strerror(zmq_errno()),
                        c->where);
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            int e = errno;
            close(ep);
            return fail(c, SC_ESYS, "sc_fd: cannot add a socket's descriptor to epoll: %s (%s)", strerror(e),
                        c->where);
        }
    }
    c->epfd = ep;
    return ep;
}

int sc_release_seq(sc_client *c, uint64_t seq)
{
    NEED_CLIENT(c);
    if (!c->subscribed)
        return fail(c, SC_EINVAL, "sc_release needs a subscription");
    size_t i = 0;
    while (i < c->nheld && c->held[i].seq != seq)
        i++;
    if (i == c->nheld)
        return fail(c, SC_EINVAL, "chunk seq=%llu is not held (never received, or released twice) (%s)",
                    (unsigned long long)seq, c->where);
    uint32_t slab = c->held[i].slab;
    if (c->held[i].payload != NULL) {  /* tcp://: the chunk's bytes */
        zmq_msg_close(c->held[i].payload);
        free(c->held[i].payload);
    }
    c->held[i] = c->held[--c->nheld];
    c->stats.released++;
    if (c->local) {
        /* No message: the slab's lock goes once no chunk of it is held, at the latest before the
         * next wait in sc_recv, and the ACK then sent says so. */
        c->leases[slab].count--;
        return SC_OK;
    }
    if (c->gone)  /* a dead broker holds no lease to give back */
        return SC_OK;
    _Static_assert(SCW_RELEASE_SEQS == 1 && SCW_RELEASE_PAUSES == 2 && SCW_RELEASE_FIELDS == 2,
                   "RELEASE is packed in this order");
    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk, 1 + SCW_RELEASE_FIELDS);
    msgpack_pack_uint64(&c->pk, SCW_RELEASE);
    msgpack_pack_array(&c->pk, 1);
    msgpack_pack_uint64(&c->pk, seq);
    msgpack_pack_array(&c->pk, 0);
    return send_packed(c, "RELEASE");
}

int sc_release(sc_client *c, const sc_chunk *chunk)
{
    NEED_CLIENT(c);
    if (chunk == NULL)
        return fail(c, SC_EINVAL, "sc_release: chunk is NULL");
    return sc_release_seq(c, chunk->seq);
}

void sc_get_stats_sized(const sc_client *c, sc_stats *out, size_t out_size)
{
    if (c == NULL || out == NULL || out_size < sizeof out->struct_size)
        return;
    sc_stats full = c->stats;
    full.struct_size = sizeof full;
    if (c->local) {
        full.dropped = c->dropped;
    } else {
        uint64_t cut = (uint64_t)(c->stats.last_seq + 1);
        if (c->stats.cut > cut)
            cut = c->stats.cut;
        full.dropped = cut > c->stats.received ? cut - c->stats.received : 0;
    }
    copy_out(out, out_size, &full, sizeof full);
}

/* ----------------------------------------------------------------- closing */

/* The memory sc_close frees, after the sockets and the context are gone (or, in a forked child, left alone). */
static void free_client(sc_client *c)
{
    if (c->epfd >= 0)
        close(c->epfd);
    if (c->map != NULL)
        munmap((void *)c->map, c->map_bytes);
    if (c->sleeper_map != NULL)
        munmap(c->sleeper_map, c->sleeper_map_bytes);
    free(c->meta_text);
    free(c->meta_ptrs);
    msgpack_unpacked_destroy(&c->unp);
    msgpack_unpacked_destroy(&c->nunp);
    msgpack_sbuffer_destroy(&c->sbuf);
    free(c->held);
    free(c->leases);
    free(c->locked);
    free(c->fr_n);
    free(c->fr_t0);
    free(c->ready);
    free(c->rd);
    free(c);
}

void sc_close(sc_client *c)
{
    if (c == NULL)
        return;
    disarm(c);  /* before BYE: the broker may give our sleeper byte to another subscriber once we left */
    if (c->notices != NULL)
        zmq_close(c->notices);  /* linger 0 */
    if (c->lock_fd >= 0)
        close(c->lock_fd);  /* the kernel drops every lease lock of ours with it, before we say BYE */
    if (c->connected && !c->gone) {
        /* BYE is answered by END bye once everything we sent before it was handled. */
        msgpack_sbuffer_clear(&c->sbuf);
        msgpack_pack_array(&c->pk, 1 + SCW_BYE_FIELDS);
        msgpack_pack_uint64(&c->pk, SCW_BYE);
        if (send_packed(c, "BYE") == SC_OK) {
            int64_t deadline = deadline_for(BYE_TIMEOUT_MS);
            msgview m;
            while (next_msg(c, deadline, &m) == SC_OK) {
                const msgpack_object *code = &m.a[SCW_END_CODE];
                if (m.kind == SCW_END && field_is(&m, SCW_END_CODE, MSGPACK_OBJECT_STR) &&
                    code->via.str.size == sizeof SCW_END_BYE - 1 &&
                    memcmp(code->via.str.ptr, SCW_END_BYE, sizeof SCW_END_BYE - 1) == 0)
                    break;
            }
        }
    }
    if (c->msg_live)
        zmq_msg_close(&c->msg);
    for (size_t i = 0; i < c->nheld; i++)  /* tcp://: the bytes of chunks still held */
        if (c->held[i].payload != NULL) {
            zmq_msg_close(c->held[i].payload);
            free(c->held[i].payload);
        }
    if (c->payload != NULL) {
        zmq_msg_close(c->payload);
        free(c->payload);
    }
    if (c->sock != NULL)
        zmq_socket_monitor(c->sock, NULL, 0);
    if (c->mon != NULL)
        zmq_close(c->mon);
    if (c->sock != NULL) {
        int linger = CLOSE_LINGER_MS;
        zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(c->sock);
    }
    if (c->ctx != NULL)
        zmq_ctx_term(c->ctx);
    unmap_sleepers(c);
    free_client(c);
}

void sci_forget(sc_client *c)
{
    if (c == NULL)
        return;
    if (c->lock_fd >= 0)
        close(c->lock_fd);  /* (the parent's descriptor still holds its lease locks) */
    for (size_t i = 0; i < c->nheld; i++)
        free(c->held[i].payload);  /* (the zmq_msg_t itself, never closed here) */
    free(c->payload);
    free_client(c);
}

/* ------------------------------------------- lent to publisher.c (internal.h) */

void *sci_context(sc_client *c) { return c->ctx; }
void *sci_socket(sc_client *c) { return c->sock; }
void *sci_monitor(sc_client *c) { return c->mon; }
const char *sci_address(const sc_client *c) { return c->address; }
int64_t sci_now_ms(void) { return now_ms(); }
const char *sci_kind_name(uint64_t kind) { return kind_name(kind); }
bool sci_valid_stream_name(const char *s) { return valid_stream_name(s); }
int sci_send_packed(sc_client *c, const char *what) { return send_packed(c, what); }
int sci_next_msg(sc_client *c, int64_t deadline_ms, msgview *m) { return next_msg(c, deadline_ms, m); }
int sci_broker_error(sc_client *c, const msgview *m) { return broker_error(c, m); }
int sci_need_fields(sc_client *c, const msgview *m, uint32_t need) { return need_fields(c, m, need); }

bool sci_gone(sc_client *c)
{
    if (!c->gone && c->mon != NULL)
        read_monitor(c);
    return c->gone;
}

void sci_set_where(sc_client *c, const char *where)
{
    snprintf(c->where, sizeof c->where, "%s", where);
}

msgpack_packer *sci_packer(sc_client *c)
{
    msgpack_sbuffer_clear(&c->sbuf);
    return &c->pk;
}

int sci_field_uint(sc_client *c, const msgview *m, unsigned pos, const char *name, uint64_t *out)
{
    return field_uint(c, m, pos, name, out);
}

int sci_field_str(sc_client *c, const msgview *m, unsigned pos, const char *name, char *buf, size_t cap)
{
    return field_str(c, m, pos, name, buf, cap);
}

int sci_field_text(sc_client *c, const msgview *m, unsigned pos, const char *name, char *buf, size_t cap)
{
    return field_text(c, m, pos, name, buf, cap);
}
