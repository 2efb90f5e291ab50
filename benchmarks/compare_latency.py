"""Latency comparison (issue 7): frame written -> chunk in the subscriber's hands, microseconds.

One publisher process paces frames at ``--rate`` frames/s (default 1000).  Right
before handing a frame to the transport it writes ``time.monotonic_ns()``
(CLOCK_MONOTONIC, one clock for all processes) into bytes 8..15; each
subscriber, *blocked* (no spinning), reads the clock as soon as it has the data
and subtracts.  Chunk = frame (``clip=True``), 64 B and 64 KiB frames, 1 and 4
subscribers.  The first ``WARMUP`` frames of a trial are dropped.  Systems, in the
same run, trials interleaved:

- ``slabcast``: ``Publisher.write`` -> broker -> ``Subscriber.recv`` (blocking).
- ``zmq``: pyzmq PUB/SUB over ipc carrying the frame (handshake first, HWM 0),
  subscriber blocked in ``recv``.
- ``iox2``: iceoryx2 0.10 in event mode: the publisher loans a sample, copies the
  frame in, sends it and ``Notifier.notify()``; each subscriber blocks in
  ``Listener.blocking_wait()`` and then ``receive()``s (no polling loop).

    .venv/bin/python benchmarks/compare_latency.py [--quick] [--trials 3] [--count 2000]
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

FRAMES = (64, 64 * C.KiB)
NSUBS = (1, 4)
SYSTEMS = ("slabcast", "zmq", "iox2")
POOL = {"slab_bytes": 1 * C.MiB, "nslabs": 8, "max_chunk_bytes": 64 * C.KiB}
PCTS = (50, 99, 99.9)
WARMUP = 100
TARGETS = {50: 1.5, 99: 3.0}  # slabcast / iox2 event mode


def _paced(count: int, rate: float, send: Any, frame: np.ndarray) -> None:
    words = frame.view(np.uint64)
    period = 1.0 / rate
    t_next = time.monotonic() + period
    clock = time.monotonic_ns
    for k in range(count):
        while (left := t_next - time.monotonic()) > 0:
            time.sleep(left)
        t_next += period
        words[0] = k
        words[1] = clock()
        send(frame)


def _frame(nbytes: int) -> np.ndarray:
    return C.frame_pattern(nbytes, 1)[0]


# ----------------------------------------------------------------------------- slabcast


def _pub_slab(address: str, stream: str, nbytes: int, count: int, rate: float, n: int, ready, go, results):
    import slabcast

    pub = slabcast.Publisher(stream, dtype="uint8", address=address, timeout=60, **POOL)
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    cpu0 = C.worker_cpu()
    _paced(count, rate, pub.write, _frame(nbytes))
    pub.close()
    results.put(("pub", {"cpu": C.worker_cpu() - cpu0}))


def _sub_slab(address: str, stream: str, tag: str, nbytes: int, count: int, ready, results):
    import slabcast

    sub = slabcast.Subscriber(stream, size=nbytes, clip=True, address=address)
    ready.put(("sub-ready", tag))
    cpu0 = C.worker_cpu()
    lat = np.empty(count, dtype=np.int64)
    clock = time.monotonic_ns
    i = 0
    for chunk in sub:
        with chunk:
            now = clock()
            w = chunk.data[:16].view(np.uint64)
            lat[i] = now - int(w[1])
            i += 1
            del w
    sub.close()
    results.put((tag, {"lat_ns": lat[:i], "cpu": C.worker_cpu() - cpu0}))


# ----------------------------------------------------------------------------- pyzmq


def _pub_zmq(endpoint: str, sync: str, nbytes: int, count: int, rate: float, n: int, ready, go, results):

    ctx, pub, pull = C.zmq_publisher(endpoint, sync)
    C.zmq_handshake(pub, pull, n)
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    cpu0 = C.worker_cpu()
    _paced(count, rate, lambda f: pub.send(f, copy=True), _frame(nbytes))
    pull.close(linger=0)
    pub.close(linger=-1)
    ctx.term()
    results.put(("pub", {"cpu": C.worker_cpu() - cpu0}))


def _sub_zmq(endpoint: str, sync: str, tag: str, nbytes: int, count: int, ready, results):

    ctx, sub, push = C.zmq_subscriber(endpoint, sync, tag, ready)
    cpu0 = C.worker_cpu()
    lat = np.empty(count, dtype=np.int64)
    clock = time.monotonic_ns
    i = 0
    while i < count:
        msg = sub.recv(copy=False)
        now = clock()
        mv = msg.buffer
        if len(mv) < 16:
            continue
        lat[i] = now - int.from_bytes(mv[8:16], "little")
        i += 1
    sub.close(linger=0)
    push.close(linger=0)
    ctx.term()
    results.put((tag, {"lat_ns": lat[:i], "cpu": C.worker_cpu() - cpu0}))


# ----------------------------------------------------------------------------- iceoryx2, event mode


def _iox_services(node: Any, prefix: str, nbytes: int) -> tuple[Any, Any]:
    import iceoryx2 as iox2

    data = (
        node.service_builder(iox2.ServiceName.new(f"{prefix}/data"))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .max_subscribers(16)
        .subscriber_max_buffer_size(16)
        .subscriber_max_borrowed_samples(4)
        .enable_safe_overflow(False)
        .open_or_create()
    )
    ev = node.service_builder(iox2.ServiceName.new(f"{prefix}/ev")).event().max_listeners(16).open_or_create()
    return data, ev


def _pub_iox(prefix: str, nbytes: int, count: int, rate: float, n: int, ready, go, results):
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    data, ev = _iox_services(node, prefix, nbytes)
    pub = (
        data.publisher_builder()
        .initial_max_slice_len(nbytes)
        .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
        .create()
    )
    notifier = ev.notifier_builder().create()
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    pub.update_connections()
    cpu0 = C.worker_cpu()

    def send(f: np.ndarray) -> None:
        s = pub.loan_slice_uninit(nbytes)
        np.frombuffer(s.payload().as_memory_view(), dtype=np.uint8)[:] = f
        s.assume_init().send()
        notifier.notify()

    _paced(count, rate, send, _frame(nbytes))
    results.put(("pub", {"cpu": C.worker_cpu() - cpu0}))
    time.sleep(0.3)  # let the subscribers take the last samples before the ports go
    pub.delete()
    notifier.delete()


def _sub_iox(prefix: str, tag: str, nbytes: int, count: int, ready, results):
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    data, ev = _iox_services(node, prefix, nbytes)
    sub = data.subscriber_builder().create()
    listener = ev.listener_builder().create()
    ready.put(("sub-ready", tag))
    cpu0 = C.worker_cpu()
    lat = np.empty(count, dtype=np.int64)
    clock = time.monotonic_ns
    i = 0
    while i < count:
        listener.blocking_wait()
        while i < count and (s := sub.receive()) is not None:
            now = clock()
            mv = s.payload().as_memory_view()
            lat[i] = now - int.from_bytes(bytes(mv[8:16]), "little")
            i += 1
            del mv
            s.delete()
    sub.delete()
    listener.delete()
    results.put((tag, {"lat_ns": lat[:i], "cpu": C.worker_cpu() - cpu0}))


# ----------------------------------------------------------------------------- trials


def run_one(
    system: str, nbytes: int, n: int, count: int, rate: float, tmp: Path, broker: Any, tag: str
) -> dict[str, Any]:
    with C.Workers() as w:
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        pids = []
        if system == "slabcast":
            stream = f"cl{tag}"
            pub = w.spawn(_pub_slab, broker.address, stream, nbytes, count, rate, n, ready, go, results)
            C.get(ready, 60, [pub])
            for i in range(n):
                w.spawn(_sub_slab, broker.address, stream, f"s{i}", nbytes, count, ready, results)
            for _ in range(n):
                C.get(ready, 60, w.procs)
            pids = [broker.pid]
        elif system == "zmq":
            ep, sync = f"ipc://{tmp}/l{tag}.sock", f"ipc://{tmp}/l{tag}.sync"
            w.spawn(_pub_zmq, ep, sync, nbytes, count, rate, n, ready, go, results)
            for i in range(n):
                w.spawn(_sub_zmq, ep, sync, f"s{i}", nbytes, count, ready, results)
            for _ in range(n + 1):
                C.get(ready, 60, w.procs)
        else:
            prefix = f"slabcast-lat/{os.getpid()}/{tag}"
            pub = w.spawn(_pub_iox, prefix, nbytes, count, rate, n, ready, go, results)
            C.get(ready, 60, [pub])
            for i in range(n):
                w.spawn(_sub_iox, prefix, f"s{i}", nbytes, count, ready, results)
            for _ in range(n):
                C.get(ready, 60, w.procs)
        meter = C.CpuMeter(pids)
        go.set()
        out = dict(C.get(results, 120 + count / rate, w.procs) for _ in range(n + 1))
        cpu = meter.stop(sum(v["cpu"] for v in out.values()))
    for suffix in ("sock", "sync"):
        Path(f"{tmp}/l{tag}.{suffix}").unlink(missing_ok=True)
    lats = [out[f"s{i}"]["lat_ns"][WARMUP:] for i in range(n)]
    got = [len(out[f"s{i}"]["lat_ns"]) for i in range(n)]
    allv = np.concatenate(lats) / 1e3
    return {
        "system": system,
        "frame": nbytes,
        "subscribers": n,
        "received": got,
        "complete": all(g == count for g in got),
        **{f"p{p:g}": float(np.percentile(allv, p)) for p in PCTS},
        "max": float(allv.max()),
        "cpu": cpu,
    }


def run(
    quick: bool = False,
    trials: int | None = None,
    count: int | None = None,
    rate: float = 1000.0,
    systems: tuple[str, ...] = SYSTEMS,
    verbose: bool = True,
) -> dict[str, Any]:
    trials = trials or (1 if quick else 3)
    count = count or (600 if quick else 2000)
    machine = C.machine_info()
    raw: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    cells = [(f, n) for f in FRAMES for n in NSUBS]
    total, done, t0 = trials * len(cells) * len(systems), 0, time.monotonic()
    with C.scratch_dir() as tmp, C.broker_at(tmp / "broker.sock") as broker:
        for t in range(trials):
            for ci, (f, n) in enumerate(cells):
                for system in systems:
                    rec = run_one(system, f, n, count, rate, tmp, broker, f"{t}c{ci}{system[:2]}")
                    rec["trial"] = t
                    raw[f"{system}|{f}|{n}"].append(rec)
                    done += 1
                    if verbose:
                        print(
                            f"  [{done}/{total} {time.monotonic() - t0:4.0f}s] t{t} {f:>6} B x{n} {system:8s}: "
                            f"p50 {rec['p50']:7.1f} us, p99 {rec['p99']:7.1f} us, p99.9 {rec['p99.9']:7.1f} us, "
                            f"complete {rec['complete']}, foreign {rec['cpu']['foreign_cores']:.2f} cores",
                            flush=True,
                        )
    summary = {
        k: {f"p{p:g}": C.summarize([r[f"p{p:g}"] for r in v]) for p in PCTS}
        | {
            "complete": all(r["complete"] for r in v),
            "foreign_cores": C.summarize([r["cpu"]["foreign_cores"] for r in v]),
        }
        for k, v in raw.items()
    }
    res = {
        "machine": machine,
        "trials": trials,
        "count": count,
        "rate": rate,
        "warmup": WARMUP,
        "systems": list(systems),
        "summary": summary,
        "raw": dict(raw),
        "elapsed_s": time.monotonic() - t0,
    }
    res["targets"] = targets(res)
    return res


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for f in FRAMES:
        for n in NSUBS:
            s, b = res["summary"].get(f"slabcast|{f}|{n}"), res["summary"].get(f"iox2|{f}|{n}")
            if not (s and b):
                continue
            for p, need in TARGETS.items():
                r = s[f"p{p}"]["median"] / b[f"p{p}"]["median"]
                out.append(
                    {
                        "target": f"{f} B x{n}: slabcast p{p} <= {need:g}x iceoryx2 event mode",
                        "ratio": r,
                        "need": need,
                        "met": r <= need,
                    }
                )
    return out


def report(res: dict[str, Any]) -> str:
    rows = []
    for f in FRAMES:
        for n in NSUBS:
            for s in res["systems"]:
                x = res["summary"].get(f"{s}|{f}|{n}")
                if not x:
                    continue
                row = [f"{f} B", n, s]
                for p in PCTS:
                    v = x[f"p{p:g}"]
                    row.append(f"{v['median']:.1f} [{v['min']:.1f}-{v['max']:.1f}]")
                row.append("yes" if x["complete"] else "NO")
                row.append(f"{x['foreign_cores']['median']:.2f}")
                rows.append(row)
    hdr = ["frame", "subs", "system"] + [f"p{p:g} us" for p in PCTS] + ["complete", "foreign cores"]
    out = [
        f"latency, median [min-max] of {res['trials']} trials of {res['count']} frames at {res['rate']:g}/s\n\n"
        + C.table(hdr, rows)
    ]
    out.append(
        "issue-7 targets\n\n"
        + C.table(
            ["target", "measured", ""],
            [[t["target"], f"{t['ratio']:.2f}x", "met" if t["met"] else "MISSED"] for t in res["targets"]],
        )
    )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--count", type=int, default=None, help="frames per trial")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    a = ap.parse_args(argv)
    res = run(a.quick, a.trials, a.count, a.rate, tuple(a.systems.split(",")))
    path = C.write_json(f"compare-latency-{C.timestamp()}", res)
    print(report(res))
    print(f"json: {path}  elapsed {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
