"""What slabcast costs at rest: CPU and wake-ups per second of a broker, a publisher and subscribers when
nothing is written.

A broker process; a publisher process that opened a stream and writes nothing; a subscriber process of that
stream blocked in ``recv`` (once with ``wake="doorbell"``, the default, once with ``wake="futex"``).  After a
settling second, each process's threads are read from ``/proc/<pid>/task/*``: run time (``schedstat``, ns)
and voluntary context switches (each one a sleep, so each a wake-up after it), over ``--seconds``.  A
subscriber's first seconds count: it looks at its broker connection more often just after its last frame.

    .venv/bin/python benchmarks/idle.py [--seconds 5] [--trials 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

SETTLE = 1.0


def tasks(pid: int) -> dict[int, tuple[str, int, int]]:
    """Thread id -> (name, run time in ns, voluntary context switches) of process ``pid``."""
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"{base}/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"{base}/{tid}/status") as f:
                status = f.read()
            vol = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
        out[int(tid)] = (comm, ns, vol)
    return out


def rates(before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]],
          seconds: float) -> dict[str, Any]:  # fmt: skip
    """ms of CPU and wake-ups per second, in all and per thread name."""
    threads: dict[str, list[float]] = {}
    for tid, (comm, ns, vol) in after.items():
        ns0, vol0 = before.get(tid, (comm, 0, 0))[1:]
        t = threads.setdefault(comm, [0.0, 0.0])
        t[0] += (ns - ns0) / 1e6 / seconds
        t[1] += (vol - vol0) / seconds
    return {
        "cpu_ms_per_s": sum(v[0] for v in threads.values()),
        "wakeups_per_s": sum(v[1] for v in threads.values()),
        "threads": {k: {"cpu_ms_per_s": v[0], "wakeups_per_s": v[1]} for k, v in threads.items() if v[0] or v[1]},
    }


def _publisher(address: str, stream: str, ready: Any, stop: Any) -> None:
    import slabcast

    with slabcast.Publisher(stream, dtype="float32", channels=2, rate=1000, address=address):
        ready.put(("pub", os.getpid()))
        stop.wait()


def _subscriber(address: str, stream: str, wake: str, ready: Any, stop: Any) -> None:
    import slabcast

    with slabcast.Subscriber(stream, size=100, address=address, wake=wake) as sub:
        ready.put((f"sub-{wake}", os.getpid()))
        with contextlib.suppress(slabcast.EndOfStream):  # (the publisher goes first at the end)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    sub.recv(timeout=1.0)


def trial(seconds: float) -> dict[str, Any]:
    stream = f"idle{os.getpid()}"
    with C.scratch_dir() as tmp, C.broker_at(tmp / "broker.sock") as broker, C.Workers() as w:
        ready, stop = C.CTX.Queue(), C.CTX.Event()
        w.spawn(_publisher, broker.address, stream, ready, stop)
        pids = {"broker": broker.pid}
        pids.update([C.get(ready, 60, w.procs)])
        for wake in ("doorbell", "futex"):
            w.spawn(_subscriber, broker.address, stream, wake, ready, stop)
            pids.update([C.get(ready, 60, w.procs)])
        time.sleep(SETTLE)
        before = {who: tasks(pid) for who, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(seconds)
        after = {who: tasks(pid) for who, pid in pids.items()}
        took = time.monotonic() - t0
        stop.set()
    return {who: rates(before[who], after[who], took) for who in pids}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds measured per trial (after 1 s to settle)")
    ap.add_argument("--trials", type=int, default=2)
    a = ap.parse_args(argv)
    if not 0 < a.seconds < 3600 or a.trials < 1:
        ap.error("--seconds must be in (0, 3600) and --trials at least 1")
    results = [trial(a.seconds) for _ in range(a.trials)]
    rows = []
    for who in results[0]:
        cpu = [r[who]["cpu_ms_per_s"] for r in results]
        wakes = [r[who]["wakeups_per_s"] for r in results]
        rows.append([who, f"{min(cpu):.2f}-{max(cpu):.2f}", f"{min(wakes):.1f}-{max(wakes):.1f}"])
    print(C.table(["process (nothing written)", "CPU ms per s", "wake-ups per s"], rows))
    path = C.write_json(f"idle-{C.timestamp()}", {"machine": C.machine_info(), "seconds": a.seconds,
                                                   "trials": results})  # fmt: skip
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
