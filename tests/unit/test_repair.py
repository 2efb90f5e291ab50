"""`slabcast record --repair` (record_audio.repair) on files whose frame records and audio disagree in length,
as a kill -9 leaves them: the records flushed before the audio, or the FLAC encoder's blocks out before them."""

from __future__ import annotations

import numpy as np
import pytest

import slabcast
from slabcast.client.record import FRAME_RECORD
from slabcast.client.record_audio import repair

soundfile = pytest.importorskip("soundfile")


def _take(tmp_path, samples: int, records: int, frame: int = 1000) -> tuple[str, np.ndarray]:
    """A closed int16 stereo FLAC of ``samples`` samples and a .frames sidecar of ``records`` records."""
    path = str(tmp_path / "take.flac")
    data = (np.arange(samples * 2) % 30000 - 15000).astype(np.int16).reshape(-1, 2)
    soundfile.write(path, data, 8000, format="FLAC", subtype="PCM_16")
    frames = np.zeros(records, FRAME_RECORD)
    frames["index"] = np.arange(records) * frame
    frames["n"] = frame
    frames["t0"] = frames["index"] / 8000.0
    frames.tofile(path + ".frames")
    return path, data


def test_samples_past_the_last_frame_record_are_left_out_as_the_reader_leaves_them(tmp_path):
    # The encoder wrote 20,480 samples out; the records flushed cover 17,000: --repair failed with IndexError.
    path, data = _take(tmp_path, 20480, 17)
    before = slabcast.open_recording(path)
    assert len(before.samples) == 17000
    assert repair(path) == 17000
    back, _ = soundfile.read(path, dtype="int16")
    assert np.array_equal(back, data[:17000]) and soundfile.info(path).frames == 17000
    after = slabcast.open_recording(path)
    assert int(after.frames["n"].sum()) == 17000 and len(after.frames) == 17
    assert np.array_equal(np.asarray(after.samples[:]), np.asarray(before.samples[:]))


def test_frame_records_past_the_last_sample_are_cut_to_it(tmp_path):
    path, data = _take(tmp_path, 16384, 20)
    assert repair(path) == 16384
    frames = np.fromfile(path + ".frames", FRAME_RECORD)
    assert int(frames["n"].sum()) == 16384 and len(frames) == 17 and frames["n"][-1] == 384
    back, _ = soundfile.read(path, dtype="int16")
    assert np.array_equal(back, data)
