"""What ``slabcast status`` and STATS show of a stream and its subscribers, as plain data."""

from __future__ import annotations

from typing import Any

from .model import BrokerCutSub, LocalSub, Stream

__all__ = ["publisher_status", "statistics", "stats_reply", "stream_status", "subscriber_status"]


def statistics(stream: Stream) -> dict[str, Any]:
    """A stream's counters and rolling statistics (STATS_REPLY, and the status' ``statistics``)."""
    out: dict[str, Any] = {"name": stream.name, "samples": stream.head, "frames": stream.frames,
                           "window_seconds": stream.stats.window}  # fmt: skip
    return stream.statistics(out)


def stats_reply(stream: Stream) -> dict[str, Any]:
    """What STATS_REPLY says of a stream: its statistics and each subscriber's counters."""
    stats = statistics(stream)
    stats["subscribers"] = [
        {"label": u.client.label, "pid": u.client.pid, "delivered": u.delivered, "dropped": u.dropped,
         "overflows": u.overflows}
        for u in stream.subs
    ]  # fmt: skip
    return stats


def subscriber_status(stream: Stream, sub: LocalSub | BrokerCutSub) -> dict[str, Any]:
    """One subscription's row of the status."""
    # Lag: samples between the oldest one this subscriber is not done with and the newest.
    if isinstance(sub, BrokerCutSub):
        pending = sub.chunker.start if sub.chunker.start is not None else stream.head
        lag = stream.head - min(sub.starts.values(), default=pending)
        leases = len(sub.leases)
        backlog = len(sub.backlog)
    else:
        # Its cursor as last posted (in the ring's cursor table at each slab it starts, with its counters every
        # 0.4 s, in its ACKs): up to a slab or 0.4 s behind what it read.  Read before the ring (_on_status), never
        # ahead of the head; an ACK's may be (a version-2 subscriber's notices reach it before we read the ring).
        lag = max(0, stream.head - sub.cursor)
        leases = sub.held
        backlog = 0
    return {
        "label": sub.client.label,
        "pid": sub.client.pid,
        "size": sub.size,
        "clip": sub.clip,
        "policy": sub.policy,
        "cut": sub.cut,
        "seq": sub.seq,
        "delivered": sub.delivered,
        "dropped": sub.dropped,
        "leases": leases,
        "lag_samples": lag,
        "lag_seconds": lag / stream.rate if stream.rate else None,
        "backlog": backlog,
        "overflows": sub.overflows,
    }


def publisher_status(s: Stream, now: float | None) -> dict[str, Any] | None:
    """The stream's publisher: who, and since when (seconds, as of the broker's last sweep: every 0.5 s) no slab was
    left for it while the cursor of ``held_back_by``, the ``block`` subscriber furthest behind, held the oldest
    back (None: not held back)."""
    pub = s.publisher
    if pub is None:
        return None
    stalls = [(u.stalled_since, u.client.label) for u in s.subs
              if isinstance(u, LocalSub) and u.stalled_since is not None]  # fmt: skip
    if not stalls or now is None or s.pool.granted:
        return {"label": pub.label, "pid": pub.pid, "held_back_s": None, "held_back_by": None}
    since, by = min(stalls)
    since = since if s.held_since is None else min(since, s.held_since)  # (the hold, not the cursor's last move)
    return {"label": pub.label, "pid": pub.pid, "held_back_s": max(0.0, now - since), "held_back_by": by}


def stream_status(s: Stream, now: float | None = None) -> dict[str, Any]:
    """One stream's row of the status (its subscribers' cursors as last read: :meth:`Stream.read_cursors`, before the
    ring, so that no cursor is ahead of the head); ``now``: the broker's clock, for how long its publisher has been
    held back."""
    return {
        "name": s.name,
        "dtype": s.dtype.str,
        "channels": s.channels,
        "rate": s.rate,
        "samples": s.head,
        "frames": s.frames,
        "ended": s.ended,
        "slabs": s.nslabs,
        "slab_bytes": s.slab_bytes,
        "max_chunk_bytes": s.reserve,
        "carried_bytes": s.committed,
        "shm_bytes": s.segment.allocated,
        "slabs_free": len(s.pool.free),
        "statistics": statistics(s),
        "channel_names": s.channel_names,
        **s.meta,
        "subscribers": [subscriber_status(s, u) for u in s.subs],
        "publisher": publisher_status(s, now),
    }
