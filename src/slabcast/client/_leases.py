"""A local subscriber's kernel lease locks, one per slab it has chunks in (see :mod:`slabcast.core.shm`)."""

from __future__ import annotations

import fcntl
import os
import threading
from collections import deque
from typing import Any

from ..core.geometry import generation
from ..core.shm import lock_slab

__all__ = ["Leases"]


class Leases:
    """This subscriber's kernel lease locks, one per slab it has chunks in (see :mod:`slabcast.core.shm`).

    Kept apart from the receiver so that views outliving it (or the subscriber's
    ``close()``) still give their slab back the moment they die.
    """

    def __init__(self, fd: int, mm: Any) -> None:
        self.fd = fd
        self.mm = mm
        self.guard = threading.RLock()  # a view dying in a GC run inside a guarded section calls back in
        self.locks: dict[int, list[int]] = {}  # slab -> [generation, chunks in it still viewed or queued]
        self.slab_of: dict[int, int] = {}  # seq -> slab, for chunks handed out
        self.refs: dict[int, Any] = {}  # seq -> weakref whose callback says the last view died
        self.dead: deque[int] = deque()  # seqs whose last view died
        self.handed = 0  # chunks handed out under these leases (this broker's segment)
        self.released = 0
        self.unlocked = False
        self.closed = False

    def claim(self, slab: int, gen: int) -> bool:
        """Lease ``slab`` for one more chunk: lock it, then check it still holds generation ``gen``."""
        with self.guard:
            entry = self.locks.get(slab)
            if entry is not None:
                if entry[0] != gen:
                    return False  # a notice older than our lease: its data is gone
                entry[1] += 1
                return True
            if not lock_slab(self.fd, slab, fcntl.F_RDLCK):
                return False  # the broker is handing it to the publisher right now
            if generation(self.mm, slab) != gen:
                lock_slab(self.fd, slab, fcntl.F_UNLCK)
                return False
            self.locks[slab] = [gen, 1]
            return True

    def unclaim(self, slab: int) -> None:
        with self.guard:
            self.locks[slab][1] -= 1

    def on_dead(self, ref: Any) -> None:
        # Runs when the last view of a chunk dies, in whatever thread dropped it: ``ref`` is the weak reference
        # to that view, which carries the chunk's ``seq``.
        self.dead.append(ref.seq)
        if self.closed:
            self.reap()

    def reap(self) -> None:
        """Account for chunks whose last view died."""
        dead = self.dead
        with self.guard:
            while dead:
                seq = dead.popleft()
                self.refs.pop(seq, None)
                slab = self.slab_of.pop(seq, None)
                self.released += 1
                entry = self.locks.get(slab) if slab is not None else None
                if entry is not None:
                    entry[1] -= 1
                    if self.closed and entry[1] == 0:
                        self._unlock(slab)  # type: ignore[arg-type]

    def _unlock(self, slab: int) -> None:
        # Caller holds the guard.
        del self.locks[slab]
        if self.fd >= 0:
            lock_slab(self.fd, slab, fcntl.F_UNLCK)
        self.unlocked = True
        if self.closed and not self.locks and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def unlock_idle(self, keep: int, current: int = -1) -> None:
        """Drop the leases of slabs with no chunk left, except ``keep``.

        Giving back ``current`` (the slab still being read) is not worth an ACK: the broker
        does not wait for it, and it is locked again with the next chunk.
        """
        if self.dead:
            self.reap()
        with self.guard:
            unlocked = self.unlocked
            for slab, entry in list(self.locks.items()):
                if entry[1] == 0 and slab != keep:
                    self._unlock(slab)
                    unlocked = unlocked or slab != current
            self.unlocked = unlocked

    def close(self) -> None:
        """No more chunks: leases go as soon as their last view dies (now, for most)."""
        with self.guard:
            self.closed = True
        self.reap()
        with self.guard:
            for slab, entry in list(self.locks.items()):
                if entry[1] <= 0:
                    self._unlock(slab)
            if not self.locks and self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
