"""Frame descriptors read from a publisher's ring, checked and grouped into runs: what the broker accounts for
(each run is a slab's worth of frames back to back, or one after a jump)."""

from __future__ import annotations

from typing import Any

from ..core.ring import Descriptor
from ..wire import protocol as P
from .checks import Refused

__all__ = ["Run", "runs_of", "wrong_descriptor"]


# A run of frames back to back in one slab: its first frame's byte, index, floor and flags, its samples in all,
# and each frame's samples and t0.
Run = tuple[int, int, int, int, int, tuple[int, ...], tuple[float, ...]]


def runs_of(rows: list[Descriptor], seq_next: int, head: int, sample_bytes: int) -> list[Run]:
    """Descriptors read from the ring (``Ring.read``), checked and grouped into runs, a new run at a flag or where a
    frame does not start at the previous one's end byte (a new slab): what a broker woken once per slab reads.
    (Numpy's cost per call, some 50 calls, 170-250 us cold, outweighs this loop there: 15 frames of a paced
    publisher about 40 us, 128 of a flat-out one 130-210 us against 210-310; core/_hot.c's ``runs`` is its
    compiled twin.)

    Raises
    ------
    Refused
        A descriptor out of sequence: its seq not ``seq_next`` and on, its index not where the previous frame
        ended (``head`` first), or no samples.
    """
    runs: list[list[Any]] = []  # [offset, first index, floor, flags, ns, t0s]
    end = -1  # the byte after the current run's last frame
    ns: list[int] = []
    t0s: list[float] = []
    for seq, index, t0, offset, floor, n, _slab, _gen, flags in rows:
        if seq != seq_next or index != head or n < 1:
            raise wrong_descriptor(seq_next, seq, index, n, head)
        if flags or offset != end:  # a jump, or not the previous frame's next bytes (a new slab): a new run
            ns, t0s = [n], [t0]
            runs.append([offset, index, floor, flags, ns, t0s])
        else:
            ns.append(n)
            t0s.append(t0)
        end = offset + n * sample_bytes
        seq_next += 1
        head += n
    return [(offset, first, floor, flags, sum(run_ns), tuple(run_ns), tuple(run_t0s))
            for offset, first, floor, flags, run_ns, run_t0s in runs]  # fmt: skip


def wrong_descriptor(at: int, seq: int, index: int, n: int, expect: int) -> Refused:
    """The refusal of descriptor ``at`` of a ring, which says ``seq``, ``index``, ``n``."""
    return Refused(P.ERR_FRAME, f"descriptor {at} says seq {seq}, index {index}, n {n}; expected seq {at}, "
                                f"index {expect}, n >= 1")  # fmt: skip
