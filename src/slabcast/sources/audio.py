"""The ``audio`` source: a sound card input through PortAudio (extra ``audio``)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._info import StreamInfo
from .base import positive_count, sample_stream

__all__ = ["SoundCardSource"]


class SoundCardSource:
    """A sound card input through PortAudio (extra ``audio``: ``pip install slabcast[audio]``).

    PortAudio's callback thread only queues the blocks it is given; the acquisition
    thread takes them from the queue, so the audio thread never waits on slabcast.
    """

    def __init__(self, name: str = "mic", device: int | str | None = None, rate: float = 48_000.0, channels: int = 2,
                 dtype: str = "float32", frame: int = 480) -> None:  # fmt: skip
        try:
            import sounddevice
        except (ImportError, OSError) as exc:  # OSError: the PortAudio library is missing
            raise ImportError(f"the sound card source needs sounddevice and PortAudio: {exc}") from exc
        import queue

        self._sd = sounddevice
        self.device = device
        self.frame = positive_count(frame, "frame")
        self.info = sample_stream(name, dtype, channels, rate)
        self._blocks: queue.SimpleQueue[tuple[np.ndarray[Any, Any], float]] = queue.SimpleQueue()
        self._stream: Any = None

    def connect(self) -> StreamInfo:
        """Open and start the input stream (``OSError`` if the device is missing)."""

        def callback(indata: Any, frames: int, when: Any, status: Any) -> None:
            self._blocks.put((indata.copy(), time.time() - frames / float(self.info.rate or 1)))

        try:
            self._stream = self._sd.InputStream(
                device=self.device, samplerate=self.info.rate, channels=self.info.channels,
                dtype=self.info.dtype.name, blocksize=self.frame, callback=callback,
            )  # fmt: skip
            self._stream.start()
        except Exception as exc:  # PortAudioError derives from Exception
            raise OSError(f"cannot open sound card input {self.device!r}: {exc}") from exc
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return the oldest block PortAudio delivered, or ``None``."""
        import queue

        try:
            data, t0 = self._blocks.get_nowait()
        except queue.Empty:
            return None
        rate = self.info.rate or 1.0
        return (data if self.info.channels > 1 else data[:, 0]), t0 + np.arange(len(data)) / rate

    def wait(self) -> float:
        """Poll at a quarter of a block."""
        return self.frame / float(self.info.rate or 1.0) / 4

    def disconnect(self) -> None:
        """Stop and close the input stream."""
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None
