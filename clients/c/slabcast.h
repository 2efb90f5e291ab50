/*
 * slabcast.h: C subscriber of a slabcast broker (wire protocol version 3, docs/protocol.md; 2 and 1 on request),
 * and, since 1.2.0, C publisher (sc_pub_*: the section "Publishing" at the end).
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
 * What slabcast.Subscriber does, this client does too (since 1.3.0): wait for a stream that does not exist yet
 * (sc_sub_options.wait_ms), the stream's metadata (sc_stream_info's channel names, types, units, source_id;
 * sc_channel_name), per-sample times (sc_chunk.times), a sampler (sc_sub_options.sampler, a constant pause), and
 * waiting in an event loop (sc_fd), and subscribing to a remote broker: tcp://HOST:PORT with CURVE keys
 * (sc_set_curve; docs/protocol.md 11: the broker cuts the chunks and sends each by value, the client releases it
 * and says it lives with a SYNC every second).  Not yet: a callable sampler, history, reconnect.
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
 * - sc_errmsg(c) describes the last failed call on `c` (it is kept in the client): read it after that
 *   call and before the next call on `c` (which may overwrite it), from any thread ordered after the
 *   failed call as above (a binding that runs sc_recv on a worker thread may read it on its own thread).
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
#define SC_VERSION_MINOR 5
#define SC_VERSION_PATCH 3
#define SC_VERSION_STRING "1.5.3"

/* The ABI version: the N of libslabcast.so.N (equal to SC_VERSION_MAJOR); sc_abi_version() at run time. */
#define SC_ABI_VERSION 1

/*
 * Return codes.  SC_OK is success; every other code but SC_ETIMEOUT (nothing came in
 * time: not an error, sc_errmsg() is left as it was) comes with a message from
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
    SC_ELOST = -14,       /* policy "block": samples were lost before this client read them (version 3: the
                           * publisher wrote over their descriptors first, which the broker's flow control
                           * prevents; version 2: their notices never reached it); sc_errmsg names the range;
                           * the next sc_recv goes on after it */
    /* Since 1.2.0, the publisher's (sc_pub_*): */
    SC_EWRITETIMEOUT = -15, /* no free slab within the publisher's timeout (a "block" subscriber is behind, or
                             * subscribers hold chunks in every slab), or sc_pub_flush not confirmed in time;
                             * nothing of the frame was written: the call may be repeated */
    SC_EEXISTS = -16,       /* ERROR "stream-exists": the stream already has a publisher */
    SC_ESHMFULL = -17,      /* ERROR "shm-full": /dev/shm has no room for the stream's pool */
    /* Since 1.3.0: */
    SC_EDENIED = -18        /* tcp://: no CURVE handshake: the broker refused this client's key, or the server key is
                             * not the broker's (Python's AccessDeniedError) */
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
                             * FUTEX_WAKE: no ZeroMQ message per frame; since 1.4.0 with its byte in the
                             * segment's futex sleeper table when the publisher looks there, so that the
                             * publisher wakes it only while it sleeps, not after every frame); "busy": spin on the position (a core
                             * at 100 % while it waits; no system call).  Every wait is bounded (100 ms) so
                             * that the end of the subscription is seen.  Versions 1 and 2 accept only NULL
                             * and "doorbell". */
    /* Since 1.3.0. */
    double sampler;         /* seconds of stream time to skip after each chunk (0: none, the default; at most
                             * 1e9), slabcast.Subscriber's sampler= as a number: the rest of the chunk's frame
                             * is dropped, never carried.  With a rate the pause is counted in samples
                             * (accumulation restarts at index stop + ceil(sampler * rate - 1e-9), `stop` just
                             * past the chunk); without one it lasts until the first frame whose t0 is at least
                             * the completing frame's t0 + sampler, and a frame older than the one before (the
                             * clock stepped back) ends it at once and flags the next chunk
                             * (docs/protocol.md section 8, rule 5).  Versions 2 and 3 apply it in this
                             * client; version 1 sends it to the broker. */
    int wait_ms;            /* how long sc_subscribe waits for a stream that does not exist yet (SUBSCRIBE's
                             * `wait`: the broker holds the request until the stream opens, and the
                             * subscription then starts at index 0, every sample received); -1 (the default):
                             * the client's timeout (sc_set_timeout), as Python's wait= defaults to its
                             * timeout; 0: SC_ENOSTREAM at once.  SC_ENOSTREAM once it expires (the client may
                             * then not subscribe again: sc_close it).  Version 1 cannot wait (0). */
    unsigned reserved2;     /* 0; fills what would be tail padding */
    /* Since 1.4.0. */
    int partial_tail;       /* 1: when the stream ends, hand out the samples gathered towards an unfinished chunk
                             * as one last, shorter chunk with SC_FLAG_PARTIAL set (a recorder loses nothing);
                             * likewise before a frame flagged as a discontinuity (a source restarted), whose
                             * chunk follows it with SC_FLAG_DISCONTINUITY (a drop subscriber's may be dropped,
                             * counted, as any of its chunks).  Python's partial_tail=True (docs/protocol.md
                             * section 8, rules 7 and 8).  0 (the default): rule 7 as before.  Versions 2 and
                             * 3 (local subscribers) only: SC_EINVAL for version 1 and tcp://.  (A library
                             * before 1.4.0 refuses a struct that sets it: SC_EINVAL naming the byte.) */
    unsigned reserved3;     /* 0; fills what would be tail padding */
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
    size_t segment_bytes;   /* bytes mapped (0 over tcp://: nothing is) */
    /* Since 1.3.0: the stream's metadata, as SUBSCRIBED gave it (sc_channel_name and the others read the same
     * strings without this struct). */
    const char *const *channel_names;  /* `channels` names ("ch_0", "ch_1", ... unless the publisher named them) */
    const char *const *channel_types;  /* `channels` types ("EEG", "EMG": LSL's type), or NULL when none given */
    const char *const *channel_units;  /* `channels` units ("microvolts"), or NULL when none given */
    const char *source_id;  /* a unique id of the data's origin (a device serial), "" when none */
    int timestamps;         /* 1: every sample has a time of its own, which sc_chunk.times points to
                             * (versions 2 and 3); 0: sample k of a chunk is at t0 + k / rate (t0 without a rate) */
    unsigned reserved;      /* 0; fills what would be tail padding */
} sc_stream_info;

/* One chunk.  `data` points into the read-only shared mapping (tcp://: into the message that carried it) and
 * stays valid until sc_release() of this chunk or sc_close(); the bytes never change while it is held
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
    unsigned flags;         /* bit 0 (SC_FLAG_DISCONTINUITY): the stream jumped before this chunk (its publisher
                             * said so, or samples it never saw were lost before it: no chunk spans the hole).
                             * A "drop" subscriber's own dropped chunks are no jump: they show as a gap in
                             * seq (sc_sub_stats dropped counts them).  Bit 2: SC_FLAG_PARTIAL.  No other bit
                             * (before 1.5.1 a tcp:// chunk had bit 1 too, the wire's "inline") */
    unsigned reserved;      /* 0; fills what would be tail padding */
    /* Since 1.3.0. */
    const double *times;    /* a stream with per-sample times (sc_stream_info.timestamps): n seconds, one per
                             * sample, in the read-only shared mapping beside the samples, under the same lease
                             * (valid, and unchanged, until sc_release of this chunk; copy them to keep them).
                             * NULL for a stream without them (sample k is at t0 + k / rate, or
                             * t0 without a rate) and for version 1 (broker-cut chunks carry none). */
} sc_chunk;

#define SC_FLAG_DISCONTINUITY 1u
#define SC_FLAG_PARTIAL 4u  /* (since 1.4.0) a partial chunk: fewer samples than asked, what came before the
                             * stream's end or a discontinuity (sc_sub_options.partial_tail) */

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

/* The library's version, "1.5.3" (SC_VERSION_STRING of the header it was built from); stores the three
 * numbers in *major, *minor, *patch (each pointer may be NULL).  Any thread. */
const char *sc_library_version(int *major, int *minor, int *patch);

/* The library's ABI version, the N of libslabcast.so.N (SC_ABI_VERSION of the header it was built from).
 * A program or binding is compatible with the library it loaded when this equals its SC_ABI_VERSION.
 * Any thread. */
int sc_abi_version(void);

/* Allocate a client (NULL only when out of memory).  sc_errmsg() works on it from now on.  Every function below
 * given a NULL client returns SC_EINVAL (since 1.5.2; sc_connect and sc_recv crashed), and sc_errmsg(NULL) says
 * "out of memory (no client)". */
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

/* Connect to the broker at `address` ("ipc:///path/broker.sock", or a socket path; since 1.3.0 also
 * "tcp://HOST:PORT", a broker's --tcp endpoint, after sc_set_curve; NULL: the default address, as sc_pub_open's:
 * $SLABCAST_ADDRESS, else $XDG_RUNTIME_DIR/slabcast/broker.sock, else <tmp>/slabcast-<uid>/slabcast/broker.sock)
 * and complete the HELLO/WELCOME handshake as a subscriber.  tcp:// (protocol version 3 only): the chunks are cut by the broker and come by value (sc_chunk.data
 * points into the message, held by the client until sc_release); sc_info()->segment_bytes is 0 (nothing mapped)
 * and sc_chunk.times NULL; the client sends SYNC when it has said nothing for a second, from sc_recv and sc_wait,
 * so a subscriber that calls neither for 10 s is dropped by the broker.  A refused key, or a server key that is not
 * the broker's: SC_EDENIED. */
int sc_connect(sc_client *c, const char *address);

/* Since 1.3.0: the CURVE keys of a tcp:// connection (before sc_connect): this client's secret key file (its
 * public key must be in the broker's --curve-clients directory) and the broker's public key file, as
 * `slabcast keygen` writes them (ZeroMQ certificates: `public-key = "..."`, `secret-key = "..."`, Z85).
 * SC_EINVAL naming the file that cannot be read or holds no such key; SC_ESYS if libzmq has no CURVE. */
int sc_set_curve(sc_client *c, const char *secret_key_file, const char *server_public_key_file);

/* Fill the first `struct_size` bytes of `opts` with the defaults (size 0, seconds 0, clip 0, policy
 * "block", max_inflight 8, wake NULL, sampler 0, wait_ms -1, partial_tail 0) and set opts->struct_size =
 * struct_size (pass sizeof *opts; at least sizeof(size_t)).  C callers use the macro sc_sub_options_init(&opts). */
void sc_sub_options_init_sized(sc_sub_options *opts, size_t struct_size);
#define sc_sub_options_init(opts) sc_sub_options_init_sized((opts), sizeof *(opts))

/* Subscribe to `stream` (give exactly one of opts->size and opts->seconds; opts NULL: the defaults,
 * which name neither, so SC_EINVAL) and map its segment read-only.  opts->struct_size must be set (see
 * sc_sub_options_init) and reach at least past `size`: fields past it take their defaults.  Versions 2
 * and 3 also connect to the stream's notice socket, wait (up to the timeout of sc_set_timeout) until the
 * publisher confirms it reaches this client (JOINED), then send ATTACH; the broker's ATTACHED gives
 * sc_info()->start, from which every sample is received (version 3: and the ring descriptor of the frame
 * there, the first this client reads).  One subscription per client.  A stream that does not exist yet is
 * waited for (opts->wait_ms; SC_ENOSTREAM when the wait is 0 or expires, sc_errmsg naming the streams the
 * broker has and the closest: a misspelled name shows, at once with wait_ms 0). */
int sc_subscribe(sc_client *c, const char *stream, const sc_sub_options *opts);

/* The stream's description after a successful sc_subscribe (NULL before). */
const sc_stream_info *sc_info(const sc_client *c);

/* Since 1.3.0: channel `i`'s name, type and unit as the publisher gave them (sc_info()->channel_names[i] and
 * the others, for bindings that would rather not mirror sc_stream_info): "" for a type or unit the publisher
 * did not give; NULL before sc_subscribe succeeded or for i >= channels.  Owned by the client, valid and
 * unchanged until sc_close. */
const char *sc_channel_name(const sc_client *c, unsigned i);
const char *sc_channel_type(const sc_client *c, unsigned i);
const char *sc_channel_unit(const sc_client *c, unsigned i);

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

/*
 * Since 1.3.0: waiting in an event loop (libuv, asyncio, tokio, GLib, epoll or poll(2)) without blocking it.
 *
 * sc_fd(c) gives a file descriptor that becomes readable when the client may have something for sc_recv: a
 * publisher's notice, a message from the broker, the broker's connection dropping.  The loop watches it for
 * readability (POLLIN, EPOLLIN, libuv's UV_READABLE, asyncio's add_reader, tokio's AsyncFd::readable) and never
 * reads, writes or closes it (sc_close does).  The rule, in a loop:
 *
 *   1. Drain: call sc_recv(c, &chunk, 0) until it returns something other than SC_OK.  SC_ETIMEOUT: nothing
 *      more now, go to 2; any other code means what it means for sc_recv (SC_EOF: the end, stop watching).
 *   2. Sleep until sc_fd(c) is readable or SC_FD_WAIT_MS (100 ms) have passed, whichever comes first; then 1.
 *
 * Why that is enough.  An sc_recv(c, &chunk, 0) that returns SC_ETIMEOUT has, last of all, set this subscriber's
 * byte of the stream's sleeper table (docs/protocol.md 7.8: "about to sleep"), made a full barrier, seen the
 * ring's position unchanged, and seen nothing queued on its ZeroMQ sockets (their ZMQ_EVENTS, which also re-arms
 * their edge-triggered ZMQ_FD).  So a frame published after that call makes the publisher send this subscriber a
 * notice, and that, like any message from the broker or the connection dropping, makes the descriptor readable.
 * The byte stays set until the next sc_recv (a subscriber busy with its chunks costs the publisher no message).
 * The descriptor is an epoll instance holding the ZMQ_FD of the client's sockets: readable until sc_recv takes
 * what woke it (level-triggered; an edge-triggered watch works too, since step 1 takes everything), and it may be
 * readable with nothing to return (sc_recv then returns SC_ETIMEOUT: sleep again).  The 100 ms of step 2 is the
 * blocking sc_recv's own bound: within it the client gives back the lease locks of chunks released since its last
 * sc_recv (a lossless publisher may be waiting for that slab), sends the ACK it owes the broker (at most every
 * 100 ms: docs/protocol.md 10.3) and ends a version-2 subscription whose last notices never came.  A loop that
 * sleeps longer delays those; it loses no chunk.
 *
 * Only wake "doorbell" (the default) can be waited on so: a "futex" or "busy" subscriber sleeps in the kernel or
 * spins, on no descriptor, and sc_fd refuses it.  Versions 1 and 2 and tcp:// can (their chunks come as
 * messages; tcp://: the 100 ms bound also lets the client send its SYNC every second).
 * Threads: sc_fd and sc_recv are calls on the client (one thread at a time); the descriptor may be watched from
 * any thread.
 *
 *   libuv:   uv_poll_init(loop, &p, sc_fd(c)); uv_poll_start(&p, UV_READABLE, on_ready);
 *            uv_timer_start(&t, on_timer, SC_FD_WAIT_MS, SC_FD_WAIT_MS);   // on_timer drains too
 *            on_ready: while ((rc = sc_recv(c, &ch, 0)) == SC_OK) { use(&ch); sc_release(c, &ch); }
 *                      if (rc != SC_ETIMEOUT) { uv_poll_stop(&p); uv_timer_stop(&t); ...the end or an error... }
 *   asyncio: loop.add_reader(sc_fd(c), drain), and drain again every 0.1 s (loop.call_later) until the end.
 *   tokio:   let afd = AsyncFd::new(BorrowedFd)?; loop { drain; select! { g = afd.readable() => g?.clear_ready(),
 *            _ = sleep(Duration::from_millis(100)) => {} } } (clear_ready only after a drain saw SC_ETIMEOUT).
 */
#define SC_FD_WAIT_MS 100

/* The descriptor an event loop waits on (above), after a successful sc_subscribe; otherwise a negative sc_status
 * (SC_EINVAL: no subscription, or wake "futex" or "busy"; SC_ESYS: epoll or ZeroMQ refused) with sc_errmsg.
 * Made at the first call (the same descriptor afterwards), closed by sc_close.  Does not arm the sleeper byte:
 * drain with sc_recv(c, &chunk, 0) first (step 1). */
int sc_fd(sc_client *c);

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


/* ================================================================================ Publishing (since 1.2.0)
 *
 * A publisher writes frames (runs of samples, sample-major: channels interleaved) into a stream that any number
 * of subscribers read, Python or C, local or remote.  It makes the stream slabcast.Publisher makes
 * (docs/protocol.md section 9), with the same defaults, rules and errors: no subscriber can tell them apart.
 *
 *   sc_pub *pub;
 *   sc_pub_options o;
 *   sc_pub_options_init(&o);
 *   o.dtype = "float32"; o.channels = 8; o.rate = 1000.0;
 *   if (sc_pub_open(address, "emg", &o, &pub) != SC_OK) { fprintf(stderr, "%s\n", sc_pub_errmsg(NULL)); ... }
 *   sc_pub_write(pub, samples, n, NAN, 0, NULL);      // copied once into the stream's shared memory
 *   void *room;                                        // or write in place:
 *   sc_pub_loan(pub, n, &room); fill(room); sc_pub_commit(pub, n, t0, 0);
 *   sc_pub_close(pub);
 *
 * A write copies the frame into the slab the broker granted, describes it in the segment's descriptor ring and
 * publishes it (one store); then it wakes subscribers that sleep (FUTEX_WAKE, or a NOTICE on its notice socket
 * to those asleep there and to version-2 subscribers, one per write: the C publisher does not batch them) and
 * tells the broker only what it must know at once (PUBLISHED when a slab starts, or per frame while the broker
 * cuts chunks for TCP or version-1 subscribers).  Most writes send no message at all.
 *
 * Between writes.  The publisher answers subscribers joining its notice socket (JOINED), and the broker's
 * GRANT and CARRY, only inside its calls: sc_pub_write, sc_pub_loan, sc_pub_commit and sc_pub_flush do it (at
 * most every 5 ms, and whenever they wait).  A publisher that may go 20 ms without any of them (one that writes
 * rarely, or waits for its device) MUST call sc_pub_service at least every 20 ms meanwhile, from its own loop
 * or from a thread of its own: otherwise a subscriber that joins waits for JOINED until its timeout (then fails:
 * 5 s for the C subscriber, 10 s for Python's) and one that asks for longer chunks waits for the carry.  The
 * Python publisher runs the same service from a background thread, woken by a write, a join or a broker message.
 *
 * Threads.  A publisher (sc_pub) belongs to one thread at a time, as a client does (see "Threads" at the top),
 * with one exception: sc_pub_service may run on another thread at the same time as any call on the publisher
 * but sc_pub_close (the publisher orders them with a mutex; stop that thread before sc_pub_close).  The memory a
 * loan gives may be filled from any thread until sc_pub_commit.  sc_pub_errmsg(pub) gives the message of the
 * last call on `pub` that failed on the calling thread.  Publishers share nothing: different publishers may be
 * used on different threads at the same time.  After fork() the child must not use a publisher made before it
 * (sc_pub_write and the others return SC_EINVAL there; sc_pub_close only frees the child's memory, but for
 * libzmq's context, some 150 KB, which only the parent may close).
 *
 * Errors.  Arguments that do not fit the stream are SC_EINVAL and write nothing (a frame larger than a slab's
 * frame room, n = 0, a non-finite t0 or time, times for a stream opened without timestamps, unknown flags);
 * a dtype the stream cannot carry is refused by sc_pub_open.  No free slab within the timeout is
 * SC_EWRITETIMEOUT (nothing written; the call may be repeated).  The broker's death (SC_EBROKERGONE), its
 * ERROR (SC_EREQUEST, SC_EPROTO) or END are sticky: every later call returns them again.  Each message says what
 * was expected and what came.
 */

/* One publisher: a stream opened at a broker.  Opaque. */
typedef struct sc_pub sc_pub;

/* How to open a stream (sc_pub_options_init gives the defaults, those of slabcast.Publisher). */
typedef struct sc_pub_options {
    size_t struct_size;     /* sizeof(sc_pub_options) as the caller was compiled: set by sc_pub_options_init */
    const char *dtype;      /* sample type: a numpy dtype string ("<f4", "<i2", "|u1", ">f8", "<c8", "|b1") or
                             * name ("float32", "int16", "uint8", "float64", "complex64", "bool"...); default
                             * "float32".  Numeric kinds only (b i u f c), as Python's. */
    unsigned channels;      /* values per sample, 1..65535; default 1 */
    unsigned nslabs;        /* slabs in the stream's pool, 2..4096; default 8 */
    double rate;            /* samples per second (> 0); 0.0: the stream has none (default) */
    uint64_t slab_bytes;    /* bytes per slab, a multiple of 4096 up to 2^30; 0 (default): 4 MiB, or twice
                             * max_chunk_bytes (at least 4 MiB) when that is given.  Each slab is a carried part
                             * (max_chunk_bytes) followed by room for frames. */
    uint64_t max_chunk_bytes;  /* the longest chunk a subscriber may ask for, in bytes; 0 (default): frames get
                             * slab_bytes / 2 and chunks up to 64 MiB (or slab_bytes / 2 if more): the slabs are
                             * then that much longer in address space (sc_pub_get_info()->slab_bytes), with
                             * slab_bytes of each in memory until a subscriber asks for longer chunks */
    int timeout_ms;         /* how long a write or loan waits for a free slab (then SC_EWRITETIMEOUT), and the
                             * broker's answers (but HELLO's, 5 s whatever this is: a stale socket file of a
                             * dead broker fails after 5 s); default 10000 */
    int timestamps;         /* 1: keep a time per sample (sc_pub_write's `times`; subscribers read them beside
                             * the samples); costs 8 bytes of shared memory per sample slot.  Default 0. */
    double statistics;      /* seconds of stream time over which the broker keeps rolling per-channel
                             * statistics, 0..3600; 0: none; default 10.0 */
    const char *const *channel_names;  /* NULL (ch_0, ch_1, ...) or `channels` strings */
    const char *const *channel_types;  /* NULL or `channels` strings of at most 64 characters ("EEG", "EMG") */
    const char *const *channel_units;  /* NULL or `channels` strings of at most 64 characters ("microvolts") */
    const char *source_id;  /* NULL or a unique id of the data's origin (a device serial), at most 256 characters */
    const char *label;      /* NULL: "publisher:<stream>", as the broker's logs and `slabcast status` show it */
} sc_pub_options;

/* What the stream is, as the broker made it; owned by the publisher, valid and unchanged until sc_pub_close. */
typedef struct sc_pub_info {
    size_t struct_size;     /* sizeof(sc_pub_info) of the library: read no field that ends past it */
    const char *name;       /* stream name */
    const char *dtype;      /* numpy dtype string as sent, e.g. "<f4", "|u1" */
    unsigned itemsize;      /* bytes per value */
    unsigned channels;
    size_t sample_bytes;    /* itemsize * channels */
    double rate;            /* 0.0 when none */
    uint64_t slab_bytes;    /* bytes per slab, carried part included */
    uint64_t reserve;       /* bytes of each slab's carried part: max_chunk_bytes rounded down to whole samples */
    uint64_t max_frame;     /* the most samples one write takes: (slab_bytes - reserve) / sample_bytes */
    const char *segment;    /* the shared-memory segment's name (no leading slash) */
    size_t segment_bytes;
    unsigned nslabs;
    int timestamps;         /* 1 when the stream keeps a time per sample */
    const char *address;    /* the broker, "ipc:///path/broker.sock" */
} sc_pub_info;

/* A publisher's counters. */
typedef struct sc_pub_stats {
    size_t struct_size;     /* bytes of this struct the library filled (see sc_pub_get_stats_sized) */
    uint64_t frames;        /* frames published */
    uint64_t samples;       /* samples published: the stream's head */
    uint64_t notices;       /* NOTICEs sent on the notice socket (to subscribers asleep there, or cutting from
                             * notices: version 2) */
    uint64_t published;     /* PUBLISHED messages sent to the broker */
    uint64_t slabs;         /* slabs started */
    uint64_t wakes;         /* FUTEX_WAKE calls (futex subscribers) */
} sc_pub_stats;

/* Fill the first `struct_size` bytes of `opts` with the defaults (dtype "float32", channels 1, nslabs 8, rate 0,
 * slab_bytes 0, max_chunk_bytes 0, timeout_ms 10000, timestamps 0, statistics 10.0, the rest NULL) and set
 * opts->struct_size.  C callers use the macro sc_pub_options_init(&opts).  Any thread. */
void sc_pub_options_init_sized(sc_pub_options *opts, size_t struct_size);
#define sc_pub_options_init(opts) sc_pub_options_init_sized((opts), sizeof *(opts))

/* Open `stream` (1 to 64 characters from A-Z a-z 0-9 _ . : -) at the broker at `address` ("ipc:///path" or a
 * socket path; NULL: $SLABCAST_ADDRESS, else $XDG_RUNTIME_DIR/slabcast/broker.sock, else
 * <tmp>/slabcast-<uid>/slabcast/broker.sock, as Python's default).  opts NULL: the defaults; fields past
 * opts->struct_size take their defaults, and a larger struct is refused when the bytes this library does not
 * know are not zero.  Maps the stream's segment, takes the publisher's liveness lock, binds the notice socket
 * and waits (bounded: the timeout, at most 5 s) for the subscribers that waited for the stream.  On SC_OK
 * *out is the publisher; otherwise *out is NULL and sc_pub_errmsg(NULL) says why (SC_EEXISTS, SC_ESHMFULL,
 * SC_EREQUEST: refused; SC_EBROKERGONE: no broker; SC_EINVAL: bad options, e.g. a dtype that is not numeric). */
int sc_pub_open(const char *address, const char *stream, const sc_pub_options *opts, sc_pub **out);

/* Append one frame: `n` samples (n * sample_bytes bytes at `data`), the first at time `t0` (seconds on any clock
 * the stream agrees on; NAN: times[0] when times are given, else the wall clock now, as Python's time.time()).
 * `flags`: 0, or SC_FLAG_DISCONTINUITY (the stream jumps before this frame: no chunk spans it and each
 * subscriber's next chunk is flagged).  `times`: NULL, or n seconds, one per sample, for a stream opened with
 * timestamps (NULL there: t0 + k / rate, or t0 without a rate).  Copies the frame once into shared memory.
 * Waits (the timeout) for a free slab when the pool is full: SC_EWRITETIMEOUT, nothing written. */
int sc_pub_write(sc_pub *pub, const void *data, uint64_t n, double t0, unsigned flags, const double *times);

/* Write in place: lend room for up to `n` samples in the slab being written (moving to the next granted slab,
 * and waiting for one, as a write of n samples would) and store its address in *data.  Fill it, then
 * sc_pub_commit.  No other write or loan until then.  The room stays the caller's until sc_pub_commit (nobody
 * reads it: nothing describes it yet).  It may be filled by any stores, streaming (non-temporal) ones too:
 * sc_pub_commit makes a store fence before it publishes the frame. */
int sc_pub_loan(sc_pub *pub, uint64_t n, void **data);

/* For a stream opened with timestamps: where the open loan's per-sample times go (room for the n loaned, in the
 * stream's shared memory), in *times.  Calling it says the caller writes them: sc_pub_commit then publishes
 * them as they are (without this call it writes t0 + k / rate there). */
int sc_pub_loan_times(sc_pub *pub, double **times);

/* Publish the first `n` samples of the loan (1 .. the n loaned) as one frame, as sc_pub_write would (t0 and
 * flags as there: NAN is the first time written through sc_pub_loan_times, else the wall clock now; a stream with
 * timestamps whose times the caller did not write gets t0 + k / rate).  n = 0 gives the loan back, publishing
 * nothing.  An invalid t0, time or flags leaves the loan open. */
int sc_pub_commit(sc_pub *pub, uint64_t n, double t0, unsigned flags);

/* Wait until the broker has read every frame published so far (SYNC/SYNCED): a process killed afterwards
 * loses none of them.  timeout_ms < 0: the publisher's timeout.  SC_EWRITETIMEOUT if not confirmed in time. */
int sc_pub_flush(sc_pub *pub, int timeout_ms);

/* Answer subscribers joining the notice socket and the broker's messages, without waiting: call it at least
 * every 20 ms while no write, loan, commit or flush runs (see "Between writes"), on any thread (see
 * "Threads").  Returns SC_OK, or the sticky error the publisher met (the next write returns it too). */
int sc_pub_service(sc_pub *pub);

/* The stream as opened (never NULL for an open publisher). */
const sc_pub_info *sc_pub_get_info(const sc_pub *pub);

/* The publisher's counters: sc_pub_get_stats(pub, &stats).  `out_size` is sizeof *out as the caller was compiled;
 * the library fills at most that many bytes and sets out->struct_size to the bytes it filled. */
void sc_pub_get_stats_sized(const sc_pub *pub, sc_pub_stats *out, size_t out_size);
#define sc_pub_get_stats(pub, out) sc_pub_get_stats_sized((pub), (out), sizeof *(out))

/* End the stream: give back an open loan, mark the ring closed, wake sleeping subscribers, send NOTICE_END and
 * CLOSE, wait (the timeout) for the broker's END, close the notice socket (lingering up to 0.5 s for
 * subscribers still reading) and remove its file, say BYE, unmap, free.  Subscribers get every complete chunk,
 * then the end.  Accepts NULL.  Returns SC_OK when the broker confirmed the end, else why not (the publisher is
 * freed either way; sc_pub_errmsg(NULL) has the message). */
int sc_pub_close(sc_pub *pub);

/* The message of the last call on `pub` that failed on this thread ("no error" if none); with NULL, of the last
 * sc_pub_open or sc_pub_close that failed on this thread.  Valid until the next failing call on this thread. */
const char *sc_pub_errmsg(const sc_pub *pub);

#ifdef __cplusplus
}
#endif

#endif /* SLABCAST_H */
