"""The ``file`` source: an audio file read through ``soundfile`` (extra ``files``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._info import StreamInfo
from ..wire.protocol import check_dtype, check_stream_name
from ._clock import _Clocked
from .base import _Lap, positive_count

__all__ = ["FileSource"]


class FileSource(_Clocked):
    """An audio file read through ``soundfile`` (libsndfile: WAV, FLAC, OGG, AIFF ...; extra ``files``).

    Parameters
    ----------
    path : str
        The file.
    name : str, optional
        Stream name (default: the file's name without extension, made valid).
    dtype : str, optional
        Sample type delivered: default ``int16`` for 16-bit and 8-bit PCM,
        ``int32`` for 24/32-bit PCM, ``float32`` otherwise.
    frame : int
        Samples per frame.
    pace : bool
        Release samples at the file's rate (times ``speed``); default: as fast as
        the subscribers take them.
    loop : bool
        Start again at the end (the first frame of each lap has ``discontinuity``).
    wait_for : int
        Hold the first sample until the stream has this many subscribers.
    """

    def __init__(self, path: str, name: str | None = None, dtype: str | None = None, frame: int = 4800,
                 pace: bool = False, speed: float = 1.0, loop: bool = False, wait_for: int = 1) -> None:  # fmt: skip
        frame = positive_count(frame, "frame")  # (0 or less: a source that reads nothing, flat out, forever)
        try:
            import soundfile
        except ImportError as exc:
            raise ImportError("the file source needs soundfile: pip install 'slabcast[files]'") from exc
        self._sf = soundfile
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise OSError(f"no audio file at {self.path!r}")
        try:
            meta = soundfile.info(self.path)
        except Exception as exc:  # soundfile raises its own LibsndfileError (a RuntimeError) or OSError
            raise OSError(f"cannot read audio file {self.path!r}: {exc}") from exc
        if dtype is None:
            dtype = "int16" if meta.subtype in ("PCM_16", "PCM_S8", "PCM_U8") else (
                "int32" if meta.subtype in ("PCM_24", "PCM_32") else "float32")  # fmt: skip
        dt = check_dtype(dtype)
        if dt.name not in ("int16", "int32", "float32", "float64"):
            raise ValueError(f"dtype must be int16, int32, float32 or float64 for a file, got {dt}")
        stem = os.path.splitext(os.path.basename(self.path))[0]
        default = "".join(c if c.isalnum() or c in "_.:-" else "_" for c in stem)[:64] or "file"
        self.info = StreamInfo(check_stream_name(name or default), dt, int(meta.channels), float(meta.samplerate),
                               tuple(f"ch_{i}" for i in range(int(meta.channels))))  # fmt: skip
        self.frame = frame
        self.loop = bool(loop)
        self._file: Any = None
        self._clock_init(pace, speed, wait_for)

    def connect(self) -> StreamInfo:
        """Open the file."""
        self._file = self._sf.SoundFile(self.path)
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return the next frame; :class:`EOFError` at the end (unless looping)."""
        want = self._want()
        if want < 1:
            return None
        data = self._file.read(want, dtype=self.info.dtype.name, always_2d=True)
        if not len(data):
            if not self.loop:
                raise EOFError(f"end of {self.path}")
            self._file.seek(0)
            raise _Lap()
        data = np.ascontiguousarray(data)
        return (data if self.info.channels > 1 else data[:, 0]), self._stamps(len(data))

    def disconnect(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
