/* slabcast-sub.c: example subscriber that prints one line per chunk (seq, index, n, t0, crc32 of the bytes); with
 * --poll it waits in a poll(2) event loop on sc_fd, as slabcast.h's "waiting in an event loop" says. */
#define _POSIX_C_SOURCE 200809L

#include "slabcast.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char USAGE[] =
    "usage: slabcast-sub [--address ADDR] --stream NAME (--size N | --seconds S) [--clip]\n"
    "                    [--policy block|drop] [--max-inflight M] [--count K] [--label TEXT]\n"
    "                    [--timeout-ms MS] [--protocol-version V] [--wake doorbell|futex|busy]\n"
    "                    [--show-flags] [--show-times] [--info] [--sampler S] [--wait-ms MS] [--partial-tail]\n"
    "                    [--poll [--tick-ms T] [--poll-max-ms P]] [--curve SECRET PUBLIC] [--work-ms W]\n"
    "       slabcast-sub --version\n"
    "\n"
    "Prints `ready` once subscribed, then one line per chunk:\n"
    "  seq=<seq> index=<index> n=<samples> t0=<seconds> crc=<crc32 of the chunk's bytes>\n"
    "(--show-flags appends ` flags=<chunk flags>`; bit 0: discontinuity before the chunk, bit 2: partial; --show-times\n"
    "appends "
    "` times=<crc32 of the chunk's per-sample times, n little-endian f64>`, or ` times=-` for a stream without them).\n"
    "--partial-tail: the samples gathered before the stream's end or a discontinuity as a partial chunk (flag 4).\n"
    "--info prints, before `ready`, `info <JSON>`: the stream's name, dtype, channels, rate (null: none), size,\n"
    "start, channel_names, channel_types, channel_units, source_id and timestamps.\n"
    "--address: the broker (ipc:// endpoint, socket path, or tcp://HOST:PORT); default $SLABCAST_ADDRESS, else\n"
    "the per-user socket Python's broker uses ($XDG_RUNTIME_DIR/slabcast/broker.sock, else /tmp/slabcast-<uid>/...).\n"
    "--sampler S: skip S seconds of stream time after each chunk (Python's sampler=S).\n"
    "--work-ms W: hold each chunk W milliseconds (asleep) before releasing it: a slow consumer.\n"
    "--wait-ms MS: wait up to MS ms for a stream that does not exist yet (default 0: exit 6 at once; -1: the\n"
    "timeout).\n"
    "--poll: wait in a poll(2) loop on sc_fd (wake doorbell) that also does other work every --tick-ms (default 10;\n"
    "1 ms of computing each), looking at the client at least every --poll-max-ms (default SC_FD_WAIT_MS, 100);\n"
    "each chunk line ends with ` at=<wall-clock seconds when the loop got it>`, and a last line says\n"
    "`loop ticks=<T> late_ms=<the latest a tick ran> fd_wakeups=<W> idle_wakeups=<I> max_drain_us=<D>`.\n"
    "--curve SECRET PUBLIC: for a tcp://HOST:PORT address, this client's secret key file and the broker's public\n"
    "key file (`slabcast keygen`); exit status 8 when the broker refuses the key or the server key is wrong.\n"
    "Exit status: 0 at the end of the stream (or after --count chunks), 2 usage, 3 broker gone,\n"
    "4 publisher gone, 5 protocol version mismatch, 6 unknown stream,\n"
    "7 samples lost (policy block; the message names them), 8 CURVE key refused (tcp://), 1 any other error.\n"
    "--protocol-version: 3 (default) cuts the chunks in this program from the stream's descriptor ring;\n"
    "2 cuts them from the publisher's notices; 1 lets the broker cut them (CHUNK/RELEASE); other values\n"
    "test version negotiation.\n"
    "--wake (version 3): how it waits for the next frame: doorbell (default: the publisher's notice),\n"
    "futex (FUTEX_WAIT on the ring's position) or busy (spinning on it).\n";

#define PROGRAM "slabcast-sub"
#include "programs.h"


/* CRC-32 as in zlib (reflected polynomial 0xEDB88320), so Python's zlib.crc32 gives the same value. */
static uint32_t crc_table[256];

static void crc32_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t v = i;
        for (int k = 0; k < 8; k++)
            v = (v & 1) ? (v >> 1) ^ 0xEDB88320u : v >> 1;
        crc_table[i] = v;
    }
}

static uint32_t crc32_of(const unsigned char *p, size_t n)
{
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++)
        crc = crc_table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

/* Exit status for a return code (see USAGE). */
static int exit_status(int rc)
{
    switch (rc) {
    case SC_OK:
    case SC_EOF: return 0;
    case SC_EBROKERGONE: return 3;
    case SC_EPUBGONE: return 4;
    case SC_EVERSION: return 5;
    case SC_ENOSTREAM: return 6;
    case SC_ELOST: return 7;
    case SC_EDENIED: return 8;
    default: return 1;
    }
}

/* ------------------------------------------------------------------ --info */

/* `s` as a JSON string (UTF-8 passes through; quotes, backslashes and control characters escaped). */
static void print_json_string(const char *s)
{
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if (*p < 0x20)
            printf("\\u%04x", *p);
        else
            putchar(*p);
    }
    putchar('"');
}

/* A JSON array of the stream's `channels` strings, or [] when the publisher gave none (list NULL). */
static void print_json_list(const char *const *list, unsigned channels)
{
    putchar('[');
    for (unsigned i = 0; list != NULL && i < channels; i++) {
        if (i)
            fputs(", ", stdout);
        print_json_string(list[i]);
    }
    putchar(']');
}

/* `info {...}`: what SUBSCRIBED said about the stream (sc_info; the channel strings as sc_channel_name reads them). */
static void print_info(const sc_client *c)
{
    const sc_stream_info *in = sc_info(c);
    printf("info {\"name\": ");
    print_json_string(in->name);
    printf(", \"dtype\": ");
    print_json_string(in->dtype);
    printf(", \"channels\": %u, \"rate\": ", in->channels);
    if (in->rate > 0)
        printf("%.17g", in->rate);
    else
        printf("null");
    printf(", \"size\": %" PRIu64 ", \"start\": %" PRIu64 ", \"channel_names\": [", in->size, in->start);
    for (unsigned i = 0; i < in->channels; i++) {
        if (i)
            fputs(", ", stdout);
        print_json_string(sc_channel_name(c, i));
    }
    printf("], \"channel_types\": ");
    print_json_list(in->channel_types, in->channels);
    printf(", \"channel_units\": ");
    print_json_list(in->channel_units, in->channels);
    printf(", \"source_id\": ");
    print_json_string(in->source_id);
    printf(", \"timestamps\": %s}\n", in->timestamps ? "true" : "false");
}

/* ------------------------------------------------------------- chunk lines */

typedef struct show {
    int flags, times;
} show;

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* One chunk's line (without its newline). */
static void print_chunk(const sc_chunk *ch, show sh)
{
    uint32_t crc = crc32_of(ch->data, ch->nbytes);
    printf("seq=%" PRIu64 " index=%" PRIu64 " n=%" PRIu64 " t0=%.9f crc=%08" PRIx32, ch->seq, ch->index, ch->n,
           ch->t0, crc);
    if (sh.flags)
        printf(" flags=%u", ch->flags);
    if (sh.times) {
        if (ch->times != NULL)
            printf(" times=%08" PRIx32, crc32_of((const unsigned char *)ch->times, ch->n * sizeof *ch->times));
        else
            printf(" times=-");
    }
}

/* ------------------------------------------------------------------ --poll */

/* The loop's other work: 1 ms of computing (what an application does between chunks). */
static volatile double work_sink;

static void other_work(void)
{
    double until = mono_ms() + 1.0, x = 0;
    while (mono_ms() < until)
        for (int i = 0; i < 1000; i++)
            x += sqrt((double)i);
    work_sink = x;
}

/*
 * A poll(2) event loop, as slabcast.h's "waiting in an event loop" says: drain with sc_recv(c, &chunk, 0) until
 * SC_ETIMEOUT, then sleep in poll on sc_fd and on the loop's own timer (other work every `tick_ms`), never longer
 * than `max_ms`.  Returns the code that ended it (SC_OK: --count chunks, or a signal).
 */
static int poll_loop(sc_client *c, show sh, uint64_t count, int have_count, double tick_ms, double max_ms)
{
    int fd = sc_fd(c);
    if (fd < 0)
        return fd;
    uint64_t got = 0, ticks = 0, fd_wakeups = 0, idle_wakeups = 0;
    double late = 0, max_drain = 0, now = mono_ms(), next_tick = now + tick_ms, next_look = now + max_ms;
    int rc = SC_OK, woke_by_fd = 0, first = 1;
    for (;;) {
        if (stop_signal || (have_count && got >= count)) {
            rc = SC_OK;
            break;
        }
        now = mono_ms();
        if (now >= next_tick) {
            ticks++;
            if (now - next_tick > late)
                late = now - next_tick;
            other_work();
            next_tick += tick_ms;
            if (next_tick < mono_ms())
                next_tick = mono_ms() + tick_ms;  /* (behind by more than a tick: start again from now) */
            continue;
        }
        if (first || woke_by_fd || now >= next_look) {
            /* Drain: every chunk ready now, until SC_ETIMEOUT (which leaves the client armed for the fd). */
            double t = mono_ms();
            int drained = 0;
            sc_chunk ch;
            while (!(have_count && got >= count) && (rc = sc_recv(c, &ch, 0)) == SC_OK) {
                print_chunk(&ch, sh);
                printf(" at=%.6f\n", wall_now());
                fflush(stdout);
                got++;
                drained++;
                if ((rc = sc_release(c, &ch)) != SC_OK)
                    break;
            }
            if (mono_ms() - t > max_drain)
                max_drain = mono_ms() - t;
            if (!first) {
                if (woke_by_fd)
                    fd_wakeups++;
                else
                    idle_wakeups++;
            }
            first = woke_by_fd = 0;
            next_look = mono_ms() + max_ms;
            if (rc != SC_ETIMEOUT && rc != SC_OK)
                break;
            (void)drained;
            continue;
        }
        double until = next_tick < next_look ? next_tick : next_look;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int n = poll(&p, 1, (int)ceil(until - now));
        if (n < 0 && errno != EINTR) {
            fprintf(stderr, "slabcast-sub: poll failed: %s\n", strerror(errno));
            return SC_ESYS;
        }
        woke_by_fd = n > 0 && (p.revents & POLLIN);
    }
    printf("loop ticks=%" PRIu64 " late_ms=%.3f fd_wakeups=%" PRIu64 " idle_wakeups=%" PRIu64 " max_drain_us=%.0f\n",
           ticks, late, fd_wakeups, idle_wakeups, max_drain * 1e3);
    fflush(stdout);
    return rc;
}

int main(int argc, char **argv)
{
    const char *address = NULL, *stream = NULL, *label = "slabcast-sub", *curve_secret = NULL, *curve_public = NULL;
    sc_sub_options opts;
    sc_sub_options_init(&opts);
    uint64_t count = 0, version = SC_PROTOCOL_VERSION, max_inflight = opts.max_inflight, timeout_ms = 5000;
    int have_count = 0, info = 0, poll_mode = 0;
    double tick_ms = 10, poll_max_ms = SC_FD_WAIT_MS, work_ms = 0;
    show sh = {0, 0};
    opts.wait_ms = 0;  /* an unknown stream is exit status 6 at once, unless --wait-ms */

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(USAGE, stdout);
            return 0;
        }
        if (strcmp(a, "--version") == 0) {
            printf("slabcast-sub: libslabcast %s (ABI %d, built with %s), wire protocol %d\n",
                   sc_library_version(NULL, NULL, NULL), sc_abi_version(), SC_VERSION_STRING, SC_PROTOCOL_VERSION);
            return 0;
        } else if (strcmp(a, "--clip") == 0) {
            opts.clip = 1;
            continue;
        } else if (strcmp(a, "--partial-tail") == 0) {
            opts.partial_tail = 1;
            continue;
        } else if (strcmp(a, "--show-flags") == 0) {
            sh.flags = 1;
            continue;
        } else if (strcmp(a, "--show-times") == 0) {
            sh.times = 1;
            continue;
        } else if (strcmp(a, "--info") == 0) {
            info = 1;
            continue;
        } else if (strcmp(a, "--poll") == 0) {
            poll_mode = 1;
            continue;
        }
        static const char *const VALUED[] = {"--address", "--stream", "--size", "--seconds", "--sampler", "--wait-ms",
                                             "--tick-ms", "--poll-max-ms", "--curve", "--policy", "--wake",
                                             "--max-inflight", "--count", "--label", "--timeout-ms",
                                             "--protocol-version", "--work-ms", NULL};
        int valued = 0;
        for (const char *const *o = VALUED; *o != NULL && !valued; o++)
            valued = strcmp(a, *o) == 0;
        if (!valued)
            return usage_error("unknown option '%s'", a);
        if (v == NULL)
            return usage_error("%s needs a value", a);
        i++;
        if (strcmp(a, "--address") == 0) {
            address = v;
        } else if (strcmp(a, "--stream") == 0) {
            stream = v;
        } else if (strcmp(a, "--size") == 0) {
            if (parse_u64(v, &opts.size) || opts.size == 0)
                return usage_error("--size must be a positive integer number of samples, got '%s'", v);
        } else if (strcmp(a, "--seconds") == 0) {
            char *end;
            opts.seconds = strtod(v, &end);
            if (*end || !(opts.seconds > 0))
                return usage_error("--seconds must be a positive number, got '%s'", v);
        } else if (strcmp(a, "--sampler") == 0) {
            char *end;
            opts.sampler = strtod(v, &end);
            if (*end || !(opts.sampler >= 0))
                return usage_error("--sampler must be seconds >= 0, got '%s'", v);
        } else if (strcmp(a, "--wait-ms") == 0) {
            char *end;
            long w = strtol(v, &end, 10);
            if (*end || *v == '\0' || w < -1 || w > 86400000)
                return usage_error("--wait-ms must be -1 (the timeout) or 0..86400000, got '%s'", v);
            opts.wait_ms = (int)w;
        } else if (strcmp(a, "--tick-ms") == 0 || strcmp(a, "--poll-max-ms") == 0) {
            char *end;
            double ms = strtod(v, &end);
            if (*end || !(ms >= 1 && ms <= 60000))
                return usage_error("--tick-ms and --poll-max-ms must be 1..60000 milliseconds, got '%s'", v);
            *(strcmp(a, "--tick-ms") == 0 ? &tick_ms : &poll_max_ms) = ms;
        } else if (strcmp(a, "--curve") == 0) {
            if (i + 1 >= argc)
                return usage_error("%s needs two files: this client's secret key and the broker's public key", a);
            curve_secret = v;
            curve_public = argv[++i];
        } else if (strcmp(a, "--policy") == 0) {
            if (strcmp(v, "block") != 0 && strcmp(v, "drop") != 0)
                return usage_error("--policy must be block or drop, got '%s'", v);
            opts.policy = v;
        } else if (strcmp(a, "--wake") == 0) {
            if (strcmp(v, "doorbell") != 0 && strcmp(v, "futex") != 0 && strcmp(v, "busy") != 0)
                return usage_error("--wake must be doorbell, futex or busy, got '%s'", v);
            opts.wake = v;
        } else if (strcmp(a, "--work-ms") == 0) {
            char *end;
            work_ms = strtod(v, &end);
            if (*end || !(work_ms >= 0 && work_ms <= 60000))
                return usage_error("--work-ms must be 0..60000 milliseconds, got '%s'", v);
        } else if (strcmp(a, "--max-inflight") == 0) {
            if (parse_u64(v, &max_inflight) || max_inflight < 1 || max_inflight > 1024)
                return usage_error("--max-inflight must be 1..1024, got '%s'", v);
        } else if (strcmp(a, "--count") == 0) {
            if (parse_u64(v, &count) || count == 0)
                return usage_error("--count must be a positive integer, got '%s'", v);
            have_count = 1;
        } else if (strcmp(a, "--label") == 0) {
            label = v;
        } else if (strcmp(a, "--timeout-ms") == 0) {
            if (parse_u64(v, &timeout_ms) || timeout_ms > 3600000)
                return usage_error("--timeout-ms must be 0..3600000, got '%s'", v);
        } else if (strcmp(a, "--protocol-version") == 0) {
            if (parse_u64(v, &version) || version > 0xFFFFFFFFu)
                return usage_error("--protocol-version must be a non-negative integer, got '%s'", v);
        } else {
            return usage_error("unknown option '%s'", a);
        }
    }
    if (stream == NULL)
        return usage_error("%s", "--stream is required");
    if ((opts.size > 0) == (opts.seconds > 0))
        return usage_error("%s", "give exactly one of --size and --seconds");
    const char *where = address != NULL ? address : getenv("SLABCAST_ADDRESS");  /* (sc_connect's default) */
    if (opts.partial_tail && ((where != NULL && strncmp(where, "tcp://", 6) == 0) || version == 1))
        return usage_error("--partial-tail needs a local subscriber (an ipc:// broker, protocol version 2 or 3); got "
                           "%s", version == 1 ? "--protocol-version 1" : where);
    if (poll_mode && opts.wake != NULL && strcmp(opts.wake, "doorbell") != 0)
        return usage_error("--poll waits on sc_fd, which only --wake doorbell (the default) has; got --wake %s",
                           opts.wake);
    opts.max_inflight = (unsigned)max_inflight;

    catch_stop_signals();
    crc32_init();

    sc_client *c = sc_new();
    if (c == NULL) {
        fprintf(stderr, "slabcast-sub: out of memory\n");
        return 1;
    }
    int rc;
    if ((rc = sc_set_label(c, label)) || (rc = sc_set_timeout(c, (int)timeout_ms)) ||
        (rc = sc_set_protocol_version(c, (unsigned)version)) ||
        (curve_secret != NULL && (rc = sc_set_curve(c, curve_secret, curve_public))) || (rc = sc_connect(c, address)) ||
        (rc = sc_subscribe(c, stream, &opts))) {
        fprintf(stderr, "slabcast-sub: %s [%s]\n", sc_errmsg(c), sc_strerror(rc));
        sc_close(c);
        return exit_status(rc);
    }
    if (info)
        print_info(c);
    printf("ready\n");
    fflush(stdout);

    uint64_t got = 0;
    if (poll_mode)
        rc = poll_loop(c, sh, count, have_count, tick_ms, poll_max_ms);
    for (; !poll_mode;) {
        if (stop_signal) {
            rc = SC_OK;
            break;
        }
        if (have_count && got >= count) {
            rc = SC_OK;
            break;
        }
        sc_chunk ch;
        rc = sc_recv(c, &ch, 250);  /* bounded, so a signal is noticed */
        if (rc == SC_ETIMEOUT)
            continue;
        if (rc != SC_OK)
            break;
        print_chunk(&ch, sh);
        putchar('\n');
        fflush(stdout);
        got++;
        if (work_ms > 0) {  /* a slow consumer: the chunk is held meanwhile */
            struct timespec w = {(time_t)(work_ms / 1e3), (long)(fmod(work_ms, 1e3) * 1e6)};
            while (nanosleep(&w, &w) != 0 && !stop_signal) {
            }
        }
        if ((rc = sc_release(c, &ch)) != SC_OK)
            break;
    }
    int status = exit_status(rc);
    if (rc != SC_OK && rc != SC_EOF)
        fprintf(stderr, "slabcast-sub: %s [%s]\n", sc_errmsg(c), sc_strerror(rc));
    sc_close(c);
    if (stop_signal && status == 0)
        status = 128 + (int)stop_signal;
    return status;
}
