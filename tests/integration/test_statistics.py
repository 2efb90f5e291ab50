"""Broker-side rolling statistics equal numpy's over the same data; totals, drops and overflows."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

import slabcast


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_statistics_equal_numpy_over_the_window(broker, stream_name, dtype):
    rate, channels = 1000.0, 3
    pub = slabcast.Publisher(stream_name, dtype=dtype, channels=channels, rate=rate, statistics=2.0,
                             address=broker.address)  # fmt: skip
    rng = np.random.default_rng(4)
    data = (rng.standard_normal((5000, channels)) * 1000).astype(dtype)
    frame = 100
    for start in range(0, 5000, frame):
        pub.write(data[start : start + frame], t0=start / rate)
    pub.flush()
    stats = slabcast.stream_statistics(stream_name, address=broker.address)
    assert (stats.samples, stats.frames) == (5000, 50)
    # The window: frames starting in the last 2 s of stream time (the newest ends at 5.0 s).
    window = data[3000:].astype(np.float64)
    assert stats.window_samples == len(window)
    np.testing.assert_allclose(stats.mean, window.mean(axis=0), rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(stats.std, window.std(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(stats.min, window.min(axis=0))
    np.testing.assert_array_equal(stats.max, window.max(axis=0))
    np.testing.assert_array_equal(stats.ptp, np.ptp(window, axis=0))
    assert stats.observed_rate is None or stats.observed_rate > 0
    text = subprocess.run([sys.executable, "-m", "slabcast", "status", "--address", broker.address],
                          capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    assert f"ch_0: mean {window.mean(axis=0)[0]:.6g}" in text
    assert "    last 2 s (2000 samples" in text, text
    pub.close()


def test_status_says_how_much_of_the_window_its_figures_are_of_when_the_pool_holds_less(broker, stream_name):
    # The figures are of what the pool still holds: 10 s asked of a fast stream, a fraction of a second there.
    # (A newcomer read `last 10 s` over figures of 20 ms.)
    rate = 100_000.0
    pub = slabcast.Publisher(stream_name, dtype="int32", rate=rate, statistics=10.0, slab_bytes=65536, nslabs=8,
                             address=broker.address)  # fmt: skip
    for k in range(200):
        pub.write(np.arange(5000 * k, 5000 * (k + 1), dtype=np.int32), t0=k * 5000 / rate)  # 10 s of stream
    pub.flush()
    stats = slabcast.stream_statistics(stream_name, address=broker.address)
    held = stats.window_samples / rate
    assert 0 < held < 1, stats.window_samples
    text = subprocess.run([sys.executable, "-m", "slabcast", "status", "--address", broker.address],
                          capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    assert f"    last {held:.3g} s (of the 10 s asked: all the stream and its pool hold) ({stats.window_samples} samples" \
        in text, text  # fmt: skip
    pub.close()


def test_drops_and_overflows_per_subscriber(broker, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address, timeout=1)
    drop = slabcast.Subscriber(stream_name, size=10, clip=True, policy="drop", max_inflight=1, address=broker.address,
                               label="dropper")  # fmt: skip
    block = slabcast.Subscriber(stream_name, size=10, clip=True, max_inflight=2, address=broker.address,
                                label="blocker")  # fmt: skip
    for i in range(5):
        pub.write(np.full(10, i, dtype=np.int32))
    pub.flush()
    held = drop.recv(timeout=5)  # max_inflight=1: while it is held, every later chunk is dropped
    while drop.statistics().dropped < 4:  # their notices may still be on their way to it
        with pytest.raises(TimeoutError):
            drop.recv(timeout=0.2)
    kept = [block.recv(timeout=5), block.recv(timeout=5)]  # the other three wait in its queue
    assert (drop.statistics().dropped, block.statistics().dropped) == (4, 0)  # statistics() reports to the broker
    stats = slabcast.stream_statistics(stream_name, address=broker.address)
    subs = {s["label"]: s for s in stats.subscribers}
    assert (subs["dropper"]["delivered"], subs["dropper"]["dropped"]) == (1, 4)
    assert (subs["blocker"]["delivered"], subs["blocker"]["dropped"]) == (2, 0)
    held.release()
    for chunk in kept:
        chunk.release()
    with pytest.raises(slabcast.StreamNotFoundError, match="no stream named 'nope'"):
        slabcast.stream_statistics("nope", address=broker.address)
    drop.close()
    block.close()
    pub.close()


def test_a_subscriber_behind_its_stream_shows_what_it_delivered_in_status(broker, stream_name):
    # A subscriber that is behind never waits: its counters went to the broker only before a wait or at a slab
    # change, so `slabcast status` showed `delivered 0` for as long as a slab lasted (a newcomer: 11 s).  Now recv
    # sends them at most every 0.4 s as well.
    import time

    with slabcast.Publisher(stream_name, dtype="int16", channels=2, rate=48000.0, address=broker.address) as pub:
        sub = slabcast.Subscriber(stream_name, size=480, clip=True, address=broker.address, label="behind")
        for _ in range(40):
            pub.write(np.zeros((480, 2), np.int16))  # all in one slab: the subscriber has 40 chunks to read
        for _ in range(5):
            sub.recv(timeout=5).release()
        time.sleep(0.45)  # the subscriber works on its chunks (a time, not a readiness)
        sub.recv(timeout=5).release()  # the sixth chunk: not a wait, not a slab change

        def delivered() -> int:
            (row,) = [u for u in slabcast.broker_status(broker.address)["streams"][0]["subscribers"]
                      if u["label"] == "behind"]  # fmt: skip
            return int(row["delivered"])

        deadline = time.monotonic() + 5
        while delivered() < 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the broker's status: no event says it heard an ACK
        assert delivered() >= 5
        sub.close()


def test_an_ended_streams_status_row_keeps_each_subscriber_as_it_left(broker, stream_name):
    # A newcomer: a stream whose publisher ended right after its frames was listed in `ended_streams` with
    # `delivered 0` for a subscriber that received every chunk (its counters came after the end).
    # (A reviewer: two subscribers of one process, one label, had each other's counters.)
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address)
    subs = [slabcast.Subscriber(stream_name, size, clip=True, address=broker.address, label="reader")
            for size in (100, 250)]  # fmt: skip
    pub.write(np.arange(1000, dtype=np.int32))
    pub.close()  # (the end, before the subscribers read anything)
    for sub, count in zip(subs, (10, 4), strict=True):
        assert len([c.index for c in sub]) == count
        sub.close()  # (its counters, then BYE)
    deadline = time.monotonic() + 10
    while True:
        (row,) = [r for r in slabcast.broker_status(broker.address)["ended_streams"] if r["name"] == stream_name]
        readers = [(u["label"], u["size"], u["delivered"], u["dropped"]) for u in row["subscribers"]]
        if [r[2] for r in readers] == [10, 4] or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # (the broker's status is where it shows)
    assert readers == [("reader", 100, 10, 0), ("reader", 250, 4, 0)], readers
    # And in the text of `slabcast status` (an operator saw them only in --json).
    text = subprocess.run([sys.executable, "-m", "slabcast", "status", "--address", broker.address],
                          capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    ended = text[text.index(f"stream {stream_name}: ended"):]
    assert "reader pid" in ended and "size 100 clip=True policy=block delivered 10 dropped 0" in ended, text
    assert "size 250 clip=True policy=block delivered 4 dropped 0" in ended, text
