"""The ``slabcast`` command: ``broker``, ``demo``, ``status``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._exceptions import SlabcastError
from .._version import __version__

__all__ = ["main"]

log = logging.getLogger("slabcast.broker")
_SOURCES_WAIT = 3.0  # seconds a broker waits for its sources' first look before it says it is ready anyway


def _broker(args: argparse.Namespace) -> int:
    from ..broker.server import Broker
    from ..sources import SourceThread, parse_source, sources_from_json

    try:
        sources = [parse_source(spec) for spec in args.source]
        if args.sources_json is not None:
            sources += sources_from_json(args.sources_json)
    except (TypeError, ValueError, OSError, ImportError) as exc:  # ImportError: the source's extra is missing
        print(f"slabcast broker: {exc}", file=sys.stderr)
        return 2

    shm_mode = int(args.shm_mode, 8)
    threads: list[SourceThread] = []
    broker = Broker(
        args.address,
        shm_mode=shm_mode,
        lease_timeout=args.lease_timeout,
        tcp=args.tcp,
        curve_secret=args.curve_secret,
        curve_clients=args.curve_clients,
        sources=lambda: [t.status() for t in threads],  # the broker hosts them, and imports none
    )

    # Read on a source's thread: a count one message stale at worst (the sources only ask "is anybody there").
    threads += [SourceThread(src, broker.address, broker.subscribers) for src in sources]

    started = [0.0]

    def start() -> None:
        started[0] = time.monotonic()
        for t in threads:
            t.start()

    def sources_open() -> bool:
        # Ready once every source opened its stream or is waiting for its device, or after _SOURCES_WAIT
        # whatever a source's first look is doing (liblsl's first resolve took 11 s once on a 2-vCPU VM): its
        # stream appears when it does, and `slabcast status` says it is starting meanwhile.
        if all(t.opened.is_set() or not t.is_alive() for t in threads):
            return True
        if time.monotonic() - started[0] < _SOURCES_WAIT:
            return False
        slow = [t.stream_name for t in threads if t.is_alive() and not t.opened.is_set()]
        log.warning("serving now; source(s) %s still starting after %g s", ", ".join(map(repr, slow)),
                    _SOURCES_WAIT)  # fmt: skip
        return True

    def ready() -> None:
        where = broker.address + (f" and {broker.tcp_address}" if broker.tcp_address else "")
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"ready {os.getpid()} {where}\n".encode())
            os.close(args.ready_fd)
        else:
            print(f"slabcast broker {os.getpid()} serving {where}", flush=True)

    # SIGUSR1: the hosted sources end their streams the normal way (subscribers get every sample, partial
    # tails included, then the end); the broker goes on serving until SIGTERM. The handler only counts
    # (a lock taken in a handler can deadlock); the serve loop, woken by the signal, acts.
    ends = [0, 0]  # asked, done

    def end_sources(*_: object) -> None:
        ends[0] += 1

    def tick() -> None:
        if ends[0] != ends[1]:
            ends[1] = ends[0]
            log.info("SIGUSR1: ending the hosted sources' streams")
            for t in threads:
                t.stopping.set()

    signal.signal(signal.SIGUSR1, end_sources)
    try:
        # Under `slabcast up` (--sigterm-ends-sources): a SIGTERM to every process of up's cgroup (systemd's
        # KillMode=control-group) ends the sources' streams, as SIGUSR1 does; up stops us with SIGINT after its
        # workers have finished their streams.
        broker.serve(ready, start=start, ready_when=sources_open, parent_fd=args.parent_fd, tick=tick,
                     on_sigterm=end_sources if args.sigterm_ends_sources else None)  # fmt: skip
    finally:
        for t in threads:
            t.stopping.set()
        # (A second SIGINT or SIGTERM while the sources stop is the same request: not a KeyboardInterrupt that
        # would end the process before they closed their streams.)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deadline = time.monotonic() + 5
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():  # (a device call that does not return: its stream's files go with the process)
                log.warning("source %r did not stop within 5 s (its %s call blocks); exiting without it",
                            t.stream_name, type(t.source).__name__)  # fmt: skip
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from zmq.auth import create_certificates

    os.makedirs(args.dir, exist_ok=True)
    public, secret = create_certificates(args.dir, args.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


def _curve(args: argparse.Namespace) -> tuple[str, str] | None:
    return (args.curve[0], args.curve[1]) if args.curve else None


def _process_age() -> float:
    """Seconds since this process started (its /proc start time on the boot clock), 0 if unknown; at most
    5 s: exec() keeps the start time, so a launcher that ran first (`wait-for-it ...; exec slabcast ...`)
    would count as our start-up."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
        return min(5.0, max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started))
    except (OSError, ValueError, IndexError):
        return 0.0


def _term_as_interrupt() -> None:
    """SIGTERM (a supervisor, `kill`) ends a client command as Ctrl-C does: it leaves with a goodbye.  SIGINT
    too, even where it came ignored (a command started with `&` from a script: the shell ignores SIGINT for
    it, and Python then installs no handler)."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _lsl_out(args: argparse.Namespace) -> int:
    from ..client.lsl import run_outlet
    from ..client.record import absent_hint

    _term_as_interrupt()
    hint = None
    try:
        hint = absent_hint(args.stream, args.address)
        if hint is not None:  # (it waits for the stream, up to an hour: say so, and what there is)
            print(f"lsl-out: waiting for stream {args.stream!r} ({hint}; Ctrl-C to give up)", file=sys.stderr)
        sent = run_outlet(args.stream, address=args.address, name=args.name, type=args.type,
                          source_id=args.source_id, curve=_curve(args))  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how a service manager stops it, not a failure
        waited = False
        with contextlib.suppress(KeyboardInterrupt):  # (a second Ctrl-C: the message says serving)
            waited = hint is not None and absent_hint(args.stream, args.address) is not None  # (it never came)
        print(f"lsl-out: stopped {'waiting for' if waited else 'serving'} {args.stream}", file=sys.stderr)
        return 0
    print(f"lsl-out: {sent} samples of {args.stream} sent", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from ..cli.top import departed_line, source_line
    from ..client.control import broker_status

    status = broker_status(args.address, curve=_curve(args))
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        print()
        return 0
    print(f"broker pid {status['pid']} at {status['address']}, up {status['uptime']:.1f} s")
    sources = {src["name"]: src for src in status.get("sources", [])}
    for src in sources.values():
        print(f"  source {source_line(src)}")
    for s in status["streams"]:
        rate = f"{s['rate']:.12g} Hz" if s["rate"] else "no rate"
        print(
            f"  stream {s['name']}: {s['dtype']} x {s['channels']}, {rate}, {s['samples']} samples in "
            f"{s['frames']} frames, {s['slabs_free']}/{s['slabs']} slabs free{' (ended)' if s['ended'] else ''}"
        )
        pub = s.get("publisher")
        if pub:
            held = pub.get("held_back_s")
            print(f"    publisher {pub['label']} pid {pub['pid']}" + ("" if held is None else
                  f": held back {held:.1f} s (no free slab) by {pub['held_back_by']}, a policy=block subscriber "
                  f"behind"))  # fmt: skip
        if "shm_bytes" in s:
            mib = 1 << 20
            print(f"    pool: {s['shm_bytes'] / mib:.1f} MiB of shared memory; chunks up to "
                  f"{s['carried_bytes'] / mib:.1f} MiB (may grow to {s['max_chunk_bytes'] / mib:.1f} MiB)")  # fmt: skip
        st = s.get("statistics", {})
        age = (sources.get(s["name"]) or {}).get("last_sample_age")
        if st.get("mean"):
            rate_seen = f", observed {st['observed_rate']:.0f}/s" if st.get("observed_rate") else ""
            if age is not None and age > 1.0:  # the window is stream time: it stands still when nothing comes
                rate_seen = f", none for {age:.1f} s"
            # The figures are of what the pool still holds: less than the window on a fast stream or a young one.
            rate = s.get("rate") or st.get("observed_rate")
            held = st["window_samples"] / rate if rate else None
            window = st["window_seconds"]
            span = f"last {window:g} s" if held is None or held >= 0.9 * window else \
                f"last {held:.3g} s (of the {window:g} s asked: all the stream and its pool hold)"  # fmt: skip
            print(f"    {span} ({st['window_samples']} samples{rate_seen}):")
            for i, name in enumerate(s.get("channel_names") or [f"ch_{i}" for i in range(s["channels"])]):
                print(f"      {name}: mean {st['mean'][i]:.6g} std {st['std'][i]:.6g} "
                      f"min {st['min'][i]:.6g} max {st['max'][i]:.6g} ptp {st['ptp'][i]:.6g}")  # fmt: skip
        for u in s["subscribers"]:
            print(f"    {_subscriber_line(u)}")
    for s in status.get("ended_streams", []):
        print(f"  stream {s['name']}: ended ({s['end']}) {s['ended_ago']:.1f} s ago after {s['samples']} samples "
              f"in {s['frames']} frames")  # fmt: skip
        for u in s.get("subscribers", []):  # (as each left: an operator saw them only in --json)
            print(f"    {_subscriber_line(u)}")
    for d in status.get("departed", []):  # (the broker's log said so; the status did not: a newcomer's kill -9)
        print(f"  {departed_line(d)}")
    return 0


def _subscriber_line(u: dict[str, Any]) -> str:
    """One subscriber of a status row, as `slabcast status` prints it."""
    seconds = u.get("lag_seconds")
    lag = f"lag {u['lag_samples']} samples" + ("" if seconds is None else f" ({seconds:.3g} s)")
    return (f"{u['label']} pid {u['pid']}: size {u['size']} clip={u['clip']} policy={u['policy']} "
            f"delivered {u['delivered']} dropped {u['dropped']} leases {u['leases']} {lag}")  # fmt: skip


def _up(args: argparse.Namespace) -> int:
    from ..cli.up import run_up

    if args.example:
        from ..examples import EXAMPLE_CONFIG

        sys.stdout.write(EXAMPLE_CONFIG)
        return 0
    if args.config is None:
        print("slabcast up: give a CONFIG.toml (slabcast up --example > slabcast.toml writes one to start from)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        return run_up(args.config, output=lambda line: print(line, flush=True), log_level=args.log_level.upper())
    except (OSError, ValueError, ImportError, AttributeError) as exc:
        print(f"slabcast up: {exc}", file=sys.stderr)
        return 2


def _record(args: argparse.Namespace) -> int:
    from ..client.record import record, repair

    if args.repair is not None:
        if args.stream or args.out is not None:
            print("slabcast record: --repair FILE takes no STREAM and no --out", file=sys.stderr)
            return 2
        try:
            n = repair(args.repair)
        except (ValueError, ImportError, OSError) as exc:
            print(f"slabcast record --repair: {exc}", file=sys.stderr)
            return 2
        print(f"repaired {args.repair}: {n} samples", file=sys.stderr)
        return 0
    if not args.stream or args.out is None:
        print("slabcast record: expected STREAM [STREAM ...] --out PATH (or --repair FILE)", file=sys.stderr)
        return 2
    _term_as_interrupt()
    try:
        record(args.stream, args.out, seconds=args.seconds, address=args.address, clock=args.clock,
               pre_buffer=args.pre_buffer, asked_at=time.monotonic() - _process_age())  # fmt: skip
    except (FileExistsError, ValueError, ImportError) as exc:
        print(f"slabcast record: {exc}", file=sys.stderr)
        return 2
    return 0


def bench_dir() -> Path:
    """Where ``slabcast bench`` finds its harness: the ``benchmarks/`` of the source checkout this package runs from
    (``src/slabcast/cli/main.py`` -> the checkout's root); a wheel has none."""
    return Path(__file__).resolve().parents[3] / "benchmarks"


def _bench(args: argparse.Namespace) -> int:
    import importlib.util

    # The harness lives in the source checkout (benchmarks/, with the `bench` extra), not in the wheel.
    here = bench_dir()
    script = here / ("run_all.py" if args.scenarios == ["core"] else "compare_all.py")
    if not script.exists():
        print(f"slabcast bench: needs the benchmarks/ directory of a source checkout (looked for {script})",
              file=sys.stderr)  # fmt: skip
        return 2
    sys.path.insert(0, str(here))
    spec = importlib.util.spec_from_file_location(script.stem, script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [] if args.scenarios == ["core"] else list(args.scenarios)
    return int(module.main([*argv, *(["--quick"] if args.quick else [])]) or 0)


def _top(args: argparse.Namespace) -> int:
    from ..cli.top import run_top

    return run_top(args.address, args.interval, curve=_curve(args))


def _demo(args: argparse.Namespace) -> int:
    from ..cli.demo import run_demo

    return run_demo(duration=args.duration, out=args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = argparse.ArgumentParser(prog="slabcast", description="Shared-memory stream fan-out broker.")
    parser.add_argument("--version", action="version", version=f"slabcast {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(  # any case; anything else is argparse's usage error naming the choices, not a traceback
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING (default), ERROR or CRITICAL",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", parents=[common], help="run a broker until SIGINT/SIGTERM")
    p.add_argument(
        "--address", default=None, help="ipc://PATH or a socket path (default: $SLABCAST_ADDRESS or per-user)"
    )
    p.add_argument("--shm-mode", default="600", help="octal permission of shared-memory segments (600 or 660)")
    p.add_argument(
        "--lease-timeout",
        type=float,
        default=30.0,
        help="evict a subscriber holding a chunk longer than this many seconds (0: never)",
    )
    p.add_argument("--tcp", default=None, metavar="HOST:PORT", help="also serve remote subscribers over TCP (CURVE)")
    p.add_argument("--curve-secret", default=None, metavar="FILE", help="the broker's *.key_secret (with --tcp)")
    p.add_argument("--curve-clients", default=None, metavar="DIR", help="directory of accepted client *.key files")
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="KIND:OPTIONS",
        help="host a source, e.g. synthetic:name=mic,rate=48000,channels=2 or "
        "stdin:name=mic,dtype=int16,channels=2,rate=48000 or replay:path=REC,speed=1,loop=0 (repeatable); "
        "every kind also takes its stream's pool options: slab_bytes, nslabs, max_chunk_bytes, write_timeout, "
        "history=S (seconds the pool holds for late joiners and record --pre-buffer)",
    )
    p.add_argument("--sources-json", default=None, metavar="JSON",
                   help='sources as JSON, typed: [{"kind": "file", "options": {"path": "a.wav", "loop": false}}] '
                   "(what `slabcast up` hands the broker)")  # fmt: skip
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-fd", type=int, default=None, help=argparse.SUPPRESS)  # EOF: our starter died
    p.add_argument("--sigterm-ends-sources", action="store_true", help=argparse.SUPPRESS)  # (slabcast up's broker)
    p.set_defaults(func=_broker)

    p = sub.add_parser("keygen", parents=[common], help="make a CURVE key pair for TCP")
    p.add_argument("name", help="base name of the key files")
    p.add_argument("--dir", default=".", help="where to write NAME.key and NAME.key_secret")
    p.set_defaults(func=_keygen)

    curve_help = "for a tcp:// address: this client's secret key file and the broker's public key file (keygen)"
    p = sub.add_parser("status", parents=[common], help="print the state of a running broker")
    p.add_argument("--address", default=None)
    p.add_argument("--curve", nargs=2, metavar=("CLIENT_SECRET", "BROKER_PUBLIC"), default=None, help=curve_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "record", parents=[common], help="record streams losslessly (XDF, Zarr, WAV, FLAC or a directory)",
        description="Record STREAM until it ends (exit 0), Ctrl-C/SIGTERM (exit 0), or an early stop: "
        "evicted, broker gone, or a hole in the stream (exit 1; the file ends before the hole). "
        "The progress line on stderr never stops a recording. See docs/recording.md.",
    )  # fmt: skip
    p.add_argument("stream", nargs="*", default=[], help="the streams (several only into .xdf or .zarr)")
    p.add_argument("--out", default=None, help="file.xdf (XDF 1.0, LabRecorder's format; several streams), "
                   "dir.zarr (Zarr v3, the zarr extra; several streams: a group each), file.wav (RF64 once past 4 GiB, "
                   "a plain WAV until then) or file.flac (integer samples only), both through soundfile (pip install "
                   "'slabcast[files]'), or a new directory (info.json, samples.bin, frames.bin)")  # fmt: skip
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "lsl"],
                   help="XDF: the clock the ClockOffset chunks map the streams onto (auto: lsl when a stream "
                   "comes from an lsl source and pylsl is installed, else wall)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=None, help="stop after this much stream time, the pre-buffer "
                   "included (--seconds 2 --pre-buffer 3: the 2 s that began 3 s before the command)")  # fmt: skip
    p.add_argument("--pre-buffer", type=float, default=None, metavar="S", help="start S seconds before the command "
                   "was started (a stream without a rate: by its samples' times), from what the stream's pool still "
                   "holds (size it with up's history); less if it holds less")  # fmt: skip
    p.add_argument("--address", default=None)
    p.add_argument("--repair", default=None, metavar="FILE", help="make a FLAC/WAV whose recorder was killed "
                   "readable whole again (every complete block; sidecars cut to match), then exit")  # fmt: skip
    p.set_defaults(func=_record)

    p = sub.add_parser("bench", parents=[common], help="run the benchmark harness (source checkout, bench extra)")
    p.add_argument(
        "scenarios",
        nargs="*",
        default=[],
        help="fanout latency small soak emit (default: all but soak), or core for the issue-2 harness",
    )
    p.add_argument("--quick", action="store_true", help="small runs, for a smoke test")
    p.set_defaults(func=_bench)

    p = sub.add_parser("lsl-out", parents=[common], help="serve a stream as a Lab Streaming Layer outlet")
    p.add_argument("stream")
    p.add_argument("--name", default=None, help="LSL stream name (default: the slabcast name)")
    p.add_argument("--type", default=None, help="LSL content type (default: the first channel type, or 'slabcast')")
    p.add_argument("--source-id", default=None, help="LSL source_id (default: slabcast:<stream's source_id or name>)")
    p.add_argument("--address", default=None)
    p.add_argument("--curve", nargs=2, metavar=("CLIENT_SECRET", "BROKER_PUBLIC"), default=None, help=curve_help)
    p.set_defaults(func=_lsl_out)

    p = sub.add_parser("top", parents=[common], help="live view of a broker's streams and subscribers")
    p.add_argument("--address", default=None)
    p.add_argument("--curve", nargs=2, metavar=("CLIENT_SECRET", "BROKER_PUBLIC"), default=None, help=curve_help)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes")
    p.set_defaults(func=_top)

    p = sub.add_parser("up", parents=[common], help="start a broker, its sources and supervised task workers")
    p.add_argument("config", nargs="?", default=None, help="TOML file (docs/up.md; --example prints one)")
    p.add_argument("--example", action="store_true",
                   help="print the example config (the microphone use case): slabcast up --example > up.toml")
    p.set_defaults(func=_up)

    from . import bridge, view

    p = sub.add_parser("view", parents=[common], help="live view of a broker's streams in the browser (view extra)")
    view.add_arguments(p)
    p.set_defaults(func=view.run)

    p = sub.add_parser("bridge", parents=[common], help="publish streams to other hosts through Zenoh (zenoh extra)")
    bridge.add_arguments(p)
    p.set_defaults(func=bridge.run)

    p = sub.add_parser("demo", parents=[common], help="broker + synthetic 48 kHz stereo source + three workers")
    p.add_argument("--duration", type=float, default=15.0, help="seconds to run (default 15)")
    p.add_argument("--out", default="slabcast-demo", help="directory for the WAV files, kept (default ./slabcast-demo)")
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except SlabcastError as exc:
        print(f"slabcast: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `slabcast status | head`: the reader left; say nothing more
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:  # bad addresses, key files: say what, never a traceback
        print(f"slabcast {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
