"""Timestamps as users' clocks give them: non-finite times refused at write, clock steps cost a sampler
subscriber at most one period (issue 19, items 12-13)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import slabcast


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "12.5"])
def test_a_non_finite_t0_is_refused_at_write_and_nothing_is_written(broker, stream_name, bad):
    with slabcast.Publisher(stream_name, dtype="float32", rate=1000, address=broker.address) as pub, \
            slabcast.Subscriber(stream_name, 10, sampler=0.01, address=broker.address) as sub:  # fmt: skip
        with pytest.raises(ValueError, match=r"t0 must be a finite number of seconds, got .*nothing was written"):
            pub.write(np.zeros(10, np.float32), t0=bad)
        pub.write(np.arange(10, dtype=np.float32), t0=5.0)
        with sub.recv(timeout=10) as chunk:  # before the fix: ValueError from the sampler on every recv
            assert (chunk.index, chunk.t0) == (0, 5.0)
            assert chunk.data.tolist() == list(range(10))
        assert pub.samples == 10


def test_non_finite_times_are_refused_naming_the_sample(broker, stream_name):
    with slabcast.Publisher(stream_name, dtype="float32", rate=1000, address=broker.address, timestamps=True) as pub:
        times = np.arange(4, dtype=np.float64)
        times[2] = np.nan
        with pytest.raises(ValueError, match=r"times must be finite seconds, got nan at sample 2"):
            pub.write(np.zeros(4, np.float32), times=times)
        assert pub.samples == 0


@pytest.mark.parametrize("rate", [1000.0, None])
def test_a_clock_step_back_costs_a_sampler_subscriber_at_most_one_period(broker, stream_name, rate):
    # sampler=0.5: one chunk per 0.5 s of stream; the publisher's clock steps back an hour half way.
    # Before the fix: chunks before the step, none in the 10 s of stream after it.
    with slabcast.Publisher(stream_name, dtype="float32", rate=rate, address=broker.address) as pub, \
            slabcast.Subscriber(stream_name, 100, clip=True, sampler=0.5, address=broker.address) as sub:  # fmt: skip
        for k in range(150):  # 15 s of 100-sample frames, 0.1 s each
            t0 = 1_000_000.0 + k * 0.1 - (3600.0 if k >= 50 else 0.0)
            pub.write(np.full(100, k, np.float32), t0=t0)
        pub.close()
        chunks = []
        for chunk in sub:
            with chunk:
                chunks.append((int(chunk.data[0]), chunk.discontinuity))
    after = [k for k, _ in chunks if k >= 50]
    assert len(after) >= 15, chunks  # 10 s at a chunk per 0.6 s (rate) or 0.5 s (frame time), less one period
    if rate is None:
        assert next(d for k, d in chunks if k >= 50), "the restarted schedule is not flagged"
