"""Small frames (issues 7 and 21): 256-byte frames into slabcast as fast as possible, one subscriber.

A publisher process writes 256 B uint8 frames back to back for ``--seconds``
(default 3) to a broker process; one subscriber process takes 64 KiB chunks
(``clip=True``), touches one byte per 4 KiB page and releases them.  Frames/s
ingested = frames written / (first write -> the subscriber's end of stream, i.e.
everything delivered).  ``write_fps`` (first write -> last write returned) is in
the JSON too, and CPU per frame of the publisher, the broker and the subscriber
(each process's CPU time, all threads, over the trial / frames).  Variants (the
subscriber's ``wake=``): ``doorbell`` (the library's defaults: the publisher sends
ZeroMQ notices while a doorbell subscriber exists), ``futex``, ``busy``; and
``statistics=0`` (doorbell, ``Publisher(statistics=0)``); and ``c-publisher`` (doorbell, the frames written by
libslabcast's ``sc_pub_write`` from ``small_frames_pub.c``, built against ``clients/c/build``).  Issue 21's target:
>= 600,000 frames/s (issue 7's was 300,000).  Every trial runs each variant once,
back to back; with ``--max-foreign X`` a trial whose foreign load passed X cores is
run again (``--retries``), the least loaded kept.

Then one more trial (defaults) with py-spy on the publisher and on the broker
(``py-spy record --function --format raw``, plus one ``py-spy dump`` of each
mid-run): the top functions by own time (leaf of the sampled stacks) and by
inclusive time are printed and stored; the raw stacks go to
``benchmarks/results/small-<time>-{publisher,broker}.txt``.

    .venv/bin/python benchmarks/small_frames.py [--trials 3] [--seconds 3] [--no-profile] [--max-foreign 0.3]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

FRAME = 256
CHUNK = 64 * C.KiB
TARGET_FPS = 600_000
# variant -> (publisher statistics=, subscriber wake=)
VARIANTS: dict[str, tuple[float | None, str]] = {
    "doorbell": (None, "doorbell"),
    "futex": (None, "futex"),
    "busy": (None, "busy"),
    "statistics=0": (0.0, "doorbell"),
    "c-publisher": (None, "doorbell"),  # libslabcast's sc_pub_write (small_frames_pub.c) instead of Python's write
}
C_SOURCE = Path(__file__).resolve().parent / "small_frames_pub.c"
C_DIR = Path(__file__).resolve().parents[1] / "clients" / "c"
POOL = {"slab_bytes": 4 * C.MiB, "nslabs": 8, "max_chunk_bytes": 1 * C.MiB}


def _pub(address: str, stream: str, seconds: float, stats: float | None, ready, go, results) -> None:
    import slabcast

    extra = {} if stats is None else {"statistics": stats}
    pub = slabcast.Publisher(stream, dtype="uint8", address=address, timeout=60, **POOL, **extra)
    frames = C.frame_pattern(FRAME, 4)
    ready.put(("pub-ready", os.getpid()))
    go.wait()
    cpu0 = C.worker_cpu()
    write = pub.write
    t_first = time.monotonic()
    deadline = t_first + seconds
    k = 0
    while True:
        for _ in range(1024):
            write(frames[k & 3])
            k += 1
        if time.monotonic() > deadline:
            break
    t_written = time.monotonic()
    pub.close()
    results.put(
        (
            "pub",
            {
                "t_first": t_first,
                "t_written": t_written,
                "t_closed": time.monotonic(),
                "frames": k,
                "cpu": C.worker_cpu() - cpu0,
            },
        )
    )


def _c_program() -> Path:
    """small_frames_pub.c built against the tree's libslabcast (clients/c/build), once per run."""
    subprocess.run(["make", "-s", "-C", str(C_DIR)], check=True, stdout=subprocess.DEVNULL)
    exe = C.RESULTS / "small_frames_pub"
    C.RESULTS.mkdir(exist_ok=True)
    build = C_DIR / "build"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(C_SOURCE), f"-I{C_DIR}", f"-L{build}", "-lslabcast",
                    f"-Wl,-rpath,{build}"], check=True)  # fmt: skip
    return exe


def _c_pub(address: str, stream: str, seconds: float, stats: float | None, ready, go, results, exe: str) -> None:
    """The C publisher, as _pub: its lines relayed to the trial's queues."""
    stat = "10" if stats is None else repr(stats)
    proc = subprocess.Popen([exe, address, stream, repr(seconds), stat], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdin is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"small_frames_pub did not open its stream (exit {proc.wait()})")
    ready.put(("pub-ready", proc.pid))
    go.wait()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    frames, first, written, closed, cpu = proc.stdout.readline().split()
    if proc.wait() != 0:
        raise RuntimeError(f"small_frames_pub failed (exit {proc.returncode})")
    results.put(("pub", {"t_first": float(first), "t_written": float(written), "t_closed": float(closed),
                         "frames": int(frames), "cpu": float(cpu)}))  # fmt: skip


def _sub(address: str, stream: str, wake: str, ready, results) -> None:
    import slabcast

    extra = {} if wake == "doorbell" else {"wake": wake}  # (a tree before wake= runs the default)
    sub = slabcast.Subscriber(stream, size=CHUNK, clip=True, address=address, **extra)
    ready.put(("sub-ready", os.getpid()))
    cpu0 = C.worker_cpu()
    nbytes = acc = 0
    for chunk in sub:
        with chunk:
            d = chunk.data
            acc += int(d[::4096].sum())
            nbytes += d.shape[0]
            del d
    results.put(
        (
            "sub",
            {
                "t_end": time.monotonic(),
                "bytes": nbytes,
                "dropped": sub.statistics().dropped,
                "cpu": C.worker_cpu() - cpu0,
            },
        )
    )
    sub.close()


def _rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes (0 if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _spy_exe() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


def trial(
    broker: Any,
    tag: str,
    seconds: float,
    stats: float | None,
    wake: str = "doorbell",
    profile: Path | None = None,
    c_exe: Path | None = None,
) -> dict[str, Any]:
    stream = f"small{tag}"
    spies: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    dumps: dict[str, str] = {}
    with C.Workers() as w:
        ready, results, go = C.CTX.Queue(), C.CTX.Queue(), C.CTX.Event()
        if c_exe is None:
            pub = w.spawn(_pub, broker.address, stream, seconds, stats, ready, go, results)
        else:
            pub = w.spawn(_c_pub, broker.address, stream, seconds, stats, ready, go, results, str(c_exe))
        _, pub_pid = C.get(ready, 60, [pub])
        sub = w.spawn(_sub, broker.address, stream, wake, ready, results)
        C.get(ready, 60, w.procs)
        exe = _spy_exe() if profile else None
        if exe and profile:
            for name, pid in (("publisher", pub_pid), ("broker", broker.pid), ("subscriber", sub.pid)):
                path = profile.with_name(f"{profile.name}-{name}.txt")
                cmd = [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--function",
                    "--nonblocking",
                    "-o",
                    str(path),
                ]
                spies.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path))
            time.sleep(1.0)
        meter = C.CpuMeter([broker.pid])
        b0 = C.pid_cpu(broker.pid)
        go.set()
        if exe and profile:
            time.sleep(seconds / 2)
            for name, pid in (("publisher", pub_pid), ("broker", broker.pid), ("subscriber", sub.pid)):
                r = subprocess.run([exe, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True)
                dumps[name] = r.stdout[-4000:]
        rss0 = _rss(broker.pid)
        rss_max = rss0
        out: dict[str, Any] = {}
        t_end = time.monotonic() + 120 + seconds * 10
        while len(out) < 2:  # sample the broker's RSS while the frames flow
            try:
                k, v = results.get(timeout=0.2)
                out[k] = v
            except Exception:
                if any(p.exitcode not in (None, 0) for p in w.procs) or time.monotonic() > t_end:
                    raise RuntimeError("a worker died or the trial timed out") from None
            rss_max = max(rss_max, _rss(broker.pid))
        b_cpu = C.pid_cpu(broker.pid) - b0
        cpu = meter.stop(out["pub"]["cpu"] + out["sub"]["cpu"])
    prof: dict[str, Any] = {}
    for name, spy, path in spies:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
        err = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
        if spy.stderr:
            spy.stderr.close()
        prof[name] = top_functions(path) | {"raw": str(path), "dump": dumps.get(name, ""), "stderr": err[-500:]}
    p, s = out["pub"], out["sub"]
    wall = s["t_end"] - p["t_first"]
    return {
        "statistics": stats,
        "wake": wake,
        "frames": p["frames"],
        "us_per_frame": {
            "publisher": p["cpu"] / p["frames"] * 1e6,
            "broker": b_cpu / p["frames"] * 1e6,
            "subscriber": s["cpu"] / p["frames"] * 1e6,
        },
        "fps": p["frames"] / wall,
        "write_fps": p["frames"] / (p["t_written"] - p["t_first"]),
        "MBps": p["frames"] * FRAME / wall / 1e6,
        "delivered": s["bytes"],
        "expected": p["frames"] * FRAME // CHUNK * CHUNK,
        "dropped": s["dropped"],
        "complete": s["bytes"] == p["frames"] * FRAME // CHUNK * CHUNK,
        "broker_rss_before": rss0,
        "broker_rss_max": rss_max,
        "cpu": cpu | {"publisher_cpu_s": p["cpu"], "broker_cpu_s": b_cpu, "subscriber_cpu_s": s["cpu"]},
        "profile": prof,
    }


_BORING = ("multiprocessing/", "<frozen", "<module>", "_cli.py", "__main__", "process ", "Broker.serve", "_pub (")


def top_functions(path: Path, n: int = 12) -> dict[str, Any]:
    """Own (leaf) and inclusive sample shares per function from py-spy's raw collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {"samples": 0, "own": [], "inclusive": []}
    for line in lines:
        stack, _, cnt = line.rpartition(" ")
        if not stack or not cnt.isdigit():
            continue
        c = int(cnt)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += c
        own[frames[-1]] += c
        for f in set(frames):
            if not any(x in f for x in _BORING):
                incl[f] += c

    def pct(cnt: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in cnt.most_common(n)] if total else []

    return {"samples": total, "own": pct(own), "inclusive": pct(incl)}


def run(
    trials: int = 3,
    seconds: float = 3.0,
    profile: bool = True,
    verbose: bool = True,
    variants: tuple[str, ...] = ("doorbell", "futex", "statistics=0", "c-publisher"),
    max_foreign: float = 99.0,
    retries: int = 2,
) -> dict[str, Any]:
    machine = C.machine_info()
    raw: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    set_aside: list[dict[str, Any]] = []
    prof = None
    ts = C.timestamp()
    t0 = time.monotonic()
    c_exe = _c_program() if "c-publisher" in variants else None
    with C.scratch_dir() as tmp, C.broker_at(tmp / "broker.sock") as broker:

        def group(t: int, attempt: int) -> list[dict[str, Any]]:
            recs = []
            for i, label in enumerate(variants):
                stats, wake = VARIANTS[label]
                exe = c_exe if label == "c-publisher" else None
                rec = trial(broker, f"{t}v{i}a{attempt}", seconds, stats, wake, c_exe=exe)
                rec["variant"], rec["trial"], rec["attempt"] = label, t, attempt
                recs.append(rec)
                if verbose:
                    u = rec["us_per_frame"]
                    print(
                        f"  [{time.monotonic() - t0:4.0f}s] trial {t} {label:13s}: {rec['fps']:9.0f} frames/s "
                        f"({rec['MBps']:.1f} MB/s; writes {rec['write_fps']:.0f}/s), complete {rec['complete']}, "
                        f"CPU us/frame pub {u['publisher']:.2f} broker {u['broker']:.3f} sub {u['subscriber']:.2f}, "
                        f"broker RSS {rec['broker_rss_before'] / C.MiB:.0f}->"
                        f"{rec['broker_rss_max'] / C.MiB:.0f} MiB, foreign {rec['cpu']['foreign_cores']:.2f} cores",
                        flush=True,
                    )
            return recs

        for t in range(trials):
            kept, aside = C.least_loaded(functools.partial(group, t), max_foreign, retries)
            for rec in kept:
                raw[rec["variant"]].append(rec)
            for g in aside:
                set_aside.extend(g)
        if profile:
            if _spy_exe() is None:
                print("  py-spy not installed: no profile (.venv/bin/pip install py-spy)")
            else:
                C.RESULTS.mkdir(exist_ok=True)
                prof = trial(broker, "prof", seconds, None, profile=C.RESULTS / f"small-{ts}")
                if verbose:
                    print(
                        f"  [{time.monotonic() - t0:4.0f}s] profiled trial: {prof['fps']:.0f} frames/s "
                        "(py-spy attached)"
                    )
    summary = {
        k: {
            "fps": C.summarize([r["fps"] for r in v]),
            "write_fps": C.summarize([r["write_fps"] for r in v]),
            "foreign_cores": C.summarize([r["cpu"]["foreign_cores"] for r in v]),
            "broker_rss_max": C.summarize([r["broker_rss_max"] for r in v]),
            "complete": all(r["complete"] for r in v),
        }
        | {
            f"{who}_us": C.summarize([r["us_per_frame"][who] for r in v])
            for who in ("publisher", "broker", "subscriber")
        }
        for k, v in raw.items()
        if v
    }
    best = max(s["fps"]["median"] for s in summary.values())
    return {
        "machine": machine,
        "trials": trials,
        "seconds": seconds,
        "frame": FRAME,
        "chunk": CHUNK,
        "summary": summary,
        "raw": raw,
        "set_aside": set_aside,
        "max_foreign": max_foreign,
        "profiled": prof,
        "target_fps": TARGET_FPS,
        "default_ratio": summary[variants[0]]["fps"]["median"] / TARGET_FPS,
        "best_ratio": best / TARGET_FPS,
        "elapsed_s": time.monotonic() - t0,
        "ts": ts,
    }


def report(res: dict[str, Any]) -> str:
    rows = []
    for k, s in res["summary"].items():
        f, wf = s["fps"], s["write_fps"]
        rows.append(
            [
                k,
                f"{f['median']:,.0f} [{f['min']:,.0f}-{f['max']:,.0f}]",
                f"{wf['median']:,.0f}",
                f"{f['median'] / res['target_fps']:.2f}x",
                "met" if f["median"] >= res["target_fps"] else "MISSED",
                f"{s['publisher_us']['median']:.2f}",
                f"{s['broker_us']['median']:.3f}",
                f"{s['subscriber_us']['median']:.2f}",
                "yes" if s["complete"] else "NO",
                f"{s['foreign_cores']['median']:.2f} (max {s['foreign_cores']['max']:.2f})",
                f"{s['broker_rss_max']['max'] / C.MiB:.0f}",
            ]
        )
    out = [
        f"256 B frames, one subscriber of 64 KiB chunks, median [min-max] of {res['trials']} trials of "
        f"{res['seconds']:g} s\n\n"
        + C.table(
            [
                "publisher",
                "frames/s delivered",
                "writes/s",
                f"vs {res['target_fps'] // 1000}k target",
                "",
                "pub CPU us/frame",
                "broker CPU us/frame",
                "sub CPU us/frame",
                "complete",
                "foreign cores",
                "broker peak RSS MiB",
            ],
            rows,
        )
    ]
    p = res.get("profiled")
    if p:
        c = p["cpu"]
        out.append(
            f"profiled trial: {p['fps']:,.0f} frames/s; CPU over {c['wall_s']:.1f} s: publisher "
            f"{c['publisher_cpu_s']:.1f} s, broker {c['broker_cpu_s']:.1f} s, subscriber {c['subscriber_cpu_s']:.1f} s"
        )
        for name, pr in p["profile"].items():
            rows = [[f"{pc:.1f}%", fn] for fn, pc in pr["own"][:10]]
            out.append(
                f"{name}: top functions by own time ({pr['samples']} samples; raw stacks {pr['raw']})\n\n"
                + C.table(["own", "function (file:line)"], rows)
            )
            rows = [[f"{pc:.1f}%", fn] for fn, pc in pr["inclusive"][:10]]
            out.append(f"{name}: top functions by inclusive time\n\n" + C.table(["inclusive", "function"], rows))
    if res.get("set_aside"):
        out.append(f"{len(res['set_aside'])} trials set aside for foreign load above {res['max_foreign']:g} cores")
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true", help="1 trial of 1.5 s")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--variants", default="doorbell,futex,statistics=0,c-publisher",
                    help=f"any of {', '.join(VARIANTS)}")  # fmt: skip
    ap.add_argument("--max-foreign", type=float, default=99.0, metavar="CORES", help="run a trial again above this")
    ap.add_argument("--retries", type=int, default=2)
    a = ap.parse_args(argv)
    trials, seconds = (1, 1.5) if a.quick else (a.trials, a.seconds)
    res = run(trials, seconds, not a.no_profile, True, tuple(a.variants.split(",")), a.max_foreign, a.retries)
    path = C.write_json(f"small-frames-{res['ts']}", res)
    print(report(res))
    print(f"json: {path}  elapsed {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
