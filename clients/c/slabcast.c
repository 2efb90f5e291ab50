/* slabcast.c: a subscriber of the slabcast wire protocol version 1 over libzmq and msgpack-c. */
#define _POSIX_C_SOURCE 200809L

#include "slabcast.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <msgpack.h>
#include <zmq.h>

/* Message kinds (docs/protocol.md sections 4 and 5). */
enum {
    K_HELLO = 1, K_OPEN = 2, K_FRAME = 3, K_CLOSE = 4, K_SUBSCRIBE = 5, K_RELEASE = 6,
    K_BYE = 7, K_STATUS = 8, K_UNSUBSCRIBE = 9, K_SYNC = 10,
    K_WELCOME = 101, K_OPENED = 102, K_GRANT = 103, K_SUBSCRIBED = 104, K_CHUNK = 105,
    K_END = 106, K_ERROR = 107, K_STATUS_REPLY = 108, K_SYNCED = 109
};

#define FLAG_INLINE 2u           /* CHUNK bytes travel in a second frame: TCP clients only */
#define IPC_PATH_MAX 107         /* sun_path holds 108 bytes with the NUL */
#define MAX_INFLIGHT 1024
#define BYE_TIMEOUT_MS 1000      /* how long sc_close waits for END bye */
#define CLOSE_LINGER_MS 200      /* bounded linger when closing the socket */
#define DEFAULT_TIMEOUT_MS 5000

/* Segment header (docs/protocol.md 6.1), little-endian; only what we check is read. */
#define HDR_MAGIC 0              /* 8 bytes "SLABCAST" */
#define HDR_LAYOUT 8             /* u32, 2 (1 before the generation table; same fields for us) */
#define HDR_HEADER_BYTES 12      /* u32, where slab 0 starts */
#define HDR_SAMPLE_BYTES 28      /* u32, dtype size * channels */
#define HDR_MIN_BYTES 136

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
    uint64_t *held;              /* seqs received and not released, at most max_inflight */
    unsigned nheld;
    unsigned max_held;
    sc_stats stats;
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
    case SC_ENOSTREAM: return "SC_ENOSTREAM";
    case SC_EREQUEST: return "SC_EREQUEST";
    case SC_EINVAL: return "SC_EINVAL";
    case SC_ESYS: return "SC_ESYS";
    case SC_ENOMEM: return "SC_ENOMEM";
    default: return "unknown slabcast status";
    }
}

static const char *kind_name(uint64_t kind)
{
    switch (kind) {
    case K_HELLO: return "HELLO";
    case K_OPEN: return "OPEN";
    case K_FRAME: return "FRAME";
    case K_CLOSE: return "CLOSE";
    case K_SUBSCRIBE: return "SUBSCRIBE";
    case K_RELEASE: return "RELEASE";
    case K_BYE: return "BYE";
    case K_STATUS: return "STATUS";
    case K_UNSUBSCRIBE: return "UNSUBSCRIBE";
    case K_SYNC: return "SYNC";
    case K_WELCOME: return "WELCOME";
    case K_OPENED: return "OPENED";
    case K_GRANT: return "GRANT";
    case K_SUBSCRIBED: return "SUBSCRIBED";
    case K_CHUNK: return "CHUNK";
    case K_END: return "END";
    case K_ERROR: return "ERROR";
    case K_STATUS_REPLY: return "STATUS_REPLY";
    case K_SYNCED: return "SYNCED";
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

/* A received message: its kind and the fields after it. */
typedef struct msgview {
    uint64_t kind;
    const msgpack_object *f;     /* f[0] is the first field after the kind */
    uint32_t nf;
} msgview;

/* Check that `m` has at least `need` fields (later versions may append more, which we ignore). */
static int need_fields(sc_client *c, const msgview *m, uint32_t need)
{
    if (m->nf < need)
        return fail(c, SC_EPROTO, "%s needs at least %u fields, got %u (%s)", kind_name(m->kind), need, m->nf,
                    c->where);
    return SC_OK;
}

static int field_uint(sc_client *c, const msgview *m, uint32_t i, const char *what, uint64_t *out)
{
    const msgpack_object *o = &m->f[i];
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return fail(c, SC_EPROTO, "%s field %u (%s) must be a uint, got %s (%s)", kind_name(m->kind), i + 1, what,
                    type_name(o), c->where);
    *out = o->via.u64;
    return SC_OK;
}

/* A `number` or `float` field: ints are accepted too (a peer may send t0 = 5 for 5.0). */
static int field_num(sc_client *c, const msgview *m, uint32_t i, const char *what, double *out)
{
    const msgpack_object *o = &m->f[i];
    switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: *out = o->via.f64; return SC_OK;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: *out = (double)o->via.u64; return SC_OK;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: *out = (double)o->via.i64; return SC_OK;
    default:
        return fail(c, SC_EPROTO, "%s field %u (%s) must be a number, got %s (%s)", kind_name(m->kind), i + 1,
                    what, type_name(o), c->where);
    }
}

/* Copy a str field into `buf` (NUL-terminated); too long is a protocol error. */
static int field_str(sc_client *c, const msgview *m, uint32_t i, const char *what, char *buf, size_t cap)
{
    const msgpack_object *o = &m->f[i];
    if (o->type != MSGPACK_OBJECT_STR)
        return fail(c, SC_EPROTO, "%s field %u (%s) must be a str, got %s (%s)", kind_name(m->kind), i + 1, what,
                    type_name(o), c->where);
    if (o->via.str.size >= cap)
        return fail(c, SC_EPROTO, "%s field %u (%s) is %u bytes long, at most %zu expected (%s)",
                    kind_name(m->kind), i + 1, what, o->via.str.size, cap - 1, c->where);
    memcpy(buf, o->via.str.ptr, o->via.str.size);
    buf[o->via.str.size] = '\0';
    return SC_OK;
}

/* ------------------------------------------------------------ the socket */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Read pending monitor events; a disconnection means the broker is gone. */
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
        }
        int more = zmq_msg_more(&ev);
        zmq_msg_close(&ev);
        while (more) { /* the second frame holds the endpoint */
            zmq_msg_t part;
            zmq_msg_init(&part);
            if (zmq_msg_recv(&part, c->mon, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&part);
                break;
            }
            more = zmq_msg_more(&part);
            zmq_msg_close(&part);
        }
    }
}

/* Send the message packed in c->sbuf. */
static int send_packed(sc_client *c, const char *what)
{
    if (zmq_send(c->sock, c->sbuf.data, c->sbuf.size, ZMQ_DONTWAIT) < 0)
        return fail(c, SC_EBROKERGONE, "cannot send %s to the broker at %s: %s", what, c->address,
                    zmq_strerror(zmq_errno()));
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
    m->f = o->via.array.ptr + 1;
    m->nf = o->via.array.size - 1;
    return SC_OK;
}

/* Wait until `deadline` (ms on the monotonic clock, -1: forever) for the next message.
 * Messages the broker sent before it died are returned first; then SC_EBROKERGONE. */
static int next_msg(sc_client *c, int64_t deadline, msgview *m)
{
    for (;;) {
        if (c->msg_live) {
            zmq_msg_close(&c->msg);
            c->msg_live = false;
        }
        zmq_msg_init(&c->msg);
        c->msg_live = true;
        if (zmq_msg_recv(&c->msg, c->sock, ZMQ_DONTWAIT) >= 0) {
            if (zmq_msg_more(&c->msg)) {
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
        if (e != EAGAIN && e != EINTR)
            return fail(c, SC_ESYS, "cannot receive from the broker at %s: %s", c->address, zmq_strerror(e));
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
    if (m->nf >= 1 && m->f[0].type == MSGPACK_OBJECT_STR)
        field_str(c, m, 0, "code", code, sizeof code);
    if (m->nf >= 2 && m->f[1].type == MSGPACK_OBJECT_STR && m->f[1].via.str.size < sizeof text)
        field_str(c, m, 1, "message", text, sizeof text);
    int rc = SC_EREQUEST;
    if (strcmp(code, "malformed") == 0)
        rc = SC_EPROTO;
    else if (strcmp(code, "version") == 0)
        rc = SC_EVERSION;
    else if (strcmp(code, "unknown-stream") == 0)
        rc = SC_ENOSTREAM;
    if (rc == SC_EVERSION)  /* the broker's message names both versions */
        return fail(c, rc, "%s (%s)", text, c->where);
    return fail(c, rc, "the broker refused (%s): %s (%s)", code, text, c->where);
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
    snprintf(c->label, sizeof c->label, "c-subscriber");
    snprintf(c->where, sizeof c->where, "not connected");
    msgpack_unpacked_init(&c->unp);
    msgpack_sbuffer_init(&c->sbuf);
    msgpack_packer_init(&c->pk, &c->sbuf, msgpack_sbuffer_write);
    return c;
}

int sc_set_label(sc_client *c, const char *label)
{
    if (c->sock != NULL)
        return fail(c, SC_EINVAL, "sc_set_label must come before sc_connect");
    if (label == NULL || strlen(label) >= sizeof c->label)
        return fail(c, SC_EINVAL, "label must be a string of at most %zu bytes", sizeof c->label - 1);
    snprintf(c->label, sizeof c->label, "%s", label);
    return SC_OK;
}

int sc_set_timeout(sc_client *c, int timeout_ms)
{
    if (timeout_ms < 0)
        return fail(c, SC_EINVAL, "timeout_ms must be >= 0, got %d", timeout_ms);
    c->timeout_ms = timeout_ms;
    return SC_OK;
}

int sc_set_protocol_version(sc_client *c, unsigned version)
{
    if (c->sock != NULL)
        return fail(c, SC_EINVAL, "sc_set_protocol_version must come before sc_connect");
    c->version = version;
    return SC_OK;
}

/* Accept "ipc://path" or a bare socket path; refuse other transports with the reason. */
static int normalize_address(sc_client *c, const char *address, char *path, size_t cap)
{
    if (address == NULL || address[0] == '\0')
        return fail(c, SC_EINVAL, "address must be an ipc:// endpoint or a socket path, got an empty string");
    if (strncmp(address, "tcp://", 6) == 0)
        return fail(c, SC_EINVAL,
                    "the C client reads shared memory and supports ipc:// only, got %s (remote tcp:// "
                    "subscribers need CURVE and chunks by value: use the Python client)", address);
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

int sc_connect(sc_client *c, const char *address)
{
    if (c->sock != NULL)
        return fail(c, SC_EINVAL, "this client is already connected to %s", c->address);
    char path[IPC_PATH_MAX + 2];
    int rc = normalize_address(c, address, path, sizeof path);
    if (rc)
        return rc;
    snprintf(c->address, sizeof c->address, "ipc://%s", path);
    snprintf(c->where, sizeof c->where, "broker at %s", c->address);
    struct stat st;
    if (stat(path, &st) != 0)
        return fail(c, SC_EBROKERGONE, "no broker at %s (%s: %s); start one with `slabcast broker`", c->address,
                    path, strerror(errno));

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
    if (zmq_socket_monitor(c->sock, monitor_ep, ZMQ_EVENT_DISCONNECTED) != 0)
        return fail(c, SC_ESYS, "cannot monitor the socket: %s", zmq_strerror(zmq_errno()));
    c->mon = zmq_socket(c->ctx, ZMQ_PAIR);
    if (c->mon == NULL || zmq_connect(c->mon, monitor_ep) != 0)
        return fail(c, SC_ESYS, "cannot connect the monitor socket: %s", zmq_strerror(zmq_errno()));
    zmq_setsockopt(c->mon, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_connect(c->sock, c->address) != 0)
        return fail(c, SC_ESYS, "cannot connect to %s: %s", c->address, zmq_strerror(zmq_errno()));

    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk, 5);
    msgpack_pack_uint64(&c->pk, K_HELLO);
    msgpack_pack_uint64(&c->pk, c->version);
    msgpack_pack_int64(&c->pk, (int64_t)getpid());
    pack_str(c, "sub");
    pack_str(c, c->label);
    if ((rc = send_packed(c, "HELLO")))
        return rc;

    msgview m;
    rc = next_msg(c, deadline_for(c->timeout_ms), &m);
    if (rc == SC_ETIMEOUT)
        return fail(c, SC_EBROKERGONE, "no answer to HELLO from the broker at %s within %d ms", c->address,
                    c->timeout_ms);
    if (rc)
        return rc;
    if (m.kind == K_ERROR)
        return broker_error(c, &m);
    if (m.kind != K_WELCOME)
        return fail(c, SC_EPROTO, "expected WELCOME, got %s (kind %llu) (%s)", kind_name(m.kind),
                    (unsigned long long)m.kind, c->where);
    uint64_t version;
    if ((rc = need_fields(c, &m, 1)) || (rc = field_uint(c, &m, 0, "version", &version)))
        return rc;
    if (version != c->version)
        return fail(c, SC_EVERSION,
                    "protocol version mismatch: broker speaks version %llu, client speaks version %u (%s)",
                    (unsigned long long)version, c->version, c->where);
    if ((rc = need_fields(c, &m, 3)) || (rc = field_uint(c, &m, 1, "broker_pid", &c->broker_pid)) ||
        (rc = field_uint(c, &m, 2, "epoch", &c->epoch)))
        return rc;
    c->connected = true;
    return SC_OK;
}

/* ------------------------------------------------------------- subscribing */

void sc_sub_options_init(sc_sub_options *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->policy = "block";
    opts->max_inflight = 8;
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

/* Item size of a numpy dtype string: byte order, kind (b i u f c), size in bytes; 0 if invalid. */
static unsigned dtype_itemsize(const char *dtype)
{
    const char *p = dtype;
    if (*p == '<' || *p == '>' || *p == '|' || *p == '=')
        p++;
    if (*p == '\0' || strchr("biufc", *p) == NULL)
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

/* Map the segment read-only and check its header against SUBSCRIBED.  Never unlinks. */
static int map_segment(sc_client *c, size_t nbytes)
{
    if (c->map != NULL) {  /* left by a failed earlier attempt */
        munmap((void *)c->map, c->map_bytes);
        c->map = NULL;
    }
    char shm_name[sizeof c->segment + 1];
    snprintf(shm_name, sizeof shm_name, "/%s", c->segment);
    int fd = shm_open(shm_name, O_RDONLY, 0);
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
    close(fd);  /* the mapping stays valid without the descriptor */
    if (p == MAP_FAILED)
        return fail(c, SC_ESYS, "cannot map segment %s (%zu bytes) read-only: %s (%s)", shm_name, nbytes,
                    strerror(e), c->where);
    c->map = p;
    c->map_bytes = nbytes;
    const unsigned char *h = c->map;
    uint32_t layout = read_u32le(h + HDR_LAYOUT), header = read_u32le(h + HDR_HEADER_BYTES);
    uint32_t sample_bytes = read_u32le(h + HDR_SAMPLE_BYTES);
    if (memcmp(h + HDR_MAGIC, "SLABCAST", 8) != 0 || (layout != 1 && layout != 2))
        return fail(c, SC_EPROTO, "segment %s does not start with magic SLABCAST and layout 1 or 2 (%s)", shm_name,
                    c->where);
    if (sample_bytes != c->info.sample_bytes || header < HDR_MIN_BYTES || header > nbytes)
        return fail(c, SC_EPROTO,
                    "segment %s header says sample_bytes=%u header_bytes=%u; SUBSCRIBED said dtype %s x %u "
                    "(%zu bytes per sample) (%s)", shm_name, sample_bytes, header, c->dtype, c->info.channels,
                    c->info.sample_bytes, c->where);
    c->header_bytes = header;
    return SC_OK;
}

int sc_subscribe(sc_client *c, const char *stream, const sc_sub_options *opts)
{
    if (!c->connected)
        return fail(c, SC_EINVAL, "sc_subscribe needs a connected client (call sc_connect first)");
    if (c->subscribed)
        return fail(c, SC_EINVAL, "this client already subscribed to stream '%s'; use one client per subscription",
                    c->stream);
    if (stream == NULL || !valid_stream_name(stream))
        return fail(c, SC_EINVAL, "stream name must be 1 to 64 characters from A-Z a-z 0-9 _ . : -, got '%s'",
                    stream ? stream : "(null)");
    sc_sub_options d;
    if (opts == NULL) {
        sc_sub_options_init(&d);
        opts = &d;
    }
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
    snprintf(c->stream, sizeof c->stream, "%s", stream);
    snprintf(c->where, sizeof c->where, "subscriber of stream '%s' at %s", stream, c->address);
    free(c->held);  /* a failed attempt (unknown stream, ...) may be retried */
    c->held = calloc(opts->max_inflight, sizeof *c->held);
    if (c->held == NULL)
        return fail(c, SC_ENOMEM, "out of memory");
    c->max_held = opts->max_inflight;

    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk, 8);
    msgpack_pack_uint64(&c->pk, K_SUBSCRIBE);
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
    msgpack_pack_nil(&c->pk);  /* sampler: none */
    int rc = send_packed(c, "SUBSCRIBE");
    if (rc)
        return rc;

    msgview m;
    rc = next_msg(c, deadline_for(c->timeout_ms), &m);
    if (rc == SC_ETIMEOUT)
        return fail(c, SC_EBROKERGONE, "no answer to SUBSCRIBE from the broker within %d ms (%s)", c->timeout_ms,
                    c->where);
    if (rc)
        return rc;
    if (m.kind == K_ERROR)
        return broker_error(c, &m);
    if (m.kind != K_SUBSCRIBED)
        return fail(c, SC_EPROTO, "expected SUBSCRIBED, got %s (kind %llu) (%s)", kind_name(m.kind),
                    (unsigned long long)m.kind, c->where);
    uint64_t seg_bytes, channels, size, start;
    double rate = 0.0;
    if ((rc = need_fields(c, &m, 8)) || (rc = field_str(c, &m, 0, "segment", c->segment, sizeof c->segment)) ||
        (rc = field_uint(c, &m, 1, "segment_bytes", &seg_bytes)) ||
        (rc = field_str(c, &m, 2, "dtype", c->dtype, sizeof c->dtype)) ||
        (rc = field_uint(c, &m, 3, "channels", &channels)) ||
        (m.f[4].type != MSGPACK_OBJECT_NIL && (rc = field_num(c, &m, 4, "rate", &rate))) ||
        (rc = field_uint(c, &m, 5, "size", &size)) || (rc = field_uint(c, &m, 6, "start", &start)))
        return rc;
    if (m.f[7].type != MSGPACK_OBJECT_ARRAY)
        return fail(c, SC_EPROTO, "SUBSCRIBED field 8 (channel_names) must be an array, got %s (%s)",
                    type_name(&m.f[7]), c->where);
    unsigned itemsize = dtype_itemsize(c->dtype);
    if (itemsize == 0 || channels < 1 || channels > 65535 || size < 1 || seg_bytes > SIZE_MAX)
        return fail(c, SC_EPROTO, "SUBSCRIBED announced dtype '%s', %llu channels, size %llu: not a valid stream (%s)",
                    c->dtype, (unsigned long long)channels, (unsigned long long)size, c->where);
    c->info.name = c->stream;
    c->info.dtype = c->dtype;
    c->info.itemsize = itemsize;
    c->info.channels = (unsigned)channels;
    c->info.sample_bytes = (size_t)itemsize * channels;
    c->info.rate = rate;
    c->info.size = size;
    c->info.start = start;
    c->info.segment = c->segment;
    c->info.segment_bytes = (size_t)seg_bytes;
    if ((rc = map_segment(c, (size_t)seg_bytes)))
        return rc;
    c->subscribed = true;
    return SC_OK;
}

const sc_stream_info *sc_info(const sc_client *c)
{
    return c->subscribed ? &c->info : NULL;
}

/* -------------------------------------------------------------- receiving */

/* Fill `chunk` from a CHUNK message, checking that it lies inside the mapping. */
static int take_chunk(sc_client *c, const msgview *m, sc_chunk *chunk)
{
    uint64_t seq, index, n, offset, flags;
    double t0;
    int rc;
    if ((rc = need_fields(c, m, 6)) || (rc = field_uint(c, m, 0, "seq", &seq)) ||
        (rc = field_uint(c, m, 1, "index", &index)) || (rc = field_uint(c, m, 2, "n", &n)) ||
        (rc = field_num(c, m, 3, "t0", &t0)) || (rc = field_uint(c, m, 4, "offset", &offset)) ||
        (rc = field_uint(c, m, 5, "flags", &flags)))
        return rc;
    if (flags & FLAG_INLINE)
        return fail(c, SC_EPROTO,
                    "CHUNK seq=%llu has the inline flag (2), which is for tcp:// clients; this ipc client reads "
                    "shared memory (%s)", (unsigned long long)seq, c->where);
    size_t sb = c->info.sample_bytes;
    if (n < 1 || n > (c->map_bytes / sb) || offset < c->header_bytes || offset > c->map_bytes ||
        n * sb > c->map_bytes - offset)
        return fail(c, SC_EPROTO,
                    "CHUNK seq=%llu of %llu samples (%zu bytes each) at offset %llu lies outside the %zu-byte "
                    "segment's slabs (%s)", (unsigned long long)seq, (unsigned long long)n, sb,
                    (unsigned long long)offset, c->map_bytes, c->where);
    if (c->nheld >= c->max_held)
        return fail(c, SC_EPROTO, "CHUNK seq=%llu exceeds max_inflight=%u chunks held (%s)",
                    (unsigned long long)seq, c->max_held, c->where);
    c->held[c->nheld++] = seq;
    chunk->data = c->map + offset;
    chunk->n = n;
    chunk->nbytes = (size_t)n * sb;
    chunk->dtype = c->dtype;
    chunk->channels = c->info.channels;
    chunk->t0 = t0;
    chunk->seq = seq;
    chunk->index = index;
    chunk->flags = (unsigned)flags;
    c->stats.received++;
    c->stats.last_seq = (int64_t)seq;
    return SC_OK;
}

/* An END: the subscription is over; remember why. */
static int take_end(sc_client *c, const msgview *m)
{
    char code[64], text[768];
    int rc;
    if ((rc = need_fields(c, m, 2)) || (rc = field_str(c, m, 0, "code", code, sizeof code)) ||
        (rc = field_str(c, m, 1, "message", text, sizeof text)))
        return rc;
    uint64_t cut;
    if (m->nf >= 3 && field_uint(c, m, 2, "seq", &cut) == SC_OK)
        c->stats.cut = cut;
    if (strcmp(code, "closed") == 0)
        rc = fail(c, SC_EOF, "end of stream: %s (%s)", text, c->where);
    else if (strcmp(code, "publisher-gone") == 0)
        rc = fail(c, SC_EPUBGONE, "the publisher is gone: %s (%s)", text, c->where);
    else if (strcmp(code, "broker-shutdown") == 0) {
        c->gone = true;
        rc = fail(c, SC_EBROKERGONE, "the broker is gone: %s (%s)", text, c->where);
    } else if (strcmp(code, "evicted") == 0)
        rc = fail(c, SC_EEVICTED, "%s (%s)", text, c->where);
    else
        rc = fail(c, SC_EEND, "the stream ended (%s): %s (%s)", code, text, c->where);
    return end_with(c, rc);
}

int sc_recv(sc_client *c, sc_chunk *chunk, int timeout_ms)
{
    if (!c->subscribed)
        return fail(c, SC_EINVAL, "sc_recv needs a subscription (call sc_subscribe first)");
    if (c->end_code) {
        memcpy(c->err, c->end_msg, sizeof c->err);
        return c->end_code;
    }
    int64_t deadline = deadline_for(timeout_ms);
    for (;;) {
        msgview m;
        int rc = next_msg(c, deadline, &m);
        if (rc == SC_EBROKERGONE)
            return end_with(c, rc);
        if (rc)
            return rc;
        switch (m.kind) {
        case K_CHUNK: return take_chunk(c, &m, chunk);
        case K_SYNCED: continue;
        case K_END: return take_end(c, &m);
        case K_ERROR: return broker_error(c, &m);
        default:
            return fail(c, SC_EPROTO, "unexpected %s (kind %llu) from the broker (%s)", kind_name(m.kind),
                        (unsigned long long)m.kind, c->where);
        }
    }
}

int sc_wait(sc_client *c, int timeout_ms)
{
    if (c->sock == NULL)
        return fail(c, SC_EINVAL, "sc_wait needs a connected client");
    if (c->end_code || c->gone)
        return SC_OK;
    int64_t deadline = deadline_for(timeout_ms);
    for (;;) {
        zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {c->mon, 0, ZMQ_POLLIN, 0}};
        long wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            wait = left > 0 ? (long)left : 0;
        }
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

int sc_release_seq(sc_client *c, uint64_t seq)
{
    if (!c->subscribed)
        return fail(c, SC_EINVAL, "sc_release needs a subscription");
    unsigned i = 0;
    while (i < c->nheld && c->held[i] != seq)
        i++;
    if (i == c->nheld)
        return fail(c, SC_EINVAL, "chunk seq=%llu is not held (never received, or released twice) (%s)",
                    (unsigned long long)seq, c->where);
    c->held[i] = c->held[--c->nheld];
    c->stats.released++;
    if (c->gone)  /* a dead broker holds no lease to give back */
        return SC_OK;
    msgpack_sbuffer_clear(&c->sbuf);
    msgpack_pack_array(&c->pk, 3);
    msgpack_pack_uint64(&c->pk, K_RELEASE);
    msgpack_pack_array(&c->pk, 1);
    msgpack_pack_uint64(&c->pk, seq);
    msgpack_pack_array(&c->pk, 0);
    return send_packed(c, "RELEASE");
}

int sc_release(sc_client *c, const sc_chunk *chunk)
{
    if (chunk == NULL)
        return fail(c, SC_EINVAL, "sc_release: chunk is NULL");
    return sc_release_seq(c, chunk->seq);
}

void sc_get_stats(const sc_client *c, sc_stats *out)
{
    *out = c->stats;
}

/* ----------------------------------------------------------------- closing */

void sc_close(sc_client *c)
{
    if (c == NULL)
        return;
    if (c->connected && !c->gone) {
        /* BYE is answered by END bye once everything we sent before it was handled. */
        msgpack_sbuffer_clear(&c->sbuf);
        msgpack_pack_array(&c->pk, 1);
        msgpack_pack_uint64(&c->pk, K_BYE);
        if (send_packed(c, "BYE") == SC_OK) {
            int64_t deadline = deadline_for(BYE_TIMEOUT_MS);
            msgview m;
            while (next_msg(c, deadline, &m) == SC_OK) {
                if (m.kind == K_END && m.nf >= 1 && m.f[0].type == MSGPACK_OBJECT_STR && m.f[0].via.str.size == 3 &&
                    memcmp(m.f[0].via.str.ptr, "bye", 3) == 0)
                    break;
            }
        }
    }
    if (c->msg_live)
        zmq_msg_close(&c->msg);
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
    if (c->map != NULL)
        munmap((void *)c->map, c->map_bytes);
    msgpack_unpacked_destroy(&c->unp);
    msgpack_sbuffer_destroy(&c->sbuf);
    free(c->held);
    free(c);
}
