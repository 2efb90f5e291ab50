"""Slabs for the publisher: what the broker grants ahead, and whom it asks for ACKs when it cannot.

The broker frees a slab once no cursor, lease or pin holds it (:class:`~slabcast.core.pool.SlabPool`) and
grants it to the stream's publisher ahead of use (protocol 9.3).  When the pool cannot keep the publisher
supplied, it asks the subscriber whose cursor holds the oldest slab back to ACK once its cursor passes a
point (``ack_at``), or every subscriber, through the ring's header (protocol 7.9): one wake-up for a batch of
slabs.  Part of :class:`~slabcast.broker.state.BrokerState`'s decisions, with no socket: it returns the slabs
to grant.
"""

from __future__ import annotations

import logging

from ..core.ring import barrier
from ..wire import protocol as P
from .model import LocalSub, Stream

__all__ = ["ack_at", "ack_holder", "grant"]

log = logging.getLogger("slabcast.broker")

# Slabs granted ahead (protocol 9.3): P.GRANT_AHEAD (fewer: the broker asks for ACKs), or one more while a
# publisher's slabs change faster than every P.FAST_SLAB seconds, where a slab holds less than that of stream, in a
# pool of P.FAST_POOL slabs or more (Stream.may_be_fast); it then tells about every other change, which halves the
# broker's wake-ups (each about 70 us of its CPU beyond its handlers, flat out), at the cost of one slab of
# history and of a lagging drop subscriber's lead: less than P.FAST_SLAB seconds of stream (history_nslabs counts
# it).

_RETARGETS = 3  # subscribers asked for ACKs one after the other in one decision at most, then everyone


def ack_holder(stream: Stream) -> LocalSub | None:
    """The subscriber whose cursor holds the oldest slab back (the lowest of the lossless ones and of those still
    reading their history), when that is what keeps the publisher short of slabs (the cursors as posted now) and it
    has a cursor table entry: the one to ask for ACKs; None: ask every subscriber (a free slab a reader's lease
    still locks, or a holder with no entry, which ACKs anyway)."""
    if stream.pool.free:
        return None
    low = stream.floor_sub()
    if low is None or low.sleeper is None or not low.tag:
        return None
    return low


def ack_at(stream: Stream, holder: LocalSub | None, ahead: int) -> int:
    """From which cursor (an absolute stream index) the subscriber asked for ACKs (``holder``) sends one: the end
    of the retired slab whose freeing gives the publisher ``ahead`` granted slabs, of those cursors hold back (not
    pinned), while the publisher's slabs change fast (:meth:`Stream.fast`; else the oldest's); a ``drop`` one
    reading its history holds nothing back from its history's end (``gate``) on: at most that.  One ACK then
    brings a batch of slabs, not one: the broker wakes once for them (a receive window reopened by a good part,
    not by every byte freed).  0 (at once) when every subscriber is asked (a reader's lease may be what holds a
    slab) or every retired slab is pinned."""
    if holder is None:
        return 0
    pool = stream.pool
    lacking = ahead - len(pool.granted) if ahead > P.GRANT_AHEAD else 1
    ends = [end for slab, end in pool.retired.items() if not pool.pins[slab]]
    if not ends or lacking <= 0:
        return 0
    at = ends[min(lacking, len(ends)) - 1]
    return at if holder.policy == "block" else min(at, holder.gate)


def grant(stream: Stream, now: float) -> list[int]:
    """The slabs to grant ``stream``'s publisher now (the caller sends a GRANT for each, in order): the pool
    advanced to the lowest cursor, up to P.GRANT_AHEAD (or P.GRANT_AHEAD_FAST, :meth:`Stream.fast` at ``now``)
    granted ahead; when that leaves the publisher short, whom to ask for ACKs and from where, in the ring's
    header (the handshake of protocol 7.9).  Granted slabs lose their kept frames, and the carried room a
    shrunk pool may give back goes."""
    pool = stream.pool
    pool.advance(stream.floor_index())
    ahead = P.GRANT_AHEAD_FAST if stream.fast(now) else P.GRANT_AHEAD
    granted = pool.grant(ahead)
    ring = stream.ring
    short = len(pool.granted) < P.GRANT_AHEAD
    holder = ack_holder(stream) if short else None
    target = None if holder is None else holder.sleeper
    at = ack_at(stream, holder, ahead)
    if not short:
        if ring.acks_wanted:
            ring.want_acks(False)  # supplied: nobody need ACK
    elif not ring.acks_wanted or target != ring.ack_target or at != ring.ack_at:
        # Short of slabs: the subscriber whose cursor holds the oldest slab back (or every subscriber that
        # posts its cursor in the ring) sends ACK too when it moves, until the publisher holds its slabs
        # again.  Whom we ask, the flag, a barrier, the cursors again (core/ring.py): the subscriber asked
        # either saw it or posted a cursor read here.  If that shows another one holding the slab back, ask
        # that one the same way; after a few, everyone.
        for turn in range(_RETARGETS + 1):
            ring.want_acks(True, target, at)
            barrier()
            pool.advance(stream.floor_index())
            granted += pool.grant(ahead)
            if len(pool.granted) >= P.GRANT_AHEAD:
                ring.want_acks(False)  # supplied again by this read: nobody need ACK
                break
            holder = ack_holder(stream) if turn < _RETARGETS - 1 else None
            asked, target = (target, at), (None if holder is None else holder.sleeper)
            at = ack_at(stream, holder, ahead)
            if (target, at) == asked:
                break
    if granted and stream.give_back and stream.peak > stream.first_committed:  # room it may give back
        freed = stream.shrink(granted)
        if freed:
            log.debug("stream %r: %d bytes of carried room given back", stream.name, freed)
    for slab in granted:
        stream.kept.pop(slab, None)  # written again: its frames are gone
    return granted
