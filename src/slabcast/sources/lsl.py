"""The ``lsl`` source: an inlet of a Lab Streaming Layer outlet (extra ``lsl``; docs/lsl.md)."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np

from .._info import StreamInfo
from ..client.lsl import SLABCAST_OUTLET
from ..wire.protocol import check_stream_name

__all__ = ["LslSource"]

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
