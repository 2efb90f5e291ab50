"""How a local subscriber waits for the ring's position: spinning, on the futex word, or on its doorbell.

A mixin of :class:`~slabcast.client._local.LocalReceiver` (the same object: ``recv``
calls :meth:`Waiting._idle` between its looks at the ring).  Each strategy is the
flag-and-fence handshake of docs/protocol.md (sections 7.8, 10.7): the subscriber
says it sleeps (its byte in the sleeper or futex sleeper table), makes a full barrier,
reads the position again, and only then sleeps; a publish it did not see sees its byte
and wakes it.  ``busy`` never sleeps; ``spin=`` spins that long first.
"""

from __future__ import annotations

import os
import time
from typing import Any

import zmq

from ..core.rechunk import Rechunker
from ..core.ring import TSO, Ring, barrier, futex_sleeper_byte, futex_wait, wake_target
from ..wire import messages as M
from ..wire import protocol as P

__all__ = ["Waiting"]

_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_yield = os.sched_yield
_NOTICE_END_KIND = bytes([P.NOTICE_END])  # the kind byte of a notice message (after its array header)


class Waiting:
    """The waits of :class:`~slabcast.client._local.LocalReceiver` (which sets every field below)."""

    _ring: Ring
    _rseq: int  # the ring position read up to
    _spin: float  # seconds to spin before sleeping; < 0: busy (never sleeps)
    _futex: bool  # wake="futex"
    _futex_byte: int | None  # our byte in the futex sleeper table (None: wait on the word itself)
    _sleeper: int | None  # our byte in the doorbell sleeper table
    _notices: Any  # the notice socket (a ZeroMQ SUB)
    _rcvtimeo: int
    _chunker: Rechunker
    _noticed: int
    _armed: bool
    _arm_value: int
    _armed_rseq: int
    _topic: bytes
    _sid: int
    _stream_end: M.End | None

    def _idle(self, wait: float) -> int:
        """Wait up to ``wait`` seconds for the ring's position to move, by this subscriber's wait strategy;
        return the position (moved or not: the caller looks at everything again)."""
        ring = self._ring
        seen = self._rseq
        if self._spin and not ring.closed:
            until = time.monotonic() + (wait if self._spin < 0 else min(wait, self._spin))
            while (position := ring.position) == seen:
                if time.monotonic() >= until or ring.closed:
                    break
                _yield()  # (the publisher may wait for a CPU: more spinners than cores)
            else:
                return position
            if self._spin < 0 and not ring.closed:
                return position  # busy: never sleeps (the caller looks at the broker every _LOOK seconds)
        # (Once the ring is closed every subscriber waits on its notice socket, where NOTICE_END comes.)
        if self._futex and not ring.closed and self._futex_byte is None:
            # The kernel compares the word and sleeps in one step: a publish after our look wakes us (the first
            # that can complete our next chunk: core/ring.py, wake targets).
            futex_wait(ring.futex_address, seen, wait, self._wake_target(seen))
            return ring.position
        byte = self._futex_byte if self._futex else self._sleeper
        if byte is not None and not ring.closed and (self._futex or ring.futex_sleepers_woken):
            # The doorbell, waiting in recv (nobody polls our notice socket): our byte in the futex sleeper table,
            # a barrier, the position again, asleep on the futex word (core/ring.py).  A publish we do not see
            # here sees our byte after its own barrier and makes a FUTEX_WAKE: no ZeroMQ hop on the way.  The byte
            # says the mask we sleep with, so that the publishes that cannot complete our chunk make no wake (a
            # frame that raises frame_max past what the mask assumed wakes every bit).
            mask = self._wake_target(seen)
            table = ring.futex_sleepers
            table[byte] = futex_sleeper_byte(mask)
            try:
                barrier()
                position = ring.position
                if position == seen and not ring.closed:  # (closed since our first look: NOTICE_END comes)
                    futex_wait(ring.futex_address, seen, wait, mask)
                    position = ring.position
            finally:
                table[byte] = 0
            return position
        # The doorbell on our notice socket.  Our sleeper byte, a barrier, the position again (core/ring.py): a
        # publish we do not see here sees our byte after its own barrier and sends a notice, which wakes the
        # recv below.
        position = self._arm()
        if position != seen:
            self._disarm()
            return position
        ms = max(1, int(wait * 1000))
        if ms != self._rcvtimeo:
            self._notices.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            raw = self._notices.recv()
        except zmq.Again:
            raw = None
        self._disarm()
        if raw is not None:
            self._on_notice(raw)
        return ring.position

    def _wake_target(self, seen: int) -> int:
        """The futex mask to sleep with, having read everything up to position ``seen`` (and loaded it): that
        of the first publish that can complete our next chunk (core/ring.py, wake targets)."""
        if not TSO:
            barrier()  # (frame_max after the position)
        return wake_target(seen, self._chunker.needed(self._noticed), self._ring.frame_max)

    def _arm(self) -> int:
        """Set our sleeper byte, make a full barrier, and return the position (see core/ring.py): from now on a
        publish either was seen in what this returns, or sends us a notice."""
        ring = self._ring
        if self._sleeper is not None and not self._armed:
            # A new value once we read something or took a notice since we chose the last one (core/ring.py).
            if self._arm_value == 0 or self._rseq != self._armed_rseq:
                self._arm_value = self._arm_value % 255 + 1
                self._armed_rseq = self._rseq
            ring.sleepers[self._sleeper] = self._arm_value
            self._armed = True
            barrier()  # (core/ring.py: a locked instruction on x86-64, else FUTEX_WAKE on an aligned word)
        return ring.position

    def _disarm(self) -> None:
        """We are awake: publishes need not ring for us."""
        if self._armed:
            self._ring.sleepers[self._sleeper] = 0  # type: ignore[index]
            self._armed = False

    def _drain_notices(self) -> bool:
        """Read every notice waiting (they only wake us; NOTICE_END says the stream ended); True if any."""
        notices = self._notices
        any_ = False
        while notices.getsockopt(_EVENTS) & _POLLIN:  # (cheaper than the exception of an empty recv)
            try:
                raw = notices.recv(_NOBLOCK)
            except zmq.Again:
                return any_
            any_ = True
            self._on_notice(raw)
        return any_

    def _on_notice(self, raw: bytes) -> None:
        """A message on the notice socket: a doorbell (its fields are the ring's, read there), or the end."""
        # A doorbell we take means the publisher saw our sleeper byte's value: the next value must differ, or
        # its next look, seeing the value it already rang for, would not ring again (core/ring.py).
        self._armed_rseq = -1
        topic = self._topic
        if not raw.startswith(topic) or raw[len(topic) + 1 : len(topic) + 2] != _NOTICE_END_KIND:
            return  # a NOTICE (the position moved), or a JOINED of another subscriber's token
        raw_msg = P.unpack(raw[len(topic) :])
        if len(raw_msg) < 3 or raw_msg[1] != self._sid:
            return  # an earlier stream of the same name
        msg = M.decode(raw_msg, strict=False, check=False)
        if isinstance(msg, M.NoticeEnd) and self._stream_end is None:
            self._stream_end = M.End(msg.code, msg.message, 0, msg.head)
