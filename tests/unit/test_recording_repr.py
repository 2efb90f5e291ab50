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
