"""What a publisher is given, checked where it enters: frames (dtype, shape), per-sample times, pool sizes."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import numpy as np

from ..core.rechunk import is_integer, is_real
from ..wire import protocol as P

__all__ = ["DEFAULT_CHUNK_LIMIT", "DEFAULT_NSLABS", "DEFAULT_SLAB_BYTES", "check_frame", "check_times",
           "history_nslabs", "open_args", "pool_layout"]  # fmt: skip

DEFAULT_SLAB_BYTES = 4 << 20
DEFAULT_NSLABS = 8
DEFAULT_CHUNK_LIMIT = 64 << 20  # the largest chunk subscribers may grow a default pool to

_BYTES_LIKE = (bytes, bytearray, memoryview)

log = logging.getLogger("slabcast.client.publisher")


def open_args(
    stream: str, dtype: Any, channels: Any, rate: Any, slab_bytes: Any, max_chunk_bytes: Any, nslabs: Any,
    history: Any, timeout: Any = 10.0,
) -> tuple[np.dtype[Any], int, float | None, int, int, int]:  # fmt: skip
    """A :class:`~slabcast.Publisher`'s arguments checked (see its parameters): ``(dtype, channels, rate, slab
    bytes, carried part, nslabs)``, ``nslabs`` raised to hold ``history`` seconds when the stream has a rate.

    Raises
    ------
    ValueError, TypeError
        Saying which argument, what it must be and what came.
    """
    dtype = P.check_dtype(dtype)
    if not is_real(timeout) or not 0 < timeout < math.inf:  # (checked before OPEN: nothing is made for a bad one)
        raise ValueError(f"timeout must be a positive finite number of seconds (how long a write waits for a slab), "
                         f"got {timeout!r}")  # fmt: skip
    if not is_integer(channels) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")
    channels = int(channels)
    if rate is not None and (not is_real(rate) or not 0 < rate < math.inf):
        raise ValueError(f"rate must be a positive number of samples per second or None, got {rate!r}")
    rate = None if rate is None else float(rate)
    layout, carried = pool_layout(slab_bytes, max_chunk_bytes)
    if not is_integer(nslabs) or not 2 <= nslabs <= P.MAX_NSLABS:
        raise ValueError(f"nslabs must be an integer from 2 to {P.MAX_NSLABS}, got {nslabs!r}")
    nslabs = int(nslabs)
    if history is not None:
        if not is_real(history) or not 0 < history < math.inf:
            raise ValueError(f"history must be a positive finite number of seconds or None, got {history!r}")
        if rate is None:
            log.warning("stream %r: history=%g s sizes no pool for a stream without a rate: it keeps what %d slabs "
                        "hold", stream, history, nslabs)  # fmt: skip
        else:
            needed = history_nslabs(history, rate, dtype.itemsize * channels, layout - carried)
            if needed > P.MAX_NSLABS:
                raise ValueError(f"history={history:g} s needs {needed} slabs of {layout - carried} bytes of "
                                 f"frames, more than {P.MAX_NSLABS}: give larger slab_bytes")  # fmt: skip
            nslabs = max(nslabs, needed)
    return dtype, channels, rate, layout, carried, nslabs


def _element_format(dtype: np.dtype[Any]) -> str:
    """The buffer format numpy gives an array of ``dtype`` (``"h"``, ``"f"``, ``"B"``...), without a byte order
    mark for the native order: what the compiled path compares a frame's with."""
    fmt: str = np.empty(1, dtype).data.format
    return fmt[1:] if fmt[:1] in "@=<" and (fmt[:1] != "<" or sys.byteorder == "little") else fmt


def check_frame(data: Any, dtype: np.dtype[Any], channels: int, where: str) -> np.ndarray[Any, Any]:
    """Return ``data`` as a C-contiguous ``(n,)`` or ``(n, channels)`` array of ``dtype``, n >= 1.

    ``bytes``-like data is accepted for a byte stream (``uint8``, one channel).
    Nothing is cast: a frame of another dtype is refused.

    Raises
    ------
    TypeError
        Wrong type or dtype.
    ValueError
        Wrong shape, channel count, or an empty frame.
    """
    if type(data) is np.ndarray and data.dtype is dtype and data.flags.c_contiguous and (
        (data.ndim == 2 and data.shape[1] == channels) or (channels == 1 and data.ndim == 1)
    ) and data.shape[0]:
        return data  # a frame exactly as the stream wants it (per write): the checks below, in one step
    if isinstance(data, _BYTES_LIKE):
        if dtype != np.uint8 or channels != 1:
            raise TypeError(
                f"bytes are accepted only on a byte stream (dtype=uint8, channels=1); {where} carries "
                f"{dtype} x {channels}: pass a numpy array of shape (n, {channels}) and dtype {dtype}"
            )
        try:
            arr = np.frombuffer(data, dtype=np.uint8)
        except BufferError:  # a strided memoryview
            raise TypeError(
                f"a bytes-like frame must be contiguous for {where}; got a strided memoryview "
                f"(pass bytes(view), or a numpy array)"
            ) from None
    elif isinstance(data, np.ndarray):
        if data.dtype != dtype:
            want, came = str(dtype), str(data.dtype)
            if dtype.str[1:] == data.dtype.str[1:]:  # (the byte order alone differs: ">f4" against "float32")
                want, came = dtype.str, data.dtype.str
            raise TypeError(f"frame dtype must be {want} for {where}, got {came} (nothing is cast)")
        arr = data
    else:
        raise TypeError(
            f"a frame must be a numpy array (or bytes on a byte stream) for {where}, got {type(data).__name__}"
        )
    shape = arr.shape
    if (arr.ndim == 1 and channels == 1) or (arr.ndim == 2 and shape[1] == channels):
        pass
    else:
        want = "(n,) or (n, 1)" if channels == 1 else f"(n, {channels})"
        raise ValueError(f"frame shape must be {want} (sample-major) for {where}, got {shape}")
    if shape[0] < 1:
        raise ValueError(f"a frame must hold at least one sample, got shape {shape} for {where}")
    return np.ascontiguousarray(arr)


def check_times(
    times: Any, n: int, t0: float | None, rate: float | None, timestamps: bool, where: str
) -> np.ndarray[Any, Any]:
    """``times`` as ``(n,)`` float64, or the rate's times from ``t0`` when none are given.

    Raises
    ------
    ValueError
        For a stream without ``timestamps``, a shape other than ``(n,)``, or a time that is not finite.
    """
    if not timestamps:
        raise ValueError(f"times= needs a stream opened with timestamps=True; {where} was not")
    if times is None:
        start = time.time() if t0 is None else float(t0)
        step = 1.0 / rate if rate else 0.0
        return start + np.arange(n, dtype=np.float64) * step
    stamps = np.ascontiguousarray(times, dtype=np.float64)
    if stamps.shape != (n,):
        raise ValueError(f"times must have one value per sample, shape ({n},), got {stamps.shape} ({where})")
    if not np.isfinite(stamps).all():
        bad = int(np.flatnonzero(~np.isfinite(stamps))[0])
        raise ValueError(f"times must be finite seconds, got {float(stamps[bad])!r} at sample {bad} "
                         f"({where}); nothing was written")  # fmt: skip
    return stamps


def pool_layout(slab_bytes: int | None, max_chunk_bytes: int | None) -> tuple[int, int]:
    """The slabs a publisher asks for: ``(slab bytes, carried part)``, from its ``slab_bytes`` and
    ``max_chunk_bytes`` arguments (see :class:`Publisher`); frames get the rest of each slab.

    Raises
    ------
    ValueError
        For sizes that are not positive integers, or ``slab_bytes`` not a multiple of 4096 up to 2**30.
    """
    for key, value in (("slab_bytes", slab_bytes), ("max_chunk_bytes", max_chunk_bytes)):
        if value is not None and (not is_integer(value) or value < 1):
            raise ValueError(f"{key} must be a positive number of bytes, got {value!r}")
    slab_bytes = None if slab_bytes is None else int(slab_bytes)
    max_chunk_bytes = None if max_chunk_bytes is None else int(max_chunk_bytes)
    if slab_bytes is None:  # 4 MiB, or room for frames as long as the longest chunk asked for
        slab_bytes = DEFAULT_SLAB_BYTES if max_chunk_bytes is None else \
            max(DEFAULT_SLAB_BYTES, -(-2 * max_chunk_bytes // 4096) * 4096)  # fmt: skip
    elif slab_bytes % 4096 or slab_bytes > 1 << 30:
        raise ValueError(f"slab_bytes must be a multiple of 4096 up to 2**30, got {slab_bytes}")
    if max_chunk_bytes is not None:
        return slab_bytes, max_chunk_bytes
    # Frames up to half the slab, chunks up to the limit: address space, memory on demand.
    layout = -(-(slab_bytes // 2 + max(DEFAULT_CHUNK_LIMIT, slab_bytes // 2)) // 4096) * 4096
    return layout, layout - slab_bytes // 2


def history_nslabs(history: float, rate: float, sample_bytes: int, frame_bytes: int) -> int:
    """Slabs a pool needs so that ``history`` seconds of a stream at ``rate`` stay behind the slab being
    written (plus the slabs the broker grants ahead: two, or three where a slab holds less than ``FAST_SLAB``
    seconds of stream in a pool of ``FAST_POOL`` slabs or more: ``wire.protocol``): ``frame_bytes`` of frames
    per slab, at least 4."""
    behind = -(-int(history * rate * sample_bytes) // frame_bytes)
    fast = behind + 1 + P.GRANT_AHEAD >= P.FAST_POOL and frame_bytes < P.FAST_SLAB * rate * sample_bytes
    return max(4, behind + 1 + (P.GRANT_AHEAD_FAST if fast else P.GRANT_AHEAD))
