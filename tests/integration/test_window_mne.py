"""Window speaks MNE-LSL's StreamLSL reading API (issue 23, item 3): get_data(winsize, picks), n_new_samples,
picks by index, name or type, streams without a rate sized in samples, float64 on request."""

from __future__ import annotations

import math

import numpy as np
import pytest

import slabcast

NAMES = ["Fz", "Cz", "Pz", "Oz", "C3", "C4", "EOGh", "EOGv"]
TYPES = ["EEG"] * 6 + ["EOG"] * 2


def online_loop(stream, n_rounds):
    """MNE-LSL code as a lab writes it (docs/lsl.md ports it by changing the import and the constructor only)."""
    stream.connect(acquisition_delay=0.001)
    sfreq = stream.info["sfreq"]
    ch_names = stream.ch_names
    windows = []
    for _ in range(n_rounds):
        if stream.n_new_samples < sfreq:  # a second of new data or nothing
            continue
        data, ts = stream.get_data(winsize=1, picks="eeg")
        windows.append((data, ts))
    eog, _ = stream.get_data(winsize=0.5, picks=["EOGh", "EOGv"])
    stream.disconnect()
    return sfreq, ch_names, windows, eog


def test_mne_lsl_style_code_runs_against_a_window(broker, stream_name):
    rate = 250.0
    pub = slabcast.Publisher(stream_name, "float32", 8, rate, address=broker.address, channel_names=NAMES,
                             channel_types=TYPES, channel_units=["microvolts"] * 8)  # fmt: skip
    win = slabcast.Window(stream_name, 2.0, address=broker.address)
    rng = np.random.default_rng(3)
    written = rng.standard_normal((1000, 8)).astype(np.float32)
    times = 100.0 + np.arange(1000) / rate
    for k in range(0, 1000, 50):
        pub.write(written[k : k + 50], t0=times[k])
    assert win.wait(1000, timeout=10)
    assert win.n_new_samples == 1000 and win.n_buffer == 500
    sfreq, ch_names, windows, eog = online_loop(win, 1)
    assert sfreq == 250.0 and ch_names == NAMES
    ((data, ts),) = windows
    assert data.shape == (6, 250) and data.dtype == np.float32  # the stream's dtype, as MNE-LSL's buffer
    np.testing.assert_array_equal(data, written[-250:, :6].T)
    np.testing.assert_allclose(ts, times[-250:], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(eog, written[-125:, 6:].T)  # ceil(0.5 * 250)
    assert not win.connected
    pub.close()


def test_get_data_picks_winsize_and_n_new_samples(broker, stream_name):
    rate = 100.0
    pub = slabcast.Publisher(stream_name, "int16", 8, rate, address=broker.address, channel_names=NAMES,
                             channel_types=TYPES)  # fmt: skip
    with slabcast.Window(stream_name, 1.0, address=broker.address, dtype="float64") as win:
        written = (np.arange(300 * 8) % 3000).astype(np.int16).reshape(300, 8)
        pub.write(written[:30], t0=0.0)
        assert win.wait(30, timeout=10)
        data, _ = win.get_data()  # what there is: no zero-filled columns
        assert data.shape == (8, 30) and data.dtype == np.float64 and win.n_new_samples == 0
        pub.write(written[30:], t0=0.3)
        assert win.wait(300, timeout=10)
        assert win.n_new_samples == 270  # more than the window holds: counted, as MNE-LSL
        data, _ = win.get_data(winsize=0.25, picks=[7, "Fz", "eog"])  # ceil(0.25 * 100) = 25
        np.testing.assert_array_equal(data, written[-25:, [7, 0, 6, 7]].T.astype(np.float64))
        assert win.get_data(picks=slice(2, 4))[0].shape == (2, 100)
        assert win.get_data(picks=-1)[0].shape == (1, 100)
        assert win.get_channel_types(unique=True) == ["EEG", "EOG"]
        for bad, said in [("T7", "no channel named or typed 'T7'"), (8, "out of range"), (1.5, "indices, names")]:
            with pytest.raises(ValueError, match=said):
                win.get_data(picks=bad)
        with pytest.raises(ValueError, match="more than the window holds"):
            win.get_data(winsize=2.0)
        data, _ = win.get()  # the view's API is unchanged
        assert data.shape == (8, 100)
    pub.close()


def test_a_stream_without_a_rate_is_windowed_in_samples(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "float64", 2, None, address=broker.address, timestamps=True)
    with pytest.raises(ValueError, match="give samples="):
        slabcast.Window(stream_name, 1.0, address=broker.address)
    with slabcast.Window(stream_name, samples=50, address=broker.address) as win:
        assert win.info["sfreq"] == 0.0
        values = np.arange(80.0).reshape(40, 2)
        stamps = np.cumsum(np.random.default_rng(1).uniform(0.01, 0.5, 40))  # irregular events
        for k in range(0, 40, 8):
            pub.write(values[k : k + 8], times=stamps[k : k + 8])
        assert win.wait(40, timeout=10)
        data, ts = win.get_data(winsize=10)  # samples, for a stream without a rate
        np.testing.assert_array_equal(data, values[-10:].T)
        np.testing.assert_array_equal(ts, stamps[-10:])
        with pytest.raises(ValueError, match="an integer"):
            win.get_data(winsize=2.5)
    pub.close()


@pytest.mark.parametrize("how", ["closed", "failed"])
def test_an_analysis_loop_ends_with_its_stream_after_its_last_samples(broker, stream_name, how):
    # A newcomer: a Window on a stream that had ended returned its last data again at every get_data, and an
    # online loop ran on, silently, on the same samples.  Now the call after the end returns what came last, once,
    # and the next raises: EndOfStream for a stream its publisher closed, the failure for one that failed.
    pub = slabcast.Publisher(stream_name, "float32", 2, 100.0, address=broker.address)
    win = slabcast.Window(stream_name, 1.0, address=broker.address)
    written = np.arange(600, dtype=np.float32).reshape(300, 2)
    pub.write(written[:200], t0=0.0)
    assert win.wait(200, timeout=10)
    assert win.get_data()[0].shape == (2, 100) and not win.ended
    assert win.get_data()[0].shape == (2, 100)  # nothing new while the stream is live: the same window, no error
    pub.write(written[200:], t0=2.0)
    if how == "closed":
        pub.close()
    else:
        pub.abort("the amplifier's cable came off")
    assert not win.wait(301, timeout=10), "more samples than were written"  # (returns at the end)
    assert win.ended and not win.connected and win.samples == 300
    data, _ = win.get_data()  # the last samples, once
    np.testing.assert_array_equal(data, written[-100:].T)
    expected = (slabcast.EndOfStream, "ended after 300 samples") if how == "closed" else \
        (slabcast.PublisherGoneError, "cable came off")  # fmt: skip
    for _ in range(2):  # and again: never the same data twice
        with pytest.raises(expected[0], match=expected[1]) as raised:
            win.get_data()
        assert (raised.type is slabcast.EndOfStream) == (how == "closed")
    np.testing.assert_array_equal(win.get()[0], written[-100:].T)  # the display's call still shows the last ones
    win.close()
    pub.close()


def test_wait_new_waits_for_samples_since_the_last_get_data_and_an_online_loop_on_it_ends_with_the_stream(
    broker, stream_name
):
    # A newcomer wrote `while win.wait(250): data, ts = win.get_data(1.0)`: wait(n) counts samples received in all,
    # so once 250 had come it returned at once, every time, and the loop ran 69,617 times in 2 s on the same
    # window.  wait(new=n) waits for n samples since the last get_data (n_new_samples), the online loop's wait.
    pub = slabcast.Publisher(stream_name, "float32", 2, 100.0, address=broker.address)
    win = slabcast.Window(stream_name, 1.0, address=broker.address)
    written = np.arange(1000, dtype=np.float32).reshape(500, 2)
    pub.write(written[:150], t0=0.0)
    assert win.wait(new=150, timeout=10)
    assert win.get_data()[0].shape == (2, 100) and win.n_new_samples == 0
    assert win.wait(150, timeout=0) and win.wait(1.5 * 100, timeout=0)  # (in all: still true; 1.5 s at 100 Hz)
    assert not win.wait(new=1, timeout=0.2), "nothing new came since get_data"
    pub.write(written[150:200], t0=1.5)
    assert win.wait(new=50, timeout=10) and win.n_new_samples == 50
    rounds, seen = 0, []
    pub.write(written[200:], t0=2.0)  # 300 more, then the end
    pub.close()
    while win.wait(new=100, timeout=10):
        data, _ = win.get_data(winsize=0.5)
        rounds += 1
        seen.append(float(data[0, -1]))
        assert rounds <= 4, "wait(new=100) returned without 100 new samples"
    # 350 new samples since the last get_data: at most three rounds of 100 (fewer when they came faster than the
    # loop), the last full hundred read, and the loop ended with the stream.
    assert 1 <= rounds <= 3 and win.ended
    assert seen[-1] >= written[400, 0]
    for bad, match in (({}, "one of them"), ({"samples": 5, "new": 3}, "one of them"),
                       ({"new": -1}, "new must be a finite number of samples >= 0"), ({"new": math.inf}, "new must be"),
                       ({"samples": True}, "samples must be a finite number"), ({"samples": "5"}, "got '5'")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            win.wait(**bad)
    win.disconnect()
