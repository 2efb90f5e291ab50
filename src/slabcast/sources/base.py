"""What a hosted source is: the typed ``Source`` protocol the acquisition thread drives (:mod:`.thread`).

One module per kind beside it (``synthetic``, ``stdin``, ``file``, ``replay``, ``lsl``, ``audio``, ``zenoh``);
:mod:`.kinds` names them for the options schema and ``slabcast up``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .._info import StreamInfo

__all__ = ["Source"]


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
