"""The Python client's own cost: CPU time of one thread per local chunk received, and per frame written.

Measured in this process, against a broker process, as CPU time of the receiving (or writing) thread
(``time.thread_time``), so that other programs on a shared machine move it little:

- ``chunk``: a publisher writes ``--frames`` frames of 1024 bytes first; then one local subscriber
  (``clip=True``, ``--size`` bytes a chunk) receives and releases every chunk: microseconds per chunk.
  ``--size 16`` (64 chunks a frame) is the per-chunk path; ``--size 65536`` (64 frames a chunk, 64 frames
  a notice batch) the per-frame cutting path.
- ``write``: ``--writes`` frames of 256 bytes back to back, no subscriber, ``statistics=0``: microseconds
  per ``Publisher.write``.

Compare two trees by running it with ``PYTHONPATH=<other tree>/src``.

    .venv/bin/python benchmarks/client_cost.py chunk --size 16
    .venv/bin/python benchmarks/client_cost.py write
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import slabcast


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["chunk", "write"])
    parser.add_argument("--size", type=int, default=16, help="chunk bytes (chunk; default 16)")
    parser.add_argument("--frames", type=int, default=0, help="frames written first (chunk; default: 4000 or 18000)")
    parser.add_argument("--writes", type=int, default=150_000, help="frames written (write; default 150000)")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
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
