"""The frame descriptor ring (core/ring.py) over an anonymous shared mapping: no broker, no processes."""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import pytest

from slabcast.core import ring as R
from slabcast.core.ring import DESCRIPTOR_BYTES, RING_SLOTS, Ring, ring_bytes

OFFSET = 4096  # the ring starts a page into the mapping, as it does after a segment's slabs


def _mapping(slots: int) -> mmap.mmap:
    # A shared anonymous mapping (mmap's default flags on Linux: MAP_SHARED): a futex on it is a shared one,
    # as on a /dev/shm segment.  Room for the header page, the ring and whatever ring_bytes says follows it.
    return mmap.mmap(-1, OFFSET + ring_bytes(slots) + 4096)


@pytest.fixture
def mm() -> Iterator[mmap.mmap]:
    """The mapping of a ring of 8 slots."""
    mapping = _mapping(8)
    yield mapping
    mapping.close()


@pytest.fixture
def small(mm: mmap.mmap) -> Iterator[Ring]:
    """A formatted ring of 8 slots over ``mm`` (laps come after 8 descriptors)."""
    ring = Ring(mm, OFFSET, slots=8)
    ring.format()
    yield ring
    ring.release()


def _desc(seq: int) -> tuple[int, int, float, int, int, int, int, int, int]:
    """Descriptor ``seq`` of a made-up stream: every field derived from seq, so a wrong slot shows."""
    return (seq, 10 * seq, 0.5 + seq, 4096 + 64 * seq, 7 * seq, 1 + seq % 5, seq % 3, 100 + seq, seq & 1)


def _publish(ring: Ring, seqs: range) -> None:
    for seq in seqs:
        ring.write(*_desc(seq))
    ring.publish(seqs.stop)


def test_format_writes_the_header_words_at_their_documented_offsets():
    mm = _mapping(RING_SLOTS)
    ring = Ring(mm, OFFSET)
    try:
        mm[:256] = b"\xff" * 256  # whatever a reused page held
        ring.format()
        slots, desc, at, position = struct.unpack_from("<IIQQ", mm, 136)
        assert (slots, desc, at, position) == (RING_SLOTS, DESCRIPTOR_BYTES, OFFSET, 0)
        assert ring.position == 0 and ring.slots == RING_SLOTS and ring.mask == RING_SLOTS - 1
        assert ring_bytes() % 4096 == 0 and ring_bytes() >= RING_SLOTS * DESCRIPTOR_BYTES
    finally:
        ring.release()
        mm.close()


def test_slots_must_be_a_power_of_two():
    mm = _mapping(8)
    try:
        for slots in (0, 1, 6, 12):  # (0 and 1: no ring at all)
            with pytest.raises(ValueError, match=f"ring slots must be a power of two >= 2, got {slots}"):
                Ring(mm, OFFSET, slots=slots)
    finally:
        mm.close()


def test_write_publish_read_round_trip(small):
    ring = small
    ring.write(*_desc(0))
    assert ring.position == 0, "a descriptor written is not published until the position moves"
    ring.publish(1)
    assert ring.position == 1
    assert struct.unpack_from("<Q", ring._bytes, 0)[0] == 0  # slot 0, 64 bytes each
    assert ring.read(0, 1) == [_desc(0)]
    _publish(ring, range(1, 5))
    assert ring.read(0, 5) == [_desc(s) for s in range(5)]
    assert ring.read(2, 4) == [_desc(2), _desc(3)]
    # The numpy view of the same bytes names the same fields (readers may use either).
    row = ring.descriptors[3]
    fields = (int(row["seq"]), int(row["index"]), float(row["t0"]), int(row["n"]), int(row["gen"]))
    assert fields == (3, 30, 3.5, 4, 103)
    assert int(row["zero"]) == 0


def test_read_of_a_wrapped_range(small):
    ring = small
    _publish(ring, range(12))  # slots 0..3 hold descriptors 8..11 now
    assert ring.read(6, 12) == [_desc(s) for s in range(6, 12)]  # slots 6, 7, then 0..3
    assert ring.read(8, 11) == [_desc(s) for s in range(8, 11)]  # inside the second lap, not wrapped
    assert ring.read(7, 9) == [_desc(7), _desc(8)]  # the last slot, then the first


def test_read_returns_none_when_the_publisher_lapped_the_start(small):
    ring = small
    _publish(ring, range(12))
    # Position 12: the publisher may be writing descriptor 12 into slot 4 already (it stores the position
    # start + slots before it overwrites slot start), so 4 counts as lapped; 5 is the oldest it holds for sure.
    assert ring.read(5, 7) == [_desc(5), _desc(6)]
    assert ring.read(5, 12) == [_desc(s) for s in range(5, 12)]
    assert ring.read(4, 6) is None
    assert ring.read(3, 5) is None  # slot 3 holds descriptor 11
    assert ring.read(0, 2) is None
    _publish(ring, range(12, 13))  # one more: 5 is the one the publisher may be overwriting now
    assert ring.read(5, 7) is None
    assert ring.read(6, 13) == [_desc(s) for s in range(6, 13)]


def test_read_returns_none_for_a_range_longer_than_the_ring(small):
    ring = small
    _publish(ring, range(20))
    assert ring.read(11, 20) is None  # 9 descriptors: more than 8 slots, whatever the position says
    ring.publish(9)  # (even with a position that would not lap the start)
    assert ring.read(0, 9) is None


def test_read_one_takes_the_only_new_descriptor_and_leaves_the_rest_to_read(small):
    ring = small
    assert ring.read_one(0) is None, "nothing published"
    _publish(ring, range(1))
    assert ring.read_one(0) == _desc(0)
    _publish(ring, range(1, 3))
    assert ring.read_one(1) is None, "two are new: a batch, for read()"
    assert ring.read_one(2) == _desc(2)
    _publish(ring, range(3, 12))
    assert ring.read_one(11) == _desc(11), "wrapped: slot 3"
    assert ring.read_one(3) is None  # (position 12: not the one after 3)


def test_read_one_returns_none_when_the_publisher_laps_during_the_copy(small, monkeypatch):
    ring = small
    _publish(ring, range(5))
    loads = iter([5, 5 + ring.slots])  # the position before the copy, then after it: the publisher lapped
    monkeypatch.setattr(ring, "q", _Words(ring.q, loads))
    assert ring.read_one(4) is None


class _Words:
    """The header's u64 words, with the position's loads scripted (what another process stored between them)."""

    def __init__(self, q, positions):
        self._q, self._positions = q, positions

    def __getitem__(self, i):
        return next(self._positions) if i == R.POSITION_AT // 8 else self._q[i]


def test_read_of_an_empty_range_is_empty(small):
    ring = small
    _publish(ring, range(5))
    assert ring.read(5, 5) == []


def test_header_words_for_the_publisher(small, mm):
    ring = small
    assert (ring.notices_wanted, ring.doorbells, ring.futex_waiters, ring.frames_wanted, ring.closed) == \
        (0, 0, 0, False, False)  # fmt: skip
    ring.set_counts(notices=4, doorbells=3, futex=2, frames=True)
    assert (ring.notices_wanted, ring.doorbells, ring.futex_waiters, ring.frames_wanted) == (4, 3, 2, True)
    # notices_wanted, futex_waiters, frames_wanted, closed, doorbells: u32 words from byte 160 (core/ring.py)
    assert struct.unpack_from("<IIIII", mm, 160) == (4, 2, 1, 0, 3)
    ring.set_counts(notices=0, doorbells=0, futex=0, frames=False)
    assert (ring.notices_wanted, ring.doorbells, ring.futex_waiters, ring.frames_wanted) == (0, 0, 0, False)
    _publish(ring, range(3))
    ring.close()
    assert ring.closed and struct.unpack_from("<I", mm, 172) == (1,)
    assert ring.position == 3, "close() leaves the position (final) alone"


def test_acks_are_asked_of_every_subscriber_or_of_one_cursor_table_entry(small, mm):
    # acks_wanted (byte 184) and ack_target (byte 192: 0 every subscriber, 1 + entry one): protocol.md 7.2, 7.9.
    ring = small
    assert not ring.acks_wanted and ring.ack_target is None
    assert not any(ring.acks_wanted_from(e) for e in (None, 0, 5, R.SLEEPERS - 1))
    ring.want_acks(True)
    assert struct.unpack_from("<II", mm, 184)[0] == 1 and struct.unpack_from("<I", mm, 192) == (0,)
    assert all(ring.acks_wanted_from(e) for e in (None, 0, 5, R.SLEEPERS - 1))
    ring.want_acks(True, 5)
    assert struct.unpack_from("<I", mm, 192) == (6,) and ring.ack_target == 5
    assert ring.acks_wanted_from(5) and not ring.acks_wanted_from(0) and not ring.acks_wanted_from(6)
    assert ring.acks_wanted_from(None), "a subscriber with no entry reports by ACK whoever is asked"
    ring.want_acks(False)
    assert not ring.acks_wanted and not ring.acks_wanted_from(5)


def test_an_asked_subscriber_sends_ack_from_the_cursor_ack_at_names(small, mm):
    # ack_at (u64 at byte 200, protocol.md 7.2, 7.9): the cursor from which the one asked sends ACK; 0: any.
    ring = small
    ring.want_acks(True, 5, at=(1 << 40) + 1000)
    assert struct.unpack_from("<Q", mm, 200) == ((1 << 40) + 1000,) and ring.ack_at == (1 << 40) + 1000
    assert not ring.acks_wanted_from(5, (1 << 40) + 999)
    assert ring.acks_wanted_from(5, (1 << 40) + 1000) and ring.acks_wanted_from(5, 1 << 41)
    assert not ring.acks_wanted_from(4, 1 << 41), "another entry is not asked, whatever its cursor"
    assert ring.acks_wanted_from(5), "a subscriber that does not say its cursor: asked"
    ring.want_acks(True)
    assert ring.ack_at == 0 and ring.acks_wanted_from(4, 0)
    ring.want_acks(True, 5, at=7)
    ring.want_acks(False)
    assert ring.ack_at == 0 and not ring.acks_wanted_from(5, 100)


def test_the_sleeper_table_says_whether_a_doorbell_subscriber_sleeps(small, mm):
    ring = small
    assert ring.sleepers_offset == OFFSET + 8 * DESCRIPTOR_BYTES  # just after the ring
    assert not ring.sleeping()
    for byte in (0, 77, R.SLEEPERS - 1):
        ring.sleepers[byte] = 1
        assert mm[ring.sleepers_offset + byte] == 1 and ring.sleeping()
        ring.sleepers[byte] = 0
        assert not ring.sleeping()


def test_the_position_is_one_aligned_word_and_its_low_half_the_futex_word(small, mm):
    ring = small
    ring.publish((5 << 32) + 7)
    assert ring.position == (5 << 32) + 7
    assert struct.unpack_from("<QI", mm, 152)[0] == (5 << 32) + 7
    assert ring.futex_address % 8 == 0  # 8-byte aligned: one store, one load, never torn
    assert ring.futex_address == np.frombuffer(mm, np.uint8).ctypes.data + 152


class _Futex(NamedTuple):
    wait: Callable[..., bool]
    wake: Callable[..., int]


# Both implementations: ctypes (the fallback) and core/_hot.c (when built; SLABCAST_REQUIRE_C=1 requires it).
_FUTEXES = {"ctypes": _Futex(R._py_futex_wait, R._py_futex_wake)}
if R.HOT is not None:
    _FUTEXES["compiled"] = _Futex(R.HOT.futex_wait, R.HOT.futex_wake)


@pytest.fixture(params=["ctypes", "compiled"])
def fx(request: pytest.FixtureRequest) -> _Futex:
    """futex_wait and futex_wake of one implementation."""
    if request.param not in _FUTEXES:
        if os.environ.get("SLABCAST_REQUIRE_C") == "1":
            pytest.fail("the compiled module (core/_hot.c) is not built (SLABCAST_REQUIRE_C=1)", pytrace=False)
        pytest.skip("the compiled module (core/_hot.c) is not built")
    return _FUTEXES[request.param]


def test_futex_wake_on_a_word_nobody_waits_on_wakes_nobody(small, fx):
    assert fx.wake(small.futex_address) == 0


def test_futex_wake_on_an_unaligned_address_fails_before_the_kernels_barrier(mm, fx):
    # get_futex_key refuses an address not 4-byte aligned (EINVAL) before futex_wake reaches its smp_mb(): such
    # a call is no barrier.  A barrier made by FUTEX_WAKE needs an aligned word.
    base = np.frombuffer(mm, np.uint8).ctypes.data + OFFSET
    assert [fx.wake(base + i) for i in range(6)] == [0, -1, -1, -1, 0, -1]


def test_futex_wait_times_out_while_the_word_is_unchanged(small, fx):
    ring = small
    ring.publish(3)
    t = time.monotonic()
    assert fx.wait(ring.futex_address, 3, 0.05) is False
    assert time.monotonic() - t >= 0.04
    # Only the low 32 bits are the futex word: a position 2**32 further looks unchanged to it.
    ring.publish((1 << 32) + 3)
    t = time.monotonic()
    assert fx.wait(ring.futex_address, 3, 0.02) is False
    assert time.monotonic() - t >= 0.015


def test_futex_wait_returns_at_once_when_the_word_differs(small, fx):
    ring = small
    ring.publish(4)
    t = time.monotonic()
    assert fx.wait(ring.futex_address, 3, 5.0) is True  # the position moved past what the waiter saw
    assert time.monotonic() - t < 1.0


def test_futex_wake_wakes_a_waiter_on_the_same_word(small, fx):
    ring = small
    ring.publish(9)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(fx.wait(ring.futex_address, 9, 10.0)))
    waiter.start()
    try:
        # Until the waiter sleeps on the word, a wake finds nobody (0); then it wakes exactly that one.
        deadline = time.monotonic() + 5
        woken = 0
        while not woken and time.monotonic() < deadline:
            woken = fx.wake(ring.futex_address)
        assert woken == 1
    finally:
        ring.publish(10)
        fx.wake(ring.futex_address)
        waiter.join(5)
    assert woke == [True]


def _asleep_in_futex(thread: threading.Thread, address: int) -> None:
    """Wait until ``thread`` is blocked in the futex system call on ``address`` (Linux:
    /proc/self/task/<tid>/syscall; a thread waiting for the GIL is in a futex call too, on another word)."""
    deadline = time.monotonic() + 5
    while True:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            fields = f.read().split()
        if fields[0] == str(R._SYS_FUTEX) and int(fields[1], 16) == address:
            return
        assert time.monotonic() < deadline, "the waiter never slept on the futex"
        os.sched_yield()


@pytest.mark.parametrize("mask", ["target", "all"])
def test_a_masked_wake_reaches_only_waiters_whose_mask_it_shares(small, mask, fx):
    # Wake targets (core/ring.py): a waiter with the mask of position 12 sleeps through the publishes of 10 and 11
    # (their masks miss it) and wakes at 12's; a waiter with every bit (FUTEX_WAIT: the C client) wakes at any.
    ring = small
    ring.publish(9)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(fx.wait(
        ring.futex_address, 9, 10.0, R.wake_mask(12) if mask == "target" else R.WAKE_ALL)))  # fmt: skip
    waiter.start()
    try:
        _asleep_in_futex(waiter, ring.futex_address)
        if mask == "all":
            assert fx.wake(ring.futex_address, R.wake_mask(10)) == 1
        else:
            assert fx.wake(ring.futex_address, R.wake_mask(10) | R.wake_mask(11)) == 0
            assert not woke
            ring.publish(12)
            assert fx.wake(ring.futex_address, R.wake_mask(12)) == 1
    finally:
        ring.publish(13)
        fx.wake(ring.futex_address)
        waiter.join(5)
    assert woke == [True]


def test_futex_wait_with_a_mask_times_out_after_its_relative_timeout(small, fx):
    # FUTEX_WAIT_BITSET's timeout is absolute (CLOCK_MONOTONIC); futex_wait takes seconds from now either way.
    small.publish(3)
    t = time.monotonic()
    assert fx.wait(small.futex_address, 3, 0.05, R.wake_mask(7)) is False
    assert 0.04 <= time.monotonic() - t < 5


@pytest.mark.parametrize(
    ("position", "need", "frame_max", "expect"),
    [
        (100, 64, 16, 1 << (104 % 32)),  # 4 frames of at most 16 samples at least
        (100, 65, 16, 1 << (105 % 32)),  # (rounded up)
        (100, 16, 16, R.WAKE_ALL),  # the next frame may complete it: every publish
        (100, 1, 16, R.WAKE_ALL),
        (100, 10_000, 1, 1 << (132 % 32)),  # at most 32 frames ahead (the masks of 32 positions are all distinct)
        (100, 64, 0, R.WAKE_ALL),  # no frame_max kept (a publisher that does not keep it)
        (100, None, 16, R.WAKE_ALL),  # not known (a sampler's pause in seconds)
        ((1 << 40) + 30, 64, 16, 1 << 2),  # the futex word is the position's low half; masks go by position
    ],
)
def test_the_wake_target_is_the_first_publish_that_can_complete_the_next_chunk(position, need, frame_max, expect):
    assert R.wake_target(position, need, frame_max) == expect


def test_frame_max_is_its_own_header_word(small, mm):
    assert small.frame_max == 0
    small.set_frame_max(480)
    assert small.frame_max == 480
    assert int.from_bytes(mm[188:192], "little") == 480  # core/ring.py: u32 frame_max at byte 188


def test_a_reader_takes_the_ring_where_the_header_says_and_checks_it():
    # Protocol 7.7: readers SHOULD take ring_slots and ring_offset from the header (the broker writes 65,536;
    # a conformance case may carry a smaller ring).
    from slabcast.core.ring import DESC_AT, RING_AT, SLOTS_AT, ring_layout

    buf = bytearray(4096 * 4)
    buf[SLOTS_AT : SLOTS_AT + 4] = (64).to_bytes(4, "little")
    buf[DESC_AT : DESC_AT + 4] = (64).to_bytes(4, "little")
    buf[RING_AT : RING_AT + 8] = (8192).to_bytes(8, "little")
    assert ring_layout(buf) == (8192, 64)  # 64 descriptors (one page) and the sleeper page: 16 KiB in all
    for at, value, width in ((SLOTS_AT, 48, 4), (DESC_AT, 32, 4), (RING_AT, 8000, 8), (RING_AT, 12288, 8)):
        bad = bytearray(buf)
        bad[at : at + width] = value.to_bytes(width, "little")
        with pytest.raises(ValueError, match=r"the segment's header names no ring: expected ring_slots"):
            ring_layout(bad)


@pytest.mark.parametrize(("table", "mask", "wakes"), [
    ({}, R.WAKE_ALL, False),
    ({3: R.SLEEPER_ANY}, R.wake_mask(9), True),
    ({3: R.SLEEPER_BIT + 9}, R.wake_mask(9), True),
    ({3: R.SLEEPER_BIT + 9}, R.wake_mask(41), True),  # (positions 9 and 41 share a bit)
    ({3: R.SLEEPER_BIT + 9}, R.wake_mask(10), False),
    ({3: R.SLEEPER_BIT + 9}, R.WAKE_ALL, True),  # a frame larger than any before, a slab's first frame
    ({3: R.SLEEPER_BIT + 9, 200: R.SLEEPER_BIT + 10}, R.wake_mask(10), True),
    ({3: R.SLEEPER_BIT + 32}, R.wake_mask(10), True),  # (not a bit: as every bit)
    ({3: 63}, R.wake_mask(10), True),
])  # fmt: skip
def test_a_publish_wakes_a_futex_sleeper_whose_byte_says_its_mask_can_be_woken_by_it(table, mask, wakes):
    raw = bytearray(R.SLEEPERS)
    for i, b in table.items():
        raw[i] = b
    assert R.wakes_a_sleeper(bytes(raw), mask) is wakes


@pytest.mark.parametrize("position", [0, 1, 31, 32, 1000])
def test_a_futex_sleepers_byte_names_the_bit_of_its_mask(position):
    mask = R.wake_mask(position)
    assert R.futex_sleeper_byte(mask) == R.SLEEPER_BIT + position % 32
    assert R.wakes_a_sleeper(bytes([R.futex_sleeper_byte(mask)]) + bytes(R.SLEEPERS - 1), mask)
    assert R.futex_sleeper_byte(R.WAKE_ALL) == R.SLEEPER_ANY
