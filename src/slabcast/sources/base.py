"""What a hosted source is: the typed ``Source`` protocol the acquisition thread drives (:mod:`.thread`).

One module per kind beside it (``synthetic``, ``stdin``, ``file``, ``replay``, ``lsl``, ``audio``, ``zenoh``);
:mod:`.kinds` names them for the options schema and ``slabcast up``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from .._info import StreamInfo
from ..core.rechunk import is_integer, is_real
from ..wire.protocol import check_dtype, check_stream_name

__all__ = ["Source", "positive_count", "positive_seconds", "sample_stream"]


def positive_count(value: Any, what: str) -> int:
    """``value`` as an int if it is a positive integer, else :class:`ValueError` naming ``what``."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def positive_seconds(value: Any, what: str) -> float:
    """``value`` as a float if it is a positive, finite number of seconds, else :class:`ValueError` naming
    ``what``."""
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def sample_stream(name: str, dtype: str, channels: Any, rate: Any, *, rate_optional: bool = False) -> StreamInfo:
    """The :class:`StreamInfo` of a source of ``channels`` channels named ``ch_0``..., its options checked where
    they enter (a ``slabcast up`` file, ``--source kind:...``): ``rate`` positive and finite samples per second
    (or None where ``rate_optional``), ``channels`` a positive integer.

    Raises
    ------
    ValueError
        Naming the option, what it must be and what came.
    """
    channels = positive_count(channels, "channels")
    if rate is None and rate_optional:
        pass
    elif not is_real(rate) or not 0 < rate < math.inf:
        none = " or none" if rate_optional else ""
        raise ValueError(f"rate must be a positive finite number of samples per second{none}, got {rate!r}")
    return StreamInfo(check_stream_name(name), check_dtype(dtype), channels, None if rate is None else float(rate),
                      tuple(f"ch_{i}" for i in range(channels)))  # fmt: skip


class Source(Protocol):
    """What the acquisition thread (:class:`~slabcast.sources.SourceThread`) needs of a source.

    ``read`` must not block for long: it returns what has arrived since the last
    call, as ``(data, timestamps)`` with ``data`` sample-major ``(n, channels)`` and
    ``timestamps`` the ``(n,)`` times of its samples (seconds, ``time.time()``'s
    clock; a stream whose info has no per-sample ``timestamps`` may give only the
    first sample's, ``(1,)``), or ``None`` when nothing is ready yet.  It raises
    :class:`EOFError` when the source has ended, :class:`OSError` when its device
    went away (the thread reconnects).

    The thread also uses, when a source has them: ``wait()`` (seconds until more is
    due), ``take_jump()`` (the next frame follows a hole), ``waiting`` (held until
    ``wait_for`` subscribers are there), ``publisher_options`` (its stream's pool),
    ``address`` and ``count_subscribers`` (how it asks for its subscribers), and
    ``attach(write)``: a source whose frames arrive on another thread's callback
    (``zenoh``) is handed ``write(data, timestamps, discontinuity, wait) -> bool``
    once its stream is open (False: the stream refused the frame; with ``wait``
    false, :class:`~slabcast.WriteTimeout` when no slab is free at once), and writes
    each frame there, with no queue and no thread between; its ``read`` then only
    watches (errors, silence) and returns ``None``.
    """

    def connect(self) -> StreamInfo:
        """Open the device or file and say what it carries."""

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return new samples and their timestamps, or ``None``."""

    def disconnect(self) -> None:
        """Release the device or file."""


class _Lap(Exception):  # a signal between a looping source and its thread, not an error
    """A looping source started again at its beginning: the next frame follows a jump."""
