"""The broker's rolling statistics (broker/statistics.py), without a broker: fed frames as the broker reads them."""

from __future__ import annotations

import numpy as np
import pytest

from slabcast.broker.statistics import Statistics


def _segment_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A segment holding ``values`` (float32) from byte 0, all in slab 0 of generation 1."""
    return values.astype(np.float32).view(np.uint8), np.array([1])


@pytest.mark.parametrize("batch", [1, 50, 250])  # frames per read of the ring: the broker reads lazily
def test_the_observed_rate_is_exact_however_the_broker_batches_its_reads(batch):
    # 500 Hz in frames of 10 samples (one every 20 ms); the broker reads the ring every `batch` frames, so
    # every frame of a batch arrives at the time of the read. The window keeps 10 s of samples.
    stats = Statistics(np.dtype(np.float32), 1, 500.0)
    stats.configure(10.0)
    frames = 1500  # 30 s
    for k in range(0, frames, batch):  # a batch is one run of frames back to back, as the broker accounts it
        read_at = ((k // batch) + 1) * batch * 0.02  # when the batch holding frame k is read
        stats.account(read_at, 10 * min(batch, frames - k), 10, 0, 1, k * 40)
    u8, gens = _segment_of(np.arange(frames * 10))
    out = stats.summary({}, u8, gens)
    assert out["window_samples"] == 5000
    assert out["observed_rate"] == pytest.approx(500.0)  # (was 500, 554 and 998: all but the first frame counted)
    np.testing.assert_allclose(out["mean"], [np.arange(10000, 15000).mean()])


@pytest.mark.parametrize("run", [1, 7, 40])  # frames per run: the broker accounts a run at a time, not a frame
def test_the_window_is_the_newest_window_times_rate_samples_whatever_the_runs(run):
    # 100 Hz, a 1 s window: 100 samples.  Frames of 30 samples, read in runs of `run` frames: the oldest run
    # kept is cut to the window, so the figures are of exactly the newest 100 samples.
    stats = Statistics(np.dtype(np.float32), 1, 100.0)
    stats.configure(1.0)
    frames = 120
    for k in range(0, frames, run):
        count = min(run, frames - k)
        stats.account(float(k), 30 * count, 30, 0, 1, k * 30 * 4)
    values = np.random.default_rng(run).standard_normal(frames * 30).astype(np.float32)
    u8, gens = _segment_of(values)
    out = stats.summary({}, u8, gens)
    window = values[-100:].astype(np.float64)
    assert out["window_samples"] == 100 and len(stats.runs) <= 100 // (30 * run) + 2
    np.testing.assert_allclose(out["mean"], [window.mean()], rtol=1e-6)
    assert out["min"] == [window.min()] and out["max"] == [window.max()]


def test_a_newest_frame_longer_than_the_window_is_kept_whole():
    stats = Statistics(np.dtype(np.float32), 1, 100.0)
    stats.configure(1.0)
    stats.account(0.0, 500, 250, 0, 1, 0)  # two frames of 250 samples: the newest one is kept, whole
    out = stats.summary({}, *_segment_of(np.arange(500)))
    assert out["window_samples"] == 250 and out["min"] == [250.0]


def test_the_window_starts_again_at_a_discontinuity():
    # A lab newcomer: after an LSL outlet's restart (8 s away), status said "observed 33/s" for a 250 Hz stream for
    # 10 s, and min/max mixed the samples from before the gap.  The figures start again at the jump.
    stats = Statistics(np.dtype(np.float32), 1, 250.0)
    stats.configure(10.0)
    for k in range(20):  # 2 s before, a frame of 25 samples every 0.1 s
        stats.account(0.1 * (k + 1), 25, 25, 0, 1, k * 100)
    for k in range(20, 30):  # back 8 s later; its first frame says discontinuity
        stats.account(8.0 + 0.1 * (k + 1), 25, 25, 0, 1, k * 100, jump=k == 20)
    values = np.concatenate([np.arange(500), 1000 + np.arange(250)]).astype(np.float32)
    out = stats.summary({}, *_segment_of(values))
    assert out["window_samples"] == 250 and out["min"] == [1000.0]
    assert out["observed_rate"] == pytest.approx(250.0)
