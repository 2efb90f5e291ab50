"""Unit tests of the rechunking rules against the brute-force oracle in tests/reference.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slabcast.core.rechunk import Rechunker, check_sampler, check_size
from tests.reference import expected_chunks


def run(frames, size, clip, rate=None, pause=None):
    r = Rechunker(size, clip, rate, (lambda: pause) if pause is not None else None)
    out, index = [], 0
    for n, t0 in frames:
        out.extend(r.feed(index, n, t0))
        index += n
    return out


def test_clip_one_frame_completes_several_chunks():
    assert run([(10, 0.0)], 3, True) == [(0, 3, 0.0), (3, 3, 0.0), (6, 3, 0.0)]


def test_noclip_holds_whole_frames():
    assert run([(4, 0.0), (4, 1.0), (4, 2.0), (4, 3.0)], 7, False) == [(0, 8, 0.0), (8, 8, 2.0)]


def test_clip_t0_with_rate_is_exact_to_the_sample():
    chunks = run([(10, 100.0), (10, 101.0)], 4, True, rate=10.0)
    assert [c[:2] for c in chunks] == [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4)]
    assert [c[2] for c in chunks] == pytest.approx([100.0, 100.4, 100.8, 101.2, 101.6])


def test_ocycle_readme_configuration_clip15():
    # ocycle's README: frames b'0000', b'1111', ... clipped at 15.
    frames = [(4, float(i + 1)) for i in range(12)]
    data = b"".join(str(i % 10).encode() * 4 for i in range(12))
    got = [data[i : i + n] for i, n, _ in run(frames, 15, True)]
    assert got == [b"000011112222333", b"344445555666677", b"778888999900001"]


def test_sampler_without_rate_skips_whole_frames_and_drops_remainder():
    frames = [(4, float(t)) for t in range(10)]
    # chunk at frame 1 (t=1) -> pause until 3.5: frames t=2,3 skipped; t=4 starts the next.
    assert run(frames, 6, True, pause=2.5) == [(0, 6, 0.0), (16, 6, 4.0), (32, 6, 8.0)]


def test_sampler_with_rate_skips_by_sample_time():
    # 100 Hz, one frame of 1000 samples: chunk 10 samples (0.1 s) then skip 0.05 s = 5 samples.
    chunks = run([(1000, 0.0)], 10, True, rate=100.0, pause=0.05)
    assert [c[0] for c in chunks[:4]] == [0, 15, 30, 45]
    assert chunks[1][2] == pytest.approx(0.15)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(st.integers(1, 40), min_size=1, max_size=40),
    size=st.integers(1, 60),
    clip=st.booleans(),
    rate=st.sampled_from([None, 10.0, 48000.0]),
    pause=st.sampled_from([None, 0.0, 0.25, 1.0, 3.7]),
)
def test_matches_the_oracle(frames, size, clip, rate, pause):
    t, timed = 1000.0, []
    for n in frames:
        timed.append((n, t))
        t += n / rate if rate else 1.0
    got = run(timed, size, clip, rate, pause)
    want = expected_chunks(timed, size, clip, rate, pause)
    assert [c[:2] for c in got] == [c[:2] for c in want]
    assert [c[2] for c in got] == pytest.approx([c[2] for c in want], abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.integers(1, 50), min_size=1, max_size=50), size=st.integers(1, 70))
def test_clipped_chunks_concatenate_to_the_stream(frames, size):
    chunks = run([(n, 0.0) for n in frames], size, True)
    total = sum(frames)
    assert [c[0] for c in chunks] == list(range(0, total - size + 1, size))
    assert all(c[1] == size for c in chunks)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", None, True])
def test_bad_sizes_are_refused(bad):
    with pytest.raises((TypeError, ValueError), match="size must be a positive integer"):
        check_size(bad)


@pytest.mark.parametrize(
    ("bad", "exc"), [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError), ([], TypeError)]
)
def test_bad_samplers_are_refused(bad, exc):
    with pytest.raises(exc, match="sampler"):
        check_sampler(bad)


def test_sampler_zero_means_none_and_callable_returning_negative_is_refused():
    assert check_sampler(0) is None
    r = Rechunker(2, True, None, lambda: -1.0)
    with pytest.raises(ValueError, match=r"sampler must return a finite number of seconds >= 0, got -1\.0"):
        list(itertools.chain(r.feed(0, 4, 1.0)))
    # (an ocycle user: a callable returning inf was taken, then the emitter stayed silent for ever; sampler=inf
    # itself is refused)
    r = Rechunker(2, True, None, lambda: math.inf)
    with pytest.raises(ValueError, match="sampler must return a finite number of seconds >= 0, got inf"):
        r.feed(0, 4, 1.0)


def _gaps(chunks: list[tuple[int, int, float]]) -> list[int]:
    """Samples skipped between consecutive chunks."""
    return [b[0] - (a[0] + a[1]) for a, b in itertools.pairwise(chunks)]


@pytest.mark.parametrize("step", [-3600.0, 3600.0])
def test_a_clock_step_never_changes_what_a_sampler_skips_with_a_rate(step):
    # sampler=0.5 at 1 kHz, 100-sample frames stamped by a wall clock that steps an hour mid-stream:
    # before the fix a step back gave no chunk for the hour the clock took to catch up.
    r = Rechunker(100, True, 1000.0, lambda: 0.5)
    chunks = []
    for k in range(200):
        t0 = 1000.0 + k * 0.1 + (step if k >= 100 else 0.0)
        chunks += r.feed(k * 100, 100, t0)
    assert _gaps(chunks) == [500] * (len(chunks) - 1)
    assert len(chunks) == 34  # one chunk of 100 every 600 samples, steps or not


def test_a_clock_step_back_without_a_rate_costs_at_most_one_period_and_is_flagged():
    r = Rechunker(1, False, None, lambda: 0.5)
    taken, flagged = [], []
    for k in range(100):  # one frame every 0.1 s; the clock steps back an hour at frame 50
        t0 = 1000.0 + k * 0.1 - (3600.0 if k >= 50 else 0.0)
        got = r.feed(k, 1, t0)
        if r.jumped:
            r.jumped = False
            flagged.append(k)
        taken += [c[0] for c in got]
    assert flagged == [50]
    assert taken == list(range(0, 100, 5))  # every 0.5 s of frames, right through the step


def test_sampler_skips_are_exact_in_samples_whatever_the_frame_times():
    # A paced file source stamps frames with the time it sent them (jitter); sampler=1.5 at 64 kHz must
    # skip exactly 96,000 samples every time (some skips were 96,001).
    rng = np.random.default_rng(7)
    r = Rechunker(1024, True, 64_000.0, lambda: 1.5)
    chunks, index = [], 0
    for k in range(2000):
        chunks += r.feed(index, 1024, 5000.0 + k * 0.016 + rng.uniform(-2e-3, 2e-3))
        index += 1024
    assert len(chunks) > 10
    assert set(_gaps(chunks)) == {96_000}


@pytest.mark.parametrize("clip", [True, False])
def test_needed_is_what_the_next_chunk_lacks_and_never_more(clip):
    # What a subscriber's wake target is computed from (core/ring.py): the samples past what was fed that the next
    # chunk needs.  Never more than the samples after which it is cut: checked by feeding one sample at a time.
    r = Rechunker(10, clip=clip)
    end = 0
    assert r.needed(end) == 10
    for frame in (3, 4, 12, 1, 9, 20):
        r.feed(end, frame, 0.0)
        end += frame
        need = r.needed(end)
        assert need is not None and need >= 1
        probe = Rechunker(10, clip=clip)
        probe.start, probe.t0 = r.start, r.t0
        cut = [probe.feed(end + k, 1, 0.0) for k in range(need)]
        assert cut[-1] and not any(cut[:-1]), (frame, need)


def test_needed_counts_a_pause_in_samples_and_knows_nothing_of_a_pause_in_seconds():
    with_rate = Rechunker(10, clip=True, rate=100.0, sampler=lambda: 0.5)  # 50 samples skipped after each chunk
    with_rate.feed(0, 12, 0.0)  # a chunk 0..10, the pause until 60
    assert with_rate.needed(12) == 60 + 10 - 12
    without = Rechunker(10, clip=True, sampler=lambda: 0.5)  # a pause in frame time
    without.feed(0, 12, 0.0)
    assert without.needed(12) is None
