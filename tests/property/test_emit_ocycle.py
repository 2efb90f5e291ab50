"""Property: BufferEmit cuts exactly ocycle's values, with t0 by the rechunking rules, for any frames."""

from __future__ import annotations

import itertools

import numpy as np
import ocycle
from hypothesis import given, settings
from hypothesis import strategies as st

from slabcast import BufferEmit
from tests.reference import expected_chunks

# A frame: its bytes and the step in seconds to the next frame's time (binary fractions: exact sums).
frames_st = st.lists(st.tuples(st.binary(max_size=40), st.sampled_from([0.25, 0.5, 1.0])), max_size=40)
# ("number", x) passes x itself (0 means "no sampler"); ("callable", x) passes lambda: x (always a sampler).
sampler_st = st.sampled_from(
    [None, ("number", 0), ("number", 0.5), ("number", 1.0), ("number", 2.75), ("callable", 0.0), ("callable", 1.5)]
)


def timed(frames):
    times = itertools.accumulate((step for _, step in frames[:-1]), initial=1.0)
    return [(data, t0) for (data, _), t0 in zip(frames, times, strict=False)]


def make_sampler(spec):
    if spec is None:
        return None, None
    kind, value = spec
    if kind == "number":
        return value, (value or None)
    return (lambda: value), value


def run(cls, frames, size, clip, sampler, **kw):
    got = []
    emit = cls(lambda value, t0: got.append((value, t0)), size, clip=clip, sampler=sampler, **kw)
    for data, t0 in frames:
        emit.write(data, t0)
    emit.close()
    return got


def frame_of(frames):
    """Map a stream index to the number of the frame that holds it."""
    ends = list(itertools.accumulate(len(d) for d, _ in frames))
    return lambda index: next(i for i, end in enumerate(ends) if index < end)


@settings(max_examples=400, deadline=None)
@given(frames=frames_st, size=st.integers(1, 60), clip=st.booleans(), spec=sampler_st)
def test_serial_mode_emits_ocycles_values(frames, size, clip, spec):
    frames = timed(frames)
    sampler, pause = make_sampler(spec)
    ours = run(BufferEmit, frames, size, clip, sampler)
    theirs = run(ocycle.BufferEmit, frames, size, clip, sampler)
    assert [v for v, _ in ours] == [v for v, _ in theirs]

    # Our t0 is the time of the frame holding the chunk's first sample (the rules' oracle) ...
    stream = b"".join(d for d, _ in frames)
    want = expected_chunks([(len(d), t0) for d, t0 in frames], size, clip, None, pause)
    assert [(stream[i : i + n], t0) for i, n, t0 in want] == ours
    if not want:
        return
    # ocycle's first t0 is that of its first write: right unless that frame was empty.
    if frames[0][0]:
        assert theirs[0][1] == ours[0][1]
    # Later, ocycle passes the time of the frame that completed the previous chunk, which is
    # older than the chunk.  (With clip and no sampler, it writes the remainder through its
    # own write() with time.time(), and the t0 it passes depends on that recursion.)
    if not clip or pause is not None:
        where = frame_of(frames)
        assert [t0 for _, t0 in theirs[1:]] == [frames[where(i + n - 1)][1] for i, n, _ in want[:-1]]


@settings(max_examples=60, deadline=None)
@given(frames=frames_st, size=st.integers(1, 60), clip=st.booleans(), spec=sampler_st)
def test_thread_mode_with_one_thread_emits_the_same_sequence(frames, size, clip, spec):
    frames = timed(frames)
    sampler, _ = make_sampler(spec)
    assert run(BufferEmit, frames, size, clip, sampler, mode="thread", npool=1) == run(
        BufferEmit, frames, size, clip, sampler
    )


@settings(max_examples=150, deadline=None)
@given(frames=frames_st, size=st.integers(1, 15), clip=st.booleans(), spec=sampler_st)
def test_numpy_frames_cut_where_bytes_frames_do(frames, size, clip, spec):
    # int16 stereo: 4 bytes a sample; the same stream as bytes, each frame cut to whole samples.
    frames = [(d[: len(d) - len(d) % 4], t0) for d, t0 in timed(frames)]
    arrays = [(np.frombuffer(d, np.int16).reshape(-1, 2), t0) for d, t0 in frames]
    sampler, _ = make_sampler(spec)
    as_bytes = run(BufferEmit, frames, 4 * size, clip, sampler)
    as_arrays = run(BufferEmit, arrays, size, clip, sampler)
    assert [(a.tobytes(), t0) for a, t0 in as_arrays] == as_bytes
    assert all(a.dtype == np.int16 and a.ndim == 2 and a.shape[1] == 2 for a, _ in as_arrays)
