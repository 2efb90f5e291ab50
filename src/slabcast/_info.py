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
    channel_types : tuple of str
        Per channel, e.g. ``"EEG"``, ``"EMG"`` (LSL's ``type``); empty when not given.
    channel_units : tuple of str
        Per channel, e.g. ``"microvolts"``; empty when not given.
    source_id : str
        A unique id of the data's origin (LSL's ``source_id``: a device serial), or ``""``.
    timestamps : bool
        Every sample carries its own time (``chunk.times`` reads them in place);
        otherwise sample ``k`` of a frame is at ``t0 + k / rate``.
    """

    name: str
    dtype: np.dtype[Any]
    channels: int
    rate: float | None
    channel_names: tuple[str, ...]
    channel_types: tuple[str, ...] = ()
    channel_units: tuple[str, ...] = ()
    source_id: str = ""
    timestamps: bool = False

    def metadata(self) -> dict[str, Any]:
        """The optional fields as plain data (what travels in OPEN/SUBSCRIBED and into recordings)."""
        return {"channel_types": list(self.channel_types), "channel_units": list(self.channel_units),
                "source_id": self.source_id, "timestamps": self.timestamps}  # fmt: skip

    @staticmethod
    def check_metadata(meta: Any, channels: int) -> dict[str, Any]:
        """Validate ``meta`` (``None`` or a map of the optional fields) for a stream of ``channels``.

        Raises
        ------
        ValueError
            Naming the field and what was expected.
        """
        if meta is None:
            return {"channel_types": [], "channel_units": [], "source_id": "", "timestamps": False}
        if not isinstance(meta, dict):
            raise ValueError(f"stream metadata must be a map, got {type(meta).__name__}")
        unknown = set(meta) - {"channel_types", "channel_units", "source_id", "timestamps"}
        if unknown:
            known = "channel_types, channel_units, source_id, timestamps"
            raise ValueError(f"unknown stream metadata {sorted(unknown)}; known: {known}")
        out: dict[str, Any] = {"source_id": meta.get("source_id") or "", "timestamps": meta.get("timestamps") or False}
        if not isinstance(out["timestamps"], bool):
            raise ValueError(f"timestamps must be true or false, got {out['timestamps']!r}")
        if not isinstance(out["source_id"], str) or len(out["source_id"]) > 256:
            raise ValueError(f"source_id must be a string of at most 256 characters, got {out['source_id']!r}")
        for key in ("channel_types", "channel_units"):
            values = list(meta.get(key) or ())
            if values and (len(values) != channels or not all(isinstance(v, str) and len(v) <= 64 for v in values)):
                raise ValueError(f"{key} must be {channels} strings of at most 64 characters, got {values!r}")
            out[key] = values
        return out


@dataclass(frozen=True)
class SubscriberStatistics:
    """Counters of one subscriber, as seen from its own process.

    Attributes
    ----------
    received : int
        Chunks handed to the caller.
    released : int
        Chunks given back: released, or every view of them gone (over ``tcp://`` their RELEASE
        message may go with the next :meth:`~slabcast.Subscriber.recv`'s).
    held : int
        Chunks received and not yet released (their views are alive).
    dropped : int
        Chunks cut for this subscriber but not delivered (``policy="drop"``), exact:
        the gaps in ``seq`` up to ``last_seq``, plus those dropped after the last
        chunk received (``received + dropped`` is every chunk cut).
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
        Samples in that window (it starts again at a discontinuity: a source that restarted).
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
