"""BufferEmit against ocycle 0.1.0: MB/s written through write(), serial, thread and process mode.

The workload: 4 KiB bytes frames, 64 KiB chunks (clip off), a callback that returns
``len(value)``; 1 emitter, and 4 emitters fed the same frames (4 writes a frame).
A trial times the writes of a fixed amount of data until the last callback's result
is back in this process (``on_done``); each emitter has written and finished 1 MiB
first, so worker start-up (a spawned process takes a few hundred ms) is not in the
figure, and ``close()`` (which stops the workers) is timed apart.  Trials
of slabcast and ocycle alternate, so a busy machine slows both alike; the table
gives medians and the load average.

    .venv/bin/python benchmarks/bench_emit.py            # 5 trials, about a minute
    .venv/bin/python benchmarks/bench_emit.py --trials 3 --scale 0.25   # quicker

MB/s counts every byte passed to write() (with 4 emitters, 4x the stream).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

import ocycle

import slabcast

KiB = 1024
MiB = 1024 * KiB
FRAME = 4 * KiB
CHUNK = 64 * KiB
# Stream bytes per emitter and trial.
AMOUNT = {"serial": 256 * MiB, "thread": 128 * MiB, "process": 256 * MiB}
TARGETS = {"serial": 1.0, "process": 10.0}  # slabcast / ocycle, 1 and 4 emitters


def cheap(value: Any, t0: float) -> int:
    """The benchmark's callback: as little work as a callback can do."""
    return len(value)


class Done:
    """``on_done`` for both libraries: counts the results come back to this process."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0
        self.target = 0

    def __call__(self, result: int) -> None:
        with self.cond:
            self.count += 1
            if self.count >= self.target:
                self.cond.notify_all()

    def wait(self, count: int) -> None:
        with self.cond:
            self.target = count
            if not self.cond.wait_for(lambda: self.count >= count, timeout=300):
                raise TimeoutError(f"{self.count} results of {count} after 300 s")


def trial(impl: str, mode: str, emitters: int, amount: int, npool: int) -> tuple[float, float]:
    """Return (MB/s written through write(), seconds close() took) for ``emitters`` fed ``amount`` bytes each.

    The clock runs from the first write until the last callback's result is back
    in this process (``on_done``); close() is timed apart: it stops the workers.
    """
    frame = b"\x5a" * FRAME
    cls = slabcast.BufferEmit if impl == "slabcast" else ocycle.BufferEmit
    done = Done()
    emits = [cls(cheap, CHUNK, mode=mode, npool=npool, on_done=done) for _ in range(emitters)]
    try:
        t = 1.0
        for _ in range(MiB // FRAME):  # warm-up: workers started, buffers made
            for emit in emits:
                emit.write(frame, t)
            t += 0.001
        done.wait(emitters * MiB // CHUNK)
        start = time.perf_counter()
        for _ in range(amount // FRAME):
            for emit in emits:
                emit.write(frame, t)
            t += 0.001
        done.wait(emitters * (MiB + amount) // CHUNK)
        elapsed = time.perf_counter() - start
        start = time.perf_counter()
        for emit in emits:
            emit.close()
        closing = time.perf_counter() - start
    finally:
        for emit in emits:
            emit.close()
    return emitters * amount / elapsed / 1e6, closing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the amounts of data")
    parser.add_argument("--npool", type=int, default=2, help="workers per emitter (both libraries)")
    parser.add_argument("--modes", default="serial,thread,process")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    print(
        f"# BufferEmit vs ocycle {getattr(ocycle, '__version__', '0.1.0')}: {FRAME // KiB} KiB frames, "
        f"{CHUNK // KiB} KiB chunks, npool={args.npool}, {args.trials} trials, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = []
    for mode in modes:
        amount = int(AMOUNT[mode] * args.scale) // FRAME * FRAME
        for emitters in (1, 4):
            got: dict[str, list[float]] = {"ocycle": [], "slabcast": []}
            closing: dict[str, list[float]] = {"ocycle": [], "slabcast": []}
            for _ in range(args.trials):
                for impl in ("ocycle", "slabcast"):
                    rate, seconds = trial(impl, mode, emitters, amount, args.npool)
                    got[impl].append(rate)
                    closing[impl].append(seconds)
            med = {impl: statistics.median(v) for impl, v in got.items()}
            med_close = {impl: statistics.median(v) * 1e3 for impl, v in closing.items()}
            ratio = med["slabcast"] / med["ocycle"]
            target = TARGETS.get(mode)
            verdict = "" if target is None else ("met" if ratio >= target else "NOT met") + f" (>= {target:g}x)"
            rows.append((mode, emitters, amount, med, med_close, ratio, verdict))
            print(
                f"{mode:8} {emitters} emitter(s): ocycle {med['ocycle']:8.0f} MB/s  slabcast "
                f"{med['slabcast']:8.0f} MB/s  ratio {ratio:5.1f}x  {verdict}   "
                f"(trials ocycle {[round(x) for x in got['ocycle']]}, slabcast {[round(x) for x in got['slabcast']]})",
                flush=True,
            )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print(
        "| mode | emitters | MiB per emitter | ocycle MB/s | slabcast MB/s | slabcast/ocycle | target "
        "| close() ms ocycle / slabcast |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, emitters, amount, med, med_close, ratio, verdict in rows:
        print(
            f"| {mode} | {emitters} | {amount // MiB} | {med['ocycle']:.0f} | {med['slabcast']:.0f} | "
            f"{ratio:.1f}x | {verdict or '-'} | {med_close['ocycle']:.0f} / {med_close['slabcast']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
