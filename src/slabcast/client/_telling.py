"""Whom a publisher's frame concerns, told after its publish: futex waiters, doorbell subscribers asleep, version-2
subscribers (NOTICEs, batched for a fast writer), the broker (PUBLISHED at a slab change, or while it cuts chunks);
and the background thread's turn, which sends what no write sent.

A mixin of :class:`~slabcast.Publisher` (the same object: the write path calls these after each frame that needs
them, and reads the same fields).  When to tell is :class:`~slabcast.client._pubstate.PublisherState`'s rule; the
sleeping between turns is :mod:`slabcast.client._flusher`'s.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import zmq

from .._exceptions import BrokerGoneError, SlabcastError
from ..core.ring import WAKE_ALL, barrier, futex_wake
from ..wire import messages as M
from ._flusher import SAFETY
from ._pubfields import PublisherFields
from ._pubstate import AT_ONCE, BATCH_DELAY, FULL, OPENED

__all__ = ["Telling"]


class Telling(PublisherFields):
    """Notices, PUBLISHED and the background thread's turn, for :class:`~slabcast.Publisher` (which sets every
    field: :class:`PublisherFields`)."""


    def _tell(self, index: int, offset: int, n: int, nbytes: int, t0: float, flags: int, grew: bool, first: bool,
              position: int) -> None:  # fmt: skip
        """After a frame's publish (ring position ``position``), tell whom it concerns: futex waiters, doorbell
        subscribers asleep, version-2 subscribers (NOTICEs), the broker (PUBLISHED), as the ring's words say."""
        ring = self._ring
        state = self._state
        discontinuity = bool(flags)
        ring_now = False
        futex = ring.futex_waiters
        if futex or ring.doorbells:
            # A full barrier, then the sleeper table: a doorbell subscriber either sees this position or we see
            # its byte (core/ring.py).  With futex subscribers, the FUTEX_WAKE that wakes those asleep on the
            # position is the barrier (the kernel's futex_wake); else a lock's locked instruction (x86-64).
            # It wakes those whose next chunk this frame can complete (core/ring.py, wake targets): every one
            # when the frame is larger than any before, and at each slab's first frame (a block subscriber asleep
            # toward a later position still reads and posts its cursor once a slab: the slabs it holds come back).
            mask = WAKE_ALL if grew or first else 1 << (position & 31)  # (wake_mask, inlined)
            if futex:
                futex_wake(ring.futex_address, mask)
            else:
                barrier()
            if ring.doorbells:
                ring_now = ring.sleeping()
                if ring.futex_sleeping(mask):
                    futex_wake(ring.futex_address, mask)  # (after the look: the one above may precede their sleep)
        # What else to send: NOTICEs for version-2 subscribers, which cut from them (batched for a fast
        # writer); a PUBLISHED when the broker cuts chunks itself (batched likewise); one NOTICE at once when a
        # doorbell subscriber sleeps; a slab change's PUBLISHED from the background thread.  Often nothing.
        if ring.notices_wanted or ring.frames_wanted or state.pend_n:
            now = time.monotonic()
            with self._lock:
                action = state.place(index, offset, n, nbytes, t0, now, discontinuity)
                if action == AT_ONCE:
                    self._flush_pending(ring_now)  # (a jump: the frames batched before it go first)
                    self._notice(index, offset, n, t0, flags, ring_now)
                    self._published()
                    state.last_send = now
                elif action == FULL or ring_now:
                    self._flush_pending(ring_now)  # (a sleeper is not kept waiting for a batch)
                elif action == OPENED:
                    self._kick()  # the flusher sends this batch if no write fills it
        else:
            state.offset = offset + nbytes
            self._tell_rest(index, offset, n, t0, flags, ring_now, first)

    def _tell_rest(self, index: int, offset: int, n: int, t0: float, flags: int, ring_now: bool, first: bool) -> None:
        """What is left to tell when no version-2 or broker-cut subscriber must hear of the frame: a doorbell
        subscriber's notice (``ring_now``), and a slab change's PUBLISHED when it is ours to send."""
        if ring_now:
            with self._lock:
                self._notice(index, offset, n, t0, flags, True)
        state = self._state
        if state.switch_unsent and (first or state.switch_due(time.monotonic())):
            self._tell_switch(first)

    def _tell_switch(self, first: bool) -> None:
        """A slab change not told to the broker yet, and due (the caller looked): at its ``first`` frame, wake the
        background thread to tell it later (unless it is deferred); else tell it now."""
        # The broker grants the next slab when it hears of this change; the publisher holds another
        # (P.GRANT_AHEAD), so it hears SWITCH_DELAY later, from the background thread: its work on it then
        # competes for a CPU with no subscriber waking to this frame or the next (64 KiB p99).  A writer that
        # held the GIL meanwhile (flat out: up to the 5 ms switch interval) tells it itself.
        if first:
            if not self._state.deferred():
                self._kick()
        else:
            with self._lock:
                self._published()

    def _notice(self, index: int, offset: int, ns: Any, t0s: Any, flags: int, sleeper: bool = False) -> None:
        """Publish one NOTICE to every local subscriber (caller holds the lock), if a version-2 subscriber cuts
        from notices or (``sleeper``) a doorbell subscriber sleeps."""
        if not (sleeper or self._ring.notices_wanted):
            return
        seq = self._nseq
        self._nseq = seq + 1
        self._notices.send(M.Notice(self._sid, seq, index, self._slab, self._gen, offset, ns, t0s, flags, self._floor))
        # A send processes ZeroMQ's pending commands (at most every millisecond or so): a join that came meanwhile
        # then no longer signals the descriptor the background thread sleeps on.  The look is exact and costs one
        # system call (1.2 us), on frames that wake a subscriber asleep on the notice socket (an event loop's).
        if self._notices.joining() and threading.get_ident() != self._flusher.ident:
            self._kick()

    def _flush_pending(self, sleeper: bool = False) -> None:
        """Send the batched notices (to version-2 subscribers, or ``sleeper``: a doorbell subscriber sleeps),
        then a PUBLISHED if the broker wants it (caller holds the lock)."""
        if not self._state.pend_n:
            return
        batch = self._state.take_batch(time.monotonic())
        assert batch is not None
        if batch.notice is not None:
            self._notice(*batch.notice, 0, sleeper)
        self._published()

    def _kick_delay(self) -> float:
        """How long the background thread, kicked, waits before its turn: SWITCH_DELAY when all there is to do
        is tell a slab change, else BATCH_DELAY (a batch of notices, the carry of the next slab change)."""
        state = self._state
        ring = self._ring
        with self._lock:  # (close releases the ring under it, once _closed is set)
            if self._closed:
                return 0.0
            if state.switch_unsent and not (state.pend_n or self._prep_asked or ring.notices_wanted
                                            or ring.frames_wanted):  # fmt: skip
                left = state.switch_left(time.monotonic())
                # (A change kept for the next: no wait on kicks alone, which would leave the broker's messages, a
                # CARRY among them, to wait up to SAFETY; the turn then sleeps on every descriptor.)
                return 0.0 if left == math.inf else left
        return BATCH_DELAY

    def _service(self) -> float | None:
        """One turn of the background thread; return the seconds until its next turn, or None when it should
        end."""
        with self._lock:
            self._kick.take()  # (a kick before this turn is served by it)
            if self._closed or self._conn.closed:
                return None
            state = self._state
            try:
                self._flush_pending()
                now = time.monotonic()
                if state.switch_due(now):
                    self._published()  # (a slab change left to us)
                self._notices.serve_joins()
                self._take_locked(0)
                if self._prep_asked:
                    self._prepare_switch()
                if self._conn.poll_gone():
                    raise BrokerGoneError(f"the {self._conn.where} went away ({self._where})")
            except SlabcastError as exc:
                self._failure = exc
                return None
            except zmq.ZMQError as exc:
                # (the sockets failed under an open publisher: nothing watches the broker any more; write says so)
                self._failure = BrokerGoneError(f"the connection to the {self._conn.where} failed: {exc} "
                                                f"({self._where})")  # fmt: skip
                return None
            if state.switch_unsent:  # (not due yet: our next turn is when it is)
                return min(SAFETY, state.switch_left(now))
        return SAFETY

    def _published(self) -> None:
        """Tell the broker the ring's position, when it must know now: a slab change (it grants the next), or it
        cuts chunks itself; then a CARRIED that waited for the slab change (caller holds the lock)."""
        if not (self._state.switch_unsent or self._ring.frames_wanted):
            return
        self._conn.send(M.Published(self._position))
        carried = self._state.frame_sent()
        if carried is not None:
            self._conn.send(M.Carried(carried))
        if self._conn.has_input() and threading.get_ident() != self._flusher.ident:
            self._kick()  # (the send took ZeroMQ's signal of it: the background thread would not wake)
