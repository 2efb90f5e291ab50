"""Segment geometry (core/geometry.py): one type says where every part of a segment lies."""

from __future__ import annotations

import numpy as np
import pytest

from slabcast.core.geometry import GEN_OFFSET, RING_BYTES, Geometry, copy_carry, header_bytes
from slabcast.core.ring import DESCRIPTOR_BYTES, RING_SLOTS


@pytest.mark.parametrize("nslabs", [2, 8, 960, 961, 999, 1000, 1023, 1024, 4096])
def test_the_header_holds_the_generation_table_in_whole_pages(nslabs):
    h = header_bytes(nslabs)
    assert h % 4096 == 0 and h >= GEN_OFFSET + 4 * nslabs and h - 4096 < GEN_OFFSET + 4 * nslabs


def test_slabs_frames_and_times_lie_where_the_protocol_says():
    g = Geometry(nslabs=4, slab_bytes=8192, sample_bytes=8, reserve=2048, timestamps=True)
    assert g.header_bytes == 4096 and g.frame_bytes == 6144
    assert [g.slab_start(i) for i in range(4)] == [4096, 12288, 20480, 28672]
    assert g.data_start(1) == 12288 + 2048 and g.slab_of(12288 + 5000) == 1
    assert g.times_offset == 4096 + 4 * 8192
    slots = 8192 // 8
    assert g.time_at(g.slab_start(2) + 3 * 8) == g.times_offset + 8 * (2 * slots + 3)
    assert g.ring_offset == g.times_offset + 8 * slots * 4  # the descriptor ring after the time tables
    assert g.segment_bytes == g.ring_offset + RING_SLOTS * DESCRIPTOR_BYTES + 4096  # and the sleeper table
    assert Geometry(4, 8192, 8, 2048).ring_offset == g.times_offset  # no times: the ring follows the slabs


def test_carried_ranges_cover_the_carried_part_from_its_end_backwards_with_their_times():
    g = Geometry(nslabs=2, slab_bytes=8192, sample_bytes=4, reserve=4096, timestamps=True)
    ranges = g.carried_ranges(1024, 2048)  # grow every slab's committed room from 1024 to 2048 bytes
    d0, d1 = g.data_start(0), g.data_start(1)
    assert ranges == [(d0 - 2048, 1024), (g.time_at(d0 - 2048), 8 * 256),
                      (d1 - 2048, 1024), (g.time_at(d1 - 2048), 8 * 256)]  # fmt: skip
    assert g.carried_ranges([2048, 1024], 2048) == ranges[2:]  # per slab: only those below
    whole = g.carried_ranges(0, 1024, frames=True, slabs=[1])
    assert whole[0] == (d1 - 1024, g.slab_start(2) - (d1 - 1024))


def test_copy_carry_moves_the_tail_and_its_times_before_the_new_slabs_frames():
    g = Geometry(nslabs=2, slab_bytes=8192, sample_bytes=4, reserve=1024, timestamps=True)
    u8 = np.zeros(g.segment_bytes, np.uint8)
    old_end = g.data_start(0) + 400  # 100 samples written in slab 0
    u8[old_end - 40 : old_end] = np.arange(40, dtype=np.uint8)
    times = u8[g.time_at(old_end - 40) : g.time_at(old_end)].view("<f8")
    times[:] = np.arange(10, dtype=np.float64) + 0.5
    data = g.data_start(1)
    copy_carry(u8, g, old_end, data, 40)
    assert np.array_equal(u8[data - 40 : data], np.arange(40, dtype=np.uint8))
    assert np.array_equal(u8[g.time_at(data - 40) : g.time_at(data)].view("<f8"), np.arange(10) + 0.5)
    copy_carry(u8, g, old_end, data, 40, lo=20)  # the broker's part: only the older 20 bytes
    assert np.array_equal(u8[data - 40 : data - 20], np.arange(20, dtype=np.uint8))


@pytest.mark.parametrize("nslabs", [8, 961, 1000, 2000])
def test_ups_sizing_counts_the_header_the_broker_makes(nslabs):
    # up estimated the header as 4096 * (1 + nslabs // 1000): a page short for nslabs 961..999 and others.
    from slabcast.cli.up_config import _size_pool

    class Info:
        dtype = np.dtype("float32")
        channels = 1
        rate = 1000.0
        timestamps = False

    pool = {"nslabs": nslabs}
    got = _size_pool("c.toml", "s", Info(), pool, [])
    assert (got - header_bytes(nslabs) - RING_BYTES) % nslabs == 0, (got, header_bytes(nslabs))  # (and the ring)
