"""Fan-out comparison (issue 7): slabcast against four baselines in the same run.

One publisher process (for ``ppe``: this process) writes a uint8 byte stream of
``F``-byte frames (F = 256 B, 4 KiB, 64 KiB, 1 MiB) to N = 1, 2, 4, 8, 16
consumer processes, consumer i with its own chunk size ``CHUNKS[i]`` (4 KiB ..
1 MiB, clip on: every chunk has exactly that many bytes).  Every consumer
touches each chunk cheaply but really (one byte per 4 KiB page) and counts
bytes.  Systems, every cell measured with all of them, trials interleaved:

- ``slabcast``: ``Publisher(dtype="uint8", slab_bytes=4 MiB, nslabs=24,
  max_chunk_bytes=1 MiB)`` (``--nslabs``, ``--slab-mib`` for another pool), ``Subscriber(size=chunk, clip=True,
  max_inflight=8)``.
- ``mpq``: ``multiprocessing.Queue(maxsize=8)`` per consumer; the publisher cuts
  each consumer's chunks and puts ``bytes`` into its queue (pickled, piped).
- ``zmq``: pyzmq PUB/SUB over ipc carrying the frames (handshake first, HWM 0
  so nothing is dropped; frame numbers make any loss visible); each subscriber
  rechunks by copying frames into its own buffer.
- ``ppe``: ``ProcessPoolExecutor(max_workers=N)``; for every chunk of every
  consumer, ``pool.submit(consume, chunk_bytes)`` (ocycle's process mode), at
  most 8 tasks per consumer in flight.
- ``iox2``: iceoryx2 0.10 publish/subscribe (``Slice[c_uint8]``), one service per
  consumer sized to its chunk; for every chunk the publisher loans a sample of
  chunk size, copies the bytes in, sends, and notifies that consumer's event
  service (consumers block in ``Listener.blocking_wait``, no spinning);
  ``RetryUntilDelivered`` backpressure, so nothing is lost.  A transport floor:
  no rechunking logic, but one copy per consumer (iceoryx2 has no per-consumer
  chunking over one copy).

A cell writes at most ``VOLUME[F]`` bytes and stops early after ``--cap``
seconds of writing (slow baselines), so every cell takes about 1-3 s; rates are
bytes actually written / wall time.  ingest = stream bytes / (first write ->
last consumer finished); aggregate = bytes delivered to all consumers / the
same time.

Ratios (slabcast / peer) are taken within a cell of one trial, where the systems
ran back to back, then summarized over trials.  Issue 21's targets: aggregate
>= 1x iceoryx2 in every cell with frames >= 64 KiB, >= 0.8x at 4 KiB, and >= pyzmq
and ``multiprocessing.Queue`` in every cell >= 4 KiB.  ``--max-foreign X`` measures
a cell again (all systems) when other programs took more than X cores during any
of its systems (``--retries``), keeping the least loaded attempt.

    .venv/bin/python benchmarks/compare_fanout.py --quick      # about 3 minutes
    .venv/bin/python benchmarks/compare_fanout.py              # full matrix, 2 trials
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

KiB, MiB = C.KiB, C.MiB
FRAMES = (256, 4 * KiB, 64 * KiB, 1 * MiB)
NSUBS = (1, 2, 4, 8, 16)
# The first 8 are, as a set, the 8 chunk sizes of benchmarks/fanout.py (16 KiB .. 1 MiB); 4 KiB and 8 KiB
# chunks come in only with 16 subscribers.
CHUNKS = [
    64 * KiB,
    16 * KiB,
    256 * KiB,
    40_000,
    1 * MiB,
    100_000,
    192 * KiB,
    500_000,
    4 * KiB,
    32 * KiB,
    8 * KiB,
    768 * KiB,
    48 * KiB,
    128 * KiB,
    300_000,
    24 * KiB,
]
VOLUME = {256: 16 * MiB, 4 * KiB: 64 * MiB, 64 * KiB: 512 * MiB, 1 * MiB: 1024 * MiB}
POOL = {"slab_bytes": 4 * MiB, "nslabs": 24, "max_chunk_bytes": 1 * MiB}
_NSLABS_ENV = "COMPARE_FANOUT_NSLABS"  # --nslabs, for the spawned publishers
_SLAB_ENV = "COMPARE_FANOUT_SLAB_MIB"  # --slab-mib, the same way
SYSTEMS = ("slabcast", "zmq", "mpq", "ppe", "iox2")
INFLIGHT = 8


def _touch(d: Any) -> int:
    return int(d[::4096].sum())


def _frames(frame: int) -> list[np.ndarray]:
    return C.frame_pattern(frame, 4)


def _n_frames(frame: int, scale: float) -> int:
    return max(64, int(VOLUME[frame] * scale) // frame)


class _Cutter:
    """clip=True rechunking for the baselines that cut in the publisher."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = bytearray()

    def feed(self, frame: np.ndarray) -> list[bytes]:
        self.buf += memoryview(frame)
        out = []
        n = len(self.buf) // self.size
        if n:
            mv = memoryview(self.buf)
            out = [bytes(mv[i * self.size : (i + 1) * self.size]) for i in range(n)]
            mv.release()
            del self.buf[: n * self.size]
        return out


# ----------------------------------------------------------------------------- publishers (spawned)


def _publish_loop(write: Any, frame: int, nframes: int, cap: float) -> tuple[float, float, int]:
    frames = _frames(frame)
    t_first = time.monotonic()
    deadline = t_first + cap
    every = max(1, min(1024, MiB // frame))  # frames between looks at the clock
    k = 0
    while k < nframes:
        write(frames[k & 3])
        k += 1
        if k % every == 0 and time.monotonic() > deadline:
            break
    return t_first, time.monotonic(), k


def _pub_slabcast(address: str, stream: str, frame: int, nframes: int, cap: float, n: int, ready, go, results):
    import slabcast

    pool = {**POOL, "nslabs": int(os.environ.get(_NSLABS_ENV, POOL["nslabs"])),
            "slab_bytes": int(os.environ.get(_SLAB_ENV, POOL["slab_bytes"] // MiB)) * MiB}
    pub = slabcast.Publisher(stream, dtype="uint8", address=address, timeout=120, **pool)
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    cpu0 = C.worker_cpu()
    t_first, t_written, k = _publish_loop(pub.write, frame, nframes, cap)
    pub.close()
    results.put(("pub", {"t_first": t_first, "t_written": t_written, "frames": k, "cpu": C.worker_cpu() - cpu0}))


def _sub_slabcast(address: str, stream: str, tag: str, size: int, ready, results):
    import slabcast

    sub = slabcast.Subscriber(stream, size=size, clip=True, address=address, max_inflight=INFLIGHT)
    ready.put(("sub-ready", tag))
    cpu0 = C.worker_cpu()
    nbytes = nchunks = acc = 0
    for chunk in sub:
        with chunk:
            d = chunk.data
            acc += _touch(d)
            nbytes += d.shape[0]
            nchunks += 1
            del d
    t_end = time.monotonic()
    dropped = sub.statistics().dropped
    sub.close()
    results.put(
        (tag, {"t_end": t_end, "bytes": nbytes, "chunks": nchunks, "dropped": dropped, "cpu": C.worker_cpu() - cpu0})
    )


def _pub_zmq(endpoint: str, sync: str, frame: int, nframes: int, cap: float, n: int, ready, go, results):

    ctx, pub, pull = C.zmq_publisher(endpoint, sync)
    C.zmq_handshake(pub, pull, n)
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    cpu0 = C.worker_cpu()
    kk = [0]

    def write(f: np.ndarray) -> None:
        f[:8] = np.frombuffer(kk[0].to_bytes(8, "little"), np.uint8)
        kk[0] += 1
        pub.send(f, copy=True)

    t_first, t_written, k = _publish_loop(write, frame, nframes, cap)
    pub.send(b"E")
    pull.close(linger=0)
    pub.close(linger=-1)
    ctx.term()
    results.put(("pub", {"t_first": t_first, "t_written": t_written, "frames": k, "cpu": C.worker_cpu() - cpu0}))


def _sub_zmq(endpoint: str, sync: str, tag: str, size: int, ready, results):

    ctx, sub, push = C.zmq_subscriber(endpoint, sync, tag, ready)
    cpu0 = C.worker_cpu()
    buf = np.empty(size + 1 * MiB, dtype=np.uint8)
    fill = nbytes = nchunks = acc = drops = expect = 0
    while True:
        mv = sub.recv(copy=False).buffer
        n = len(mv)
        if n < 8:
            if mv == b"E":
                break
            continue
        k = int.from_bytes(mv[:8], "little")
        if k != expect:
            drops += k - expect
        expect = k + 1
        buf[fill : fill + n] = np.frombuffer(mv, dtype=np.uint8)
        fill += n
        pos = 0
        while fill - pos >= size:
            acc += _touch(buf[pos : pos + size])
            nbytes += size
            nchunks += 1
            pos += size
        if pos:
            buf[: fill - pos] = buf[pos:fill]
            fill -= pos
    t_end = time.monotonic()
    sub.close(linger=0)
    push.close(linger=0)
    ctx.term()
    results.put(
        (tag, {"t_end": t_end, "bytes": nbytes, "chunks": nchunks, "dropped": drops, "cpu": C.worker_cpu() - cpu0})
    )


def _pub_mpq(queues: list[Any], sizes: list[int], frame: int, nframes: int, cap: float, n: int, ready, go, results):
    cutters = [_Cutter(s) for s in sizes]
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    cpu0 = C.worker_cpu()

    def write(f: np.ndarray) -> None:
        for q, cut in zip(queues, cutters, strict=True):
            for chunk in cut.feed(f):
                q.put(chunk)

    t_first, t_written, k = _publish_loop(write, frame, nframes, cap)
    for q in queues:
        q.put(None)
    results.put(("pub", {"t_first": t_first, "t_written": t_written, "frames": k, "cpu": C.worker_cpu() - cpu0}))


def _sub_mpq(q: Any, tag: str, ready, results):
    ready.put(("sub-ready", tag))
    cpu0 = C.worker_cpu()
    nbytes = nchunks = acc = 0
    while (b := q.get()) is not None:
        d = np.frombuffer(b, dtype=np.uint8)
        acc += _touch(d)
        nbytes += d.shape[0]
        nchunks += 1
    t_end = time.monotonic()
    results.put((tag, {"t_end": t_end, "bytes": nbytes, "chunks": nchunks, "dropped": 0, "cpu": C.worker_cpu() - cpu0}))


def _iox_names(prefix: str, i: int) -> tuple[str, str]:
    return f"{prefix}/data{i}", f"{prefix}/ev{i}"


def _pub_iox(prefix: str, sizes: list[int], frame: int, nframes: int, cap: float, n: int, ready, go, results):
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    pubs, notifiers = [], []
    for i, size in enumerate(sizes):
        dname, ename = _iox_names(prefix, i)
        svc = (
            node.service_builder(iox2.ServiceName.new(dname))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .subscriber_max_buffer_size(INFLIGHT)
            .subscriber_max_borrowed_samples(INFLIGHT)
            .enable_safe_overflow(False)
            .open_or_create()
        )
        pubs.append(
            svc.publisher_builder()
            .initial_max_slice_len(size)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .max_loaned_samples(2)
            .create()
        )
        ev = node.service_builder(iox2.ServiceName.new(ename)).event().open_or_create()
        notifiers.append(ev.notifier_builder().create())
    src = np.random.default_rng(3).integers(0, 256, 2 * MiB, dtype=np.uint8)
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    # wait until every subscriber is connected (the subscribers said so before go)
    for p in pubs:
        p.update_connections()
    cpu0 = C.worker_cpu()
    fill = [0] * len(sizes)

    def send(i: int, size: int) -> None:
        s = pubs[i].loan_slice_uninit(size)
        dst = np.frombuffer(s.payload().as_memory_view(), dtype=np.uint8)
        dst[:] = src[:size]
        s.assume_init().send()
        notifiers[i].notify()

    def write(f: np.ndarray) -> None:
        nb = f.shape[0]
        for i, size in enumerate(sizes):
            fill[i] += nb
            while fill[i] >= size:
                send(i, size)
                fill[i] -= size

    t_first, t_written, k = _publish_loop(write, frame, nframes, cap)
    for i in range(len(sizes)):
        s = pubs[i].loan_slice_uninit(1)
        s.assume_init().send()  # 1-byte sample: the end
        notifiers[i].notify()
    results.put(("pub", {"t_first": t_first, "t_written": t_written, "frames": k, "cpu": C.worker_cpu() - cpu0}))
    go2 = results  # keep ports alive until the subscribers are done: wait on a plain sleep loop below
    del go2
    time.sleep(0.2)
    for p in pubs:
        p.delete()
    for nt in notifiers:
        nt.delete()


def _sub_iox(prefix: str, i: int, tag: str, size: int, ready, results):
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    dname, ename = _iox_names(prefix, i)
    svc = (
        node.service_builder(iox2.ServiceName.new(dname))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .subscriber_max_buffer_size(INFLIGHT)
        .subscriber_max_borrowed_samples(INFLIGHT)
        .enable_safe_overflow(False)
        .open_or_create()
    )
    sub = svc.subscriber_builder().buffer_size(INFLIGHT).create()
    ev = node.service_builder(iox2.ServiceName.new(ename)).event().open_or_create()
    listener = ev.listener_builder().create()
    ready.put(("sub-ready", tag))
    cpu0 = C.worker_cpu()
    nbytes = nchunks = acc = 0
    done = False
    while not done:
        listener.blocking_wait()
        while (s := sub.receive()) is not None:
            d = np.frombuffer(s.payload().as_memory_view(), dtype=np.uint8)
            if d.shape[0] == 1:
                done = True
                del d
                s.delete()
                break
            acc += _touch(d)
            nbytes += d.shape[0]
            nchunks += 1
            del d
            s.delete()
    t_end = time.monotonic()
    sub.delete()
    listener.delete()
    results.put((tag, {"t_end": t_end, "bytes": nbytes, "chunks": nchunks, "dropped": 0, "cpu": C.worker_cpu() - cpu0}))


# ----------------------------------------------------------------------------- ProcessPoolExecutor


def _ppe_warm(delay: float) -> int:
    time.sleep(delay)
    return os.getpid()


def _ppe_consume(data: bytes) -> int:
    d = np.frombuffer(data, dtype=np.uint8)
    _touch(d)
    return d.shape[0]


def run_ppe(frame: int, sizes: list[int], nframes: int, cap: float) -> dict[str, Any]:
    n = len(sizes)
    with ProcessPoolExecutor(max_workers=n, mp_context=C.CTX) as pool:
        list(pool.map(_ppe_warm, [0.3] * n))
        pids = list(pool._processes)  # type: ignore[attr-defined]
        cutters = [_Cutter(s) for s in sizes]
        got = [[0, 0] for _ in sizes]
        pending: collections.deque[tuple[int, Any]] = collections.deque()
        window = INFLIGHT * n
        meter = C.CpuMeter(pids)

        def take() -> None:
            i, fut = pending.popleft()
            got[i][0] += fut.result()
            got[i][1] += 1

        def write(f: np.ndarray) -> None:
            for c, cut in enumerate(cutters):
                for chunk in cut.feed(f):
                    while len(pending) >= window:
                        take()
                    pending.append((c, pool.submit(_ppe_consume, chunk)))

        t_first, _, k = _publish_loop(write, frame, nframes, cap)
        while pending:
            take()
        t_end = time.monotonic()
        cpu = meter.stop(0.0)
    subs = [{"bytes": b, "chunks": c, "dropped": 0} for b, c in got]
    return _record("ppe", frame, sizes, k, t_first, t_end, subs, cpu)


# ----------------------------------------------------------------------------- trials


def _record(
    system: str,
    frame: int,
    sizes: list[int],
    frames: int,
    t_first: float,
    t_end: float,
    subs: list[dict[str, Any]],
    cpu: dict[str, float],
) -> dict[str, Any]:
    wall = t_end - t_first
    total = frames * frame
    delivered = sum(s["bytes"] for s in subs)
    expected = sum(total // s * s for s in sizes)
    return {
        "system": system,
        "frame": frame,
        "subscribers": len(sizes),
        "frames": frames,
        "stream_bytes": total,
        "wall_s": wall,
        "ingest_Bps": total / wall,
        "aggregate_Bps": delivered / wall,
        "frames_per_s": frames / wall,
        "delivered_bytes": delivered,
        "expected_bytes": expected,
        "complete": delivered == expected,
        "drops": sum(s.get("dropped", 0) for s in subs),
        "chunks": sum(s["chunks"] for s in subs),
        "cpu": cpu,
    }


def run_spawned(
    system: str, frame: int, sizes: list[int], nframes: int, cap: float, tmp: Path, broker: Any, tag: str
) -> dict[str, Any]:
    n = len(sizes)
    with C.Workers() as w:
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        pids: list[int] = []
        if system == "slabcast":
            stream = f"cf{tag}"
            pub = w.spawn(_pub_slabcast, broker.address, stream, frame, nframes, cap, n, ready, go, results)
            C.get(ready, 60, [pub])
            for i, s in enumerate(sizes):
                w.spawn(_sub_slabcast, broker.address, stream, f"s{i}", s, ready, results)
            for _ in sizes:
                C.get(ready, 60, w.procs)
            pids = [broker.pid]
        elif system == "zmq":
            ep, sync = f"ipc://{tmp}/z{tag}.sock", f"ipc://{tmp}/z{tag}.sync"
            pub = w.spawn(_pub_zmq, ep, sync, frame, nframes, cap, n, ready, go, results)
            for i, s in enumerate(sizes):
                w.spawn(_sub_zmq, ep, sync, f"s{i}", s, ready, results)
            for _ in range(n + 1):
                C.get(ready, 60, w.procs)
        elif system == "mpq":
            queues = [C.CTX.Queue(maxsize=INFLIGHT) for _ in sizes]
            pub = w.spawn(_pub_mpq, queues, sizes, frame, nframes, cap, n, ready, go, results)
            for i, q in enumerate(queues):
                w.spawn(_sub_mpq, q, f"s{i}", ready, results)
            for _ in range(n + 1):
                C.get(ready, 60, w.procs)
        elif system == "iox2":
            prefix = f"slabcast-bench/{os.getpid()}/{tag}"
            pub = w.spawn(_pub_iox, prefix, sizes, frame, nframes, cap, n, ready, go, results)
            C.get(ready, 60, [pub])
            for i, s in enumerate(sizes):
                w.spawn(_sub_iox, prefix, i, f"s{i}", s, ready, results)
            for _ in sizes:
                C.get(ready, 60, w.procs)
        else:
            raise ValueError(system)
        meter = C.CpuMeter(pids)
        go.set()
        out = dict(C.get(results, 300, w.procs) for _ in range(n + 1))
        subs = [out[f"s{i}"] for i in range(n)]
        cpu = meter.stop(out["pub"]["cpu"] + sum(s["cpu"] for s in subs))
    for suffix in ("sock", "sync"):
        Path(f"{tmp}/z{tag}.{suffix}").unlink(missing_ok=True)
    p = out["pub"]
    return _record(system, frame, sizes, p["frames"], p["t_first"], max(s["t_end"] for s in subs), subs, cpu)


def run(
    quick: bool = False,
    trials: int | None = None,
    systems: tuple[str, ...] = SYSTEMS,
    frames: tuple[int, ...] = FRAMES,
    nsubs: tuple[int, ...] = NSUBS,
    cap: float | None = None,
    verbose: bool = True,
    max_foreign: float = 99.0,
    retries: int = 2,
) -> dict[str, Any]:
    trials = trials or (1 if quick else 2)
    cap = cap or (0.5 if quick else 1.2)
    scale = 0.25 if quick else 1.0
    if quick:
        nsubs = tuple(n for n in nsubs if n in (1, 8))
    machine = C.machine_info()
    cells = [(f, n) for f in frames for n in nsubs]
    raw: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    t_start = time.monotonic()
    total = trials * len(cells) * len(systems)
    done = 0
    errors: list[dict[str, Any]] = []
    set_aside: list[dict[str, Any]] = []
    with C.scratch_dir() as tmp, C.broker_at(tmp / "broker.sock") as broker:
        for t in range(trials):
            for ci, (frame, n) in enumerate(cells):
                sizes = CHUNKS[:n]
                nframes = _n_frames(frame, scale)

                def cell(
                    attempt: int,
                    t: int = t,
                    ci: int = ci,
                    frame: int = frame,
                    n: int = n,
                    sizes: list[int] = sizes,
                    nframes: int = nframes,
                ) -> list[dict[str, Any]]:
                    nonlocal done
                    group = []
                    for system in systems:
                        tag = f"{t}c{ci}{system[:2]}a{attempt}"
                        try:
                            if system == "ppe":
                                rec = run_ppe(frame, sizes, nframes, cap)
                            else:
                                rec = run_spawned(system, frame, sizes, nframes, cap, tmp, broker, tag)
                        except Exception as e:  # one failed cell (a worker died, a timeout) must not lose the matrix
                            errors.append(
                                {"trial": t, "system": system, "frame": frame, "subscribers": n, "error": repr(e)}
                            )
                            print(f"  t{t} F={_fmt_b(frame)} N={n} {system}: FAILED: {e!r}", flush=True)
                            done += 1
                            continue
                        rec["trial"], rec["attempt"] = t, attempt
                        group.append(rec)
                        done += 1
                        if verbose:
                            el = time.monotonic() - t_start
                            print(
                                f"  [{done}/{total} {el:5.0f}s] t{t} F={_fmt_b(frame):>6} N={n:2d} {system:8s}: "
                                f"ingest {rec['ingest_Bps'] / 1e6:9.1f} MB/s, "
                                f"aggregate {rec['aggregate_Bps'] / 1e6:9.1f} MB/s, "
                                f"wall {rec['wall_s']:4.2f} s, complete {rec['complete']}, drops {rec['drops']}, "
                                f"foreign {rec['cpu']['foreign_cores']:.2f} cores",
                                flush=True,
                            )
                    return group

                kept, aside = C.least_loaded(cell, max_foreign, retries)
                for rec in kept:
                    raw[f"{rec['system']}|{frame}|{n}"].append(rec)
                set_aside.extend(r for g in aside for r in g)
    summary = {}
    for key, recs in raw.items():
        summary[key] = {
            "ingest_Bps": C.summarize([r["ingest_Bps"] for r in recs]),
            "aggregate_Bps": C.summarize([r["aggregate_Bps"] for r in recs]),
            "foreign_cores": C.summarize([r["cpu"]["foreign_cores"] for r in recs]),
            "complete": all(r["complete"] for r in recs),
            "drops": sum(r["drops"] for r in recs),
        }
    res = {
        "machine": machine,
        "quick": quick,
        "trials": trials,
        "cap_s": cap,
        "chunks": CHUNKS,
        "systems": list(systems),
        "frames": list(frames),
        "nsubs": list(nsubs),
        "summary": summary,
        "raw": dict(raw),
        "errors": errors,
        "set_aside": set_aside,
        "max_foreign": max_foreign,
        "elapsed_s": time.monotonic() - t_start,
    }
    res["ratios"] = ratios(res)
    res["targets"] = targets(res)
    return res


def ratios(res: dict[str, Any], what: str = "aggregate_Bps") -> dict[str, dict[str, Any]]:
    """slabcast / peer of ``what``, per trial within a cell (same trial = measured back to back), summarized."""
    out = {}
    for frame in res["frames"]:
        for n in res["nsubs"]:
            mine = {r["trial"]: r[what] for r in res["raw"].get(f"slabcast|{frame}|{n}", [])}
            for peer in res["systems"]:
                theirs = {r["trial"]: r[what] for r in res["raw"].get(f"{peer}|{frame}|{n}", [])}
                both = sorted(set(mine) & set(theirs))
                if peer != "slabcast" and both:
                    out[f"{peer}|{frame}|{n}"] = C.summarize([mine[t] / theirs[t] for t in both])
    return out


def _fmt_b(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB" if n >= KiB else f"{n} B"


def _med(res: dict[str, Any], system: str, frame: int, n: int, what: str) -> float | None:
    s = res["summary"].get(f"{system}|{frame}|{n}")
    return s[what]["median"] if s else None


# Issue 21: (peer, smallest frame, at least this aggregate ratio in every cell, largest frame or None)
TARGETS = (("iox2", 64 * KiB, 1.0, None), ("iox2", 4 * KiB, 0.8, 4 * KiB), ("zmq", 4 * KiB, 1.0, None),
           ("mpq", 4 * KiB, 1.0, None))  # fmt: skip


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 21's fan-out targets: the worst cell (median of the per-trial ratios) of each."""
    out = []
    for peer, lo, need, hi in TARGETS:
        cells = [
            (f, n, res["ratios"][f"{peer}|{f}|{n}"]["median"])
            for f in res["frames"]
            for n in res["nsubs"]
            if f >= lo and (hi is None or f <= hi) and f"{peer}|{f}|{n}" in res["ratios"]
        ]
        if not cells:
            continue
        f, n, worst = min(cells, key=lambda c: c[2])
        missed = [f"{_fmt_b(cf)} x{cn}: {cv:.3f}x" for cf, cn, cv in cells if cv < need]
        frames = f"frames {_fmt_b(lo)}" + (" and larger" if hi is None else "")
        out.append(
            {
                "target": f"aggregate >= {need:g}x {peer} in every cell, {frames}",
                "ratio": worst,
                "worst_cell": f"{_fmt_b(f)} x{n}",
                "cells": len(cells),
                "missed": missed,
                "need": need,
                "met": not missed,
            }
        )
    return out


def report(res: dict[str, Any]) -> str:
    parts = []
    for what, label in (("aggregate_Bps", "aggregate delivered"), ("ingest_Bps", "publisher ingest")):
        for frame in res["frames"]:
            rows = []
            for n in res["nsubs"]:
                row = [n]
                for s in res["systems"]:
                    x = res["summary"].get(f"{s}|{frame}|{n}")
                    row.append(
                        f"{x[what]['median'] / 1e6:.1f} [{x[what]['min'] / 1e6:.1f}-{x[what]['max'] / 1e6:.1f}]"
                        + ("" if x["complete"] else " !")
                        if x
                        else "-"
                    )
                rat = res["ratios"] if what == "aggregate_Bps" else ratios(res, what)
                for s in res["systems"]:
                    if s != "slabcast":
                        r = rat.get(f"{s}|{frame}|{n}")
                        row.append(f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]" if r else "-")
                rows.append(row)
            hdr = ["N"] + [f"{s} MB/s" for s in res["systems"]]
            hdr += [f"vs {s} (per trial)" for s in res["systems"] if s != "slabcast"]
            parts.append(
                f"{label}, {_fmt_b(frame)} frames (median [min-max] of {res['trials']} trials)\n\n" + C.table(hdr, rows)
            )
    tl = [
        [
            t["target"],
            f"worst {t['ratio']:.2f}x ({t['worst_cell']}) of {t['cells']} cells",
            "met" if t["met"] else f"MISSED in {len(t['missed'])}: " + ", ".join(t["missed"]),
        ]
        for t in res["targets"]
    ]
    parts.append("issue-21 targets\n\n" + C.table(["target", "measured", ""], tl))
    if res.get("set_aside"):
        parts.append(f"{len(res['set_aside'])} runs set aside for foreign load above {res['max_foreign']:g} cores")
    for e in res.get("errors", []):
        parts.append(
            f"FAILED cell: trial {e['trial']} {e['system']} {_fmt_b(e['frame'])} x{e['subscribers']}: {e['error']}"
        )
    fl = [r["cpu"]["foreign_cores"] for recs in res["raw"].values() for r in recs]
    parts.append(
        f"foreign load (other programs) during the trials: median {np.median(fl):.2f} cores, max {max(fl):.2f} "
        f"(2 cores in all); '!' marks a cell where a consumer got fewer bytes than expected"
    )
    return "\n\n".join(parts)


def plot(res: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    frames = res["frames"]
    fig, axes = plt.subplots(2, len(frames), figsize=(3.2 * len(frames), 6), squeeze=False)
    for col, frame in enumerate(frames):
        for row, what in enumerate(("aggregate_Bps", "ingest_Bps")):
            ax = axes[row][col]
            for s in res["systems"]:
                xs, ys, lo, hi = [], [], [], []
                for n in res["nsubs"]:
                    x = res["summary"].get(f"{s}|{frame}|{n}")
                    if x:
                        xs.append(n)
                        ys.append(x[what]["median"] / 1e6)
                        lo.append((x[what]["median"] - x[what]["min"]) / 1e6)
                        hi.append((x[what]["max"] - x[what]["median"]) / 1e6)
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=s)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{_fmt_b(frame)} frames", fontsize=9)
            ax.set_xlabel("subscribers")
            if col == 0:
                ax.set_ylabel("aggregate MB/s" if row == 0 else "ingest MB/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 trial, 1 and 8 subscribers, smaller cells")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--cap", type=float, default=None, help="seconds of writing per cell at most")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--frames", default=",".join(map(str, FRAMES)), help="frame sizes in bytes")
    ap.add_argument("--subs", default=",".join(map(str, NSUBS)))
    ap.add_argument("--png", default=None)
    ap.add_argument(
        "--max-foreign", type=float, default=99.0, metavar="CORES",
        help="measure a cell again (all systems) when other programs took more than this (default: never)",
    )  # fmt: skip
    ap.add_argument("--retries", type=int, default=2, help="attempts beyond the first for a loaded cell")
    ap.add_argument("--nslabs", type=int, default=POOL["nslabs"],
                    help=f"slabcast's pool: this many slabs (default {POOL['nslabs']}; the library's own is 8)")
    ap.add_argument("--slab-mib", type=int, default=POOL["slab_bytes"] // MiB,
                    help="slabcast's slab size in MiB (default 4: three frames of 1 MiB beside their 1 MiB carry)")
    a = ap.parse_args(argv)
    if a.slab_mib < 2 or a.nslabs < 2:
        ap.error(f"--slab-mib must hold the 1 MiB carry and a frame (2 or more), --nslabs 2 or more; got "
                 f"{a.slab_mib}, {a.nslabs}")
    os.environ[_NSLABS_ENV] = str(a.nslabs)  # (inherited by the spawned publishers)
    os.environ[_SLAB_ENV] = str(a.slab_mib)
    res = run(
        a.quick,
        a.trials,
        tuple(a.systems.split(",")),
        tuple(int(x) for x in a.frames.split(",")),
        tuple(int(x) for x in a.subs.split(",")),
        a.cap,
        max_foreign=a.max_foreign,
        retries=a.retries,
    )
    res["pool"] = {**POOL, "nslabs": a.nslabs, "slab_bytes": a.slab_mib * MiB}
    ts = C.timestamp()
    res["png"] = plot(res, a.png or str(C.RESULTS / f"compare-fanout-{ts}.png"))
    path = C.write_json(f"compare-fanout-{ts}", res)
    print(report(res))
    print(f"json: {path}  png: {res['png']}  elapsed {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
