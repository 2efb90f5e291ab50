"""The broker's look at a publisher's ring: the frames described since it last looked, taken in runs.

A mixin of :class:`~slabcast.broker.state.BrokerState` (the same sans-io object: no socket, no clock).  The
broker is on no frame's path: it reads the ring lazily, before every message of the stream's publisher, before
a subscription starts, before a status and at every sweep, and accounts for a run of frames back to back in one
slab at a time: the head, the pool's slab changes (and the grants they allow), statistics, history and the
chunks of broker-cut subscribers (:mod:`.delivery`).
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.ring import DESCRIPTOR, HOT, rows_of
from ..wire import messages as M
from ..wire import protocol as P
from . import delivery
from .checks import Refused
from .descriptors import Run, runs_of, wrong_descriptor
from .model import Out, Stream

__all__ = ["RingReading"]

log = logging.getLogger("slabcast.broker")

_READ = 4096  # descriptors read from a ring at a time
_ROWS = 256  # up to this many, taken as tuples (descriptors.runs_of), else by column (RingReading._take)
# The compiled twin of descriptors.runs_of (core/_hot.c), any batch length; SLABCAST_PURE_PYTHON=1 keeps Python's.
_RUNS = None if HOT is None else HOT.runs


class RingReading:
    """The frames a publisher described, read from its ring, for :class:`~slabcast.broker.state.BrokerState`."""

    _now: float
    _out: list[Out]

    if TYPE_CHECKING:  # (BrokerState's)

        def _send(self, ident: bytes, message: Any, data: bytes | None = None) -> None: ...

        def _end_stream(self, stream: Stream, code: str, message: str) -> None: ...

        def _grant(self, stream: Stream) -> None: ...

    def _catch_up(self, stream: Stream) -> None:
        """Take the frames the publisher described in the ring since we last looked: the head, the pool's
        slab changes, statistics, history and broker-cut chunks, in order.  Runs before every message of
        the publisher, before a subscription starts, before a status, and at every sweep: the broker is on
        no frame's path, and always up to date when it decides."""
        if stream.ended or stream.reading:
            return
        ring = stream.ring
        position = ring.position
        stream.reading = True  # (ending it on a wrong descriptor comes back here)
        try:
            while stream.frames < position:
                start = stream.frames
                stop = min(position, start + _READ)
                raw = ring.read_bytes(start, stop)
                if raw is None:
                    raise Refused(P.ERR_FRAME, f"the ring was lapped past descriptor {start}: the publisher "
                                               f"wrote more than the pool lets it")  # fmt: skip
                # Compiled: checked and grouped into runs in one call.  Else a batch of a slab or less (a broker
                # woken per slab) as tuples, a longer one by column.
                frames, head, sample_bytes = stream.frames, stream.head, stream.sample_bytes
                runs = None if _RUNS is None else _RUNS(raw, frames, head, sample_bytes)
                if runs is None and stop - start > _ROWS:
                    self._take(stream, np.frombuffer(raw, DESCRIPTOR))
                else:
                    if not isinstance(runs, list):  # (or one out of sequence: Python's twin says which, how)
                        runs = runs_of(rows_of(raw), frames, head, sample_bytes)
                    self._take_runs(stream, runs)
        except Refused as exc:
            # A publisher that describes its frames wrongly (not this one: Python's checks them) ends its stream.
            log.error("stream %r: %s", stream.name, exc)
            if stream.publisher is not None:
                self._send(stream.publisher.ident, M.Error(exc.code, str(exc)))
            self._end_stream(stream, P.END_PUBLISHER_GONE, f"the publisher's frame descriptors are wrong: {exc}")
        finally:
            stream.reading = False

    def _take(self, stream: Stream, d: np.ndarray[Any, Any]) -> None:
        """Account for descriptors read from the ring (a ``DESCRIPTOR`` array), a run of frames back to back in
        one slab at a time: checked column by column, so the Python work is per run, not per frame."""
        count = len(d)
        sample_bytes = stream.sample_bytes
        n = d["n"].astype(np.uint64)
        ends = np.cumsum(n)  # samples up to the end of each frame
        index = d["index"]
        expect = stream.head + ends - n
        bad = (d["seq"] != np.arange(stream.frames, stream.frames + count, dtype=np.uint64)) | (index != expect) \
            | (n < 1)  # fmt: skip
        if bad.any():
            i = int(np.argmax(bad))
            raise wrong_descriptor(stream.frames + i, int(d["seq"][i]), int(index[i]), int(n[i]), int(expect[i]))
        offset, flags, t0 = d["offset"], d["flags"], d["t0"]
        # A run ends before a jump or where a frame does not follow the previous one's bytes (a new slab).
        starts = [0, *(np.flatnonzero((flags[1:] != 0) | (offset[1:] != offset[:-1] + n[:-1] * sample_bytes)) + 1)
                  .tolist(), count]  # fmt: skip
        floors = d["floor"]
        for a, b in itertools.pairwise(starts):
            first = int(index[a])
            ns = tuple(d["n"][a:b].tolist())
            total = int(ends[b - 1] - ends[a] + n[a])
            self._frame(stream, int(offset[a]), total, float(t0[a]), int(flags[a]) & P.FLAG_DISCONTINUITY,
                        (first - int(floors[a])) * sample_bytes, ns, tuple(t0[a:b].tolist()))  # fmt: skip
            stream.account(self._now, int(offset[a]), total, ns[-1], bool(int(flags[a]) & P.FLAG_DISCONTINUITY))

    def _take_runs(self, stream: Stream, runs: list[Run]) -> None:
        """Account for runs of frames (:func:`.descriptors.runs_of`), in order."""
        sample_bytes = stream.sample_bytes
        for offset, first, floor, flags, n, ns, t0s in runs:
            self._frame(stream, offset, n, t0s[0], flags & P.FLAG_DISCONTINUITY, (first - floor) * sample_bytes,
                        ns, t0s)  # fmt: skip
            stream.account(self._now, offset, n, ns[-1], bool(flags & P.FLAG_DISCONTINUITY))

    def _frame(self, stream: Stream, offset: int, n: int, t0: float, jump: int, carry: int,
               ns: tuple[int, ...] | None = None, t0s: tuple[float, ...] | None = None) -> None:  # fmt: skip
        """Account for frames (``n`` samples in all) the publisher wrote at ``offset``.

        Broker-cut subscribers get their chunks here; local-cut ones cut their own
        from the publisher's notice.
        """
        if stream.place(offset, n, carry) and not stream.ended:
            stream.switched(self._now)
            self._grant(stream)
        stream.fill(offset, n)
        stream.remember(stream.head, offset, ns or (n,), t0s or (t0,), jump)
        if stream.broker_cut:
            delivery.cut(stream, n, t0, jump, ns, t0s, self._now, self._out)
        else:
            stream.head += n
        stream.frames += len(ns) if ns else 1
