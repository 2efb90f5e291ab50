"""A stream's rolling per-channel statistics, reduced when asked from the frames still in the pool."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

__all__ = ["Statistics"]

_MAX_STAT_RUNS = 65536  # runs of frames kept for statistics, whatever their t0


class Statistics:
    """Rolling per-channel statistics over the last ``window`` seconds of stream time, computed when asked.

    The broker reads the frames' descriptors from the ring in runs (frames back to back in one slab, read
    together) and keeps where each run lies (its slab, generation, offset, size): a list per run, no sample
    read, nothing per frame.  :meth:`summary` (STATS, ``slabcast status``) reduces the samples in the window
    that are still in the pool, a block of contiguous runs at a time, so the cost is per request, not per
    frame.  Bounded whatever the frames' ``t0`` (constant, NaN, backwards, longer than the window): samples
    are kept by *count* (the newest ``window * rate``, or the newest frame if it is longer) and runs by
    number (``_MAX_STAT_RUNS``), never by time.  Samples whose slab was granted again (a window longer than
    the pool holds) are left out: ``window_samples`` says how many samples the figures are of.
    """

    def __init__(self, dtype: np.dtype[Any], channels: int, rate: float | None) -> None:
        self.dtype = dtype
        self.channels = channels
        self.rate = rate
        self.window = 0.0
        self.limit = 0  # samples kept
        self.kept = 0
        self.sample_bytes = dtype.itemsize * channels
        # Per run of frames read together: [arrival, n, slab, generation, offset].
        self.runs: deque[list[Any]] = deque()

    def configure(self, window: float) -> None:
        self.window = window
        self.limit = max(1, round(window * self.rate)) if self.rate else 0

    def account(self, now: float, n: int, last: int, slab: int, gen: int, offset: int, jump: bool = False) -> None:
        """A run of frames, ``n`` samples back to back from ``offset`` of ``slab`` (generation ``gen``), the newest
        of them ``last`` samples long, was read from the ring at ``now`` (the broker's monotonic clock).
        ``jump``: its first frame is flagged as a discontinuity (a source restarted): the window starts again
        there, so neither the figures nor the observed rate mix what came before the gap."""
        runs = self.runs
        if jump:
            runs.clear()
            self.kept = 0
        runs.append([now, n, slab, gen, offset])
        kept = self.kept + n
        popleft = runs.popleft
        if self.rate:
            # Keep the newest `limit` samples (by count: t0 may be anything), or the newest frame if longer.
            keep = max(self.limit, last)
            while len(runs) > 1 and kept - runs[0][1] >= keep:
                kept -= popleft()[1]
            if kept > keep:  # the oldest run kept begins before the window: cut its front off
                first, cut = runs[0], kept - keep
                first[1] -= cut
                first[4] += cut * self.sample_bytes
                kept = keep
        else:
            # No rate: the window is arrival time, which only moves forward.
            horizon = now - self.window
            while len(runs) > 1 and runs[0][0] < horizon:
                kept -= popleft()[1]
        while len(runs) > _MAX_STAT_RUNS:
            kept -= popleft()[1]
        self.kept = kept

    def summary(self, out: dict[str, Any], u8: np.ndarray[Any, Any] | None = None,
                gens: np.ndarray[Any, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """Add the window's figures to ``out``, reduced from the samples of the segment ``u8`` still in the pool
        (``gens``: each slab's generation now)."""
        runs = self.runs
        if not runs or u8 is None or gens is None:
            return out
        sample_bytes = self.sample_bytes
        blocks: list[list[int]] = []  # [offset, bytes] of contiguous frames still in the pool
        n = 0
        for _, count, slab, gen, offset in runs:
            if gens[slab] != gen:
                continue  # written again since: not in the pool any more
            nbytes = count * sample_bytes
            if blocks and blocks[-1][0] + blocks[-1][1] == offset:
                blocks[-1][1] += nbytes
            else:
                blocks.append([offset, nbytes])
            n += count
        if not n:
            return out
        parts = []
        for offset, nbytes in blocks:
            v = u8[offset : offset + nbytes].view(self.dtype).reshape(-1, self.channels)
            # Reductions down the strided sample axis are several times slower than along
            # contiguous rows: one channels-first copy pays for itself.
            w = np.ascontiguousarray(v.T)
            parts.append((w.sum(axis=1, dtype=np.float64), np.einsum("ij,ij->i", w, w, dtype=np.float64),
                          w.min(axis=1), w.max(axis=1)))  # fmt: skip
        total = np.sum([p[0] for p in parts], axis=0)
        squares = np.sum([p[1] for p in parts], axis=0)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
        lo = np.min([p[2] for p in parts], axis=0)
        hi = np.max([p[3] for p in parts], axis=0)
        # The broker reads the ring lazily, in batches: a frame's arrival is when its batch was read, and
        # every frame of a later batch was written after the first batch's read. So the samples of the
        # later batches came in the time from the first batch's read to the last's (not "all but the
        # first frame", which a batch of many frames made 2-10% high).
        first = runs[0][0]
        later = sum(r[1] for r in runs if r[0] > first)
        span = runs[-1][0] - first
        out.update(
            window_samples=n,
            observed_rate=later / span if span > 0 else None,
            mean=mean.tolist(),
            std=std.tolist(),
            min=lo.tolist(),
            max=hi.tolist(),
            ptp=(hi.astype(np.float64) - lo).tolist(),
        )
        return out
