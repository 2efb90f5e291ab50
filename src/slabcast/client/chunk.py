"""A chunk: what a subscriber hands out, whichever transport brought it (a view of shared memory or of a message)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._exceptions import ClosedError
from .._info import StreamInfo
from ..wire import protocol as P
from .markers import decode_markers

__all__ = ["Chunk"]


class Chunk:
    """One chunk of a stream, leased to this subscriber until released.

    Attributes
    ----------
    data : numpy.ndarray
        Read-only view into shared memory, ``(n,)`` for one channel, else
        ``(n, channels)``.  Valid until :meth:`release`.
    t0 : float
        Timestamp of the first sample.
    index : int
        Absolute index of the first sample in the stream.
    seq : int
        This subscriber's chunk counter; a gap means chunks were dropped.
    discontinuity : bool
        The stream jumped before this chunk (source swap, broker restart).
    markers : list of str
        A marker stream's events as strings (``data`` holds them as UTF-8 bytes).

    Notes
    -----
    Leaving a ``with chunk:`` block releases it.  The memory goes back to the
    pool only once every numpy view taken from ``data`` is gone as well, so a
    view kept past the release stays intact.
    """

    __slots__ = ("_data", "_info", "_on_release", "_times_at", "flags", "index", "seq", "t0")

    def __init__(
        self,
        data: np.ndarray[Any, Any],
        seq: int,
        index: int,
        t0: float,
        flags: int,
        info: StreamInfo,
        on_release: Callable[[], None],
        times_at: tuple[Any, int] | None = None,
    ) -> None:
        # Made by a subscriber's transport: ``on_release`` is told of release(); ``times_at`` is the
        # (mapping, byte offset) of the per-sample times kept in shared memory, if the stream keeps them.
        self._data: np.ndarray[Any, Any] | None = data
        self.seq = seq
        self.index = index
        self.t0 = t0
        self.flags = flags
        self._info = info
        self._on_release = on_release
        self._times_at = times_at

    @property
    def data(self) -> np.ndarray[Any, Any]:
        """The samples, a read-only view of shared memory."""
        if self._data is None:
            raise ClosedError(f"chunk seq={self.seq} was released; keep a view or copy before releasing")
        return self._data

    @property
    def markers(self) -> list[str]:
        """A marker stream's samples as Python strings, one per sample (UTF-8 decoded, the NUL padding gone).

        Raises
        ------
        TypeError
            If the stream is not a marker stream (one channel of ``S<N>``: :class:`slabcast.MarkerPublisher`).
        """
        return decode_markers(self.data)

    @property
    def discontinuity(self) -> bool:
        """Whether the stream jumped right before this chunk."""
        return bool(self.flags & P.FLAG_DISCONTINUITY)

    @property
    def times(self) -> np.ndarray[Any, Any]:
        """``(n,)`` seconds, one per sample, on the publisher's clock (``time.time()`` for hosted sources).

        For a stream with ``info.timestamps`` (an LSL source keeps each sample's own
        stamp), read from the chunk's slab: a read-only copy (8 bytes a sample) that
        stays valid after the chunk is released; else computed as ``t0 + k / rate``
        (``t0`` for every sample without a rate).
        """
        if self._data is None:
            raise ClosedError(f"chunk seq={self.seq} was released")
        info = self._info
        n = len(self._data)
        if info.timestamps and self._times_at is not None:
            mm, at = self._times_at
            # A copy (8 bytes a sample): it stays right after the chunk is released and its slab reused.
            times = np.frombuffer(mm, dtype="<f8", count=n, offset=at).copy()
            times.flags.writeable = False
            return times
        step = 1.0 / info.rate if info.rate else 0.0
        return self.t0 + np.arange(n, dtype=np.float64) * step

    @property
    def info(self) -> StreamInfo:
        """What the chunk's stream carries (name, dtype, channels, rate, channel names, types, units)."""
        return self._info

    @property
    def partial(self) -> bool:
        """Whether this is a shorter chunk of what was gathered when the stream ended, or before a discontinuity
        (``partial_tail=True``)."""
        return bool(self.flags & P.FLAG_PARTIAL)

    def release(self) -> None:
        """Give the chunk back (idempotent); its memory is reused once no view of it remains."""
        if self._data is not None:
            self._data = None
            self._on_release()

    def __len__(self) -> int:
        return 0 if self._data is None else len(self._data)

    def __enter__(self) -> Chunk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._data is None else f"{len(self._data)} samples"
        return f"<Chunk seq={self.seq} index={self.index} t0={self.t0:.6f} {state}>"
