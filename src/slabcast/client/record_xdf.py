"""XDF 1.0 (LabRecorder's format): a writer for several streams (numeric and marker) in one file, crash-safe per
chunk, and a reader.

The layout, from the XDF 1.0 specification (github.com/sccn/xdf/wiki/Specifications) and what
pyxdf reads; every number little-endian::

    "XDF:"                magic, 4 bytes, then chunks, each:
    NumLengthBytes        u8: 1, 4 or 8
    Length                that many bytes: the bytes of Tag and Content that follow
    Tag                   u16, then Content:
      1 FileHeader        XML <info><version>1.0</version><datetime/></info>
      2 StreamHeader      u32 stream id; XML: LSL's stream info (name, type, channel_count, nominal_srate,
                          channel_format, source_id, created_at, uid, hostname, desc/channels/channel with
                          label, unit, type; desc/slabcast: the stream's own dtype, timestamps, clock)
      3 Samples           u32 stream id; NumSampleBytes + NumSamples (a varlen int, as Length);
                          per sample: u8 TimeStampBytes (8 here; 0: deduced from the previous one),
                          f64 stamp, then the channels' values; in a string stream (channel_format
                          string: a marker stream) each value is a varlen int byte count, then the
                          UTF-8 bytes (slabcast's NUL padding left out)
      4 ClockOffset       u32 stream id; f64 collection time (on the stream's clock); f64 offset
                          (add it to the stream's stamps to put them on the recorder's clock)
      5 Boundary          the 16-byte UUID 43A546DC-CBF5-410F-B30E-D5467383CBE4 (readers resynchronise on it)
      6 StreamFooter      u32 stream id; XML first_timestamp, last_timestamp, sample_count, clock_offsets

Crash safety: every chunk is made whole in memory and handed to the kernel in one ``write(2)``
on a file opened ``O_APPEND``, so a ``kill -9`` of the recorder leaves every chunk written before
it; :func:`read_xdf` stops at the first chunk the file does not hold whole (pyxdf does too, unless
the cut falls inside a Samples chunk's last sample: a torn write needs a fatal signal in the middle
of the kernel's copy of one chunk).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import socket
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

from .._info import StreamInfo

__all__ = ["CLOCK_OFFSET_INTERVAL", "XdfWriter", "lsl_offset", "read_xdf"]

CLOCK_OFFSET_INTERVAL = 5.0  # seconds between ClockOffset chunks, as LabRecorder
BOUNDARY_INTERVAL = 10.0  # seconds between Boundary chunks
BOUNDARY = bytes.fromhex("43A546DCCBF5410FB30ED5467383CBE4")
FILE_HEADER, STREAM_HEADER, SAMPLES, CLOCK_OFFSET, BOUNDARY_TAG, STREAM_FOOTER = 1, 2, 3, 4, 5, 6

# numpy dtype -> (XDF channel_format, the dtype written): LSL has no unsigned types, so they go out in
# the next wider signed one, losslessly (desc/slabcast/dtype gives the stream's own back).
_FORMATS = {"float32": "float32", "float64": "double64", "int8": "int8", "int16": "int16", "int32": "int32",
            "int64": "int64", "uint8": "int16", "uint16": "int32", "uint32": "int64"}  # fmt: skip
_DTYPES = {"float32": "<f4", "double64": "<f8", "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8"}
_WIDER = {"uint8": "<i2", "uint16": "<i4", "uint32": "<i8"}


def _varlen(n: int) -> bytes:
    if n < 256:
        return bytes((1, n))
    if n < 2**32:
        return b"\x04" + struct.pack("<I", n)
    return b"\x08" + struct.pack("<Q", n)


def _chunk(tag: int, content: bytes) -> bytes:
    return _varlen(len(content) + 2) + struct.pack("<H", tag) + content


def _xml(root: ET.Element) -> bytes:
    return b'<?xml version="1.0"?>' + ET.tostring(root, encoding="unicode").encode()


def _element(parent: ET.Element, tag: str, text: Any = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


def channel_format(info: StreamInfo) -> tuple[str, np.dtype[Any]]:
    """The XDF ``channel_format`` a stream is written in and the little-endian dtype of its values
    (``"string"`` and the stream's own ``S<N>`` for a marker stream).

    Raises
    ------
    ValueError
        For a dtype XDF cannot hold losslessly.
    """
    dt = np.dtype(info.dtype)
    if dt.kind == "S":
        return "string", dt
    fmt = _FORMATS.get(dt.name)
    if fmt is None:
        raise ValueError(f"stream {info.name!r} has dtype {dt}; XDF holds float32, float64, int8, int16, int32, "
                         f"int64 (uint8, uint16, uint32 widened losslessly) and markers (S<N>: strings)")  # fmt: skip
    return fmt, np.dtype(_WIDER.get(dt.name, _DTYPES[fmt]))


def lsl_offset() -> tuple[float, float]:
    """Measure ``(wall time, LSL clock - wall time)`` now (pylsl's ``local_clock``), the bracket's middle.

    Raises
    ------
    ImportError
        Without pylsl (the ``lsl`` extra).
    """
    from pylsl import local_clock

    best: tuple[float, float, float] | None = None
    for _ in range(3):  # the narrowest of three brackets: a preemption between the two reads shows as width
        t1 = time.time()
        lsl = local_clock()
        t2 = time.time()
        if best is None or t2 - t1 < best[0]:
            best = (t2 - t1, (t1 + t2) / 2, lsl)
    assert best is not None
    return best[1], best[2] - best[1]


def _string_samples(data: np.ndarray[Any, Any], times: np.ndarray[Any, Any], channels: int) -> bytes:
    """Samples of a string stream as XDF writes them: per sample 8, the f64 stamp, then per channel a varlen
    byte count and the bytes (``S<N>`` values: numpy leaves the NUL padding out)."""
    parts: list[bytes] = []
    rows = np.asarray(data).reshape(len(data), channels).tolist()
    for row, stamp in zip(rows, np.asarray(times, dtype=np.float64).tolist(), strict=True):
        parts.append(b"\x08" + struct.pack("<d", stamp))
        for raw in row:
            parts += (_varlen(len(raw)), raw)
    return b"".join(parts)


class _Stream:
    def __init__(self, sid: int, info: StreamInfo, fmt: str, dtype: np.dtype[Any]) -> None:
        self.sid, self.info, self.fmt = sid, info, fmt
        # One sample as written: TimeStampBytes, stamp, values (packed, no padding).
        self.record = np.dtype([("flag", "u1"), ("stamp", "<f8"), ("values", dtype, (info.channels,))])
        self.first: float | None = None
        self.last = 0.0
        self.count = 0
        self.offsets: list[tuple[float, float]] = []


class XdfWriter:
    """One XDF 1.0 file, streams added one by one; every chunk goes out whole in one ``write(2)``.

    Parameters
    ----------
    path : str
        A new file (an existing one is refused).
    clock : {"wall", "lsl"}
        The recorder's clock, which the ClockOffset chunks map every stream onto: ``"wall"`` (offsets of 0:
        slabcast's stamps are ``time.time()``) or ``"lsl"`` (``pylsl.local_clock() - time.time()``,
        measured every :data:`CLOCK_OFFSET_INTERVAL` seconds by :meth:`tick`), so pyxdf's clock
        synchronisation puts the samples on LSL's clock, beside other LSL recordings of this host.

    The writer is thread-safe: one recorder thread per stream may write at once.
    """

    def __init__(self, path: str, clock: str = "wall") -> None:
        if clock not in ("wall", "lsl"):
            raise ValueError(f"clock must be 'wall' or 'lsl', got {clock!r}")
        if clock == "lsl":
            lsl_offset()  # fails now, before any file is made, without pylsl
        self.path, self.clock = path, clock
        self._lock = threading.Lock()
        self._streams: list[_Stream] = []
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except FileExistsError:
            raise FileExistsError(f"{path} already exists; choose another --out") from None
        root = ET.Element("info")
        _element(root, "version", "1.0")
        _element(root, "datetime", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _element(root, "writer", "slabcast")
        self._write(b"XDF:" + _chunk(FILE_HEADER, _xml(root)))
        self._last_offset = self._last_boundary = time.monotonic()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a regular file takes it whole; a short write (disk full ...) goes on from where it stopped
            view = view[os.write(self._fd, view) :]

    def add_stream(self, info: StreamInfo) -> int:
        """Write the stream's header (its channels' labels, types and units in ``desc``); return its stream id.

        Raises
        ------
        ValueError
            For a dtype XDF cannot hold (see :func:`channel_format`).
        """
        fmt, dtype = channel_format(info)
        root = ET.Element("info")
        for tag, value in (("name", info.name), ("type", (info.channel_types or ("",))[0]),
                           ("channel_count", info.channels), ("nominal_srate", repr(float(info.rate or 0.0))),
                           ("channel_format", fmt), ("source_id", info.source_id), ("version", "1.1"),
                           ("created_at", repr(time.time())), ("uid", str(uuid.uuid4())),
                           ("session_id", "default"), ("hostname", socket.gethostname())):  # fmt: skip
            _element(root, tag, value)
        desc = _element(root, "desc")
        channels = _element(desc, "channels")
        for k, label in enumerate(info.channel_names):
            ch = _element(channels, "channel")
            _element(ch, "label", label)
            _element(ch, "unit", info.channel_units[k] if info.channel_units else "")
            _element(ch, "type", info.channel_types[k] if info.channel_types else "")
        own = _element(desc, "slabcast")
        _element(own, "dtype", np.dtype(info.dtype).str)
        _element(own, "timestamps", str(info.timestamps).lower())
        _element(own, "clock", self.clock)
        with self._lock:
            sid = len(self._streams) + 1
            stream = _Stream(sid, info, fmt, dtype)
            self._streams.append(stream)
            self._write(_chunk(STREAM_HEADER, struct.pack("<I", sid) + _xml(root)))
            self._offset(stream, *self._measure())  # one before the first sample, as LabRecorder
        return sid

    def write(self, sid: int, data: np.ndarray[Any, Any], times: np.ndarray[Any, Any]) -> None:
        """Write ``data`` (``(n, channels)`` or ``(n,)``) with one stamp per sample as one Samples chunk."""
        stream = self._streams[sid - 1]
        n = len(data)
        if n == 0:
            return
        if stream.fmt == "string":
            content = struct.pack("<I", sid) + _varlen(n) + _string_samples(data, times, stream.info.channels)
        else:
            rows = np.empty(n, dtype=stream.record)
            rows["flag"] = 8
            rows["stamp"] = times
            rows["values"] = data.reshape(n, stream.info.channels)
            content = struct.pack("<I", sid) + _varlen(n) + rows.tobytes()
        with self._lock:
            self._write(_chunk(SAMPLES, content))
            stream.first = float(times[0]) if stream.first is None else stream.first
            stream.last = float(times[-1])
            stream.count += n

    def _measure(self) -> tuple[float, float]:
        return lsl_offset() if self.clock == "lsl" else (time.time(), 0.0)

    def _offset(self, stream: _Stream, at: float, value: float) -> None:
        stream.offsets.append((at, value))
        self._write(_chunk(CLOCK_OFFSET, struct.pack("<Idd", stream.sid, at, value)))

    def tick(self, now: float | None = None) -> None:
        """Write what is due: ClockOffset chunks every 5 s (one per stream), a Boundary chunk every 10 s."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._last_offset >= CLOCK_OFFSET_INTERVAL:
                self._last_offset = now
                at, value = self._measure()
                for stream in self._streams:
                    self._offset(stream, at, value)
            if now - self._last_boundary >= BOUNDARY_INTERVAL:
                self._last_boundary = now
                self._write(_chunk(BOUNDARY_TAG, BOUNDARY))

    def close(self) -> None:
        """Write a last ClockOffset and each stream's footer, and close the file (idempotent)."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                at, value = self._measure()
                for stream in self._streams:
                    self._offset(stream, at, value)
                    root = ET.Element("info")
                    _element(root, "first_timestamp", repr(stream.first if stream.first is not None else 0.0))
                    _element(root, "last_timestamp", repr(stream.last))
                    _element(root, "sample_count", stream.count)
                    offsets = _element(root, "clock_offsets")
                    for when, value in stream.offsets:
                        o = _element(offsets, "offset")
                        _element(o, "time", repr(when))
                        _element(o, "value", repr(value))
                    self._write(_chunk(STREAM_FOOTER, struct.pack("<I", stream.sid) + _xml(root)))
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> XdfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading ------------------------------------------------------------------------------------------------


def _chunks(buf: Any) -> Any:
    """``(tag, start, end)`` of each whole chunk's content (after its tag); stops at the first cut one."""
    pos, size = 4, len(buf)
    while pos < size:
        nbytes = buf[pos]
        if nbytes not in (1, 4, 8) or pos + 1 + nbytes > size:
            return
        length = int.from_bytes(buf[pos + 1 : pos + 1 + nbytes], "little")
        start = pos + 1 + nbytes
        end = start + length
        if length < 2 or end > size:
            return
        yield int.from_bytes(buf[start : start + 2], "little"), start + 2, end
        pos = end


def _read_varlen(buf: Any, pos: int) -> tuple[int, int]:
    nbytes = buf[pos]
    if nbytes not in (1, 4, 8):
        raise ValueError(f"a variable-length integer of {nbytes} bytes (1, 4 or 8 expected) at byte {pos}")
    return int.from_bytes(buf[pos + 1 : pos + 1 + nbytes], "little"), pos + 1 + nbytes


class _Reading:
    def __init__(self, header: ET.Element, path: str) -> None:
        def text(tag: str, default: str = "") -> str:
            el = header.find(tag)
            return el.text or default if el is not None else default

        fmt = text("channel_format")
        if fmt not in _DTYPES and fmt != "string":
            raise ValueError(f"{path}: stream {text('name')!r} has channel_format {fmt!r}; XDF streams are "
                             f"{', '.join(_DTYPES)} or string")  # fmt: skip
        self.strings = fmt == "string"  # a marker stream: S<N> samples, N the longest (at least what slabcast wrote)
        n = int(text("channel_count", "0"))
        labels: list[str] = []
        types: list[str] = []
        units: list[str] = []
        for ch in header.findall("desc/channels/channel"):
            labels.append(ch.findtext("label") or f"ch_{len(labels)}")
            types.append(ch.findtext("type") or "")
            units.append(ch.findtext("unit") or "")
        labels = (labels + [f"ch_{i}" for i in range(len(labels), n)])[:n]
        own = header.find("desc/slabcast")
        wire = "S1" if self.strings else _DTYPES[fmt]
        dtype = np.dtype(own.findtext("dtype") if own is not None and own.findtext("dtype") else wire)
        if self.strings and dtype.kind != "S":
            dtype = np.dtype(wire)
        rate = float(text("nominal_srate", "0") or 0)
        self.wire = np.dtype(wire)
        self.info = StreamInfo(text("name"), dtype, n, rate or None, tuple(labels),
                               tuple(types[:n]) if any(types) else (), tuple(units[:n]) if any(units) else (),
                               text("source_id"),
                               self.strings or (own is not None and own.findtext("timestamps") == "true"))  # fmt: skip
        self.record = np.dtype([("flag", "u1"), ("stamp", "<f8"), ("values", self.wire, (n,))])
        self.values: list[np.ndarray[Any, Any]] = []
        self.stamps: list[np.ndarray[Any, Any]] = []
        self.last, self.tdiff = 0.0, 1.0 / rate if rate else 0.0
        self.offsets: list[tuple[float, float]] = []

    def samples(self, buf: Any, pos: int, end: int) -> None:
        n, pos = _read_varlen(buf, pos)
        if self.strings:
            self._strings(buf, pos, end, n)
            return
        record = self.record
        if end - pos == n * record.itemsize:  # every sample with its stamp (what slabcast and LabRecorder write)
            rows = np.frombuffer(buf, dtype=record, count=n, offset=pos)
            if n and bool((rows["flag"] == 8).all()):
                self.values.append(rows["values"].copy())
                self.stamps.append(rows["stamp"].copy())
                self.last = float(rows["stamp"][-1])
                return
        values = np.empty((n, self.info.channels), dtype=self.wire)
        stamps = np.empty(n)
        width = self.wire.itemsize * self.info.channels
        for k in range(n):  # stamps deduced for some samples: one by one
            pos = self._stamp(buf, pos)
            stamps[k] = self.last
            values[k] = np.frombuffer(buf, dtype=self.wire, count=self.info.channels, offset=pos)
            pos += width
        if pos > end:
            raise ValueError("a Samples chunk longer than its length")
        self.values.append(values)
        self.stamps.append(stamps)

    def _stamp(self, buf: Any, pos: int) -> int:
        """A sample's stamp at ``pos`` (8 bytes given, or none: the last plus the nominal interval), into
        ``self.last``; return where its values start."""
        if buf[pos] == 8:
            self.last = struct.unpack_from("<d", buf, pos + 1)[0]
            return pos + 9
        self.last += self.tdiff
        return pos + 1

    def _strings(self, buf: Any, pos: int, end: int, n: int) -> None:
        """A string stream's samples, one by one: stamp, then per channel a varlen byte count and the bytes."""
        rows: list[list[bytes]] = []
        stamps = np.empty(n)
        for k in range(n):
            pos = self._stamp(buf, pos)
            stamps[k] = self.last
            row = []
            for _ in range(self.info.channels):
                length, pos = _read_varlen(buf, pos)
                row.append(bytes(buf[pos : pos + length]))
                pos += length
            rows.append(row)
        if pos > end:
            raise ValueError("a Samples chunk longer than its length")
        self.values.append(np.array(rows, dtype=bytes).reshape(n, self.info.channels) if n else
                           np.zeros((0, self.info.channels), dtype=self.wire))  # fmt: skip
        self.stamps.append(stamps)


def read_xdf(path: str) -> dict[str, Any]:
    """Read every stream of an XDF file: ``{name: Recording}`` in the order of the file.

    Each :class:`~slabcast.client.record.Recording` has the stream's info (channel labels, types and
    units from ``desc``, the dtype slabcast recorded), its samples, one frame per Samples chunk, and
    ``times``: the per-sample stamps as written (not clock-synchronised; ``clock_offsets`` beside them).
    A string (marker) stream's samples are ``S<N>`` bytes, UTF-8 (``decode_markers`` makes them
    strings), ``N`` the stream's own width or the longest string if that is longer.
    A file cut short (a recorder killed) reads up to its last whole chunk.

    Raises
    ------
    ValueError
        Not an XDF file, or a stream of a channel format XDF does not define.
    """
    from .record import FRAME_RECORD, Recording

    with open(path, "rb") as f:
        if f.read(4) != b"XDF:":
            raise ValueError(f"{path} is not an XDF file (no 'XDF:' magic)")
        size = os.fstat(f.fileno()).st_size
        buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 4 else b"XDF:"
    streams: dict[int, _Reading] = {}
    try:
        for tag, start, end in _chunks(buf):
            if tag not in (STREAM_HEADER, SAMPLES, CLOCK_OFFSET):
                continue
            sid = struct.unpack_from("<I", buf, start)[0]
            if tag == STREAM_HEADER:
                streams[sid] = _Reading(ET.fromstring(bytes(buf[start + 4 : end])), path)
            elif sid in streams and tag == SAMPLES:
                streams[sid].samples(buf, start + 4, end)
            elif sid in streams:
                streams[sid].offsets.append(struct.unpack_from("<dd", buf, start + 4))
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()
    out: dict[str, Any] = {}
    for s in streams.values():
        info = s.info
        values = np.concatenate(s.values) if s.values else np.zeros((0, info.channels), s.wire)
        if s.strings and values.dtype.itemsize > info.dtype.itemsize:  # a string longer than the header said
            info = dataclasses.replace(info, dtype=values.dtype)
        times = np.concatenate(s.stamps) if s.stamps else np.zeros(0)
        frames = np.zeros(len(s.values), dtype=FRAME_RECORD)
        counts = np.array([len(v) for v in s.values], dtype=np.uint64)
        frames["n"] = counts
        frames["index"] = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
        frames["t0"] = [st[0] for st in s.stamps]
        recording = Recording(info, values.astype(info.dtype, copy=False), frames, times)
        recording.clock_offsets = np.array(s.offsets, dtype=[("time", "<f8"), ("value", "<f8")])
        name = info.name
        while name in out:  # two streams of one name (LabRecorder allows it): the second gets a suffix
            name += "'"
        out[name] = recording
    return out
