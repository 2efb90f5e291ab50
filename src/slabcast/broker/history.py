"""History: where a subscription asking for ``seconds`` back starts, and the frames it is told of.

A stream keeps, per slab not granted again, the descriptors of the frames written in it
(:attr:`Stream.kept`, :meth:`Stream.remember`).  A subscriber joining with ``history=``
(``Subscriber(history=)``, ``slabcast record --pre-buffer``) starts that far back: the
broker finds the start, keeps those slabs from reuse, carries what chunks spanning their
slab changes need, and describes the frames in HISTORY messages (protocol 8).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ..core.geometry import copy_carry
from ..core.pool import FREE
from ..wire import messages as M
from ..wire import protocol as P
from .model import Stream

__all__ = ["history", "kept_frames", "since", "times_at"]


def kept_frames(stream: Stream, slab: int) -> list[tuple[int, int, int, float, int]]:
    """The frames kept of ``slab``, one by one: (index, offset, n, t0, flags)."""
    frames = []
    sample_bytes = stream.sample_bytes
    for index, offset, ns, t0s, jump in stream.kept[slab][1]:
        for n, t0 in zip(ns, t0s, strict=True):
            frames.append((index, offset, n, t0, jump))
            jump = 0
            index += n
            offset += n * sample_bytes
    return frames


def times_at(stream: Stream, offset: int, n: int) -> Any:
    """The per-sample times (float64, the publisher's clock) of the ``n`` samples from segment byte ``offset``."""
    at = stream.geometry.time_at(offset)
    return stream.u8[at : at + 8 * n].view("<f8")


def since(stream: Stream, seconds: float) -> int:
    """The index history ``seconds`` back starts at on a stream without a rate (see :func:`history`), or 0
    when the pool holds nothing that old."""
    frames = sorted(f for slab in stream.kept for f in kept_frames(stream, slab))
    if not frames:
        return stream.head
    index, offset, n, t0, _ = frames[-1]
    timed = stream.geometry.timestamps
    cutoff = (times_at(stream, offset, n)[-1] if timed else t0) - seconds
    for index, offset, n, t0, _ in reversed(frames):
        if not timed:
            if t0 <= cutoff:
                return index
            continue
        earlier = np.flatnonzero(times_at(stream, offset, n) < cutoff)
        if len(earlier):
            return index + int(earlier[-1]) + 1
    return 0


def history(stream: Stream, seconds: float, size: int) -> tuple[int, list[M.History]]:
    """What a local subscription asking for ``seconds`` of history (in chunks of ``size``) starts with:
    its start index and the HISTORY messages describing the frames from there to the head, oldest first.

    The start is ``round(seconds * rate)`` samples before the head on a stream with a rate (a frame is
    cut in two there).  Without a rate it is by the samples' own times, ``seconds`` before the newest
    sample's: the first sample at or after that time where the stream keeps per-sample times (a frame
    is cut there), else the frame holding that time (the newest frame whose t0 is at or before it).
    It is the oldest sample of the newest unbroken run of slabs not granted again since they were
    written when that is later: then the first message has ``FLAG_DISCONTINUITY``.  The slabs it lies
    in are kept from reuse (a free one goes back to retired; the subscription's cursor gates them), and
    each slab change in it carries chunks of ``size``: the broker copies the older part of a carry a
    slab lacks, as at a slab change (nobody reads a carried part below its floor).
    """
    head, sample_bytes = stream.head, stream.sample_bytes
    want = max(0, head - round(seconds * stream.rate)) if stream.rate else since(stream, seconds)
    order = sorted((frames[0][0], slab) for slab, (_, frames) in stream.kept.items() if frames)
    chain: list[int] = []
    end = head
    for first, slab in reversed(order):
        last = stream.kept[slab][1][-1]
        if last[0] + sum(last[2]) != end or end <= want:
            break
        chain.append(slab)
        end = first
    chain.reverse()
    runs: list[tuple[int, list[tuple[int, int, int, float, int]]]] = []  # (slab, frames)
    start = head
    for slab in chain:
        frames = [f for f in kept_frames(stream, slab) if f[0] + f[2] > want]
        if frames and not runs and frames[0][0] < want:
            index, offset, n, t0, jump = frames[0]
            k = want - index  # cut the frame: history starts exactly there
            at = offset + k * sample_bytes
            frames[0] = (want, at, n - k, t0 + k / stream.rate if stream.rate else times_at(stream, at, 1)[0], jump)
        if frames:
            runs.append((slab, frames))
            start = min(start, frames[0][0])
    # Chunks may span each slab change of the history: carry enough (the older slab is intact).
    need_max = min(stream.committed, size * sample_bytes) // sample_bytes * sample_bytes
    geometry = stream.geometry
    for (old_slab, older), (slab, frames) in itertools.pairwise(runs):
        floors = stream.kept[slab][0]
        first, data = frames[0][0], frames[0][1]
        old_floor = stream.kept[old_slab][0][0]
        newest = older[-1]
        old_end = newest[1] + newest[2] * sample_bytes
        need = min(need_max, (first - old_floor) * sample_bytes)
        carried = (first - floors[0]) * sample_bytes
        if need > carried:
            copy_carry(stream.u8, geometry, old_end, data, need, carried)
            floors[0] = first - need // sample_bytes
            if slab == stream.pool.current:
                stream.floor = floors[0]
    for slab, frames in runs:
        if stream.pool.state[slab] == FREE:
            newest = frames[-1]
            stream.pool.retain(slab, newest[0] + newest[2])
    out: list[M.History] = []
    short = P.FLAG_DISCONTINUITY if start > want else 0
    if not runs and short:
        out.append(M.History(head, 0, 0, 0, (), (), short, head))
    for slab, frames in runs:
        gen, floor = int(stream.gens[slab]), stream.kept[slab][0][0]
        i = 0
        while i < len(frames):
            # One message per run of frames that starts a slab or follows a jump, at most MAX_BATCH long.
            j = i + 1
            while j < len(frames) and j - i < P.MAX_BATCH and not frames[j][4]:
                j += 1
            part = frames[i:j]
            out.append(M.History(part[0][0], slab, gen, part[0][1], tuple(f[2] for f in part),
                                 tuple(f[3] for f in part), part[0][4] | short, floor))  # fmt: skip
            short = 0
            i = j
    return start, out
