"""Window: the latest seconds of an N-channel stream, independent readers, exact envelopes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import slabcast


def test_window_holds_the_last_samples_written_channels_first(broker, stream_name):
    rate, channels = 1000.0, 5
    pub = slabcast.Publisher(stream_name, dtype="float64", channels=channels, rate=rate, address=broker.address)
    short = slabcast.Window(stream_name, 0.5, address=broker.address)
    long = slabcast.Window(stream_name, 2.0, address=broker.address)
    sub = slabcast.Subscriber(stream_name, size=100, clip=True, address=broker.address)
    rng = np.random.default_rng(2)
    written = rng.standard_normal((3000, channels))
    # Before enough data: what there is.
    pub.write(written[:123], t0=0.0)
    assert short.wait(123, timeout=5)
    data, times = short.get()
    assert data.shape == (channels, 123)
    np.testing.assert_array_equal(data, written[:123].T)
    for start in range(123, 3000, 77):
        pub.write(written[start : start + 77], t0=start / rate)
    assert short.wait(3000, timeout=5)
    assert long.wait(3000, timeout=5)
    data, times = short.get()
    np.testing.assert_array_equal(data, written[-500:].T)
    np.testing.assert_allclose(times, np.arange(2500, 3000) / rate, atol=1e-9)
    data, _ = long.get()
    np.testing.assert_array_equal(data, written[-2000:].T)
    # Neither window took anything from the subscriber: it still gets every chunk.
    indexes = []
    for _ in range(30):
        with sub.recv(timeout=5) as chunk:
            indexes.append(chunk.index)
    assert indexes == list(range(0, 3000, 100))
    mins, maxs, _ = long.get_display(64)
    assert mins.shape == maxs.shape == (channels, 64)
    np.testing.assert_array_equal(mins.min(axis=1), written[-2000:].min(axis=0))
    np.testing.assert_array_equal(maxs.max(axis=1), written[-2000:].max(axis=0))
    for w in (short, long):
        w.close()
    sub.close()
    pub.close()


def test_window_needs_a_rate(broker, stream_name):
    with (
        slabcast.Publisher(stream_name, address=broker.address),
        pytest.raises(ValueError, match="needs a stream with a rate"),
    ):
        slabcast.Window(stream_name, 1.0, address=broker.address)


def test_window_keeps_each_samples_own_time_on_a_timestamps_stream(broker, stream_name):
    # An LSL-like stream: irregular stamps per sample.  Before the fix the window gave t0 + k/rate.
    with slabcast.Publisher(stream_name, dtype="float32", rate=100.0, address=broker.address, timestamps=True) as pub, \
            slabcast.Window(stream_name, 1.0, address=broker.address) as win:  # fmt: skip
        rng = np.random.default_rng(3)
        stamps = 50.0 + np.cumsum(rng.uniform(0.005, 0.015, 60))
        for k in range(0, 60, 20):
            pub.write(np.arange(k, k + 20, dtype=np.float32), times=stamps[k : k + 20])
        assert win.wait(60, timeout=10)
        data, times = win.get()
    np.testing.assert_array_equal(data[0], np.arange(60, dtype=np.float32))
    np.testing.assert_array_equal(times, stamps)


def test_a_subscriber_started_before_its_publisher_waits_for_it_by_default(broker, stream_name):
    # The everyday race of a worker started before its source: by default the subscriber waits (up to its
    # timeout) and starts at index 0; wait=0 refuses at once.
    with pytest.raises(slabcast.StreamNotFoundError, match="no stream named"):
        slabcast.Subscriber(stream_name, 10, address=broker.address, wait=0)
    box: dict[str, object] = {}
    started = threading.Event()

    def subscribe() -> None:
        started.set()
        box["sub"] = slabcast.Subscriber(stream_name, 10, address=broker.address)

    t = threading.Thread(target=subscribe)
    t.start()
    started.wait(5)
    with slabcast.Publisher(stream_name, dtype="float32", address=broker.address) as pub:
        t.join(15)
        sub = box["sub"]
        assert isinstance(sub, slabcast.Subscriber)
        pub.write(np.arange(10, dtype=np.float32), t0=1.0)
        with sub.recv(timeout=10) as chunk:
            assert chunk.index == 0
        sub.close()
    with pytest.raises(slabcast.StreamNotFoundError, match=r"did not appear within wait=0\.3 s"):
        slabcast.Subscriber(stream_name + "x", 10, address=broker.address, timeout=0.3)


def test_a_window_with_history_has_the_latest_seconds_at_once(broker, stream_name):
    # The README's "latest 5 s": without history a window fills from its creation on (MNE-LSL's connect); with
    # history=True it starts with what the pool holds, exactly the newest `seconds`.
    rate = 1000.0
    pub = slabcast.Publisher(stream_name, dtype="float32", channels=2, rate=rate, address=broker.address)
    written = np.random.default_rng(5).standard_normal((3000, 2)).astype(np.float32)
    for start in range(0, 3000, 100):
        pub.write(written[start : start + 100], t0=start / rate)
    pub.flush()
    win = slabcast.Window(stream_name, 2.0, address=broker.address, history=True)
    data, times = win.get()  # at once: the constructor took the pool's newest 2 s (it was left to a thread)
    fresh = slabcast.Window(stream_name, 2.0, address=broker.address)
    try:
        np.testing.assert_array_equal(data, written[-2000:].T)
        np.testing.assert_allclose(times, np.arange(1000, 3000) / rate, atol=1e-9)
        assert fresh.get()[0].shape == (2, 0)  # (nothing written since it was made)
    finally:
        win.close()
        fresh.close()
        pub.close()


def test_a_window_of_samples_with_history_has_the_newest_samples_at_once(broker, stream_name):
    # A lab newcomer: Window(samples=N, history=True) was refused; a marker or irregular stream (no rate) has
    # only samples to count its window in.  The newest N of what the pool holds, at once.
    pub = slabcast.Publisher(stream_name, dtype="float64", channels=1, rate=None, address=broker.address,
                             timestamps=True)  # fmt: skip
    stamps = np.cumsum(np.random.default_rng(2).uniform(0.01, 0.3, 500))
    for start in range(0, 500, 7):
        pub.write(np.arange(start, min(start + 7, 500), dtype=np.float64), times=stamps[start : start + 7])
    pub.flush()
    try:
        with slabcast.Window(stream_name, samples=60, address=broker.address, history=True) as win:
            data, times = win.get()  # at once
            np.testing.assert_array_equal(data[0], np.arange(440, 500))
            np.testing.assert_array_equal(times, stamps[440:])
            assert win.n_new_samples == 60  # (a window's worth: not the 500 the pool held)
    finally:
        pub.close()


def test_a_script_that_exits_without_closing_its_window_leaves_the_broker_cleanly(broker, stream_name):
    # A newcomer's script ended without disconnect(): its window's reader (a daemon thread) died mid-read and the
    # broker said "client window:... died; reclaiming its leases".  Open windows are closed at exit now.
    import subprocess
    import sys

    pub = slabcast.Publisher(stream_name, "float32", 1, 100.0, address=broker.address)
    script = (f"import slabcast\nw = slabcast.Window({stream_name!r}, 1.0, address={broker.address!r})\n"
              "assert w.wait(new=10, timeout=10)\nprint('read', flush=True)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        while not slabcast.broker_status(broker.address)["streams"][0]["subscribers"]:
            assert proc.poll() is None, "the script ended before it subscribed"
        pub.write(np.zeros(20, np.float32), t0=0.0)
        assert proc.stdout.readline() == "read\n"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    deadline = time.monotonic() + 10
    while slabcast.broker_status(broker.address)["streams"][0]["subscribers"]:  # (gone, either way)
        assert time.monotonic() < deadline, "the script's subscriber is still there"
    assert f"window:{stream_name}" not in broker.stderr(), broker.stderr()
    pub.close()
