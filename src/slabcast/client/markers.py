"""Marker streams: events as UTF-8 strings, one per sample, each with its own time (docs/lsl.md, "Markers").

A marker stream is an ordinary stream: one channel of fixed-width bytes (numpy ``S<N>``), each
sample a UTF-8 string padded with NULs to ``N`` bytes, no nominal rate, and a time per sample
(``timestamps=True``). Frames, chunks, history, recordings and the data path carry it unchanged;
this module turns strings into such samples and back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ._pubargs import DEFAULT_NSLABS
from .publisher import Publisher

__all__ = ["DEFAULT_MAX_BYTES", "MarkerPublisher", "decode_markers", "encode_markers", "marker_dtype"]

DEFAULT_MAX_BYTES = 64  # the longest marker, in UTF-8 bytes, unless the stream says otherwise
MARKER_SLAB_BYTES = 1 << 16  # a marker stream's slabs: a few hundred markers each, not megabytes


def marker_dtype(max_bytes: int) -> np.dtype[Any]:
    """The dtype of a marker stream whose longest marker is ``max_bytes`` UTF-8 bytes: ``S<max_bytes>``.

    Raises
    ------
    ValueError
        If ``max_bytes`` is not a positive integer.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    return np.dtype(f"S{max_bytes}")


def encode_markers(markers: Any, dtype: np.dtype[Any], where: str) -> np.ndarray[Any, Any]:
    """``markers`` (a ``str``, strings, or ``bytes`` holding UTF-8) as an ``(n,)`` array of ``dtype`` (``S<N>``).

    Nothing is cut: a marker longer than ``N`` bytes in UTF-8 is refused, and so is one holding
    a NUL character (NULs pad a marker to its width, so a trailing one would be lost).

    Raises
    ------
    TypeError
        For a marker that is neither ``str`` nor ``bytes``.
    ValueError
        For a marker too long for ``dtype``, one holding NUL, or bytes that are not UTF-8.
    """
    width = dtype.itemsize
    items: Iterable[Any] = [markers] if isinstance(markers, str | bytes) else markers
    if isinstance(markers, np.ndarray):
        items = markers.reshape(-1).tolist() if markers.ndim == 1 or markers.shape[1:] == (1,) else markers
    out: list[bytes] = []
    for i, marker in enumerate(items):
        if isinstance(marker, str):
            raw = marker.encode("utf-8")
        elif isinstance(marker, bytes):
            raw = marker
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"marker {i} is bytes that are not UTF-8 ({exc.reason} at byte {exc.start}); "
                                 f"{where} takes UTF-8 strings; nothing was written") from None  # fmt: skip
        else:
            raise TypeError(f"a marker is a str (or UTF-8 bytes), got {type(marker).__name__} at marker {i} "
                            f"({where}); nothing was written")  # fmt: skip
        if len(raw) > width:
            raise ValueError(f"marker {i} is {len(raw)} bytes in UTF-8, longer than {where} holds ({width} bytes: "
                             f"max_bytes={width}): {raw[:40].decode('utf-8', 'replace')!r}...; nothing was "
                             f"written (open the stream with a larger max_bytes)")  # fmt: skip
        if b"\0" in raw:
            raise ValueError(f"marker {i} holds a NUL character, which pads markers ({where}): "
                             f"{raw.decode('utf-8', 'replace')!r}; nothing was written")  # fmt: skip
        out.append(raw)
    return np.array(out, dtype=dtype) if out else np.zeros(0, dtype=dtype)


def decode_markers(data: Any) -> list[str]:
    """The markers of ``data`` (a marker stream's ``(n,)`` or ``(n, 1)`` ``S<N>`` samples, or a ``Window``'s
    channels-first ``(1, n)``) as Python strings.

    The NUL padding goes; bytes that are not UTF-8 (a stream written as raw bytes) come back with
    U+FFFD in their place, never an error.

    Raises
    ------
    TypeError
        If ``data`` is not one channel of ``S<N>`` samples.
    """
    arr = np.asarray(data)
    if arr.dtype.kind != "S" or not (arr.ndim == 1 or (arr.ndim == 2 and 1 in arr.shape)):
        raise TypeError(f"markers are one channel of S<N> samples (a marker stream), got {arr.dtype} of shape "
                        f"{arr.shape}; for several channels of bytes use np.char.decode(data, 'utf-8')")  # fmt: skip
    return [raw.decode("utf-8", "replace") for raw in arr.reshape(-1).tolist()]


class MarkerPublisher(Publisher):
    """Publish markers (events): one UTF-8 string per sample, each with its own time.

    The stream is an ordinary one: one channel of ``S<max_bytes>`` (UTF-8, NUL padded), no
    rate, ``timestamps=True``, channel type ``type``. Subscribers read ``chunk.markers``; ``slabcast
    record`` writes it to XDF as a string stream, ``lsl-out`` as an LSL string outlet.

    Parameters
    ----------
    stream : str
        Stream name.
    max_bytes : int
        The longest marker, in UTF-8 bytes (default 64); a longer one is refused by :meth:`write`.
    address : str, optional
        Broker address.
    source_id : str, optional
        A unique id of the markers' origin (an experiment program), as LSL uses it.
    type : str
        The channel's type, as LSL's stream type (default ``"Markers"``, what LSL tools look for).
    channel_name : str
        The channel's name (default ``"marker"``).
    slab_bytes, nslabs : int
        The stream's pool (default 64 KiB slabs: some hundreds of markers each).
    timeout : float
        Seconds a ``write`` waits for a free slab.

    Raises
    ------
    ValueError
        For a ``max_bytes`` that is not a positive integer.
    StreamExistsError, BrokerGoneError, ShmFullError
        As :class:`Publisher`.
    """

    def __init__(self, stream: str, max_bytes: int = DEFAULT_MAX_BYTES, *, address: str | None = None,
                 source_id: str | None = None, type: str = "Markers", channel_name: str = "marker",
                 slab_bytes: int = MARKER_SLAB_BYTES, nslabs: int = DEFAULT_NSLABS,
                 timeout: float = 10.0) -> None:  # fmt: skip
        super().__init__(stream, marker_dtype(max_bytes), 1, None, address=address, slab_bytes=slab_bytes,
                         nslabs=nslabs, timeout=timeout, channel_names=[channel_name], statistics=0.0,
                         channel_types=[type] if type else None, source_id=source_id,
                         timestamps=True)  # fmt: skip
        self.max_bytes = int(max_bytes)

    def write(self, data: Any, t0: float | None = None, discontinuity: bool = False, times: Any = None) -> None:
        """Publish markers: a ``str``, a sequence of them (or UTF-8 ``bytes``, or an ``S<N>`` array).

        Parameters
        ----------
        data : str or sequence of str
            One marker per sample.
        t0 : float, optional
            The time of every marker when ``times`` is not given (default ``time.time()``).
        discontinuity : bool
            As :meth:`Publisher.write`.
        times : array-like, optional
            ``(n,)`` seconds, one per marker (``time.time()`` clock, or any clock the stream agrees on).

        Raises
        ------
        ValueError
            For a marker longer than ``max_bytes`` in UTF-8 (naming its length), one holding NUL,
            no marker, or ``times`` of another length; nothing is written.
        TypeError
            For a marker that is not a string.
        """
        samples = encode_markers(data, self.dtype, f"stream {self.name!r}")
        super().write(samples, t0=t0, discontinuity=discontinuity, times=times)
