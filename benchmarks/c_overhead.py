"""Per-chunk overhead of the C subscriber beside the Python subscriber on one stream (notice ready -> RELEASE sent).

Usage::

    python benchmarks/c_overhead.py [--frames 3000] [--frame-bytes 65536] [--repeat 5] [--pace-us 500]

One broker, one Python publisher writing ``--frames`` frames of ``--frame-bytes``
bytes (float32 mono), and two subscribers with chunk size = frame size, policy
block, side by side: ``clients/c/build/slabcast-bench`` and a Python
``slabcast.Subscriber`` in its own process.  For every chunk each subscriber
measures, on CLOCK_MONOTONIC:

- overhead: from the notice being ready on its socket (a poll returned) to its
  RELEASE being sent: decoding the notice, building the zero-copy view, releasing.
  Reading the samples is the application's business and is not included;
- latency: from the frame's ``t0`` (the publisher sets ``time.monotonic()`` right
  before ``write``) to the notice being ready: publisher -> broker -> subscriber.

Each repeat prints median and p99 in microseconds; the summary gives the median of
each figure over the repeats.  The machine's other load shows in p99: repeat.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

import slabcast

ROOT = Path(__file__).resolve().parents[1]
C_DIR = ROOT / "clients" / "c"
BENCH = C_DIR / "build" / "slabcast-bench"


def python_subscriber(address: str, stream: str, size: int, ready: Any, results: Any) -> None:
    """Subscribe; for each chunk time poll-ready -> recv -> release; send the figures back."""
    sub = slabcast.Subscriber(stream, size=size, address=address)
    sock = sub.pollables()[0]  # the notice socket, polled so that waiting is not counted as overhead
    ready.put("ready")
    overhead: list[int] = []
    latency: list[int] = []
    try:
        t_ready = 0
        while True:
            # The event-loop pattern (version 3): take what is there; when recv(0) finds nothing it leaves the
            # subscriber's sleeper byte set, so the next publish makes the notice socket readable.
            try:
                chunk = sub.recv(0)
            except TimeoutError:
                sock.poll(-1, zmq.POLLIN)
                t_ready = time.monotonic_ns()
                continue
            except slabcast.EndOfStream:
                break
            t_ready = t_ready or time.monotonic_ns()
            t0 = chunk.t0
            chunk.release()
            overhead.append(time.monotonic_ns() - t_ready)
            latency.append(t_ready - int(t0 * 1e9))
            t_ready = 0
    finally:
        sub.close()
    results.put((overhead, latency))


def percentiles(values_ns: list[int]) -> tuple[float, float]:
    """Median and p99 of nanosecond values, in microseconds."""
    a = np.asarray(values_ns, dtype=np.float64) / 1000.0
    return float(np.median(a)), float(np.percentile(a, 99))


def one_run(frames: int, frame_bytes: int, pace_s: float) -> dict[str, tuple[float, float]]:
    """Run the stream once; return {figure: (median us, p99 us)}."""
    ctx = mp.get_context("spawn")
    samples = frame_bytes // 4
    with tempfile.TemporaryDirectory() as tmp, slabcast.BrokerProcess(Path(tmp) / "b.sock") as broker:
        pub = slabcast.Publisher(
            "bench",
            dtype="float32",
            address=broker.address,
            slab_bytes=16 * frame_bytes,
            nslabs=8,
            max_chunk_bytes=frame_bytes,
        )
        ready, results = ctx.Queue(), ctx.Queue()
        py = ctx.Process(target=python_subscriber, args=(broker.address, "bench", samples, ready, results))
        c = subprocess.Popen([str(BENCH), broker.address, "bench", str(samples)], stdout=subprocess.PIPE, text=True)
        try:
            py.start()
            assert c.stdout is not None
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError("slabcast-bench did not subscribe")
            if ready.get(timeout=30) != "ready":
                raise RuntimeError("the Python subscriber did not subscribe")
            frame = np.zeros(samples, dtype=np.float32)
            for _ in range(frames):
                pub.write(frame, t0=time.monotonic())
                if pace_s:
                    time.sleep(pace_s)
            pub.close()
            py_overhead, py_latency = results.get(timeout=60)
            out, _ = c.communicate(timeout=60)
            if c.returncode != 0:
                raise RuntimeError(f"slabcast-bench exited {c.returncode}")
            rows = [line.split() for line in out.splitlines() if line.strip()]
            c_overhead = [int(r[0]) for r in rows]
            c_latency = [int(r[1]) for r in rows]
            py.join(10)
        finally:
            if c.poll() is None:
                c.kill()
                c.wait()
            if c.stdout is not None:
                c.stdout.close()
            if py.is_alive():
                py.kill()
            py.join(5)
            pub.close()
            for q in (ready, results):
                q.close()
                q.join_thread()
    if len(c_overhead) != frames or len(py_overhead) != frames:
        raise RuntimeError(f"expected {frames} chunks, C got {len(c_overhead)}, Python {len(py_overhead)}")
    return {
        "C overhead": percentiles(c_overhead),
        "Python overhead": percentiles(py_overhead),
        "C latency": percentiles(c_latency),
        "Python latency": percentiles(py_latency),
    }


def main() -> int:
    """Build the C client, run the benchmark ``--repeat`` times, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3000, help="frames (= chunks) per run")
    parser.add_argument("--frame-bytes", type=int, default=64 * 1024, help="bytes per frame and per chunk")
    parser.add_argument("--repeat", type=int, default=5, help="runs")
    parser.add_argument("--pace-us", type=float, default=500.0, help="pause between writes (0: as fast as possible)")
    args = parser.parse_args()
    if args.frame_bytes % 4096:
        parser.error("--frame-bytes must be a multiple of 4096")
    build = subprocess.run(["make", "-s", "-C", str(C_DIR)], capture_output=True, text=True)
    if build.returncode != 0:
        print(build.stdout + build.stderr, file=sys.stderr)
        return 1
    print(
        f"{args.frames} chunks of {args.frame_bytes} bytes per run, pace {args.pace_us:g} us, "
        f"{os.cpu_count()} CPUs; microseconds"
    )
    runs = []
    for i in range(args.repeat):
        r = one_run(args.frames, args.frame_bytes, args.pace_us / 1e6)
        runs.append(r)
        print(f"run {i + 1}: " + "  ".join(f"{k}: median {m:.1f} p99 {p:.1f}" for k, (m, p) in r.items()))
    print("median over runs:")
    for key in runs[0]:
        med = statistics.median(r[key][0] for r in runs)
        p99 = statistics.median(r[key][1] for r in runs)
        print(f"  {key:16s} median {med:7.1f} us   p99 {p99:7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
