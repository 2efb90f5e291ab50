"""What crosses the network between ``slabcast bridge --zenoh`` and a ``zenoh`` source: frame header and stream info.

Both are defined here once, with no Zenoh in sight, so any Zenoh client (C, Rust,
Python without slabcast) can read a bridged stream from this description and
``docs/zenoh.md``.

A frame is one Zenoh ``put`` on ``<prefix>/<stream>``:

- **payload**: the frame's samples, raw, sample-major, in the stream's dtype
  (``n * channels * itemsize`` bytes), nothing else;
- **attachment**: the 40-byte header below, little-endian, then (flag bit 1)
  ``n`` float64 per-sample times.

====== ==== ========= =====================================================
offset size type      field
====== ==== ========= =====================================================
0      1    uint8     format version, 1
1      1    uint8     flags: bit 0 discontinuity, bit 1 per-sample times follow
2      2    uint16    channels
4      4    char[4]   numpy ``dtype.str``, ASCII, NUL-padded (``<f4``, ``|u1``)
8      8    uint64    epoch: changes whenever the bridge (re)subscribes to the stream
16     8    int64     index of the frame's first sample on the origin broker
24     8    float64   t0: time of the first sample (``time.time()`` clock of the origin)
32     4    uint32    n: samples in the frame
36     4    -         reserved, zero
====== ==== ========= =====================================================

The stream info answers a query on ``<prefix>/<stream>/@info`` as UTF-8 JSON
(:func:`encode_info`); ``@info`` is a verbatim chunk, so wildcard subscribers of
``<prefix>/**`` never receive it as a frame.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._info import StreamInfo
from ..wire.protocol import check_dtype

__all__ = ["FLAG_DISCONTINUITY", "FLAG_TIMES", "FORMAT", "HEADER", "FrameHeader", "decode_info", "encode_info"]

FORMAT = 1
FLAG_DISCONTINUITY = 1
FLAG_TIMES = 2
HEADER = struct.Struct("<BBH4sQqdI4x")
assert HEADER.size == 40


@dataclass(frozen=True)
class FrameHeader:
    """The fixed part of a frame's attachment."""

    flags: int
    channels: int
    dtype: np.dtype[Any]
    epoch: int
    index: int
    t0: float
    n: int

    def encode(self, times: np.ndarray[Any, Any] | None = None) -> bytes:
        """The attachment: header, then the per-sample times if given."""
        flags = self.flags | (FLAG_TIMES if times is not None else 0)
        head = HEADER.pack(FORMAT, flags, self.channels, self.dtype.str.encode(), self.epoch, self.index, self.t0,
                           self.n)  # fmt: skip
        if times is None:
            return head
        return head + np.ascontiguousarray(times, dtype="<f8").tobytes()

    @staticmethod
    def decode(attachment: bytes, payload_bytes: int) -> tuple[FrameHeader, np.ndarray[Any, Any] | None]:
        """Read an attachment; check it against the payload's size.

        Raises
        ------
        ValueError
            For another format version, a short attachment, or sizes that disagree.
        """
        if len(attachment) < HEADER.size:
            raise ValueError(f"a slabcast frame header is {HEADER.size} bytes, got {len(attachment)}")
        version, flags, channels, dt, epoch, index, t0, n = HEADER.unpack_from(attachment)
        if version != FORMAT:
            raise ValueError(f"slabcast frame format {FORMAT} expected, got {version}")
        try:
            dtype = check_dtype(dt.rstrip(b"\0").decode("ascii"))
        except (TypeError, UnicodeDecodeError):
            raise ValueError(f"a numeric dtype expected in the frame header, got {dt!r}") from None
        if not 1 <= channels <= 65535 or n < 1 or index < 0:
            raise ValueError(f"a frame of 1..65535 channels, n >= 1 samples at index >= 0 expected, got "
                             f"{channels} channels, n={n}, index={index}")  # fmt: skip
        if payload_bytes != n * channels * dtype.itemsize:
            raise ValueError(f"a frame of {n} x {channels} {dtype} is {n * channels * dtype.itemsize} bytes, "
                             f"the payload has {payload_bytes}")  # fmt: skip
        times = None
        if flags & FLAG_TIMES:
            if len(attachment) != HEADER.size + 8 * n:
                raise ValueError(f"{n} per-sample times expected after the header, got {len(attachment)} bytes")
            times = np.frombuffer(attachment, dtype="<f8", count=n, offset=HEADER.size)
        return FrameHeader(flags & ~FLAG_TIMES, channels, dtype, epoch, index, t0, n), times


def encode_info(info: StreamInfo, epoch: int, host: str) -> bytes:
    """The stream info as JSON, for ``<key>/@info`` queries."""
    return json.dumps({
        "format": FORMAT, "name": info.name, "dtype": info.dtype.str, "channels": info.channels, "rate": info.rate,
        "channel_names": list(info.channel_names), "channel_types": list(info.channel_types),
        "channel_units": list(info.channel_units), "source_id": info.source_id, "timestamps": info.timestamps,
        "epoch": epoch, "host": host,
    }).encode()  # fmt: skip


def decode_info(raw: bytes, name: str) -> tuple[StreamInfo, int]:
    """Read an ``@info`` reply; return the info (renamed ``name``) and the bridge's epoch.

    Raises
    ------
    ValueError
        For a reply that is not a slabcast stream info of a known format.
    """
    try:
        d = json.loads(raw)
        if d.get("format") != FORMAT:
            raise ValueError(f"stream info format {FORMAT} expected, got {d.get('format')!r}")
        channels, rate, names = d["channels"], d["rate"], d["channel_names"]
        if type(channels) is not int or not 1 <= channels <= 65535:
            raise ValueError(f"channels must be 1..65535, got {channels!r}")
        if rate is not None and not (isinstance(rate, int | float) and 0 < rate < float("inf")):
            raise ValueError(f"rate must be a positive number of Hz or null, got {rate!r}")
        if not isinstance(names, list) or len(names) != channels or not all(isinstance(c, str) for c in names):
            raise ValueError(f"channel_names must be {channels} strings, got {names!r}")
        meta = StreamInfo.check_metadata({k: d.get(k) for k in ("channel_types", "channel_units", "source_id",
                                                                 "timestamps")}, channels)  # fmt: skip
        info = StreamInfo(name, check_dtype(d["dtype"]), channels, float(rate) if rate else None, tuple(names),
                          tuple(meta["channel_types"]), tuple(meta["channel_units"]), meta["source_id"],
                          meta["timestamps"])  # fmt: skip
        return info, int(d["epoch"])
    except (KeyError, TypeError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"not a slabcast stream info: {exc!r}") from exc
