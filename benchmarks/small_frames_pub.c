/* The C publisher of benchmarks/small_frames.py: 256-byte uint8 frames back to back through libslabcast's
 * sc_pub_write, as its Python publisher writes them with Publisher.write.
 *
 *   small_frames_pub ADDRESS STREAM SECONDS STATISTICS
 *
 * Opens the stream (the pool of small_frames.py's POOL), prints "ready", waits for a line on stdin (calling
 * sc_pub_service meanwhile), writes
 * for SECONDS (the clock read every 1024 frames), closes, and prints
 * "frames t_first t_written t_closed cpu_seconds" (CLOCK_MONOTONIC, as Python's time.monotonic; the
 * process's CPU, all threads: libzmq's included). */
#include <poll.h>
#include <slabcast.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double clock_s(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s ADDRESS STREAM SECONDS STATISTICS\n", argv[0]);
        return 2;
    }
    sc_pub_options o;
    sc_pub_options_init(&o);
    o.dtype = "uint8";
    o.slab_bytes = 4u << 20;
    o.nslabs = 8;
    o.max_chunk_bytes = 1u << 20;
    o.timeout_ms = 60000;
    o.statistics = atof(argv[4]);
    sc_pub *pub;
    if (sc_pub_open(argv[1], argv[2], &o, &pub) != SC_OK) {
        fprintf(stderr, "small_frames_pub: %s\n", sc_pub_errmsg(NULL));
        return 1;
    }
    unsigned char frames[4][256];
    for (int k = 0; k < 4; k++)
        memset(frames[k], k + 1, sizeof frames[k]);
    printf("ready\n");
    fflush(stdout);
    /* Idle until the go line: the publisher must be serviced every 20 ms meanwhile (slabcast.h). */
    struct pollfd in = {.fd = 0, .events = POLLIN};
    while (poll(&in, 1, 10) == 0)
        sc_pub_service(pub);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    double cpu0 = clock_s(CLOCK_PROCESS_CPUTIME_ID), first = clock_s(CLOCK_MONOTONIC);
    double deadline = first + atof(argv[3]);
    long n = 0;
    for (;;) {
        for (int k = 0; k < 1024; k++, n++) {
            if (sc_pub_write(pub, frames[n & 3], 256, 1.0, 0, NULL) != SC_OK) {
                fprintf(stderr, "small_frames_pub: %s\n", sc_pub_errmsg(pub));
                return 1;
            }
        }
        if (clock_s(CLOCK_MONOTONIC) > deadline)
            break;
    }
    double written = clock_s(CLOCK_MONOTONIC);
    if (sc_pub_close(pub) != SC_OK) {
        fprintf(stderr, "small_frames_pub: close: %s\n", sc_pub_errmsg(NULL));
        return 1;
    }
    printf("%ld %.9f %.9f %.9f %.9f\n", n, first, written, clock_s(CLOCK_MONOTONIC),
           clock_s(CLOCK_PROCESS_CPUTIME_ID) - cpu0);
    return 0;
}
