"""`slabcast view`'s sans-io core (slabcast.view.frames): the stream list, levels, the frame layout.

Moved from tests/integration/test_view.py, which runs the server and a browser.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from slabcast.view.frames import StreamList, levels, pack_frame, stream_envelope


def test_stream_list_follows_streams_appearing_ending_and_leaving():
    lst = StreamList(keep_ended=10.0)
    live = {"name": "a", "ended": False, "subscribers": [{"pid": 1}]}
    assert [s["name"] for s in lst.update({"streams": [live]}, 0.0)] == ["a"] and lst.live("a")
    (entry,) = lst.update({"streams": [{**live, "ended": True}]}, 1.0)
    assert entry["ended"] and not entry["gone"] and not lst.live("a")
    (entry,) = lst.update({"streams": []}, 2.0)  # the broker let it go: still listed, as ended and gone
    assert entry["ended"] and entry["gone"] and entry["subscribers"] == []
    assert lst.update({"streams": []}, 11.5) == []  # kept keep_ended seconds after it ended
    lst.update({"streams": [live]}, 20.0)
    lst.update({"streams": []}, 21.0)  # gone without an ended status in between: ended when first missed
    (entry,) = lst.update({"streams": [live]}, 22.0)  # the same name again: live again
    assert not entry["ended"] and lst.live("a")


def test_a_stream_gone_between_two_looks_is_listed_with_its_counts_at_its_end():
    # A newcomer: a 1 s stream of 48,000 samples showed 26,880 once ended (the last look before its end); the
    # broker's status now lists the final row of a stream that ended (ended_streams), which the list takes.
    lst = StreamList(keep_ended=10.0)
    live = {"name": "a", "ended": False, "samples": 26880, "frames": 56, "subscribers": [{"pid": 1}]}
    lst.update({"streams": [live]}, 0.0)
    final = {**live, "ended": True, "samples": 48000, "frames": 100, "subscribers": []}
    (entry,) = lst.update({"streams": [], "ended_streams": [final]}, 1.0)
    assert (entry["samples"], entry["frames"], entry["ended"], entry["gone"]) == (48000, 100, True, True)


def test_levels_are_dbfs_against_the_dtype_full_scale():
    half = np.full((2, 100), 16384, dtype=np.int16)
    half[1] = 0
    loud, silent = levels(half, audio=True)
    assert loud == {"rms": 16384.0, "peak": 16384.0, "dbfs": pytest.approx(-6.02, abs=0.01)}
    assert silent["dbfs"] is None and silent["rms"] == 0.0
    (eeg,) = levels(np.full((1, 10), 20.0), audio=False)
    assert eeg == {"rms": 20.0, "peak": 20.0, "dbfs": None}


def test_levels_of_nan_and_overflowing_samples_are_none_not_an_error():
    data = np.array([[0.5, np.nan, 0.5], [1e200, -1e200, 1.0], [0.5, -0.5, 0.5]])
    missing, huge, fine = levels(data, audio=False)
    assert missing == {"rms": None, "peak": None, "dbfs": None}
    assert huge["rms"] is None and huge["peak"] == 1e200
    assert fine == {"rms": 0.5, "peak": 0.5, "dbfs": None}
    part = stream_envelope("s", data, np.arange(3) / 10.0, 10.0, [0, 1, 2], 2, 0.3, audio=True)  # levels of all 3
    blob = pack_frame(1, [part])  # strict JSON (no NaN) whatever the samples
    (hlen,) = np.frombuffer(blob[:4], "<u4")
    assert json.loads(blob[4 : 4 + hlen])["streams"][0]["levels"][0]["rms"] is None


def test_frame_layout_round_trips():
    rate, n = 1000.0, 5000
    data = np.stack([np.arange(n) % 7, -np.ones(n)]).astype(np.float32)
    times = 1e9 + np.arange(n) / rate + np.random.default_rng(0).normal(0, 1e-3, n)  # a jittery clock
    part = stream_envelope("s", data, times, rate, [1, 0], width=100, seconds=2.0, audio=True)
    blob = pack_frame(7, [part], {"pending": ["t"]})
    (hlen,) = np.frombuffer(blob[:4], "<u4")
    head = json.loads(blob[4 : 4 + hlen])
    payload = np.frombuffer(blob[4 + hlen :], "<f4")
    assert hlen % 4 == 0 and head["seq"] == 7 and head["pending"] == ["t"]
    (s,) = head["streams"]
    assert s["columns"] == 100 and s["channels"] == [1, 0] and s["samples_shown"] == 2000 and s["span"] == 2.0
    x = payload[:100]
    assert x[0] == pytest.approx(-2.0) and x[-1] == pytest.approx(-0.02) and np.all(np.diff(x) > 0)
    assert np.all(payload[100:200] == -1) and np.all(payload[200:300] == -1)  # channel 1 first, as asked
    assert np.all(payload[300:400] == 0) and np.all(payload[400:500] == 6)  # channel 0: 0..6 in every column
    assert len(payload) == 500
