"""The slab pool of one stream, as a state machine with no sockets, no threads and no clock.

A slab is FREE (in the pool), GRANTED (handed to the publisher ahead of use),
CURRENT (being written) or RETIRED (the publisher moved on; readers may still
need it).  A retired slab returns to the pool once

* every lossless (``block``) subscriber has read past its last sample (its
  *cursor*, reported cumulatively), and
* no broker-side pin remains (chunks the broker cut for a version-1 or TCP
  subscriber and has not seen released).

Chunks that subscribers hold are protected separately, by kernel lease locks
(see :mod:`slabcast.core.shm`): a free slab is handed out again only when
``take(slab)`` (an exclusive, non-blocking lock) succeeds, and then its
generation is bumped before ``put(slab)`` drops the lock.  Slabs are handed out
oldest-freed first, which gives ``drop`` subscribers that lag the longest
possible time before their unread chunks are gone.

The broker drives it: :meth:`switch` when a frame lands in a new slab,
:meth:`advance` when cursors move, :meth:`grant` to top up the publisher.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, MutableSequence

__all__ = ["CURRENT", "FREE", "GRANTED", "RETIRED", "SlabPool"]

FREE, GRANTED, CURRENT, RETIRED = "free", "granted", "current", "retired"


class SlabPool:
    """Slab states, generations and reclaiming for one stream.

    Parameters
    ----------
    nslabs : int
        Number of slabs.
    gens : mutable sequence of int
        Generation per slab (the segment header's table, or a list in tests).
    take, put : callable
        ``take(slab) -> bool`` tries an exclusive lease lock without waiting;
        ``put(slab)`` drops it.
    """

    def __init__(
        self,
        nslabs: int,
        gens: MutableSequence[int],
        take: Callable[[int], bool],
        put: Callable[[int], None],
    ) -> None:
        self.nslabs = nslabs
        self.gens = gens
        self._take = take
        self._put = put
        self.state = [FREE] * nslabs
        self.pins = [0] * nslabs
        self.free: deque[int] = deque(range(nslabs))
        self.granted: deque[int] = deque()
        self.current: int | None = None
        self.retired: dict[int, int] = {}  # slab -> stream index just past its last sample, oldest first
        self.locked_skips = 0  # times a free slab was passed over because a reader still held it

    def grant(self, limit: int) -> list[int]:
        """Hand free slabs to the publisher until it holds ``limit``; return the slabs granted now.

        A free slab still locked by a reader stays in the pool (at its end) and is
        tried again next time.
        """
        out: list[int] = []
        tries = len(self.free)
        while len(self.granted) < limit and tries > 0:
            tries -= 1
            slab = self.free.popleft()
            if not self._take(slab):
                self.free.append(slab)
                self.locked_skips += 1
                continue
            try:
                self.gens[slab] = (self.gens[slab] + 1) & 0xFFFFFFFF
            finally:
                self._put(slab)
            self.state[slab] = GRANTED
            self.granted.append(slab)
            out.append(slab)
        return out

    def switch(self, slab: int, head: int) -> int | None:
        """The publisher started writing ``slab`` (the oldest granted) at stream index ``head``.

        Returns the slab it left (now RETIRED), if any.

        Raises
        ------
        ValueError
            If ``slab`` is not the oldest granted slab.
        """
        if not self.granted or self.granted[0] != slab:
            raise ValueError(f"slab {slab} is not the next granted slab (granted: {list(self.granted)})")
        self.granted.popleft()
        old = self.current
        if old is not None:
            self.state[old] = RETIRED
            self.retired[old] = head
        self.state[slab] = CURRENT
        self.current = slab
        return old

    def advance(self, floor: int | None) -> list[int]:
        """Free the retired slabs every lossless reader is past (``floor``: the lowest cursor, None: no
        such reader) and no pin holds; return them."""
        out = []
        for slab, end in list(self.retired.items()):
            if floor is not None and end > floor:
                continue
            if self.pins[slab]:
                continue
            del self.retired[slab]
            self.state[slab] = FREE
            self.free.append(slab)
            out.append(slab)
        return out

    def retain(self, slab: int, end: int) -> None:
        """A free ``slab`` (not granted again since it was written up to stream index ``end``) is read again (a
        subscription's history): it goes back to RETIRED, in order, until :meth:`advance` frees it again."""
        self.free.remove(slab)
        self.state[slab] = RETIRED
        self.retired[slab] = end
        self.retired = dict(sorted(self.retired.items(), key=lambda item: item[1]))

    def pin(self, slab: int) -> None:
        """A chunk in ``slab`` was handed out by the broker (version-1/TCP subscribers)."""
        self.pins[slab] += 1

    def unpin(self, slab: int) -> None:
        """That chunk came back."""
        self.pins[slab] -= 1

    def gated(self, floor: int | None) -> int | None:
        """The oldest retired slab held back only by a lossless reader's cursor, if any."""
        for slab, end in self.retired.items():
            if floor is not None and end > floor and not self.pins[slab]:
                return slab
        return None

    def close(self) -> None:
        """The stream ended: nothing is granted or written any more."""
        for slab in self.granted:
            self.state[slab] = FREE
            self.free.append(slab)
        self.granted.clear()
