"""What a recording read back shows when printed (open_recording's result at a prompt)."""

from __future__ import annotations

import numpy as np

from slabcast._info import StreamInfo
from slabcast.client.record import FRAME_RECORD, Recording


def test_a_recording_prints_in_one_line_not_its_frames():
    # 3 s at 48 kHz in 1,000 frames printed a line per frame (the arrays' own repr).
    info = StreamInfo("mic", np.dtype("<f4"), 2, 48000.0, ("l", "r"))
    frames = np.zeros(1000, FRAME_RECORD)
    rec = Recording(info, np.zeros((144_000, 2), np.float32), frames, times=np.zeros(144_000))
    text = repr(rec)
    assert "\n" not in text and len(text) < 200, text
    assert text == "Recording('mic', float32 x 2, rate=48000.0, samples (144000, 2), 1000 frames, times)"


def test_sample_times_are_the_kept_ones_or_each_frames_t0_and_the_rate():
    # A user plotting a recording of a stream without per-sample times found `times` None: sample_times() gives
    # an axis from the frames (t0 + k / rate; without a rate, each frame's t0), or the kept times as they are.
    info = StreamInfo("mic", np.dtype("<f4"), 1, 100.0, ("m",))
    frames = np.array([(0, 3, 10.0), (3, 2, 10.5), (5, 1, 20.0)], FRAME_RECORD)  # a jump before the last frame
    rec = Recording(info, np.zeros((6, 1), np.float32), frames)
    np.testing.assert_allclose(rec.sample_times(), [10.0, 10.01, 10.02, 10.5, 10.51, 20.0])
    markers = Recording(StreamInfo("ev", np.dtype("<i4"), 1, None, ("e",)), np.zeros((6, 1), np.int32), frames)
    assert markers.sample_times().tolist() == [10.0, 10.0, 10.0, 10.5, 10.5, 20.0]
    kept = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    assert Recording(info, np.zeros((6, 1), np.float32), frames, times=kept).sample_times().tolist() == kept.tolist()
    assert Recording(info, np.zeros((0, 1), np.float32), np.zeros(0, FRAME_RECORD)).sample_times().shape == (0,)
