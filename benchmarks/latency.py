"""Latency: frame written -> chunk in the subscriber's hands, in microseconds.

One publisher process paces frames at ``--rate`` frames/s (default 1000) so that
latency, not queueing, is measured.  Right before ``Publisher.write`` it stamps
the frame with ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every
process on Linux) in bytes 8..15 of the payload (bytes 0..7 hold the frame
number); the subscriber, blocked in ``recv()`` (no spinning), reads the clock as
soon as ``recv`` returns and subtracts.  The chunk size equals the frame size
(``clip=True``), so every frame is exactly one chunk.  The write itself (the copy
into shared memory and the notice) is inside the measured interval.

Baselines in the same run: plain pyzmq PUB/SUB over ipc carrying the same
payloads (after a handshake, HWM 0), the subscriber blocked in ``recv``; and,
as a floor for "one kernel hop, no libzmq I/O threads", a raw AF_UNIX
SOCK_SEQPACKET socket per subscriber (the publisher sends to each in turn).

``slabcast`` runs with the library's defaults, ``slabcast_s0`` with
``Publisher(statistics=0)`` (no rolling statistics computed by the broker on
every frame before it cuts chunks).

Configurations: 64 B and 64 KiB frames, 1 and 4 subscribers.  The first
``--warmup`` frames of each trial are dropped (they fault in fresh slab pages).
Run ``python benchmarks/latency.py --help``.
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

FRAMES = (64, 64 * C.KiB)
SUBS = (1, 4)
POOL = {"slab_bytes": 1 * C.MiB, "nslabs": 8, "max_chunk_bytes": 64 * C.KiB}
PCTS = (50, 90, 99, 99.9)


def _pace(period: float, t_next: float) -> float:
    """Sleep until ``t_next`` (monotonic seconds); return the next deadline."""
    while (left := t_next - time.monotonic()) > 0:
        time.sleep(left)
    return t_next + period


def _paced_writes(send, frame_bytes: int, count: int, rate: float, go) -> tuple[np.ndarray, float]:
    """After ``go``, send ``count`` frames at ``rate``/s, each stamped with its number and the send time
    (monotonic ns, read by the consumer); return each send's duration (ns) and the CPU time at the start."""
    frame = C.frame_pattern(frame_bytes, 1)[0]
    words = frame.view(np.uint64)
    write_ns = np.empty(count, dtype=np.int64)
    go.wait()
    cpu0 = C.worker_cpu()
    period = 1.0 / rate
    t_next = time.monotonic() + period
    clock = time.monotonic_ns
    for k in range(count):
        t_next = _pace(period, t_next)
        words[0] = k
        words[1] = t = clock()
        send(frame)
        write_ns[k] = clock() - t
    return write_ns, cpu0


# ----------------------------------------------------------------------------- slabcast


def _slab_pub(address: str, stream: str, frame_bytes: int, count: int, rate: float, stats, ready, go, results):
    import slabcast

    extra = {} if stats is None else {"statistics": stats}  # None: the library's default
    pub = slabcast.Publisher(stream, dtype="uint8", channels=1, address=address, timeout=60, **POOL, **extra)
    ready.put(("pub-ready", os.getpid()))
    write_ns, cpu0 = _paced_writes(pub.write, frame_bytes, count, rate, go)
    pub.close()
    results.put(("pub", {"write_ns": write_ns, "cpu": C.worker_cpu() - cpu0}))


def _slab_sub(address: str, stream: str, tag: str, frame_bytes: int, count: int, ready: Any, results: Any) -> None:
    import slabcast

    sub = slabcast.Subscriber(stream, size=frame_bytes, clip=True, address=address)
    lat = np.full(count, -1, dtype=np.int64)
    ready.put(("sub-ready", tag))
    cpu0 = C.worker_cpu()
    clock = time.monotonic_ns
    bad = 0
    while True:
        try:
            chunk = sub.recv()
        except slabcast.EndOfStream:
            break
        now = clock()
        w = chunk.data[:16].view(np.uint64)
        k, t = int(w[0]), int(w[1])
        del w  # no view may outlive the release, or the release waits for it
        if k != chunk.index // frame_bytes:
            bad += 1
        lat[k] = now - t
        chunk.release()
    sub.close()
    results.put((tag, {"lat_ns": lat, "bad": bad, "cpu": C.worker_cpu() - cpu0}))


def run_slabcast(
    broker: Any, trial: str, frame_bytes: int, nsubs: int, count: int, rate: float, stats: float | None = None
) -> dict[str, Any]:
    stream = f"lat{trial}"
    with C.Workers() as w:
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        pub = w.spawn(_slab_pub, broker.address, stream, frame_bytes, count, rate, stats, ready, go, results)
        C.get(ready, 60, [pub])
        for i in range(nsubs):
            w.spawn(_slab_sub, broker.address, stream, f"s{i}", frame_bytes, count, ready, results)
        for _ in range(nsubs):
            C.get(ready, 60, w.procs)
        meter = C.CpuMeter([broker.pid])
        go.set()
        out = dict(C.get(results, 600, w.procs) for _ in range(nsubs + 1))
        cpu = meter.stop(sum(v["cpu"] for v in out.values()))
    return _collect(out, nsubs, cpu)


# ----------------------------------------------------------------------------- pyzmq PUB/SUB


def _zmq_pub(endpoint: str, sync: str, nsubs: int, frame_bytes: int, count: int, rate: float, ready, go, results):

    ctx, pub, pull = C.zmq_publisher(endpoint, sync)
    ready.put(("pub-ready", os.getpid()))
    acked = C.zmq_handshake(pub, pull, nsubs)
    ready.put(("pub-synced", len(acked)))
    write_ns, cpu0 = _paced_writes(lambda frame: pub.send(frame, copy=True), frame_bytes, count, rate, go)
    pub.send(b"E")
    pull.close(linger=0)
    pub.close(linger=-1)
    ctx.term()
    results.put(("pub", {"write_ns": write_ns, "cpu": C.worker_cpu() - cpu0}))


def _zmq_sub(endpoint: str, sync: str, tag: str, count: int, ready: Any, results: Any) -> None:

    ctx, sub, push = C.zmq_subscriber(endpoint, sync, tag, ready)
    lat = np.full(count, -1, dtype=np.int64)
    cpu0 = C.worker_cpu()
    clock = time.monotonic_ns
    while True:
        msg = sub.recv(copy=False)
        now = clock()
        mv = msg.buffer
        if len(mv) < 16:
            if mv == b"E":
                break
            continue  # a late hello
        w = np.frombuffer(mv, dtype=np.uint64, count=2)
        lat[int(w[0])] = now - int(w[1])
    sub.close(linger=0)
    push.close(linger=0)
    ctx.term()
    results.put((tag, {"lat_ns": lat, "bad": 0, "cpu": C.worker_cpu() - cpu0}))


def run_zmq(tmp: Path, trial: str, frame_bytes: int, nsubs: int, count: int, rate: float) -> dict[str, Any]:
    endpoint, sync = f"ipc://{tmp}/l{trial}.sock", f"ipc://{tmp}/l{trial}.sync"
    with C.Workers() as w:
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        pub = w.spawn(_zmq_pub, endpoint, sync, nsubs, frame_bytes, count, rate, ready, go, results)
        C.get(ready, 60, [pub])
        for i in range(nsubs):
            w.spawn(_zmq_sub, endpoint, sync, f"s{i}", count, ready, results)
        for _ in range(nsubs + 1):
            C.get(ready, 60, w.procs)
        meter = C.CpuMeter()
        go.set()
        out = dict(C.get(results, 600, w.procs) for _ in range(nsubs + 1))
        cpu = meter.stop(sum(v["cpu"] for v in out.values()))
    for suffix in ("sock", "sync"):
        Path(f"{tmp}/l{trial}.{suffix}").unlink(missing_ok=True)
    return _collect(out, nsubs, cpu)


# ----------------------------------------------------------------------------- raw AF_UNIX (reference)


def _unix_pub(path: str, nsubs: int, frame_bytes: int, count: int, rate: float, ready, go, results) -> None:
    import socket

    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(nsubs)
    ready.put(("pub-ready", os.getpid()))
    conns = [lsock.accept()[0] for _ in range(nsubs)]
    for c in conns:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * C.MiB)
    ready.put(("pub-synced", nsubs))

    def send(frame):
        for c in conns:
            c.send(frame)

    write_ns, cpu0 = _paced_writes(send, frame_bytes, count, rate, go)
    for c in conns:
        c.send(b"E")
        c.close()
    lsock.close()
    results.put(("pub", {"write_ns": write_ns, "cpu": C.worker_cpu() - cpu0}))


def _unix_sub(path: str, tag: str, frame_bytes: int, count: int, ready: Any, results: Any) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    ready.put(("sub-ready", tag))
    lat = np.full(count, -1, dtype=np.int64)
    buf = bytearray(frame_bytes)
    cpu0 = C.worker_cpu()
    clock = time.monotonic_ns
    while True:
        n = s.recv_into(buf)
        now = clock()
        if n < 16:
            break
        w = np.frombuffer(buf, dtype=np.uint64, count=2)
        lat[int(w[0])] = now - int(w[1])
    s.close()
    results.put((tag, {"lat_ns": lat, "bad": 0, "cpu": C.worker_cpu() - cpu0}))


def run_unix(tmp: Path, trial: str, frame_bytes: int, nsubs: int, count: int, rate: float) -> dict[str, Any]:
    path = f"{tmp}/u{trial}.sock"
    with C.Workers() as w:
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        pub = w.spawn(_unix_pub, path, nsubs, frame_bytes, count, rate, ready, go, results)
        C.get(ready, 60, [pub])
        for i in range(nsubs):
            w.spawn(_unix_sub, path, f"s{i}", frame_bytes, count, ready, results)
        for _ in range(nsubs + 1):
            C.get(ready, 60, w.procs)
        meter = C.CpuMeter()
        go.set()
        out = dict(C.get(results, 600, w.procs) for _ in range(nsubs + 1))
        cpu = meter.stop(sum(v["cpu"] for v in out.values()))
    Path(path).unlink(missing_ok=True)
    return _collect(out, nsubs, cpu)


# ----------------------------------------------------------------------------- the run

WARMUP = 500


def _collect(out: dict[str, Any], nsubs: int, cpu: dict[str, float]) -> dict[str, Any]:
    lats = [out[f"s{i}"]["lat_ns"][WARMUP:] for i in range(nsubs)]
    missing = int(sum((a < 0).sum() for a in lats))
    allns = np.concatenate([a[a >= 0] for a in lats]) / 1e3  # microseconds
    write_us = out["pub"]["write_ns"][WARMUP:] / 1e3
    # A backlog that grows during the trial (the machine could not keep up) shows as a late median
    # far above the early one: that is queueing, not latency.
    fifth = len(lats[0]) // 5
    early = np.concatenate([a[:fifth][a[:fifth] >= 0] for a in lats]) / 1e3
    late = np.concatenate([a[-fifth:][a[-fifth:] >= 0] for a in lats]) / 1e3
    return {
        "p50_first_fifth_us": float(np.median(early)),
        "p50_last_fifth_us": float(np.median(late)),
        "samples": int(allns.size),
        "missing": missing,
        "bad": sum(out[f"s{i}"]["bad"] for i in range(nsubs)),
        "pct_us": {str(p): float(np.percentile(allns, p)) for p in PCTS},
        "max_us": float(allns.max()),
        "mean_us": float(allns.mean()),
        "write_p50_us": float(np.percentile(write_us, 50)),
        "write_p99_us": float(np.percentile(write_us, 99)),
        "cdf_us": [float(x) for x in np.percentile(allns, np.linspace(0, 100, 201))],
        "cpu": cpu,
    }


def run(
    trials: int = 3,
    quick: bool = False,
    count: int | None = None,
    rate: float = 1000.0,
    systems: tuple[str, ...] = ("slabcast", "slabcast_s0", "zmq", "unix"),
    verbose: bool = True,
    quiet_wait: float = 0.0,
) -> dict[str, Any]:
    """Every (system, frame size, subscribers) ``trials`` times, interleaved; return the results."""
    n = count or (2000 if quick else 10000)
    raw: dict[str, list[dict[str, Any]]] = {}
    with C.scratch_dir() as tmp, C.broker_at(tmp / "broker.sock") as broker:
        for t in range(trials):
            for frame in FRAMES:
                for nsubs in SUBS:
                    for system in systems:
                        key = f"{system}-{frame}B-{nsubs}sub"
                        tag = f"{t}f{frame}n{nsubs}"
                        before = C.wait_quiet(quiet_wait) if quiet_wait > 0 else None
                        if system.startswith("slabcast"):
                            stats = 0.0 if system == "slabcast_s0" else None
                            rec = run_slabcast(broker, tag + system[-2:], frame, nsubs, n + WARMUP, rate, stats)
                        elif system == "zmq":
                            rec = run_zmq(tmp, tag, frame, nsubs, n + WARMUP, rate)
                        else:
                            rec = run_unix(tmp, tag, frame, nsubs, n + WARMUP, rate)
                        rec["trial"] = t
                        rec["before"] = before
                        raw.setdefault(key, []).append(rec)
                        if verbose:
                            pc = rec["pct_us"]
                            print(
                                f"  trial {t} {key:26s} p50 {pc['50']:7.1f} p99 {pc['99']:7.1f} "
                                f"p99.9 {pc['99.9']:8.1f} us  (write p50 {rec['write_p50_us']:.1f} us, "
                                f"p50 first/last fifth {rec['p50_first_fifth_us']:.0f}/"
                                f"{rec['p50_last_fifth_us']:.0f} us, "
                                f"missing {rec['missing']}, foreign load {rec['cpu']['foreign_cores']:.2f} cores)",
                                flush=True,
                            )
    summary = {}
    for key, recs in raw.items():
        summary[key] = {p: C.summarize([r["pct_us"][str(p)] for r in recs]) for p in PCTS} | {
            "max_us": C.summarize([r["max_us"] for r in recs]),
            "write_p50_us": C.summarize([r["write_p50_us"] for r in recs]),
            "foreign_cores": C.summarize([r["cpu"]["foreign_cores"] for r in recs]),
            "missing": sum(r["missing"] for r in recs),
            "bad": sum(r["bad"] for r in recs),
            "samples": sum(r["samples"] for r in recs),
        }
    return {
        "settings": {
            "frames_per_trial": n,
            "warmup": WARMUP,
            "rate_hz": rate,
            "trials": trials,
            "pool": POOL,
            "clock": "time.monotonic_ns (CLOCK_MONOTONIC)",
            "quiet_wait_s": quiet_wait,
        },
        "summary": summary,
        "trials": raw,
    }


def report(res: dict[str, Any]) -> str:
    rows = []
    for key, v in res["summary"].items():
        system, frame, subs = key.split("-")
        cells = [f"{v[p]['median']:.0f} [{v[p]['min']:.0f}-{v[p]['max']:.0f}]" for p in PCTS]
        rows.append(
            [
                system,
                frame,
                subs.removesuffix("sub"),
                *cells,
                f"{v['write_p50_us']['median']:.1f}",
                v["samples"],
                v["missing"] + v["bad"],
                f"{v['foreign_cores']['median']:.2f}",
            ]
        )
    headers = [
        "system",
        "frame",
        "subs",
        *[f"p{p} us" for p in PCTS],
        "write() p50 us",
        "samples",
        "lost/bad",
        "foreign load",
    ]
    out = [C.table(headers, rows)]
    for key, v in res["summary"].items():
        if key.startswith("slabcast"):  # both with and without the broker's statistics
            p50 = v[50]["median"]
            out.append(f"{key}: p50 {p50:.0f} us (target < 100 us: {'met' if p50 < 100 else 'MISSED'})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2000 frames per trial, 1 trial")
    ap.add_argument("--trials", type=int, default=None, help="trials per configuration (default 3, quick 1)")
    ap.add_argument("--frames", type=int, default=None, help="measured frames per trial (default 10000)")
    ap.add_argument("--rate", type=float, default=1000.0, help="frames per second (default 1000)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S", help=C.WAIT_QUIET_HELP)
    ap.add_argument(
        "--systems",
        default="slabcast,slabcast_s0,zmq,unix",
        help="subset of slabcast (library defaults), slabcast_s0 (Publisher(statistics=0)), zmq, unix",
    )
    args = ap.parse_args(argv)
    trials = args.trials or (1 if args.quick else 3)
    info = C.machine_info()
    res = run(trials, args.quick, args.frames, args.rate, tuple(args.systems.split(",")), quiet_wait=args.wait_quiet)
    res["machine"] = info | {"loadavg_end": os.getloadavg()}
    path = C.write_json(f"latency-{C.timestamp()}", res)
    print(report(res))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
