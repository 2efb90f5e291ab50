"""An LSL outlet for any slabcast stream: its samples, timestamps and channel info, for every LSL tool.

``slabcast lsl-out STREAM`` runs one; ``slabcast.client.lsl:lsl_outlet`` is the same as a task
callable for ``slabcast up``.  Needs the ``lsl`` extra (``pip install slabcast[lsl]``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from .._info import StreamInfo

__all__ = ["LslOutlet", "lsl_outlet", "run_outlet"]

log = logging.getLogger("slabcast.lsl")

SLABCAST_OUTLET = "slabcast_outlet"  # desc field marking outlets made by slabcast (the lsl source skips them)

# Sample types LSL carries; unsigned ones go out in the next wider signed type, losslessly.
_FORMATS = {"float32": "float32", "float64": "double64", "int8": "int8", "int16": "int16", "int32": "int32",
            "int64": "int64", "uint8": "int16", "uint16": "int32", "uint32": "int64"}  # fmt: skip


def _pylsl() -> Any:
    try:
        import pylsl
    except ImportError as exc:
        raise ImportError("an LSL outlet needs pylsl: pip install 'slabcast[lsl]'") from exc
    return pylsl


class LslOutlet:
    """An LSL outlet carrying one slabcast stream, chunk by chunk.

    Parameters
    ----------
    info : StreamInfo
        The stream's info (``Subscriber.info`` or ``chunk.info``).
    name, type : str, optional
        The LSL stream name (default: the slabcast name) and content type
        (default: the first channel type, else ``"slabcast"``).
    source_id : str, optional
        Default: ``slabcast:`` and the stream's ``source_id`` (else its name): stable,
        so LSL inlets recover across restarts of this outlet, and never the
        device's own.  The outlet's ``desc`` has ``<slabcast_outlet>`` (the
        stream's name): slabcast's ``lsl`` source resolves it only by LSL name.

    Timestamps: a chunk's ``t0`` (``time.time()`` clock), or each sample's own time when
    ``push`` is given ``times``, is put on LSL's clock (``local_clock()``), so LSL inlets and
    LabRecorder see the samples' own times.

    A marker stream (``S<N>``, :class:`slabcast.MarkerPublisher`) goes out as an LSL string
    outlet (``channel_format`` string, nominal rate 0), one marker per sample with its own stamp.

    Raises
    ------
    ValueError
        If LSL cannot carry the stream's dtype (complex, bool).
    """

    def __init__(self, info: StreamInfo, name: str | None = None, type: str | None = None,
                 source_id: str | None = None) -> None:  # fmt: skip
        lsl = _pylsl()
        self._strings = info.dtype.kind == "S"
        fmt = "string" if self._strings else _FORMATS.get(info.dtype.name)
        if fmt is None:
            raise ValueError(f"LSL carries float, int and uint samples and markers (S<N>); stream {info.name!r} "
                             f"is {info.dtype}")  # fmt: skip
        self.info = info
        self._dtype = info.dtype if self._strings else np.dtype("float64" if fmt == "double64" else fmt)
        kind = type or (info.channel_types[0] if info.channel_types else "slabcast")
        # Never the device's own source_id: an inlet of the device (slabcast's lsl source, liblsl recovering
        # a lost inlet, LabRecorder) must not mistake this copy for the device.
        lsl_info = lsl.StreamInfo(name or info.name, kind, info.channels, info.rate or lsl.IRREGULAR_RATE, fmt,
                                  source_id or f"slabcast:{info.source_id or info.name}")  # fmt: skip
        channels = lsl_info.desc().append_child("channels")
        for i, label in enumerate(info.channel_names):
            ch = channels.append_child("channel")
            ch.append_child_value("label", label)
            if info.channel_types:
                ch.append_child_value("type", info.channel_types[i])
            if info.channel_units:
                ch.append_child_value("unit", info.channel_units[i])
        lsl_info.desc().append_child_value("manufacturer", "slabcast")
        # The mark slabcast's lsl source looks for (and skips unless asked by LSL name): the stream it copies.
        lsl_info.desc().append_child_value(SLABCAST_OUTLET, info.name)
        self._outlet = lsl.StreamOutlet(lsl_info)
        self._offset = time.time() - lsl.local_clock()
        self.pushed = 0

    def push(self, data: np.ndarray[Any, Any], t0: float, times: np.ndarray[Any, Any] | None = None) -> None:
        """Send ``(n,)`` or ``(n, channels)`` samples whose first was taken at ``t0`` (``time.time()`` clock).

        ``times``: each sample's own time (``chunk.times``), used for a stream without a rate
        (markers); without them every sample of such a chunk is stamped ``t0``.
        """
        block = np.asarray(data, dtype=self._dtype).reshape(len(data), self.info.channels)
        if self.info.rate and not self._strings:
            # LSL stamps the last sample and derives the others from the nominal rate.
            self._outlet.push_chunk(block, timestamp=t0 + (len(block) - 1) / self.info.rate - self._offset)
        else:
            stamps = np.full(len(block), t0) if times is None else np.asarray(times, dtype=np.float64)
            for row, stamp in zip(block, stamps.tolist(), strict=True):
                # A marker goes out as str, which every pylsl takes (numpy's bytes leave the NUL padding out).
                sample = [raw.decode("utf-8", "replace") for raw in row.tolist()] if self._strings else row
                self._outlet.push_sample(sample, timestamp=stamp - self._offset)
        self.pushed += len(block)

    def have_consumers(self) -> bool:
        """Whether an LSL inlet is connected."""
        return bool(self._outlet.have_consumers())

    def close(self) -> None:
        """Withdraw the outlet."""
        del self._outlet


def run_outlet(stream: str, address: str | None = None, name: str | None = None, type: str | None = None,
               source_id: str | None = None, curve: tuple[str, str] | None = None,
               stop: threading.Event | None = None) -> int:  # fmt: skip
    """Serve ``stream`` as an LSL outlet until it ends (or ``stop`` is set); return the samples sent.

    A ``drop`` subscriber of whole frames: an LSL consumer can never hold the stream back.
    """
    from .._exceptions import EndOfStream
    from .subscriber import Subscriber

    with Subscriber(stream, 1, policy="drop", max_inflight=64, address=address, curve=curve, wait=3600.0,
                    label=f"lsl-out:{stream}") as sub:  # fmt: skip
        outlet = LslOutlet(sub.info, name, type, source_id)
        log.info("LSL outlet %r serves slabcast stream %r", name or stream, stream)
        try:
            while stop is None or not stop.is_set():
                try:
                    chunk = sub.recv(timeout=0.2)
                except TimeoutError:
                    continue
                with chunk:
                    outlet.push(chunk.data, chunk.t0, chunk.times if sub.info.timestamps else None)
        except EndOfStream:
            pass
        finally:
            outlet.close()
        return outlet.pushed


_OUTLETS: dict[str, LslOutlet] = {}


def lsl_outlet(chunk: Any, name: str | None = None, type: str | None = None) -> None:
    """A ``slabcast up`` task callable: every chunk of its stream goes out on an LSL outlet (one per stream)."""
    info = chunk.info
    outlet = _OUTLETS.get(info.name)
    if outlet is None:
        outlet = _OUTLETS[info.name] = LslOutlet(info, name, type)
    outlet.push(chunk.data, chunk.t0, chunk.times if info.timestamps else None)
