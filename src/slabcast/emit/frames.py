"""A BufferEmit stream's format, fixed by its first frame: which frames it takes, and what a callback gets."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class FrameFormat:
    """A byte stream (``dtype`` None) or numpy frames of ``dtype`` with ``channels`` channels.

    ``oned``: the frames have shape ``(n,)`` (and so do the chunks), else ``(n, channels)``.
    ``asbuffer``: a byte stream's chunks are handed over as :class:`io.BytesIO`.
    Picklable: process mode sends it to its workers.
    """

    dtype: np.dtype[Any] | None
    channels: int = 1
    oned: bool = True
    asbuffer: bool = False

    @classmethod
    def first(cls, data: Any, asbuffer: bool) -> FrameFormat:
        """The format a stream's first frame fixes; TypeError or ValueError if no stream can take it."""
        if isinstance(data, np.ndarray):
            if data.ndim not in (1, 2):
                raise ValueError(f"a numpy frame must have shape (n,) or (n, channels), got shape {data.shape}")
            dtype = data.dtype
            channels = 1 if data.ndim == 1 else data.shape[1]
            if asbuffer:
                raise TypeError(
                    f"asbuffer=True hands the callback an io.BytesIO and applies to byte streams, "
                    f"got a numpy frame of dtype {dtype}"
                )
            if dtype.hasobject:
                raise TypeError(f"numpy frames must hold plain data, got dtype {dtype}")
            if dtype.itemsize * channels <= 0:
                raise ValueError(f"a sample must have at least one byte, got dtype {dtype} x {channels} channel(s)")
            return cls(dtype, channels, data.ndim == 1, asbuffer)
        if isinstance(data, bytes | bytearray | memoryview):
            return cls(None, 1, True, asbuffer)
        raise TypeError(f"a frame must be bytes-like or a numpy array, got {type(data).__name__}")

    def take(self, data: Any) -> tuple[Any, int, int]:
        """Check a frame against this format; return (a buffer of its bytes or None, samples, bytes).

        Raises TypeError or ValueError, saying what was expected, for a frame of another format.
        """
        if isinstance(data, np.ndarray):
            if data.ndim == 1:
                channels = 1
            elif data.ndim == 2:
                channels = data.shape[1]
            else:
                raise ValueError(f"a numpy frame must have shape (n,) or (n, channels), got shape {data.shape}")
            if self.dtype is None:
                raise TypeError(
                    f"this BufferEmit carries bytes (fixed by its first frame), got a numpy array of dtype "
                    f"{data.dtype}; nothing of the frame was written"
                )
            if data.dtype != self.dtype:
                raise TypeError(
                    f"frame dtype must be {self.dtype} (fixed by the first frame), got {data.dtype}; "
                    "nothing of the frame was written (nothing is cast)"
                )
            if channels != self.channels:
                raise ValueError(
                    f"frame must have {self.channels} channel(s) (fixed by the first frame), got shape "
                    f"{data.shape}; nothing of the frame was written"
                )
            n = data.shape[0]
            if not n:
                return None, 0, 0
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8), n, data.nbytes
        if isinstance(data, bytes | bytearray | memoryview):
            if self.dtype is not None:
                raise TypeError(
                    f"this BufferEmit carries numpy frames of dtype {self.dtype} x {self.channels} channel(s) "
                    f"(fixed by its first frame), got {type(data).__name__}; nothing of the frame was written"
                )
            view = memoryview(data)
            if not view.nbytes:
                return None, 0, 0
            if not view.c_contiguous:
                view = memoryview(view.tobytes())
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            return view, view.nbytes, view.nbytes
        raise TypeError(f"a frame must be bytes-like or a numpy array, got {type(data).__name__}")

    @property
    def sample_bytes(self) -> int:
        """Bytes per sample (one time point of every channel)."""
        return 1 if self.dtype is None else self.dtype.itemsize * self.channels

    def copier(self) -> Callable[[memoryview, int, int], Any]:
        """Return ``make(mv, offset, nbytes)`` building a callback's value as a copy it may keep."""
        dtype, channels, oned = self.dtype, self.channels, self.oned
        if dtype is None:
            if self.asbuffer:
                return lambda mv, off, nb: io.BytesIO(mv[off : off + nb])
            return lambda mv, off, nb: bytes(mv[off : off + nb])
        itemsize = dtype.itemsize

        def make(mv: memoryview, off: int, nb: int) -> Any:
            arr = np.frombuffer(mv, dtype, nb // itemsize, off)
            return (arr if oned else arr.reshape(-1, channels)).copy()

        return make
