"""The fields of a :class:`~slabcast.Publisher` that its mixins (:class:`~slabcast.client._pubslabs.SlabSwitching`,
:class:`~slabcast.client._telling.Telling`) use, declared once for the type checker; the methods each mixin calls of
the other's, likewise.  Nothing here exists at run time but the class: ``Publisher.__init__`` sets every field."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.geometry import Geometry
from ..core.ring import Ring
from ._flusher import Kick
from ._notices import NoticeSocket
from ._pubstate import PublisherState
from .connection import Connection

__all__ = ["PublisherFields"]


class PublisherFields:
    """What a publisher's mixins share: its fields (set in ``Publisher.__init__``) and each other's methods."""

    name: str
    address: str
    timeout: float
    slab_bytes: int
    sample_bytes: int
    samples: int
    _where: str
    _state: PublisherState
    _lock: threading.Lock
    _conn: Connection
    _notices: NoticeSocket
    _ring: Ring
    _writer: Any | None  # core/_hot.c's Writer, when built and the stream keeps no per-sample times
    _mm: Any
    _u8: np.ndarray[Any, Any]
    _geometry: Geometry
    _bounds: list[tuple[int, int]]
    _populated: list[int]
    _prepared: tuple[int, int, int, int, int] | None
    _prep_asked: bool
    _position: int
    _slab: int
    _gen: int
    _floor: int
    _frame_max: int
    _synced: int
    _failure: BaseException | None
    held_back_since: float | None  # time.monotonic() since a write waits for a granted slab (None: it does not)
    _kick: Kick
    _flusher: threading.Thread
    _closed: bool
    _sid: int
    _nseq: int

    if TYPE_CHECKING:  # (each mixin's, called by the other)

        def _flush_pending(self, sleeper: bool = False) -> None: ...

        def _published(self) -> None: ...

        def _take_locked(self, timeout: float) -> None: ...

        def _prepare_switch(self) -> None: ...
