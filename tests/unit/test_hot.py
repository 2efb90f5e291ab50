"""The compiled frame path (core/_hot.c, ``Writer.put``) against the publisher's Python steps, byte for byte, over
an anonymous shared mapping: no broker, no processes."""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from slabcast.client._pubargs import _element_format
from slabcast.core import ring as R
from slabcast.core.ring import DESCRIPTOR_BYTES, Ring, ring_bytes
from tests.unit.test_ring import _asleep_in_futex

if R.HOT is None:
    if os.environ.get("SLABCAST_REQUIRE_C") == "1":
        pytest.fail("the compiled module (core/_hot.c) is not built (SLABCAST_REQUIRE_C=1)", pytrace=False)
    pytest.skip("the compiled module (core/_hot.c) is not built", allow_module_level=True)

SLOTS = 8
RING_AT = 16 * 4096  # the segment: header page, slabs up to here, then the ring
DTYPE = np.dtype(np.int16)
CHANNELS = 2
SB = DTYPE.itemsize * CHANNELS
LIMIT = 4096  # frame_limit, bytes
END = RING_AT  # a slab that ends where the ring starts


@pytest.fixture
def seg() -> Iterator[mmap.mmap]:
    mapping = mmap.mmap(-1, RING_AT + ring_bytes(SLOTS))
    yield mapping
    mapping.close()


@pytest.fixture
def ring(seg: mmap.mmap) -> Iterator[Ring]:
    r = Ring(seg, RING_AT, slots=SLOTS)
    r.format()
    yield r
    r.release()


@pytest.fixture
def writer(seg: mmap.mmap, ring: Ring) -> Iterator[Any]:
    assert R.HOT is not None
    w = R.HOT.Writer(seg, RING_AT, SLOTS, ring.seen, _element_format(DTYPE), DTYPE.itemsize, CHANNELS, LIMIT)
    yield w
    w.close()


def _frame(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start, start + n * CHANNELS) % 30000).astype(DTYPE).reshape(n, CHANNELS)


def _python_put(seg: mmap.mmap, ring: Ring, frame: np.ndarray, t0: float, flags: int, offset: int, position: int,
                index: int, floor: int, slab: int, gen: int, frame_max: int) -> None:  # fmt: skip
    """What Publisher.write's Python steps store for the same frame."""
    seg[offset : offset + frame.nbytes] = frame.tobytes()
    ring.write(position, index, t0, offset, floor, len(frame), slab, gen, flags)
    if len(frame) > frame_max:
        ring.set_frame_max(len(frame))
    ring.publish(position + 1)


def test_put_stores_what_the_python_steps_store_byte_for_byte(seg, ring, writer):
    other = mmap.mmap(-1, len(seg))
    ring2 = Ring(other, RING_AT, slots=SLOTS)
    ring2.format()
    try:
        offset, index, frame_max = 4096, 0, 0
        for position, n in enumerate([3, 1, 7, 7, 2, 11, 1, 5, 9, 4, 6]):  # past a lap of the 8 slots
            frame = _frame(n, index)
            t0 = 1000.0 + index / 48000
            flags = 1 if position == 4 else 0
            got = writer.put(frame, t0, flags, offset, END, position, index, 77, 3, 5, frame_max, False)
            assert got == n
            _python_put(other, ring2, frame, t0, flags, offset, position, index, 77, 3, 5, frame_max)
            frame_max = max(frame_max, n)
            offset += n * SB
            index += n
        assert seg[:] == other[:]
        assert ring.position == 11 and ring.frame_max == 11
        got_back = ring.read(4, 11)
        assert got_back is not None and got_back == ring2.read(4, 11)
    finally:
        ring2.release()
        other.close()


@pytest.mark.parametrize("stream_min", [0, 65536], ids=["streaming-from-64-B", "streaming-from-64-KiB"])
def test_put_copies_a_frame_exactly_at_every_size_and_alignment(stream_min):
    # Frames of stream_min bytes and more are copied by streaming stores on x86-64: an unaligned head by memcpy,
    # 64-byte blocks, a tail by memcpy. A 1-byte frame at an odd offset with stream_min 0 ran off the mapping.
    size = 1 << 20
    seg = mmap.mmap(-1, size + ring_bytes(SLOTS))
    ring = Ring(seg, size, slots=SLOTS)
    ring.format()
    assert R.HOT is not None
    w = R.HOT.Writer(seg, size, SLOTS, ring.seen, "B", 1, 1, size)
    buf = np.frombuffer(seg, np.uint8)
    try:
        w.stream_min = stream_min
        assert w.stream_min == stream_min
        source = np.random.default_rng(5).integers(0, 256, 300_000, dtype=np.uint8)
        sizes = [*range(1, 200), *range(65536 - 20, 65536 + 90), 131_079, 200_001]
        position = 0
        for n in sizes:
            for at in range(4096, 4096 + 17) if n < 70_000 else (4096, 4097, 4103, 4111, 4129):
                for src_at in (0, 3) if n < 70_000 else (0, 1, 8, 13):
                    buf[256:size] = 0xA5
                    frame = source[src_at : src_at + n]
                    assert w.put(frame, 1.0, 0, at, size, position, 0, 0, 0, 0, 1 << 31, False) == n
                    position += 1
                    assert np.array_equal(buf[at : at + n], frame), (n, at, src_at)
                    assert (buf[256:at] == 0xA5).all() and (buf[at + n : size] == 0xA5).all(), (n, at, src_at)
        for bad in (-1, True, "64"):
            with pytest.raises(ValueError, match="stream_min must be an int >= 0"):
                w.stream_min = bad
        with pytest.raises(AttributeError):
            del w.stream_min
    finally:
        del buf
        w.close()
        ring.release()
        seg.close()


def test_copy_puts_a_buffer_anywhere_in_the_segment_exactly_and_refuses_what_does_not_fit():
    # The Python steps of a frame and a slab change's carried part copy through it (streaming stores from 64 KiB).
    assert R.HOT is not None
    seg = np.full(400_000, 0xA5, np.uint8)
    source = np.random.default_rng(6).integers(0, 256, 200_001, dtype=np.uint8)
    for n in (0, 1, 63, 64, 65535, 65536, 65537, 150_001):
        for at in (0, 1, 15, 4096 + 3):
            seg[:] = 0xA5
            R.HOT.copy(seg, at, source[:n])
            assert np.array_equal(seg[at : at + n], source[:n]), (n, at)
            assert (seg[:at] == 0xA5).all() and (seg[at + n :] == 0xA5).all(), (n, at)
    seg[:200_001] = source
    R.HOT.copy(seg, 3, seg[:150_000])  # overlapping: as memmove
    assert np.array_equal(seg[3:150_003], source[:150_000])
    with pytest.raises(ValueError, match="do not fit a buffer of 400000 bytes"):
        R.HOT.copy(seg, 399_999, source[:2])
    with pytest.raises(ValueError, match="do not fit"):
        R.HOT.copy(seg, -1, source[:2])
    with pytest.raises(BufferError):
        R.HOT.copy(bytes(10), 0, b"x")  # read-only


def test_put_without_t0_stamps_the_wall_clock(ring, writer):
    before = time.time()
    assert writer.put(_frame(2), None, 0, 4096, END, 0, 0, 0, 0, 1, 0, False) == 2
    after = time.time()
    assert before <= ring.t0_of(0) <= after


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.zeros((4, CHANNELS), np.float32), id="other-dtype"),
        pytest.param(np.zeros((4, 3), DTYPE), id="other-channels"),
        pytest.param(np.zeros(8, DTYPE), id="one-dimensional-with-two-channels"),
        pytest.param(np.zeros((2, 2, CHANNELS), DTYPE), id="three-dimensions"),
        pytest.param(np.zeros((0, CHANNELS), DTYPE), id="empty"),
        pytest.param(np.zeros((8, CHANNELS), DTYPE)[::2], id="strided"),
        pytest.param(np.asfortranarray(np.zeros((4, CHANNELS), DTYPE)), id="fortran-order"),
        pytest.param(np.zeros((4, CHANNELS), DTYPE).tolist(), id="a-list"),
        pytest.param(b"\x00" * 16, id="bytes-on-an-int16-stream"),
        pytest.param(np.zeros((LIMIT // SB + 1, CHANNELS), DTYPE), id="over-frame-limit"),
    ],
)
def test_put_declines_a_frame_the_python_path_must_judge_and_writes_nothing(seg, ring, writer, data):
    before = seg[:]
    assert writer.put(data, 1.0, 0, 4096, END, 0, 0, 0, 0, 1, 0, False) == 0
    assert seg[:] == before  # (Publisher.write then checks it in Python and says what was wrong)


@pytest.mark.parametrize("t0", [math.nan, math.inf, -math.inf, True, "1.0", np.int64(5), 10**400])
def test_put_declines_a_t0_that_is_not_a_finite_float_int_or_none(seg, ring, writer, t0):
    before = seg[:]
    assert writer.put(_frame(2), t0, 0, 4096, END, 0, 0, 0, 0, 1, 0, False) == 0
    assert seg[:] == before


def test_put_takes_a_float_subclass_and_an_int_t0(ring, writer):
    assert writer.put(_frame(1), np.float64(2.5), 0, 4096, END, 0, 0, 0, 0, 1, 0, False) == 1
    assert writer.put(_frame(1), 7, 0, 4096 + SB, END, 1, 1, 0, 0, 1, 1, False) == 1
    assert (ring.t0_of(0), ring.t0_of(1)) == (2.5, 7.0)


def test_a_plain_frame_that_does_not_fit_before_end_is_full_and_nothing_is_written(seg, ring, writer):
    # FULL: the caller starts a new slab and puts the frame again as that slab's first (every waiter woken).
    before = seg[:]
    full = R.HOT.FULL
    assert writer.put(_frame(4), 1.0, 0, 8192, 8192 + 4 * SB - 1, 0, 0, 0, 0, 1, 0, False) == full
    assert writer.put(_frame(4), 1.0, 0, 8192, 0, 0, 0, 0, 0, 1, 0, False) == full  # end 0: no slab, or it is full
    assert writer.put(_frame(4), 1.0, 0, 8192, RING_AT + 64, 0, 0, 0, 0, 1, 0, False) == 0  # (into the ring: never)
    assert writer.put(_frame(4), 1.0, 0, 100, END, 0, 0, 0, 0, 1, 0, False) == 0  # (into the header: never)
    assert writer.put(np.zeros((4, 3), DTYPE), 1.0, 0, 8192, 0, 0, 0, 0, 0, 1, 0, False) == 0  # (not plain: 0)
    assert seg[:] == before
    assert writer.put(_frame(4), 1.0, 0, 8192, 8192 + 4 * SB, 0, 0, 0, 0, 1, 0, False) == 4  # exactly to end


def test_a_slabs_first_frame_wakes_every_futex_waiter(ring, writer):
    ring.w[R.FUTEX_AT // 4] = 1
    ring.publish(0)
    assert writer.put(_frame(3), 1.0, 0, 4096, END, 0, 0, 0, 0, 1, 0, False) == 3  # (frame_max 3 from here)
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(R.HOT.futex_wait(ring.futex_address, 1, 10.0, R.wake_mask(7))))
    t.start()
    try:
        _asleep_in_futex(t, ring.futex_address)
        assert writer.put(_frame(3), 1.0, 0, 8192, END, 1, 3, 0, 1, 1, 3, True) == 3  # position 2, no growth: first
        t.join(5)
        assert woke == [True]
    finally:
        ring.publish(9)
        R.futex_wake(ring.futex_address)
        t.join(5)


def test_a_bytes_frame_on_a_byte_stream(seg, ring):
    assert R.HOT is not None
    w = R.HOT.Writer(seg, RING_AT, SLOTS, ring.seen, _element_format(np.dtype(np.uint8)), 1, 1, LIMIT)
    try:
        assert w.put(b"abc", 1.0, 0, 4096, END, 0, 0, 0, 0, 1, 0, False) == 3
        assert w.put(bytearray(b"de"), 1.0, 0, 4099, END, 1, 3, 0, 0, 1, 3, False) == 2
        assert seg[4096:4101] == b"abcde"
    finally:
        w.close()


@pytest.mark.parametrize("word", [R.NOTICES_AT, R.FRAMES_AT])
def test_put_leaves_the_telling_to_the_caller_when_version_2_or_broker_cut_subscribers_must_hear(ring, writer, word):
    # Version-2 subscribers (NOTICEs) and the broker cutting chunks (PUBLISHED): Python's, after the position.
    ring.w[word // 4] = 1
    assert writer.put(_frame(3), 1.0, 0, 4096, END, 0, 0, 0, 0, 1, 0, False) == -3
    assert ring.position == 1  # published all the same


def test_put_looks_at_the_sleeper_table_as_ring_sleeping_does_and_asks_for_the_doorbell(ring, writer):
    # Doorbell subscribers (core/ring.py): a notice is due when a byte is set and the table differs from the
    # previous look's, which Ring.seen keeps for both looks, the compiled one and Ring.sleeping.
    ring.w[R.DOORBELLS_AT // 4] = 1
    offset = [4096]

    def put(position: int) -> int:
        got = writer.put(_frame(1), 1.0, 0, offset[0], END, position, position, 0, 0, 1, 1, False)
        offset[0] += SB
        return got

    assert put(0) == 1  # nobody asleep
    ring.sleepers[3] = 7
    assert put(1) == R.HOT.RING_NOW + 1  # subscriber 3 went to sleep: ring
    assert put(2) == 1  # rung for already (the same table)
    assert not ring.sleeping()  # Ring.sleeping's look agrees: nothing new since the compiled one
    ring.sleepers[3] = 0
    assert put(3) == 1
    ring.sleepers[3] = 7  # asleep again with the same value after a look that saw it awake: ring again
    assert put(4) == R.HOT.RING_NOW + 1
    ring.sleepers[3] = 8
    assert ring.sleeping()  # and Ring.sleeping's look is seen by the compiled one
    assert put(5) == 1
    assert ring.position == 6


def test_put_wakes_a_doorbell_subscriber_asleep_on_the_futex_word(ring, writer):
    ring.w[R.DOORBELLS_AT // 4] = 1
    ring.publish(0)
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(R.HOT.futex_wait(ring.futex_address, 0, 10.0)))
    ring.futex_sleepers[5] = 1
    t.start()
    try:
        _asleep_in_futex(t, ring.futex_address)
        assert writer.put(_frame(2), 1.0, 0, 4096, END, 0, 0, 0, 0, 1, 0, False) == 2  # (no notice: its futex byte)
        t.join(5)
        assert woke == [True]
    finally:
        ring.futex_sleepers[5] = 0
        ring.publish(9)
        R.futex_wake(ring.futex_address)
        t.join(5)


@pytest.mark.parametrize(("byte", "position", "wakes"), [
    (R.SLEEPER_BIT + 5, 5, True),  # the publish of its wake target
    (R.SLEEPER_BIT + 5, 6, False),  # another: the kernel would wake nobody asleep with that mask, so no wake
    (R.SLEEPER_ANY, 6, True),  # every bit: every publish
    (200, 6, True),  # an unknown value: as every bit
])  # fmt: skip
def test_put_wakes_a_futex_sleeper_only_with_a_mask_its_byte_says_it_sleeps_with(ring, writer, byte, position, wakes):
    # The waiter here sleeps with every bit whatever its byte says: whether it wakes shows whether put made the
    # FUTEX_WAKE (a subscriber's byte and mask agree: core/ring.py's futex_sleeper_byte).
    ring.w[R.DOORBELLS_AT // 4] = 1
    ring.publish(position - 1)
    woke: list[bool] = []
    word = (position - 1) & 0xFFFFFFFF
    t = threading.Thread(target=lambda: woke.append(R.HOT.futex_wait(ring.futex_address, word, 10.0)))
    ring.futex_sleepers[7] = byte
    t.start()
    try:
        _asleep_in_futex(t, ring.futex_address)
        assert writer.put(_frame(2), 1.0, 0, 4096, END, position - 1, 0, 0, 0, 1, 2, False) == 2
        assert R.wakes_a_sleeper(ring.futex_sleepers.tobytes(), R.wake_mask(position)) is wakes  # (the twin)
        t.join(0.3 if not wakes else 5)
        assert woke == ([True] if wakes else [])
    finally:
        ring.futex_sleepers[7] = 0
        ring.publish(position + 9)
        R.futex_wake(ring.futex_address)
        t.join(5)
    assert not t.is_alive()


def test_put_wakes_futex_waiters_with_the_mask_of_the_new_position_or_every_bit_when_frame_max_grew(ring, writer):
    ring.w[R.FUTEX_AT // 4] = 1  # the broker's count of futex subscribers
    ring.publish(0)
    results: list[bool] = []

    def sleep(expected: int, mask: int) -> threading.Thread:
        t = threading.Thread(target=lambda: results.append(R.HOT.futex_wait(ring.futex_address, expected, 10.0, mask)))
        t.start()
        _asleep_in_futex(t, ring.futex_address)
        return t

    # Position 0 -> 1, frame_max 0 -> 3: every bit, so a waiter for position 5's mask wakes.
    t = sleep(0, R.wake_mask(5))
    assert writer.put(_frame(3), 1.0, 0, 4096, END, 0, 0, 0, 0, 1, 0, False) == 3
    t.join(5)
    assert results == [True]
    # Position 1 -> 2, no growth: only position 2's mask; a waiter for 5 sleeps through it, one for 2 wakes.
    far, near = sleep(1, R.wake_mask(5)), sleep(1, R.wake_mask(2))
    assert writer.put(_frame(2), 1.0, 0, 4096 + 3 * SB, END, 1, 3, 0, 0, 1, 3, False) == 2
    near.join(5)
    assert not near.is_alive() and far.is_alive()
    ring.publish(5)
    R.futex_wake(ring.futex_address)
    far.join(5)
    assert results == [True, True, True]


def test_a_closed_writer_refuses_and_releases_the_segment(seg, ring):
    assert R.HOT is not None
    w = R.HOT.Writer(seg, RING_AT, SLOTS, ring.seen, "h", 2, 2, LIMIT)
    w.close()
    with pytest.raises(ValueError, match="closed Writer"):
        w.put(_frame(1), 1.0, 0, 4096, END, 0, 0, 0, 0, 1, 0, False)
    w.close()  # (idempotent)


def test_the_writer_holds_the_segment_until_closed(ring):
    assert R.HOT is not None
    other = mmap.mmap(-1, RING_AT + ring_bytes(SLOTS))
    w = R.HOT.Writer(other, RING_AT, SLOTS, bytearray(256), "h", 2, 2, LIMIT)
    with pytest.raises(BufferError):
        other.close()  # (no write into an unmapped segment: the mapping stays while the writer holds it)
    w.close()
    other.close()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((RING_AT, 6, "h", 2, 2, LIMIT), "power of two"),
        ((RING_AT, SLOTS, "h", 0, 2, LIMIT), "itemsize"),
        ((100, SLOTS, "h", 2, 2, LIMIT), "does not lie in the segment"),
        ((RING_AT + 4096, 1 << 20, "h", 2, 2, LIMIT), "does not lie in the segment"),
    ],
)
def test_a_writer_over_a_ring_outside_its_segment_is_refused(seg, args, match):
    assert R.HOT is not None
    with pytest.raises(ValueError, match=match):
        R.HOT.Writer(seg, args[0], args[1], bytearray(256), *args[2:])


def test_descriptor_bytes_match_the_c_layout():
    assert DESCRIPTOR_BYTES == 64 and (R.POSITION_AT, R.FRAME_MAX_AT) == (152, 188)  # (core/_hot.c's defines)


# ---------------------------------------------------------------- the broker's look (runs)


def _descriptors(seed: int, count: int, sample_bytes: int) -> tuple[bytes, int, int]:
    """``count`` descriptors as a publisher writes them (frames of 1-50 samples, back to back in slabs of 4 KiB,
    now and then a flag), from seq 1000 and index 7000: (raw, seq, index)."""
    rng = np.random.default_rng(seed)
    seq, index, offset, floor = 1000, 7000, 256, 7000
    out = bytearray()
    for k in range(count):
        n = int(rng.integers(1, 51))
        if (offset % 4096) + n * sample_bytes > 4096:  # a new slab (its carry: the previous frame's samples)
            offset = (offset // 4096 + 1) * 4096 + 128
            floor = index - 3
        flags = int(rng.random() < 0.05)
        out += R._DESC.pack(seq + k, index, 0.25 * k, offset, floor, n, offset // 4096, 7, flags)
        index += n
        offset += n * sample_bytes
    return bytes(out), seq, 7000


@pytest.mark.parametrize("seed", range(5))
def test_runs_groups_and_checks_descriptors_as_the_python_twin_does(seed):
    from slabcast.broker.descriptors import runs_of as _runs_of

    assert R.HOT is not None
    raw, seq, head = _descriptors(seed, 300, SB)
    runs = R.HOT.runs(raw, seq, head, SB)
    assert isinstance(runs, list) and len(runs) > 5  # slab changes and flags start runs
    assert runs == _runs_of(R.rows_of(raw), seq, head, SB)
    assert sum(r[4] for r in runs) == sum(sum(r[5]) for r in runs) == sum(d[5] for d in R.rows_of(raw))
    assert R.HOT.runs(b"", seq, head, SB) == []


@pytest.mark.parametrize("seed", range(6))
def test_reader_runs_takes_descriptors_as_the_python_twin_does(seed):
    # A subscriber's look (client/_local.py): runs in one slab, a run broken by a flag or a slab change,
    # descriptors before its start skipped, a gap where it was lapped, its history's floor lowered.
    from slabcast.client._local import _py_reader_runs

    assert R.HOT is not None
    raw, _seq, head = _descriptors(seed, 300, SB)
    rows = R.rows_of(raw)
    if seed % 2:  # lapped: 40 descriptors gone from the middle
        raw = raw[: 100 * DESCRIPTOR_BYTES] + raw[140 * DESCRIPTOR_BYTES :]
    noticed = head + (sum(d[5] for d in rows[:5]) if seed >= 2 else 0)  # (its start past the first five)
    hist = (rows[60][6], 7, rows[60][4] - 2) if seed >= 4 else (-1, 0, 0)
    got = R.HOT.reader_runs(raw, noticed, *hist, SB)
    want = _py_reader_runs(raw, noticed, *hist, SB)
    assert got == want
    entries, end = got
    assert end == head + sum(d[5] for d in R.rows_of(raw)) + (sum(d[5] for d in rows[100:140]) if seed % 2 else 0)
    gaps = [e for e in entries if len(e) == 2]
    assert len(gaps) == seed % 2
    runs = [e for e in entries if len(e) == 9]
    assert len(runs) > 5 and all(len(r[4]) == len(r[5]) for r in runs)
    assert sum(sum(r[4]) for r in runs) + sum(b - a for a, b in gaps) == end - noticed
    if seed >= 4:
        assert any(r[1] == hist[0] and r[7] == hist[2] for r in runs)
    assert R.HOT.reader_runs(b"", 5, -1, 0, 0, SB) == ([], 5)
    with pytest.raises(ValueError, match="whole descriptors of 64 bytes, got 65 bytes"):
        R.HOT.reader_runs(bytes(65), 0, -1, 0, 0, SB)


def test_reader_runs_takes_the_descriptors_u64_fields_whole_as_the_twin_does():
    # (a reviewer: read as signed, an index past 2**63 was skipped instead of being a gap)
    from slabcast.client._local import _py_reader_runs

    assert R.HOT is not None
    raw = R._DESC.pack(0, 2**63 + 5, 0.0, 256, 2**63 + 1, 3, 0, 1, 0) + R._DESC.pack(1, 2**63 + 8, 0.1, 268, 0, 2, 0, 1, 0)
    for args in [(raw, 10, -1, 0, 0, 4), (raw, 2**63 + 5, 0, 1, 2**62, 4)]:
        assert R.HOT.reader_runs(*args) == _py_reader_runs(*args)
    entries, end = R.HOT.reader_runs(raw, 10, -1, 0, 0, 4)
    assert entries[0] == (10, 2**63 + 5) and end == 2**63 + 10


@pytest.mark.parametrize("wrong", ["seq", "index", "n"])
def test_runs_names_the_row_of_a_descriptor_out_of_sequence(wrong):
    assert R.HOT is not None
    raw, seq, head = _descriptors(1, 40, SB)
    rows = R.rows_of(raw)
    k = 23
    d = list(rows[k])
    if wrong == "seq":
        d[0] += 1
    elif wrong == "index":
        d[1] += 3
    else:
        d[5] = 0
    bad = raw[: k * DESCRIPTOR_BYTES] + R._DESC.pack(*d) + raw[(k + 1) * DESCRIPTOR_BYTES :]
    assert R.HOT.runs(bad, seq, head, SB) == k
    assert R.HOT.runs(raw, seq + 1, head, SB) == 0  # (the first row, against the caller's next seq)


def test_runs_refuses_what_is_not_whole_descriptors():
    assert R.HOT is not None
    with pytest.raises(ValueError, match="whole descriptors of 64 bytes, got 65 bytes"):
        R.HOT.runs(bytes(65), 0, 0, SB)
    with pytest.raises(ValueError, match="sample_bytes must be >= 1, got 0"):
        R.HOT.runs(b"", 0, 0, 0)


def test_a_frame_that_does_not_fit_goes_into_the_prepared_slab_as_its_first_and_says_so(seg, ring, writer):
    # switch: the next slab the publisher's background thread prepared, (offset, end, floor, slab, gen).  Used only
    # when the frame does not fit before end: then the frame, its descriptor and every waiter's wake are the next
    # slab's first frame's, and SWITCHED is added to the result; a frame that fits ignores it, and one that fits
    # neither is FULL, nothing written.
    switched, full = R.HOT.SWITCHED, R.HOT.FULL
    prepared = (12288, 12288 + 8 * SB, 40, 2, 9)
    before = seg[:]
    assert writer.put(_frame(4), 1.0, 0, 8192, 8192 + 4 * SB - 1, 0, 50, 48, 1, 7, 0, False, (12288, 12288 + 3 * SB, 40, 2, 9)) == full
    assert seg[:] == before
    assert writer.put(_frame(4), 1.0, 0, 8192, 8192 + 4 * SB, 0, 50, 48, 1, 7, 0, False, prepared) == 4  # it fits
    assert ring.read_one(0)[3:] == (8192, 48, 4, 1, 7, 0)
    assert writer.put(_frame(4, 8), 2.0, 0, 8192 + 4 * SB, 8192 + 4 * SB, 1, 54, 48, 1, 7, 4, False, prepared) == (
        switched + 4
    )
    assert ring.position == 2
    assert ring.read_one(1)[1:] == (54, 2.0, 12288, 40, 4, 2, 9, 0)
    assert seg[12288 : 12288 + 4 * SB] == _frame(4, 8).tobytes()
    with pytest.raises(TypeError, match="switch must be None or"):
        writer.put(_frame(4), 1.0, 0, 8192, 0, 2, 58, 48, 1, 7, 4, False, (1, 2))


def test_a_switched_frame_that_version_2_notices_or_the_broker_must_hear_of_is_negative_and_switched(seg, ring, writer):
    # The broker sets those words from its own process at any time: a frame that went into the prepared slab
    # then comes back as -(SWITCHED + n), for the caller to tell them and to make the slab change its own.
    ring.set_counts(0, 0, 0, True)
    got = writer.put(_frame(4), 1.0, 0, 8192, 8192 + 3 * SB, 0, 50, 48, 1, 7, 0, False, (12288, 12288 + 8 * SB, 40, 2, 9))
    assert got == -(R.HOT.SWITCHED + 4)
    assert ring.read_one(0)[3:] == (12288, 40, 4, 2, 9, 0)
