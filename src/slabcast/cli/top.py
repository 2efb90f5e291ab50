"""``slabcast top``: the broker's status refreshed in the terminal (rates, lag bars, drops highlighted)."""

from __future__ import annotations

import contextlib
import curses
import sys
import time
from typing import Any

import numpy as np

from .._exceptions import SlabcastError
from ..client.control import broker_status

__all__ = ["render", "run_top", "source_line"]

_BAR = 16


def _bar(fraction: float) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * _BAR)
    return "[" + "#" * filled + "." * (_BAR - filled) + "]"


_TROUBLE = ("waiting", "reconnecting", "blocked", "failed")


_HOW = {"died": "died: its leases reclaimed", "silent": "went silent over TCP: dropped as dead",
        "evicted": "evicted (it stalled the stream past the lease timeout)"}


def departed_line(d: dict[str, Any]) -> str:
    """A client that left without BYE in the last minute (the status's ``departed``), as ``status`` and ``top``
    show it: who, of which stream, how, how long ago."""
    of = f" of {d['stream']!r}" if d["stream"] else ""
    return f"{d['label']} pid {d['pid']} ({d['role']}{of}) {_HOW.get(d['how'], d['how'])}, {d['ago']:.1f} s ago"


def source_line(src: dict[str, Any]) -> str:
    """One hosted source, as ``status`` and ``top`` show it: its state, reconnects, samples discarded
    (written while nobody subscribed) and the age of its last sample."""
    age = src.get("last_sample_age")
    last = "no sample yet" if age is None else f"last sample {age:.1f} s ago"
    line = (f"{src['name']} ({src['kind']}): {src['state']}, reconnects {src['reconnects']}, "
            f"discarded {src.get('discarded_samples', 0)} samples, {last}")  # fmt: skip
    if src.get("refused_frames"):
        line += f", {src['refused_frames']} frames refused"
    if src.get("error"):
        line += f" ({src['error']})"
    return line


def _troubled(src: dict[str, Any]) -> bool:
    return bool(src["state"] in _TROUBLE or src.get("discarded_samples") or src.get("error"))


def render(status: dict[str, Any], previous: dict[str, Any] | None, dt: float) -> list[tuple[str, bool]]:
    """Return the screen as ``(line, highlight)`` pairs; ``highlight`` marks subscribers that dropped chunks."""
    lines = [
        (
            f"slabcast top - broker {status['pid']} v{status.get('version', '?')} at {status['address']}"
            f" - up {status['uptime']:.0f} s - {status.get('clients', 0)} clients - q quits",
            False,
        ),
        ("", False),
    ]
    before = {s["name"]: s for s in (previous or {}).get("streams", [])}
    sources = {src["name"]: src for src in status.get("sources", [])}
    for s in status["streams"]:
        old = before.get(s["name"])
        # (the first screen has no earlier count to take the rate from: "-", not 0)
        observed = f"{(s['samples'] - old['samples']) / dt:>10.0f}" if old and dt > 0 else f"{'-':>10}"
        nominal = f"{s['rate']:.12g} Hz" if s["rate"] else "no rate"
        state = " ENDED" if s["ended"] else ""
        held = (s.get("publisher") or {}).get("held_back_s")
        if held is not None:
            state += f"  HELD BACK {held:.1f} s by {s['publisher']['held_back_by']}"
        lines.append(
            (
                f"{s['name']:<16} {s['dtype']} x {s['channels']:<3} {nominal:>10}  observed {observed}/s  "
                f"{s['samples']:>12} samples  slabs free {s['slabs_free']}/{s['slabs']}{state}",
                False,
            )
        )
        src = sources.pop(s["name"], None)
        if src is not None:
            lines.append((f"  source {source_line(src)}", _troubled(src)))
        lines.append(
            (
                f"  {'subscriber':<22} {'pid':>7} {'size':>8} clip {'policy':<6} {'delivered':>9} {'dropped':>8} "
                f"{'leases':>6}  lag",
                False,
            )
        )
        # The bar: how much of the pool a subscriber's lag takes; full, a block subscriber holds the publisher
        # back and a drop one loses chunks (it was the lag against two chunks: always full on a fast stream).
        room = s["slab_bytes"] - s.get("max_chunk_bytes", 0)
        pool = s["slabs"] * (room if room > 0 else s["slab_bytes"]) // (np.dtype(s["dtype"]).itemsize * s["channels"])
        for u in s["subscribers"]:
            lag_s = u.get("lag_seconds")
            lag = f"{lag_s:6.2f} s" if lag_s is not None else f"{u['lag_samples']} samples"
            fraction = u["lag_samples"] / pool if pool else 0.0  # (full: the lag fills the pool)
            lines.append(
                (
                    f"  {u['label'][:22]:<22} {u['pid']:>7} {u['size']:>8} {'yes' if u['clip'] else 'no ':<4} "
                    f"{u['policy']:<6} {u['delivered']:>9} {u['dropped']:>8} {u['leases']:>6}  {_bar(fraction)} {lag}",
                    u["dropped"] > 0,
                )
            )
        lines.append(("", False))
    live = {s["name"] for s in status["streams"]}
    for s in status.get("ended_streams", []):  # (gone from the broker; as each was at its end, for a minute)
        if s["name"] not in live:
            lines.append((f"{s['name']:<16} ended ({s['end']}) {s['ended_ago']:.0f} s ago after {s['samples']} samples "
                          f"in {s['frames']} frames", False))  # fmt: skip
    for d in status.get("departed", []):  # (left without BYE in the last minute: highlighted)
        lines.append((departed_line(d), True))
    for src in sources.values():  # no stream yet (waiting for its device) or refused
        lines.append((f"source {source_line(src)}", _troubled(src)))
    if not status["streams"] and not status.get("ended_streams"):
        lines.append(("no streams", False))
    return lines


def run_top(address: str | None, interval: float = 0.5, curve: tuple[str, str] | None = None) -> int:
    """Show the status until ``q`` or Ctrl-C; return the exit code."""

    def loop(screen: Any) -> None:
        curses.curs_set(0)
        screen.nodelay(True)
        curses.use_default_colors()
        previous: dict[str, Any] | None = None
        last = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                status = broker_status(address, timeout=2.0, curve=curve)
                lines = render(status, previous, now - last)
                previous, last = status, now
            except SlabcastError as exc:
                lines = [(f"slabcast top - no broker: {exc}", True), ("retrying; q quits", False)]
                previous = None
            screen.erase()
            height, width = screen.getmaxyx()
            for y, (text, highlight) in enumerate(lines[: height - 1]):
                screen.addnstr(y, 0, text, width - 1, curses.A_REVERSE if highlight else curses.A_NORMAL)
            screen.refresh()
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline:
                key = screen.getch()
                if key in (ord("q"), ord("Q")):
                    return
                curses.napms(20)

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("slabcast top: needs a terminal (stdin and stdout); use 'slabcast status' (--json) in scripts",
              file=sys.stderr)  # fmt: skip
        return 2
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C quits as cleanly as q
        curses.wrapper(loop)
    return 0
