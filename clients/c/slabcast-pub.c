/* slabcast-pub.c: publish a stream from C: raw samples from stdin, framed records from stdin, or a counter pattern. */
#define _POSIX_C_SOURCE 200809L

#include "slabcast.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char USAGE[] =
    "usage: slabcast-pub [--address ADDR] --stream NAME [--dtype D] [--channels C] [--rate HZ]\n"
    "                    [--slab-bytes B] [--nslabs N] [--max-chunk-bytes B] [--timeout-ms MS]\n"
    "                    [--timestamps] [--channel-names A,B,..] [--channel-types A,B,..]\n"
    "                    [--channel-units A,B,..] [--source-id ID] [--statistics S] [--label TEXT]\n"
    "                    [--frame N] [--framed | --pattern N [--repeat] [--go]] [--t0 T] [--pace-us US]\n"
    "                    [--loan] [--flush] [--hang] [--cpu] [--dry]\n"
    "       slabcast-pub --version\n"
    "\n"
    "Opens the stream, prints `ready`, then writes frames until its input ends and closes the stream.\n"
    "--address: the broker; default $SLABCAST_ADDRESS, else the per-user socket Python's broker uses.\n"
    "Input (samples are sample-major: channels interleaved, in the stream's dtype, native byte order):\n"
    "  default       raw samples from stdin, --frame N samples per write (default 1024; the last write\n"
    "                takes what is left; bytes of a sample the input ends inside are dropped, said, exit 10)\n"
    "  --framed      records from stdin, one per frame: u32 n, u32 flags (bit 0: discontinuity before the\n"
    "                frame; bit 8: n f64 per-sample times follow), f64 t0 (NaN: the wall clock now), [times],\n"
    "                then n samples; little-endian\n"
    "  --pattern N   N samples of a counter: value k of the stream (sample k / C, channel k % C) is k, cast to\n"
    "                the dtype as numpy's astype does from int64; --frame N per write; --repeat: every frame\n"
    "                holds the first frame's values (no work per frame but the write); --go: wait for a line\n"
    "                on stdin before the first write\n"
    "t0 of each frame (default and --pattern): --t0 T plus its first sample's index / rate (frame number\n"
    "without a rate); without --t0, the wall clock at the write.  --pace-us: at most one write per US\n"
    "microseconds.  --loan: write in place (sc_pub_loan, fill, sc_pub_commit) instead of sc_pub_write.\n"
    "--flush: confirm with the broker before closing.  --hang: after the last write, flush, print\n"
    "`wrote <frames> <samples>` and wait to be killed, never closing.  --cpu: print on stderr, at the end,\n"
    "`cpu-per-write-us thread=<t> process=<p> writes=<n>`, the CPU time of the writing thread and of the whole\n"
    "process (ZeroMQ's threads and the service thread included) from the first write to the last, per write;\n"
    "--dry: everything but the writes themselves (what --cpu then prints is the loop's own cost: pacing).\n"
    "A thread calls sc_pub_service every 20 ms, so subscribers that join between writes are answered.\n"
    "Prints `done frames=<f> samples=<s>` after closing.  Exit status: 0 done, 2 usage, 3 broker gone,\n"
    "8 no free slab within the timeout (SC_EWRITETIMEOUT), 9 the stream exists, 10 invalid argument or\n"
    "frame (SC_EINVAL), 1 any other error.\n";

#define PROGRAM "slabcast-pub"
#include "programs.h"

#define SERVICE_NS 20000000L  /* the service thread's period (Python's sleeps until a socket or a write wakes it;
                                 a turn here costs microseconds, not a cold interpreter's 150-450) */

static int exit_status(int rc)
{
    switch (rc) {
    case SC_OK: return 0;
    case SC_EBROKERGONE: return 3;
    case SC_EWRITETIMEOUT: return 8;
    case SC_EEXISTS: return 9;
    case SC_EINVAL: return 10;
    default: return 1;
    }
}

/* "a,b,c" as `count` strings (NULL when the count differs). */
static const char **split(char *s, unsigned count)
{
    const char **out = calloc(count + 1, sizeof *out);
    unsigned k = 0;
    for (char *tok = strtok(s, ","); tok != NULL && out != NULL; tok = strtok(NULL, ",")) {
        if (k == count) {
            free(out);
            return NULL;
        }
        out[k++] = tok;
    }
    if (k != count) {
        free(out);
        return NULL;
    }
    return out;
}

static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Sample values of the counter pattern: element k (k = index * channels + channel) is k, cast to the dtype. */
static void fill_pattern(unsigned char *out, const char *dtype, unsigned itemsize, uint64_t first, uint64_t count)
{
    char kind = dtype[1];
    for (uint64_t i = 0; i < count; i++) {
        int64_t v = (int64_t)(first + i);
        unsigned char *p = out + i * itemsize;
        if (kind == 'b') {
            p[0] = v != 0;
        } else if (kind == 'i' || kind == 'u') {
            uint64_t u = (uint64_t)v;  /* two's complement, cut to the item size: numpy's astype from int64 */
            memcpy(p, &u, itemsize);
        } else if (kind == 'f' && itemsize == 4) {
            float f = (float)v;
            memcpy(p, &f, 4);
        } else if (kind == 'f' && itemsize == 8) {
            double d = (double)v;
            memcpy(p, &d, 8);
        } else if (kind == 'c' && itemsize == 8) {
            float f[2] = {(float)v, 0.0f};
            memcpy(p, f, 8);
        } else if (kind == 'c' && itemsize == 16) {
            double d[2] = {(double)v, 0.0};
            memcpy(p, d, 16);
        } else {
            memset(p, 0, itemsize);
        }
    }
}

/* The service thread: sc_pub_service every SERVICE_NS until `running` is cleared. */
typedef struct service_arg {
    sc_pub *pub;
    volatile int running;
} service_arg;

static void *service_main(void *arg)
{
    service_arg *s = arg;
    struct timespec ts = {0, SERVICE_NS};
    while (__atomic_load_n(&s->running, __ATOMIC_ACQUIRE)) {
        nanosleep(&ts, NULL);
        if (sc_pub_service(s->pub) != SC_OK)
            break;  /* sticky: the next write returns it */
    }
    return NULL;
}

static size_t read_full(void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        size_t k = fread((char *)buf + got, 1, n - got, stdin);
        if (k == 0)
            break;
        got += k;
    }
    return got;
}

int main(int argc, char **argv)
{
    const char *address = NULL, *stream = NULL;
    char *names = NULL, *types = NULL, *units = NULL;
    sc_pub_options o;
    sc_pub_options_init(&o);
    uint64_t frame = 1024, pattern = 0, pace_us = 0, v = 0;
    double t0_base = NAN;
    int framed = 0, loan = 0, flush = 0, hang = 0, cpu = 0, repeat = 0, go = 0, have_pattern = 0, dry = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(USAGE, stdout);
            return 0;
        }
        if (strcmp(a, "--version") == 0) {
            printf("slabcast-pub: libslabcast %s (ABI %d, built with %s), wire protocol %d\n",
                   sc_library_version(NULL, NULL, NULL), sc_abi_version(), SC_VERSION_STRING, SC_PROTOCOL_VERSION);
            return 0;
        }
        int *flag = strcmp(a, "--framed") == 0 ? &framed : strcmp(a, "--loan") == 0 ? &loan
                  : strcmp(a, "--flush") == 0 ? &flush : strcmp(a, "--hang") == 0 ? &hang
                  : strcmp(a, "--cpu") == 0 ? &cpu : strcmp(a, "--repeat") == 0 ? &repeat
                  : strcmp(a, "--go") == 0 ? &go : strcmp(a, "--timestamps") == 0 ? &o.timestamps
                  : strcmp(a, "--dry") == 0 ? &dry : NULL;
        if (flag != NULL) {
            *flag = 1;
            continue;
        }
        if (val == NULL)
            return usage_error("%s needs a value (or is unknown)", a);
        i++;
        char *end = NULL;
        if (strcmp(a, "--address") == 0) {
            address = val;
        } else if (strcmp(a, "--stream") == 0) {
            stream = val;
        } else if (strcmp(a, "--dtype") == 0) {
            o.dtype = val;
        } else if (strcmp(a, "--channels") == 0) {
            if (parse_u64(val, &v) || v < 1 || v > 65535)
                return usage_error("--channels must be 1..65535, got '%s'", val);
            o.channels = (unsigned)v;
        } else if (strcmp(a, "--rate") == 0) {
            o.rate = strtod(val, &end);
            if (*end || !(o.rate > 0))
                return usage_error("--rate must be a positive number, got '%s'", val);
        } else if (strcmp(a, "--slab-bytes") == 0) {
            if (parse_u64(val, &o.slab_bytes))
                return usage_error("--slab-bytes must be a number of bytes, got '%s'", val);
        } else if (strcmp(a, "--nslabs") == 0) {
            if (parse_u64(val, &v) || v > 1u << 20)
                return usage_error("--nslabs must be a number of slabs, got '%s'", val);
            o.nslabs = (unsigned)v;
        } else if (strcmp(a, "--max-chunk-bytes") == 0) {
            if (parse_u64(val, &o.max_chunk_bytes))
                return usage_error("--max-chunk-bytes must be a number of bytes, got '%s'", val);
        } else if (strcmp(a, "--timeout-ms") == 0) {
            if (parse_u64(val, &v) || v > 3600000)
                return usage_error("--timeout-ms must be 0..3600000, got '%s'", val);
            o.timeout_ms = (int)v;
        } else if (strcmp(a, "--statistics") == 0) {
            o.statistics = strtod(val, &end);
            if (*end || !(o.statistics >= 0))
                return usage_error("--statistics must be seconds >= 0, got '%s'", val);
        } else if (strcmp(a, "--channel-names") == 0) {
            names = argv[i];
        } else if (strcmp(a, "--channel-types") == 0) {
            types = argv[i];
        } else if (strcmp(a, "--channel-units") == 0) {
            units = argv[i];
        } else if (strcmp(a, "--source-id") == 0) {
            o.source_id = val;
        } else if (strcmp(a, "--label") == 0) {
            o.label = val;
        } else if (strcmp(a, "--frame") == 0) {
            if (parse_u64(val, &frame) || frame == 0)
                return usage_error("--frame must be a positive number of samples, got '%s'", val);
        } else if (strcmp(a, "--pattern") == 0) {
            if (parse_u64(val, &pattern))
                return usage_error("--pattern must be a number of samples, got '%s'", val);
            have_pattern = 1;
        } else if (strcmp(a, "--t0") == 0) {
            t0_base = strtod(val, &end);
            if (*end || !isfinite(t0_base))
                return usage_error("--t0 must be a finite number of seconds, got '%s'", val);
        } else if (strcmp(a, "--pace-us") == 0) {
            if (parse_u64(val, &pace_us))
                return usage_error("--pace-us must be a number of microseconds, got '%s'", val);
        } else {
            return usage_error("unknown option '%s'", a);
        }
    }
    if (stream == NULL)
        return usage_error("%s", "--stream is required");
    if (framed && have_pattern)
        return usage_error("%s", "give at most one of --framed and --pattern");
    if ((names && !(o.channel_names = split(names, o.channels))) ||
        (types && !(o.channel_types = split(types, o.channels))) ||
        (units && !(o.channel_units = split(units, o.channels))))
        return usage_error("--channel-names, --channel-types and --channel-units need one value per channel (%s)",
                           "comma-separated");

    catch_stop_signals();

    sc_pub *pub;
    int rc = sc_pub_open(address, stream, &o, &pub);
    if (rc != SC_OK) {
        fprintf(stderr, "slabcast-pub: %s [%s]\n", sc_pub_errmsg(NULL), sc_strerror(rc));
        return exit_status(rc);
    }
    const sc_pub_info *info = sc_pub_get_info(pub);
    size_t sb = info->sample_bytes;
    size_t left_over = 0;  /* bytes of a sample the input ended inside (not written) */
    printf("ready max_frame=%" PRIu64 " slab_bytes=%" PRIu64 " reserve=%" PRIu64 " segment_bytes=%zu segment=%s\n",
           info->max_frame, info->slab_bytes, info->reserve, info->segment_bytes, info->segment);
    fflush(stdout);

    service_arg svc = {pub, 1};
    pthread_t thread;
    int have_thread = pthread_create(&thread, NULL, service_main, &svc) == 0;

    size_t cap = (size_t)(framed ? info->max_frame : frame) * sb;
    unsigned char *buf = malloc(cap ? cap : 1);
    double *times = NULL;  /* a framed record's times, allocated for the first that has them */
    if (buf == NULL) {
        fprintf(stderr, "slabcast-pub: out of memory\n");
        return 1;
    }
    if (have_pattern && go) {
        char line[64];
        if (fgets(line, sizeof line, stdin) == NULL)
            pattern = 0;
    }
    if (have_pattern && repeat)
        fill_pattern(buf, info->dtype, info->itemsize, 0, frame * info->channels);

    uint64_t index = 0, k = 0, writes = 0;
    int64_t cpu_thread = 0, cpu_process = 0, next = now_ns(CLOCK_MONOTONIC);
    rc = SC_OK;
    const char *call = "sc_pub_write";
    for (;;) {
        if (stop_signal)
            break;
        /* What the next frame is: n samples, its t0 and flags, its times. */
        uint64_t n;
        unsigned flags = 0, frame_flags = 0;
        double t0 = isnan(t0_base) ? NAN : t0_base + (info->rate > 0 ? (double)index / info->rate : (double)k);
        const double *ftimes = NULL;
        if (framed) {
            unsigned char head[16];
            size_t got = read_full(head, sizeof head);
            if (got == 0)
                break;
            if (got != sizeof head) {
                fprintf(stderr, "slabcast-pub: a framed record's header was cut short (%zu of 16 bytes)\n", got);
                rc = SC_EINVAL;
                break;
            }
            uint32_t n32, f32;
            memcpy(&n32, head, 4);
            memcpy(&f32, head + 4, 4);
            frame_flags = f32;
            memcpy(&t0, head + 8, 8);
            n = n32;
            flags = f32 & 0xFF;
            if ((f32 & 0x100) && !loan) {  /* (with --loan they are read straight into the loan, below) */
                if (n > info->max_frame || n == 0) {
                    fprintf(stderr, "slabcast-pub: a record of %" PRIu64 " samples with times: not 1 .. %" PRIu64
                            " (a frame's most)\n", n, info->max_frame);
                    rc = SC_EINVAL;
                    break;
                }
                if (times == NULL && (times = malloc(sizeof(double) * info->max_frame)) == NULL) {
                    fprintf(stderr, "slabcast-pub: out of memory\n");
                    rc = SC_ENOMEM;
                    break;
                }
                if (read_full(times, 8 * n) != 8 * n) {
                    fprintf(stderr, "slabcast-pub: a framed record's times were cut short\n");
                    rc = SC_EINVAL;
                    break;
                }
                ftimes = times;
            }
        } else if (have_pattern) {
            if (index >= pattern)
                break;
            n = pattern - index < frame ? pattern - index : frame;
        } else {
            n = frame;
        }
        if (pace_us) {
            next += (int64_t)pace_us * 1000;
            struct timespec until = {next / 1000000000, next % 1000000000};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);
        }
        if (writes == 0) {
            cpu_thread = now_ns(CLOCK_THREAD_CPUTIME_ID);
            cpu_process = now_ns(CLOCK_PROCESS_CPUTIME_ID);
        }
        void *room = NULL;
        if (framed && (n == 0 || n > info->max_frame)) {
            /* Not read into memory: the write is refused (SC_EINVAL) with the library's message. */
            call = "sc_pub_write";
            rc = loan ? sc_pub_loan(pub, n, &room) : sc_pub_write(pub, buf, n, t0, flags, NULL);
            break;
        }
        unsigned char *dst = buf;
        if (loan) {
            call = "sc_pub_loan";
            if ((rc = sc_pub_loan(pub, n, &room)) != SC_OK)
                break;
            dst = room;
        }
        uint64_t got_n = n;
        if (loan && (frame_flags & 0x100)) {
            double *room_times;
            if ((rc = sc_pub_loan_times(pub, &room_times)) != SC_OK) {
                call = "sc_pub_loan_times";
                break;
            }
            if (read_full(room_times, 8 * n) != 8 * n) {
                fprintf(stderr, "slabcast-pub: a framed record's times were cut short\n");
                rc = SC_EINVAL;
                break;
            }
        }
        if (framed) {
            if (read_full(dst, n * sb) != n * sb) {
                fprintf(stderr, "slabcast-pub: a framed record's samples were cut short\n");
                rc = SC_EINVAL;
                break;
            }
        } else if (have_pattern) {
            if (!repeat || loan)
                fill_pattern(dst, info->dtype, info->itemsize, repeat ? 0 : index * info->channels, n * info->channels);
        } else {
            size_t got = read_full(dst, n * sb);
            left_over = got % sb;  /* the input ended inside a sample: its complete ones are written first */
            got_n = got / sb;
        }
        if (got_n == 0) {
            if (loan)
                sc_pub_commit(pub, 0, NAN, 0);
            break;
        }
        if (dry) {
            rc = loan ? sc_pub_commit(pub, 0, NAN, 0) : SC_OK;
        } else if (loan) {
            call = "sc_pub_commit";
            rc = sc_pub_commit(pub, got_n, t0, flags);
        } else {
            call = "sc_pub_write";
            rc = sc_pub_write(pub, buf, got_n, t0, flags, ftimes);
        }
        if (rc != SC_OK)
            break;
        writes++;
        index += got_n;
        k++;
        if (!framed && !have_pattern && got_n < n)
            break;  /* the input ended */
    }
    if (writes) {
        cpu_thread = now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu_thread;
        cpu_process = now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu_process;
    }
    int status = 0;
    if (rc != SC_OK) {
        fprintf(stderr, "slabcast-pub: %s: %s [%s]\n", call, sc_pub_errmsg(pub), sc_strerror(rc));
        status = exit_status(rc);
    } else if (left_over) {
        /* As the Python stdin source: every complete sample written, the stream closed; the exit status says the
           input was not whole samples. */
        fprintf(stderr, "slabcast-pub: the input ended inside a sample: its last %zu bytes were dropped (a sample is "
                "%zu bytes); every complete sample before them was written\n", left_over, sb);
        status = exit_status(SC_EINVAL);
    }
    if (rc == SC_OK && (flush || hang)) {
        if ((rc = sc_pub_flush(pub, -1)) != SC_OK) {
            fprintf(stderr, "slabcast-pub: sc_pub_flush: %s [%s]\n", sc_pub_errmsg(pub), sc_strerror(rc));
            status = exit_status(rc);
        }
    }
    if (cpu && writes)
        fprintf(stderr, "cpu-per-write-us thread=%.3f process=%.3f writes=%" PRIu64 "\n",
                cpu_thread / 1e3 / (double)writes, cpu_process / 1e3 / (double)writes, writes);
    sc_pub_stats st;
    sc_pub_get_stats(pub, &st);
    if (hang && status == 0) {
        printf("wrote %" PRIu64 " %" PRIu64 "\n", st.frames, st.samples);
        fflush(stdout);
        while (!stop_signal)
            pause();  /* the service thread goes on answering */
    }
    __atomic_store_n(&svc.running, 0, __ATOMIC_RELEASE);
    if (have_thread)
        pthread_join(thread, NULL);
    int closed = sc_pub_close(pub);
    if (closed != SC_OK && status == 0) {
        fprintf(stderr, "slabcast-pub: sc_pub_close: %s [%s]\n", sc_pub_errmsg(NULL), sc_strerror(closed));
        status = exit_status(closed);
    }
    printf("done frames=%" PRIu64 " samples=%" PRIu64 " notices=%" PRIu64 " published=%" PRIu64 " slabs=%" PRIu64
           " wakes=%" PRIu64 "\n", st.frames, st.samples, st.notices, st.published, st.slabs, st.wakes);
    fflush(stdout);
    free(buf);
    free(times);
    free((void *)o.channel_names);
    free((void *)o.channel_types);
    free((void *)o.channel_units);
    return status;
}
