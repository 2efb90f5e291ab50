"""A local subscriber's own cost per chunk, cold and warm: where its part of the latency goes.

Cold (the real case): a publisher process paces ``--count`` frames of ``--frame`` bytes at ``--rate`` frames/s,
stamping ``time.monotonic_ns()`` into bytes 8..15; one subscriber process (chunk = frame, ``clip=True``) per
wait strategy in ``--wakes`` takes them.  The subscriber reports, over the frames after the first ``--warmup``:

- ``cpu``: its thread's CPU time (``time.thread_time``) per chunk, from one chunk in hand to the next: the wait
  call, the Python around it, the chunk's cut, lease and release;
- ``wait_call``: of that, the CPU of the wait itself (the receiver's ``_idle``: the futex or notice wait and the
  Python in it; instrumented by wrapping that private method);
- ``wake_to_chunk``: wall time from the wait's return to the chunk in the caller's hands (``perf_counter``);
- ``latency``: the publisher's stamp (just before ``write``) to the chunk in hand (CLOCK_MONOTONIC).

A wait strategy written ``futex/py`` (or ``doorbell/py``) runs the subscriber with its compiled look at the ring
off (``Reader.take_one``, core/_hot.c): the Python steps it replaces, as a baseline in the same run.

Warm: the publisher and subscriber in this process, a ``write`` then ``recv`` and release, back to back: the
median of ``recv`` + release per chunk, every cache hot (nothing waits).

    .venv/bin/python benchmarks/subscriber_path.py [--wakes futex,doorbell] [--trials 3] [--count 3000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def _pub(address: str, stream: str, nbytes: int, count: int, rate: float, ready: Any, go: Any) -> None:
    import slabcast

    pub = slabcast.Publisher(stream, dtype="uint8", address=address, timeout=60)
    ready.put(("pub-ready", 0))
    go.wait()
    frame = np.zeros(nbytes, np.uint8)
    words = frame.view(np.uint64)
    t_next = time.monotonic()
    for k in range(count):
        t_next += 1.0 / rate
        while (left := t_next - time.monotonic()) > 0:
            time.sleep(left)
        words[0] = k
        words[1] = time.monotonic_ns()
        pub.write(frame)
    pub.close()


def _sub(address: str, stream: str, nbytes: int, count: int, wake: str, warmup: int, ready: Any, out: Any) -> None:
    import slabcast

    wake, _, variant = wake.partition("/")
    sub = slabcast.Subscriber(stream, size=nbytes, clip=True, address=address, wake=wake)
    rx = sub._rx
    if variant == "py":
        rx._reader = None  # the Python steps (_take_one's other branch)
    idle = rx._idle
    waits: list[int] = []
    woke = [0]

    def timed_idle(wait: float) -> int:
        t = time.thread_time_ns()
        position: int = idle(wait)
        woke[0] = time.perf_counter_ns()
        waits.append(time.thread_time_ns() - t)
        return position

    rx._idle = timed_idle
    ready.put(("sub-ready", 0))
    cpu, lat, post = [], [], []
    t_prev = time.thread_time_ns()
    for chunk in sub:
        post.append(time.perf_counter_ns() - woke[0])
        with chunk:
            lat.append(time.monotonic_ns() - int(chunk.data[8:16].view(np.uint64)[0]))
        now = time.thread_time_ns()
        cpu.append(now - t_prev)
        t_prev = now
        if len(cpu) == count:
            break
    sub.close()

    def us(values: list[int]) -> np.ndarray[Any, Any]:
        return np.array(values[warmup:], dtype=np.float64) / 1e3

    c, w, p, la = us(cpu), us(waits), us(post), us(lat)
    figures = {"cpu_median": float(np.median(c)), "cpu_mean": float(c.mean()),
               "wait_call_median": float(np.median(w)), "wake_to_chunk_p50": float(np.median(p)),
               "wake_to_chunk_p90": float(np.percentile(p, 90)), "latency_p50": float(np.median(la))}  # fmt: skip
    out.put(("sub", figures))


def warm(address: str, nbytes: int, count: int) -> float:
    """Median microseconds of ``recv`` + release with every cache hot (publisher in this process)."""
    import slabcast

    pub = slabcast.Publisher("warm", dtype="uint8", address=address)
    sub = slabcast.Subscriber("warm", size=nbytes, clip=True, address=address, wake="futex")
    frame = np.zeros(nbytes, np.uint8)
    times = np.empty(count)
    try:
        for k in range(-count // 10, count):
            pub.write(frame)
            t = time.perf_counter()
            with sub.recv(timeout=5):
                pass
            if k >= 0:
                times[k] = time.perf_counter() - t
    finally:
        sub.close()
        pub.close()
    return float(np.median(times) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wakes", default="futex,doorbell",
                    help="comma-separated wait strategies; WAKE/py: the compiled look at the ring off")
    ap.add_argument("--frame", type=int, default=64, help="bytes per frame (at least 16)")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    wakes = args.wakes.split(",")
    record: list[dict[str, Any]] = []
    with C.scratch_dir() as d, C.broker_at(d / "b.sock") as broker:
        for trial in range(args.trials):
            for wake in wakes:
                with C.Workers() as w:
                    ready, out, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
                    stream = f"sp{trial}{wake.replace('/', '')}"
                    w.spawn(_pub, broker.address, stream, args.frame, args.count, args.rate, ready, go)
                    C.get(ready, 60, w.procs)
                    w.spawn(_sub, broker.address, stream, args.frame, args.count, wake, args.warmup, ready, out)
                    C.get(ready, 60, w.procs)
                    go.set()
                    rec = C.get(out, 120, w.procs)[1] | {"trial": trial, "wake": wake}
                record.append(rec)
                print(f"  trial {trial} {wake:8s}: CPU per chunk {rec['cpu_median']:.1f} us (mean "
                      f"{rec['cpu_mean']:.1f}), wait call {rec['wait_call_median']:.1f}, wake -> chunk p50 "
                      f"{rec['wake_to_chunk_p50']:.1f} us, latency p50 {rec['latency_p50']:.1f} us",
                      flush=True)  # fmt: skip
        hot = warm(broker.address, args.frame, args.count)
    rows = []
    for wake in wakes:
        mine = [r for r in record if r["wake"] == wake]

        def span(key: str, rs: list[dict[str, Any]] = mine) -> str:
            v = [r[key] for r in rs]
            return f"{np.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]"

        rows.append([wake, span("cpu_median"), span("wait_call_median"), span("wake_to_chunk_p50"),
                     span("latency_p50")])  # fmt: skip
    print(C.table(["wake", "CPU per chunk us", "of it the wait call", "wake -> chunk p50 us", "latency p50 us"],
                  rows))  # fmt: skip
    print(f"warm (publisher in this process, nothing waits): recv + release {hot:.2f} us per chunk")
    path = C.write_json(f"subscriber-path-{C.timestamp()}", {"args": vars(args), "trials": record, "warm_us": hot})
    print("results:", path)


if __name__ == "__main__":
    main()
