"""The broker's CPU per frame with C subscribers of a fast publisher, for one or two builds of the C client.

Usage::

    python benchmarks/c_subscribers.py [--subs 4] [--frames 16000] [--trials 2] [--exe PATH ...]

One broker, one Python publisher writing ``--frames`` frames of 64 KiB flat out into
fanout.py's pool (12 slabs of 8 MiB, chunks up to 1 MiB), and ``--subs``
``slabcast-sub`` processes (``--size 65536 --clip --policy block``; each computes a
CRC of every chunk, so they hold the publisher back).  Each ``--exe`` (default
``clients/c/build/slabcast-sub``) runs once per trial, the executables alternating;
the broker's CPU time (``/proc/<pid>/stat``, all its threads) over the frames is
what the C subscribers' messages cost it: a 1.4.0 client sent an ACK for every slab,
1.5.0 posts its cursor in the ring's cursor table and ACKs only while asked
(docs/protocol.md 7.9).  Build an older client beside it to compare, e.g.
``git archive <commit> clients/c | tar -x -C /tmp/old && make -C /tmp/old/clients/c``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

ROOT = Path(__file__).resolve().parent.parent
FRAME = 64 * C.KiB
POOL = {"slab_bytes": 8 * C.MiB, "nslabs": 12, "max_chunk_bytes": 1 * C.MiB}


def _wait_ready(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Read the subscriber's ``ready`` line, then drain its output on a thread (a full pipe would stall it)."""
    got = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready"):
                got.set()
        got.set()

    threading.Thread(target=read, daemon=True).start()
    if not got.wait(timeout) or proc.poll() is not None:
        raise RuntimeError(f"slabcast-sub did not subscribe: {proc.stderr.read() if proc.stderr else ''}")


def run(exe: str, subs: int, frames: int) -> dict[str, Any]:
    import slabcast

    with C.scratch_dir() as d, C.broker_at(d / "b.sock") as broker:
        pub = slabcast.Publisher("cs", dtype="uint8", address=broker.address, timeout=60, **POOL)
        procs = [subprocess.Popen([exe, "--address", broker.address, "--stream", "cs", "--size", str(FRAME), "--clip",
                                   "--policy", "block", "--count", str(frames)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(subs)]  # fmt: skip
        try:
            for p in procs:
                _wait_ready(p)
            frame = np.zeros(FRAME, np.uint8)
            cpu0, t0 = C.pid_cpu(broker.pid), time.monotonic()
            for k in range(frames):
                frame[0] = k & 0xFF
                pub.write(frame)
            codes = [p.wait(120) for p in procs]
            cpu1, t1 = C.pid_cpu(broker.pid), time.monotonic()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            pub.close()
    if any(codes):
        raise RuntimeError(f"slabcast-sub exit codes {codes}")
    return {"exe": exe, "subs": subs, "frames": frames, "broker_us_per_frame": (cpu1 - cpu0) / frames * 1e6,
            "frames_s": frames / (t1 - t0)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subs", type=int, default=4)
    ap.add_argument("--frames", type=int, default=16000)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--exe", action="append", help="a slabcast-sub to measure (repeatable; default: the built one)")
    args = ap.parse_args(argv)
    exes = args.exe or [str(ROOT / "clients/c/build/slabcast-sub")]
    out: dict[str, Any] = {"machine": C.machine_info(), "runs": []}
    for trial in range(args.trials):
        for exe in exes:
            rec = run(exe, args.subs, args.frames)
            rec["trial"] = trial
            out["runs"].append(rec)
            version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
            print(f"trial {trial} {version}: broker {rec['broker_us_per_frame']:.2f} us/frame, "
                  f"{rec['frames_s']:.0f} frames/s")  # fmt: skip
    print(C.write_json(f"c-subscribers-{C.timestamp()}", out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
