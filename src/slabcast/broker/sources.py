"""Sources hosted by the broker: the ``Source`` protocol, ``synthetic`` and ``stdin``, and their acquisition threads.

A source runs on its own thread inside the broker process and writes through an
ordinary :class:`~slabcast.Publisher`: its samples go straight into shared memory,
only the small FRAME notice crosses the (in-host) socket.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np

from .._exceptions import SlabcastError, WriteTimeout
from .._info import StreamInfo
from ..bridge.zenoh import ZenohSource
from ..client.lsl import SLABCAST_OUTLET
from ..client.publisher import Publisher
from ..wire.protocol import check_dtype, check_stream_name
from .options import SourceOptionError, build_source, parse_source, source_options, sources_from_json

__all__ = [
    "FileSource",
    "LslSource",
    "ReplaySource",
    "SoundCardSource",
    "Source",
    "SourceOptionError",
    "SourceThread",
    "StdinSource",
    "SyntheticSource",
    "build_source",
    "parse_source",
    "source_options",
    "sources_from_json",
]

log = logging.getLogger("slabcast.source")

class Source(Protocol):
    """What the broker needs of a source.

    ``read`` must not block for long: it returns what has arrived since the last
    call, as ``(data, timestamps)`` with ``data`` sample-major ``(n, channels)`` and
    ``timestamps`` the ``(n,)`` times of its samples (seconds, ``time.time()``'s
    clock; a stream whose info has no per-sample ``timestamps`` may give only the
    first sample's, ``(1,)``), or ``None`` when nothing is ready yet.  It raises
    :class:`EOFError` when the source has ended.
    """

    def connect(self) -> StreamInfo:
        """Open the device or file and say what it carries."""

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return new samples and their timestamps, or ``None``."""

    def disconnect(self) -> None:
        """Release the device or file."""


class SyntheticSource:
    """Sine tones plus noise, paced by the clock so that ``rate`` samples arrive per second without drift.

    Parameters
    ----------
    name : str
    rate : float
    channels : int
    frame : int
        Samples per ``read`` at most (the pacing granularity).
    freqs : list of float
        One tone per channel (cycled).
    noise : float
        Standard deviation of the added Gaussian noise.
    dtype : str
        ``float32`` or ``float64``.
    """

    def __init__(self, name: str = "synthetic", rate: float = 48_000.0, channels: int = 2, frame: int = 480,
                 freqs: list[float] | None = None, noise: float = 0.01, amplitude: float = 0.5,
                 dtype: str = "float32") -> None:  # fmt: skip
        self.info = StreamInfo(check_stream_name(name), check_dtype(dtype), int(channels), float(rate),
                               tuple(f"ch_{i}" for i in range(int(channels))))  # fmt: skip
        self.frame = int(frame)
        self.freqs = np.resize(np.asarray(freqs or [440.0, 1000.0], dtype=np.float64), int(channels))
        self.noise = float(noise)
        self.amplitude = float(amplitude)
        self._rng = np.random.default_rng()
        self._start = 0.0
        self._produced = 0

    def connect(self) -> StreamInfo:
        """Start the clock."""
        self._start = time.time()
        self._produced = 0
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return the samples due since the last call (at most ``frame``), stamped from the start time."""
        rate = self.info.rate
        assert rate is not None
        due = int((time.time() - self._start) * rate) - self._produced
        if due < self.frame:
            return None  # whole frames only: a frame of what came due during the last write would be tiny
        n = self.frame
        index = self._produced + np.arange(n)
        t = index / rate
        data = self.amplitude * np.sin(2 * np.pi * t[:, None] * self.freqs[None, :])
        data += self.noise * self._rng.standard_normal(data.shape)
        self._produced += n
        return data.astype(self.info.dtype), self._start + t

    def disconnect(self) -> None:
        """Nothing to release."""

    def wait(self) -> float:
        """Seconds until the next frame is due (for the acquisition thread's pacing)."""
        rate = self.info.rate or 1.0
        return max(0.0, self._start + (self._produced + self.frame) / rate - time.time())


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
        return self.frame if allowed is None else min(self.frame, allowed)

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
        """Seconds until more samples are due."""
        rate = self.info.rate
        if not self._start:
            return 0.01
        if not self.pace or not rate:
            return 0.0
        return max(0.0, self._start + (self._produced + 1) / (rate * self.speed) - time.time())


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


class StdinSource(_Clocked):
    """Raw bytes or typed samples from standard input (``arecord ... | slabcast up ...``).

    Parameters
    ----------
    name, dtype, channels, rate :
        What the bytes are: ``int16`` stereo at 48 kHz is ``dtype=int16,channels=2,rate=48000``.
    frame : int
        Samples per read at most.
    pace : bool
        Release samples no faster than ``rate`` (for a pipe fed faster than real
        time, e.g. ``sox file.wav -t raw -``); a live device paces itself.
    wait_for : int
        Hold the first sample until the stream has this many subscribers.

    Timestamps follow the sample clock: ``t0 = start + index / rate`` (the
    arrival time of each read when there is no rate).
    """

    def __init__(self, name: str = "stdin", dtype: str = "uint8", channels: int = 1, rate: float | None = None,
                 frame: int = 4096, fd: int | None = None, pace: bool = False, speed: float = 1.0,
                 wait_for: int = 1) -> None:  # fmt: skip
        dt = check_dtype(dtype)
        self.info = StreamInfo(check_stream_name(name), dt, int(channels), float(rate) if rate else None,
                               tuple(f"ch_{i}" for i in range(int(channels))))  # fmt: skip
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.frame = int(frame)
        self._sample_bytes = dt.itemsize * int(channels)
        self._pending = b""
        self._eof = False
        self._clock_init(pace, speed, wait_for)

    def connect(self) -> StreamInfo:
        """Nothing to open: standard input is already there."""
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return whole samples read so far; raise :class:`EOFError` at the end of input."""
        want = self._want()
        if want < 1:
            return None
        need = want * self._sample_bytes - len(self._pending)
        if need > 0 and not self._eof:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                block = os.read(self.fd, need)
                if block:
                    self._pending += block
                else:
                    self._eof = True
        whole = min(len(self._pending) // self._sample_bytes, want) * self._sample_bytes
        if not whole:
            if self._eof:
                if self._pending:
                    log.warning("stdin source %r: the input ended inside a sample; its last %d bytes were dropped "
                                "(a sample is %d bytes)", self.info.name, len(self._pending), self._sample_bytes)
                raise EOFError("end of standard input")
            return None
        data, self._pending = self._pending[:whole], self._pending[whole:]
        arr = np.frombuffer(data, dtype=self.info.dtype)
        n = len(arr) // self.info.channels
        if self.info.channels > 1:
            arr = arr.reshape(n, self.info.channels)
        return arr, self._stamps(n)

    def disconnect(self) -> None:
        """Nothing to release."""


class FileSource(_Clocked):
    """An audio file read through ``soundfile`` (libsndfile: WAV, FLAC, OGG, AIFF ...; extra ``files``).

    Parameters
    ----------
    path : str
        The file.
    name : str, optional
        Stream name (default: the file's name without extension, made valid).
    dtype : str, optional
        Sample type delivered: default ``int16`` for 16-bit and 8-bit PCM,
        ``int32`` for 24/32-bit PCM, ``float32`` otherwise.
    frame : int
        Samples per frame.
    pace : bool
        Release samples at the file's rate (times ``speed``); default: as fast as
        the subscribers take them.
    loop : bool
        Start again at the end (the first frame of each lap has ``discontinuity``).
    wait_for : int
        Hold the first sample until the stream has this many subscribers.
    """

    def __init__(self, path: str, name: str | None = None, dtype: str | None = None, frame: int = 4800,
                 pace: bool = False, speed: float = 1.0, loop: bool = False, wait_for: int = 1) -> None:  # fmt: skip
        try:
            import soundfile
        except ImportError as exc:
            raise ImportError("the file source needs soundfile: pip install 'slabcast[files]'") from exc
        self._sf = soundfile
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise OSError(f"no audio file at {self.path!r}")
        try:
            meta = soundfile.info(self.path)
        except Exception as exc:  # soundfile raises its own LibsndfileError (a RuntimeError) or OSError
            raise OSError(f"cannot read audio file {self.path!r}: {exc}") from exc
        if dtype is None:
            dtype = "int16" if meta.subtype in ("PCM_16", "PCM_S8", "PCM_U8") else (
                "int32" if meta.subtype in ("PCM_24", "PCM_32") else "float32")  # fmt: skip
        dt = check_dtype(dtype)
        if dt.name not in ("int16", "int32", "float32", "float64"):
            raise ValueError(f"dtype must be int16, int32, float32 or float64 for a file, got {dt}")
        stem = os.path.splitext(os.path.basename(self.path))[0]
        default = "".join(c if c.isalnum() or c in "_.:-" else "_" for c in stem)[:64] or "file"
        self.info = StreamInfo(check_stream_name(name or default), dt, int(meta.channels), float(meta.samplerate),
                               tuple(f"ch_{i}" for i in range(int(meta.channels))))  # fmt: skip
        self.frame = int(frame)
        self.loop = bool(loop)
        self._file: Any = None
        self._clock_init(pace, speed, wait_for)

    def connect(self) -> StreamInfo:
        """Open the file."""
        self._file = self._sf.SoundFile(self.path)
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return the next frame; :class:`EOFError` at the end (unless looping)."""
        want = self._want()
        if want < 1:
            return None
        data = self._file.read(want, dtype=self.info.dtype.name, always_2d=True)
        if not len(data):
            if not self.loop:
                raise EOFError(f"end of {self.path}")
            self._file.seek(0)
            raise _Lap()
        data = np.ascontiguousarray(data)
        return (data if self.info.channels > 1 else data[:, 0]), self._stamps(len(data))

    def disconnect(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


class _Lap(Exception):  # a signal between a looping source and its thread, not an error
    """A looping source started again at its beginning: the next frame follows a jump."""


class ReplaySource:
    """A recording (any format :func:`slabcast.open_recording` reads) played back as a live stream, paced
    against the clock (``speed`` 2.0: twice as fast).

    Frames come out exactly as recorded, with their original timestamps (shifted by
    the recording's length on each ``loop``), so record -> replay -> record is
    bit-exact.  ``wait_for=N`` holds playback until the stream has N subscribers,
    so they see it from its first sample.
    """

    count_subscribers: Callable[[str], int] | None = None  # set by the broker hosting it: asks no socket

    def __init__(self, path: str, speed: float = 1.0, loop: bool = False, name: str | None = None,
                 wait_for: int = 0, address: str | None = None) -> None:  # fmt: skip
        from ..client.record import open_recording

        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.recording = open_recording(path)
        rec = self.recording.info
        self.info = StreamInfo(check_stream_name(name or rec.name), rec.dtype, rec.channels, rec.rate,
                               rec.channel_names, rec.channel_types, rec.channel_units, rec.source_id,
                               rec.timestamps and self.recording.times is not None)  # fmt: skip
        self.speed = float(speed)
        self.loop = bool(loop)
        self.wait_for = int(wait_for)
        self.address = address
        self._next = 0
        self._lap = 0
        self._start = 0.0

    def connect(self) -> StreamInfo:
        """Say what the recording carries."""
        return self.info

    def _due(self, k: int) -> float:
        frames = self.recording.frames
        offset = float(frames["t0"][k] - frames["t0"][0]) + self._lap * self._length()
        return self._start + offset / self.speed

    def _length(self) -> float:
        rec = self.recording
        frames = rec.frames
        last = float(frames["t0"][-1] - frames["t0"][0])
        if rec.info.rate:
            last += float(frames["n"][-1]) / rec.info.rate
        return last

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return the next frame once its time has come; :class:`EOFError` at the end (unless looping)."""
        frames = self.recording.frames
        if not len(frames):
            raise EOFError("empty recording")
        if self._start == 0.0:
            if self.wait_for and not self._enough_subscribers():
                return None
            self._start = time.time()
        if self._next >= len(frames):
            if not self.loop:
                raise EOFError("end of recording")
            self._next = 0
            self._lap += 1
        k = self._next
        if time.time() < self._due(k):
            return None
        index, n, t0 = int(frames["index"][k]), int(frames["n"][k]), float(frames["t0"][k])
        first = int(frames["index"][0])
        data = np.asarray(self.recording.samples[index - first : index - first + n]).reshape(n, -1)
        t0 += self._lap * self._length()
        rate = self.info.rate
        if self.recording.times is not None:  # each sample's own time, as recorded
            stamps = np.asarray(self.recording.times[index - first : index - first + n]) + self._lap * self._length()
        else:
            stamps = t0 + np.arange(n) / rate if rate else np.full(n, t0)
        self._next += 1
        return (data if self.info.channels > 1 else data[:, 0]), stamps

    def wait(self) -> float:
        """Seconds until the next frame is due."""
        if self._start == 0.0:
            return 0.01
        k = min(self._next, len(self.recording.frames) - 1)
        return max(0.0, self._due(k) - time.time())

    @property
    def waiting(self) -> bool:
        """Whether playback is held until ``wait_for`` subscribers are there."""
        return self._start == 0.0 and self.wait_for > 0

    def _enough_subscribers(self) -> bool:
        return _enough_subscribers(self, self.info.name, self.wait_for)

    def disconnect(self) -> None:
        """Close the recording's memory map."""
        self.recording.samples = np.zeros((0, self.info.channels), dtype=self.info.dtype)


class LslSource:
    """An inlet of a Lab Streaming Layer outlet (extra ``lsl``: ``pip install slabcast[lsl]``); see docs/lsl.md.

    Parameters
    ----------
    name : str
        The slabcast stream name.
    stream : str, optional
        The LSL stream name to resolve (default: ``name``, unless ``type``,
        ``source_id`` or ``predicate`` select it instead).
    type, source_id : str, optional
        Resolve by LSL type (``"EEG"``) and/or source_id (a device serial).
    predicate : str, optional
        An LSL XPath predicate (``"name='EMG' and type='EMG'"``); overrides the others.
    timeout : float
        Seconds each resolution attempt waits.  An outlet that is not there yet is
        waited for (the attempts repeat, logged), never a failure.
    lost_after : float
        Seconds of silence from a regular-rate outlet after which it is resolved
        again (an outlet replaced by a new one with another source_id).

    The stream keeps what the outlet says: channel labels, types and units (from
    its ``desc``), ``source_id``, nominal rate (irregular rate: no rate).  Time
    stamps are LSL's, clock-corrected (``proc_clocksync``: an outlet on another
    host is put on this host's LSL clock), then mapped to ``time.time()``.  After
    a restart or a replacement of the outlet, the first chunk says
    ``discontinuity``.  String (marker) streams are refused: slabcast streams numbers.
    """

    _FORMATS: ClassVar[dict[int, str]] = {1: "float32", 2: "float64", 4: "int32", 5: "int16", 6: "int8", 7: "int64"}

    def __init__(self, name: str, stream: str | None = None, type: str | None = None,
                 source_id: str | None = None, predicate: str | None = None, timeout: float = 2.0,
                 max_samples: int = 4096, lost_after: float = 2.0) -> None:  # fmt: skip
        try:
            import pylsl
        except ImportError as exc:
            raise ImportError("the lsl source needs pylsl: pip install 'slabcast[lsl]'") from exc
        self._lsl = pylsl
        self.name = check_stream_name(name)
        if predicate is None:
            parts = []
            if stream or not (type or source_id):
                parts.append(f"name='{stream or name}'")
            if type:
                parts.append(f"type='{type}'")
            if source_id:
                parts.append(f"source_id='{source_id}'")
            predicate = " and ".join(parts)
        if not stream:
            # slabcast's own outlets (lsl-out) carry a copy of a stream, maybe of this very device (same type,
            # same channels): resolved only when asked for by their LSL name, never by type, source_id or a
            # predicate, which would latch onto the copy while the device is away.
            predicate = f"({predicate}) and not(desc/{SLABCAST_OUTLET})"
        self.predicate = str(predicate)
        self.timeout = float(timeout)
        self.max_samples = int(max_samples)
        self.lost_after = float(lost_after)
        self._inlet: Any = None
        self._offset = 0.0
        self._last_data = 0.0
        self._last_stamp: float | None = None
        self._jump = False

    def connect(self) -> StreamInfo:
        """Resolve the outlet and open an inlet (``OSError`` while none is there; ``ValueError`` for strings)."""
        lsl = self._lsl
        found = lsl.resolve_bypred(self.predicate, 1, self.timeout)
        if not found:
            raise OSError(f"no LSL outlet matches {self.predicate!r} (yet)")
        info = found[0]
        fmt = self._FORMATS.get(info.channel_format())
        if fmt is None:
            what = "strings (a marker stream)" if info.channel_format() == lsl.cf_string else "an unknown format"
            raise ValueError(
                f"LSL stream {info.name()!r} carries {what}; slabcast streams numbers: read markers with pylsl "
                f"(or an LSL recorder) beside it"
            )
        self._inlet = lsl.StreamInlet(info, max_chunklen=self.max_samples, recover=True,
                                      processing_flags=lsl.proc_clocksync)  # fmt: skip
        full = self._inlet.info(timeout=max(self.timeout, 1.0))  # with its desc: channel labels, types, units
        n = full.channel_count()
        labels: list[str] = []
        types: list[str] = []
        units: list[str] = []
        channel = full.desc().child("channels").child("channel")
        while not channel.empty() and len(labels) < n:
            labels.append(channel.child_value("label") or f"ch_{len(labels)}")
            types.append(channel.child_value("type"))
            units.append(channel.child_value("unit"))
            channel = channel.next_sibling()
        labels += [f"ch_{i}" for i in range(len(labels), n)]
        types += [""] * (n - len(types))
        units += [""] * (n - len(units))
        rate = full.nominal_srate() or None
        self._offset = time.time() - lsl.local_clock()
        self._last_data = time.monotonic()
        self.info = StreamInfo(self.name, np.dtype(fmt), n, rate, tuple(labels),
                               tuple(types) if any(types) else (), tuple(units) if any(units) else (),
                               full.source_id(), timestamps=True)  # each sample keeps its LSL stamp
        log.info("LSL outlet %r (source_id %r, %d x %s @ %s Hz) feeds stream %r", full.name(), full.source_id(), n,
                 fmt, rate, self.name)  # fmt: skip
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Pull what has arrived, without waiting; ``OSError`` when a regular outlet fell silent."""
        samples, stamps = self._inlet.pull_chunk(timeout=0.0, max_samples=self.max_samples)
        now = time.monotonic()
        if not stamps:
            if self.info.rate and now - self._last_data > self.lost_after:
                raise OSError(f"LSL outlet silent for {self.lost_after:g} s; resolving {self.predicate!r} again")
            return None
        self._last_data = now
        times = np.asarray(stamps, dtype=np.float64) + self._offset
        rate = self.info.rate
        if self._last_stamp is not None and rate and times[0] - self._last_stamp > max(0.25, 10.0 / rate):
            # The outlet restarted (same source_id: the inlet recovered by itself): a hole in time.
            log.warning("LSL stream %r: %.2f s gap in the outlet's time stamps (restart?)", self.name,
                        times[0] - self._last_stamp)  # fmt: skip
            self._jump = True
        self._last_stamp = float(times[-1])
        data = np.asarray(samples, dtype=self.info.dtype).reshape(len(stamps), self.info.channels)
        return (data if self.info.channels > 1 else data[:, 0]), times

    def take_jump(self) -> bool:
        """Whether the next frame follows a hole (cleared by asking)."""
        jump, self._jump = self._jump, False
        return jump

    def disconnect(self) -> None:
        """Close the inlet."""
        if self._inlet is not None:
            self._inlet.close_stream()
            self._inlet = None
        self._last_stamp = None


class SoundCardSource:
    """A sound card input through PortAudio (extra ``audio``: ``pip install slabcast[audio]``).

    PortAudio's callback thread only queues the blocks it is given; the acquisition
    thread takes them from the queue, so the audio thread never waits on slabcast.
    """

    def __init__(self, name: str = "mic", device: int | str | None = None, rate: float = 48_000.0, channels: int = 2,
                 dtype: str = "float32", frame: int = 480) -> None:  # fmt: skip
        try:
            import sounddevice
        except (ImportError, OSError) as exc:  # OSError: the PortAudio library is missing
            raise ImportError(f"the sound card source needs sounddevice and PortAudio: {exc}") from exc
        import queue

        self._sd = sounddevice
        self.device = device
        self.frame = int(frame)
        self.info = StreamInfo(check_stream_name(name), check_dtype(dtype), int(channels), float(rate),
                               tuple(f"ch_{i}" for i in range(int(channels))))  # fmt: skip
        self._blocks: queue.SimpleQueue[tuple[np.ndarray[Any, Any], float]] = queue.SimpleQueue()
        self._stream: Any = None

    def connect(self) -> StreamInfo:
        """Open and start the input stream (``OSError`` if the device is missing)."""

        def callback(indata: Any, frames: int, when: Any, status: Any) -> None:
            self._blocks.put((indata.copy(), time.time() - frames / float(self.info.rate or 1)))

        try:
            self._stream = self._sd.InputStream(
                device=self.device, samplerate=self.info.rate, channels=self.info.channels,
                dtype=self.info.dtype.name, blocksize=self.frame, callback=callback,
            )  # fmt: skip
            self._stream.start()
        except Exception as exc:  # PortAudioError derives from Exception
            raise OSError(f"cannot open sound card input {self.device!r}: {exc}") from exc
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Return the oldest block PortAudio delivered, or ``None``."""
        import queue

        try:
            data, t0 = self._blocks.get_nowait()
        except queue.Empty:
            return None
        rate = self.info.rate or 1.0
        return (data if self.info.channels > 1 else data[:, 0]), t0 + np.arange(len(data)) / rate

    def wait(self) -> float:
        """Poll at a quarter of a block."""
        return self.frame / float(self.info.rate or 1.0) / 4

    def disconnect(self) -> None:
        """Stop and close the input stream."""
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None


_KINDS: dict[str, type] = {
    "audio": SoundCardSource,
    "synthetic": SyntheticSource,
    "stdin": StdinSource,
    "file": FileSource,
    "replay": ReplaySource,
    "lsl": LslSource,
    "zenoh": ZenohSource,
}
class SourceThread(threading.Thread):
    """The acquisition thread of one source: read, write, repeat, until stopped or the source ends."""

    def __init__(self, source: Any, address: str, subscribers: Callable[[str], int] | None = None,
                 **publisher_options: Any) -> None:  # fmt: skip
        if hasattr(source, "address") and source.address is None:
            source.address = address  # a replay waiting for subscribers asks this broker
        if subscribers is not None and hasattr(source, "count_subscribers"):
            source.count_subscribers = subscribers
        super().__init__(name=f"source-{getattr(source, 'info', None) and source.info.name}", daemon=True)
        self.source = source
        self.address = address
        self.subscribers = subscribers  # stream name -> its subscribers now (the hosting broker's count)
        options = {**getattr(source, "publisher_options", {}), **publisher_options}
        if "write_timeout" in options:
            options["timeout"] = float(options.pop("write_timeout"))
        self.publisher_options = options
        self.stopping = threading.Event()
        self.opened = threading.Event()  # the stream exists on the broker
        info0 = getattr(source, "info", None)
        self.stream_name: str = info0.name if info0 is not None else str(getattr(source, "name", "?"))
        self.reconnects = 0  # times the source was lost and reconnection began
        self.blocked_episodes = 0
        self.refused = 0  # frames the stream refused (malformed), each lost
        self.discarded = 0  # samples written while the stream had no subscriber: nobody will ever see them
        self.last_sample = 0.0  # time.time() of the last write
        self.state = "starting"
        self.error: BaseException | None = None

    def _first_connect(self) -> StreamInfo | None:
        """Connect, waiting (with a log line, backing off up to 2 s) for a device or outlet not there yet."""
        delay = 0.05
        while not self.stopping.is_set():
            try:
                return self.source.connect()  # type: ignore[no-any-return]
            except OSError as exc:
                if delay == 0.05:
                    self.state = "waiting"
                    log.warning("source %r: %s; waiting for it", self.stream_name, exc)
                    self.opened.set()  # the broker is ready; the stream appears when the source does
                self.stopping.wait(delay)
                delay = min(2.0, delay * 2)
        return None

    def run(self) -> None:
        """Connect the source, publish what it reads, close the stream at its end."""
        try:
            info = self._first_connect()
        except Exception as exc:  # refused outright (a marker stream, a bad option): say it in one line
            self.error, self.state = exc, "failed"
            log.error("source %r refused: %s", self.stream_name, exc)
            self.opened.set()
            return
        if info is None:
            return
        try:
            pub = Publisher(info.name, dtype=info.dtype, channels=info.channels, rate=info.rate,
                            channel_names=list(info.channel_names), address=self.address,
                            channel_types=list(info.channel_types) or None,
                            channel_units=list(info.channel_units) or None, source_id=info.source_id or None,
                            timestamps=info.timestamps, **self.publisher_options)  # fmt: skip
        except Exception as exc:  # a stream the broker refuses (its info, its pool): the source ends, said once
            self.error, self.state = exc, "failed"
            log.error("source %r refused by the broker: %s", self.stream_name, exc)
            self.source.disconnect()
            self.opened.set()
            return
        log.info("source %r started", info.name)
        self.state = "running"
        self.opened.set()
        jumped = False
        try:
            while not self.stopping.is_set():
                try:
                    got = self.source.read()
                except EOFError as exc:
                    log.info("source %r ended: %s", info.name, exc)
                    break
                except _Lap:
                    jumped = True
                    continue
                except OSError as exc:
                    # The device went away: reconnect, keeping the stream and its subscribers.
                    log.warning("source %r lost (%s); reconnecting", info.name, exc)
                    self.state = "reconnecting"
                    self.reconnects += 1
                    jumped = self._reconnect(info)
                    if self.state == "reconnecting":
                        self.state = "running"
                    continue
                if got is None:
                    wait = getattr(self.source, "wait", None)
                    self.stopping.wait(wait() if wait else 0.002)
                    continue
                data, stamps = got
                take_jump = getattr(self.source, "take_jump", None)
                if take_jump is not None and take_jump():
                    jumped = True
                try:
                    self._write(pub, info.name, data, float(stamps[0]), jumped, stamps if info.timestamps else None)
                except (ValueError, TypeError) as exc:  # a frame the stream refuses: it is lost, the source goes on
                    self.refused += 1
                    if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th ... said
                        log.warning("source %r: a frame was refused (%d so far): %s", info.name, self.refused, exc)
                    jumped = True
                    continue
                jumped = False
            self.state = "ended"
        except SlabcastError as exc:  # the broker is shutting down under us
            self.state = "stopped"
            log.info("source %r stopped: %s", info.name, exc)
        except BaseException as exc:
            self.error = exc
            self.state = "failed"
            log.exception("source %r failed", info.name)
        finally:
            self.source.disconnect()
            pub.close()

    def _write(self, pub: Publisher, name: str, data: Any, t0: float, jumped: bool, times: Any = None) -> None:
        """Write one frame (in pieces the stream's slabs hold, if it is longer); while a ``block`` subscriber
        holds every slab, wait (nothing is dropped) and say so."""
        most = pub.max_frame
        n = len(data)
        if self.subscribers is not None and self.subscribers(name) == 0:
            # Nobody subscribes: the samples go into the pool and out of it unseen. A live source may do so
            # (nobody asked yet); it is never silent: counted, and said once.
            if not self.discarded:
                log.warning("source %r: no subscriber; what it writes meanwhile is discarded (counted in "
                            "`slabcast status`: discarded); said once", name)  # fmt: skip
            self.discarded += n
        if n > most:
            rate = pub.rate
            for start in range(0, n, most):
                piece_t0 = float(times[start]) if times is not None else t0 + (start / rate if rate else 0.0)
                piece_times = times[start : start + most] if times is not None else None
                self._write(pub, name, data[start : start + most], piece_t0, jumped and start == 0, piece_times)
            return
        since = 0.0
        while True:
            try:
                pub.write(data, t0=t0, discontinuity=jumped, times=times)
            except WriteTimeout:
                if self.stopping.is_set():
                    raise
                if not since:
                    since = time.monotonic()
                    self.state = "blocked"
                    log.warning("source %r is held back by a policy='block' subscriber (no free slab for %g s); "
                                "waiting, nothing is dropped", name, pub.timeout)  # fmt: skip
                continue
            if since:
                self.state = "running"
                log.warning("source %r resumed after %.1f s held back", name, time.monotonic() - since + pub.timeout)
                self.blocked_episodes += 1
            self.last_sample = time.time()
            return

    def status(self) -> dict[str, Any]:
        """This source's state for ``slabcast status``.

        ``state``: ``starting``, ``waiting`` (for its device or outlet), ``waiting_for_subscribers``,
        ``running``, ``blocked``, ``reconnecting``, ``ended``, ``stopped`` or ``failed``.
        """
        state = self.state
        if state == "running" and getattr(self.source, "waiting", False):
            state = "waiting_for_subscribers"
        return {
            "name": self.stream_name,
            "kind": type(self.source).__name__,
            "state": state,
            "reconnects": self.reconnects,
            "blocked_episodes": self.blocked_episodes,
            "refused_frames": self.refused,
            "discarded_samples": self.discarded,
            "last_sample_age": time.time() - self.last_sample if self.last_sample else None,
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
        }

    def _reconnect(self, info: StreamInfo) -> bool:
        """Reconnect the source (backing off up to 2 s); it must still carry the same kind of samples."""
        delay = 0.05
        while not self.stopping.is_set():
            try:
                self.source.disconnect()
                again = self.source.connect()
            except OSError as exc:
                log.info("source %r: reconnect failed (%s)", info.name, exc)
                self.stopping.wait(delay)
                delay = min(2.0, delay * 2)
                continue
            if (again.dtype, again.channels) != (info.dtype, info.channels):
                raise ValueError(f"source {info.name!r} came back as {again.dtype} x {again.channels}, "
                                 f"was {info.dtype} x {info.channels}")  # fmt: skip
            log.info("source %r reconnected", info.name)
            return True
        return False
