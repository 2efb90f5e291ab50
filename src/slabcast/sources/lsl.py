"""The ``lsl`` source: an inlet of a Lab Streaming Layer outlet (extra ``lsl``; docs/lsl.md)."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np

from .._info import StreamInfo
from ..client.lsl import SLABCAST_OUTLET
from ..client.markers import marker_dtype
from ..wire.protocol import check_stream_name
from .base import positive_count, positive_seconds

__all__ = ["LslSource"]

_WAIT = 0.1
"""Seconds a read waits in liblsl for a sample when none is there (the GIL released): a sample that comes is
taken at once; an outlet with nothing to send costs 10 wake-ups a second, not the 500 of a look every 2 ms."""
_GATHER = 0.002
"""Seconds from one frame to the next while samples flow: what came meanwhile makes one frame (an outlet that
pushes one sample at a time at 10 kHz gave frames of 1.7 samples when each read took the next one at once)."""

log = logging.getLogger("slabcast.source")


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
    max_bytes : int
        For a string (marker) outlet: the longest marker kept whole, in UTF-8 bytes (the
        stream's dtype is ``S<max_bytes>``); a longer one is cut there (at a character's
        boundary) and logged.

    The stream keeps what the outlet says: channel labels, types and units (from
    its ``desc``), ``source_id``, nominal rate (irregular rate: no rate).  Time
    stamps are LSL's, clock-corrected (``proc_clocksync``: an outlet on another
    host is put on this host's LSL clock), then mapped to ``time.time()``.  After
    a restart or a replacement of the outlet, the first chunk says
    ``discontinuity``.  A string (marker) outlet of one channel becomes a marker stream
    (:class:`slabcast.MarkerPublisher`'s kind: ``S<max_bytes>``, no rate, every marker with its
    own stamp); one of several string channels is refused.
    """

    _FORMATS: ClassVar[dict[int, str]] = {1: "float32", 2: "float64", 4: "int32", 5: "int16", 6: "int8", 7: "int64"}

    def __init__(self, name: str, stream: str | None = None, type: str | None = None,
                 source_id: str | None = None, predicate: str | None = None, timeout: float = 2.0,
                 max_samples: int = 4096, lost_after: float = 2.0, max_bytes: int = 64) -> None:  # fmt: skip
        try:
            import pylsl
        except ImportError as exc:
            raise ImportError("the lsl source needs pylsl: pip install 'slabcast[lsl]'") from exc
        self._lsl = pylsl
        self.name = check_stream_name(name)
        # The LSL name asked for, if any (an outlet of that name seen while none matched is looked for again).
        self._asked_name = (stream or name) if predicate is None and (stream or not (type or source_id)) else None
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
        else:
            # Never a copy of the stream this source feeds (lsl-out under the device's own LSL name): it would
            # feed the stream its own samples while the device is away, and miss the device when it comes back.
            predicate = f"({predicate}) and not(desc/{SLABCAST_OUTLET}='{self.name}')"
        self.predicate = str(predicate)
        self.timeout = positive_seconds(timeout, "timeout")
        self.max_samples = positive_count(max_samples, "max_samples")
        self.lost_after = positive_seconds(lost_after, "lost_after")
        self.max_bytes = int(marker_dtype(max_bytes).itemsize)
        self._strings = False
        self._cut = 0  # markers longer than max_bytes, cut
        self._inlet: Any = None
        self._offset = 0.0
        self._last_data = 0.0  # time.monotonic() of the last frame read (or the connection): the next gathers
        # until _GATHER after it; silence is counted from it
        self._last_stamp: float | None = None
        self._jump = False
        self._looked = False  # the outlets visible were listed once (connect's first failure)
        self._seen: set[str] = set()  # the names of the outlets that listing saw

    def _seen_instead(self) -> str:
        """The outlets the network has instead, the first time none matches (a typo in a name waits forever)."""
        if self._looked:
            return ""
        self._looked = True
        import difflib

        try:
            infos = self._lsl.resolve_streams(wait_time=0.5)
            seen = sorted({f"{i.name()} ({i.type()})" for i in infos})
            self._seen = {i.name() for i in infos}
        except Exception:  # (only a hint)
            return ""
        if not seen:
            return "; no LSL outlet is visible at all"
        close = difflib.get_close_matches(self.predicate, seen, n=1, cutoff=0.3)
        hint = f"; closest: {close[0]}" if close else ""
        return f"; outlets visible now: {', '.join(seen[:20])}{hint}"

    def connect(self) -> StreamInfo:
        """Resolve the outlet and open an inlet (``OSError`` while none is there; ``ValueError`` for a format
        slabcast does not stream: several string channels, an unknown format)."""
        lsl = self._lsl
        found = lsl.resolve_bypred(self.predicate, 1, self.timeout)
        if not found:
            first = not self._looked
            instead = self._seen_instead()
            # An outlet may have come while we listed (a newcomer read its own named as not matching): look once
            # more when an outlet was seen that may match (any, unless a name was asked for that none has).
            if first and self._seen and (self._asked_name is None or self._asked_name in self._seen):
                found = lsl.resolve_bypred(self.predicate, 1, 0.5)
            if not found:
                raise OSError(f"no LSL outlet matches {self.predicate!r} (yet){instead}")
        info = found[0]
        self._looked = True  # (found once: a later failure is a lost outlet, not a typo, and its reconnection
        # must not spend a blocking look at every outlet, which liblsl may stretch past a broker's stop)
        self._strings = info.channel_format() == lsl.cf_string
        dtype = marker_dtype(self.max_bytes) if self._strings else self._FORMATS.get(info.channel_format())
        if self._strings and info.channel_count() != 1:
            raise ValueError(
                f"LSL stream {info.name()!r} carries strings in {info.channel_count()} channels; a slabcast marker "
                f"stream has one (as LSL marker streams do): send each kind of marker on an outlet of its own"
            )
        if dtype is None:
            raise ValueError(f"LSL stream {info.name()!r} has channel format {info.channel_format()}, which is "
                             f"none of float32, double64, int8, int16, int32, int64, string")  # fmt: skip
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
        labels += ["marker" if self._strings else f"ch_{i}" for i in range(len(labels), n)]
        if self._strings and not any(types):
            types = [full.type()]  # LSL's stream type ("Markers"): what recorders and LSL tools look for
        types += [""] * (n - len(types))
        units += [""] * (n - len(units))
        rate = full.nominal_srate() or None
        self._offset = time.time() - lsl.local_clock()
        self._last_data = time.monotonic()
        # timestamps: each sample keeps its LSL stamp.
        self.info = StreamInfo(self.name, np.dtype(dtype), n, rate, tuple(labels),
                               tuple(types) if any(types) else (), tuple(units) if any(units) else (),
                               full.source_id(), timestamps=True)  # fmt: skip
        log.info("LSL outlet %r (source_id %r, %d x %s @ %s) feeds stream %r", full.name(), full.source_id(), n,
                 self.info.dtype, f"{rate:g} Hz" if rate else "no rate", self.name)  # fmt: skip
        return self.info

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Pull what has arrived (at most every 2 ms while samples flow); when nothing has, wait up to 0.1 s for
        the next sample, then take it and what came with it.  ``None`` when none came; ``OSError`` when a
        regular outlet fell silent."""
        inlet = self._inlet
        if (left := self._last_data + _GATHER - time.monotonic()) > 0:
            time.sleep(left)  # (a frame a moment ago: what comes until _GATHER after it goes in the next, as one)
        samples, stamps = inlet.pull_chunk(timeout=0.0, max_samples=self.max_samples)
        if not stamps:
            # (pull_chunk with a timeout would wait out the whole timeout for a full chunk: pull_sample returns with
            # the first sample.)
            sample, stamp = inlet.pull_sample(timeout=_WAIT)
            if stamp is not None:
                samples, stamps = [sample], [stamp]
                if self.max_samples > 1:
                    more, more_stamps = inlet.pull_chunk(timeout=0.0, max_samples=self.max_samples - 1)
                    samples += more
                    stamps += more_stamps
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
        if self._strings:
            return self._markers(samples), times
        data = np.asarray(samples, dtype=self.info.dtype).reshape(len(stamps), self.info.channels)
        return (data if self.info.channels > 1 else data[:, 0]), times

    def _markers(self, samples: list[list[str]]) -> np.ndarray[Any, Any]:
        """One marker per sample as UTF-8 bytes; one longer than ``max_bytes`` is cut (at a character's boundary)
        and logged: an outlet cannot be refused a marker, and dropping it would lose the event."""
        out = []
        for sample in samples:
            raw = sample[0].encode("utf-8", "replace")
            if len(raw) > self.max_bytes:
                self._cut += 1
                if self._cut & (self._cut - 1) == 0:  # the 1st, 2nd, 4th ... said
                    log.warning("LSL stream %r: a marker of %d bytes is longer than max_bytes=%d, cut there (%d so "
                                "far; give the lsl source max_bytes=N for longer markers): %r", self.name, len(raw),
                                self.max_bytes, self._cut, sample[0][:60])  # fmt: skip
                raw = raw[: self.max_bytes].decode("utf-8", "ignore").encode("utf-8")
            out.append(raw)
        return np.array(out, dtype=self.info.dtype)

    def wait(self) -> float:
        """``read`` waits by itself: no pause between reads."""
        return 0.0

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
