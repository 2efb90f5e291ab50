"""A local subscriber's cutting: the frames it read from the ring, fed to its chunker, cut into chunks in their
slab (leased), handed out as views; samples it never saw (lapped) counted or, for a ``block`` subscriber, raised.

A mixin of :class:`~slabcast.client._local.LocalReceiver` (the same object: the compiled ``Reader.take_chunk``
reads and writes these fields too, and hands back to :meth:`Cutting._step` whatever it does not do itself), with
the records it keeps: a run of frames not yet cut (``_Frame``), samples never seen (``_Gap``), a chunk cut but not
handed out (``_Ready``).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._exceptions import SamplesLostError
from .._info import StreamInfo
from ..core.geometry import Geometry
from ..core.rechunk import Rechunker
from ..wire import messages as M
from ..wire import protocol as P
from ._leases import Leases
from ._subargs import pause_error
from .chunk import Chunk
from .connection import Connection

__all__ = ["Cutting"]

log = logging.getLogger("slabcast.subscriber")

_EVICTED_WAIT = 1.0  # a block subscriber overrun waits this long (seconds) for the END evicted on its way


@dataclass(slots=True)
class _Frame:
    """A run of frames (back to back in one slab) not yet cut: where its samples are, and how far cutting got."""

    index: int  # stream index of the next sample to cut
    slab: int
    gen: int  # the slab's generation when the notice was sent
    offset: int  # byte of the sample at ``index``
    ns: list[int] | tuple[int, ...]  # samples per frame of the run
    t0s: list[float] | tuple[float, ...]  # time of each frame's first sample
    i: int  # the next frame of the run to cut
    flags: int  # FLAG_DISCONTINUITY: the stream jumped (or samples were lost) before this one
    floor: int  # the lowest stream index contiguous in the slab (its carried part starts there)
    end: int = 0  # byte just past the run


class _Gap(NamedTuple):
    """Samples this subscriber never saw (a drop subscriber lapped by the publisher)."""

    start: int
    stop: int


class _Ready(NamedTuple):
    """A chunk cut and leased, not yet handed out."""

    seq: int
    start: int  # stream index of its first sample
    n: int
    t0: float
    offset: int  # byte of its first sample in the segment
    slab: int
    flags: int


class _ViewRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a chunk's base view that knows the chunk's seq (for :meth:`Leases.on_dead`)."""

    __slots__ = ("seq",)
    seq: int


_frombuffer = np.frombuffer


_new_ready = tuple.__new__  # _Ready(...) without NamedTuple's Python-level __new__: this is per chunk


class Cutting:
    """Chunks cut from the frames read, for :class:`~slabcast.client._local.LocalReceiver` (which sets every field
    below)."""

    size: int
    policy: str
    jumped: bool
    _conn: Connection
    _mm: Any
    _leases: Leases
    _info: StreamInfo
    _name: str
    _dtype: np.dtype[Any]
    _channels: int
    _timestamps: bool
    _where: str
    _max_inflight: int
    _partial_tail: bool
    _partial: bool
    _sample_bytes: int
    _geometry: Geometry
    _sampler: Callable[[], float] | None
    _sampler_error: BaseException | None
    _chunker: Rechunker
    _ready: deque[_Ready]
    _frames: deque[_Frame | _Gap]
    _seq: int
    _received: int
    _last_seq: int
    _dropped: int
    _cursor: int
    _cur_slab: int
    _posted: int
    _last: tuple[int, int, int]
    _on_dead: Callable[[Any], None]
    _on_release: Callable[[], None]

    if TYPE_CHECKING:  # (LocalReceiver's)

        def _on_direct(self, msg: M.Message | None) -> None: ...

        def _send_ack(self, force: bool = False, waiting: bool = False) -> None: ...

    def _cut_fed(self, index: int, n: int, offset: int, slab: int, gen: int,
                 chunks: list[tuple[int, int, float]]) -> bool:  # fmt: skip
        """Cut ``chunks``, what the chunker completed with the frame of ``n`` samples from ``index`` at byte
        ``offset`` of ``slab``; True if any."""
        chunker = self._chunker
        if chunker.jumped:  # the clock stepped back (no rate): the sampler's schedule restarted
            chunker.jumped = False
            self.jumped = True
        sb = self._sample_bytes
        for cstart, length, ct0 in chunks:
            self._cut_chunk(cstart, length, ct0, offset - (index - cstart) * sb, slab, gen)
        self._cursor = index + n
        self._last = (slab, gen, offset + n * sb)
        return bool(chunks)

    def _step(self) -> None:
        """Cut the chunks of the next unread frame (one at a time: a drop subscriber's max_inflight counts
        the chunks it holds, not those a long notice batch would cut at once); frames of a batch that
        complete no chunk are cut in the same call."""
        entry = self._frames[0]
        if isinstance(entry, _Gap):
            self._frames.popleft()
            self._lost(entry.start, entry.stop)
            return
        index, slab, offset, i = entry.index, entry.slab, entry.offset, entry.i
        chunker = self._chunker
        if i == 0:
            if entry.flags & P.FLAG_DISCONTINUITY:
                if self._partial and self._cursor == index:
                    # What was accumulated before the jump, as a partial chunk (rule 7): nothing is lost.
                    self._cut_partial()
                chunker.start = None
                self.jumped = True
            start = chunker.start
            floor = entry.floor
            if start is not None and start < floor:
                # The slab's carry does not reach back that far; the broker makes this impossible
                # for every subscription it knew of at the slab change.
                log.warning("%s: samples %d..%d not contiguous; skipped", self._where, start, floor)
                if chunker.rate:
                    chunker.t0 += (floor - start) / chunker.rate
                chunker.start = floor
                self.jumped = True
            if slab != self._cur_slab:
                self._cur_slab = slab
                self._leases.unlock_idle(slab)
        # The run's frames up to the first that completes a chunk (handed out first: a drop subscriber's
        # max_inflight counts what it holds), in one call; the frames before it only accumulate.  (A sampler's
        # failure comes with a chunk: recv raises it first.  A BaseException out of the sampler leaves the
        # run's place where it was: the frames fed again then only accumulate again, the chunker's fast path.)
        ns = entry.ns
        j, at, chunks = chunker.feed_until(index, ns, entry.t0s, i)
        n = ns[j]
        offset += (at - index) * self._sample_bytes
        self._cut_fed(at, n, offset, slab, entry.gen, chunks)
        if j < len(ns) - 1:
            entry.index, entry.offset, entry.i = at + n, offset + n * self._sample_bytes, j + 1
            return
        self._frames.popleft()
        if self._posted != slab:
            self._send_ack()  # the broker may free the slab we left

    def _lost(self, start: int, stop: int) -> None:
        """Samples ``start`` to ``stop`` will never come (their notices were lost): a ``block`` subscriber says
        so with :class:`SamplesLostError`, a ``drop`` subscriber counts and logs them."""
        self._cursor = max(self._cursor, stop)
        self._chunker.start = None  # (what was accumulated before them is no chunk, not even a partial one)
        self.jumped = True
        what = f"samples {start}..{stop} ({stop - start} samples) of stream {self._name!r} were lost"
        if self.policy == "block":
            self._evicted()
            raise SamplesLostError(f"{what} before this subscriber read them: their notices never reached it "
                                   f"(its notice queue overflowed, or the publisher went away first) "
                                   f"({self._where})", start, stop)  # fmt: skip
        self._dropped += -(-(stop - start) // self.size)
        log.warning("%s: %s (notices lost); the next chunk is flagged as a discontinuity", self._where, what)

    def _evicted(self) -> None:
        """A block subscriber overrun (samples it did not read are gone): the publisher goes on without it only once
        the broker evicted it, whose END evicted is on its way: raise it (EvictedError), so the end is never a
        clean one; return if none came within a second (the caller raises SamplesLostError)."""
        deadline = time.monotonic() + _EVICTED_WAIT
        while (left := deadline - time.monotonic()) > 0:
            msg = self._conn.recv(left)
            if msg is None:
                return
            self._on_direct(msg)  # END evicted (or shutdown, ERROR) raises; END closed is kept
            if isinstance(msg, M.End):
                return  # the stream ended while we were still its subscriber: not evicted

    def _cut_tail(self) -> bool:
        """At the end of the stream: the unfinished chunk, as one partial chunk (once)."""
        self._partial_tail = False
        return self._cut_partial()

    def _cut_partial(self) -> bool:
        """The samples accumulated towards the next chunk, up to the last frame read, as one partial chunk; False
        if there are none."""
        chunker = self._chunker
        start = chunker.start
        if start is None or start >= self._cursor:
            return False
        slab, gen, end = self._last
        n = self._cursor - start
        chunker.start = None
        self._cut_chunk(start, n, chunker.t0, end - n * self._sample_bytes, slab, gen, P.FLAG_PARTIAL)
        return True

    def _cut_chunk(self, start: int, length: int, t0: float, offset: int, slab: int, gen: int, flags: int = 0) -> None:
        seq = self._seq
        self._seq = seq + 1
        leases = self._leases
        if self.policy == "drop" and len(self._ready) + leases.handed - leases.released >= self._max_inflight:
            self._dropped += 1
            return
        if not leases.claim(slab, gen):
            # The publisher already reuses this slab: a drop subscriber that fell a pool behind, or a block
            # subscriber the broker evicted (no longer holding the publisher back): that one ends here.
            self._dropped += 1
            if self.policy == "block":
                self._evicted()
                # Raised by recv before its next chunk, once this frame is cut (the next chunk is flagged).
                self.jumped = True
                self._sampler_error = SamplesLostError(
                    f"samples {start}..{start + length} of stream {self._name!r} were overwritten before this "
                    f"subscriber read them, and no END evicted came ({self._where})", start, start + length,
                )  # fmt: skip
            return
        if self.jumped:
            self.jumped = False
            flags |= P.FLAG_DISCONTINUITY
        self._ready.append(_new_ready(_Ready, (seq, start, length, t0, offset, slab, flags)))

    def _hand_out(self) -> Chunk:
        seq, index, n, t0, offset, slab, flags = self._ready.popleft()
        channels = self._channels
        base = _frombuffer(self._mm, self._dtype, n * channels, offset)  # (keywords: 0.5 us more, 3 cold)
        # Every view derived from `data` keeps `base` alive, so this fires when the last view dies.
        leases = self._leases
        leases.slab_of[seq] = slab
        ref = _ViewRef(base, self._on_dead)
        ref.seq = seq
        leases.refs[seq] = ref
        leases.handed += 1
        self._received += 1
        self._last_seq = seq
        data = base.reshape(n, channels) if channels > 1 else base
        if self._timestamps:
            at = self._geometry.time_at(offset)
            return Chunk(data, seq, index, t0, flags, self._info, self._on_release, (self._mm, at))
        return Chunk(data, seq, index, t0, flags, self._info, self._on_release)

    def _checked_pause(self) -> float:
        # Runs inside the rechunker: whatever the user's sampler does, the rechunker gets a
        # valid pause (0), and the error is raised from recv() once, with no chunk lost.
        try:
            value = float(self._sampler())  # type: ignore[misc]
        except Exception as exc:
            self._sampler_error = exc
            return 0.0
        error = pause_error(value, self._where)
        if error is not None:
            self._sampler_error = error
            return 0.0
        return value
