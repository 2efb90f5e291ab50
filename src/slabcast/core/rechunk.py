"""The rechunking rules: which samples of a stream make up each chunk of one subscriber.

A :class:`Rechunker` never touches sample data.  It is fed the position of each
frame (absolute index of its first sample, its length, its timestamp) and answers
with the chunks that frame completes, as ``(start_index, length, t0)``.  The broker
runs one per subscriber over shared memory; :class:`slabcast.BufferEmit` runs one
over its in-process buffers.  Both therefore cut exactly the same chunks.

:class:`Rechunker` is the compiled twin (core/_hot.c) when the C extension was built, else
:class:`PyRechunker`: the same steps in the same order with the same float arithmetic
(tests/unit/test_rechunk_compiled.py compares every chunk of both, bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from .ring import HOT

__all__ = ["PyRechunker", "Rechunker", "check_sampler", "check_size", "is_integer", "is_real"]

# Timestamps are floats; a sample whose time is within this of the pause end counts as after it.
_EPS = 1e-9


def is_real(value: Any) -> TypeGuard[float]:
    """Whether ``value`` is a real number: an int or a float, numpy's integer and floating scalars too (sizes and
    seconds computed with numpy), never a bool."""
    return isinstance(value, Real) and not isinstance(value, bool | np.bool_ | np.timedelta64)


def is_integer(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is an integer (numpy's integer scalars too), never a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool | np.bool_ | np.timedelta64)


def check_size(size: Any, what: str = "size", unit: str = "samples") -> int:
    """Return ``size`` as an int if it is a positive integer (a whole float or a numpy scalar too), else raise a
    clear error naming ``what`` and its ``unit``."""
    if not is_real(size) or not math.isfinite(size) or int(size) != size:
        raise TypeError(f"{what} must be a positive integer number of {unit}, got {size!r}")
    if size <= 0:
        raise ValueError(f"{what} must be a positive integer number of {unit}, got {size!r}")
    return int(size)


def check_sampler(sampler: Any) -> Callable[[], float] | None:
    """Normalise a sampler: ``None``/``0`` -> no sampler, a number -> constant, a callable -> itself.

    As in ocycle, a sampler of ``0`` means "no sampler", while a callable that
    returns ``0`` is a sampler (and so drops the remainder after each chunk).

    Raises
    ------
    TypeError
        If ``sampler`` is neither a number nor a zero-argument callable.
    ValueError
        If it is a negative or non-finite number.
    """
    if sampler is None:
        return None
    if callable(sampler):
        return sampler  # type: ignore[no-any-return]
    if not is_real(sampler):
        raise TypeError(f"sampler must be seconds (a number) or a zero-argument callable, got {sampler!r}")
    value = float(sampler)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"sampler must be a finite number of seconds >= 0, got {sampler!r}")
    if value == 0:
        return None
    return lambda: value


class PyRechunker:
    """Cut one subscriber's chunks out of a stream of frames (the rules in Python; :class:`Rechunker` is the one
    to use: compiled when it can be).

    Parameters
    ----------
    size : int
        Chunk size in samples.
    clip : bool
        ``False``: a chunk is emitted once at least ``size`` samples have
        accumulated and holds whole frames.  ``True``: every chunk has exactly
        ``size`` samples and the remainder starts the next chunk.
    rate : float or None
        Samples per second.  With a rate, chunk ``t0`` is exact to the sample
        and the sampler skips by sample time; without one, ``t0`` is that of the
        frame holding the chunk's first sample and the sampler skips whole frames
        (ocycle's rule).
    sampler : callable or None
        Returns the seconds of stream time to skip after each chunk.  With a
        sampler, the remainder after a chunk is dropped, never carried.
    """

    __slots__ = ("clip", "jumped", "last_t0", "pause_at", "pause_until", "rate", "sampler", "size", "start", "t0")

    def __init__(
        self,
        size: int,
        clip: bool = False,
        rate: float | None = None,
        sampler: Callable[[], float] | None = None,
    ) -> None:
        self.size = check_size(size)
        self.clip = bool(clip)
        self.rate = float(rate) if rate else None
        self.sampler = sampler
        self.start: int | None = None  # index of the first pending sample
        self.t0 = 0.0  # time of the first pending sample
        self.pause_until: float | None = None  # no rate: the sampler's pause ends at this frame time
        self.pause_at: int | None = None  # with a rate: the pause ends at this stream index
        self.last_t0 = -math.inf  # the previous frame's time (no rate: a clock step back restarts the pause)
        self.jumped = False  # the schedule restarted on a clock step back (no rate); the caller clears it

    def needed(self, end: int) -> int | None:
        """Samples past stream index ``end`` (where everything fed so far ends) that the next chunk needs before it
        can be cut, at least; None when that depends on the frames' times (a sampler's pause without a rate)."""
        if self.pause_until is not None:
            return None
        start = self.start
        if start is None:
            start = end if self.pause_at is None else max(end, self.pause_at)
        return start + self.size - end

    def feed_until(
        self, index: int, ns: Sequence[int], t0s: Sequence[float], i: int
    ) -> tuple[int, int, list[tuple[int, int, float]]]:
        """:meth:`feed` the frames of a run from its frame ``i`` on (``ns`` samples each, first samples at
        ``t0s`` seconds; frame ``i`` starts at stream index ``index``, each next one right after), up to the first
        that completes a chunk, or the run's last: that frame's place in the run, its stream index and what
        :meth:`feed` returned for it (a subscriber reading many frames at once: one call, not one a frame)."""
        if not 0 <= i < len(ns) or len(t0s) != len(ns):
            raise ValueError(f"feed_until: frame {i} of a run of {len(ns)} frames ({len(t0s)} times)")
        last = len(ns) - 1
        while True:
            n = ns[i]
            chunks = self.feed(index, n, t0s[i])
            if chunks or i == last:
                return i, index, chunks
            index += n
            i += 1

    def feed(self, index: int, n: int, t0: float) -> list[tuple[int, int, float]]:
        """Account for a frame of ``n`` samples starting at stream index ``index`` at time ``t0``.

        Frames must be fed in order and without gaps.  Returns the chunks this
        frame completes, oldest first, as ``(start_index, length, t0)``.

        With a rate the sampler's pause is counted in samples, so a step of the
        timestamps (``time.time()`` set back or forward) never changes what is
        skipped.  Without one it is counted in frame time; a frame older than the
        one before restarts the schedule (the pause ends there) and sets
        :attr:`jumped`, so the caller can flag its next chunk.
        """
        end = index + n
        start = self.start
        # Fast path: no pause, chunk still incomplete after this frame.
        if self.pause_until is None and self.pause_at is None and start is not None and end - start < self.size:
            return []
        rate = self.rate
        if rate is None:
            if t0 < self.last_t0 and self.pause_until is not None:
                self.pause_until = None  # the clock stepped back: skipping "until then" could last for hours
                self.jumped = True
            self.last_t0 = t0
        out: list[tuple[int, int, float]] = []
        pos = index
        while True:
            if self.pause_until is not None:
                # Whole-frame skipping; after a sampled chunk the rest of its frame is dropped.
                if pos != index or t0 < self.pause_until:
                    break
                self.pause_until = None
            elif self.pause_at is not None:
                if self.pause_at >= end:
                    break
                pos = max(pos, self.pause_at)
                self.pause_at = None
            if self.start is None:
                self.start = pos
                self.t0 = t0 + (pos - index) / rate if rate else t0
            start = self.start
            if end - start < self.size:
                break
            length = self.size if self.clip else end - start
            out.append((start, length, self.t0))
            stop = start + length
            if self.sampler is not None:
                pause = float(self.sampler())
                if not 0 <= pause < math.inf:  # also catches NaN (inf: as a constant sampler=inf, refused)
                    raise ValueError(f"sampler must return a finite number of seconds >= 0, got {pause!r}")
                if rate:
                    self.pause_at = stop + math.ceil(pause * rate - _EPS)
                else:
                    self.pause_until = t0 + pause
                self.start = None
                pos = stop
                continue
            if stop >= end:
                self.start = None
                break
            self.start = pos = stop
            self.t0 = t0 + (stop - index) / rate if rate else t0
        return out


if TYPE_CHECKING or HOT is None:
    Rechunker = PyRechunker
else:

    class Rechunker(HOT.Rechunker):  # type: ignore[misc,name-defined]
        __doc__ = PyRechunker.__doc__.replace(" (the rules in Python; :class:`Rechunker` is the one\n    to use: "
                                              "compiled when it can be)", " (compiled: core/_hot.c)")  # fmt: skip
        __slots__ = ()

        def __init__(
            self, size: int, clip: bool = False, rate: float | None = None,
            sampler: Callable[[], float] | None = None,
        ) -> None:  # fmt: skip
            super().__init__(check_size(size), bool(clip), float(rate) if rate else None, sampler)
