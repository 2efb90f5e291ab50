"""The ``synthetic`` source: sine tones plus noise, paced by the clock."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._info import StreamInfo
from .base import positive_count, sample_stream

__all__ = ["SyntheticSource"]


class SyntheticSource:
    """Sine tones plus noise, paced by the clock so that ``rate`` samples arrive per second without drift.

    Parameters
    ----------
    name : str
    rate : float
    channels : int
    frame : int
        Samples per ``read`` at most (the pacing granularity).
    freqs : list of float
        One tone per channel (cycled).
    noise : float
        Standard deviation of the added Gaussian noise.
    amplitude : float
        Peak of each tone, in full scale (1.0: the dtype's largest value for an integer dtype).
    dtype : str
        ``float32`` (default), ``float64``, or an integer PCM dtype (``int16``, ``int32``): samples are
        scaled to its range.
    """

    def __init__(self, name: str = "synthetic", rate: float = 48_000.0, channels: int = 2, frame: int = 480,
                 freqs: list[float] | None = None, noise: float = 0.01, amplitude: float = 0.5,
                 dtype: str = "float32") -> None:  # fmt: skip
        self.info = sample_stream(name, dtype, channels, rate)
        self.frame = positive_count(frame, "frame")
        self.freqs = np.resize(np.asarray(freqs or [440.0, 1000.0], dtype=np.float64), self.info.channels)
        self.noise = float(noise)
        self.amplitude = float(amplitude)
        self._rng = np.random.default_rng()
        self._start = 0.0
        self._produced = 0

    def connect(self) -> StreamInfo:
        """Start the clock."""
        self._start = time.time()
        self._produced = 0
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return the samples due since the last call (at most ``frame``), stamped from the start time."""
        rate = self.info.rate
        assert rate is not None
        due = int((time.time() - self._start) * rate) - self._produced
        if due < self.frame:
            return None  # whole frames only: a frame of what came due during the last write would be tiny
        n = self.frame
        index = self._produced + np.arange(n)
        t = index / rate
        data = self.amplitude * np.sin(2 * np.pi * t[:, None] * self.freqs[None, :])
        data += self.noise * self._rng.standard_normal(data.shape)
        self._produced += n
        dtype = self.info.dtype
        if dtype.kind == "i":  # full scale is the dtype's range (an int16 cast of 0.5 would be silence)
            top = np.iinfo(dtype).max
            data = np.clip(np.rint(data * top), np.iinfo(dtype).min, top)
        elif dtype.kind == "u":  # unsigned PCM: silence is half the range
            top = np.iinfo(dtype).max
            data = np.clip(np.rint((data + 1.0) * (top / 2)), 0, top)
        return data.astype(dtype), self._start + t

    def disconnect(self) -> None:
        """Nothing to release."""

    def wait(self) -> float:
        """Seconds until the next frame is due (for the acquisition thread's pacing)."""
        rate = self.info.rate or 1.0
        return max(0.0, self._start + (self._produced + self.frame) / rate - time.time())
