"""The compiled rechunker (core/_hot.c) against the Python one (core/rechunk.py): the same frames in, the same
chunks out, bit for bit, and the same state after every frame; also through a subscriber's ``Reader.take_one``
over a ring in an anonymous mapping (no broker, no processes)."""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slabcast.core import ring as R
from slabcast.core.rechunk import PyRechunker, Rechunker
from slabcast.core.ring import Ring, ring_bytes

if R.HOT is None:
    if os.environ.get("SLABCAST_REQUIRE_C") == "1":
        pytest.fail("the compiled module (core/_hot.c) is not built (SLABCAST_REQUIRE_C=1)", pytrace=False)
    pytest.skip("the compiled module (core/_hot.c) is not built", allow_module_level=True)

STATE = ("start", "t0", "pause_until", "pause_at", "last_t0", "jumped", "size", "clip", "rate")


def _state(r: Any) -> tuple[Any, ...]:
    # (repr: -0.0 and 0.0, or two NaNs, are told apart; ints and floats too)
    return tuple(repr(getattr(r, name)) for name in STATE)


def _pauses(values: list[float]) -> Callable[[], float]:
    it = iter(values * 1000)
    return lambda: next(it)


frames_st = st.lists(
    st.tuples(st.integers(1, 60), st.floats(-0.5, 2.0, allow_nan=False)),  # (samples, seconds since the last)
    min_size=1, max_size=60,
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    frames=frames_st,
    size=st.integers(1, 50),
    clip=st.booleans(),
    rate=st.sampled_from([None, 0.0, 1.0, 3.7, 250.0, 48000.0]),
    pauses=st.one_of(st.none(), st.lists(st.floats(0.0, 3.0, allow_nan=False), min_size=1, max_size=5)),
    pokes=st.lists(st.integers(0, 59), max_size=3),
)
def test_the_compiled_rules_cut_what_the_python_rules_cut(
    frames: list[tuple[int, float]], size: int, clip: bool, rate: float | None, pauses: list[float] | None,
    pokes: list[int],
) -> None:  # fmt: skip
    py = PyRechunker(size, clip, rate, None if pauses is None else _pauses(pauses))
    c = Rechunker(size, clip, rate, None if pauses is None else _pauses(pauses))
    assert type(c) is not PyRechunker
    assert _state(c) == _state(py)
    index, t = 0, 1000.0
    for k, (n, dt) in enumerate(frames):
        t += dt
        if k in pokes and py.start is not None:  # what a receiver does when a slab's floor is past its pending start
            for r in (py, c):
                r.t0 += 1 / 3
                r.start = r.start + 1 if k % 2 else None
        assert c.needed(index) == py.needed(index)
        got, want = c.feed(index, n, t), py.feed(index, n, t)
        assert [tuple(map(repr, x)) for x in got] == [tuple(map(repr, x)) for x in want]
        assert _state(c) == _state(py)
        index += n


@pytest.mark.parametrize("bad", [-1.0, math.nan, "x"])
def test_a_bad_sampler_value_raises_the_same_error_in_both(bad: Any) -> None:
    errors = []
    for cls in (PyRechunker, Rechunker):
        r = cls(4, True, 10.0, lambda: bad)
        with pytest.raises((ValueError, TypeError)) as info:
            r.feed(0, 8, 0.0)
        errors.append((type(info.value), str(info.value)))
        assert r.start == 0  # what was cut before the error stays as in Python: the chunk's start was taken
    assert errors[0] == errors[1]


def test_a_sampler_that_raises_propagates_from_feed() -> None:
    def boom() -> float:
        raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        Rechunker(2, True, None, boom).feed(0, 4, 0.0)


@pytest.mark.parametrize("pause", [1e9, 9.19e18, 1e300, math.inf])
@pytest.mark.parametrize("rate", [1e10, 1.0, math.nan])
def test_a_pause_longer_than_any_stream_is_never_over_in_both(pause: float, rate: float) -> None:
    # Python's ints hold stop + ceil(pause * rate); the compiled one saturates at "never" (an index never gets
    # there) instead of overflowing; where math.ceil refuses (inf, NaN) both raise the same error.
    outcomes = []
    for cls in (PyRechunker, Rechunker):
        r = cls(4, True, rate, lambda: pause)
        try:
            outcomes.append([r.feed(index, 8, index / 8) for index in range(0, 64, 8)])
            assert r.start is None and r.pause_at > 60
        except (OverflowError, ValueError) as exc:
            outcomes.append([type(exc), str(exc)])
    assert outcomes[0] == outcomes[1]


def test_a_compiled_rechunker_made_without_init_is_usable() -> None:
    assert R.HOT is not None
    for cls in (R.HOT.Rechunker, Rechunker):
        r = cls.__new__(cls)
        assert (r.size, r.sampler, r.start) == (1, None, None)
        assert r.feed(0, 2, 0.0) == [(0, 2, 0.0)]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_the_compiled_rechunker_refuses_bad_sizes_as_the_python_one(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as c_info:
        Rechunker(bad)
    with pytest.raises((TypeError, ValueError)) as py_info:
        PyRechunker(bad)
    assert (type(c_info.value), str(c_info.value)) == (type(py_info.value), str(py_info.value))


# ---------------------------------------------------------------- a subscriber's take_one over a real ring

SLOTS = 8
RING_AT = 4096


@pytest.fixture
def ring() -> Iterator[Ring]:
    seg = mmap.mmap(-1, RING_AT + ring_bytes(SLOTS))
    r = Ring(seg, RING_AT, slots=SLOTS)
    r.format()
    yield r
    r.release()
    seg.close()


def _publish(ring: Ring, position: int, index: int, n: int, t0: float, offset: int, floor: int, slab: int,
             gen: int, flags: int = 0) -> None:  # fmt: skip
    ring.write(position, index, t0, offset, floor, n, slab, gen, flags)  # (the publisher's Python steps)
    ring.publish(position + 1)


def test_take_one_cuts_a_single_new_frame_and_declines_everything_else(ring: Ring) -> None:
    assert R.HOT is not None
    seg = ring.descriptors.base  # (the mapping the ring lies in)
    reader = R.HOT.Reader(seg, RING_AT, SLOTS)
    try:
        c = Rechunker(3, True, 10.0)
        assert reader.take_one(0, 0, -1, -1, c) is None  # nothing published
        _publish(ring, 0, 0, 5, 2.0, 4096 + 64, 0, 0, 7)
        assert reader.take_one(0, 0, -1, -1, c) == (0, 5, 2.0, 4096 + 64, 0, 7, [(0, 3, 2.0)])
        assert c.start == 3
        _publish(ring, 1, 5, 2, 2.5, 4096 + 74, 0, 0, 7)
        assert reader.take_one(1, 4, 0, -1, c) is None  # not where we are (index != noticed): Python's steps
        assert reader.take_one(1, 5, 0, 0, c) == (5, 2, 2.5, 4096 + 74, 0, 7, [(3, 3, 2.0 + 3 / 10.0)])
        assert (c.start, c.t0) == (6, 2.5 + 1 / 10.0)
        _publish(ring, 2, 7, 2, 2.7, 4096 + 78, 0, 0, 7, flags=1)
        assert reader.take_one(2, 7, 0, -1, c) is None  # a flag
        _publish(ring, 2, 7, 2, 2.7, 8192, 8, 1, 3)
        assert reader.take_one(2, 7, 0, -1, c) is None  # the pending start (6) is before the new slab's floor
        _publish(ring, 2, 7, 2, 2.7, 8192, 6, 1, 3)
        assert reader.take_one(2, 7, 0, 1, c) is None  # the first frame of the slab a history ends in
        assert (c.start, c.t0) == (6, 2.5 + 1 / 10.0)  # (nothing declined changed the chunker)
        assert reader.take_one(2, 7, 0, -1, c) == (7, 2, 2.7, 8192, 1, 3, [(6, 3, 2.5 + 1 / 10.0)])
        assert c.start is None
        _publish(ring, 3, 9, 1, 2.9, 8200, 6, 1, 3)
        _publish(ring, 4, 10, 1, 3.0, 8202, 6, 1, 3)
        assert reader.take_one(3, 9, 1, -1, c) is None  # two published: a batch, for Python's read
        with pytest.raises(TypeError, match="compiled Rechunker"):
            reader.take_one(3, 10, 1, -1, PyRechunker(3))
    finally:
        reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.take_one(0, 0, -1, -1, Rechunker(3))


def test_a_reader_refuses_a_ring_outside_its_segment() -> None:
    assert R.HOT is not None
    seg = mmap.mmap(-1, RING_AT + 4096)
    try:
        with pytest.raises(ValueError, match="does not lie in the segment"):
            R.HOT.Reader(seg, RING_AT, SLOTS * 16)
        with pytest.raises(ValueError, match="power of two"):
            R.HOT.Reader(seg, RING_AT, 6)
        reader = R.HOT.Reader(seg, RING_AT, 2)
        with pytest.raises(TypeError, match="already made"):  # (take_chunk relies on what it was made with)
            reader.__init__(seg, RING_AT, 2)
        reader.close()
        with pytest.raises(TypeError, match="go together"):
            R.HOT.Reader(seg, RING_AT, 2, chunk=object)
    finally:
        seg.close()


def test_feed_takes_numpy_integers_and_floats_and_gives_python_ones() -> None:
    c, py = Rechunker(4, True, 8.0), PyRechunker(4, True, 8.0)
    got = c.feed(np.uint64(0), np.uint32(6), np.float64(1.5))
    assert got == py.feed(np.uint64(0), np.uint32(6), np.float64(1.5)) == [(0, 4, 1.5)]
    assert type(got[0][0]) is int and type(c.start) is int and c.start == py.start == 4


@settings(max_examples=300, deadline=None)
@given(
    frames=frames_st,
    size=st.integers(1, 50),
    clip=st.booleans(),
    rate=st.sampled_from([None, 250.0, 48000.0]),
    pauses=st.one_of(st.none(), st.lists(st.floats(0.0, 3.0, allow_nan=False), min_size=1, max_size=5)),
    cut_at=st.integers(0, 59),
)
def test_feed_until_stops_where_feeding_frame_by_frame_first_cuts_in_both(
    frames: list[tuple[int, float]], size: int, clip: bool, rate: float | None, pauses: list[float] | None,
    cut_at: int,
) -> None:  # fmt: skip
    # A subscriber's run of frames fed in one call (client/_local.py, _step): the frame the call stops at, the
    # chunks of that frame and the state afterwards are what frame-by-frame feeding gives there.
    ns = [n for n, _ in frames]
    t0s = (np.cumsum([dt for _, dt in frames]) + 1000.0).tolist()
    i = min(cut_at, len(ns) - 1)
    ref = PyRechunker(size, clip, rate, None if pauses is None else _pauses(pauses))
    index = 7000 + sum(ns[:i])
    want_j, want_at, want = i, index, []
    for j in range(i, len(ns)):
        want_j, want_at, want = j, index, ref.feed(index, ns[j], t0s[j])
        if want:
            break
        index += ns[j]
    for r in (PyRechunker(size, clip, rate, None if pauses is None else _pauses(pauses)),
              Rechunker(size, clip, rate, None if pauses is None else _pauses(pauses))):  # fmt: skip
        j, at, got = r.feed_until(7000 + sum(ns[:i]), ns, tuple(t0s), i)
        assert (j, at) == (want_j, want_at)
        assert [tuple(map(repr, x)) for x in got] == [tuple(map(repr, x)) for x in want]
        assert _state(r) == _state(ref)


@pytest.mark.parametrize("make", [PyRechunker, Rechunker])
def test_feed_until_refuses_a_frame_outside_its_run(make: Any) -> None:
    r = make(4)
    with pytest.raises(ValueError, match="frame 3 of a run of 3 frames"):
        r.feed_until(0, [1, 2, 3], [0.0, 0.1, 0.2], 3)
    with pytest.raises(ValueError, match=r"frame 0 of a run of 2 frames \(1 times\)"):
        r.feed_until(0, [1, 2], [0.0], 0)
    assert r.feed_until(0, [1, 2, 3], [0.0, 0.1, 0.2], 0) == (2, 3, [(0, 6, 0.0)])  # (not clipped: whole frames)
    assert r.feed_until(6, [1, 2], [0.3, 0.4], 0) == (1, 7, [])  # (the run ends short of a chunk)
