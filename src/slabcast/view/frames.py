"""The view's sans-io core: which streams exist or ended, per-channel levels, and the binary display frame.

No sockets, no threads, an injected clock: the web shell (:mod:`slabcast.view.app`)
feeds it broker status replies and window contents and sends what it returns.

A display frame is one websocket binary message, little-endian::

    offset  size  field
    0       4     uint32 H: length of the JSON header in bytes
    4       H     JSON header (UTF-8), padded with spaces to a multiple of 4 bytes
    4 + H   ...   float32 payload: per stream, in header order, ``x[columns]`` (seconds
                  relative to the newest sample, <= 0), then per drawn channel
                  ``min[columns]`` and ``max[columns]``

The header is ``{"type": "frame", "seq": n, "streams": [{"name", "columns", "channels"
(indices), "offset" (of the stream's x in the payload, in float32 elements),
"samples_shown" (in this envelope), "span" (its seconds), "t_newest" (the newest
sample's time, seconds, the stream's clock; null if none), "levels": [{"rms", "peak",
"dbfs"}], and from the view (``view/app.py``) "samples" (the window's samples so far),
"live" (its stream still runs), "rate", "names" (the drawn channels' names)}, ...]}``.
A marker stream has no payload (``columns`` 0, no channels) and ``"markers": [[time,
text], ...]``, oldest first.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..client.window import envelope, envelope_tsdownsample
from ..examples import full_scale

__all__ = [
    "LEVEL_SECONDS",
    "MARKERS_SHOWN",
    "StreamList",
    "is_audio",
    "levels",
    "marker_list",
    "pack_frame",
    "stream_envelope",
]

LEVEL_SECONDS = 0.3
"""Stream time the level and RMS figures cover (a VU meter's integration time)."""

MARKERS_SHOWN = 100
"""The newest markers a marker stream's window keeps (its panel lists those of the span shown)."""


def is_audio(dtype: np.dtype[Any], channel_types: list[str] | tuple[str, ...],
             channel_units: list[str] | tuple[str, ...]) -> bool:  # fmt: skip
    """Whether levels are meaningful in dBFS: integer PCM, or floats typed ``audio`` (or neither typed nor unit-ed)."""
    if dtype.kind in "iu":
        return True
    if dtype.kind != "f":
        return False
    if channel_types:
        return all(t.lower() == "audio" for t in channel_types)
    return not any(channel_units)


def levels(data: np.ndarray[Any, Any], audio: bool) -> list[dict[str, float | None]]:
    """Per channel of ``data`` (``(channels, n)``): RMS and peak of the raw values, and dBFS of the RMS for audio.

    dBFS is against the dtype's full scale (``slabcast.examples.full_scale``): a
    full-scale sine is -3.01 dBFS, a full-scale square wave 0. Silence is ``-inf``,
    sent as ``None``, as is any figure a NaN or inf sample makes non-finite.
    """
    out: list[dict[str, float | None]] = []
    if data.shape[1] == 0:
        return [{"rms": None, "peak": None, "dbfs": None} for _ in range(data.shape[0])]
    x = data.astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # a sensor's NaN, or 1e200 squared: no figure, no error
        rms = np.sqrt(np.mean(np.square(x), axis=1))
        peak = np.max(np.abs(x), axis=1)
        scaled = np.sqrt(np.mean(np.square(full_scale(data)), axis=1)) if audio else None
    for i in range(data.shape[0]):
        dbfs: float | None = None
        if scaled is not None and math.isfinite(scaled[i]) and scaled[i] > 0:
            dbfs = round(20 * math.log10(float(scaled[i])), 2)
        out.append({"rms": _finite(rms[i]), "peak": _finite(peak[i]), "dbfs": dbfs})
    return out


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class StreamEnvelope:
    """One stream's part of a display frame."""

    header: dict[str, Any]
    arrays: list[np.ndarray[Any, Any]]


def stream_envelope(name: str, data: np.ndarray[Any, Any], times: np.ndarray[Any, Any], rate: float,
                    channels: list[int], width: int, seconds: float, audio: bool,
                    method: str = "numpy") -> StreamEnvelope:  # fmt: skip
    """The envelope of the newest ``seconds`` of ``data`` (``(all channels, n)``) at ``width`` columns.

    ``channels``: indices to draw; levels cover the newest ``LEVEL_SECONDS``.
    """
    keep = max(1, round(seconds * rate))
    data, times = data[channels, -keep:], times[-keep:]
    if method == "tsdownsample" and data.shape[0]:
        mins, maxs, cols = envelope_tsdownsample(data, times, width)
    else:
        mins, maxs, cols = envelope(data, times, width)
    newest = _finite(times[-1]) if len(times) else 0.0
    # x from sample positions, not timestamps: publishers' clocks jitter, and a plot needs x ascending.
    n = data.shape[1]
    columns = len(cols)
    x = (((np.arange(columns) * n) // max(columns, 1) - n) / rate).astype(np.float32)
    level_n = max(1, round(LEVEL_SECONDS * rate))
    header = {
        "name": name,
        "columns": len(x),
        "channels": channels,
        "samples_shown": int(data.shape[1]),
        "span": float(data.shape[1] / rate),
        "t_newest": newest,
        "levels": levels(data[:, -level_n:], audio),
    }
    arrays = [x]
    with np.errstate(over="ignore"):  # float64 values past float32's range are drawn as +-inf
        for i in range(len(channels)):
            arrays += [mins[i].astype(np.float32, copy=False), maxs[i].astype(np.float32, copy=False)]
    return StreamEnvelope(header, arrays)


def marker_list(name: str, data: np.ndarray[Any, Any], times: np.ndarray[Any, Any], seconds: float,
                now: float) -> StreamEnvelope:  # fmt: skip
    """A marker stream's part of a display frame: its markers (``data``: ``(1, n)`` ``S<N>``, ``times``
    their stamps) of the last ``seconds`` before ``now``, as ``[time, text]``, oldest first."""
    texts = [raw.decode("utf-8", "replace") for raw in data.reshape(-1).tolist()]
    shown = [[float(t), text] for t, text in zip(times.tolist(), texts, strict=True)
             if math.isfinite(t) and t >= now - seconds]  # fmt: skip
    header = {"name": name, "columns": 0, "channels": [], "samples_shown": len(shown), "span": float(seconds),
              "t_newest": _finite(times[-1]) if len(times) else None, "levels": [], "markers": shown}  # fmt: skip
    return StreamEnvelope(header, [])


def pack_frame(seq: int, parts: list[StreamEnvelope], extra: dict[str, Any] | None = None) -> bytes:
    """One binary websocket message from the streams' envelopes (layout in the module docstring)."""
    offset = 0
    streams = []
    for part in parts:
        streams.append({**part.header, "offset": offset})
        offset += sum(len(a) for a in part.arrays)
    head = json.dumps({"type": "frame", "seq": seq, "streams": streams, **(extra or {})},
                      separators=(",", ":"), allow_nan=False).encode()  # fmt: skip
    head += b" " * (-len(head) % 4)
    payload = [np.ascontiguousarray(a, dtype="<f4").tobytes() for part in parts for a in part.arrays]
    return b"".join([struct.pack("<I", len(head)), head, *payload])


@dataclass
class _Known:
    entry: dict[str, Any]
    ended_at: float | None = None


@dataclass
class StreamList:
    """The broker's streams as the page lists them: live ones, and those that ended, kept ``keep_ended`` seconds.

    The broker forgets a stream once its last subscriber leaves; the view remembers it
    as ended (``gone``: no longer at the broker) so the page can say so.
    """

    keep_ended: float = 600.0
    _known: dict[str, _Known] = field(default_factory=dict)

    def update(self, status: dict[str, Any], now: float) -> list[dict[str, Any]]:
        """Take a ``broker_status`` reply at time ``now``; return every listed stream, sorted by name."""
        present = {s["name"]: s for s in status.get("streams", [])}
        final = {s["name"]: s for s in status.get("ended_streams", [])}  # (as each was when it ended; newest last)
        for name, s in present.items():
            known = self._known.get(name)
            entry = {**s, "gone": False}
            if known is None or (known.ended_at is not None and not s["ended"]):
                self._known[name] = _Known(entry, now if s["ended"] else None)
            else:
                known.entry = entry
                if s["ended"] and known.ended_at is None:
                    known.ended_at = now
        for name, known in list(self._known.items()):
            if name in present:
                continue
            if known.ended_at is None:
                known.ended_at = now
            if not known.entry["gone"]:
                last = final.get(name)  # its counts at its end, not at the last look before it
                counts = {k: last[k] for k in ("samples", "frames", "statistics") if k in last} if last else {}
                known.entry = {**known.entry, **counts, "ended": True, "gone": True, "subscribers": []}
            if now - known.ended_at > self.keep_ended:
                del self._known[name]
        return [self._known[n].entry for n in sorted(self._known)]

    def live(self, name: str) -> bool:
        """Whether ``name`` is at the broker and not ended."""
        known = self._known.get(name)
        return known is not None and not known.entry["ended"]
