"""libslabcast as an installed library: `make install PREFIX=...`, found by pkg-config, run without LD_LIBRARY_PATH.

A program is compiled only with the flags `pkg-config --cflags --libs slabcast` gives for the installed prefix,
then subscribes to a stream a Python publisher writes in the test; its chunks are checked against the bytes
Python wrote and the rechunking rules.  A second program plays a binding that declares only the prefix of
each public struct it uses (the size-versioned structs of slabcast.h), as an older caller would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import slabcast
from tests.integration.test_c_client import C_DIR, INSTALL, CSub, _unavailable, expected_chunks, make_frames

HEADER = C_DIR / "slabcast.h"


def _header_int(name: str) -> int:
    m = re.search(rf"^#define {name} (\d+)", HEADER.read_text(), flags=re.MULTILINE)
    assert m, f"#define {name} is missing from {HEADER}"
    return int(m[1])


def _header_version() -> tuple[int, int, int, str]:
    m = re.search(r'^#define SC_VERSION_STRING "([^"]+)"', HEADER.read_text(), flags=re.MULTILINE)
    assert m, f"#define SC_VERSION_STRING is missing from {HEADER}"
    return _header_int("SC_VERSION_MAJOR"), _header_int("SC_VERSION_MINOR"), _header_int("SC_VERSION_PATCH"), m[1]


def _env_without_ld_path(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PKG_CONFIG_PATH")}
    env.update(extra)
    return env


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, **kwargs)


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    assert make is not None
    return _run([make, "-C", str(C_DIR), *args])


class Installed:
    """What `make install PREFIX=<prefix>` put under <prefix>, and how to build against it."""

    def __init__(self, prefix: Path, build: Path) -> None:
        self.prefix = prefix
        self.build = build
        self.pc_path = prefix / "lib" / "pkgconfig"

    def pkg_config(self, *args: str) -> str:
        pc = _run(["pkg-config", *args, "slabcast"], env=_env_without_ld_path(PKG_CONFIG_PATH=str(self.pc_path)))
        assert pc.returncode == 0, f"pkg-config {' '.join(args)} slabcast failed: {pc.stderr}"
        return pc.stdout.strip()

    def compile(self, source: str, out: Path, *extra: str) -> Path:
        """Compile a C program with the flags pkg-config gives (and ``extra``), and nothing else."""
        src = out.with_suffix(".c")
        src.write_text(source)
        flags = self.pkg_config("--cflags", "--libs").split()
        cc = _run(["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(src), *flags, *extra])
        assert cc.returncode == 0, (
            f"compiling {src.name} with `pkg-config --cflags --libs slabcast` failed:\n{cc.stderr}"
        )
        return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build clients/c in a private build directory and `make install` it into a fresh prefix."""
    for tool, package in (("make", "build-essential"), ("cc", "build-essential"), ("pkg-config", "pkg-config")):
        if shutil.which(tool) is None:
            _unavailable(f"installing the C client needs {tool}: apt-get install {package}, then {INSTALL}")
    deps = _make("-s", "check-deps")
    if deps.returncode != 0:
        _unavailable(f"the C client cannot be built: {(deps.stdout + deps.stderr).strip()}")
    root = tmp_path_factory.mktemp("c-install")
    # Its own BUILD directory: the tests of test_c_client.py build clients/c/build, maybe at the same time.
    build, prefix = root / "build", root / "prefix"
    done = _make(f"BUILD={build}", "install", f"PREFIX={prefix}")
    assert done.returncode == 0, f"make install PREFIX={prefix} failed:\n{done.stdout}\n{done.stderr}"
    return Installed(prefix, build)


def _readelf(path: Path) -> str:
    out = _run(["readelf", "-d", str(path)])
    assert out.returncode == 0, out.stderr
    return out.stdout


def _dynamic(entries: str, tag: str) -> list[str]:
    return re.findall(rf"\({tag}\)\s+.*?\[(.*?)\]", entries)


# ------------------------------------------------------------------ the install


def test_make_install_lays_out_a_versioned_library_and_a_pc_file(installed):
    major, minor, patch, _ = _header_version()
    lib = installed.prefix / "lib"
    real = lib / f"libslabcast.so.{major}.{minor}.{patch}"
    assert real.is_file() and not real.is_symlink()
    assert os.readlink(lib / f"libslabcast.so.{major}") == real.name
    assert os.readlink(lib / "libslabcast.so") == f"libslabcast.so.{major}"
    assert (lib / "libslabcast.a").is_file()
    assert (installed.prefix / "include" / "slabcast.h").read_text() == HEADER.read_text()
    sub = installed.prefix / "bin" / "slabcast-sub"
    assert os.access(sub, os.X_OK)
    assert "--stream" in _run([str(sub), "--help"], env=_env_without_ld_path()).stdout

    entries = _readelf(real)
    assert _dynamic(entries, "SONAME") == [f"libslabcast.so.{major}"], entries
    assert _header_int("SC_ABI_VERSION") == major
    # Only the API is exported, each symbol under the version node SLABCAST_<major>.0.
    nm = _run(["nm", "-D", "--defined-only", str(real)])
    symbols = [line.split()[-1] for line in nm.stdout.splitlines() if line.split()[-2] in ("T", "D", "B", "R")]
    assert symbols and all(re.fullmatch(rf"sc_\w+@@SLABCAST_{major}\.\d+", s) for s in symbols), symbols
    api = set(re.findall(r"^[a-z][\w \*]*?\b(sc_\w+)\(", HEADER.read_text(), flags=re.MULTILINE))
    assert {s.split("@")[0] for s in symbols} == api

    assert installed.pkg_config("--modversion") == f"{major}.{minor}.{patch}"
    cflags, libs = installed.pkg_config("--cflags"), installed.pkg_config("--libs")
    assert f"-I{installed.prefix}/include" in cflags.split()
    assert libs.split()[:3] == [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lslabcast"], libs
    pc = (installed.pc_path / "slabcast.pc").read_text()
    requires = re.search(r"^Requires\.private: *(.*)$", pc, flags=re.MULTILINE)
    private = re.search(r"^Libs\.private: *(.*)$", pc, flags=re.MULTILINE)
    assert requires and private, pc
    # libzmq and msgpack-c: by their .pc names where Debian ships one, else as -l flags.
    named = requires[1].split() + private[1].split()
    assert "libzmq" in named or "-lzmq" in named, pc
    assert {"msgpack", "msgpack-c", "-lmsgpackc"} & set(named), pc


def test_a_staged_system_install_has_no_rpath_and_uninstall_removes_every_file(installed, tmp_path):
    stage = tmp_path / "stage"
    done = _make(f"BUILD={installed.build}", "install", "PREFIX=/usr", f"DESTDIR={stage}")
    assert done.returncode == 0, done.stdout + done.stderr
    pc = (stage / "usr" / "lib" / "pkgconfig" / "slabcast.pc").read_text()
    assert "prefix=/usr\n" in pc and "libdir=/usr/lib\n" in pc
    assert re.search(r"^Libs: -L\$\{libdir\} -lslabcast$", pc, flags=re.MULTILINE), pc  # no rpath in /usr/lib
    files = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file() or p.is_symlink())
    assert len(files) == 7, files  # header, .so.N.M.P, .so.N, .so, .a, slabcast-sub, slabcast.pc
    gone = _make(f"BUILD={installed.build}", "uninstall", "PREFIX=/usr", f"DESTDIR={stage}")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert [p for p in stage.rglob("*") if p.is_file() or p.is_symlink()] == []


# ------------------------------------------------------- a program built with pkg-config

CONSUMER = r"""
#include <slabcast.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long crc32_of(const unsigned char *p, size_t n)
{
    unsigned long c = 0xFFFFFFFFul;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320ul & (0ul - (c & 1ul)));
    }
    return c ^ 0xFFFFFFFFul;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "version") == 0) {
        int a = -1, b = -1, c = -1;
        const char *s = sc_library_version(&a, &b, &c);
        printf("header %s %d %d %d %d\n", SC_VERSION_STRING, SC_VERSION_MAJOR, SC_VERSION_MINOR, SC_VERSION_PATCH,
               SC_ABI_VERSION);
        printf("library %s %d %d %d %d\n", s, a, b, c, sc_abi_version());
        printf("null-ok %s\n", sc_library_version(NULL, NULL, NULL));
        return 0;
    }
    if (argc != 7 || sc_abi_version() != SC_ABI_VERSION)
        return 2;
    sc_sub_options o;
    sc_sub_options_init(&o);
    o.size = strtoull(argv[6], NULL, 10);
    o.clip = 1;
    sc_client *c = sc_new();
    int rc;
    if ((rc = sc_connect(c, argv[2])) || (rc = sc_subscribe(c, argv[4], &o))) {
        fprintf(stderr, "%s\n", sc_errmsg(c));
        sc_close(c);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    sc_chunk ch;
    while ((rc = sc_recv(c, &ch, 10000)) == SC_OK) {
        if (ch.struct_size != sizeof ch)
            return 3;
        printf("seq=%llu index=%llu n=%llu t0=%.9f crc=%08lx\n", (unsigned long long)ch.seq,
               (unsigned long long)ch.index, (unsigned long long)ch.n, ch.t0,
               crc32_of(ch.data, ch.nbytes));
        sc_release(c, &ch);
    }
    sc_stats st;
    sc_get_stats(c, &st);
    if (rc != SC_EOF || st.struct_size != sizeof st || st.received != st.released) {
        fprintf(stderr, "%s (%s) received=%llu released=%llu\n", sc_errmsg(c), sc_strerror(rc),
                (unsigned long long)st.received, (unsigned long long)st.released);
        sc_close(c);
        return 1;
    }
    sc_close(c);
    return 0;
}
"""


@pytest.fixture(scope="module")
def consumer(installed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return installed.compile(CONSUMER, tmp_path_factory.mktemp("consumer") / "consumer")


def test_the_program_records_the_soname_and_finds_the_library_without_ld_library_path(installed, consumer):
    major, minor, patch, text = _header_version()
    entries = _readelf(consumer)
    needed = _dynamic(entries, "NEEDED")
    assert f"libslabcast.so.{major}" in needed and "libslabcast.so" not in needed, needed
    assert _dynamic(entries, "RUNPATH") + _dynamic(entries, "RPATH") == [str(installed.prefix / "lib")], entries
    out = _run([str(consumer), "version"], env=_env_without_ld_path())
    assert out.returncode == 0, out.stderr
    abi = _header_int("SC_ABI_VERSION")
    assert out.stdout.splitlines() == [
        f"header {text} {major} {minor} {patch} {abi}",
        f"library {text} {major} {minor} {patch} {abi}",
        f"null-ok {text}",
    ]
    assert text == f"{major}.{minor}.{patch}"


def test_the_installed_library_subscribes_to_a_python_stream_chunk_for_chunk(installed, consumer, broker, stream_name):
    case = {"dtype": "int16", "channels": 2, "rate": 1000.0, "frames": 120, "max_frame": 400, "seed": 11}
    frames, data = make_frames(case)
    size, sample_bytes = 250, np.dtype(case["dtype"]).itemsize * case["channels"]
    pub = slabcast.Publisher(
        stream_name, dtype=case["dtype"], channels=case["channels"], rate=case["rate"], address=broker.address,
        slab_bytes=1 << 15, nslabs=4,
    )  # fmt: skip
    # Run as slabcast-sub is (the same arguments and output), but with no LD_LIBRARY_PATH anywhere.
    assert "LD_LIBRARY_PATH" not in os.environ or not os.environ["LD_LIBRARY_PATH"]
    sub = CSub(consumer, broker.address, stream_name, "--size", str(size))
    try:
        sub.wait_ready()
        for frame, t0 in frames:
            pub.write(frame, t0=t0)
        pub.close()
        assert sub.finish(60) == 0, sub.stderr
        want = expected_chunks(frames, size, True, case["rate"], sample_bytes, data)
        assert len(want) > 50
        assert sub.chunks() == want
    finally:
        sub.close()
        pub.close()


# ------------------------------------------------- a binding that mirrors only a prefix

PREFIX_BINDING = r"""
/* A caller that declares only the first fields of each struct, as an older header or a binding would. */
#include <slabcast.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { size_t struct_size; uint64_t size; double seconds; int clip; } opts_prefix;
typedef struct { size_t struct_size; const void *data; uint64_t n; size_t nbytes; } chunk_prefix;
typedef struct { size_t struct_size; uint64_t received; } stats_prefix;

#define CANARY 0xA5

static int canary_intact(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != CANARY)
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    /* A newer caller's options with a field this library does not know, set: refused, and named. */
    struct { sc_sub_options o; uint64_t future; } newer;
    sc_sub_options_init_sized(&newer.o, sizeof newer);
    if (newer.o.struct_size != sizeof newer || newer.future != 0 || strcmp(newer.o.policy, "block") != 0)
        return 4;
    newer.o.size = 10;
    newer.future = 1;
    sc_client *probe = sc_new();
    int rc = sc_connect(probe, argv[1]);
    if (rc == SC_OK)
        rc = sc_subscribe(probe, argv[2], &newer.o);
    printf("newer %s %s\n", sc_strerror(rc), sc_errmsg(probe));
    sc_sub_options unset;  /* struct_size never set: a binding that zeroed the struct and forgot it */
    memset(&unset, 0, sizeof unset);
    unset.size = 10;
    rc = sc_subscribe(probe, argv[2], &unset);
    printf("unset %s %s\n", sc_strerror(rc), sc_errmsg(probe));
    sc_close(probe);

    opts_prefix o = {sizeof o, strtoull(argv[3], NULL, 10), 0.0, 1};  /* policy, max_inflight: defaults */
    sc_client *c = sc_new();
    if ((rc = sc_connect(c, argv[1])) || (rc = sc_subscribe(c, argv[2], (const sc_sub_options *)&o))) {
        fprintf(stderr, "%s\n", sc_errmsg(c));
        sc_close(c);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    uint64_t released = 0;
    struct { chunk_prefix ch; unsigned char canary[96]; } buf;
    memset(buf.canary, CANARY, sizeof buf.canary);
    while ((rc = sc_recv_sized(c, (sc_chunk *)&buf.ch, sizeof buf.ch, 10000)) == SC_OK) {
        if (!canary_intact(buf.canary, sizeof buf.canary)) {
            fprintf(stderr, "sc_recv_sized wrote past the %zu bytes it was given\n", sizeof buf.ch);
            return 5;
        }
        unsigned long crc = 0xFFFFFFFFul;
        const unsigned char *p = buf.ch.data;
        for (size_t i = 0; i < buf.ch.nbytes; i++) {
            crc ^= p[i];
            for (int k = 0; k < 8; k++)
                crc = (crc >> 1) ^ (0xEDB88320ul & (0ul - (crc & 1ul)));
        }
        printf("filled=%zu n=%llu crc=%08lx\n", buf.ch.struct_size, (unsigned long long)buf.ch.n,
               crc ^ 0xFFFFFFFFul);
        /* This prefix has no seq; with policy "block" the chunks come numbered 0, 1, 2, ... */
        if ((rc = sc_release_seq(c, released++)) != SC_OK)
            break;
    }
    struct { stats_prefix s; unsigned char canary[96]; } st;
    memset(st.canary, CANARY, sizeof st.canary);
    sc_get_stats_sized(c, (sc_stats *)&st.s, sizeof st.s);
    struct { sc_stats s; unsigned char more[40]; } big;
    memset(&big, CANARY, sizeof big);
    sc_get_stats_sized(c, &big.s, sizeof big);  /* a newer caller: what the library has no field for is zero */
    int zero = 1;
    for (size_t i = 0; i < sizeof big.more; i++)
        zero &= big.more[i] == 0;
    printf("end %s stats=%zu received=%llu canary=%d newer=%zu zeroed=%d\n", sc_strerror(rc), st.s.struct_size,
           (unsigned long long)st.s.received, canary_intact(st.canary, sizeof st.canary), big.s.struct_size, zero);
    sc_close(c);
    return 0;
}
"""


def test_a_caller_that_declares_only_a_prefix_of_each_struct_works(installed, broker, stream_name, tmp_path):
    prog = installed.compile(PREFIX_BINDING, tmp_path / "prefix_binding")
    case = {"dtype": "float32", "channels": 1, "rate": None, "frames": 60, "max_frame": 300, "seed": 12}
    frames, data = make_frames(case)
    size = 128
    pub = slabcast.Publisher(stream_name, dtype="float32", address=broker.address, slab_bytes=1 << 15, nslabs=4)
    proc = subprocess.Popen(
        [str(prog), broker.address, stream_name, str(size)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env_without_ld_path(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        newer = proc.stdout.readline()
        assert newer.startswith("newer SC_EINVAL "), newer
        assert "does not know: byte" in newer and "use a newer libslabcast" in newer, newer
        unset = proc.stdout.readline()
        assert unset.startswith("unset SC_EINVAL sc_sub_options.struct_size must be the size of the caller's"), unset
        assert "set it with sc_sub_options_init), got 0" in unset, unset
        assert proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.stderr else ""
        for frame, t0 in frames:
            pub.write(frame, t0=t0)
        pub.close()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        lines = out.splitlines()
        want = expected_chunks(frames, size, True, None, 4, data)
        assert len(want) > 20
        # struct_size, data, n, nbytes: 32 bytes filled, the 96 after them untouched (the program checks).
        assert lines[:-1] == [f"filled=32 n={w[2]} crc={w[4]:08x}" for w in want]
        # Stats: 16 bytes to the old caller, its canary intact; 48 to a newer one, the rest zeroed.
        assert lines[-1] == f"end SC_EOF stats=16 received={len(want)} canary=1 newer=48 zeroed=1", lines[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        pub.close()


# ---------------------------------------------------------------------- threads

THREADS = r"""
/* Two clients, one per thread, receiving at the same time: what slabcast.h's "Threads" allows. */
#define _POSIX_C_SOURCE 200809L
#include <slabcast.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *address, *stream;
    uint64_t size;
    pthread_barrier_t *subscribed;
    char out[1 << 16];
    size_t len;
    int rc;
} job;

static void *run(void *arg)
{
    job *j = arg;
    sc_sub_options o;
    sc_sub_options_init(&o);
    o.size = j->size;
    o.clip = 1;
    sc_client *c = sc_new();
    j->rc = sc_connect(c, j->address);
    if (j->rc == SC_OK)
        j->rc = sc_subscribe(c, j->stream, &o);
    pthread_barrier_wait(j->subscribed);
    sc_chunk ch;
    while (j->rc == SC_OK && (j->rc = sc_recv(c, &ch, 10000)) == SC_OK) {
        unsigned long sum = 0;
        for (size_t i = 0; i < ch.nbytes; i++)
            sum = sum * 31 + ((const unsigned char *)ch.data)[i];
        j->len += (size_t)snprintf(j->out + j->len, sizeof j->out - j->len, "%llu %llu %lx\n",
                                   (unsigned long long)ch.index, (unsigned long long)ch.n, sum);
        j->rc = sc_release(c, &ch);
    }
    if (j->rc != SC_EOF)
        fprintf(stderr, "thread: %s (%s)\n", sc_errmsg(c), sc_strerror(j->rc));  /* on the calling thread */
    sc_close(c);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    pthread_barrier_t b;
    pthread_barrier_init(&b, NULL, 3);
    static job jobs[2];
    pthread_t t[2];
    for (int k = 0; k < 2; k++) {
        jobs[k] = (job){.address = argv[1], .stream = argv[2], .size = strtoull(argv[3], NULL, 10), .subscribed = &b};
        pthread_create(&t[k], NULL, run, &jobs[k]);
    }
    pthread_barrier_wait(&b);
    printf("ready\n");
    fflush(stdout);
    for (int k = 0; k < 2; k++)
        pthread_join(t[k], NULL);
    if (jobs[0].rc != SC_EOF || jobs[1].rc != SC_EOF)
        return 1;
    printf("same %d\n%s", strcmp(jobs[0].out, jobs[1].out) == 0, jobs[0].out);
    return 0;
}
"""


def test_two_clients_on_two_threads_receive_at_the_same_time(installed, broker, stream_name, tmp_path):
    """The header's thread rule: one client per thread, clients independent; both get every chunk."""
    prog = installed.compile(THREADS, tmp_path / "threads", "-pthread")
    case = {"dtype": "int32", "channels": 1, "rate": None, "frames": 200, "max_frame": 500, "seed": 13}
    frames, data = make_frames(case)
    size = 300
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address, slab_bytes=1 << 14, nslabs=4)
    proc = subprocess.Popen(
        [str(prog), broker.address, stream_name, str(size)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env_without_ld_path(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        for frame, t0 in frames:
            pub.write(frame, t0=t0)
        pub.close()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        lines = out.splitlines()
        assert lines[0] == "same 1", err
        want = expected_chunks(frames, size, True, None, 4, data)
        assert len(want) > 50
        assert [tuple(int(x) for x in line.split()[:2]) for line in lines[1:]] == [(w[1], w[2]) for w in want]
        sums = []
        for w in want:
            total = 0
            for byte in data[w[1] * 4 : (w[1] + w[2]) * 4]:
                total = (total * 31 + byte) % (1 << 64)
            sums.append(f"{total:x}")
        assert [line.split()[2] for line in lines[1:]] == sums
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        pub.close()


# ------------------------------------------------------------------------ CMake

CMAKE_PROJECT = """cmake_minimum_required(VERSION 3.16)
project(uses_slabcast C)
find_package(PkgConfig REQUIRED)
pkg_check_modules(SLABCAST REQUIRED IMPORTED_TARGET slabcast>=1.0)
add_executable(prog prog.c)
target_link_libraries(prog PRIVATE PkgConfig::SLABCAST)
"""

CMAKE_PROG = r"""#include <slabcast.h>
#include <stdio.h>
int main(void)
{
    printf("%s %d\n", sc_library_version(NULL, NULL, NULL), sc_abi_version());
    return sc_abi_version() != SC_ABI_VERSION;
}
"""


def test_a_cmake_project_finds_it_through_pkg_check_modules(installed, tmp_path):
    """The CMake route the README documents (there is no CMake package config): an imported target from the .pc."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed (optional: the CMake route of clients/c/README.md goes through pkg-config)")
    src, build = tmp_path / "src", tmp_path / "build"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(CMAKE_PROJECT)
    (src / "prog.c").write_text(CMAKE_PROG)
    env = _env_without_ld_path(PKG_CONFIG_PATH=str(installed.pc_path))
    configure = _run([cmake, "-S", str(src), "-B", str(build)], env=env)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    built = _run([cmake, "--build", str(build)], env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    major, _, _, text = _header_version()
    assert f"libslabcast.so.{major}" in _dynamic(_readelf(build / "prog"), "NEEDED")
    ran = _run([str(build / "prog")], env=_env_without_ld_path())
    assert (ran.returncode, ran.stdout) == (0, f"{text} {major}\n"), ran.stderr
