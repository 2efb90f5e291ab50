"""The local (``ipc://``) transport of a subscriber, once attached (:mod:`slabcast.client._attach`): it reads the
frame descriptors the publisher writes into the segment's ring, cuts its own chunks with its own
:class:`~slabcast.core.rechunk.Rechunker` (sampler included, in this process), takes a kernel lease lock on the
slab of each chunk (once per slab, not per chunk), tells the broker how far it has read with one cumulative ACK
per slab, and waits for the ring's position by its strategy (doorbell, futex, spin).  Nothing any subscriber
does can slow the broker's loop for the others.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from .._exceptions import BrokerGoneError, SlabcastError
from .._info import StreamInfo
from ..core.geometry import Geometry
from ..core.rechunk import Rechunker
from ..core.ring import (
    CURSOR_SPAN,
    CURSOR_TAG_SHIFT,
    HOT,
    Ring,
    barrier,
    ring_layout,
    rows_of,
)
from ..wire import messages as M
from ..wire import protocol as P
from ._cutting import Cutting, _Frame, _frombuffer, _Gap, _Ready, _ViewRef
from ._leases import Leases
from ._transport import Counts
from ._waiting import Waiting
from .chunk import Chunk
from .connection import Connection, error_for, unexpected

__all__ = ["LocalReceiver"]

log = logging.getLogger("slabcast.subscriber")
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_ACK_INTERVAL = 0.1  # seconds between ACKs that only refresh counters (a subscriber whose ACK is its cursor)
# ... for a subscriber that posts its cursor in the ring's table, while the publisher is not short of slabs (then
# its ACKs' cursors keep its stall timer from running out: --lease-timeout): within `slabcast top`'s refresh (0.5 s)
# with the wait before it (_LOOK).  Each ACK wakes the broker (some 270 us of its CPU in this VM): at 0.1 s, eight
# paced subscribers woke it 80 times a second.
_COUNTS_INTERVAL = 0.4
_LOOK = 0.1  # while waiting for frames, look at the broker connection this often (seconds)
# ... and while none came for a while (each empty wait doubles the next, up to this), unless an ACK is pending: an
# idle subscriber woke 10 times a second, 3.8 ms of CPU a second in this VM (a cold wake-up costs 380 us).  The
# broker wakes it when it ends the stream or evicts it; what no one can ring is the broker's kill -9, seen within
# this long by a subscriber waiting on an idle stream.
_LOOK_IDLE = 0.8
_READ = 4096  # the most descriptors taken from the ring at a time
_LOOK_GONE = 0.05  # between waits, look whether the broker connection dropped at most this often (seconds)
_LAZY_GIVE_BACK = 6  # pools of this many slabs or more: the lease of a slab left goes after its next chunk (_took)
# (each look is 20-40 us of a cold subscriber's CPU: its notice socket, its broker connection and the connection's
# monitor; at 10 ms, 1 kHz chunks cost 4-5 us more CPU each on average: subscriber_path.py, cpu_mean)


def _py_reader_runs(raw: bytes, noticed: int, hist_slab: int, hist_gen: int, hist_floor: int,
                    sample_bytes: int) -> tuple[list[Any], int]:  # fmt: skip
    """Descriptors copied from the ring, as a subscriber takes them: those before stream index ``noticed``
    skipped, a gap ``(noticed, index)`` before one past it (lapped: that frame is flagged a discontinuity), the
    floor of slab ``hist_slab``'s generation ``hist_gen`` lowered to ``hist_floor`` (the broker carried more
    into it for our history than its publisher did), and frames back to back in one slab (same slab, generation
    and end byte, no flag) grouped into runs ``[index, slab, gen, offset, ns, t0s, flags, floor, end]``.
    Returns them in order and the stream index past the last frame.  (core/_hot.c's ``reader_runs`` is this,
    compiled.)"""
    entries: list[Any] = []
    last: list[Any] | None = None
    for _seq, index, t0, offset, floor, n, slab, gen, flags in rows_of(raw):
        if index < noticed:
            continue  # before this subscription's start (told of in its history)
        if index > noticed:
            entries.append((noticed, index))
            flags |= P.FLAG_DISCONTINUITY
            last = None
        if slab == hist_slab and gen == hist_gen and hist_floor < floor:
            floor = hist_floor
        end = offset + n * sample_bytes
        if last is not None and not flags and slab == last[1] and gen == last[2] and offset == last[8]:
            last[4].append(n)  # the next frame of a run in one slab
            last[5].append(t0)
            last[8] = end
        else:
            last = [index, slab, gen, offset, [n], [t0], flags, floor, end]
            entries.append(last)
        noticed = index + n
    return entries, noticed


_reader_runs = _py_reader_runs if HOT is None else HOT.reader_runs


class LocalReceiver(Cutting, Waiting):
    """Cut this subscriber's chunks from the notices of one publisher, lease them, hand them out.

    Built by :func:`open_local` once the broker answered SUBSCRIBE; the rules of the end (a grace
    after the last notice, then the rest is lost) and of lost notices live here.
    """

    def __init__(
        self,
        conn: Connection,
        reply: M.Subscribed,
        info: StreamInfo,
        mm: Any,
        notices: Any,
        lock_fd: int,
        start: int,
        early_end: M.End | None,
        *,
        ring_seq: int = 0,
        sleeper: int | None = None,
        entry: int | None = None,
        tag: int = 0,
        futex_sleeper: bool = False,
        page: Any = None,
        wake: str = "doorbell",
        spin: float = 0.0,
        clip: bool,
        policy: str,
        max_inflight: int,
        partial_tail: bool,
        sampler: Callable[[], float] | None,
        where: str,
        history: list[M.History] | None = None,
    ) -> None:
        self.end: SlabcastError | None = None
        self.jumped = False  # the next chunk follows a jump (a broker restart, lost samples)
        self.size = reply.size
        self.start = start
        self.policy = policy
        self._conn = conn
        self._mm = mm
        self._notices = notices
        self._leases = Leases(lock_fd, mm)
        self._info = info
        self._name = info.name
        self._dtype = info.dtype
        self._channels = info.channels
        self._timestamps = info.timestamps
        self._where = where
        self._max_inflight = max_inflight
        self._partial_tail = partial_tail  # (until the end's partial chunk is cut)
        self._partial = partial_tail  # partial chunks at a discontinuity too
        self._sid, self._header, self._slab_bytes = reply.stream_id, reply.header_bytes, reply.slab_bytes
        self._nslabs, self._sample_bytes = reply.nslabs, reply.sample_bytes
        # (SUBSCRIBED does not say the slabs' reserve: where samples and their times lie does not depend on it.)
        self._geometry = Geometry(reply.nslabs, reply.slab_bytes, reply.sample_bytes, 0, info.timestamps)
        self._topic = P.stream_topic(info.name)
        self._sampler = sampler
        self._sampler_error: BaseException | None = None
        self._chunker = Rechunker(reply.size, clip, info.rate, self._checked_pause if sampler is not None else None)
        self._ready: deque[_Ready] = deque()
        self._frames: deque[_Frame | _Gap] = deque()  # unread frames: notices not yet cut
        self._seq = 0
        self._received = 0
        self._last_seq = -1
        self._dropped = 0
        self._noticed = start  # the stream index just past the last sample read from the ring (or history)
        offset, slots = ring_layout(mm)  # (protocol 7.7: the header says where the ring lies)
        self._ring = Ring(mm, offset, slots, sleepers=page)
        # The compiled look at the ring (core/_hot.c), for a subscriber that keeps up: recv's steps for a chunk in one
        # call. It does what this class's and Leases' methods do, not a subclass' own.
        self._reader = HOT.Reader(mm, offset, slots, Chunk, _ViewRef, _frombuffer) \
            if HOT is not None and isinstance(self._chunker, HOT.Rechunker) and type(self) is LocalReceiver \
            and type(self._leases) is Leases else None  # fmt: skip
        self._page = page
        self._rseq = ring_seq  # the next descriptor to read
        self._spin = spin  # seconds to spin before sleeping; < 0: never sleep
        self._futex = wake == "futex"
        # A futex subscriber that said ATTACH futex_sleeper sleeps with its byte (its cursor table entry's index) in
        # the futex sleeper table, as a doorbell's does: the broker does not count it in futex_waiters.
        self._futex_byte = entry if self._futex and futex_sleeper and tag and page is not None else None
        self._sleeper = sleeper  # our byte in the ring's sleeper table (doorbell); None: notices for every frame
        self._armed = False  # our sleeper byte is set
        self._arm_value = 0  # what we set it to (1..255): changed after we read or took a notice (core/ring.py)
        self._armed_rseq = -1  # the ring descriptor we had read up to when we chose it (-1: choose another)
        self._next_look = 0.0  # when to look at our sockets again, and whether the broker connection dropped
        self._look_now = True  # look at our sockets before the next wait (see recv)
        self._quiet = 0  # waits in a row that brought nothing (the next is longer: _LOOK_IDLE)
        self._quiet_at = -1  # the descriptor sequence at the last wait (_rseq): frames taken since end the quiet
        self._cursor = start
        self._cur_slab = -1
        self._acked = (-1, -1, -1, -1)  # (slab, dropped, held, delivered) at the last ACK
        # Our cursor table entry (core/ring.py), where we post our cursor instead of an ACK per slab; None: ACKs.
        self._entry = entry if tag else None
        self._tag = tag << CURSOR_TAG_SHIFT
        self._posted = -1  # the slab we were reading when we last told the broker our cursor (posted or ACK)
        self._posted_cursor = -1  # the cursor we last posted in the ring's cursor table
        self._give_back = False  # the slab we left: its lease goes when the chunk is released or at the next recv
        # (_took; pools of fewer slabs give it back at once: a consumer stalled on its chunk holds two slabs)
        self._lazy_give_back = self._nslabs >= _LAZY_GIVE_BACK
        self._acked_at = 0.0
        self._counts_due = 0.0  # when recv next looks whether counters are due (a subscriber behind never waits)
        self._direct_due = 0.0  # when recv next looks for the broker's messages before handing out a chunk
        self._stream_end: M.End | None = early_end  # its head: the samples in the stream
        self._last = (-1, 0, 0)  # (slab, gen, byte offset just past the last frame cut)
        self._rcvtimeo = -1
        self._on_dead = self._leases.on_dead
        self._on_release = self.on_release
        # History (frames written before we joined, as the broker described them): cut first, like notices.
        self._hist_floor = (-1, 0, 0)  # (slab, gen, floor) of its newest slab: the ring there may say less
        for h in history or ():
            if h.ns:
                self._frames.append(_Frame(h.index, h.slab, h.gen, h.offset, h.ns, h.t0s, 0, h.flags, h.floor))
                self._noticed = h.index + sum(h.ns)
                self._hist_floor = (h.slab, h.gen, h.floor)
            elif h.flags & P.FLAG_DISCONTINUITY:
                self.jumped = True  # none of the history asked for is left: the first chunk says so

    # ------------------------------------------------------------ opening

    def pollables(self) -> tuple[Any, ...]:
        return (self._notices, *self._conn.pollables())

    def keepalive(self, interval: float) -> None:
        """Nothing to say: a local subscriber's liveness is its lock, which the broker tests."""

    # ------------------------------------------------------------ receiving

    def recv(self, timeout: float | None) -> Chunk | None:
        self._disarm()
        if self._give_back:
            self._give_back = False
            self._leases.unlock_idle(self._cur_slab)  # the slab left with the last chunk handed out (_took)
        if self._leases.dead:
            self._leases.reap()
        now = time.monotonic()
        if now >= self._counts_due:
            # Counters and cursor for `slabcast status`, also for a subscriber behind, which never waits (they went
            # only before a wait or at a slab change: a slab of 11 s showed `delivered 0` for 11 s).
            self._send_ack()
        if now >= self._direct_due:
            # The broker's word (END evicted above all), also for a subscriber behind, which always has a chunk to
            # hand out and never waits: evicted, one that went on taking chunks kept leasing slabs, and held the
            # publisher back as before (a newcomer's, 30 s after its eviction).
            self._direct_due = now + _LOOK
            if self._conn.has_input():
                self._on_direct(self._conn.recv(0))
        if self.end is not None:
            raise self.end
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self._conn
        while True:
            if self._sampler_error is not None:
                exc, self._sampler_error = self._sampler_error, None
                raise exc
            if self._ready:
                return self._hand_out()
            if self._frames:
                self._step()
                continue
            reader = self._reader
            if reader is not None:
                # The next frame, when it is the only one and continues what we read, in one compiled call: the
                # chunk it completes in hand (the steps of _take_one, _cut_chunk and _hand_out), or what the
                # steps after the chunker's feed are to finish (_took), or nothing (core/_hot.c, take_chunk).
                got = reader.take_chunk(self)
                if got is not None:
                    if type(got) is not tuple:
                        return got  # type: ignore[no-any-return]
                    self._took(*got)
                    continue
            elif self._take_one():
                continue
            if self._read_ring():
                continue
            # Look at the sockets (notices to take, the broker's END or ERROR, its death) when recv must not
            # wait (an event loop polls them), after a wait that brought nothing (the broker wakes us to look),
            # and every _LOOK_GONE seconds while frames come; not before every wait (two system calls each).
            # The broker wakes a futex subscriber when it ends the stream or evicts it; a wait lasts at most
            # _LOOK seconds.
            now = time.monotonic()
            look = (timeout is not None and timeout <= 0) or self._look_now or now >= self._next_look
            if look and self._drain_notices():
                continue  # (a notice only says the position moved: look at the ring again)
            end = self._stream_end
            if end is not None:
                # Everything published is read: the ring is the whole stream (its END came before any death of the
                # broker: whatever became of the broker since, the stream is complete here).
                if self._cursor < end.head:
                    if self._partial_tail and self._cut_tail():
                        continue
                    self._lost(self._cursor, end.head)  # (only a drop subscriber lapped by the publisher)
                    continue
                if self._partial_tail and self._cut_tail():
                    continue
                self._send_ack(force=True)
                self.end = error_for(end, self._where)
                raise self.end
            if look:
                if conn.sock.getsockopt(_EVENTS) & _POLLIN:
                    self._on_direct(conn.recv(0))
                    continue
                if now >= self._next_look:
                    # (Only a look that asked puts the next one off: a caller polling faster than _LOOK_GONE,
                    # an event loop, would otherwise never ask.)
                    conn.poll_gone()  # (sets conn.gone)
                    self._next_look = now + _LOOK_GONE
                self._look_now = False
            if conn.gone:
                raise BrokerGoneError(f"the {conn.where} went away ({self._where})")
            # About to wait: give back every slab no chunk of ours is in (a paused drop subscriber must
            # not hold any), tell the broker where we are.  A block subscriber keeps the slab it reads:
            # its cursor holds that slab back anyway, and the next chunk needs no lock again.
            self._leases.unlock_idle(self._cur_slab if self.policy == "block" else -1, self._cur_slab)
            self._give_back = False
            self._send_ack(waiting=True)
            if deadline is None:
                left = math.inf
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    # Nothing yet: whoever waits on our notice socket now (an event loop, through pollables)
                    # is woken by the next publish, since our sleeper byte stays set until the next recv.
                    if self._arm() != self._rseq:
                        self._disarm()
                        continue
                    return None
            # How long: _LOOK, longer on a silent stream (each empty wait doubles the next, up to _LOOK_IDLE),
            # unless an ACK is pending (protocol 10.3) or the subscriber spins (busy: its look is all it waits for).
            if self._rseq != self._quiet_at:  # frames were taken since the last wait: the stream is not silent
                self._quiet, self._quiet_at = 0, self._rseq
            backs_off = self._spin >= 0 and self._ack_state() == self._acked  # (nothing for _send_ack to send)
            bound = min(max(_LOOK, _LOOK_IDLE), _LOOK * (1 << min(self._quiet, 10))) if backs_off else _LOOK
            if self._idle(min(left, bound)) == self._rseq:
                self._look_now = True  # woken with nothing to read: perhaps by the broker (END), or a timeout
                self._quiet += backs_off

    def _on_direct(self, msg: M.Message | None) -> None:
        """A message from the broker on our own connection: an END (evicted, shutdown) or an ERROR."""
        if msg is None or isinstance(msg, M.Synced):
            return
        if isinstance(msg, M.End) and msg.code in (P.END_CLOSED, P.END_PUBLISHER_GONE):
            # The stream ended: everything it published is in the ring; we finish reading it first.
            if self._stream_end is None:
                self._stream_end = msg
            return
        if isinstance(msg, M.End | M.Error):
            exc = error_for(msg, self._where)
            if isinstance(msg, M.End) and msg.code == P.END_BROKER_SHUTDOWN:
                raise exc  # BrokerGoneError: reconnect= may take over
            if isinstance(msg, M.End):
                self.end = exc
            raise exc
        raise unexpected(msg, "END or ERROR", self._where)

    def _take_one(self) -> bool:
        """A subscriber that keeps up, in one step: the one frame published since we last looked, when it
        continues what we read without a flag (in the same slab, or the first of the next with what we
        accumulated in its carried part), cut at once (no batch, no :class:`_Frame`).  False when that is not
        the case; nothing changed then, and :meth:`_read_ring` takes what there is.  (Without the compiled
        module; with it, ``Reader.take_chunk`` does this in one call.)"""
        descriptor = self._ring.read_one(self._rseq)
        if descriptor is None:
            return False
        _seq, index, t0, offset, floor, n, slab, gen, flags = descriptor
        pending = self._chunker.start
        if flags or index != self._noticed or (pending is not None and pending < floor):
            return False
        if slab != self._cur_slab and slab == self._hist_floor[0]:
            return False  # (the first frame of the slab our history ends in: its floor may be the broker's)
        self._took(index, n, t0, offset, slab, gen, self._chunker.feed(index, n, t0))
        return True

    def _took(self, index: int, n: int, t0: float, offset: int, slab: int, gen: int,
              chunks: list[tuple[int, int, float]]) -> None:  # fmt: skip
        """The rest of taking descriptor ``_rseq`` (the frame ``n`` samples from ``index`` at byte ``offset`` of
        ``slab``), once the chunker was fed it: ``chunks`` are what it completed."""
        if slab != self._cur_slab:
            # The first frame of a slab: what _step does there (what we accumulated lies in its carried part).
            # The lease of the slab we left goes when this chunk is released or at the next recv, off the chunk's
            # way (a system call of 13 us in a subscriber just woken), unless the broker is short of slabs or the
            # pool small: then at once.  Else the publisher holds granted slabs ahead, and the broker grants the
            # slabs freed longest ago first.
            self._cur_slab = slab
            if self._lazy_give_back and not self._ring.acks_wanted:
                self._give_back = True
            else:
                self._leases.unlock_idle(slab)
        self._rseq += 1
        self._noticed = index + n
        self._cut_fed(index, n, offset, slab, gen, chunks)
        if self._posted != slab:
            self._send_ack()

    def _read_ring(self) -> bool:
        """Take the frames published since we last looked (at most _READ descriptors); True if any."""
        ring = self._ring
        start = self._rseq
        position = ring.position
        if position == start:
            return False
        stop = min(position, start + _READ)
        raw = ring.read_bytes(start, stop)
        if raw is None:
            # Lapped: only a drop subscriber (a block subscriber holds back the slabs it has not read, and so
            # the descriptors).  Go on with the newest half of the ring; the samples in between are counted.
            self._rseq = ring.position - ring.slots // 2
            return True
        self._rseq = stop
        entries, self._noticed = _reader_runs(raw, self._noticed, *self._hist_floor, self._sample_bytes)
        frames = self._frames
        for e in entries:
            if len(e) == 2:
                frames.append(_Gap(*e))
            else:
                index, slab, gen, offset, ns, t0s, flags, floor, end = e
                frames.append(_Frame(index, slab, gen, offset, ns, t0s, 0, flags, floor, end))
        return True

    # ------------------------------------------------------------ the broker's copy of our counters

    def on_release(self) -> None:
        """A chunk was released: account for views already gone (the broker hears of freed slabs with our
        next ACK, and retries them itself)."""
        leases = self._leases
        if leases.dead:
            leases.reap()
        if self._give_back:  # (the slab left before this chunk's: in whatever thread released it, under the guard)
            self._give_back = False
            leases.unlock_idle(self._cur_slab)

    def _send_ack(self, force: bool = False, waiting: bool = False) -> None:
        """Tell the broker how far we have read when we left a slab or gave one back: in our cursor table entry
        (an ACK too while the broker asks for them), or by ACK at once; the counters ``slabcast status`` shows by
        ACK when the chunks held or dropped changed, else at most every ``_ACK_INTERVAL`` seconds.  Called at
        those moments and before every wait: a subscriber that stops calling ``recv`` is as fresh as its last
        call."""
        leases = self._leases
        state = self._ack_state()
        acked = self._acked
        if self._conn.closed:
            return
        urgent = force or leases.unlocked or state[0] != self._posted
        # About to wait, our cursor is posted too (`slabcast status` shows a subscriber that keeps up as such, not
        # a slab behind): a store and a barrier, once a wait at most.
        urgent = urgent or (waiting and self._entry is not None and self._cursor != self._posted_cursor)
        if urgent and not force and self._entry is not None:
            self._posted = state[0]
            leases.unlocked = False
            urgent = self._post_cursor()  # (an ACK too while the broker asks)
        # Counters for `slabcast status`: the chunks held or dropped at once when they changed (steady for a
        # subscriber that keeps up, so rarely), what it delivered at most every _ACK_INTERVAL (_COUNTS_INTERVAL
        # when our cursor is in the table and the broker does not ask us for ACKs: protocol 7.9).
        entry = self._entry
        asked = entry is None or self._ring.acks_wanted_from(entry, self._cursor)
        interval = _ACK_INTERVAL if asked else _COUNTS_INTERVAL
        now = time.monotonic()
        if not urgent and (state == acked or (state[1:3] == acked[1:3] and now - self._acked_at < interval)):
            self._counts_due = now + interval if state == acked else self._acked_at + interval
            return
        self._acked = state
        self._posted = state[0]
        self._acked_at = now
        self._counts_due = now + interval
        leases.unlocked = False
        with contextlib.suppress(BrokerGoneError):
            self._conn.send(M.Ack(self._cursor, self._received, self._dropped, state[2]))

    def _ack_state(self) -> tuple[int, int, int, int]:
        """What an ACK tells (besides the cursor): the slab we read, chunks dropped, held, delivered."""
        leases = self._leases
        return (self._cur_slab, self._dropped, leases.handed - leases.released, self._received)

    def _post_cursor(self) -> bool:
        """Store our cursor in our cursor table entry, make a full barrier, and say whether the broker wants an
        ACK anyway (it is short of slabs and asks everyone or us, from a cursor ours reached; core/ring.py), or
        the cursor is too far from our start to post."""
        delta = self._cursor - self.start
        if not 0 <= delta < CURSOR_SPAN:
            return True
        ring = self._ring
        ring.cursors[self._entry] = self._tag | delta  # type: ignore[index]
        self._posted_cursor = self._cursor
        barrier()
        return ring.acks_wanted_from(self._entry, self._cursor)

    def counts(self, report: bool = True) -> Counts:
        leases = self._leases
        if leases.dead:
            leases.reap()
        if report:
            self._send_ack(force=True)
        return Counts(self._received, leases.released, self._dropped, self._last_seq)

    # ------------------------------------------------------------ closing

    def _drop_ready(self) -> None:
        leases = self._leases
        for item in self._ready:  # cut but never handed out
            leases.unclaim(item.slab)
        self._ready.clear()
        self._notices.close(linger=0)
        self._disarm()
        if self._reader is not None:
            self._reader.close()
        self._ring.release()  # (the mapping stays while chunks' views live)
        if self._page is not None:
            with contextlib.suppress(BufferError):
                self._page.close()

    def close(self) -> None:
        self._drop_ready()
        # BYE first: closing the lease file gives up our liveness lock too, and a broker that saw that
        # before our BYE would forget us as dead and leave BYE unanswered (a 2 s close).  The broker
        # forgets us at once; a chunk still viewed keeps its slab through its lease lock, which goes
        # when the last view does (whether or not this object still exists).
        self._conn.close()
        self._leases.close()

    def abandon(self) -> None:
        self._drop_ready()
        self._leases.close()  # the old segment is gone with its broker; views keep their mapping
