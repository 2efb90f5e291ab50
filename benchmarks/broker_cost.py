"""The broker's own work per slab, without processes: CPU of one ``PUBLISHED`` of a slab change.

The broker's state (``BrokerState``, the sans-io core) is driven in this process, as the unit tests do: a real
segment in /dev/shm, a publisher's frames described in its ring (``Ring.write``/``publish``, no copy of samples),
and a ``PUBLISHED`` at each slab's first frame, as the publisher sends it.  ``handle`` of that message does all the
broker does for a slab of a flat-out publisher: read the slab's descriptors, check them and group them into runs,
head, history, statistics, the slab change, the grant.  Its CPU time (``time.thread_time``) is taken per
``PUBLISHED``, warm (this loop does nothing else), with the stream's statistics on (``stats_seconds`` 10, the
publisher's default) and off (0).  Cold, in a process woken per slab beside busy subscribers, the same work
takes several times longer (docs/architecture.md): this measures the work, not the wake-up.

    .venv/bin/python benchmarks/broker_cost.py [--frame 2000] [--slab-mib 1] [--slabs 200] [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from slabcast.broker.state import BrokerState, System
from slabcast.wire import messages as M
from slabcast.wire import protocol as P

PUB = b"\x00pub"


def per_published(frame: int, slab_bytes: int, slabs: int, stats: float) -> list[float]:
    """Seconds of CPU of each slab change's PUBLISHED, int32 frames of ``frame`` samples."""
    state = BrokerState(pid=os.getpid(), epoch=int.from_bytes(os.urandom(4), "little"),
                        address=f"ipc:///tmp/bc-{os.getpid()}.sock", now=0.0, lease_timeout=5.0, fd_limit=1024,
                        fd_headroom=64, system=System(lock_held=lambda fd, byte: True))  # fmt: skip
    now = 1.0
    grants: list[int] = []

    def send(msg: Any) -> list[Any]:
        out = state.handle(PUB, msg, now, 4242)
        grants.extend(m.slab for ident, m, _ in out if ident == PUB and isinstance(m, M.Grant))
        return out

    try:
        send(M.Hello(P.VERSION, 4242, "pub", "bench"))
        out = send(M.Open("s", "<i4", 1, 48000.0, slab_bytes, 8, 4096, None, stats, None))
        opened = next(m for _, m, _ in out if isinstance(m, M.Opened))
        stream = state.streams["s"]
        ring, header, reserve = stream.ring, opened.header_bytes, opened.reserve
        offset = slab_end = -1
        slab = floor = index = position = 0
        times: list[float] = []
        while len(times) < slabs:
            change = offset < 0 or offset + 4 * frame > slab_end
            if change:
                slab = grants.pop(0)
                offset = header + slab * slab_bytes + reserve
                slab_end = header + (slab + 1) * slab_bytes
                floor = index
            ring.write(position, index, 0.0, offset, floor, frame, slab, int(stream.gens[slab]), 0)
            position += 1
            ring.publish(position)
            if change:  # (the slab's first frame is described: the broker sees the change, grants the next)
                t = time.thread_time()
                send(M.Published(position))
                times.append(time.thread_time() - t)
            offset += 4 * frame
            index += frame
            now += frame / 48000.0
        return times
    finally:
        state.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frame", type=int, default=2000, help="samples (int32) per frame")
    ap.add_argument("--slab-mib", type=float, default=1.0, help="slab size")
    ap.add_argument("--slabs", type=int, default=300, help="slab changes timed per trial")
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    slab_bytes = int(args.slab_mib * C.MiB) // 4096 * 4096
    rows, record = [], []
    for trial in range(args.trials):
        for stats in (10.0, 0.0):
            times = np.array(per_published(args.frame, slab_bytes, args.slabs, stats)[5:]) * 1e6
            frames = (slab_bytes - 4096) // (4 * args.frame)
            rec = {"trial": trial, "stats_seconds": stats, "frames_per_slab": frames,
                   "median_us": float(np.median(times)), "p90_us": float(np.percentile(times, 90))}  # fmt: skip
            record.append(rec)
            rows.append([str(trial), f"{stats:g}", str(frames), f"{rec['median_us']:.1f}", f"{rec['p90_us']:.1f}",
                         f"{rec['median_us'] / frames:.2f}"])  # fmt: skip
    print(C.table(["trial", "stats_seconds", "frames/slab", "PUBLISHED median us", "p90 us", "us per frame"], rows))
    print("results:", C.write_json(f"broker-cost-{C.timestamp()}", {"args": vars(args), "trials": record}))


if __name__ == "__main__":
    main()
