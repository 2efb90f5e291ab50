"""Plain records shared by clients: what a stream carries, and subscriber counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["StreamInfo", "StreamStatistics", "SubscriberStatistics"]


@dataclass(frozen=True)
class StreamInfo:
    """What a stream carries, as declared by its publisher.

    Attributes
    ----------
    name : str
    dtype : numpy.dtype
    channels : int
    rate : float or None
        Samples per second, ``None`` when the stream has no fixed rate.
    channel_names : tuple of str
        ``("ch_0", ..., "ch_{n-1}")`` unless the publisher named them.
    """

    name: str
    dtype: np.dtype[Any]
    channels: int
    rate: float | None
    channel_names: tuple[str, ...]


@dataclass(frozen=True)
class SubscriberStatistics:
    """Counters of one subscriber, as seen from its own process.

    Attributes
    ----------
    received : int
        Chunks handed to the caller.
    released : int
        Chunks whose memory went back to the broker.
    held : int
        Chunks received and not yet released (their views are alive).
    dropped : int
        Chunks the broker cut for this subscriber but did not deliver
        (``policy="drop"``), exact: the gaps in ``seq``.
    last_seq : int
        ``seq`` of the newest chunk received, -1 before the first.
    """

    received: int
    released: int
    held: int
    dropped: int
    last_seq: int


@dataclass(frozen=True)
class StreamStatistics:
    """A stream's totals and rolling per-channel statistics, as kept by the broker.

    Attributes
    ----------
    name : str
    samples, frames : int
        Totals since the stream opened.
    window_seconds : float
        Stream time the rolling figures cover (0: the publisher turned them off).
    window_samples : int
        Samples in that window.
    observed_rate : float or None
        Samples per second actually arriving (wall clock), over the window.
    mean, std, min, max, ptp : tuple of float
        Per channel, over the window.
    subscribers : tuple of dict
        Per subscriber: ``label``, ``pid``, ``delivered``, ``dropped`` (chunks lost
        under ``policy="drop"``) and ``overflows`` (chunks that had to wait for
        credit under ``policy="block"``).
    """

    name: str
    samples: int
    frames: int
    window_seconds: float
    window_samples: int = 0
    observed_rate: float | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    min: tuple[float, ...] = ()
    max: tuple[float, ...] = ()
    ptp: tuple[float, ...] = ()
    subscribers: tuple[dict[str, Any], ...] = ()
