/*
 * slabcast.h: C subscriber of a slabcast broker (wire protocol version 3, docs/protocol.md; 2 and 1 on request).
 *
 * Version 3 (the default): the broker grants the subscription; the client reads the frame descriptors the
 * publisher writes into the stream segment's descriptor ring and cuts its own chunks with the rechunking
 * rules of docs/protocol.md section 8 (the same rules as slabcast's Python Rechunker).  The publisher's
 * notices only wake it (sc_sub_options.wake says how it waits: a notice, a futex, or spinning).  Its
 * leases are kernel record locks on the segment (one per slab, not per chunk) checked against the slab
 * generation table; it tells the broker how far it has read with a cumulative ACK, never a message per chunk.
 * Version 2 (sc_set_protocol_version(c, 2)): the same, but the chunks are cut from the contents of the
 * publisher's notices (a notice lost is samples lost).  Version 1: the broker cuts the chunks, sends one
 * CHUNK notice each and the client answers each release with RELEASE.  A version-3 broker serves all three.
 *
 * Installing and linking: `make -C clients/c install PREFIX=<dir>` installs this header, libslabcast.so.N
 * (SONAME libslabcast.so.N), libslabcast.a, slabcast-sub and <dir>/lib/pkgconfig/slabcast.pc; build with
 * `cc prog.c $(pkg-config --cflags --libs slabcast)` (PKG_CONFIG_PATH=<dir>/lib/pkgconfig for a prefix
 * outside pkg-config's search path; the .pc of a prefix outside /usr and /lib carries an rpath, so the
 * program runs without LD_LIBRARY_PATH).  clients/c/README.md says more.
 *
 * ABI rules (for C callers and for bindings from other languages):
 * - SC_ABI_VERSION is the N of the SONAME libslabcast.so.N and equals SC_VERSION_MAJOR.  It goes up (and
 *   the SONAME with it) on any incompatible change: a function removed or its signature changed, a field
 *   of a public struct moved, retyped or given another meaning, a return code renumbered.  The minor
 *   version goes up for compatible additions (new functions, new return codes, fields appended to the end
 *   of a public struct); the patch version for fixes only.  Exported symbols carry the version node
 *   SLABCAST_<major>.<minor> of the release that added them.
 * - Every public struct begins with `size_t struct_size`, and fields are only ever appended, after the
 *   struct's previous end (no struct has tail padding a new field could slip into unseen: `reserved`
 *   fields fill it, and slabcast.c asserts it at compile time).  A caller compiled against an older
 *   header (a smaller struct) keeps working with a newer library, and a newer caller learns from
 *   struct_size which fields an older library filled.  So a binding declares only the
 *   prefix of a struct it uses, as the header lays it out, and states its size:
 *     - sc_sub_options (read by the library): the caller sets struct_size, normally with
 *       sc_sub_options_init(&o) (a macro passing sizeof o to sc_sub_options_init_sized); the library reads
 *       only struct_size bytes, gives fields past them their defaults, and refuses (SC_EINVAL) a larger
 *       struct whose bytes past its own fields are not zero (an option it does not know).
 *     - sc_chunk and sc_stats (written by the library): the caller passes its size (sc_recv and
 *       sc_get_stats are macros passing sizeof *chunk / sizeof *out to sc_recv_sized / sc_get_stats_sized);
 *       the library writes at most that many bytes, zeroes what it has no field for, and sets struct_size
 *       to the bytes it filled.
 *     - sc_stream_info (owned by the library, returned by sc_info): struct_size is the library's size;
 *       read no field that ends past it.
 * - sc_abi_version() and sc_library_version() tell a program (or a binding that loads the library at run
 *   time) which library it got: check sc_abi_version() == SC_ABI_VERSION once at start.
 *
 * Threads:
 * - A client (sc_client) is not thread-safe.  Every call that takes a client, sc_close included, must be
 *   made by one thread at a time; a client may move to another thread if the program orders the calls
 *   (a mutex, a thread join or a queue: anything that makes one call happen before the next).  Use one
 *   client per thread for parallel subscriptions: clients share no state (each has its own ZeroMQ
 *   context), so calls on different clients may run at the same time on different threads.
 * - sc_errmsg(c) describes the last failed call on `c`; read it on the thread that made that call,
 *   before the next call on `c` (which may overwrite it).
 * - A chunk's `data` may be read from any thread while it is held (it is read-only shared memory that
 *   does not change until released); sc_release of it is a call on the client, so the rule above applies.
 *   The strings of sc_info() and chunk->dtype stay valid and unchanged until sc_close.
 * - sc_strerror, sc_library_version and sc_abi_version touch no client: any thread, any time.
 * - No call is async-signal-safe.  After fork(), the child must not call anything on a client created
 *   before the fork, not even sc_close (the parent still owns its sockets and leases).
 */
#ifndef SLABCAST_H
#define SLABCAST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The wire protocol version this library speaks by default (see sc_set_protocol_version).  Not the
 * library's version: see SC_VERSION_* and SC_ABI_VERSION below. */
#define SC_PROTOCOL_VERSION 3

/* The version of this header and of the library built from it (semantic versioning, see the ABI rules
 * above); sc_library_version() gives the library's at run time. */
#define SC_VERSION_MAJOR 1
#define SC_VERSION_MINOR 1
#define SC_VERSION_PATCH 0
#define SC_VERSION_STRING "1.1.0"

/* The ABI version: the N of libslabcast.so.N (equal to SC_VERSION_MAJOR); sc_abi_version() at run time. */
#define SC_ABI_VERSION 1

/*
 * Return codes.  SC_OK is success; every other code comes with a message from
 * sc_errmsg().  A code that ends the subscription (SC_EOF, SC_EBROKERGONE,
 * SC_EPUBGONE, SC_EEVICTED, SC_EEND) is sticky: later sc_recv() calls return it
 * again.  sc_strerror() gives a code's name.
 */
typedef enum sc_status {
    SC_OK = 0,
    SC_EOF = -1,          /* END "closed": the publisher closed the stream; every chunk was received */
    SC_ETIMEOUT = -2,     /* nothing within the timeout (not an error of the connection) */
    SC_EBROKERGONE = -3,  /* the broker died, shut down (END "broker-shutdown") or never answered */
    SC_EPUBGONE = -4,     /* END "publisher-gone": the publisher died or left without closing */
    SC_EEVICTED = -5,     /* END "evicted": a chunk was held longer than the broker's lease timeout */
    SC_EEND = -6,         /* END with a code this version does not know */
    SC_EVERSION = -7,     /* protocol version mismatch (the message names both versions) */
    SC_EPROTO = -8,       /* malformed or unexpected message, or ERROR "malformed" from the broker */
    SC_ENOSTREAM = -9,    /* ERROR "unknown-stream": no publisher for that stream name */
    SC_EREQUEST = -10,    /* the broker refused the request (ERROR "bad-request", "shm-full", ...) */
    SC_EINVAL = -11,      /* an invalid argument, or a call in the wrong state */
    SC_ESYS = -12,        /* a system or ZeroMQ call failed (shm_open, mmap, zmq_*) */
    SC_ENOMEM = -13,      /* out of memory */
    SC_ELOST = -14        /* policy "block": samples were lost before this client read them (version 3: the
                           * publisher wrote over their descriptors first, which the broker's flow control
                           * prevents; version 2: their notices never reached it); sc_errmsg names the range;
                           * the next sc_recv goes on after it */
} sc_status;

/* One client connection, opaque.  Not thread-safe (see "Threads" above): one thread at a time. */
typedef struct sc_client sc_client;

/* Subscription settings (see sc_sub_options_init for the defaults). */
typedef struct sc_sub_options {
    size_t struct_size;     /* sizeof(sc_sub_options) as the caller was compiled: set by sc_sub_options_init */
    uint64_t size;          /* chunk size in samples (bytes on a byte stream); 0 to use seconds */
    double seconds;         /* chunk size in seconds (streams with a rate); 0 to use size */
    int clip;               /* 1: every chunk has exactly `size` samples; 0: whole frames, n >= size */
    const char *policy;     /* "block" (lossless, the publisher waits) or "drop" (gaps in seq) */
    unsigned max_inflight;  /* chunks held (received, not released) before the policy applies, 1..1024.
                             * Versions 2 and 3: only "drop" uses it (a chunk cut while this many are held,
                             * or waiting to be received, is dropped); "block" holds the publisher back by
                             * this subscriber's read position instead. */
    unsigned reserved;      /* 0 (sc_sub_options_init sets it); fills what would be tail padding */
    /* Since 1.1.0. */
    const char *wake;       /* version 3: how sc_recv waits for the publisher's next frame.  NULL or "doorbell"
                             * (the default): on the publisher's notice socket, one poll() with the broker
                             * connection (the publisher sends a notice only while it sleeps, when the
                             * segment's sleeper table can be mapped writable; else after every frame);
                             * "futex": FUTEX_WAIT on the ring's position (the publisher wakes it with
                             * FUTEX_WAKE: no ZeroMQ message per frame); "busy": spin on the position (a core
                             * at 100 % while it waits; no system call).  Every wait is bounded (100 ms) so
                             * that the end of the subscription is seen.  Versions 1 and 2 accept only NULL
                             * and "doorbell". */
} sc_sub_options;

/* What SUBSCRIBED said about the stream; owned by the client, valid and unchanged until sc_close. */
typedef struct sc_stream_info {
    size_t struct_size;     /* sizeof(sc_stream_info) of the library: read no field that ends past it */
    const char *name;       /* stream name */
    const char *dtype;      /* numpy dtype string, e.g. "<f4", "<i2", "|u1" */
    unsigned itemsize;      /* bytes per value of dtype */
    unsigned channels;      /* values per sample */
    size_t sample_bytes;    /* itemsize * channels */
    double rate;            /* samples per second, 0.0 when the stream has none */
    uint64_t size;          /* samples per chunk (computed by the broker when seconds were given) */
    uint64_t start;         /* stream index of the first sample this subscriber can receive
                             * (versions 2 and 3: as ATTACHED said) */
    const char *segment;    /* shared-memory segment name (no leading slash) */
    size_t segment_bytes;   /* bytes mapped */
} sc_stream_info;

/* One chunk.  `data` points into the read-only shared mapping and stays valid until
 * sc_release() of this chunk or sc_close(); the bytes never change while it is held
 * (versions 2 and 3: this client's shared lock on the chunk's slab keeps the broker from handing
 * the slab back to the publisher). */
typedef struct sc_chunk {
    size_t struct_size;     /* bytes of this struct the library filled (see sc_recv_sized) */
    const void *data;       /* n * sample_bytes bytes, sample-major (channels interleaved) */
    uint64_t n;             /* samples */
    size_t nbytes;          /* n * sample_bytes */
    const char *dtype;      /* the stream's dtype string (owned by the client) */
    unsigned channels;
    double t0;              /* time of the chunk's first sample, seconds */
    uint64_t seq;           /* this subscriber's chunk counter from 0; a gap means dropped chunks */
    uint64_t index;         /* stream index of the first sample */
    unsigned flags;         /* bit 0 (SC_FLAG_DISCONTINUITY): the stream jumped before this chunk (or samples
                             * were lost before it: no chunk spans the hole) */
    unsigned reserved;      /* 0; fills what would be tail padding */
} sc_chunk;

#define SC_FLAG_DISCONTINUITY 1u

/* Counters of one subscription. */
typedef struct sc_stats {
    size_t struct_size;     /* bytes of this struct the library filled (see sc_get_stats_sized) */
    uint64_t received;      /* chunks returned by sc_recv */
    uint64_t released;      /* chunks given back */
    uint64_t cut;           /* chunks cut for us in all, delivered or dropped: version 1, as told by END
                             * (0 before END); versions 2 and 3, counted by this client (set at the end) */
    int64_t last_seq;       /* seq of the last chunk received, -1 before the first */
    uint64_t dropped;       /* chunks cut for us and never received (policy "drop", or a slab already
                             * written again; version 3 also counts the chunks of samples a "drop"
                             * subscriber lost, rounded up); version 1 knows of drops only up to the
                             * last seq seen */
} sc_stats;

/* The library's version, "1.1.0" (SC_VERSION_STRING of the header it was built from); stores the three
 * numbers in *major, *minor, *patch (each pointer may be NULL).  Any thread. */
const char *sc_library_version(int *major, int *minor, int *patch);

/* The library's ABI version, the N of libslabcast.so.N (SC_ABI_VERSION of the header it was built from).
 * A program or binding is compatible with the library it loaded when this equals its SC_ABI_VERSION.
 * Any thread. */
int sc_abi_version(void);

/* Allocate a client (NULL only when out of memory).  sc_errmsg() works on it from now on. */
sc_client *sc_new(void);

/* Set the label the broker shows in logs and `slabcast status` (before sc_connect). */
int sc_set_label(sc_client *c, const char *label);

/* Milliseconds to wait for the broker's answers to HELLO and SUBSCRIBE, and (versions 2 and 3) for the
 * publisher's notice socket to confirm that it reaches this client (JOINED); default 5000. */
int sc_set_timeout(sc_client *c, int timeout_ms);

/* Speak protocol version `version` (before sc_connect): 3 (the default) cuts chunks in this client from
 * the segment's descriptor ring, 2 cuts them from the publisher's notices, 1 lets the broker cut them
 * (CHUNK/RELEASE).  Other values are sent as they are, for tests of version negotiation: the broker
 * refuses them with SC_EVERSION. */
int sc_set_protocol_version(sc_client *c, unsigned version);

/* Connect to the broker at `address` ("ipc:///path/broker.sock", or a socket path)
 * and complete the HELLO/WELCOME handshake as a subscriber. */
int sc_connect(sc_client *c, const char *address);

/* Fill the first `struct_size` bytes of `opts` with the defaults (size 0, seconds 0, clip 0, policy
 * "block", max_inflight 8, wake NULL) and set opts->struct_size = struct_size (pass sizeof *opts; at least
 * sizeof(size_t)).  C callers use the macro sc_sub_options_init(&opts). */
void sc_sub_options_init_sized(sc_sub_options *opts, size_t struct_size);
#define sc_sub_options_init(opts) sc_sub_options_init_sized((opts), sizeof *(opts))

/* Subscribe to `stream` (give exactly one of opts->size and opts->seconds; opts NULL: the defaults,
 * which name neither, so SC_EINVAL) and map its segment read-only.  opts->struct_size must be set (see
 * sc_sub_options_init) and reach at least past `size`: fields past it take their defaults.  Versions 2
 * and 3 also connect to the stream's notice socket, wait (up to the timeout of sc_set_timeout) until the
 * publisher confirms it reaches this client (JOINED), then send ATTACH; the broker's ATTACHED gives
 * sc_info()->start, from which every sample is received (version 3: and the ring descriptor of the frame
 * there, the first this client reads).  One subscription per client. */
int sc_subscribe(sc_client *c, const char *stream, const sc_sub_options *opts);

/* The stream's description after a successful sc_subscribe (NULL before). */
const sc_stream_info *sc_info(const sc_client *c);

/* sc_recv(c, &chunk, timeout_ms): wait up to `timeout_ms` (-1: forever, 0: do not wait) for the
 * next chunk.  SC_OK fills `chunk`; SC_ETIMEOUT when none came; SC_EOF at the end of the stream (every
 * complete chunk received); SC_EBROKERGONE, SC_EPUBGONE, ... when the subscription broke.
 * Versions 2 and 3 cut chunks here (from the ring, or from the notices), give back the locks of slabs
 * they no longer hold a chunk of and send ACK before they wait. */
int sc_recv_sized(sc_client *c, sc_chunk *chunk, size_t chunk_size, int timeout_ms);
/* `chunk_size`: sizeof *chunk as the caller was compiled (at least sizeof(size_t)); the library fills at
 * most that many bytes and sets chunk->struct_size to the bytes it filled.  C callers use the macro: */
#define sc_recv(c, chunk, timeout_ms) sc_recv_sized((c), (chunk), sizeof *(chunk), (timeout_ms))

/* Wait up to `timeout_ms` until sc_recv(c, ..., 0) has something to return without
 * waiting (a chunk, or the end of the subscription): SC_OK, or SC_ETIMEOUT.  For event loops
 * and measurements.  Versions 2 and 3 cut the chunks of the frames published meanwhile, so it may
 * also return an error that sc_recv would have returned (SC_EPROTO, SC_ELOST, ...). */
int sc_wait(sc_client *c, int timeout_ms);

/* Give a chunk back (only its seq is read); its memory may be reused by the publisher afterwards.
 * Version 1 sends RELEASE; versions 2 and 3 send nothing: the slab's lock goes once no chunk of it is held
 * (at the latest before sc_recv waits) and the next ACK says so. */
int sc_release(sc_client *c, const sc_chunk *chunk);

/* Give back the chunk numbered `seq`. */
int sc_release_seq(sc_client *c, uint64_t seq);

/* This subscription's counters: sc_get_stats(c, &stats).  `out_size` is sizeof *out as the caller was
 * compiled; the library fills at most that many bytes and sets out->struct_size to the bytes it filled. */
void sc_get_stats_sized(const sc_client *c, sc_stats *out, size_t out_size);
#define sc_get_stats(c, out) sc_get_stats_sized((c), (out), sizeof *(out))

/* Say BYE (unless the broker is gone), wait a bounded time for its answer, close the
 * sockets (linger 200 ms), unmap the segment (never unlink it) and free the client.
 * Accepts NULL.  Chunks still held are given back: versions 2 and 3 close the descriptor that
 * holds the lease locks (before BYE), version 1 by the BYE. */
void sc_close(sc_client *c);

/* The message of the last error on `c`: what was expected, what came, and where. */
const char *sc_errmsg(const sc_client *c);

/* The name of a return code, e.g. "SC_EBROKERGONE". */
const char *sc_strerror(int code);

#ifdef __cplusplus
}
#endif

#endif /* SLABCAST_H */
