"""Where everything lies in a stream's segment: one small type for the broker, both Python clients and ``up``.

A segment (see :mod:`slabcast.core.shm` for the header's fields) is::

    0                         header: magic, layout, sizes, the slab generation table at byte 256
    header_bytes              slab 0: `reserve` bytes for the tail carried from the slab before, then frames
    header_bytes + slab_bytes slab 1
    ...
    times_offset              (streams with per-sample times) one f64 per sample slot of every slab
    ring_offset               the frame descriptor ring (:mod:`slabcast.core.ring`), on a page

The **carried part** of a slab is its first ``reserve`` bytes (the ``max_chunk_bytes`` a stream
opens with): when the publisher moves to a new slab it copies there the tail that subscribers may
still be accumulating (``carry`` bytes, at most ``reserve``), so every chunk lies contiguously in
the slab of the frame that completes it.  Memory for it is *committed* from its end backwards as
subscribers ask for longer chunks, and given back when none needs it
(:meth:`Geometry.carried_ranges`).  docs/architecture.md's glossary has these words.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .ring import RING_SLOTS, copy_into, ring_bytes

__all__ = ["GEN_OFFSET", "PAGE", "Geometry", "copy_carry", "generation", "header_bytes"]

PAGE = 4096  # the smallest header; header and slabs are whole pages
GEN_OFFSET = 256  # u32 gen[nslabs]: the slab generation table
RING_BYTES = ring_bytes(RING_SLOTS)


_GEN = struct.Struct("<I")


def generation(buf: Any, slab: int) -> int:
    """The generation of ``slab`` in a mapped segment ``buf`` (bumped by the broker at each grant)."""
    value: int = _GEN.unpack_from(buf, GEN_OFFSET + 4 * slab)[0]
    return value


def header_bytes(nslabs: int) -> int:
    """Bytes before slab 0 for a pool of ``nslabs`` slabs (room for the generation table, whole pages)."""
    return -(-(GEN_OFFSET + 4 * nslabs) // PAGE) * PAGE


@dataclass(frozen=True, slots=True)
class Geometry:
    """The layout of one stream's segment.

    Parameters
    ----------
    nslabs : int
        Slabs in the pool.
    slab_bytes : int
        Bytes per slab (a multiple of 4096), its carried part included.
    sample_bytes : int
        Bytes per sample (dtype itemsize x channels).
    reserve : int
        Bytes at the start of each slab for the carried tail (its carried part): the longest chunk the
        stream admits.
    timestamps : bool
        The stream keeps a time (f64) per sample, in tables after the slabs.
    """

    nslabs: int
    slab_bytes: int
    sample_bytes: int
    reserve: int
    timestamps: bool = False

    @property
    def header_bytes(self) -> int:
        """Where slab 0 starts."""
        return header_bytes(self.nslabs)

    @property
    def frame_bytes(self) -> int:
        """The most bytes one frame may take: a slab without its carried part."""
        return self.slab_bytes - self.reserve

    @property
    def times_offset(self) -> int:
        """Where the per-sample time tables start (right after the slabs)."""
        return self.header_bytes + self.nslabs * self.slab_bytes

    @property
    def ring_offset(self) -> int:
        """Where the frame descriptor ring starts (after the time tables, on a page)."""
        times = 8 * (self.slab_bytes // self.sample_bytes) * self.nslabs if self.timestamps else 0
        return -(-(self.times_offset + times) // PAGE) * PAGE

    @property
    def segment_bytes(self) -> int:
        """The whole segment: header, slabs, the time tables when the stream keeps per-sample times, the ring."""
        return self.ring_offset + RING_BYTES

    def slab_start(self, slab: int) -> int:
        """The segment byte where ``slab`` starts (its carried part first)."""
        return self.header_bytes + slab * self.slab_bytes

    def data_start(self, slab: int) -> int:
        """The segment byte where ``slab``'s frames start (just after its carried part)."""
        return self.slab_start(slab) + self.reserve

    def data_ranges(self) -> list[tuple[int, int]]:
        """Every slab's frame area, ``[data_start, slab end)``, as segment ranges: memory always committed (the
        carried part before it is committed as far as subscribers ask)."""
        return [(self.data_start(s), self.slab_start(s) + self.slab_bytes) for s in range(self.nslabs)]

    def slab_of(self, offset: int) -> int:
        """The slab holding segment byte ``offset``."""
        return (offset - self.header_bytes) // self.slab_bytes

    def time_at(self, offset: int) -> int:
        """The byte where the time of the sample at segment byte ``offset`` is kept.

        Sample slot ``k`` of slab ``i`` (the sample at ``slab_start(i) + k * sample_bytes``) has its
        time at ``times_offset + 8 * (i * slots + k)``, ``slots = slab_bytes // sample_bytes``.
        """
        slab, within = divmod(offset - self.header_bytes, self.slab_bytes)
        return self.times_offset + 8 * (slab * (self.slab_bytes // self.sample_bytes) + within // self.sample_bytes)

    def carried_ranges(self, lo: int | Sequence[int], hi: int, frames: bool = False,
                       slabs: Iterable[int] | None = None) -> list[tuple[int, int]]:  # fmt: skip
        """The ``(offset, length)`` ranges of each slab's carried part between ``lo`` (per slab, or one for
        all) and ``hi`` bytes before its data (and, with ``frames``, of its frame area), with their
        per-sample times when the stream keeps them; for ``slabs`` (default: all), those whose ``lo`` is
        below ``hi``."""
        out: list[tuple[int, int]] = []
        for slab in range(self.nslabs) if slabs is None else slabs:
            low = lo if isinstance(lo, int) else lo[slab]
            if low >= hi and not frames:
                continue
            data = self.data_start(slab)
            first, end = data - hi, (self.slab_start(slab + 1) if frames else data - low)
            out.append((first, end - first))
            if self.timestamps:
                at = self.time_at(first)
                out.append((at, self.time_at(end - 1) + 8 - at))
        return out


def copy_carry(u8: Any, geometry: Geometry, old_end: int, data: int, hi: int, lo: int = 0) -> None:
    """Copy the bytes ``hi`` to ``lo`` before ``old_end`` (the old slab's write position) to just before
    ``data`` (the new slab's frames), with their per-sample times: the carried tail of a slab change.

    ``u8`` is the segment as a writable ``uint8`` array.  The publisher copies the whole carry
    (``lo = 0``); the broker copies only the older part a subscription asked for after the
    publisher last heard how much to carry.
    """
    copy_into(u8, data - hi, u8[old_end - hi : old_end - lo])  # (as a frame is copied: core/ring.py)
    if geometry.timestamps:
        at = geometry.time_at
        copy_into(u8, at(data - hi), u8[at(old_end - hi) : at(old_end - lo)])
