"""Recordings: a stream written losslessly to a standard file or an append-only directory, read back for replay.

``slabcast record STREAM --out PATH`` picks the format from ``PATH`` (docs/recording.md says it all):

- ``*.wav``, ``*.flac`` (and what libsndfile writes: ``*.aiff``, ``*.ogg``): audio
  through ``soundfile``; beside it ``PATH.json`` (the stream info) and ``PATH.frames``
  (one 24-byte record per frame: first sample index, samples, ``t0``), so replay is
  bit-exact and keeps every timestamp. A ``.wav`` is libsndfile's RF64 with
  auto-downgrade: a plain WAV under 4 GiB, RF64 past it, so any length reads back;
- ``*.zarr``: a Zarr v3 group, for multichannel signals of any dtype: arrays
  ``samples`` ``(sample, channel)``, ``channel`` (the names) and ``frames/index``, ``frames/n``,
  ``frames/t0`` ``(frame,)``, the stream info in the group's attributes (``slabcast``); several
  streams: one such group per stream (``record_zarr.py``);
- ``*.xdf``: XDF 1.0 as LabRecorder writes it, any number of numeric and marker streams in one file,
  every sample with its stamp, ClockOffset chunks every 5 s (``record_xdf.py``);
- anything else: the directory format below.

``.xdf`` and ``.zarr`` take several streams (``slabcast record --out s.xdf A B``), each on its own
subscriber and thread (``record_session.py``); the other formats take one stream per recorder.

What a ``kill -9`` of the recorder leaves: a directory, a Zarr group and a WAV hold
everything up to the last flush (every 0.5 s; a WAV's header is rewritten at each,
so any tool reads it); a FLAC holds every block its encoder wrote out (all but the
last up to 4096 samples) but says its length only once closed: :func:`open_recording`
reads it as it is, :func:`repair` (``slabcast record --repair FILE``) makes it whole
for any tool. An XDF holds every chunk written (one ``write(2)`` per chunk, as it arrives).
A hole in the stream (an eviction) ends the recording before the hole.

Layout of a recording directory (format "slabcast-recording", version 1)::

    info.json     name, dtype (numpy string, byte order included), channels, rate,
                  channel_names, created, format, version
    samples.bin   every sample, sample-major, in the stream's dtype: np.fromfile/np.memmap read it
    frames.bin    one 24-byte record per frame: u64 first sample index, u64 samples, f64 t0
                  (little-endian), so the frames and their timestamps replay exactly

Why not HDF5 or Zarr: this needs no dependency, both files only ever grow
(``O_APPEND``), so a crash loses at most the frame being written, any language
reads it with a memory map, and a sample index is a byte offset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._exceptions import SlabcastError, StreamNotFoundError
from .._info import StreamInfo
from ..core.rechunk import is_real

__all__ = ["Recording", "RecordingHoleError", "open_recording", "record", "recording_streams", "repair", "write_info"]

log = logging.getLogger("slabcast.record")

_FLUSH = 0.5  # seconds between flushes: what a kill -9 can lose at most
_AUDIO = (".wav", ".flac", ".aiff", ".aif", ".ogg")

FORMAT = "slabcast-recording"
FRAME_RECORD = np.dtype([("index", "<u8"), ("n", "<u8"), ("t0", "<f8")])


def write_info(path: str, info: StreamInfo) -> None:
    """Create the recording directory and its ``info.json`` (the directory must not hold a recording)."""
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, "info.json")):
        raise FileExistsError(f"{path} already holds a recording; choose another --out")
    meta = {
        "format": FORMAT,
        "version": 1,
        "name": info.name,
        "dtype": info.dtype.str,
        "channels": info.channels,
        "rate": info.rate,
        "channel_names": list(info.channel_names),
        "created": time.time(),
        **info.metadata(),
    }
    with open(os.path.join(path, "info.json"), "w") as f:
        json.dump(meta, f, indent=2)


@dataclass
class Recording:
    """A recording read back (see :func:`open_recording`): its stream info, every sample, and its frames.

    Attributes
    ----------
    info : StreamInfo
        Name, dtype, channels, rate (Hz) and channel names of the recorded stream.
    samples : array-like
        ``(n, channels)`` samples in the stream's dtype, read on demand (a memory
        map, a Zarr array, or an audio file read through soundfile).
    frames : numpy.ndarray
        One record per frame as written: ``index`` (first sample), ``n``,
        ``t0`` (seconds, the publisher's clock, ``time.time()`` for hosted sources).
    times : array-like or None
        ``(n,)`` seconds per sample, when the stream kept them (``info.timestamps``; always for XDF).
    clock_offsets : numpy.ndarray or None
        XDF only: the ClockOffset chunks, ``time`` (on the stream's clock) and ``value`` (add it to
        ``times`` to put them on the recorder's clock), as pyxdf gives ``clock_times``/``clock_values``.
    """

    info: StreamInfo
    samples: np.ndarray[Any, Any]  # (n, channels), memory-mapped
    frames: np.ndarray[Any, Any]  # FRAME_RECORD per frame
    times: Any = None  # (n,) float64 per sample, for a stream with per-sample timestamps
    clock_offsets: Any = None  # XDF: ClockOffset chunks (time, value)

    def __repr__(self) -> str:
        # (the arrays' own repr printed every frame: hundreds of lines for a few seconds)
        shape = getattr(self.samples, "shape", None)
        extra = "" if self.times is None else ", times"
        extra += "" if self.clock_offsets is None else f", {len(self.clock_offsets)} clock offsets"
        return (f"Recording({self.info.name!r}, {self.info.dtype} x {self.info.channels}, rate={self.info.rate}, "
                f"samples {shape}, {len(self.frames)} frames{extra})")  # fmt: skip

    @classmethod
    def open(cls, path: str) -> Recording:
        """Read a recording directory.

        Raises
        ------
        ValueError
            If it is not a slabcast recording, or its files disagree.
        """
        try:
            with open(os.path.join(path, "info.json")) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path} is not a slabcast recording (no info.json)") from None
        if meta.get("format") != FORMAT or meta.get("version") != 1:
            raise ValueError(
                f"{path}: expected format {FORMAT} version 1, got {meta.get('format')} {meta.get('version')}"
            )
        dtype = np.dtype(meta["dtype"])
        info = _info_from(meta, path)
        frames = np.fromfile(os.path.join(path, "frames.bin"), dtype=FRAME_RECORD)
        total = int(frames["n"].sum()) if len(frames) else 0
        sample_path = os.path.join(path, "samples.bin")
        if os.path.getsize(sample_path) < total * dtype.itemsize * info.channels:
            raise ValueError(f"{path}: samples.bin is shorter than frames.bin says ({total} samples)")
        samples: np.ndarray[Any, Any] = np.zeros((0, info.channels), dtype=dtype)
        if total:
            samples = np.memmap(sample_path, dtype=dtype, mode="r", shape=(total, info.channels))
        return cls(info, samples, frames, _times_file(os.path.join(path, "times.bin"), total))

    def sample_times(self) -> np.ndarray[Any, Any]:
        """``(n,)`` float64 seconds, one per sample: :attr:`times` when the stream kept them, else each frame's
        ``t0`` plus ``k / rate`` for its ``k``-th sample (a stream without a rate: its frame's ``t0`` for every
        sample).  On the clock of ``frames["t0"]`` (``time.time()`` for hosted sources; XDF: the stream's
        own, before ``clock_offsets``).  A time axis for plotting or aligning two recordings, whatever the
        format (an audio file without its ``.frames`` sidecar: one frame per second from its start)."""
        if self.times is not None:
            return np.asarray(self.times, dtype=np.float64)
        n = self.frames["n"].astype(np.int64)
        total = int(n.sum())
        base = np.repeat(self.frames["t0"].astype(np.float64), n)
        if not self.info.rate:
            return base
        first = np.repeat(np.cumsum(n) - n, n)  # the row of each sample's frame's first sample
        times: np.ndarray[Any, Any] = base + (np.arange(total) - first) / self.info.rate
        return times

    @property
    def duration(self) -> float:
        """Seconds of stream time (samples / rate, or the span of frame times without a rate)."""
        if self.info.rate:
            return len(self.samples) / self.info.rate
        return float(self.frames["t0"][-1] - self.frames["t0"][0]) if len(self.frames) else 0.0


def open_recording(path: str, stream: str | None = None) -> Recording:
    """Open a recording of any format slabcast writes (an audio file, a Zarr group, an XDF file, a directory).

    Returns a :class:`Recording`: ``info`` (a :class:`~slabcast.StreamInfo`),
    ``samples`` (an array-like of ``(n, channels)`` samples, read on demand),
    ``frames`` (per frame: first sample ``index``, ``n``, ``t0``; for an audio file
    without its ``.frames`` sidecar, one frame per second of the file; for XDF, one per
    Samples chunk). ``stream`` names one stream of an XDF file or a Zarr session (needed
    when it holds several; :func:`recording_streams` lists them).

    Raises
    ------
    ValueError
        If ``path`` is none of them, or holds several streams and ``stream`` names none of them.
    """
    path = os.fspath(path)
    low = path.rstrip("/").lower()
    if low.endswith(".xdf"):
        from .record_xdf import read_xdf

        streams = read_xdf(path)
        if stream is None and len(streams) == 1:
            stream = next(iter(streams))
        if stream not in streams:
            names = ", ".join(map(repr, streams)) or "none"
            raise ValueError(f"{path} holds the streams {names}; "
                             + ("name one (stream=...)" if stream is None else f"not {stream!r}"))  # fmt: skip
        return streams[stream]  # type: ignore[no-any-return]
    if low.endswith(".zarr"):
        from .record_zarr import open_zarr

        return open_zarr(path, stream)
    if stream is not None:
        raise ValueError(f"stream= names a stream of an .xdf file or a .zarr session; {path} holds one stream")
    if low.endswith(_AUDIO):
        from .record_audio import _open_audio

        return _open_audio(path)
    return Recording.open(path)


def recording_streams(path: str) -> list[str]:
    """The names of the streams a recording holds (several for an XDF file or a Zarr session)."""
    path = os.fspath(path)
    low = path.rstrip("/").lower()
    if low.endswith(".xdf"):
        from .record_xdf import read_xdf

        return list(read_xdf(path))
    if low.endswith(".zarr"):
        from .record_zarr import zarr_streams

        names = zarr_streams(path)
        if names:
            return names
    return [open_recording(path).info.name]


def _meta(info: StreamInfo) -> dict[str, Any]:
    return {"format": FORMAT, "version": 1, "name": info.name, "dtype": info.dtype.str, "channels": info.channels,
            "rate": info.rate, "channel_names": list(info.channel_names), "created": time.time(),
            **info.metadata()}  # fmt: skip


def _times_file(path: str, n: int) -> np.ndarray[Any, Any] | None:
    """A per-sample time sidecar (f64 each), as long as the samples, or None."""
    if not os.path.exists(path):
        return None
    times = np.fromfile(path, dtype="<f8")
    return times[:n] if len(times) >= n else None


def _info_from(meta: dict[str, Any], path: str) -> StreamInfo:
    try:
        return StreamInfo(meta["name"], np.dtype(meta["dtype"]), int(meta["channels"]), meta["rate"],
                          tuple(meta["channel_names"]), tuple(meta.get("channel_types") or ()),
                          tuple(meta.get("channel_units") or ()), meta.get("source_id") or "",
                          bool(meta.get("timestamps")))  # fmt: skip
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: the stream info is incomplete ({exc})") from None


class _LazySamples:
    """``(n, channels)`` samples of a recording, read on demand: ``len``, ``shape``, slicing, ``np.asarray``."""

    def __init__(self, n: int, channels: int) -> None:
        self.n, self.channels = n, channels

    def _read(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.channels)

    def __getitem__(self, key: Any) -> np.ndarray[Any, Any]:
        if not isinstance(key, slice):
            return self[:][key]  # type: ignore[no-any-return]
        start, stop, step = key.indices(self.n)
        return self._read(start, max(start, stop))[::step]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        data = self[:]
        return data if dtype is None else data.astype(dtype)


class _ZarrSamples(_LazySamples):  # (record_zarr.open_zarr makes them)
    """The samples of a Zarr recording (``len`` works, unlike zarr's own arrays)."""

    def __init__(self, array: Any, n: int) -> None:
        super().__init__(n, int(array.shape[1]))
        self.array = array

    def _read(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        return np.asarray(self.array[start:stop])


class _Writer:
    """Where a recording goes: ``write`` frames, ``flush`` now and then, ``close`` at the end."""

    times: Any = None  # where per-sample times go (a file or a Zarr array), for streams that have them

    def write(self, data: np.ndarray[Any, Any], index: int, t0: float) -> None:
        raise NotImplementedError

    def write_times(self, times: np.ndarray[Any, Any]) -> None:
        """Per-sample times of the frame just written (only for streams with ``timestamps``)."""
        self.times.write(np.ascontiguousarray(times, dtype="<f8").tobytes())

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """Remove what a recording refused before its first sample left, once closed (what an empty one of
        this kind is good for: kept by default)."""


class _DirWriter(_Writer):
    def __init__(self, path: str, info: StreamInfo) -> None:
        write_info(path, info)
        self.samples = open(os.path.join(path, "samples.bin"), "ab")  # noqa: SIM115 (closed in close)
        self.frames = open(os.path.join(path, "frames.bin"), "ab")  # noqa: SIM115
        if info.timestamps:
            self.times = open(os.path.join(path, "times.bin"), "ab")  # noqa: SIM115

    def write(self, data: np.ndarray[Any, Any], index: int, t0: float) -> None:
        self.samples.write(np.ascontiguousarray(data).tobytes())
        self.frames.write(np.array([(index, len(data), t0)], dtype=FRAME_RECORD).tobytes())

    def flush(self) -> None:
        self.samples.flush()
        self.frames.flush()
        if self.times is not None:
            self.times.flush()

    def close(self) -> None:
        self.samples.close()
        self.frames.close()
        if self.times is not None:
            self.times.close()


def _others(stream: str, out: str, address: str | None) -> str | None:
    """What the broker has now, when it does not have ``stream`` (a typo waits for nothing); when it has it,
    refuse an audio ``out`` that cannot hold its samples before subscribing (a source that waits for its
    first subscriber would start for nothing).  None when no broker answered (the subscription says why: the
    recorder says nothing before it)."""
    streams = _live_streams(address)
    if streams is None:  # no broker yet, or busy: the subscription says what it must
        return None
    names = [s["name"] for s in streams]
    if stream in names:
        if out.rstrip("/").lower().endswith(_AUDIO):
            from .record_audio import _audio_format, _audio_subtype

            s = streams[names.index(stream)]
            _audio_subtype(_audio_format(out), np.dtype(s["dtype"]), s["rate"])
        if out.rstrip("/").lower().endswith(".xdf"):
            from .record_xdf import channel_format

            s = streams[names.index(stream)]
            channel_format(StreamInfo(stream, np.dtype(s["dtype"]), 1, None, ("ch_0",)))
        return ""
    return f" (the broker has {_listed(names)} now{_close(stream, names)}; Ctrl-C to give up)"


def _live_streams(address: str | None) -> list[dict[str, Any]] | None:
    """The streams the broker has now and that have not ended (its status), or None if it does not answer."""
    from .control import broker_status

    try:
        return [s for s in broker_status(address, timeout=2.0)["streams"] if not s["ended"]]
    except Exception:
        return None


def _listed(names: Sequence[str]) -> str:
    return ", ".join(map(repr, names)) or "no streams"


def _close(stream: str, names: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the name in ``names`` closest to ``stream``, or nothing."""
    import difflib

    close = difflib.get_close_matches(stream, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def absent_hint(stream: str, address: str | None) -> str | None:
    """For a command about to wait for ``stream``: ``"the broker has 'a', 'b' now; did you mean 'a'?"`` when the
    broker answers without it, None when it has it live or does not answer (the subscription then says why)."""
    streams = _live_streams(address)
    if streams is None:
        return None
    names = [s["name"] for s in streams]
    return None if stream in names else f"the broker has {_listed(names)} now{_close(stream, names)}"


def _missing(streams: Sequence[str], address: str | None) -> str:
    """Why a recording of ``streams`` that never appeared is not a success, with what the broker has now."""
    names = [s["name"] for s in _live_streams(address) or ()]
    hints = "".join(_close(s, names) for s in streams)
    return f"{', '.join(map(repr, streams))} never appeared on the broker (it has {_listed(names)} now{hints})"


def _check_out(out: str) -> None:
    """Refuse an --out that cannot be written, before waiting for the stream."""
    low = out.rstrip("/").lower()
    ext = os.path.splitext(low)[1]
    if ext and ext not in (*_AUDIO, ".zarr", ".xdf"):
        raise ValueError(f"unknown recording format {ext!r} in {out!r}: use .wav, .flac, .aiff, .ogg (soundfile), "
                         f".zarr (Zarr v3), .xdf (XDF 1.0), or a directory name without an extension")  # fmt: skip
    if os.path.exists(os.path.join(out, "info.json")):
        raise FileExistsError(f"{out} already holds a recording; choose another --out")
    if ext and os.path.exists(out):
        raise FileExistsError(f"{out} already exists; choose another --out")
    for side in (".json", ".frames") if ext in _AUDIO else ():  # (an audio file's sidecars: record_audio.py)
        if os.path.exists(out + side):
            raise FileExistsError(f"{out + side} already exists (left by an earlier recording to {out}); choose "
                                  f"another --out or remove it")  # fmt: skip


def _writer(out: str, info: StreamInfo) -> _Writer:
    low = out.rstrip("/").lower()
    if low.endswith(".zarr"):
        from .record_zarr import ZarrWriter, create_root

        return ZarrWriter(create_root(out), info, _meta(info))
    if low.endswith(_AUDIO):
        from .record_audio import _AudioWriter

        return _AudioWriter(out, info)
    return _DirWriter(out, info)


class RecordingHoleError(SlabcastError):
    """The stream skipped samples under the recorder (evicted, notices lost) or jumped (a chunk flagged
    ``discontinuity``: a restarted or reconnected source, a ``file`` source looping, samples lost upstream of
    the publisher): the recording ends there, so samples that do not follow the ones before it are never
    written as if they did."""

    def __init__(self, stream: str, out: str, expected: int, came: int, written: int) -> None:
        if came > expected:
            what = (f"a hole in the stream: samples {expected} to {came - 1} missing (the next chunk starts at "
                    f"{came}, {expected} was due)")  # fmt: skip
        elif came < expected:
            what = f"a hole in the stream: the index went back to {came} ({expected} was due)"
        else:
            what = (f"a discontinuity at index {came}: the publisher flagged a jump there (a source restarted, "
                    f"reconnected or looping, or samples lost before it), and a recording holds one contiguous "
                    f"run")  # fmt: skip
        super().__init__(f"recording of {stream!r} ended at {what}; {out} holds the {written} samples before it")
        self.expected, self.came, self.written = expected, came, written


class _Progress:
    """The progress line on stderr; it never stops a recording: once stderr is gone (``2>&1 | head -1``,
    a closed terminal) it stops printing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        try:
            self.tty = sys.stderr.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.last = 0.0
        self.open = False  # a line is on the terminal, not ended yet

    def say(self, text: str, end: str = "") -> None:
        if not self.enabled:
            return
        if not text.strip("\r") and end == "\n" and not self.open:
            return  # (ending a line nobody began: a blank line before an error)
        if not self.tty:
            # A log file or a pipe: no carriage returns, and a running line at most every 10 s.
            final = end == "\n"
            text = text.lstrip("\r").rstrip()
            now = time.monotonic()
            if not final and now - self.last < 10.0:
                return
            self.last = now
            end = "\n"
        try:
            print(text, end=end, file=sys.stderr, flush=True)
            self.open = end != "\n"
        except (OSError, ValueError):  # EPIPE (Python ignores SIGPIPE), EIO, a closed sys.stderr
            self.enabled = False
            with contextlib.suppress(OSError, ValueError):  # what Python would flush at exit goes nowhere, quietly
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


class _LeadIn:
    """The history a recorder's subscription asks for: ``pre_buffer`` seconds before ``asked_at``
    (``time.monotonic()``), so the time spent starting and waiting for a stream is not lost from it."""

    def __init__(self, pre_buffer: float | None, asked_at: float) -> None:
        self.pre_buffer, self.asked_at = pre_buffer, asked_at

    def __call__(self) -> float | None:
        if self.pre_buffer is None:
            return None
        return self.pre_buffer + max(0.0, time.monotonic() - self.asked_at)

    def short(self, stream: str, t0: float) -> str:
        """What to say when the pool held less than asked (the first chunk is flagged: protocol 8, history), with
        how much it held when ``t0`` (the first sample's time) is on the wall clock, as hosted sources' are."""
        asked = self.pre_buffer or 0.0
        held = time.time() - (time.monotonic() - self.asked_at) - t0
        about = f" (about {held:.1f} s)" if 0 <= held < asked else ""
        return (f"recording {stream}: the pool held less than the {asked:g} s of --pre-buffer{about}: the recording "
                f"starts at its oldest sample (a source's or Publisher's history = S sizes the pool to hold S s)")


def record(stream: str | Sequence[str], out: str, seconds: float | None = None, address: str | None = None,
           progress: bool = True, clock: str = "auto", pre_buffer: float | None = None,
           asked_at: float | None = None) -> int:  # fmt: skip
    """Record ``stream`` (or several, into an ``.xdf`` or ``.zarr``) into ``out`` until it ends, ``seconds``
    of it are written, or Ctrl-C.

    A ``policy="block"`` subscriber per stream, taking whole frames, so nothing is lost or cut.
    Returns the number of samples written (of every stream).

    ``clock`` (XDF only): the clock the ClockOffset chunks map the streams onto: ``"wall"``
    (offsets 0), ``"lsl"`` (LSL's ``local_clock``, measured every 5 s; needs pylsl), or
    ``"auto"``: ``"lsl"`` when a recorded stream comes from a hosted ``lsl`` source and pylsl
    is installed, else ``"wall"``.

    ``pre_buffer`` (seconds, 0 or None for none; a stream without a rate, a marker stream say, by its
    samples' times): start that far before the recording was asked for, ``asked_at`` (a
    ``time.monotonic()`` value; default the call; `slabcast record` gives its process's start, so the
    interpreter's start-up costs no lead-in), from what the stream's pool still holds
    (``Subscriber(history=)``, asked for that much more as each stream is subscribed; counted back from
    the newest sample the pool holds: a stream that stopped goes back from where it stopped);
    ``seconds`` counts it too.  A recording whose pool held less starts at its oldest sample.

    Raises
    ------
    RecordingHoleError
        The stream skipped samples under the recorder (for instance it was evicted after being
        stopped past the broker's ``lease_timeout``): the file ends before the hole.
    EvictedError, BrokerGoneError
        The recording ended early; what was written before stays readable.
    """
    from .._exceptions import EndOfStream
    from ..client.subscriber import Subscriber

    streams = [stream] if isinstance(stream, str) else list(stream)
    if pre_buffer is not None and not (is_real(pre_buffer) and 0 <= pre_buffer < math.inf):
        raise ValueError(f"pre_buffer (--pre-buffer) must be a finite number of seconds >= 0 (0: none), "
                         f"got {pre_buffer!r}")  # fmt: skip
    if seconds is not None and not (is_real(seconds) and 0 < seconds < math.inf):
        # (0 wrote an empty file and exited 0; nan or inf, a recording of no or of endless length)
        raise ValueError(f"seconds (--seconds) must be a finite number of seconds > 0 (or none: until the stream "
                         f"ends), got {seconds!r}")  # fmt: skip
    if pre_buffer == 0:
        pre_buffer = None  # (no lead-in, as without it)
    lead_in = _LeadIn(pre_buffer, time.monotonic() if asked_at is None else asked_at)
    if not streams or not all(isinstance(s, str) and s for s in streams):
        raise ValueError(f"expected one or more stream names, got {stream!r}")
    if len(set(streams)) != len(streams):
        raise ValueError(f"a stream named twice: {streams}")
    low = out.rstrip("/").lower()
    if low.endswith(".xdf") or (low.endswith(".zarr") and len(streams) > 1):
        from .record_session import _record_session

        return _record_session(streams, out, seconds, address, progress, clock, lead_in)
    if len(streams) > 1:
        raise ValueError(f"{out!r} takes one stream; record several streams into one .xdf or .zarr "
                         f"(or run one recorder per stream)")  # fmt: skip
    stream = streams[0]
    _check_out(out)
    say = _Progress(progress)
    others = _others(stream, out, address)  # before anything is printed: it may refuse the format
    # (others is empty when the broker has the stream live, None when it did not answer: the subscription then
    # says why, or the first progress line that it is recording)
    try:
        # (The line inside: a Ctrl-C just after it, which the line invites, is the wait given up, not exit 130.)
        if others is not None:
            say.say(f"recording {stream}: waiting for the stream{others}" if others else f"recording {stream}")
        sub = Subscriber(stream, 1, policy="block", address=address, wait=3600.0, label=f"record:{stream}",
                         history=lead_in())  # fmt: skip
    except KeyboardInterrupt:
        if not others:
            raise
        # Given up while waiting for a stream that never came (a typo?): not a success, said as such.
        say.say("", end="\n")
        raise StreamNotFoundError(f"{_missing([stream], address)}: nothing was recorded") from None
    written = 0
    writer: _Writer | None = None
    try:
        writer = _writer(out, sub.info)
        rate = sub.info.rate
        limit = None if seconds is None else (max(1, round(seconds * rate)) if rate else None)  # (as chunks: >= 1)
        # Without a rate (markers, which may stay silent): --seconds of stamps, or of wall time, whichever first.
        deadline = None if rate or seconds is None else time.monotonic() + seconds
        t_first: float | None = None
        expected: int | None = None  # the index the next chunk must start at
        last_report = last_flush = time.monotonic()
        try:
            while limit is None or written < limit:
                try:
                    chunk = sub.recv(timeout=_FLUSH)
                except TimeoutError:
                    writer.flush()
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    continue
                with chunk:
                    if expected is not None and (chunk.index != expected or chunk.discontinuity):
                        raise RecordingHoleError(stream, out, expected, chunk.index, written)
                    n = len(chunk.data) if limit is None else min(len(chunk.data), limit - written)
                    writer.write(chunk.data[:n], chunk.index, chunk.t0)
                    if writer.times is not None:
                        writer.write_times(chunk.times[:n])
                    expected = chunk.index + len(chunk.data)
                written += n
                if t_first is None and lead_in.pre_buffer is not None and chunk.discontinuity:
                    if say.enabled:  # (a line of its own, whatever the progress line does)
                        say.say("", end="\n")
                        say.say(lead_in.short(stream, chunk.t0), end="\n")
                    else:
                        log.warning("%s", lead_in.short(stream, chunk.t0))
                t_first = chunk.t0 if t_first is None else t_first
                if not rate and seconds is not None and chunk.t0 - t_first >= seconds:
                    break
                now = time.monotonic()
                if now - last_flush >= _FLUSH:
                    last_flush = now
                    writer.flush()
                if now - last_report >= 0.5:
                    last_report = now
                    secs = written / rate if rate else chunk.t0 - t_first
                    mb = written * sub.info.dtype.itemsize * sub.info.channels / 1e6
                    say.say(f"\rrecording {stream}: {secs:8.1f} s, {written} samples, {mb:.1f} MB ")
        except (EndOfStream, KeyboardInterrupt):
            pass
    except BaseException:
        say.say("", end="\n")  # end the progress line before the error is told
        if writer is not None and written == 0:
            writer.close()
            writer.discard()  # (refused at its first chunk: nothing to keep, no unreadable file left)
            writer = None
        elif writer is not None:  # (what the file holds, whatever ended it: the error follows)
            say.say(f"recorded {stream}: {written} samples to {out}, then stopped by the error below", end="\n")
        raise
    finally:
        if writer is not None:
            writer.close()
        sub.close()
    say.say(f"\rrecorded {stream}: {written} samples to {out}" + " " * 20, end="\n")
    return written


def repair(path: str) -> int:
    """Make a recorder's audio file whole after it was killed; return the samples it now holds.

    See :func:`slabcast.client.record_audio.repair`.
    """
    from .record_audio import repair as repair_audio

    return repair_audio(path)
