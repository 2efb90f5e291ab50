"""The Python subscriber as a conformance client: the command line and output of README.md ("The client").

    python -m conformance.python_client --address ADDR --stream NAME --size 500 --clip --show-flags

Prints ``ready`` once subscribed, then one line per chunk, as ``clients/c/build/slabcast-sub`` does::

    seq=<seq> index=<index> n=<samples> t0=<%.9f> crc=<crc32 of the chunk's bytes, 8 hex digits> flags=<flags>

(`` times=<crc32 of the chunk's per-sample times as little-endian f64>`` appended with ``--show-times``, or
``times=-`` for a stream without them).  Exit status 0 at the end of the stream (END closed), 4 when the
publisher is gone, 1 on any other error.
"""

from __future__ import annotations

import argparse
import sys
import zlib

import numpy as np

import slabcast


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.python_client")
    parser.add_argument("--address", required=True)
    parser.add_argument("--stream", required=True)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--size", type=int)
    size.add_argument("--seconds", type=float)
    parser.add_argument("--clip", action="store_true")
    parser.add_argument("--policy", default="block", choices=("block", "drop"))
    parser.add_argument("--max-inflight", type=int, default=8)
    parser.add_argument("--sampler", type=float)
    parser.add_argument("--show-flags", action="store_true")
    parser.add_argument("--show-times", action="store_true")
    parser.add_argument("--wake", default="doorbell", choices=("doorbell", "futex", "busy"))
    ns = parser.parse_args(argv)
    try:
        with slabcast.Subscriber(ns.stream, ns.size, seconds=ns.seconds, clip=ns.clip, sampler=ns.sampler,
                                 policy=ns.policy, max_inflight=ns.max_inflight, address=ns.address, wait=0,
                                 wake=ns.wake, label="conformance") as sub:  # fmt: skip
            print("ready", flush=True)
            while True:
                try:
                    chunk = sub.recv()
                except slabcast.PublisherGoneError:
                    return 4
                except slabcast.EndOfStream:
                    return 0
                line = (f"seq={chunk.seq} index={chunk.index} n={len(chunk)} t0={chunk.t0:.9f} "
                        f"crc={zlib.crc32(np.ascontiguousarray(chunk.data).tobytes()):08x}")  # fmt: skip
                if ns.show_flags:
                    line += f" flags={chunk.flags}"
                if ns.show_times:
                    if chunk.info.timestamps:
                        line += f" times={zlib.crc32(chunk.times.astype('<f8').tobytes()):08x}"
                    else:
                        line += " times=-"
                chunk.release()
                print(line, flush=True)
    except slabcast.SlabcastError as exc:
        print(f"python_client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
