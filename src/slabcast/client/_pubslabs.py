"""The publisher's slabs: the grants the broker sends, and the change from one slab to the next.

A mixin of :class:`~slabcast.Publisher` (the same object: its write path reads these
fields on every frame, so they stay attributes of one instance): it takes the broker's
messages (GRANT, CARRY, SYNCED, an error), waits for a granted slab when none is left
(``WriteTimeout`` naming who holds them), copies the carried part into the next slab
(ahead of time from the background thread, :meth:`SlabSwitching._prepare_switch`) and
starts it.  When to tell the broker is :class:`~slabcast.client._pubstate.PublisherState`'s.
"""

from __future__ import annotations

import time
from typing import Any

from .._exceptions import BrokerGoneError, WriteTimeout
from ..client.connection import error_for
from ..core.geometry import copy_carry, generation
from ..core.shm import populate
from ..wire import messages as M
from ._pubfields import PublisherFields
from .control import slab_holders

__all__ = ["SLICE", "SWITCHED", "SlabSwitching"]

SLICE = 0.01  # seconds a waiting caller blocks on the socket at a time (the background thread reads it too)
SWITCHED = 1 << 34  # the compiled put's result: the frame went into the next slab, prepared (_put_prepared)


class SlabSwitching(PublisherFields):
    """Grants and slab changes, for :class:`~slabcast.Publisher` (which sets every field: :class:`PublisherFields`)."""


    def _next_slab(self) -> int:
        state = self._state
        grants = state.grants
        with self._lock:
            self._flush_pending()  # subscribers may wait for these before they free a slab
            if state.tell_at_switch():
                self._published()  # the last slab change, if the background thread has not told it yet
            if grants:
                # Granted ahead: no socket on this frame's path (a look at it took 150-200 us of a paced
                # writer's cold process, the p99 of 64 KiB frames); the background thread takes the broker's
                # messages as they come, and a CARRY taken later applies from the next slab on.
                return self._switch_to(grants.popleft())
        self._take_messages(0)
        if not grants:
            deadline = time.monotonic() + self.timeout
            self.held_back_since = deadline - self.timeout
            try:
                while not grants:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        # After a wait of a second or more, the broker's word on who holds the slabs (a drop
                        # source times out at once, often: it does not ask).
                        said = slab_holders(self.address, self.name) if self.timeout >= 1.0 else ""
                        raise WriteTimeout(
                            f"no free slab for {self._where} within {self.timeout} s: a policy='block' subscriber "
                            f"is behind, or subscribers hold chunks in every slab{said}; nothing of this frame was "
                            "written"
                        )
                    self._take_messages(min(left, SLICE))  # the background thread may take the GRANT
            finally:
                self.held_back_since = None
        with self._lock:  # the carry read here and CARRY answered by the background thread: one order
            return self._switch_to(grants.popleft())

    def _put_prepared(self, data: Any, t0: Any, flags: int, offset: int, end: int, position: int,
                      index: int) -> tuple[int, bool]:  # fmt: skip
        """The compiled put of a frame once the background thread prepared the next slab (_prepare_switch): a
        frame that does not fit goes there in the same call, and the slab change's steps (_switch_to, which finds
        what was prepared still valid) follow the frame's wake instead of preceding it (20-26 us of Python in a
        writer just woken).  Under the lock, as _switch_to: the background thread's CARRY cannot come between the
        check of what was prepared and its use.  Returns put's result without SWITCHED, and whether the frame
        went there."""
        state = self._state
        ring = self._ring
        with self._lock:
            prepared = self._prepared
            switch = None
            grants = state.grants
            if prepared is not None and grants and not (state.pend_n or ring.notices_wanted or ring.frames_wanted):
                # (else notices are due before a switch (_next_slab): the Python path takes the change)
                slab, at, carry_wanted, gen, carry = prepared
                if slab == grants[0] and at == offset and carry_wanted == state.carry:
                    start, data_start = self._bounds[slab]
                    switch = (data_start, start + self.slab_bytes, index - carry // self.sample_bytes, slab, gen)
            n: int = self._writer.put(  # type: ignore[union-attr]
                data, t0, flags, offset, end, position, index, self._floor, self._slab, self._gen, self._frame_max,
                False, switch)  # fmt: skip
            # (Negative when a version-2 or broker-cut subscriber came meanwhile: the broker sets those words.)
            switched = switch is not None and (n if n >= 0 else -n) >= SWITCHED
            if switched:
                n = n - SWITCHED if n >= 0 else n + SWITCHED
                # The change before this one, not told yet (a slab shorter than SWITCH_DELAY): the broker grants
                # again when it hears of it, now, both at once, unless it may wait longer still (deferred).
                tell = state.tell_at_switch()
                self._switch_to(grants.popleft())  # (the same slab, floor and generation: the write position and
                # the samples are still those before this frame, as the check above saw them)
                if tell:
                    state.first_frame(time.monotonic())  # (this one's first frame is in the ring: told with it)
                    self._position = position + 1  # (what PUBLISHED says: the position after this frame)
                    self._published()
            return n, switched

    def _switch_to(self, slab: int) -> int:
        """Start writing ``slab`` (caller holds the lock); return the byte of its data start."""
        state = self._state
        prepared, self._prepared = self._prepared, None
        self._prep_asked = False
        if prepared is not None and prepared[:3] != (slab, state.offset, state.carry):
            prepared = None  # (made for another slab, write position or carry: stale)
        self._slab = slab
        # (bumped before GRANT was sent)
        self._gen = generation(self._mm, slab) if prepared is None else prepared[3]
        geometry = self._geometry
        start, data = self._bounds[slab]
        old = state.offset
        # Copy the tail subscribers may still be accumulating just before the new slab's data,
        # so that every chunk lies contiguously in the slab of the frame that completes it.
        carry = state.switch(start, self.slab_bytes)
        if carry and prepared is None:  # (else the background thread copied it: _prepare_switch)
            copy_carry(self._u8, geometry, old, data, carry)
        self._floor = self.samples - carry // self.sample_bytes
        return int(data)

    def _prepare_switch(self) -> None:
        """Told that the next frame will not fit (caller holds the lock: the background thread), copy the carried
        part into the next granted slab now, while no frame is on its way, so that the write that switches to it
        finds it there (that write copied it before its own frame: 16 us of 50 extra for a 64 KiB carry in a
        cold process).  A write or a new carry before that switch makes it stale: that switch copies again."""
        state = self._state
        if self._prepared is not None or not state.grants or not state.end:
            return
        slab = state.grants[0]
        # One load of the write position: the writer moves it without the lock (a frame that fits), and a copy
        # from one position recorded as made from a later one would carry the wrong bytes (the stress test
        # caught it).  The bytes before it are written and stay so.
        offset, carry_wanted = state.offset, state.carry
        carry = min(carry_wanted, state.contiguous(offset))  # (what state.switch will carry from there)
        if carry:
            copy_carry(self._u8, self._geometry, offset, self._bounds[slab][1], carry)
        self._prepared = (slab, offset, carry_wanted, generation(self._mm, slab), carry)

    def _take_messages(self, timeout: float) -> None:
        with self._lock:
            self._take_locked(timeout)
            self._notices.serve_joins()

    def _take_locked(self, timeout: float) -> None:
        try:
            msg = self._conn.recv(timeout)
            while msg is not None:
                if isinstance(msg, M.Grant):
                    self._on_grant(msg.slab)
                elif isinstance(msg, M.Carry):
                    self._on_carry(msg)
                elif isinstance(msg, M.Synced):
                    self._synced = max(self._synced, msg.token)
                elif isinstance(msg, M.Error | M.End):
                    raise error_for(msg, self._where)
                msg = self._conn.recv(0)
        except BrokerGoneError as exc:
            # (On the writer's thread, whose recv took the monitor's signal, the background thread sleeps on: write
            # raises it from here.)
            if self._failure is None:
                self._failure = exc
            raise

    def _on_carry(self, msg: M.Carry) -> None:
        # From the next slab on (caller holds the lock); confirmed when the state says (PublisherState.on_carry).
        carried = self._state.on_carry(msg.nbytes)
        if carried is not None:
            self._conn.send(M.Carried(carried))

    def _on_grant(self, slab: int) -> None:
        """``slab`` is ours to write next (caller holds the lock): populate its carried part as far as we carry
        (core/shm.py).  The broker shrank that part, if at all, before it granted the slab, keeping at least the
        carry it last asked for, which we took before this GRANT (one socket, in order): that much is committed,
        so populating allocates nothing.  A part given back since our last look is populated again when needed."""
        state = self._state
        state.grants.append(slab)
        carry, done = state.carry, min(self._populated[slab], state.carry)
        if carry > done:
            data = self._geometry.data_start(slab)
            populate(self._mm, [(data - carry, data - done)])
        self._populated[slab] = carry
