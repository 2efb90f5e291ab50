"""The ``stdin`` source: raw bytes or typed samples from standard input (``arecord ... | slabcast up``)."""

from __future__ import annotations

import logging
import os
import select
import sys
from typing import Any

import numpy as np

from .._info import StreamInfo
from ._clock import _Clocked
from .base import positive_count, sample_stream

__all__ = ["StdinSource"]

log = logging.getLogger("slabcast.source")


class StdinSource(_Clocked):
    """Raw bytes or typed samples from standard input (``arecord ... | slabcast up ...``).

    Parameters
    ----------
    name, dtype, channels, rate :
        What the bytes are: ``int16`` stereo at 48 kHz is ``dtype=int16,channels=2,rate=48000``.
    frame : int
        Samples per read at most.
    pace : bool
        Release samples no faster than ``rate`` (for a pipe fed faster than real
        time, e.g. ``sox file.wav -t raw -``); a live device paces itself.
    wait_for : int
        Hold the first sample until the stream has this many subscribers.

    Timestamps follow the sample clock: ``t0 = start + index / rate`` (the
    arrival time of each read when there is no rate).
    """

    def __init__(self, name: str = "stdin", dtype: str = "uint8", channels: int = 1, rate: float | None = None,
                 frame: int = 4096, fd: int | None = None, pace: bool = False, speed: float = 1.0,
                 wait_for: int = 1) -> None:  # fmt: skip
        self.info = sample_stream(name, dtype, channels, rate, rate_optional=True)
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.frame = positive_count(frame, "frame")
        self._sample_bytes = self.info.dtype.itemsize * self.info.channels
        self._pending = b""
        self._eof = False
        self._clock_init(pace, speed, wait_for)

    def connect(self) -> StreamInfo:
        """Nothing to open: standard input is already there."""
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return whole samples read so far; raise :class:`EOFError` at the end of input."""
        want = self._want()
        if want < 1:
            return None
        need = want * self._sample_bytes - len(self._pending)
        if need > 0 and not self._eof:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                block = os.read(self.fd, need)
                if block:
                    self._pending += block
                else:
                    self._eof = True
        whole = min(len(self._pending) // self._sample_bytes, want) * self._sample_bytes
        if not whole:
            if self._eof:
                if self._pending:
                    log.warning("stdin source %r: the input ended inside a sample; its last %d bytes were dropped "
                                "(a sample is %d bytes)", self.info.name, len(self._pending), self._sample_bytes)
                raise EOFError("end of standard input")
            return None
        data, self._pending = self._pending[:whole], self._pending[whole:]
        arr = np.frombuffer(data, dtype=self.info.dtype)
        n = len(arr) // self.info.channels
        if self.info.channels > 1:
            arr = arr.reshape(n, self.info.channels)
        return arr, self._stamps(n)

    def disconnect(self) -> None:
        """Nothing to release."""
