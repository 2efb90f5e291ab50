"""What growing a pool costs: the time to subscribe when the broker must allocate a longer carried part for
the chunk, against a chunk the pool already carries, in the same run (alternating which goes first).

    python benchmarks/pool_growth.py [--streams 20]

A 48 kHz stereo float32 stream with the default pool (8 slabs, 2 MiB of frames and 2 MiB carried each):
0.5 s chunks (384 kB) fit; 10 s chunks (3.84 MB) make it allocate 8 x 1.74 MB more.
The data path's own cost with the default (growable) layout is measured by benchmarks/fanout.py with
``POOL`` without ``max_chunk_bytes`` (docs/benchmarks.md, section 12).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import slabcast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=20, help="streams (one measure of each kind per stream)")
    args = ap.parse_args()
    times: dict[str, list[float]] = {"carried": [], "grows": []}
    with slabcast.BrokerProcess() as broker:
        for k in range(args.streams):
            name = f"growth-{k}"
            pub = slabcast.Publisher(name, dtype="float32", channels=2, rate=48_000, address=broker.address)
            pub.write(np.zeros((480, 2), np.float32))
            order = [("carried", 0.5), ("grows", 10.0)]
            for label, seconds in order if k % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                sub = slabcast.Subscriber(name, seconds=seconds, address=broker.address)
                times[label].append(time.perf_counter() - t)
                sub.close()
            pool = next(s for s in slabcast.broker_status(broker.address)["streams"] if s["name"] == name)
            pub.close()
    for label, values in times.items():
        print(f"subscribe, chunk {label:>7}: median {statistics.median(values) * 1e3:6.2f} ms "
              f"(min {min(values) * 1e3:.2f}, max {max(values) * 1e3:.2f}, n={len(values)})")  # fmt: skip
    ratio = statistics.median(times["grows"]) / statistics.median(times["carried"])
    print(f"grows / carried = {ratio:.2f}x; pool after growth: {pool['shm_bytes'] / (1 << 20):.1f} MiB of "
          f"shared memory, carried part {pool['carried_bytes']} bytes of {pool['max_chunk_bytes']} possible")


if __name__ == "__main__":
    main()
