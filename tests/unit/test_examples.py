"""The example tasks are right for every sample type: dBFS against the dtype's full scale, files bit-exact."""

from __future__ import annotations

import re
import wave
from types import SimpleNamespace

import numpy as np
import pytest

from slabcast import examples


def chunk(data):
    return SimpleNamespace(data=data, t0=0.0, seq=0, index=0)


def sine(dtype, amplitude=1.0, n=48000):
    x = np.sin(2 * np.pi * 1000 * np.arange(n) / 48000) * amplitude
    if np.dtype(dtype).kind == "f":
        return x.astype(dtype)
    info = np.iinfo(dtype)
    half = 2 ** (8 * np.dtype(dtype).itemsize - 1)
    centre = half if np.dtype(dtype).kind == "u" else 0
    return np.clip(np.round(x * (half - 1)) + centre, info.min, info.max).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "int16", "int32", "uint8"])
def test_spl_of_a_full_scale_sine_is_minus_3_dbfs_whatever_the_dtype(dtype, capfd):
    examples.spl(chunk(np.stack([sine(dtype), sine(dtype, 0.1)], axis=1)))
    levels = [float(v) for v in re.findall(r"=\s*(-?\d+\.\d) dBFS", capfd.readouterr().out)]
    assert levels == pytest.approx([-3.0, -23.0], abs=0.15)


@pytest.mark.parametrize("dtype", ["int16", "int32", "uint8"])
def test_wav_file_keeps_integer_samples_bit_exact(dtype, tmp_path):
    data = sine(dtype, n=4800)
    data[:3] = np.iinfo(dtype).max, np.iinfo(dtype).min, 100 if dtype != "uint8" else 7
    examples.wav_file(chunk(data), out=str(tmp_path), rate=48000)
    with wave.open(str(tmp_path / "000000000000.wav")) as w:
        assert (w.getsampwidth(), w.getframerate(), w.getnframes()) == (np.dtype(dtype).itemsize, 48000, 4800)
        back = np.frombuffer(w.readframes(4800), dtype=np.dtype(dtype).newbyteorder("<"))
    assert np.array_equal(back, data)


def test_flac_file_is_read_back_by_soundfile(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    data = np.stack([sine("int16", n=4800), sine("int16", 0.5, n=4800)], axis=1)
    examples.flac_file(chunk(data), out=str(tmp_path), rate=48000)
    back, rate = soundfile.read(str(tmp_path / "000000000000.flac"), dtype="int16")
    assert rate == 48000 and np.array_equal(back, data)
