"""``slabcast bridge --zenoh``: publish a broker's streams on Zenoh for brokers on other hosts (docs/zenoh.md)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the command's options."""
    p.add_argument("streams", nargs="*", metavar="STREAM",
                   help="streams to publish (default: every stream of the broker, as they appear)")  # fmt: skip
    p.add_argument("--zenoh", action="store_true", help="publish through Zenoh (the transport; required)")
    p.add_argument("--address", default=None, help="the local broker (default: $SLABCAST_ADDRESS or per-user)")
    p.add_argument("--key-prefix", default=None, metavar="PREFIX",
                   help="stream S goes on PREFIX/S (default: slabcast/<host>)")  # fmt: skip
    p.add_argument(
        "--policy",
        choices=("drop", "block"),
        default="drop",
        help="drop (default): a slow network never slows the local stream, losses are gaps the far "
        "side shows as discontinuities; block: lossless, a slow network holds the publisher back",
    )
    p.add_argument("--mode", choices=("peer", "client", "router"), default=None, help="Zenoh mode (default: peer)")
    p.add_argument("--connect", action="append", default=[], metavar="ENDPOINT",
                   help="Zenoh endpoint to connect to, e.g. tcp/10.0.0.5:7447 (repeatable)")  # fmt: skip
    p.add_argument("--listen", action="append", default=[], metavar="ENDPOINT",
                   help="Zenoh endpoint to listen on, e.g. tcp/0.0.0.0:7447 (repeatable)")  # fmt: skip
    p.add_argument("--no-multicast", action="store_true", help="no multicast scouting: explicit endpoints only")
    p.add_argument("--zenoh-config", default=None, metavar="FILE", help="a Zenoh JSON5 configuration file")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY:JSON5",
                   help="a Zenoh setting over the file, e.g. transport/unicast/max_links:2 (repeatable)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the bridge until SIGINT/SIGTERM; return the exit code."""
    if not args.zenoh:
        print("slabcast bridge: choose the transport: --zenoh (the only one so far)", file=sys.stderr)
        return 2
    try:
        from ..bridge.zenoh import ZenohBridge, open_session, zenoh_config

        conf = zenoh_config(args.mode, args.connect, args.listen, args.zenoh_config,
                            False if args.no_multicast else None, args.cfg)  # fmt: skip
    except ImportError as exc:
        print(f"slabcast bridge: {exc}", file=sys.stderr)
        return 2
    session = open_session(conf)
    try:
        bridge = ZenohBridge(session, args.streams, address=args.address, prefix=args.key_prefix,
                             policy=args.policy)  # fmt: skip

        signals = [0]

        def stop(*_: object) -> None:
            signals[0] += 1  # only counted here: a lock taken in a handler can deadlock with a second signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        what = ", ".join(args.streams) or "every stream"
        print(f"bridge: ready, zenoh id {session.zid()}, {what} on {bridge.prefix}/<stream>", flush=True)
        runner = threading.Thread(target=bridge.run, name="bridge", daemon=True)
        runner.start()
        alone_since, said = time.monotonic(), False
        while runner.is_alive():
            runner.join(0.2)  # the main thread stays free to take the signals
            if signals[0]:
                bridge.stop()
            # Zenoh puts frames nowhere, silently, while no peer or router is connected: say so, once a spell.
            if next(iter(session.info.peers_zid()), None) or next(iter(session.info.routers_zid()), None):
                if said:
                    print("bridge: a Zenoh peer is connected", flush=True)
                alone_since, said = time.monotonic(), False
            elif not said and time.monotonic() - alone_since > 5.0:
                where = ", ".join(args.connect) or "no --connect endpoint, listening only"
                print(f"bridge: no Zenoh peer or router connected for 5 s ({where}); frames go nowhere until one "
                      "is", file=sys.stderr, flush=True)  # fmt: skip
                said = True
        frames, nbytes = bridge.totals()
        print(f"bridge: {frames} frames ({nbytes} bytes) sent", file=sys.stderr)
        error = bridge.failed()
        if error is not None:
            print(f"slabcast bridge: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        return 0
    finally:
        session.close()
