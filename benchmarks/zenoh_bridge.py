"""Zenoh bridge: throughput and added latency of slabcast across Zenoh, against plain Zenoh, 64 KiB frames.

Two paths, measured in the same run, both over a Zenoh session on TCP loopback
(multicast scouting off, explicit endpoints):

- **bridge**: publisher process -> broker A -> ``slabcast bridge --zenoh`` ->
  Zenoh -> ``zenoh`` source in broker B -> subscriber (this process, chunks of
  one frame, ``clip=True``).  The bridge runs with ``--policy block`` and the
  source with ``policy=block``: lossless end to end, so throughput is what the
  chain sustains, not what it drops.
- **zenoh**: a plain Zenoh publisher process -> Zenoh -> a Zenoh subscriber
  callback in this process (``payload.to_bytes()``: the consumer gets the bytes,
  as the bridge's source does), ``CongestionControl.BLOCK``.

Latency: frames paced at ``--rate`` frames/s; the publisher stamps each with
``time.monotonic_ns()`` (one clock for every process on Linux) in bytes 8..15
right before ``write``/``put``; the consumer subtracts when the frame is in its
hands.  The first ``--warmup`` frames are not counted.  Throughput: ``--frames``
frames written flat out; frames/s and MB/s (decimal) from the first frame
received to the last.  Run ``python benchmarks/zenoh_bridge.py --help``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

FRAME = 64 * C.KiB
POOL = {"slab_bytes": 1 * C.MiB, "nslabs": 8, "max_chunk_bytes": 64 * C.KiB}
PCTS = (50, 90, 99)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _zconf(listen: str | None = None, connect: str | None = None) -> Any:
    from slabcast.bridge.zenoh import zenoh_config

    return zenoh_config("peer", connect, listen, multicast=False)


def _send_loop(send: Any, count: int, rate: float | None, go: Any) -> float:
    """After ``go``, send ``count`` frames stamped with their number and the monotonic clock (paced if ``rate``);
    return the CPU seconds this process used meanwhile (every thread: Zenoh's too)."""
    frame = C.frame_pattern(FRAME, 1)[0]
    words = frame.view(np.uint64)
    go.wait()
    cpu = C.worker_cpu()
    period = 1.0 / rate if rate else 0.0
    t_next = time.monotonic() + period
    for k in range(count):
        if rate:
            while (left := t_next - time.monotonic()) > 0:
                time.sleep(left)
            t_next += period
        words[0] = k
        words[1] = time.monotonic_ns()
        send(frame)
    return C.worker_cpu() - cpu


# ----------------------------------------------------------------------------- plain Zenoh


def _zenoh_pub(endpoint: str, key: str, count: int, rate: float | None, ready: Any, go: Any, done: Any) -> None:
    import zenoh

    session = zenoh.open(_zconf(listen=endpoint))
    pub = session.declare_publisher(key, congestion_control=zenoh.CongestionControl.BLOCK)
    deadline = time.monotonic() + 30
    while not pub.matching_status.matching:  # the subscriber's declaration reached us
        if time.monotonic() > deadline:
            raise TimeoutError("no Zenoh subscriber matched within 30 s")
        time.sleep(0.01)
    ready.put("ready")
    ready.put(_send_loop(lambda f: pub.put(f.tobytes()), count, rate, go))
    done.wait(120)
    session.close()


def run_zenoh(count: int, rate: float | None) -> tuple[np.ndarray, float, dict[str, float]]:
    """Return each frame's latency (ns; -1: not received), the seconds from first to last frame received and
    the CPU load of the measure (``C.CpuMeter``: ours and other programs')."""
    import zenoh

    endpoint, key = f"tcp/127.0.0.1:{_free_port()}", f"bench/plain/{os.getpid()}"
    lat = np.full(count, -1, dtype=np.int64)
    got = [0, 0, 0]  # received, first ns, last ns
    finished = threading.Event()

    def on_sample(sample: Any) -> None:
        data = sample.payload.to_bytes()
        now = time.monotonic_ns()
        k, t = np.frombuffer(data, dtype=np.uint64, count=2)
        lat[int(k)] = now - int(t)
        got[0] += 1
        got[1] = got[1] or now
        got[2] = now
        if got[0] == count:
            finished.set()

    with C.Workers() as w:
        ready, go, done = C.CTX.Queue(), C.CTX.Event(), C.CTX.Event()
        proc = w.spawn(_zenoh_pub, endpoint, key, count, rate, ready, go, done)
        session = zenoh.open(_zconf(connect=endpoint))
        try:
            session.declare_subscriber(key, on_sample)
            C.get(ready, 60, [proc])
            meter = C.CpuMeter()
            go.set()
            finished.wait(60 + (count / rate if rate else 0))
            load = meter.stop(C.get(ready, 60, [proc]))
        finally:
            done.set()
            session.close()
    return lat, (got[2] - got[1]) / 1e9, load


# ----------------------------------------------------------------------------- through the bridge


def _slab_pub(address: str, stream: str, count: int, rate: float | None, ready: Any, go: Any) -> None:
    import slabcast

    pub = slabcast.Publisher(stream, dtype="uint8", channels=1, address=address, timeout=60, **POOL)
    ready.put("ready")
    cpu = _send_loop(pub.write, count, rate, go)
    pub.close()
    ready.put(cpu)


def _expect(proc: subprocess.Popen[str], start: str, timeout: float = 30) -> str:
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(start):
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not lines or not lines[-1].startswith(start):
        raise TimeoutError(f"no {start!r} line within {timeout} s from the bridge: {lines}")
    return lines[-1]


def _source_alone(spec: str, address: str, stop: Any) -> None:
    """The ``zenoh`` source as the broker hosts it (a SourceThread), but in a process of its own."""
    from slabcast.sources import SourceThread, parse_source

    thread = SourceThread(parse_source(spec), address)
    thread.start()
    stop.wait(600)
    thread.stopping.set()
    thread.join(15)


def run_bridge(count: int, rate: float | None, wake: str = "doorbell", source_process: bool = False) -> tuple[
        np.ndarray, float, dict[str, Any], dict[str, float]]:  # fmt: skip
    """The same through broker A, the bridge, Zenoh, broker B (the subscriber waits with ``wake``); also returns
    the chain's CPU seconds per process and the load of the measure.  ``source_process``: the ``zenoh`` source
    runs in a process of its own beside broker B, not hosted by it (outside the broker's GIL)."""
    import slabcast

    endpoint, prefix, stream = f"tcp/127.0.0.1:{_free_port()}", f"bench/{os.getpid()}", "zb"
    lat = np.full(count, -1, dtype=np.int64)
    pool = ",".join(f"{k}={v}" for k, v in POOL.items())
    spec = f"zenoh:key={prefix}/{stream},connect={endpoint},multicast=false,timeout=0.5,{pool}"
    with C.scratch_dir() as d, C.broker_at(d / "a.sock") as a, C.Workers() as w:
        bridge = subprocess.Popen([sys.executable, "-m", "slabcast", "bridge", "--zenoh", stream, "--address",
                                   a.address, "--key-prefix", prefix, "--listen", endpoint, "--no-multicast",
                                   "--policy", "block"], stdout=subprocess.PIPE, text=True)  # fmt: skip
        b = None
        try:
            _expect(bridge, "bridge: ready")
            b = slabcast.BrokerProcess(d / "b.sock", args=() if source_process else ("--source", spec)).start()
            pids = {"broker A": a.pid, "bridge": bridge.pid, "broker B": b.pid}
            if source_process:
                stop = C.CTX.Event()
                pids["source"] = w.spawn(_source_alone, spec, b.address, stop).pid
            ready, go = C.CTX.Queue(), C.CTX.Event()
            proc = w.spawn(_slab_pub, a.address, stream, count, rate, ready, go)
            C.get(ready, 60, [proc])
            _expect(bridge, f"bridge: {stream} ->")
            sub = slabcast.Subscriber(stream, size=FRAME, clip=True, address=b.address, wait=30, max_inflight=16,
                                      wake=wake)  # fmt: skip
            cpu0 = {k: C.pid_cpu(p) for k, p in pids.items()}
            meter = C.CpuMeter(list(pids.values()))
            go.set()
            first = last = 0
            for n in range(count):
                chunk = sub.recv(timeout=60)
                now = time.monotonic_ns()
                k, t = (int(v) for v in chunk.data[:16].view(np.uint64))
                chunk.release()
                lat[k] = now - t
                first = first or now
                last = now
                if n == count - 1:
                    break
            cpu = {k: C.pid_cpu(p) - cpu0[k] for k, p in pids.items()}
            load = meter.stop(C.get(ready, 60, [proc]))
            sub.close()
            if source_process:
                stop.set()
        finally:
            bridge.terminate()
            try:
                bridge.wait(10)
            except subprocess.TimeoutExpired:
                bridge.kill()
                bridge.wait()
            if bridge.stdout is not None:
                bridge.stdout.close()
            if b is not None:
                b.stop()
    return lat, (last - first) / 1e9, cpu, load


# ----------------------------------------------------------------------------- report


def _latency_row(name: str, lat: np.ndarray, warmup: int) -> dict[str, Any]:
    kept = lat[warmup:]
    seen = kept[kept >= 0] / 1e3
    row: dict[str, Any] = {"path": name, "frames": len(kept), "lost": int((kept < 0).sum())}
    for p in PCTS:
        row[f"p{p}_us"] = float(np.percentile(seen, p)) if len(seen) else float("nan")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1000 frames per measure")
    ap.add_argument("--frames", type=int, default=None, help="frames per measure (default 10000, quick 1000)")
    ap.add_argument("--rate", type=float, default=500.0, help="frames per second in the latency measure (500)")
    ap.add_argument("--warmup", type=int, default=None, help="latency frames not counted (default 200, quick 100)")
    ap.add_argument("--trials", type=int, default=1, help="repeat both measures (median over trials reported)")
    ap.add_argument("--wake", choices=("doorbell", "futex"), default="doorbell",
                    help="how the subscriber on broker B waits (default doorbell, slabcast's default)")  # fmt: skip
    ap.add_argument("--source-process", action="store_true",
                    help="the zenoh source in a process of its own beside broker B, outside its GIL")  # fmt: skip
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S", help=C.WAIT_QUIET_HELP)
    args = ap.parse_args(argv)
    frames = args.frames or (1000 if args.quick else 10_000)
    warmup = args.warmup if args.warmup is not None else (100 if args.quick else 200)
    out: dict[str, Any] = {"machine": C.machine_info(), "frames": frames, "rate": args.rate, "wake": args.wake,
                           "source_process": args.source_process, "trials": []}  # fmt: skip
    for trial in range(args.trials):
        res: dict[str, Any] = {"quiet": C.wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None,
                               "loadavg": os.getloadavg()[0]}  # fmt: skip
        lat_z, _, load_lz = run_zenoh(frames + warmup, args.rate)
        lat_b, _, _, load_lb = run_bridge(frames + warmup, args.rate, args.wake, args.source_process)
        _, secs_z, load_tz = run_zenoh(frames, None)
        lat_tb, secs_b, cpu_thr, load_tb = run_bridge(frames, None, args.wake, args.source_process)
        res["latency"] = [_latency_row("zenoh", lat_z, warmup), _latency_row("bridge", lat_b, warmup)]
        # CPU per frame of every process on the path (publisher, brokers, bridge, subscriber): on a machine
        # the path saturates, what bounds its throughput, and steadier than frames/s under others' load.
        res["throughput"] = [
            {"path": "zenoh", "frames_s": frames / secs_z, "MB_s": frames * FRAME / secs_z / 1e6,
             "cpu_us": load_tz["our_cpu_s"] / frames * 1e6},
            {"path": "bridge", "frames_s": frames / secs_b, "MB_s": frames * FRAME / secs_b / 1e6,
             "cpu_us": load_tb["our_cpu_s"] / frames * 1e6, "lost": int((lat_tb < 0).sum())},
        ]  # fmt: skip
        res["cpu"] = {"latency zenoh": load_lz, "latency bridge": load_lb, "throughput zenoh": load_tz,
                      "throughput bridge": load_tb}  # fmt: skip
        res["cpu_s_per_frame_us"] = {k: v / frames * 1e6 for k, v in cpu_thr.items()}
        out["trials"].append(res)
        print(f"trial {trial + 1}/{args.trials} done", file=sys.stderr)

    def value(t: dict[str, Any], part: str, path: str, field: str) -> float:
        return float(next(r for r in t[part] if r["path"] == path)[field])

    def med(part: str, path: str, field: str) -> float:
        return float(np.median([value(t, part, path, field) for t in out["trials"]]))

    def trial_ratio(t: dict[str, Any], part: str, field: str) -> float:
        return value(t, part, "bridge", field) / value(t, part, "zenoh", field)

    def ratio(part: str, field: str) -> float:  # the median of each trial's ratio: one machine state each
        return float(np.median([trial_ratio(t, part, field) for t in out["trials"]]))

    def lost(path: str) -> int:
        return sum(next(r for r in t["latency"] if r["path"] == path)["lost"] for t in out["trials"])

    lat_rows: list[list[Any]] = [[p, *(f"{med('latency', p, f'p{q}_us'):.0f}" for q in PCTS), lost(p)]
                                 for p in ("zenoh", "bridge")]  # fmt: skip
    lat_rows.append(["bridge / zenoh", *(f"{ratio('latency', f'p{q}_us'):.2f}x" for q in PCTS), ""])
    print(f"\nLatency, 64 KiB frames at {args.rate:g}/s, {frames} frames after {warmup} warm-up (µs; subscriber "
          f"wake={args.wake})\n")  # fmt: skip
    print(C.table(["path", *(f"p{q}" for q in PCTS), "lost"], lat_rows))
    thr_rows = [[p, f"{med('throughput', p, 'frames_s'):.0f}", f"{med('throughput', p, 'MB_s'):.0f}",
                 f"{med('throughput', p, 'cpu_us'):.0f}"] for p in ("zenoh", "bridge")]  # fmt: skip
    thr_rows.append(["bridge / zenoh", f"{ratio('throughput', 'frames_s'):.2f}x", "",
                     f"{ratio('throughput', 'cpu_us'):.2f}x"])  # fmt: skip
    print(f"\nThroughput, 64 KiB frames written flat out, {frames} frames, lossless on both paths; CPU: of every "
          f"process on the path, per frame\n")  # fmt: skip
    print(C.table(["path", "frames/s", "MB/s", "CPU µs/frame"], thr_rows))
    trial_rows = []
    for k, t in enumerate(out["trials"], 1):
        foreign = max(m["foreign_cores"] for m in t["cpu"].values())
        trial_rows.append([k, *(f"{trial_ratio(t, 'latency', f'p{q}_us'):.2f}x" for q in PCTS),
                           f"{trial_ratio(t, 'throughput', 'frames_s'):.2f}x", f"{t['loadavg']:.1f}",
                           f"{foreign:.2f}"])  # fmt: skip
    print("\nEach trial, bridge / zenoh in the same trial; the load: 1-minute load average at its start, the most "
          "cores other programs took during one of its measures\n")  # fmt: skip
    print(C.table(["trial", *(f"p{q}" for q in PCTS), "throughput", "loadavg", "foreign cores"], trial_rows))
    cpu = out["trials"][-1]["cpu_s_per_frame_us"]
    print("\nCPU per frame in the throughput run (µs): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    path = C.write_json(f"zenoh-bridge-{C.timestamp()}", out)
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
