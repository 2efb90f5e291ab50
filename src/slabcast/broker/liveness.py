"""Whether a client still lives, and which lossless subscribers have kept their publisher waiting too long."""

from __future__ import annotations

import contextlib
import logging

from ..core.shm import PUBLISHER_BYTE
from ..wire import protocol as P
from .model import Client, LocalSub, Stream
from .system import System

__all__ = ["REMOTE_SILENCE", "alive", "stalled"]

log = logging.getLogger("slabcast.broker")

REMOTE_SILENCE = P.REMOTE_SILENCE  # seconds without a message (clients ping every second): a TCP client dropped


def alive(client: Client, now: float, system: System, draining: list[Stream]) -> bool:
    """Whether a client still lives: by the lock it holds on its stream's segment when it has one (true
    in any PID namespace), by its silence over TCP, else by its pid."""
    if client.remote:
        return now - client.last_seen <= REMOTE_SILENCE
    live = client.live
    if live is None and client.stream is not None and client.stream.frames:
        live = (client.stream, PUBLISHER_BYTE)  # a publisher holds it from before its first frame
    if live is not None:
        stream, byte = live
        if not stream.ended or stream in draining:
            with contextlib.suppress(OSError):
                return system.lock_held(stream.segment.fd, byte)
    if client.role == "ctl":
        return True  # holds nothing; it says BYE
    return client.local_pid <= 0 or system.pid_alive(client.local_pid)


def stalled(stream: Stream, now: float, lease_timeout: float) -> list[LocalSub]:
    """The lossless local subscribers whose cursor has kept the publisher without a slab longer than
    ``lease_timeout`` (logged: the caller evicts them); times the others' stalls, and the stream's hold
    (``Stream.held_since``) however those cursors move meanwhile.  A publisher is held back only once its head
    stops: one with no slab granted ahead still writes the room left in its current slab (a newcomer's status said
    "held back 2.4 s" of a source writing 48,000 samples a second), timed from the head's last move seen.  (Room
    left in its slab says nothing: a slab also ends at its frame cap, and a frame may be larger than any before;
    an idle publisher with no slab granted counts as held, as it may be.)"""
    moved = stream.head != stream.head_seen
    if moved:
        stream.head_seen, stream.head_moved = stream.head, now
    if stream.publisher is None or stream.pool.granted or moved:
        for sub in stream.subs:
            if isinstance(sub, LocalSub):
                sub.stalled_since = None
        stream.held_since = None
        return []
    floor = stream.floor_index()
    if floor is None or stream.pool.gated(floor) is None:
        stream.held_since = None
        return []
    out = []
    for sub in stream.subs:
        if not isinstance(sub, LocalSub) or sub.policy != "block" or sub.cursor != floor:
            continue
        if stream.held_since is None:
            stream.held_since = stream.head_moved
        if sub.stalled_since is None:
            sub.stalled_since = stream.head_moved
        elif now - sub.stalled_since > lease_timeout:
            # Chunks it holds stay intact (its lease locks); only its claim on unread frames ends.
            log.warning(
                "evicting %s (pid %d) from %r: it kept the publisher waiting %.1f s > lease_timeout %.1f s",
                sub.client.label, sub.client.pid, stream.name, now - sub.stalled_since, lease_timeout,
            )  # fmt: skip
            out.append(sub)
    return out
