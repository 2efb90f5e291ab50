"""The publisher's rules as a state object with no socket, thread or clock: grants, the carry, batching notices.

:class:`~slabcast.Publisher` copies frames into shared memory and sends what this
object says to send; every decision about *when* is taken here, from the events it is
given (a GRANT or CARRY came, a frame was placed, a PUBLISHED went out) and the ``now`` it
is handed, so that ``tests/unit/test_publisher_state.py`` checks them in microseconds.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

__all__ = ["AT_ONCE", "BATCH", "BATCHED", "BATCH_DELAY", "FULL", "OPENED", "SPORADIC", "SWITCH_DELAY", "Batch",
           "PublisherState"]

# Notice batching: a write less than SPORADIC seconds after the previous notice joins a
# batch (one NOTICE) sent when it holds BATCH frames or is BATCH_DELAY old.
# Sporadic writers (every frame later than that) keep one immediate NOTICE each: no delay.
SPORADIC = 50e-6
BATCH = 64
BATCH_DELAY = 0.5e-3
# A slab change's PUBLISHED (the broker grants the next slab when it hears it; the publisher holds another) goes
# SWITCH_DELAY after the slab's first frame, unless something else is sent first or the next slab change comes
# sooner.  The broker's turn and the GRANT back wake three threads on two CPUs: kept off the frames around a slab
# change, whose subscribers are busy with their own slab change (docs/benchmarks.md: 0.5 ms after it, the two frames
# that followed at 1 kHz took 55-100 us instead of 33-37; 2 ms after, neither).
SWITCH_DELAY = 2e-3

# What to do with a frame just placed (PublisherState.place):
AT_ONCE = 0  # send the batch if any, then this frame's NOTICE (and PUBLISHED when the broker wants it)
OPENED = 1  # it opened a batch: wake the flusher, which sends it within BATCH_DELAY if no write fills it
BATCHED = 2  # it joined the batch
FULL = 3  # it filled the batch: send it now


class Batch(NamedTuple):
    """What to send for the batched frames: their NOTICE's fields (if not sent yet), then a PUBLISHED."""

    notice: tuple[int, int, int | tuple[int, ...], float | tuple[float, ...]] | None  # (index, offset, ns, t0s)


class PublisherState:
    """Where the publisher writes, which slabs it was granted, what it carries, and what it has not sent yet.

    Parameters
    ----------
    reserve : int
        Bytes at the start of each slab for the carried part (the most that can be carried).
    carry : int
        Bytes of the old slab's tail to copy into each new slab, as the broker said in OPENED.
    frame_cap : int
        The most frames written into one slab (``notices_per_slab``: then at most a pool's worth of
        descriptors lie ahead of a block subscriber, fewer than the ring holds).
    sample_bytes : int
        Bytes per sample (all channels).
    """

    def __init__(self, reserve: int, carry: int, frame_cap: int, sample_bytes: int) -> None:
        self.reserve = reserve
        self.sample_bytes = sample_bytes
        self.frame_cap = frame_cap
        self.grants: deque[int] = deque()  # slabs granted and not written yet, in the broker's order
        self.carry = min(int(carry), reserve)  # bytes of the old slab's tail to copy into each new one
        self.slab_carry = 0  # what was carried into the slab being written
        self.slab_data = 0  # byte where the slab being written starts its frames (after the carried part)
        self.offset = 0  # byte where the next frame goes
        self.end = 0  # byte just past the slab being written; 0: no slab yet
        self.slab_frames = 0  # frames written into the slab being written
        self.switch_unsent = False  # a slab change in the ring whose PUBLISHED has not gone to the broker yet
        self.unsent_since = 0.0  # when that slab change's first frame went into the ring (time.monotonic)
        self.fresh = False  # a slab change whose first frame is not in the ring yet (nothing to announce)
        self.carried_due: int | None = None  # a CARRIED to send right after that PUBLISHED
        self.last_send = 0.0  # when the last notice went out
        # The batch: frames placed whose NOTICE (for `unnoticed` of them) is not sent yet.
        self.pend_index = 0
        self.pend_offset = 0
        self.pend_n: list[int] = []
        self.pend_t: list[float] = []
        self.unnoticed = 0

    # ------------------------------------------------------------ slabs

    def contiguous(self, offset: int | None = None) -> int:
        """Bytes of stream that lie contiguously just before the write position (or ``offset`` in the slab
        being written): what it carried in, then what was written since."""
        at = self.offset if offset is None else offset
        return max(0, at - (self.slab_data - self.slab_carry)) if self.end else 0

    def needs_slab(self, nbytes: int) -> bool:
        """Whether a frame of ``nbytes`` must go to a new slab: it does not fit, or this slab had its frames
        (a hard bound, whatever the carry: a block subscriber is never lapped in the ring, and a version-2
        subscriber's notice queue holds a whole pool's notices)."""
        return self.offset + nbytes > self.end or self.slab_frames >= self.frame_cap

    def switch(self, start: int, slab_bytes: int) -> int:
        """Start writing the slab at byte ``start``; return the bytes of the old slab's tail to carry into it
        (0 for the first slab), which the caller copies to just before the returned data start.

        At most what lies contiguously before the write position: never bytes of another slab or of
        nothing (the first slab, a slab left early, a carry raised since the slab began).  What is carried
        grows slab by slab until it reaches ``carry``, from the same first index on, so every chunk a
        subscriber can be cutting still lies in one slab (the NOTICE's ``floor`` says where it starts).
        """
        carry = min(self.carry, self.contiguous())
        self.slab_carry = carry
        self.slab_frames = 0
        self.fresh = bool(self.end)  # (the first slab is no change); announced once its first frame is published
        self.slab_data = start + self.reserve
        self.end = start + slab_bytes
        return carry

    def deferred(self) -> bool:
        """Whether a slab change not told yet may go to the broker with the next one: while two or more granted
        slabs are left (the broker grants up to three ahead to a publisher whose slabs change fast, and hears of
        both changes in one message, while the publisher still holds a slab until its GRANT comes) and no CARRIED
        waits for it."""
        return len(self.grants) >= 2 and self.carried_due is None

    def switch_left(self, now: float) -> float:
        """Seconds from ``now`` until the last slab change is due to the broker: SWITCH_DELAY after its first
        frame, at once (0) when no granted slab is left (the publisher would wait for the GRANT it brings),
        never (infinity) while it is :meth:`deferred`."""
        if not self.grants:
            return 0.0
        if self.deferred():
            return math.inf
        return max(0.0, self.unsent_since + SWITCH_DELAY - now)

    def tell_at_switch(self) -> bool:
        """Whether a slab change not told yet goes to the broker before the publisher starts the next slab
        (at the latest then, unless :meth:`deferred`)."""
        return self.switch_unsent and not self.deferred()

    def switch_due(self, now: float) -> bool:
        """Whether a slab change waits to be told to the broker and is due at ``now`` (:meth:`switch_left`)."""
        # (switch_left inlined: a fast writer asks at every frame while a change is untold, deferred mostly)
        grants = self.grants
        return self.switch_unsent and (not grants or (
            (len(grants) < 2 or self.carried_due is not None) and now >= self.unsent_since + SWITCH_DELAY))

    def first_frame(self, now: float) -> None:
        """The first frame of the slab started last is in the ring (its position stored) at ``now``: the change
        is due to the broker now.  Not before: the broker reads the ring, and a PUBLISHED sent between the
        switch and that store (the background thread may take the GIL there) would announce nothing."""
        self.fresh = False
        self.unsent_since = now  # (first: the background thread may look between the two, without the lock)
        self.switch_unsent = True

    def place(self, index: int, offset: int, n: int, nbytes: int, t0: float, now: float, jump: bool = False) -> int:
        """A frame of ``n`` samples (``nbytes``) starting at stream ``index`` was written at byte ``offset``
        at ``now``; ``jump``: the stream jumps before it.  Return what to send: AT_ONCE, OPENED, BATCHED
        or FULL (one call per write: this is the publisher's hot path)."""
        self.offset = offset + nbytes
        pend_n = self.pend_n
        if jump or (not pend_n and now - self.last_send >= SPORADIC):
            return AT_ONCE  # a jump, or a sporadic writer (nothing batched): no delay, no thread to wake
        if not pend_n:
            self.pend_offset = offset
            self.pend_index = index
        pend_n.append(n)
        self.pend_t.append(t0)
        self.unnoticed += 1
        if len(pend_n) >= BATCH:
            return FULL
        return OPENED if len(pend_n) == 1 else BATCHED

    # ------------------------------------------------------------ the carry

    def on_carry(self, nbytes: int) -> int | None:
        """The broker asked for a new carry (from the next slab on): the CARRIED to send now, or None.

        Confirmed at once, unless a slab change made with the old carry has not reached the broker
        yet: then right after its PUBLISHED (see :meth:`frame_sent`), so that a subscriber the broker
        starts on this confirmation never meets a slab change that carried less than it needs.
        """
        self.carry = min(nbytes, self.reserve)
        if self.switch_unsent or self.fresh:
            self.carried_due = self.carry
            return None
        return self.carry

    def frame_sent(self) -> int | None:
        """A PUBLISHED went to the broker: a slab change before it is known there.  The CARRIED now due,
        if any, to send right after it."""
        self.switch_unsent = False
        if self.fresh:
            return None  # (a change not in the ring yet: the CARRIED waits for the PUBLISHED after its frame)
        due = self.carried_due
        self.carried_due = None
        return due

    # ------------------------------------------------------------ batching

    def take_batch(self, now: float) -> Batch | None:
        """Empty the batch: what to send for it (None if empty).  ``now``: when its notice goes out."""
        ns, ts = self.pend_n, self.pend_t
        if not ns:
            return None
        notice: tuple[int, int, int | tuple[int, ...], float | tuple[float, ...]] | None = None
        if self.unnoticed:
            k = len(ns) - self.unnoticed
            before = sum(ns[:k])
            index, offset = self.pend_index + before, self.pend_offset + before * self.sample_bytes
            if self.unnoticed == 1:
                notice = (index, offset, ns[-1], ts[-1])
            else:
                notice = (index, offset, tuple(ns[k:]), tuple(ts[k:]))
            self.unnoticed = 0
            self.last_send = now
        self.pend_n = []
        self.pend_t = []
        return Batch(notice)
