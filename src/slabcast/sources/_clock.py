"""Sample-clock timestamps, pacing and ``wait_for`` shared by the sources read from a pipe or a file."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._info import StreamInfo


class _Clocked:
    """Sample-clock timestamps, optional pacing and ``wait_for`` for sources read from a pipe or a file.

    ``t0`` of sample ``k`` is ``start + k / rate``: the time the first sample was
    taken, plus its position (never the arrival time of a read, which jitters;
    ``speed`` changes when samples are released, not their timestamps).
    With ``pace``, samples are released no faster than ``rate * speed``;
    without it, as fast as they come (a file: as fast as the subscribers take
    them, since a ``block`` subscriber holds the publisher back).  ``wait_for=N``
    holds the first sample until the stream has N subscribers, so a short file or
    pipe is not over before the workers that read it have started.
    """

    info: StreamInfo
    address: str | None
    frame: int
    count_subscribers: Callable[[str], int] | None = None  # set by the broker hosting it: asks no socket

    def _clock_init(self, pace: bool, speed: float, wait_for: int) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.pace = bool(pace)
        self.speed = float(speed)
        self.wait_for = int(wait_for)
        self.address = None
        self._start = 0.0
        self._produced = 0

    @property
    def waiting(self) -> bool:
        """Whether the first sample is held until ``wait_for`` subscribers are there."""
        return not self._start and self.wait_for > 0

    def _ready(self) -> bool:
        """Whether samples may go out now (subscribers there, started)."""
        if self._start:
            return True
        if self.wait_for and not _enough_subscribers(self, self.info.name, self.wait_for):
            return False
        self._start = time.time()
        return True

    def _want(self) -> int:
        """Samples that may go out now, at most a frame (0: none yet)."""
        if not self._ready():
            return 0
        allowed = self._allowed()
        if allowed is None:
            return self.frame
        # Whole frames only, while the input lasts (its short end goes out once a frame's time has passed).
        return self.frame if allowed >= self.frame else 0

    def _allowed(self) -> int | None:
        """Samples that may go out now without running ahead of the clock (None: no limit)."""
        rate = self.info.rate
        if not self.pace or not rate:
            return None
        return int((time.time() - self._start) * rate * self.speed) - self._produced

    def _stamps(self, n: int) -> np.ndarray[Any, Any]:
        rate = self.info.rate
        first = self._produced
        self._produced += n
        if rate:
            return self._start + (first + np.arange(n)) / rate  # stream time: speed changes when, not what
        return np.full(n, time.time())

    def wait(self) -> float:
        """Seconds until a whole frame is due (paced: a frame of what came due during the last write would be a
        sample or two, and the thread would spin)."""
        rate = self.info.rate
        if not self._start:
            return 0.01
        if not self.pace or not rate:
            return 0.0
        return max(0.0, self._start + (self._produced + self.frame) / (rate * self.speed) - time.time())


def _enough_subscribers(source: Any, name: str, wanted: int) -> bool:
    """Whether stream ``name`` has ``wanted`` subscribers: asked of the hosting broker in process when it
    says how (``count_subscribers``), else over its socket."""
    from ..client.control import broker_status

    count = getattr(source, "count_subscribers", None)
    if count is not None:
        return bool(count(name) >= wanted)
    try:
        streams = broker_status(source.address, timeout=1.0)["streams"]
    except Exception:  # the broker is starting or stopping; try again on the next read
        return False
    mine = [s for s in streams if s["name"] == name and not s["ended"]]
    return bool(mine) and len(mine[0]["subscribers"]) >= wanted
