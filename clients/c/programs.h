/* programs.h: what the slabcast-sub and slabcast-pub programs share (arguments, signals); not installed.
 * Include it after `static const char USAGE[]` and with PROGRAM defined as the program's name. */
#ifndef SLABCAST_PROGRAMS_H
#define SLABCAST_PROGRAMS_H

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile sig_atomic_t stop_signal = 0;

/* SIGINT/SIGTERM: leave the program's loop and close cleanly. */
static void on_signal(int sig)
{
    stop_signal = sig;
}

static void catch_stop_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* Say what was wrong with the command line, and where the options are (the whole usage, 40 lines, buried the
 * reason); exit status 2. */
static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, PROGRAM ": ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(" PROGRAM " --help lists the options)\n");
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

#endif
