"""Latency comparison (issues 7 and 21): frame written -> chunk in the subscriber's hands, microseconds,
and what each subscriber's way of waiting costs in CPU per frame.

One publisher process paces frames at ``--rate`` frames/s (default 1000).  Right
before handing a frame to the transport it writes ``time.monotonic_ns()``
(CLOCK_MONOTONIC, one clock for all processes) into bytes 8..15; each
subscriber reads the clock as soon as it has the data and subtracts.  Chunk =
frame (``clip=True``), 64 B and 64 KiB frames, 1 and 4 subscribers.  The first
``WARMUP`` frames of a trial are dropped.  Systems, in the same run, trials
interleaved (every system of a cell, then the next cell; the order of the systems
turns by one each trial):

- ``slabcast``: ``Publisher.write`` -> shared-memory ring -> ``Subscriber`` iterated,
  ``wake="doorbell"`` (the default: a ZeroMQ notice wakes the blocked subscriber).
- ``slabcast-futex``: the same with ``wake="futex"`` (``FUTEX_WAIT`` on the ring's word).
- ``slabcast-spin50us``: ``wake="doorbell", spin=50e-6`` (spin 50 us on the position,
  then the doorbell).
- ``slabcast-busy``: ``wake="busy"`` (spins on the position, never sleeps: a core per
  subscriber; with 4 of them on a 2-core machine the publisher waits for a CPU).
- ``zmq``: pyzmq PUB/SUB over ipc carrying the frame (handshake first, HWM 0),
  subscriber blocked in ``recv``: one ZeroMQ hop.
- ``iox2``: iceoryx2 0.10 in event mode: the publisher loans a sample, copies the
  frame in, sends it and ``Notifier.notify()``; each subscriber blocks in
  ``Listener.blocking_wait()`` and then ``receive()``s (no polling loop).

CPU per frame: each process's CPU time (``os.times``: all its threads, libzmq's I/O
thread included) from the frame after the warm-up to the last frame, divided by those
frames; the broker's from ``/proc/<pid>/stat`` over the whole trial.  At 1000 frames/s
a subscriber that never sleeps costs about 1000 us per frame: that is its price.

Every trial records the CPU other programs took ("foreign" cores).  With
``--max-foreign X`` a cell whose trial saw more than X cores of foreign load in any
of its systems is measured again, all systems (``--retries``, default 2): the least
loaded attempt is kept, the others are in the JSON.  Ratios are taken within one
cell of one trial (slabcast / peer measured back to back), then summarized.

    .venv/bin/python benchmarks/compare_latency.py [--quick] [--trials 3] [--count 2000] [--max-foreign 0.3]
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
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
# system -> (wake, spin) of slabcast.Subscriber
WAKES = {
    "slabcast": ("doorbell", 0.0),
    "slabcast-futex": ("futex", 0.0),
    "slabcast-spin50us": ("doorbell", 50e-6),
    "slabcast-busy": ("busy", 0.0),
}
SYSTEMS = (*WAKES, "zmq", "iox2")
# slabcast's pool: 8 slabs of 1 MiB (a slab change every 15 frames of 64 KiB), or --slab-kib (the library's
# default slab is 4 MiB); through the environment, so that the spawned workers see it too.
_SLAB_KIB = "SLABCAST_BENCH_SLAB_KIB"
POOL = {"slab_bytes": int(os.environ.get(_SLAB_KIB, "1024")) * C.KiB, "nslabs": 8, "max_chunk_bytes": 64 * C.KiB}
PCTS = (50, 99, 99.9)
WARMUP = 100
# Issue 21: (system, peer, percentile, at most this ratio); a peer of None is an absolute bound in us.
TARGETS = (
    ("slabcast", "zmq", 50, 1.1),
    ("slabcast", "zmq", 99, 1.5),
    ("slabcast-futex", "iox2", 50, 1.0),
    ("slabcast-futex", "iox2", 99, 1.5),
    ("slabcast-busy", None, 50, 15.0),
    ("slabcast-spin50us", None, 50, 15.0),
)


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
    cpu = C.worker_cpu() - cpu0
    pub.close()
    results.put(("pub", {"cpu": cpu, "cpu_per_frame": cpu / count}))


def _sub_slab(address: str, stream: str, tag: str, nbytes: int, count: int, wake: str, spin: float, ready, results):
    import slabcast

    # (the defaults are not passed, so that a tree before wake= (data path v2) runs the plain system too)
    extra = {} if (wake, spin) == ("doorbell", 0.0) else {"wake": wake, "spin": spin}
    sub = slabcast.Subscriber(stream, size=nbytes, clip=True, address=address, **extra)
    ready.put(("sub-ready", tag))
    cpu0 = C.worker_cpu()
    steady = [0.0, 0.0]  # CPU seconds at the first frame after the warm-up and at the last frame
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
        if i in (WARMUP, count):
            steady[i == count] = C.worker_cpu()
    sub.close()
    results.put((tag, _sub_result(lat[:i], C.worker_cpu() - cpu0, steady, count)))


def _sub_result(lat: np.ndarray, cpu: float, steady: list[float], count: int) -> dict[str, Any]:
    """A subscriber's answer: latencies, CPU of the whole run, and CPU per frame past the warm-up."""
    frames = count - WARMUP
    ok = len(lat) == count and steady[1] >= steady[0] > 0
    return {"lat_ns": lat, "cpu": cpu, "cpu_per_frame": (steady[1] - steady[0]) / frames if ok else None}


# ----------------------------------------------------------------------------- pyzmq


def _pub_zmq(endpoint: str, sync: str, nbytes: int, count: int, rate: float, n: int, ready, go, results):

    ctx, pub, pull = C.zmq_publisher(endpoint, sync)
    C.zmq_handshake(pub, pull, n)
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    cpu0 = C.worker_cpu()
    _paced(count, rate, lambda f: pub.send(f, copy=True), _frame(nbytes))
    cpu = C.worker_cpu() - cpu0
    pull.close(linger=0)
    pub.close(linger=-1)
    ctx.term()
    results.put(("pub", {"cpu": cpu, "cpu_per_frame": cpu / count}))


def _sub_zmq(endpoint: str, sync: str, tag: str, nbytes: int, count: int, ready, results):

    ctx, sub, push = C.zmq_subscriber(endpoint, sync, tag, ready)
    cpu0 = C.worker_cpu()
    steady = [0.0, 0.0]
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
        if i in (WARMUP, count):
            steady[i == count] = C.worker_cpu()
    sub.close(linger=0)
    push.close(linger=0)
    ctx.term()
    results.put((tag, _sub_result(lat[:i], C.worker_cpu() - cpu0, steady, count)))


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
    cpu = C.worker_cpu() - cpu0
    results.put(("pub", {"cpu": cpu, "cpu_per_frame": cpu / count}))
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
    steady = [0.0, 0.0]
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
            if i in (WARMUP, count):
                steady[i == count] = C.worker_cpu()
    sub.delete()
    listener.delete()
    results.put((tag, _sub_result(lat[:i], C.worker_cpu() - cpu0, steady, count)))


# ----------------------------------------------------------------------------- trials


def run_one(
    system: str,
    nbytes: int,
    n: int,
    count: int,
    rate: float,
    tmp: Path,
    broker: Any,
    tag: str,
    spy: str | None = None,
) -> dict[str, Any]:
    """One trial of one system; ``spy``: a path prefix, py-spy records the publisher, the first subscriber
    and (slabcast) the broker into ``<spy>-<who>.txt`` (it slows them: not for the figures)."""
    broker_cpu = None
    spies = []
    with C.Workers() as w:
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        pids = []
        if system in WAKES:
            wake, spin = WAKES[system]
            stream = f"cl{tag}"
            pub = w.spawn(_pub_slab, broker.address, stream, nbytes, count, rate, n, ready, go, results)
            C.get(ready, 60, [pub])
            for i in range(n):
                w.spawn(_sub_slab, broker.address, stream, f"s{i}", nbytes, count, wake, spin, ready, results)
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
        elif system == "iox2":
            prefix = f"slabcast-lat/{os.getpid()}/{tag}"
            pub = w.spawn(_pub_iox, prefix, nbytes, count, rate, n, ready, go, results)
            C.get(ready, 60, [pub])
            for i in range(n):
                w.spawn(_sub_iox, prefix, f"s{i}", nbytes, count, ready, results)
            for _ in range(n):
                C.get(ready, 60, w.procs)
        else:
            raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
        if spy:
            from fanout import _start_spy

            who = [("publisher", w.procs[0].pid), ("sub0", w.procs[1].pid)] + [("broker", broker.pid)] * bool(pids)
            spies = {name: (_start_spy(pid, f"{spy}-{name}.txt", rate=1000), f"{spy}-{name}.txt") for name, pid in who}
        meter = C.CpuMeter(pids)
        b0 = C.pid_cpu(broker.pid) if pids else 0.0
        go.set()
        out = dict(C.get(results, 120 + count / rate, w.procs) for _ in range(n + 1))
        if pids:
            broker_cpu = C.pid_cpu(broker.pid) - b0
        cpu = meter.stop(sum(v["cpu"] for v in out.values()))
        profile = {}
        if spies:
            from fanout import _stop_spy, spy_summary

            for name, (proc, path) in spies.items():
                _stop_spy(proc)
                profile[name] = spy_summary(path, top=20) | {"raw": path}
    for suffix in ("sock", "sync"):
        Path(f"{tmp}/l{tag}.{suffix}").unlink(missing_ok=True)
    lats = [out[f"s{i}"]["lat_ns"][WARMUP:] for i in range(n)]
    got = [len(out[f"s{i}"]["lat_ns"]) for i in range(n)]
    allv = np.concatenate(lats) / 1e3
    per = [out[f"s{i}"]["cpu_per_frame"] for i in range(n)]
    return {
        "system": system,
        "frame": nbytes,
        "subscribers": n,
        "received": got,
        "complete": all(g == count for g in got),
        **{f"p{p:g}": float(np.percentile(allv, p)) for p in PCTS},
        "max": float(allv.max()),
        # us of CPU per frame: each subscriber (mean over them), the publisher, the broker (whole trial)
        "sub_cpu_us": float(np.mean(per)) * 1e6 if all(x is not None for x in per) else None,
        "pub_cpu_us": out["pub"]["cpu_per_frame"] * 1e6,
        "broker_cpu_us": broker_cpu / count * 1e6 if broker_cpu is not None else None,
        "cpu": cpu,
        **({"profile": profile} if profile else {}),
    }


def run(
    quick: bool = False,
    trials: int | None = None,
    count: int | None = None,
    rate: float = 1000.0,
    systems: tuple[str, ...] = SYSTEMS,
    verbose: bool = True,
    max_foreign: float = 99.0,
    retries: int = 2,
    quiet_wait: float = 0.0,
    frames: tuple[int, ...] = FRAMES,
    nsubs: tuple[int, ...] = NSUBS,
    profile: tuple[str, int, int] | None = None,
) -> dict[str, Any]:
    """The matrix, ``trials`` times; ``profile`` = (system, frame, subscribers): one more trial of that cell
    with py-spy attached (its figures are not in the tables)."""
    trials = trials or (1 if quick else 3)
    count = count or (600 if quick else 2000)
    machine = C.machine_info()
    raw: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    set_aside: list[dict[str, Any]] = []
    cells = [(f, n) for f in frames for n in nsubs]
    total, done, t0 = trials * len(cells) * len(systems), 0, time.monotonic()
    with C.scratch_dir() as tmp, C.broker_at(tmp / "broker.sock") as broker:
        for t in range(trials):
            order = systems[t % len(systems) :] + systems[: t % len(systems)]
            for ci, (f, n) in enumerate(cells):
                cell = functools.partial(
                    _cell, order, systems, t, ci, f, n, count, rate, tmp, broker, (done, total, t0) if verbose else None
                )
                group, aside = C.least_loaded(cell, max_foreign, retries, quiet_wait)
                for rec in group:
                    raw[f"{rec['system']}|{f}|{n}"].append(rec)
                done += len(group)
                for g in aside:
                    set_aside.extend(g)
                if aside and verbose:
                    print(f"  t{t} {f} B x{n}: kept attempt {group[0]['attempt']} (least foreign load)", flush=True)
        profiled = None
        if profile:
            C.RESULTS.mkdir(exist_ok=True)
            sysname, f, n = profile
            spy = str(C.RESULTS / f"latency-profile-{C.timestamp()}-{sysname}-{f}x{n}")
            profiled = run_one(sysname, f, n, count, rate, tmp, broker, "prof", spy=spy)
    summary = {
        k: {f"p{p:g}": C.summarize([r[f"p{p:g}"] for r in v]) for p in PCTS}
        | {
            what: C.summarize([r[what] for r in v if r[what] is not None])
            for what in ("sub_cpu_us", "pub_cpu_us", "broker_cpu_us")
            if any(r[what] is not None for r in v)
        }
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
        "frames": list(frames),
        "nsubs": list(nsubs),
        "max_foreign": max_foreign,
        "slabcast_pool": dict(POOL),
        "summary": summary,
        "raw": dict(raw),
        "set_aside": set_aside,
        "profiled": profiled,
        "elapsed_s": time.monotonic() - t0,
    }
    res["ratios"] = ratios(res)
    res["targets"] = targets(res)
    return res


def _cell(
    order: tuple[str, ...],
    systems: tuple[str, ...],
    t: int,
    ci: int,
    f: int,
    n: int,
    count: int,
    rate: float,
    tmp: Path,
    broker: Any,
    progress: tuple[int, int, float] | None,
    attempt: int,
) -> list[dict[str, Any]]:
    """One cell of one trial: every system once, back to back."""
    group = []
    for system in order:
        tag = f"{t}c{ci}s{systems.index(system)}a{attempt}"
        rec = run_one(system, f, n, count, rate, tmp, broker, tag)
        rec["trial"], rec["attempt"] = t, attempt
        group.append(rec)
        if progress:
            _progress(rec, progress[0] + len(group), progress[1], progress[2])
    return group


def _progress(rec: dict[str, Any], done: int, total: int, t0: float) -> None:
    sub = "-" if rec["sub_cpu_us"] is None else f"{rec['sub_cpu_us']:.0f}"
    print(
        f"  [{done}/{total} {time.monotonic() - t0:4.0f}s] t{rec['trial']} {rec['frame']:>6} B x{rec['subscribers']} "
        f"{rec['system']:17s}: p50 {rec['p50']:7.1f} us, p99 {rec['p99']:7.1f} us, p99.9 {rec['p99.9']:7.1f} us, "
        f"CPU/frame sub {sub} pub {rec['pub_cpu_us']:.0f} us, complete {rec['complete']}, "
        f"foreign {rec['cpu']['foreign_cores']:.2f} cores",
        flush=True,
    )


def ratios(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """slabcast system / peer, p50 and p99, taken in each trial (back to back) and summarized over trials."""
    out: dict[str, dict[str, Any]] = {}
    for f in res["frames"]:
        for n in res["nsubs"]:
            for sysname in res["systems"]:
                if sysname not in WAKES:
                    continue
                mine = {r["trial"]: r for r in res["raw"].get(f"{sysname}|{f}|{n}", [])}
                for peer in ("zmq", "iox2"):
                    theirs = {r["trial"]: r for r in res["raw"].get(f"{peer}|{f}|{n}", [])}
                    both = sorted(set(mine) & set(theirs))
                    if not both:
                        continue
                    out[f"{sysname}/{peer}|{f}|{n}"] = {
                        f"p{p}": C.summarize([mine[t][f"p{p}"] / theirs[t][f"p{p}"] for t in both]) for p in (50, 99)
                    }
    return out


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for f in res["frames"]:
        for n in res["nsubs"]:
            for sysname, peer, p, need in TARGETS:
                if peer is None:
                    s = res["summary"].get(f"{sysname}|{f}|{n}")
                    if not s:
                        continue
                    v = s[f"p{p}"]["median"]
                    what, shown = f"{f} B x{n}: {sysname} p{p} <= {need:g} us", f"{v:.1f} us"
                else:
                    r = res["ratios"].get(f"{sysname}/{peer}|{f}|{n}")
                    if not r:
                        continue
                    v = r[f"p{p}"]["median"]
                    what = f"{f} B x{n}: {sysname} p{p} <= {need:g}x {peer}"
                    shown = f"{v:.2f}x [{r[f'p{p}']['min']:.2f}-{r[f'p{p}']['max']:.2f}]"
                out.append({"target": what, "value": v, "shown": shown, "need": need, "met": v <= need})
    return out


def report(res: dict[str, Any]) -> str:
    rows = []

    def cpu(x: dict[str, Any], what: str) -> str:
        return f"{x[what]['median']:.1f}" if what in x else "-"

    for f in res["frames"]:
        for n in res["nsubs"]:
            for s in res["systems"]:
                x = res["summary"].get(f"{s}|{f}|{n}")
                if not x:
                    continue
                row = [f"{f} B", n, s]
                for p in PCTS:
                    v = x[f"p{p:g}"]
                    row.append(f"{v['median']:.1f} [{v['min']:.1f}-{v['max']:.1f}]")
                row += [cpu(x, "sub_cpu_us"), cpu(x, "pub_cpu_us"), cpu(x, "broker_cpu_us")]
                row.append("yes" if x["complete"] else "NO")
                fc = x["foreign_cores"]
                row.append(f"{fc['median']:.2f} (max {fc['max']:.2f})")
                rows.append(row)
    hdr = ["frame", "subs", "system"] + [f"p{p:g} us" for p in PCTS]
    hdr += ["sub CPU us/frame", "pub CPU us/frame", "broker CPU us/frame", "complete", "foreign cores"]
    out = [
        f"latency, median [min-max] of {res['trials']} trials of {res['count']} frames at {res['rate']:g}/s; "
        "CPU per frame: median over trials (subscriber: mean of the subscribers)\n\n" + C.table(hdr, rows)
    ]
    rrows = []
    for key, r in res["ratios"].items():
        pair, f, n = key.split("|")
        rrows.append(
            [f"{f} B", n, pair]
            + [f"{r[p]['median']:.2f}x [{r[p]['min']:.2f}-{r[p]['max']:.2f}]" for p in ("p50", "p99")]
        )
    if rrows:
        out.append(
            "ratios within each trial (slabcast system / peer), median [min-max] over trials\n\n"
            + C.table(["frame", "subs", "ratio", "p50", "p99"], rrows)
        )
    out.append(
        "issue-21 targets\n\n"
        + C.table(
            ["target", "measured", ""],
            [[t["target"], t["shown"], "met" if t["met"] else "MISSED"] for t in res["targets"]],
        )
    )
    if res.get("set_aside"):
        out.append(f"{len(res['set_aside'])} trials set aside for foreign load above {res['max_foreign']:g} cores")
    pr = res.get("profiled")
    if pr and pr.get("profile"):
        for name, sm in pr["profile"].items():
            rows = [[f"{v:.1%}", k] for k, v in sm["self_outside_poll"][:15]]
            out.append(
                f"profiled {pr['system']} {pr['frame']} B x{pr['subscribers']}: {name} (py-spy, {sm['samples']} "
                f"samples, {sm['in_poll']:.0%} in poll; raw stacks {sm['raw']})\n\n"
                + C.table(["self, outside poll", "function"], rows)
            )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--count", type=int, default=None, help="frames per trial")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--frames", default=",".join(map(str, FRAMES)), help="frame sizes in bytes")
    ap.add_argument("--subs", default=",".join(map(str, NSUBS)))
    ap.add_argument(
        "--max-foreign", type=float, default=99.0, metavar="CORES",
        help="measure a cell again (all systems) when other programs took more than this (default: never)",
    )  # fmt: skip
    ap.add_argument("--retries", type=int, default=2, help="attempts beyond the first for a loaded cell")
    ap.add_argument("--slab-kib", type=int, default=None, help="slabcast's slab size (default 1024 KiB; 8 slabs)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S", help=C.WAIT_QUIET_HELP)
    ap.add_argument(
        "--profile", default=None, metavar="SYSTEM:FRAME:SUBS",
        help="then one more trial of that cell with py-spy on the publisher, subscriber 0 and the broker",
    )  # fmt: skip
    a = ap.parse_args(argv)
    if a.slab_kib is not None:
        if a.slab_kib < 128:
            ap.error(f"--slab-kib must hold two 64 KiB frames (at least 128), got {a.slab_kib}")
        os.environ[_SLAB_KIB] = str(a.slab_kib)
        POOL["slab_bytes"] = a.slab_kib * C.KiB
    prof = None
    if a.profile:
        sysname, f, n = a.profile.split(":")
        prof = (sysname, int(f), int(n))
    res = run(
        a.quick,
        a.trials,
        a.count,
        a.rate,
        tuple(a.systems.split(",")),
        max_foreign=a.max_foreign,
        retries=a.retries,
        quiet_wait=a.wait_quiet,
        frames=tuple(int(x) for x in a.frames.split(",")),
        nsubs=tuple(int(x) for x in a.subs.split(",")),
        profile=prof,
    )
    path = C.write_json(f"compare-latency-{C.timestamp()}", res)
    print(report(res))
    print(f"json: {path}  elapsed {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
