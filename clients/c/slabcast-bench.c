/* slabcast-bench.c: per-chunk overhead and CPU time of the C subscriber (chunk ready -> released), for
 * benchmarks/c_overhead.py. */
#define _POSIX_C_SOURCE 200809L

#include "slabcast.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Nanoseconds on `clock` (CLOCK_MONOTONIC is the clock of Python's time.monotonic()). */
static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/*
 * usage: slabcast-bench ADDRESS STREAM SIZE [WAKE]
 * Prints `ready`, then after the end of the stream one line per chunk:
 * `<overhead ns> <latency ns>`, where overhead runs from sc_wait() returning to the chunk
 * being released, and latency from the chunk's t0 (which the benchmark's publisher sets to
 * time.monotonic() at write) to sc_wait() returning.  Protocol version 3 (the default): sc_wait returns
 * once a chunk is cut from the ring's descriptors and leased, so that work (and the wake-up, by WAKE:
 * doorbell, futex or busy) is in the latency, and overhead covers handing it out and releasing it
 * (no message).  Last, on stderr: the CPU time of the main thread and of the whole process (ZeroMQ's
 * I/O thread included) from `ready` to the end, per chunk, in microseconds:
 * `cpu-per-chunk-us thread=<t> process=<p> chunks=<n>`.
 */
int main(int argc, char **argv)
{
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: slabcast-bench ADDRESS STREAM SIZE [doorbell|futex|busy]\n");
        return 2;
    }
    sc_sub_options opts;
    sc_sub_options_init(&opts);
    opts.size = strtoull(argv[3], NULL, 10);
    opts.wake = argc == 5 ? argv[4] : NULL;
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
    int64_t cpu_thread = now_ns(CLOCK_THREAD_CPUTIME_ID), cpu_process = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    for (;;) {
        if ((rc = sc_wait(c, -1)) != SC_OK)
            break;
        int64_t t_ready = now_ns(CLOCK_MONOTONIC);
        sc_chunk ch;
        if ((rc = sc_recv(c, &ch, 0)) != SC_OK)
            break;
        if ((rc = sc_release(c, &ch)) != SC_OK)
            break;
        int64_t t_released = now_ns(CLOCK_MONOTONIC);
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
    cpu_thread = now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu_thread;
    cpu_process = now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu_process;
    if (rc != SC_EOF)
        fprintf(stderr, "slabcast-bench: %s\n", sc_errmsg(c));
    sc_close(c);
    for (size_t i = 0; i < n; i++)
        printf("%" PRId64 " %" PRId64 "\n", ovh[i], lat[i]);
    if (n > 0)
        fprintf(stderr, "cpu-per-chunk-us thread=%.3f process=%.3f chunks=%zu\n", cpu_thread / 1e3 / (double)n,
                cpu_process / 1e3 / (double)n, n);
    free(ovh);
    free(lat);
    return rc == SC_EOF ? 0 : 1;
}
