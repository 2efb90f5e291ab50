/* slabcast-bench.c: per-chunk overhead of the C subscriber (chunk ready -> released), for benchmarks/c_overhead.py. */
#define _POSIX_C_SOURCE 200809L

#include "slabcast.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Nanoseconds on CLOCK_MONOTONIC, the clock of Python's time.monotonic(). */
static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/*
 * usage: slabcast-bench ADDRESS STREAM SIZE
 * Prints `ready`, then after the end of the stream one line per chunk:
 * `<overhead ns> <latency ns>`, where overhead runs from sc_wait() returning to the chunk
 * being released, and latency from the chunk's t0 (which the benchmark's publisher sets to
 * time.monotonic() at write) to sc_wait() returning.  Protocol version 1: sc_wait returns when
 * the broker's CHUNK notice is on the socket, so overhead covers decoding it and sending RELEASE.
 * Version 2 (the default): sc_wait returns once a chunk is cut from the publisher's notice and
 * leased, so that work is in the latency, and overhead covers handing it out and releasing it
 * (no message).
 */
int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: slabcast-bench ADDRESS STREAM SIZE\n");
        return 2;
    }
    sc_sub_options opts;
    sc_sub_options_init(&opts);
    opts.size = strtoull(argv[3], NULL, 10);
    size_t cap = 1 << 16, n = 0;
    int64_t *ovh = malloc(cap * sizeof *ovh), *lat = malloc(cap * sizeof *lat);
    sc_client *c = sc_new();
    if (c == NULL || ovh == NULL || lat == NULL) {
        fprintf(stderr, "slabcast-bench: out of memory\n");
        return 1;
    }
    int rc;
    if ((rc = sc_set_label(c, "slabcast-bench")) || (rc = sc_connect(c, argv[1])) ||
        (rc = sc_subscribe(c, argv[2], &opts))) {
        fprintf(stderr, "slabcast-bench: %s\n", sc_errmsg(c));
        sc_close(c);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        if ((rc = sc_wait(c, -1)) != SC_OK)
            break;
        int64_t t_ready = now_ns();
        sc_chunk ch;
        if ((rc = sc_recv(c, &ch, 0)) != SC_OK)
            break;
        if ((rc = sc_release(c, &ch)) != SC_OK)
            break;
        int64_t t_released = now_ns();
        if (n == cap) {
            cap *= 2;
            int64_t *o2 = realloc(ovh, cap * sizeof *ovh), *l2 = realloc(lat, cap * sizeof *lat);
            if (o2 == NULL || l2 == NULL) {
                fprintf(stderr, "slabcast-bench: out of memory\n");
                return 1;
            }
            ovh = o2;
            lat = l2;
        }
        ovh[n] = t_released - t_ready;
        lat[n] = t_ready - (int64_t)(ch.t0 * 1e9);
        n++;
    }
    if (rc != SC_EOF)
        fprintf(stderr, "slabcast-bench: %s\n", sc_errmsg(c));
    sc_close(c);
    for (size_t i = 0; i < n; i++)
        printf("%" PRId64 " %" PRId64 "\n", ovh[i], lat[i]);
    free(ovh);
    free(lat);
    return rc == SC_EOF ? 0 : 1;
}
