"""Soak: a steady stream for N minutes; the broker's RSS and its /dev/shm footprint must stay flat.

One publisher process writes 48 kHz stereo float32 in 10 ms frames (480 x 2,
3840 B, 100 frames/s), paced without drift.  Eight subscriber processes with
different chunk sizes (10 ms .. 3 s, clip on and off) read every chunk, touch
it (one byte per 4 KiB page, at least one byte) and release it.  Every second
the main process samples the broker's ``VmRSS`` (``/proc/<pid>/status``) and the
total size of ``/dev/shm/slabcast.<brokerpid>.*``.  At the end it reports first,
last, max and the least-squares slope of both (whole run, and the second half,
after warm-up), every subscriber's chunk count and drops, and plots both series
(PNG).  The in-process BufferEmit comparison is ``benchmarks/bench_emit.py``.

    .venv/bin/python benchmarks/soak.py                 # 10 minutes
    .venv/bin/python benchmarks/soak.py --minutes 1     # quick
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

RATE = 48_000
FRAME = 480  # 10 ms
# (seconds, clip)
SUBS = [(0.01, True), (0.05, False), (0.1, True), (0.25, True), (0.5, False), (1.0, True), (2.0, True), (3.0, False)]


def _pub(address: str, stream: str, seconds: float, ready: Any, go: Any, results: Any) -> None:
    import slabcast

    pub = slabcast.Publisher(stream, dtype="float32", channels=2, rate=RATE, address=address, timeout=60)
    rng = np.random.default_rng(2)
    frames = [rng.standard_normal((FRAME, 2)).astype(np.float32) for _ in range(8)]
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    period = FRAME / RATE
    n = round(seconds / period)
    t_start = time.monotonic()
    late_max = 0.0
    for k in range(n):
        t_due = t_start + k * period
        while (left := t_due - time.monotonic()) > 0:
            time.sleep(left)
        late_max = max(late_max, time.monotonic() - t_due)
        pub.write(frames[k % 8], t0=t_start + k * period)
    results.put(("closing", time.monotonic()))  # the sampler stops here: after close the broker frees the stream
    pub.close()
    results.put(("pub", {"frames": n, "late_max_s": late_max, "wall_s": time.monotonic() - t_start}))


def _sub(address: str, stream: str, tag: str, seconds: float, clip: bool, ready: Any, results: Any) -> None:
    import slabcast

    sub = slabcast.Subscriber(stream, seconds=seconds, clip=clip, address=address)
    ready.put(("sub-ready", tag))
    chunks = samples = gaps = 0
    expect = 0
    acc = 0.0
    for chunk in sub:
        with chunk:
            d = chunk.data
            acc += float(d.reshape(-1)[::1024].sum())  # 1024 float32 = one 4 KiB page
            samples += d.shape[0]
            chunks += 1
            if chunk.seq != expect:
                gaps += 1
            expect = chunk.seq + 1
            del d
    st = sub.statistics()
    sub.close()
    results.put(
        (tag, {"chunks": chunks, "samples": samples, "gaps": gaps, "dropped": st.dropped, "cpu": C.worker_cpu()})
    )


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _shm_bytes(pid: int) -> int:
    total = 0
    for name in C.segments_of(pid):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(f"/dev/shm/{name}").st_size
    return total


def _trend(t: np.ndarray, y: np.ndarray) -> dict[str, float]:
    if len(t) < 3:
        return {
            "first": float(y[0]) if len(y) else 0.0,
            "last": float(y[-1]) if len(y) else 0.0,
            "max": float(y.max()) if len(y) else 0.0,
            "slope_per_min": 0.0,
            "slope_per_min_2nd_half": 0.0,
        }
    half = len(t) // 2
    return {
        "first": float(y[0]),
        "last": float(y[-1]),
        "max": float(y.max()),
        "min": float(y.min()),
        "slope_per_min": float(np.polyfit(t / 60, y, 1)[0]),
        "slope_per_min_2nd_half": float(np.polyfit(t[half:] / 60, y[half:], 1)[0]),
    }


def run(minutes: float = 10.0, verbose: bool = True, png: str | None = None) -> dict[str, Any]:
    seconds = minutes * 60
    stream = "soak"
    machine = C.machine_info()
    samples: list[tuple[float, int, int, float]] = []
    with C.scratch_dir() as tmp, C.broker_at(tmp / "broker.sock") as broker, C.Workers() as w:
        bpid = broker.pid
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        pub = w.spawn(_pub, broker.address, stream, seconds, ready, go, results)
        C.get(ready, 60, [pub])
        for i, (s, clip) in enumerate(SUBS):
            w.spawn(_sub, broker.address, stream, f"s{i}", s, clip, ready, results)
        for _ in SUBS:
            C.get(ready, 60, w.procs)
        meter = C.CpuMeter([bpid])
        b_cpu0 = C.pid_cpu(bpid)
        t0 = time.monotonic()
        go.set()
        out: dict[str, Any] = {}
        next_print = 0.0
        busy0, tb = C._machine_busy(), time.monotonic()
        while len(out) < len(SUBS) + 2:
            try:
                tag, val = results.get(timeout=1.0)
                out[tag] = val
            except Exception:
                pass
            t = time.monotonic() - t0
            busy1, tb1 = C._machine_busy(), time.monotonic()
            load = (busy1 - busy0) / max(tb1 - tb, 1e-3)
            busy0, tb = busy1, tb1
            if "closing" not in out:  # while the stream is live (after close, the broker frees it)
                try:
                    samples.append((t, _rss_kib(bpid), _shm_bytes(bpid), load))
                except OSError:
                    break
            if verbose and samples and t >= next_print:
                s = samples[-1]
                print(
                    f"  soak {t:6.0f}/{seconds:.0f} s: broker RSS {s[1] / 1024:7.1f} MiB, "
                    f"shm {s[2] / C.MiB:7.1f} MiB, machine load {s[3]:.2f} cores",
                    flush=True,
                )
                next_print += 30
            if t > seconds + 120:
                raise TimeoutError("soak did not finish")
        b_cpu = C.pid_cpu(bpid) - b_cpu0
        cpu = meter.stop(sum(v.get("cpu", 0.0) for k, v in out.items() if k.startswith("s")))
    arr = np.array(samples, dtype=float)
    t, rss, shm = arr[:, 0], arr[:, 1] * 1024, arr[:, 2]
    subs = [out[f"s{i}"] | {"seconds": s, "clip": c} for i, (s, c) in enumerate(SUBS)]
    res = {
        "machine": machine,
        "minutes": minutes,
        "frames": out["pub"]["frames"],
        "publisher": out["pub"],
        "broker_cpu_s": b_cpu,
        "cpu": cpu,
        "rss_bytes": _trend(t, rss),
        "shm_bytes": _trend(t, shm),
        "subscribers": subs,
        "series": {
            "t": t.tolist(),
            "rss_bytes": rss.tolist(),
            "shm_bytes": shm.tolist(),
            "load_cores": arr[:, 3].tolist(),
        },
    }
    res["json"] = str(C.write_json(f"soak-{C.timestamp()}", res))
    if png:
        res["png"] = plot(res, png)
    return res


def plot(res: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = res["series"]
    t = np.array(s["t"]) / 60
    fig, axes = plt.subplots(3, 1, figsize=(7, 6), sharex=True)
    axes[0].plot(t, np.array(s["rss_bytes"]) / C.MiB)
    axes[0].set_ylabel("broker RSS (MiB)")
    axes[1].plot(t, np.array(s["shm_bytes"]) / C.MiB, color="C1")
    axes[1].set_ylabel("/dev/shm (MiB)")
    axes[2].plot(t, s["load_cores"], color="C2", lw=0.6)
    axes[2].set_ylabel("machine load (cores)")
    axes[2].set_xlabel("minutes")
    for a in axes:
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3)
    fig.suptitle(f"slabcast soak: 48 kHz stereo float32, 10 ms frames, 8 subscribers, {res['minutes']:g} min")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def report(res: dict[str, Any]) -> str:
    rows = []
    for key, unit, name in (
        ("rss_bytes", C.MiB, "broker RSS (MiB)"),
        ("shm_bytes", C.MiB, "/dev/shm slabcast.<pid>.* (MiB)"),
    ):
        r = res[key]
        rows.append(
            [
                name,
                f"{r['first'] / unit:.2f}",
                f"{r['last'] / unit:.2f}",
                f"{r['max'] / unit:.2f}",
                f"{r['slope_per_min'] / C.KiB:+.1f}",
                f"{r['slope_per_min_2nd_half'] / C.KiB:+.1f}",
            ]
        )
    out = [C.table(["series", "first", "last", "max", "slope KiB/min", "slope 2nd half KiB/min"], rows)]
    srows = [
        [f"{s['seconds']:g} s", s["clip"], s["chunks"], s["samples"], s["gaps"], s["dropped"]]
        for s in res["subscribers"]
    ]
    out.append(C.table(["chunk", "clip", "chunks", "samples", "seq gaps", "dropped"], srows))
    out.append(
        f"frames written {res['frames']}, publisher max lateness {res['publisher']['late_max_s'] * 1e3:.1f} ms, "
        f"broker CPU {res['broker_cpu_s']:.1f} s over {res['cpu']['wall_s']:.0f} s, "
        f"foreign load {res['cpu']['foreign_cores']:.2f} cores"
    )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--png", default=None, help="plot path (default benchmarks/results/soak-<time>.png)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    C.RESULTS.mkdir(exist_ok=True)
    png = a.png or str(C.RESULTS / f"soak-{C.timestamp()}.png")
    res = run(a.minutes, verbose=not a.quiet, png=png)
    print(report(res))
    print(f"json: {res['json']}  png: {res.get('png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
