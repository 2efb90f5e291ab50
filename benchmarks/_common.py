"""Shared helpers of the benchmarks: machine facts, CPU accounting, process reaping, statistics, tables."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CTX = mp.get_context("spawn")  # no inherited sockets, mappings or threads: each worker is a fresh program
WAIT_QUIET_HELP = (
    "before each trial wait up to S seconds for the machine to be quiet (other programs below 0.3 cores); "
    "default 0: do not wait"
)
RESULTS = Path(__file__).resolve().parent / "results"
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- the machine


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, library versions and the load when asked."""
    import msgpack
    import zmq

    import slabcast

    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    try:
        import matplotlib

        mpl: str | None = matplotlib.__version__
    except ImportError:
        mpl = None
    import subprocess

    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip()
    except OSError:
        head, dirty = "?", ""
    src = str(Path(slabcast.__file__).resolve().parent)
    if not src.startswith(str(root)):  # PYTHONPATH=<an exported tree>/src: the repo's HEAD says nothing
        head, dirty = f"slabcast imported from {src}", ""
    return {
        "git_head": head + (" (src/ modified)" if dirty else ""),
        "slabcast_src": src,
        "cpu_model": model,
        "cores": os.cpu_count(),
        "mem_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "slabcast": slabcast.__version__,
        "matplotlib": mpl,
        "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def memcpy_bandwidth(quick: bool = False) -> dict[str, Any]:
    """Bytes per second of ``np.copyto`` for a 64 KiB buffer in cache and a 256 MiB buffer out of it.

    The bandwidth counts bytes copied (not read + written).  Each figure is the
    median of several timed batches; min and max are the spread.
    """
    out: dict[str, Any] = {}
    for label, nbytes, reps, batches in (
        ("64KiB_in_cache", 64 * KiB, 2000, 15 if not quick else 5),
        ("256MiB_out_of_cache", 256 * MiB, 1, 7 if not quick else 3),
    ):
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.zeros(nbytes, dtype=np.uint8)
        np.copyto(dst, src)  # fault both in
        rates = []
        for _ in range(batches):
            t = time.perf_counter_ns()
            for _ in range(reps):
                np.copyto(dst, src)
            dt = (time.perf_counter_ns() - t) / 1e9
            rates.append(nbytes * reps / dt)
        out[label] = summarize(rates)
        del src, dst
    return out


class CpuMeter:
    """CPU seconds used on the whole machine, by our own processes, and hence by others, over a trial.

    ``/proc/stat`` gives the machine's busy time; our processes report their own
    ``getrusage`` (workers) or are read from ``/proc/<pid>/stat`` (the broker).
    What is left is what other programs on this machine took from us.
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.t = time.monotonic()
        self.busy = _machine_busy()
        self.self_cpu = _self_cpu()
        self.pid_cpu = {p: pid_cpu(p) for p in self.pids}

    def stop(self, worker_cpu: float) -> dict[str, float]:
        """Return wall, machine busy, ours and others' CPU seconds; ``worker_cpu`` is what the workers reported."""
        wall = time.monotonic() - self.t
        busy = _machine_busy() - self.busy
        ours = worker_cpu + (_self_cpu() - self.self_cpu)
        ours += sum(pid_cpu(p) - c for p, c in self.pid_cpu.items())
        return {
            "wall_s": wall,
            "machine_busy_cpu_s": busy,
            "our_cpu_s": ours,
            "foreign_cpu_s": max(0.0, busy - ours),
            "foreign_cores": max(0.0, busy - ours) / wall if wall > 0 else 0.0,
        }


def wait_quiet(max_wait: float, cores: float = 0.3, window: float = 0.5) -> dict[str, float]:
    """Wait (at most ``max_wait`` s) until the machine ran below ``cores`` busy cores over ``window`` s.

    Called between trials, when our own processes are idle, so what it sees is
    other programs.  Returns how long it waited and the load it last saw.
    """
    t0 = time.monotonic()
    load = 0.0
    while True:
        busy = _machine_busy()
        time.sleep(window)
        load = (_machine_busy() - busy) / window
        waited = time.monotonic() - t0
        if load < cores or waited >= max_wait:
            return {"waited_s": waited, "load_before_cores": load}


def least_loaded(
    attempt: Any, limit: float, retries: int, quiet_wait: float = 0.0
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """Run ``attempt(k)`` (k = 0, 1, ...: a group of records measured together, each with
    ``cpu.foreign_cores``) until no record of it saw more than ``limit`` cores of other programs,
    at most ``1 + retries`` times.

    Returns the least loaded group and the groups set aside.  A whole group is redone, never one system
    of it, so that ratios between the systems of a group stay ratios of one machine state.
    """
    tried: list[list[dict[str, Any]]] = []
    for k in range(1 + max(0, retries)):
        if quiet_wait > 0:
            wait_quiet(quiet_wait)
        group = attempt(k)
        tried.append(group)
        if max((r["cpu"]["foreign_cores"] for r in group), default=0.0) <= limit:
            break
    best = min(tried, key=lambda g: max((r["cpu"]["foreign_cores"] for r in g), default=0.0))
    return best, [g for g in tried if g is not best]


def _machine_busy() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(fields[:8]) - fields[3] - fields[4]) / _CLK_TCK


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def pid_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a live process, 0.0 if it is gone.

    The sum of its threads' run time in ``/proc/<pid>/task/*/schedstat`` (nanoseconds) where the kernel
    keeps it, else ``/proc/<pid>/stat`` (clock ticks, 10 ms: too coarse for microseconds per frame over
    a few seconds).  Threads that already exited are not in the sum: the broker's threads live as long
    as it does.
    """
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
    if total:
        return total / 1e9
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def worker_cpu() -> float:
    """This process's CPU seconds so far, all its threads (for a worker to report; nanosecond clock)."""
    return time.process_time()


# ----------------------------------------------------------------------------- processes


class Workers:
    """Spawned worker processes, joined (or killed) and reaped on exit."""

    def __init__(self) -> None:
        self.procs: list[Any] = []

    def spawn(self, target: Any, *args: Any) -> Any:
        proc = CTX.Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
            p.close()
        self.procs.clear()


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A private directory for socket files, removed afterwards (ipc paths must stay < 107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="scb-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def broker_at(address: Path) -> Iterator[Any]:
    """A slabcast broker process; stopped with SIGTERM, reaped, and checked for leaked segments."""
    import slabcast

    proc = slabcast.BrokerProcess(address)
    proc.start()
    pid = proc.pid
    try:
        yield proc
    finally:
        code = proc.stop()
        left = segments_of(pid)
        if code != 0 or left:
            print(f"warning: broker {pid} exited with {code}; segments left: {left}", file=sys.stderr)
            print(proc.stderr()[-2000:], file=sys.stderr)


def segments_of(pid: int) -> list[str]:
    """The /dev/shm segments of broker ``pid`` that still exist."""
    from slabcast.core.shm import broker_segments

    return broker_segments(pid)


def get(queue: Any, timeout: float, procs: Sequence[Any] = ()) -> Any:
    """``queue.get`` that notices a worker that died instead of answering."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.get(timeout=0.5)
        except Exception:  # queue.Empty
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker {dead[0].name} died with exit code {dead[0].exitcode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from the workers within {timeout} s") from None


# ----------------------------------------------------------------------------- the data


def frame_pattern(frame_bytes: int, ring: int = 4) -> list[np.ndarray]:
    """``ring`` distinct frames of pseudo-random bytes; the first 8 bytes of each get the frame number."""
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, frame_bytes, dtype=np.uint8) for _ in range(ring)]


def stamp(frame: np.ndarray, value: int) -> None:
    """Write ``value`` as a little-endian u64 into the first 8 bytes of ``frame``."""
    frame[:8] = np.frombuffer(value.to_bytes(8, "little"), dtype=np.uint8)


def touch(d: np.ndarray, mode: str) -> int:
    """Read the chunk cheaply but for real.

    ``page``: one byte per 4 KiB page (every page of the chunk is mapped and read).
    ``full``: XOR of every 8-byte word (every byte is read).
    """
    if mode == "page":
        return int(d[::4096].sum())
    n = d.shape[0] // 8 * 8
    return int(np.bitwise_xor.reduce(d[:n].view(np.uint64))) if n else 0


def check_chunk(d: np.ndarray, index: int, frame_bytes: int) -> int:
    """1 if the frame number stamped at the first frame boundary inside the chunk is wrong, else 0."""
    b = -(-index // frame_bytes) * frame_bytes
    off = b - index
    if off + 8 > d.shape[0]:
        return 0
    return int(int.from_bytes(d[off : off + 8].tobytes(), "little") != b // frame_bytes)


# ----------------------------------------------------------------------------- statistics and output


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def fmt_rate(s: dict[str, Any], unit: float = 1e9) -> str:
    """``median [min-max]`` in GB/s (decimal)."""
    return f"{s['median'] / unit:7.3f} [{s['min'] / unit:.3f}-{s['max'] / unit:.3f}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def write_json(name: str, data: Any) -> Path:
    """Write ``data`` to benchmarks/results/<name>.json and return the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def zmq_subscriber(endpoint: str, sync: str, tag: str, ready: Any) -> tuple[Any, Any, Any]:
    """A pyzmq SUB baseline consumer, past the slow-joiner handshake: wait for the publisher's
    "H" hello on the SUB socket, answer on the PUSH ``sync`` socket, then report ready.

    Returns ``(context, sub, push)``; the caller closes them.
    """
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.connect(sync)
    while sub.recv() != b"H":
        pass
    push.send(tag.encode())
    ready.put(("sub-ready", tag))
    return ctx, sub, push


def zmq_publisher(endpoint: str, sync: str) -> tuple[Any, Any, Any]:
    """A pyzmq PUB baseline publisher: PUB bound at ``endpoint`` (no high-water mark, so
    nothing is dropped) and a PULL at ``sync`` for the subscribers' handshake answers.

    Returns ``(context, pub, pull)``; the caller closes them.
    """
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(endpoint)
    pull = ctx.socket(zmq.PULL)
    pull.bind(sync)
    return ctx, pub, pull


def zmq_handshake(pub: Any, pull: Any, nsubs: int) -> set[bytes]:
    """Slow-joiner handshake: send "H" hellos until ``nsubs`` subscribers answered (see zmq_subscriber)."""
    acked: set[bytes] = set()
    while len(acked) < nsubs:
        pub.send(b"H")
        while pull.poll(10):
            acked.add(pull.recv())
    return acked
