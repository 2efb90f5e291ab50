"""The Python client's own cost: CPU time of one thread per local chunk received, and per frame written.

Measured in this process, against a broker process, as CPU time of the receiving (or writing) thread
(``time.thread_time``), so that other programs on a shared machine move it little:

- ``chunk``: a publisher writes ``--frames`` frames of 1024 bytes first; then one local subscriber
  (``clip=True``, ``--size`` bytes a chunk) receives and releases every chunk: microseconds per chunk.
  ``--size 16`` (64 chunks a frame) is the per-chunk path; ``--size 65536`` (64 frames a chunk, 64 frames
  a notice batch) the per-frame cutting path.
- ``write``: ``--writes`` frames of 256 bytes back to back, no subscriber, ``statistics=0``: microseconds
  per ``Publisher.write``.
- ``fan``: the publisher's CPU per frame with 1 and with 8 subscriber processes (issue 21: with 8 at most
  1.2x with 1), and the broker's (under 1 us).  ``--fan-frames`` frames of ``--fan-bytes`` (64 KiB) are
  written back to back (``--rate 0``) or paced (``--rate R`` frames/s) by this process; the subscribers are
  those of ``fanout.py`` (1: 64 KiB clip chunks; 8: 16 KiB .. 1 MiB, clip on and off), ``policy="block"``,
  ``wake=`` each of ``--wakes``.  Per frame: the writing thread's CPU (``thread``), this whole process's
  (``process``: the flusher thread and libzmq's I/O thread too) and the broker's (``/proc/<pid>/task``).
  1 and 8 alternate within each trial, so their ratio is of one machine state.

Compare two trees by running it with ``PYTHONPATH=<other tree>/src``.

    .venv/bin/python benchmarks/client_cost.py chunk --size 16
    .venv/bin/python benchmarks/client_cost.py write
    .venv/bin/python benchmarks/client_cost.py fan --wakes doorbell,futex --trials 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import slabcast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import fanout


def chunk_cost(address: str, name: str, frames: int, size: int) -> float:
    pub = slabcast.Publisher(name, "uint8", address=address, slab_bytes=4 << 20, nslabs=8, max_chunk_bytes=1 << 20,
                             timeout=30)  # fmt: skip
    sub = slabcast.Subscriber(name, size=size, clip=True, address=address, max_inflight=8)
    frame = np.zeros(1024, np.uint8)
    for _ in range(frames):
        pub.write(frame)
    pub.flush()
    total = frames * 1024 // size
    t0 = time.thread_time()
    for _ in range(total):
        sub.recv(timeout=5).release()
    spent = time.thread_time() - t0
    sub.close()
    pub.close()
    return spent / total * 1e6


def write_cost(address: str, name: str, writes: int) -> float:
    pub = slabcast.Publisher(name, "uint8", address=address, slab_bytes=4 << 20, nslabs=8, max_chunk_bytes=1 << 20,
                             timeout=30, statistics=0)  # fmt: skip
    frame = np.zeros(256, np.uint8)
    write = pub.write
    for _ in range(2000):  # the pool's pages faulted in
        write(frame)
    t0 = time.thread_time()
    for _ in range(writes):
        write(frame)
    spent = time.thread_time() - t0
    pub.close()
    return spent / writes * 1e6


def _fan_sub(address: str, name: str, size: int, clip: bool, wake: str, ready: Any, done: Any) -> None:
    sub = slabcast.Subscriber(name, size=size, clip=clip, address=address, max_inflight=8, wake=wake)
    ready.put(os.getpid())
    n = acc = 0
    for chunk in sub:
        with chunk:
            d = chunk.data
            acc += int(d[::4096].sum())
            n += 1
            del d
    sub.close()
    done.put((n, time.process_time()))


def fan_cost(
    broker: Any, name: str, nsubs: int, wake: str, frames: int, nbytes: int, rate: float, spy: str | None = None
) -> dict[str, Any]:
    """Publisher (thread and process) and broker CPU per frame, with ``nsubs`` subscriber processes.

    ``spy``: a path prefix; py-spy records this process and the broker while the frames are written
    (``<spy>-publisher.txt``, ``<spy>-broker.txt``, raw collapsed stacks).
    """
    specs = fanout.SUBS_8 if nsubs == 8 else fanout.SUBS_1 * nsubs
    pub = slabcast.Publisher(name, "uint8", address=broker.address, slab_bytes=8 << 20, nslabs=12,
                             max_chunk_bytes=1 << 20, timeout=60)  # fmt: skip
    ready, done = C.CTX.Queue(), C.CTX.Queue()
    procs = [C.CTX.Process(target=_fan_sub, args=(broker.address, name, size, clip, wake, ready, done), daemon=True)
             for size, clip in specs]  # fmt: skip
    for p in procs:
        p.start()
    try:
        for _ in procs:
            C.get(ready, 60, procs)
        frame = np.frombuffer(np.random.default_rng(1).bytes(nbytes), np.uint8)
        for _ in range(200):  # warm-up: the pool's pages faulted in, every subscriber reading
            pub.write(frame)
        spies = []
        if spy:
            from fanout import _start_spy, _stop_spy

            spies = [
                _start_spy(pid, f"{spy}-{who}.txt") for who, pid in (("publisher", os.getpid()), ("broker", broker.pid))
            ]
        meter = C.CpuMeter([broker.pid])
        s0 = sum(C.pid_cpu(p.pid) for p in procs)  # (they report their total when they end)
        b0, p0, t0 = C.pid_cpu(broker.pid), time.process_time(), time.thread_time()
        period = 1.0 / rate if rate else 0.0
        t_next = time.monotonic()
        write = pub.write
        for _ in range(frames):
            if period:
                t_next += period
                while (left := t_next - time.monotonic()) > 0:
                    time.sleep(left)
            write(frame)
        thread, process, brk = time.thread_time() - t0, time.process_time() - p0, C.pid_cpu(broker.pid) - b0
        for sp in spies:
            _stop_spy(sp)
        pub.close()
        subs = [C.get(done, 120, procs) for _ in procs]
        sub_cpu = sum(c for _, c in subs) - s0
        cpu = meter.stop(time.process_time() - p0 + sub_cpu)  # ours: this process (to close), the subscribers
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    return {
        "subscribers": nsubs,
        "wake": wake,
        "frames": frames,
        "thread_us": thread / frames * 1e6,
        "process_us": process / frames * 1e6,
        "broker_us": brk / frames * 1e6,
        "subscribers_us": sub_cpu / frames * 1e6,
        "chunks": sum(n for n, _ in subs),
        "cpu": cpu,
    }


def fan_main(args: argparse.Namespace) -> None:
    wakes = args.wakes.split(",")
    recs: list[dict[str, Any]] = []
    set_aside: list[dict[str, Any]] = []
    info = C.machine_info()
    print(f"slabcast from {info['slabcast_src']}; {args.fan_frames} frames of {args.fan_bytes} B, "
          f"rate {args.rate or 'flat out'}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, slabcast.BrokerProcess(os.path.join(tmp, "b.sock")) as broker:
        for t in range(args.trials):
            for wake in wakes:

                def group(attempt: int, t: int = t, wake: str = wake) -> list[dict[str, Any]]:
                    out = []
                    for n in (1, 8) if (t + attempt) % 2 == 0 else (8, 1):
                        spy = f"{args.spy}-{wake}-x{n}-t{t}" if args.spy else None
                        r = fan_cost(broker, f"fan{t}{wake[0]}{n}a{attempt}", n, wake, args.fan_frames,
                                     args.fan_bytes, args.rate, spy)  # fmt: skip
                        r["trial"], r["attempt"] = t, attempt
                        print(f"  t{t} {wake:8s} x{n}: publisher thread {r['thread_us']:6.2f} us/frame, process "
                              f"{r['process_us']:6.2f}, broker {r['broker_us']:6.3f}; "
                              f"foreign {r['cpu']['foreign_cores']:.2f} cores", flush=True)  # fmt: skip
                        out.append(r)
                    return out

                kept, aside = C.least_loaded(group, args.max_foreign, args.retries)
                recs += kept
                set_aside += [r for g in aside for r in g]
    rows = []
    for wake in wakes:
        by = {n: [r for r in recs if r["wake"] == wake and r["subscribers"] == n] for n in (1, 8)}
        med = {n: {k: statistics.median(r[k] for r in by[n]) for k in ("thread_us", "process_us", "broker_us")}
               for n in (1, 8)}  # fmt: skip
        ratio = [r8["process_us"] / r1["process_us"] for r1, r8 in zip(by[1], by[8], strict=True)]
        tratio = [r8["thread_us"] / r1["thread_us"] for r1, r8 in zip(by[1], by[8], strict=True)]
        fl = [r["cpu"]["foreign_cores"] for r in by[1] + by[8]]
        for n in (1, 8):
            m = med[n]
            rows.append([wake, n, f"{m['thread_us']:.2f}", f"{m['process_us']:.2f}", f"{m['broker_us']:.3f}",
                         "" if n == 1 else f"{statistics.median(tratio):.2f} [{min(tratio):.2f}-{max(tratio):.2f}]",
                         "" if n == 1 else f"{statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}]",
                         f"{statistics.median(fl):.2f} (max {max(fl):.2f})"])  # fmt: skip
    print(C.table(["wake", "subs", "publisher thread us/frame", "publisher process us/frame", "broker us/frame",
                   "8/1 thread", "8/1 process (target <= 1.2)", "foreign cores"], rows))  # fmt: skip
    path = C.write_json(
        f"client-cost-fan-{C.timestamp()}", {"machine": info, "args": vars(args), "raw": recs, "set_aside": set_aside}
    )
    print(f"json: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["chunk", "write", "fan"])
    parser.add_argument("--size", type=int, default=16, help="chunk bytes (chunk; default 16)")
    parser.add_argument("--frames", type=int, default=0, help="frames written first (chunk; default: 4000 or 18000)")
    parser.add_argument("--writes", type=int, default=150_000, help="frames written (write; default 150000)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--wakes", default="doorbell", help="fan: the subscribers' wake= (comma-separated)")
    parser.add_argument("--fan-frames", type=int, default=20000, help="fan: frames measured (default 20000)")
    parser.add_argument("--fan-bytes", type=int, default=65536, help="fan: bytes a frame (default 65536)")
    parser.add_argument("--rate", type=float, default=0.0, help="fan: frames/s (default 0: back to back)")
    parser.add_argument("--max-foreign", type=float, default=99.0, help="fan: redo a trial above this foreign load")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--spy", default=None, metavar="PREFIX", help="fan: py-spy the publisher and the broker")
    args = parser.parse_args()
    if args.what == "fan":
        fan_main(args)
        return
    frames = args.frames or (4000 if args.size < 4096 else 18000)
    with tempfile.TemporaryDirectory() as tmp, slabcast.BrokerProcess(os.path.join(tmp, "b.sock")) as broker:
        costs = sorted(
            chunk_cost(broker.address, f"cost{t}", frames, args.size) if args.what == "chunk"
            else write_cost(broker.address, f"cost{t}", args.writes)
            for t in range(args.trials)
        )  # fmt: skip
    unit = f"per chunk of {args.size} bytes" if args.what == "chunk" else "per write of 256 bytes"
    print(f"{args.what}: {costs[len(costs) // 2]:.2f} us {unit} (median of {args.trials}; min {costs[0]:.2f}; "
          f"CPU time of the thread; slabcast from {os.path.dirname(slabcast.__file__)})")  # fmt: skip


if __name__ == "__main__":
    main()
