"""The ``replay`` source: a recording played back as a live stream, paced against the clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._info import StreamInfo
from ..wire.protocol import check_stream_name
from ._clock import _enough_subscribers

__all__ = ["ReplaySource"]


class ReplaySource:
    """A recording (any format :func:`slabcast.open_recording` reads) played back as a live stream, paced
    against the clock (``speed`` 2.0: twice as fast).

    Frames come out exactly as recorded, with their original timestamps (shifted by
    the recording's length on each ``loop``), so record -> replay -> record is
    bit-exact.  ``wait_for=N`` (default 1) holds playback until the stream has N
    subscribers, so they see it from its first sample (a recording, like a file, is
    over before late subscribers come; ``wait_for=0`` plays at once).  ``stream`` names the stream to play of a
    recording holding several (an XDF file, a Zarr session).
    """

    count_subscribers: Callable[[str], int] | None = None  # set by the broker hosting it: asks no socket

    def __init__(self, path: str, speed: float = 1.0, loop: bool = False, name: str | None = None,
                 wait_for: int = 1, address: str | None = None, stream: str | None = None) -> None:  # fmt: skip
        from ..client.record import open_recording

        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.recording = open_recording(path, stream)
        rec = self.recording.info
        self.info = StreamInfo(check_stream_name(name or rec.name), rec.dtype, rec.channels, rec.rate,
                               rec.channel_names, rec.channel_types, rec.channel_units, rec.source_id,
                               rec.timestamps and self.recording.times is not None)  # fmt: skip
        self.speed = float(speed)
        self.loop = bool(loop)
        self.wait_for = int(wait_for)
        self.address = address
        self._next = 0
        self._lap = 0
        self._start = 0.0

    def connect(self) -> StreamInfo:
        """Say what the recording carries."""
        return self.info

    def _due(self, k: int) -> float:
        frames = self.recording.frames
        offset = float(frames["t0"][k] - frames["t0"][0]) + self._lap * self._length()
        return self._start + offset / self.speed

    def _length(self) -> float:
        rec = self.recording
        frames = rec.frames
        last = float(frames["t0"][-1] - frames["t0"][0])
        if rec.info.rate:
            last += float(frames["n"][-1]) / rec.info.rate
        return last

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return the next frame once its time has come; :class:`EOFError` at the end (unless looping)."""
        frames = self.recording.frames
        if not len(frames):
            raise EOFError("empty recording")
        if self._start == 0.0:
            if self.wait_for and not self._enough_subscribers():
                return None
            self._start = time.time()
        if self._next >= len(frames):
            if not self.loop:
                raise EOFError("end of recording")
            self._next = 0
            self._lap += 1
        k = self._next
        if time.time() < self._due(k):
            return None
        index, n, t0 = int(frames["index"][k]), int(frames["n"][k]), float(frames["t0"][k])
        first = int(frames["index"][0])
        data = np.asarray(self.recording.samples[index - first : index - first + n]).reshape(n, -1)
        t0 += self._lap * self._length()
        rate = self.info.rate
        if self.recording.times is not None:  # each sample's own time, as recorded
            stamps = np.asarray(self.recording.times[index - first : index - first + n]) + self._lap * self._length()
        else:
            stamps = t0 + np.arange(n) / rate if rate else np.full(n, t0)
        self._next += 1
        return (data if self.info.channels > 1 else data[:, 0]), stamps

    def wait(self) -> float:
        """Seconds until the next frame is due."""
        if self._start == 0.0:
            return 0.01
        k = min(self._next, len(self.recording.frames) - 1)
        return max(0.0, self._due(k) - time.time())

    @property
    def waiting(self) -> bool:
        """Whether playback is held until ``wait_for`` subscribers are there."""
        return self._start == 0.0 and self.wait_for > 0

    def _enough_subscribers(self) -> bool:
        return _enough_subscribers(self, self.info.name, self.wait_for)

    def disconnect(self) -> None:
        """Close the recording's memory map."""
        self.recording.samples = np.zeros((0, self.info.channels), dtype=self.info.dtype)
