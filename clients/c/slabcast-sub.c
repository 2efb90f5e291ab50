/* slabcast-sub.c: example subscriber that prints one line per chunk (seq, index, n, t0, crc32 of the bytes). */
#define _POSIX_C_SOURCE 200809L

#include "slabcast.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char USAGE[] =
    "usage: slabcast-sub --address ADDR --stream NAME (--size N | --seconds S) [--clip]\n"
    "                    [--policy block|drop] [--max-inflight M] [--count K] [--label TEXT]\n"
    "                    [--timeout-ms MS] [--protocol-version V] [--wake doorbell|futex|busy]\n"
    "                    [--show-flags]\n"
    "       slabcast-sub --version\n"
    "\n"
    "Prints `ready` once subscribed, then one line per chunk:\n"
    "  seq=<seq> index=<index> n=<samples> t0=<seconds> crc=<crc32 of the chunk's bytes>\n"
    "(--show-flags appends ` flags=<chunk flags>`; bit 0: discontinuity before the chunk).\n"
    "Exit status: 0 at the end of the stream (or after --count chunks), 2 usage, 3 broker gone,\n"
    "4 publisher gone, 5 protocol version mismatch, 6 unknown stream,\n"
    "7 samples lost (policy block; the message names them), 1 any other error.\n"
    "--protocol-version: 3 (default) cuts the chunks in this program from the stream's descriptor ring;\n"
    "2 cuts them from the publisher's notices; 1 lets the broker cut them (CHUNK/RELEASE); other values\n"
    "test version negotiation.\n"
    "--wake (version 3): how it waits for the next frame: doorbell (default: the publisher's notice),\n"
    "futex (FUTEX_WAIT on the ring's position) or busy (spinning on it).\n";

static volatile sig_atomic_t stop_signal = 0;

/* SIGINT/SIGTERM: leave the receive loop and close cleanly (BYE). */
static void on_signal(int sig)
{
    stop_signal = sig;
}

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
    default: return 1;
    }
}

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "slabcast-sub: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n%s", USAGE);
    return 2;
}

/* Parse a non-negative integer argument; return 0 on success. */
static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (s == NULL || *s == '\0' || *s == '-')
        return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    const char *address = NULL, *stream = NULL, *label = "slabcast-sub";
    sc_sub_options opts;
    sc_sub_options_init(&opts);
    uint64_t count = 0, version = SC_PROTOCOL_VERSION, max_inflight = opts.max_inflight, timeout_ms = 5000;
    int have_count = 0, show_flags = 0;

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
        } else if (strcmp(a, "--show-flags") == 0) {
            show_flags = 1;
            continue;
        }
        if (v == NULL)
            return usage_error("%s needs a value (or is unknown)", a);
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
        } else if (strcmp(a, "--policy") == 0) {
            opts.policy = v;
        } else if (strcmp(a, "--wake") == 0) {
            opts.wake = v;  /* checked by sc_subscribe */
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
    if (address == NULL)
        return usage_error("%s", "--address is required");
    if (stream == NULL)
        return usage_error("%s", "--stream is required");
    if ((opts.size > 0) == (opts.seconds > 0))
        return usage_error("%s", "give exactly one of --size and --seconds");
    opts.max_inflight = (unsigned)max_inflight;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    crc32_init();

    sc_client *c = sc_new();
    if (c == NULL) {
        fprintf(stderr, "slabcast-sub: out of memory\n");
        return 1;
    }
    int rc;
    if ((rc = sc_set_label(c, label)) || (rc = sc_set_timeout(c, (int)timeout_ms)) ||
        (rc = sc_set_protocol_version(c, (unsigned)version)) || (rc = sc_connect(c, address)) ||
        (rc = sc_subscribe(c, stream, &opts))) {
        fprintf(stderr, "slabcast-sub: %s [%s]\n", sc_errmsg(c), sc_strerror(rc));
        sc_close(c);
        return exit_status(rc);
    }
    printf("ready\n");
    fflush(stdout);

    uint64_t got = 0;
    for (;;) {
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
        uint32_t crc = crc32_of(ch.data, ch.nbytes);
        printf("seq=%" PRIu64 " index=%" PRIu64 " n=%" PRIu64 " t0=%.9f crc=%08" PRIx32, ch.seq, ch.index, ch.n, ch.t0,
               crc);
        if (show_flags)
            printf(" flags=%u", ch.flags);
        putchar('\n');
        fflush(stdout);
        got++;
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
