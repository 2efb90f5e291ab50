"""Fan-out throughput: one publisher, 1 or 8 subscribers each with its own chunk size.

slabcast is measured against two baselines in the same run, trials interleaved:

- ``ppe``: a pickling ``concurrent.futures.ProcessPoolExecutor`` (``max_workers=N``):
  the producer cuts the same chunks and, for every chunk of every consumer,
  ``pool.submit(consume, chunk_bytes, ...)``; at most 8 tasks per consumer are in flight.
- ``slabcast`` runs with the library's defaults (subscribers ``wake="doorbell"``);
  ``slabcast_s0`` with ``Publisher(statistics=0)``, i.e. without the broker's
  per-frame rolling statistics; ``slabcast_futex`` with subscribers ``wake="futex"``
  (the publisher calls ``FUTEX_WAKE`` instead of sending ZeroMQ notices).
- ``zmq``: plain pyzmq PUB/SUB over ipc carrying the 64 KiB frames (HWM 0, so
  nothing is dropped, and drops are counted anyway from frame numbers); each
  subscriber cuts its own chunks by copying frames into a buffer.

The stream is a uint8 byte stream of 64 KiB frames; the first 8 bytes of frame k
hold k (little-endian u64), the rest is random.  Every consumer, in all three
systems, does the same work per chunk: it reads one byte per 4 KiB page
(``--touch page``; ``--touch full`` XORs every 8-byte word instead) and checks the
frame number at the first frame boundary inside the chunk, so the data is really
read and really right.

Rates (bytes per second, 1 GB = 1e9 bytes):

- ingest: stream bytes / (first ``Publisher.write`` -> last subscriber's
  ``EndOfStream``).  ``ingest_close`` (first write -> ``Publisher.close`` returned)
  is in the JSON too.
- aggregate: sum over subscribers of chunk bytes received / the same wall time.

CPU per frame of the publisher and of the broker (process CPU time, all threads, / frames)
are reported per trial; issue 21 asks the publisher's with 8 subscribers to be at most
1.2x its CPU with 1 (the ratio is taken within a trial: x1 and x8 of a system run back to
back) and the broker's under 1 us.  ``--max-foreign X`` runs a system's x1/x8 pair again
when other programs took more than X cores during it (``--retries``), keeping the least
loaded pair.

Run ``python benchmarks/fanout.py --help``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

FRAME_BYTES = 64 * C.KiB
# (size in bytes, clip): 16 KiB .. 1 MiB, sizes that do and do not divide the frame, both clip modes.
SUBS_8 = [
    (16 * C.KiB, True),
    (40_000, False),
    (64 * C.KiB, True),
    (100_000, True),
    (192 * C.KiB, False),
    (256 * C.KiB, True),
    (500_000, False),
    (1 * C.MiB, True),
]
SUBS_1 = [(64 * C.KiB, True)]
POOL = {"slab_bytes": 8 * C.MiB, "nslabs": 12, "max_chunk_bytes": 1 * C.MiB}
SPY_NATIVE = False  # py-spy --native (C frames of libzmq, libc) instead of --function
INFLIGHT = 8  # chunks a consumer may hold (slabcast max_inflight; PPE tasks in flight per consumer)


def expected_bytes(nframes: int, size: int, clip: bool) -> int:
    """Bytes a subscriber of chunk ``size`` receives from ``nframes`` frames (rules of docs/protocol.md §8)."""
    total = nframes * FRAME_BYTES
    if clip:
        return total // size * size
    per = -(-size // FRAME_BYTES)  # frames per chunk
    return nframes // per * per * FRAME_BYTES


# ----------------------------------------------------------------------------- slabcast


def _slab_pub(address: str, stream: str, nframes: int, stats: float | None, ready: Any, go: Any, results: Any) -> None:
    import slabcast

    extra = {} if stats is None else {"statistics": stats}  # None: the library's default
    pub = slabcast.Publisher(stream, dtype="uint8", channels=1, address=address, timeout=120, **POOL, **extra)
    frames = C.frame_pattern(FRAME_BYTES)
    words = [f.view(np.uint64) for f in frames]
    ring = len(frames)
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    cpu0 = C.worker_cpu()
    t_first = time.monotonic()
    for k in range(nframes):
        words[k % ring][0] = k
        pub.write(frames[k % ring])
    t_written = time.monotonic()
    cpu_written = C.worker_cpu() - cpu0  # the writes alone; close() then waits for the subscribers to finish
    pub.close()
    t_closed = time.monotonic()
    results.put(
        (
            "pub",
            {
                "t_first": t_first,
                "t_written": t_written,
                "t_closed": t_closed,
                "cpu": C.worker_cpu() - cpu0,
                "cpu_written": cpu_written,
            },
        )
    )


def _slab_sub(
    address: str, stream: str, tag: str, size: int, clip: bool, mode: str, wake: str, ready: Any, results: Any
) -> None:
    import slabcast

    extra = {} if wake == "doorbell" else {"wake": wake}  # (a tree before wake= runs the default)
    sub = slabcast.Subscriber(stream, size=size, clip=clip, address=address, max_inflight=INFLIGHT, **extra)
    ready.put(("sub-ready", tag))
    cpu0 = C.worker_cpu()
    nbytes = nchunks = acc = bad = gaps = 0
    expect = 0
    touch, check = C.touch, C.check_chunk
    for chunk in sub:
        with chunk:
            d = chunk.data
            if chunk.seq != expect:
                gaps += 1
            expect = chunk.seq + 1
            acc += touch(d, mode)
            bad += check(d, chunk.index, FRAME_BYTES)
            nbytes += d.shape[0]
            nchunks += 1
            # A view kept past the block would hold the chunk (the release waits for the last
            # view to die: here, until `d` is rebound after the next recv).
            del d
    t_end = time.monotonic()
    st = sub.statistics()
    sub.close()
    results.put(
        (
            tag,
            {
                "t_end": t_end,
                "bytes": nbytes,
                "chunks": nchunks,
                "bad": bad,
                "gaps": gaps,
                "dropped": st.dropped,
                "cpu": C.worker_cpu() - cpu0,
                "acc": acc,
            },
        )
    )


def run_slabcast(
    broker: Any,
    trial: str,
    specs: list[tuple[int, bool]],
    nframes: int,
    mode: str,
    profile: dict[str, str] | None = None,
    stats: float | None = None,
    wake: str = "doorbell",
) -> dict[str, Any]:
    """One trial through the broker (``stats``: the publisher's ``statistics=``, None for the default;
    ``wake``: the subscribers' way of waiting).

    ``profile`` maps ``"broker"``, ``"pub"`` or ``"sub0"`` (the first subscriber) to a path:
    py-spy records that process into it (raw, collapsed stacks) during the trial.
    """
    stream = f"fan{trial}"
    spies = []
    with C.Workers() as w:
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        pub = w.spawn(_slab_pub, broker.address, stream, nframes, stats, ready, go, results)
        C.get(ready, 60, [pub])
        for i, (size, clip) in enumerate(specs):
            w.spawn(_slab_sub, broker.address, stream, f"s{i}", size, clip, mode, wake, ready, results)
        for _ in specs:
            C.get(ready, 60, w.procs)
        for target, path in (profile or {}).items():
            pid = {"broker": broker.pid, "pub": w.procs[0].pid}.get(target, w.procs[1].pid)
            spies.append(_start_spy(pid, path))
        meter = C.CpuMeter([broker.pid])
        b_cpu0 = C.pid_cpu(broker.pid)
        go.set()
        out = dict(C.get(results, 600, w.procs) for _ in range(len(specs) + 1))
        b_cpu = C.pid_cpu(broker.pid) - b_cpu0
        subs = [out[f"s{i}"] for i in range(len(specs))]
        sub_cpu = sum(s["cpu"] for s in subs)
        cpu = meter.stop(out["pub"]["cpu"] + sub_cpu)
    for spy in spies:
        _stop_spy(spy)
    p = out["pub"]
    return _record(
        ("slabcast" if stats is None else f"slabcast stats={stats:g}") + ("" if wake == "doorbell" else f" {wake}"),
        specs,
        nframes,
        t_first=p["t_first"],
        t_end=max(s["t_end"] for s in subs),
        t_close=p["t_closed"],
        subs=subs,
        cpu=cpu
        | {
            "publisher_cpu_s": p["cpu"],
            "publisher_write_cpu_s": p["cpu_written"],
            "broker_cpu_s": b_cpu,
            "subscribers_cpu_s": sub_cpu,
        },
    )


def _start_spy(pid: int, path: str, rate: int = 250) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("py-spy")
    cmd = [str(exe), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "-o", path]
    cmd.append("--native" if SPY_NATIVE else "--function")
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let it attach before the trial starts
    if spy.poll() is not None:
        raise RuntimeError(f"py-spy failed: {spy.stderr.read().decode() if spy.stderr else ''}")
    return spy


def _stop_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    if spy.stderr is not None:
        spy.stderr.close()


# ----------------------------------------------------------------------------- ProcessPoolExecutor


class _Cutter:
    """The producer-side rechunker of the PPE baseline (same rules as slabcast's)."""

    def __init__(self, size: int, clip: bool) -> None:
        self.size, self.clip = size, clip
        self.buf = bytearray()
        self.start = 0  # stream index of buf[0]

    def feed(self, frame: Any) -> list[tuple[int, bytes]]:
        self.buf += memoryview(frame)  # a numpy frame would broadcast, not append
        out = []
        if self.clip:
            pos, n = 0, len(self.buf)
            with memoryview(self.buf) as mv:
                while n - pos >= self.size:
                    out.append((self.start + pos, bytes(mv[pos : pos + self.size])))
                    pos += self.size
            if pos:
                del self.buf[:pos]
                self.start += pos
        elif len(self.buf) >= self.size:
            out.append((self.start, bytes(self.buf)))
            self.start += len(self.buf)
            self.buf.clear()
        return out


def _ppe_warm(delay: float) -> int:
    time.sleep(delay)
    return os.getpid()


def _ppe_consume(data: bytes, index: int, mode: str) -> tuple[int, int, int]:
    d = np.frombuffer(data, dtype=np.uint8)
    return d.shape[0], C.touch(d, mode), C.check_chunk(d, index, FRAME_BYTES)


def run_ppe(specs: list[tuple[int, bool]], nframes: int, mode: str) -> dict[str, Any]:
    n = len(specs)
    with ProcessPoolExecutor(max_workers=n, mp_context=C.CTX) as pool:
        pids = set(pool.map(_ppe_warm, [0.5] * n))  # every worker started and imported before timing
        worker_pids = list(pool._processes)  # type: ignore[attr-defined]  # for CPU accounting only
        frames = C.frame_pattern(FRAME_BYTES)
        words = [f.view(np.uint64) for f in frames]
        cutters = [_Cutter(size, clip) for size, clip in specs]
        stats = [[0, 0, 0] for _ in specs]  # bytes, chunks, bad
        pending: collections.deque[tuple[int, Any]] = collections.deque()
        window = INFLIGHT * n
        meter = C.CpuMeter(worker_pids)
        t_first = time.monotonic()
        for k in range(nframes):
            f = frames[k % len(frames)]
            words[k % len(frames)][0] = k
            for c, cut in enumerate(cutters):
                for index, chunk in cut.feed(f):
                    while len(pending) >= window:
                        i, fut = pending.popleft()
                        nb, _, bad = fut.result()
                        s = stats[i]
                        s[0] += nb
                        s[1] += 1
                        s[2] += bad
                    pending.append((c, pool.submit(_ppe_consume, chunk, index, mode)))
        t_written = time.monotonic()
        while pending:
            i, fut = pending.popleft()
            nb, _, bad = fut.result()
            s = stats[i]
            s[0] += nb
            s[1] += 1
            s[2] += bad
        t_end = time.monotonic()
        cpu = meter.stop(0.0)  # workers are read from /proc, the producer is this process
    assert len(pids) == n, f"expected {n} pool workers, saw {len(pids)}"
    subs = [{"bytes": s[0], "chunks": s[1], "bad": s[2], "gaps": 0, "dropped": 0} for s in stats]
    return _record("ppe", specs, nframes, t_first=t_first, t_end=t_end, t_close=t_written, subs=subs, cpu=cpu)


# ----------------------------------------------------------------------------- pyzmq PUB/SUB


def _zmq_pub(endpoint: str, sync: str, nsubs: int, nframes: int, ready: Any, go: Any, results: Any) -> None:

    ctx, pub, pull = C.zmq_publisher(endpoint, sync)  # no HWM: queue, never drop (subscribers count drops)
    ready.put(("pub-ready", os.getpid()))
    acked = C.zmq_handshake(pub, pull, nsubs)
    ready.put(("pub-synced", len(acked)))
    frames = C.frame_pattern(FRAME_BYTES)
    words = [f.view(np.uint64) for f in frames]
    ring = len(frames)
    go.wait()
    cpu0 = C.worker_cpu()
    t_first = time.monotonic()
    for k in range(nframes):
        words[k % ring][0] = k
        pub.send(frames[k % ring], copy=True)
    pub.send(b"E")
    t_written = time.monotonic()
    pull.close(linger=0)
    pub.close(linger=-1)  # deliver everything queued
    ctx.term()
    results.put(("pub", {"t_first": t_first, "t_closed": t_written, "cpu": C.worker_cpu() - cpu0}))


def _zmq_sub(endpoint: str, sync: str, tag: str, size: int, clip: bool, mode: str, ready: Any, results: Any) -> None:

    ctx, sub, push = C.zmq_subscriber(endpoint, sync, tag, ready)
    cpu0 = C.worker_cpu()
    buf = np.empty(size + FRAME_BYTES, dtype=np.uint8)
    fill = start = nbytes = nchunks = acc = bad = drops = expect = 0
    touch, check = C.touch, C.check_chunk
    while True:
        msg = sub.recv(copy=False)
        mv = msg.buffer
        if len(mv) < 8:
            if mv == b"E":
                break
            continue  # a late hello
        k = int.from_bytes(mv[:8], "little")
        if k != expect:  # lost frames: restart accumulation at this frame
            drops += k - expect
            fill, start = 0, k * FRAME_BYTES
        expect = k + 1
        buf[fill : fill + FRAME_BYTES] = np.frombuffer(mv, dtype=np.uint8)
        fill += FRAME_BYTES
        if clip:
            pos = 0
            while fill - pos >= size:
                d = buf[pos : pos + size]
                acc += touch(d, mode)
                bad += check(d, start + pos, FRAME_BYTES)
                nbytes += size
                nchunks += 1
                pos += size
            if pos:
                buf[: fill - pos] = buf[pos:fill]
                fill -= pos
                start += pos
        elif fill >= size:
            d = buf[:fill]
            acc += touch(d, mode)
            bad += check(d, start, FRAME_BYTES)
            nbytes += fill
            nchunks += 1
            start += fill
            fill = 0
    t_end = time.monotonic()
    sub.close(linger=0)
    push.close(linger=0)
    ctx.term()
    results.put(
        (
            tag,
            {
                "t_end": t_end,
                "bytes": nbytes,
                "chunks": nchunks,
                "bad": bad,
                "gaps": 0,
                "dropped": drops,
                "cpu": C.worker_cpu() - cpu0,
            },
        )
    )


def run_zmq(tmp: Path, trial: str, specs: list[tuple[int, bool]], nframes: int, mode: str) -> dict[str, Any]:
    endpoint, sync = f"ipc://{tmp}/z{trial}.sock", f"ipc://{tmp}/z{trial}.sync"
    with C.Workers() as w:
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        pub = w.spawn(_zmq_pub, endpoint, sync, len(specs), nframes, ready, go, results)
        C.get(ready, 60, [pub])
        for i, (size, clip) in enumerate(specs):
            w.spawn(_zmq_sub, endpoint, sync, f"s{i}", size, clip, mode, ready, results)
        for _ in range(len(specs) + 1):
            C.get(ready, 60, w.procs)
        meter = C.CpuMeter()
        go.set()
        out = dict(C.get(results, 600, w.procs) for _ in range(len(specs) + 1))
        subs = [out[f"s{i}"] for i in range(len(specs))]
        cpu = meter.stop(out["pub"]["cpu"] + sum(s["cpu"] for s in subs))
    for suffix in ("sock", "sync"):  # libzmq leaves ipc socket files behind
        Path(f"{tmp}/z{trial}.{suffix}").unlink(missing_ok=True)
    p = out["pub"]
    return _record(
        "zmq",
        specs,
        nframes,
        t_first=p["t_first"],
        t_end=max(s["t_end"] for s in subs),
        t_close=p["t_closed"],
        subs=subs,
        cpu=cpu,
    )


# ----------------------------------------------------------------------------- the run


def _record(
    system: str,
    specs: list[tuple[int, bool]],
    nframes: int,
    *,
    t_first: float,
    t_end: float,
    t_close: float,
    subs: list[dict[str, Any]],
    cpu: dict[str, float],
) -> dict[str, Any]:
    total = nframes * FRAME_BYTES
    wall = t_end - t_first
    delivered = sum(s["bytes"] for s in subs)
    complete = all(
        s["bytes"] == expected_bytes(nframes, size, clip) for s, (size, clip) in zip(subs, specs, strict=True)
    )
    errors = sum(s["bad"] + s["gaps"] + s["dropped"] for s in subs)
    if system == "zmq":  # a PUB/SUB loss restarts the chunk, so only count-check when nothing was lost
        complete = complete or errors > 0
    return {
        "system": system,
        "subscribers": len(specs),
        "stream_bytes": total,
        "wall_s": wall,
        "ingest_Bps": total / wall,
        "ingest_close_Bps": total / (t_close - t_first),
        "aggregate_Bps": delivered / wall,
        "delivered_bytes": delivered,
        "frames": nframes,
        "chunks": sum(s["chunks"] for s in subs),
        "complete": complete,
        "errors": errors,
        "drops": sum(s["dropped"] for s in subs),
        "cpu": cpu,
    }


def run(
    trials: int = 3,
    quick: bool = False,
    mode: str = "page",
    systems: tuple[str, ...] = ("slabcast", "slabcast_s0", "ppe", "zmq"),
    profile: dict[str, str] | None = None,
    mib: dict[str, int] | None = None,
    verbose: bool = True,
    quiet_wait: float = 0.0,
    max_foreign: float = 99.0,
    retries: int = 2,
) -> dict[str, Any]:
    """Run every (system, subscriber count) ``trials`` times, interleaved; return the results."""
    amounts = dict(DEFAULT_MIB_QUICK if quick else DEFAULT_MIB)
    amounts.update(mib or {})
    configs = [(s, n) for n in (1, 8) for s in systems]
    raw: dict[str, list[dict[str, Any]]] = {f"{s}-{n}": [] for s, n in configs}
    set_aside: list[dict[str, Any]] = []
    profile_out: dict[str, Any] | None = None
    with C.scratch_dir() as tmp, C.broker_at(tmp / "broker.sock") as broker:

        def pair(t: int, system: str, attempt: int) -> list[dict[str, Any]]:
            """x1 and x8 of one system, back to back (their order alternates)."""
            out = []
            for n in (1, 8) if (t + attempt) % 2 == 0 else (8, 1):
                specs = SUBS_8 if n == 8 else SUBS_1
                nframes = amounts[f"{system}-{n}"] * C.MiB // FRAME_BYTES
                tag = f"{t}n{n}a{attempt}"
                before = C.wait_quiet(quiet_wait) if quiet_wait > 0 else None
                if system.startswith("slabcast"):
                    stats = 0.0 if system == "slabcast_s0" else None
                    wake = "futex" if system == "slabcast_futex" else "doorbell"
                    rec = run_slabcast(broker, f"{tag}{system[-2:]}", specs, nframes, mode, stats=stats, wake=wake)
                elif system == "ppe":
                    rec = run_ppe(specs, nframes, mode)
                else:
                    rec = run_zmq(tmp, tag, specs, nframes, mode)
                rec["trial"], rec["attempt"], rec["before"] = t, attempt, before
                out.append(rec)
                if verbose:
                    cpu = rec["cpu"]
                    unit = (
                        f"pub {cpu['publisher_write_cpu_s'] / rec['frames'] * 1e6:.1f} broker "
                        f"{cpu['broker_cpu_s'] / rec['frames'] * 1e6:.2f} us/frame, "
                        if "broker_cpu_s" in cpu
                        else ""
                    )
                    print(
                        f"  trial {t} {system:14s} x{n}: ingest {rec['ingest_Bps'] / 1e9:6.3f} GB/s, "
                        f"aggregate {rec['aggregate_Bps'] / 1e9:6.3f} GB/s, wall {rec['wall_s']:5.2f} s, {unit}"
                        f"errors {rec['errors']}, complete {rec['complete']}, "
                        f"foreign load {rec['cpu']['foreign_cores']:.2f} cores",
                        flush=True,
                    )
            return out

        for t in range(trials):
            for system in systems:
                kept, aside = C.least_loaded(functools.partial(pair, t, system), max_foreign, retries)
                for rec in kept:
                    raw[f"{system}-{rec['subscribers']}"].append(rec)
                set_aside += [r for g in aside for r in g]
        if profile is not None and any(x.startswith("slabcast") for x in systems):
            # The profiled trial uses the library's defaults, or statistics=0 when only slabcast_s0 runs.
            prof_stats = None if "slabcast" in systems else 0.0
            if quiet_wait > 0:
                C.wait_quiet(quiet_wait)
            nframes = amounts["slabcast-8"] * C.MiB // FRAME_BYTES
            rec = run_slabcast(broker, "prof", SUBS_8, nframes, mode, profile=profile, stats=prof_stats)
            profile_out = {"trial": rec, "mode": "native" if SPY_NATIVE else "python", "statistics": prof_stats}
            profile_out |= {
                t: {"raw": p, "summary": spy_summary(p, only=None if t == "broker" else "_slab_sub")}
                for t, p in profile.items()
            }
    summary = {}
    for key, recs in raw.items():
        summary[key] = {
            "ingest_Bps": C.summarize([r["ingest_Bps"] for r in recs]),
            "ingest_close_Bps": C.summarize([r["ingest_close_Bps"] for r in recs]),
            "aggregate_Bps": C.summarize([r["aggregate_Bps"] for r in recs]),
            "wall_s": C.summarize([r["wall_s"] for r in recs]),
            "foreign_cores": C.summarize([r["cpu"]["foreign_cores"] for r in recs]),
            "all_complete": all(r["complete"] for r in recs),
            "errors": sum(r["errors"] for r in recs),
        }
    ratios = {}

    def med(key: str, metric: str) -> float:
        return float(summary[key][metric]["median"])

    for sc in SLABCAST_SYSTEMS:
        pairs = list(zip(raw.get(f"{sc}-1", []), raw.get(f"{sc}-8", []), strict=False))
        if pairs:
            ratios[f"{sc}_pub_cpu8_over_pub_cpu1"] = C.summarize([_pub_us(b) / _pub_us(a) for a, b in pairs])
            ratios[f"{sc}_pub_close_cpu8_over_pub_close_cpu1"] = C.summarize(
                [_pub_us(b, "publisher_cpu_s") / _pub_us(a, "publisher_cpu_s") for a, b in pairs]
            )
            for n in (1, 8):
                ratios[f"{sc}_pub_us{n}"] = C.summarize([_pub_us(r) for r in raw[f"{sc}-{n}"]])
                ratios[f"{sc}_pub_close_us{n}"] = C.summarize([_pub_us(r, "publisher_cpu_s") for r in raw[f"{sc}-{n}"]])
                ratios[f"{sc}_broker_us{n}"] = C.summarize([_broker_us(r) for r in raw[f"{sc}-{n}"]])
        if f"{sc}-8" in summary and "ppe-8" in summary:
            ratios[f"{sc}_aggregate8_over_ppe_aggregate8"] = med(f"{sc}-8", "aggregate_Bps") / med(
                "ppe-8", "aggregate_Bps"
            )
        if f"{sc}-8" in summary and f"{sc}-1" in summary:
            ratios[f"{sc}_ingest8_over_ingest1"] = med(f"{sc}-8", "ingest_Bps") / med(f"{sc}-1", "ingest_Bps")
        if f"{sc}-8" in summary and "zmq-8" in summary:
            ratios[f"{sc}_aggregate8_over_zmq_aggregate8"] = med(f"{sc}-8", "aggregate_Bps") / med(
                "zmq-8", "aggregate_Bps"
            )
    return {
        "settings": {
            "frame_bytes": FRAME_BYTES,
            "dtype": "uint8 (byte stream), 1 channel",
            "touch": mode,
            "trials": trials,
            "stream_MiB": amounts,
            "subs_8": SUBS_8,
            "subs_1": SUBS_1,
            "pool": POOL,
            "inflight": INFLIGHT,
            "quiet_wait_s": quiet_wait,
        },
        "summary": summary,
        "ratios": ratios,
        "trials": raw,
        "set_aside": set_aside,
        "profile": profile_out,
    }


SLABCAST_SYSTEMS = ("slabcast", "slabcast_s0", "slabcast_futex")


def _pub_us(rec: dict[str, Any], what: str = "publisher_write_cpu_s") -> float:
    """The publisher's CPU per frame over its writes (``publisher_cpu_s``: up to its close() returning,
    which waits for the subscribers to finish: how data path v2's figures were taken)."""
    return float(rec["cpu"][what] / rec["frames"] * 1e6)


def _broker_us(rec: dict[str, Any]) -> float:
    return float(rec["cpu"]["broker_cpu_s"] / rec["frames"] * 1e6)


# Stream size per trial (MiB), chosen so a trial lasts a few seconds on the reference machine.
DEFAULT_MIB = {"slabcast-1": 4096, "slabcast-8": 512, "ppe-1": 1024, "ppe-8": 128, "zmq-1": 4096, "zmq-8": 512}
DEFAULT_MIB_QUICK = {"slabcast-1": 512, "slabcast-8": 128, "ppe-1": 128, "ppe-8": 32, "zmq-1": 256, "zmq-8": 64}
DEFAULT_MIB |= {"slabcast_s0-1": 4096, "slabcast_s0-8": 512}
DEFAULT_MIB_QUICK |= {"slabcast_s0-1": 512, "slabcast_s0-8": 128}
DEFAULT_MIB |= {"slabcast_futex-1": 4096, "slabcast_futex-8": 512}
DEFAULT_MIB_QUICK |= {"slabcast_futex-1": 512, "slabcast_futex-8": 128}


def spy_summary(path: str, top: int = 25, only: str | None = None) -> dict[str, Any]:
    """Self and inclusive sample shares per function from a py-spy ``raw`` (collapsed stacks) file.

    ``only``: keep the stacks that pass through a function of this name (the
    worker's main loop, not the multiprocessing queue's feeder thread).
    """
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            c = int(count)
            if only is not None and f"{only} (" not in stack:
                continue
            frames = [_short(fr) for fr in stack.split(";")]
            total += c
            selfc[frames[-1]] += c
            for fr in set(frames):
                incl[fr] += c
    # A thread woken from poll but waiting for a CPU is sampled "in poll" too (py-spy samples
    # wall time; only sleeping threads count as idle): shares among the samples outside poll
    # are the better picture of where the CPU goes on an oversubscribed machine.
    polled = sum(v for k, v in selfc.items() if k.split(" (")[0] in _POLL_LEAVES)
    busy = max(1, total - polled)
    return {
        "samples": total,
        "in_poll": polled / total if total else 0.0,
        "self": [(k, v / total) for k, v in selfc.most_common(top)],
        "self_outside_poll": [
            (k, v / busy) for k, v in selfc.most_common(top + 3) if k.split(" (")[0] not in _POLL_LEAVES
        ][:top],
        "inclusive": [(k, v / total) for k, v in incl.most_common(top)],
    }


_POLL_LEAVES = {"Poller.poll", "poll", "epoll_wait", "__poll", "ppoll"}


def _short(frame: str) -> str:
    # "name (path/to/module.py:123)" -> "name (module.py:123)"
    name, _, where = frame.partition(" (")
    return f"{name} ({os.path.basename(where.rstrip(')'))})" if where else name


def report(res: dict[str, Any]) -> str:
    """The Markdown tables of one run."""
    s = res["summary"]
    rows = []
    for key in s:
        system, n = key.rsplit("-", 1)
        v = s[key]
        rows.append(
            [
                system,
                n,
                res["settings"]["stream_MiB"][key],
                C.fmt_rate(v["ingest_Bps"]),
                C.fmt_rate(v["aggregate_Bps"]),
                f"{v['wall_s']['median']:.2f}",
                f"{v['foreign_cores']['median']:.2f}",
                "yes" if v["all_complete"] and v["errors"] == 0 else f"NO ({v['errors']} errors)",
            ]
        )
    headers = [
        "system",
        "subs",
        "MiB/trial",
        "ingest GB/s median [min-max]",
        "aggregate GB/s median [min-max]",
        "wall s",
        "foreign load (cores)",
        "exact",
    ]
    out = [C.table(headers, rows), ""]
    unit_rows = []
    for key in [f"{sc}-{n}" for sc in SLABCAST_SYSTEMS for n in (1, 8)]:
        recs = res["trials"].get(key)
        if not recs:
            continue
        rec = sorted(recs, key=lambda r: r["aggregate_Bps"])[len(recs) // 2]  # the median trial
        cpu = rec["cpu"]
        unit_rows.append(
            [
                key,
                rec["frames"],
                rec["chunks"],
                f"{cpu['publisher_write_cpu_s'] / rec['frames'] * 1e6:.1f}",
                f"{cpu['broker_cpu_s'] / rec['frames'] * 1e6:.1f}",
                f"{cpu['broker_cpu_s'] / rec['chunks'] * 1e6:.1f}",
                f"{cpu['subscribers_cpu_s'] / rec['chunks'] * 1e6:.1f}",
                f"{cpu['broker_cpu_s'] / rec['wall_s']:.0%}",
            ]
        )
    if unit_rows:
        out += [
            C.table(
                [
                    "slabcast (median trial)",
                    "frames",
                    "chunks",
                    "publisher CPU us/frame (writes)",
                    "broker CPU us/frame",
                    "broker CPU us/chunk",
                    "subscriber CPU us/chunk",
                    "broker busy",
                ],
                unit_rows,
            ),
            "",
        ]
    r = res["ratios"]
    for sc in SLABCAST_SYSTEMS:
        if f"{sc}_pub_cpu8_over_pub_cpu1" in r:
            v = r[f"{sc}_pub_cpu8_over_pub_cpu1"]
            out.append(
                f"{sc} publisher CPU/frame x8 / x1 (within a trial) = {v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"
                f" (issue 21 target <= 1.2: {'met' if v['median'] <= 1.2 else 'MISSED'}); publisher "
                f"{r[f'{sc}_pub_us1']['median']:.1f} / {r[f'{sc}_pub_us8']['median']:.1f} us/frame; up to close(): "
                f"{r[f'{sc}_pub_close_us1']['median']:.1f} / {r[f'{sc}_pub_close_us8']['median']:.1f} us/frame, "
                f"x8 / x1 {r[f'{sc}_pub_close_cpu8_over_pub_close_cpu1']['median']:.2f}"
            )
            b1, b8 = r[f"{sc}_broker_us1"], r[f"{sc}_broker_us8"]
            worst = max(b1["median"], b8["median"])
            out.append(
                f"{sc} broker CPU/frame x1 {b1['median']:.2f} [{b1['min']:.2f}-{b1['max']:.2f}], x8 {b8['median']:.2f} "
                f"[{b8['min']:.2f}-{b8['max']:.2f}] us (issue 21 target < 1: {'met' if worst < 1 else 'MISSED'})"
            )
        if f"{sc}_aggregate8_over_ppe_aggregate8" in r:
            v = r[f"{sc}_aggregate8_over_ppe_aggregate8"]
            verdict = "met" if v >= 20 else "MISSED"
            out.append(f"{sc} aggregate(8) / PPE aggregate(8) = {v:.1f}x (target >= 20x: {verdict})")
        if f"{sc}_ingest8_over_ingest1" in r:
            v = r[f"{sc}_ingest8_over_ingest1"]
            out.append(f"{sc} ingest(8) / ingest(1) = {v:.2f} (target >= 0.8: {'met' if v >= 0.8 else 'MISSED'})")
        if f"{sc}_aggregate8_over_zmq_aggregate8" in r:
            v = r[f"{sc}_aggregate8_over_zmq_aggregate8"]
            out.append(f"{sc} aggregate(8) / zmq PUB/SUB aggregate(8) = {v:.1f}x")
    if res.get("profile"):
        p = res["profile"]
        tr = p["trial"]
        out += [
            "",
            f"profiled slabcast x8 trial ({p['mode']} stacks): ingest {tr['ingest_Bps'] / 1e9:.3f} GB/s, wall "
            f"{tr['wall_s']:.2f} s; CPU s: broker {tr['cpu']['broker_cpu_s']:.2f}, subscribers "
            f"{tr['cpu']['subscribers_cpu_s']:.2f}, publisher {tr['cpu']['publisher_cpu_s']:.2f}, "
            f"other programs {tr['cpu']['foreign_cpu_s']:.2f}",
        ]
        for target in ("broker", "pub", "sub0"):
            if target not in p:
                continue
            sm = p[target]["summary"]
            out += [
                "",
                f"{target} (py-spy, {sm['samples']} non-idle samples, {sm['in_poll']:.0%} of them in poll):",
                C.table(
                    ["self", "share", "self outside poll", "share ", "inclusive", "share  "],
                    [
                        [a, f"{x:.1%}", b, f"{y:.1%}", c, f"{z:.1%}"]
                        for (a, x), (b, y), (c, z) in zip(
                            sm["self"][:15], sm["self_outside_poll"][:15], _skip_top(sm["inclusive"])[:15], strict=False
                        )
                    ],
                ),
            ]
    return "\n".join(out)


def _skip_top(incl: list[tuple[str, float]]) -> list[tuple[str, float]]:
    # Drop the frames every sample has (interpreter start-up, main loops): they say nothing.
    return [(k, v) for k, v in incl if v < 0.999]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small streams (a smoke test, not for quoting)")
    ap.add_argument("--trials", type=int, default=None, help="trials per configuration (default 3, quick 1)")
    ap.add_argument("--touch", choices=("page", "full"), default="page", help="consumer work per chunk")
    ap.add_argument(
        "--systems",
        default="slabcast,slabcast_s0,ppe,zmq",
        help="comma-separated subset of slabcast (library defaults), slabcast_s0 (Publisher(statistics=0)), "
        "slabcast_futex (subscribers wake='futex'), ppe, zmq",
    )
    ap.add_argument(
        "--max-foreign", type=float, default=99.0, metavar="CORES",
        help="run a system's x1/x8 pair again when other programs took more than this (default: never)",
    )  # fmt: skip
    ap.add_argument("--retries", type=int, default=2, help="attempts beyond the first for a loaded pair")
    ap.add_argument(
        "--profile",
        choices=("python", "native"),
        default=None,
        help="one more slabcast x8 trial with py-spy on the broker, the publisher and the first subscriber",
    )
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S", help=C.WAIT_QUIET_HELP)
    ap.add_argument("--mib", action="append", default=[], metavar="KEY=MIB", help="stream size, e.g. slabcast-8=2048")
    args = ap.parse_args(argv)
    trials = args.trials or (1 if args.quick else 3)
    mib = {k: int(v) for k, v in (x.split("=") for x in args.mib)}
    stamp = C.timestamp()
    prof = None
    if args.profile:
        C.RESULTS.mkdir(exist_ok=True)
        prof = {t: str(C.RESULTS / f"profile-{stamp}-{t}-{args.profile}.txt") for t in ("broker", "pub", "sub0")}
        global SPY_NATIVE
        SPY_NATIVE = args.profile == "native"
    info = C.machine_info()
    memcpy = C.memcpy_bandwidth(args.quick)
    res = run(
        trials,
        args.quick,
        args.touch,
        tuple(args.systems.split(",")),
        prof,
        mib,
        quiet_wait=args.wait_quiet,
        max_foreign=args.max_foreign,
        retries=args.retries,
    )
    res["machine"] = info
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["memcpy"] = memcpy
    path = C.write_json(f"fanout-{stamp}", res)
    print(memcpy_report(memcpy))
    print(report(res))
    print(f"\nresults: {path}")
    return 0


def memcpy_report(m: dict[str, Any]) -> str:
    return C.table(
        ["memcpy (np.copyto)", "GB/s median [min-max]"],
        [[k, C.fmt_rate(v)] for k, v in m.items()],
    )


if __name__ == "__main__":
    sys.exit(main())
