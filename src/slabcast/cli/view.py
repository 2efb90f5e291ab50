"""``slabcast view``: serve a live view of the broker's streams to a browser (the ``view`` extra)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import secrets
import socket
import sys
import webbrowser
from collections.abc import Iterator

from .._exceptions import SlabcastError

__all__ = ["add_arguments", "run"]

_CURVE_HELP = "for a tcp:// address: this client's secret key file and the broker's public key file (keygen)"


def _port(text: str) -> int:
    """A TCP port for argparse: 0..65535 (0: any free one), else a usage error that says so."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 0 to 65535, got {text!r}")
    return port


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the command's options."""
    p.add_argument("--address", default=None, help="the broker (default: $SLABCAST_ADDRESS or per-user)")
    p.add_argument("--curve", nargs=2, metavar=("CLIENT_SECRET", "BROKER_PUBLIC"), default=None, help=_CURVE_HELP)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=_port, default=8765, help="TCP port (default 8765; 0: any free port)")
    p.add_argument("--token", default=None,
                   help="require this token on every request (?token=...; default: a new one, printed in the URL)")
    p.add_argument("--no-token", action="store_true",
                   help="no token, on a loopback --host only (a machine whose every local user may see the streams)")
    p.add_argument("--seconds", type=float, default=10.0, help="window length: the longest span shown (default 10)")
    p.add_argument("--stream", action="append", default=[], metavar="NAME[=CH,CH]",
                   help="draw this stream on page load, optionally only these channels (repeatable; default: "
                        "every stream as it appears)")  # fmt: skip
    p.add_argument(
        "--channels", default=None, metavar="CH,CH", help="channel names to draw for --stream options that name none"
    )
    p.add_argument(
        "--method",
        choices=["numpy", "tsdownsample"],
        default="numpy",
        help="min/max envelope implementation (tsdownsample: the display extra)",
    )
    p.add_argument("--open", action="store_true", help="open the page in the default browser")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _preselect(streams: list[str], channels: str | None) -> dict[str, list[str] | None]:
    default = [c for c in channels.split(",") if c] if channels else None
    out: dict[str, list[str] | None] = {}
    for spec in streams:
        name, sep, chans = spec.partition("=")  # "=" is never in a stream name; ":" can be
        if not name:
            raise ValueError(f"--stream needs a stream name, got {spec!r}")
        out[name] = [c for c in chans.split(",") if c] if sep else default
    return out


def _reachable_name() -> str:
    """For a wildcard bind: this host's first non-loopback address, else its name."""
    name = socket.gethostname()
    with contextlib.suppress(OSError):
        for ip in socket.gethostbyname_ex(name)[2]:
            if not ip.startswith("127."):
                return ip
    return name


def run(args: argparse.Namespace) -> int:
    """Run the command until SIGINT/SIGTERM; return the exit code."""
    try:
        import uvicorn

        from ..view.app import ViewConfig, create_app
    except ImportError as exc:
        print(f"slabcast view: needs the view extra: pip install 'slabcast[view]' ({exc})", file=sys.stderr)
        return 2
    from ..client.control import broker_status

    if not 0 < args.seconds < float("inf"):
        print(f"slabcast view: --seconds must be a positive number, got {args.seconds}", file=sys.stderr)
        return 2
    if args.method == "tsdownsample":
        try:
            import tsdownsample  # noqa: F401
        except ImportError:
            print("slabcast view: --method tsdownsample needs pip install 'slabcast[display]'", file=sys.stderr)
            return 2
    curve = (args.curve[0], args.curve[1]) if args.curve else None
    try:
        preselect = _preselect(args.stream, args.channels)
        status = broker_status(args.address, timeout=3.0, curve=curve)
    except ValueError as exc:
        print(f"slabcast view: {exc}", file=sys.stderr)
        return 2
    except SlabcastError as exc:
        print(f"slabcast view: {exc}", file=sys.stderr)
        return 1
    loopback = _is_loopback(args.host)
    if args.no_token and (args.token or not loopback):
        print("slabcast view: --no-token is for a loopback --host without --token", file=sys.stderr)
        return 2
    # A token even on loopback: other users of this machine must not read, through the view, streams whose
    # shared memory they cannot open (mode 600).
    token = None if args.no_token else (args.token or secrets.token_urlsafe(18))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as exc:
        print(f"slabcast view: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    shown = args.host if args.host not in ("0.0.0.0", "::", "") else _reachable_name()
    if ":" in shown:
        shown = f"[{shown}]"
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")

    config = ViewConfig(address=args.address, seconds=float(args.seconds), curve=curve, token=token,
                        loopback=loopback, preselect=preselect, method=args.method)  # fmt: skip
    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    # SIGTERM/SIGINT asked for the clean stop that just happened: exit 0, as slabcast's other
                    # commands do, instead of uvicorn raising the signal again (exit -15/130).
                    getattr(self, "_captured_signals", []).clear()

    server = _Server(
        uvicorn.Config(
            create_app(config),
            log_level=args.log_level.lower(),
            access_log=False,
            # The sans-io websocket protocol where this uvicorn has it (the legacy one is deprecated by websockets).
            ws="websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "auto",
            lifespan="on",
            ws_per_message_deflate=False,  # float32 envelopes barely compress: deflate cost more CPU than all else
            timeout_graceful_shutdown=2,
        )
    )
    # The socket listens already: a browser started on this line is queued until uvicorn accepts it.
    print(f"slabcast view: serving {url} (broker {status['address']})", flush=True)
    if args.open:
        webbrowser.open(url)
    server.run(sockets=[sock])
    print("slabcast view: stopped", file=sys.stderr)
    return 0
