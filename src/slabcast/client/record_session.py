"""Sessions: several streams recorded into one XDF file or Zarr group, a subscriber and a thread per stream.

``slabcast record A B --out s.xdf`` (and ``s.zarr``) runs one :class:`_StreamRecorder` per stream,
each writing its chunks into the shared session as they come (docs/recording.md).

With ``--seconds``, the streams with a rate record exactly that many seconds of samples; a stream
without one (markers, which may stay silent for ever) records the span they cover: each of its
samples is held until the streams with a rate have written up to its stamp, and the session ends
at their last stamp. Without a stream with a rate, ``--seconds`` is the span of its stamps or
the wall time since every stream was subscribed, whichever comes first.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._info import StreamInfo
from .record import _FLUSH, RecordingHoleError, _meta, _missing, _others, _Progress

__all__: list[str] = []

_HOLD = 0.05  # seconds between looks at the streams with a rate, while samples wait for them


class _StreamRecorder(threading.Thread):
    """One stream of a session (XDF or Zarr): its own block subscriber, writing each chunk as it comes (a stream
    without a rate, under ``--seconds``: once the session's streams with a rate have reached its stamps)."""

    def __init__(self, name: str, session: Any, out: str, seconds: float | None, address: str | None,
                 stop: threading.Event, lead_in: Callable[[], float | None] = lambda: None) -> None:  # fmt: skip
        super().__init__(name=f"record-{name}", daemon=True)
        self.stream, self.session, self.out, self.seconds, self.address = name, session, out, seconds, address
        self.stop = stop
        self.lead_in = lead_in  # the history to ask for, when it subscribes
        self.written = 0
        self.rate: float | None = None
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self.span = 0.0  # stream seconds written (from the stamps, for a stream without a rate)
        self.last_stamp: float | None = None  # the newest sample's stamp written
        self.subscribed = threading.Event()  # it knows its stream's rate (or gave up)
        self.found = False  # its stream appeared (else the session ends without it, which it says)
        self.give_up = threading.Event()  # stop waiting for the stream (under --seconds, it never came)
        self.peers: list[_StreamRecorder] = []  # the session's recorders (set before start)
        # Received, not yet written: (samples, stamps, first index, t0) waiting for the streams with a rate.
        self.held: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int, float]] = []
        self.until: float | None = None  # the session's end (its last stamp), set by finish()
        self.finishing = threading.Event()
        self.jumps: list[tuple[int, int]] = []  # discontinuities recorded across (XDF): stream index, file sample

    def finish(self, until: float) -> None:
        """Write what is pending up to stamp ``until`` (a stream without a rate), then end."""
        self.until = until
        self.finishing.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # told by the main thread, which stops the others
            self.error = exc
            self.stop.set()
        finally:
            self.subscribed.set()

    def _subscribe(self) -> Any:
        from .._exceptions import StreamNotFoundError
        from ..client.subscriber import Subscriber

        while not self.stop.is_set() and not self.give_up.is_set():  # a second at a time: Ctrl-C is not held up
            try:
                return Subscriber(self.stream, 1, policy="block", address=self.address, wait=1.0,
                                  label=f"record:{self.stream}", history=self.lead_in())  # fmt: skip
            except StreamNotFoundError:
                continue
        return None

    def _across(self, chunk: Any, expected: int, last_stamp: float) -> bool:
        """Whether the recording goes on across the discontinuity ``chunk`` starts with: in a format that
        stamps each sample (XDF), when no sample is missing and its time jumps forward by more than a sample
        (an LSL outlet that restarted, a device that reconnected: the stamps show the gap, as in LabRecorder's
        files).  A jump with no such gap (a file source's next lap, a clock stepped back) would read as if
        contiguous: the recording ends there."""
        if chunk.index != expected or not self.session.keeps_jumps:
            return False
        return bool(chunk.times[0] - last_stamp > (1.5 / self.rate if self.rate else 0.0))

    def _alone(self) -> bool:
        """Whether no stream of the session has a rate (this one, without, then ends after ``--seconds`` of its own
        stamps; else at the session's end, the last stamp of those with a rate, which gaps in them push back)."""
        return all(p.subscribed.is_set() for p in self.peers) and not any(p.rate for p in self.peers)

    def _gate(self) -> float:
        """The latest stamp this stream may write now: the session's end once known; for a stream without a
        rate under ``--seconds``, the least progress of the streams with a rate still recording."""
        if self.until is not None:
            return self.until
        if self.seconds is None or self.rate:
            return math.inf
        if not all(p.subscribed.is_set() for p in self.peers):
            return -math.inf  # (a stream of the session may still turn out to have a rate)
        rated = [p for p in self.peers if p.rate]
        if not rated:
            return math.inf
        going = [-math.inf if p.last_stamp is None else p.last_stamp for p in rated if p.is_alive()]
        return min(going) if going else -math.inf  # all done: the session's end comes at once (finish)

    def _release(self, sid: int) -> bool:
        """Write the held samples the gate lets through, in order; True once past the session's end."""
        gate = self._gate()
        while self.held:
            data, times, index, t0 = self.held[0]
            later = np.flatnonzero(times > gate)
            n = int(later[0]) if len(later) else len(times)
            if n:
                self.session.write(sid, data[:n], times[:n], index, t0)
                self.written += n
                self.started_at = float(times[0]) if self.started_at is None else self.started_at
                self.last_stamp = float(times[n - 1])
                self.span = self.last_stamp - self.started_at
            if n < len(times):
                self.held[0] = (data[n:], times[n:], index + n, float(times[n]))
                return self.until is not None  # what is left is past the end: it goes unwritten
            self.held.pop(0)
        return False

    def _run(self) -> None:
        from .._exceptions import EndOfStream

        sub = self._subscribe()
        if sub is None:
            return
        self.found = True
        try:
            self.rate = rate = sub.info.rate
            self.subscribed.set()
            sid = self.session.add_stream(sub.info)
            seconds = self.seconds
            limit = None if seconds is None else (max(1, round(seconds * rate)) if rate else None)  # (as chunks: >= 1)
            expected: int | None = None
            last_stamp = -math.inf  # the newest sample's stamp received
            ended = False
            last_flush = time.monotonic()
            while not self.stop.is_set() and (limit is None or self.written < limit):
                chunk = None
                if ended:
                    self.finishing.wait(_HOLD)  # the stream is over; its held samples wait for the others
                else:
                    try:
                        chunk = sub.recv(timeout=_HOLD if self.held else _FLUSH)
                    except TimeoutError:
                        pass
                    except EndOfStream:
                        ended = True
                if chunk is not None:
                    with chunk:
                        if expected is not None and (chunk.index != expected or chunk.discontinuity):
                            if not self._across(chunk, expected, last_stamp):
                                raise RecordingHoleError(self.stream, self.out, expected, chunk.index,
                                                         self.written)  # fmt: skip
                            self.jumps.append((chunk.index, self.written + sum(len(h[0]) for h in self.held)))
                        last_stamp = float(chunk.times[-1])
                        n = len(chunk.data) if limit is None else min(len(chunk.data), limit - self.written)
                        # A copy only if it must wait (the chunk's memory goes back to the pool on release).
                        data, times = chunk.data[:n], chunk.times[:n]
                        self.held.append((data, times, chunk.index, chunk.t0))
                        past = self._release(sid)
                        if self.held:
                            self.held[-1] = (np.array(self.held[-1][0]), *self.held[-1][1:])
                        expected = chunk.index + len(chunk.data)
                else:
                    past = self._release(sid)
                    self.session.flush(sid)
                    if self.finishing.is_set() and not self.held:  # nothing pending: all up to the end is in
                        break
                if past or (ended and not self.held):
                    break
                if not rate and seconds is not None and self.span >= seconds and self._alone():
                    break
                now = time.monotonic()
                if now - last_flush >= _FLUSH:
                    last_flush = now
                    self.session.flush(sid)
            self.session.flush(sid)
        finally:
            sub.close()


class _XdfSession:
    """The XDF writer behind the session interface (its chunks go out as they come: nothing to flush)."""

    keeps_jumps = True  # each sample has its own stamp: a discontinuity is written as the gap it is

    def __init__(self, out: str, clock: str) -> None:
        from .record_xdf import XdfWriter

        self.writer = XdfWriter(out, clock)

    def add_stream(self, info: StreamInfo) -> int:
        return self.writer.add_stream(info)

    def write(self, sid: int, data: np.ndarray[Any, Any], times: np.ndarray[Any, Any], index: int,
              t0: float) -> None:  # fmt: skip
        self.writer.write(sid, data, times)

    def flush(self, sid: int) -> None:
        pass

    def tick(self) -> None:
        self.writer.tick()

    def close(self) -> None:
        self.writer.close()


def _end_unrated(recorders: list[_StreamRecorder], seconds: float, since: float) -> None:
    """With ``--seconds``, end the streams without a rate (markers: they may stay silent for ever) where the
    session ends: at the last stamp the streams with a rate wrote, once they are all done; without any such
    stream, ``seconds`` after every stream was subscribed (wall clock)."""
    unrated = [r for r in recorders if not r.rate and r.is_alive() and not r.finishing.is_set()]
    if not unrated:
        return
    rated = [r for r in recorders if r.rate]
    if rated:
        if any(r.is_alive() for r in rated):
            return
        until = max((r.last_stamp for r in rated if r.last_stamp is not None), default=time.time())
    elif time.monotonic() - since >= seconds:
        until = time.time()
    else:
        return
    for r in unrated:
        r.finish(until)


def _lsl_fed(streams: list[str], address: str | None) -> bool:
    """Whether one of ``streams`` is fed by an ``lsl`` source the broker hosts (its status says so)."""
    from .control import broker_status

    try:
        sources = broker_status(address, timeout=2.0).get("sources") or []
    except Exception:  # no broker yet, or busy: nothing says LSL
        return False
    return any(s.get("kind") == "LslSource" and s.get("name") in streams for s in sources)


def _session_clock(clock: str, streams: list[str], address: str | None) -> str:
    if clock not in ("auto", "wall", "lsl"):
        raise ValueError(f"clock must be 'auto', 'wall' or 'lsl', got {clock!r}")
    if clock != "auto":
        return clock
    if not _lsl_fed(streams, address):
        return "wall"
    try:
        import pylsl  # noqa: F401
    except ImportError:
        return "wall"
    return "lsl"


def _remove(out: str) -> None:
    """Remove a session's file or store that holds no stream (it did not exist before the session made it)."""
    with contextlib.suppress(OSError):
        if os.path.isdir(out):
            shutil.rmtree(out)
        else:
            os.unlink(out)


def _record_session(streams: list[str], out: str, seconds: float | None, address: str | None, progress: bool,
                    clock: str, lead_in: Callable[[], float | None] = lambda: None) -> int:  # fmt: skip
    """Record several streams (or one, to XDF) into one file: a thread and a subscriber per stream."""
    low = out.rstrip("/").lower()
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; choose another --out")
    say = _Progress(progress)
    answers = [_others(s, out, address) for s in streams]  # (None: no broker answered)
    hints = "".join(dict.fromkeys(a for a in answers if a))  # (each different hint once)
    session: Any
    if low.endswith(".xdf"):
        session = _XdfSession(out, _session_clock(clock, streams, address))
    else:
        from .record_zarr import ZarrSession

        session = ZarrSession(out, _meta)
    names = ", ".join(streams)
    stop = threading.Event()
    recorders: list[_StreamRecorder] = []
    last_report = time.monotonic()
    all_subscribed: float | None = None
    first_found: float | None = None  # when the first stream of the session appeared
    try:
        try:
            if any(a is not None for a in answers):  # (else the subscriptions say why, or the progress that it does)
                say.say(f"recording {names}: waiting for the streams{hints}" if hints else f"recording {names}")
            recorders += [_StreamRecorder(s, session, out, seconds, address, stop, lead_in) for s in streams]
            for r in recorders:
                r.peers = recorders
            for r in recorders:
                r.start()
            while any(r.is_alive() for r in recorders):
                for r in recorders:
                    r.join(0.1)
                session.tick()
                if seconds is not None:
                    if first_found is None and any(r.found for r in recorders):
                        first_found = time.monotonic()
                    if all_subscribed is None and first_found is not None and time.monotonic() - first_found >= seconds:
                        for r in recorders:  # --seconds since the session began recording: it is not coming
                            if not r.subscribed.is_set():
                                r.give_up.set()
                    if all_subscribed is None and all(r.subscribed.is_set() for r in recorders):
                        all_subscribed = time.monotonic()
                    if all_subscribed is not None:
                        _end_unrated(recorders, seconds, all_subscribed)
                    found = [r for r in recorders if r.found]
                    if found and not any(r.is_alive() for r in found):
                        break  # --seconds of every stream there is: those never seen end the session (below)
                now = time.monotonic()
                if now - last_report >= 0.5:
                    last_report = now
                    parts = ", ".join(f"{r.stream} {r.written}" for r in recorders)
                    say.say(f"\rrecording: {max(r.span for r in recorders):8.1f} s, samples: {parts} ")
        except KeyboardInterrupt:  # (also while the recorders start: Ctrl-C gives up waiting at any time)
            pass
        stop.set()
        for r in recorders:
            if r.ident is not None:
                r.join()
    except BaseException:
        say.say("", end="\n")
        raise
    finally:
        stop.set()
        session.close()
        if not any(r.found for r in recorders):
            _remove(out)  # no stream ever appeared (no broker, a typo, Ctrl-C while waiting): it holds nothing
    for r in recorders:
        if r.error is not None:
            say.say("", end="\n")
            raise r.error
    if not any(r.found for r in recorders):
        from .._exceptions import StreamNotFoundError

        say.say("", end="\n")
        raise StreamNotFoundError(f"{_missing(streams, address)}: nothing was recorded ({out} was not kept)")
    written = sum(r.written for r in recorders)
    counts = ", ".join(f"{r.stream} {r.written}" for r in recorders if r.found)  # (streams of other rates apart)
    say.say(f"\rrecorded {counts} samples to {out}" + " " * 20, end="\n")
    for r in recorders:
        if r.jumps:
            at = ", ".join(f"{i} ({k} in the file)" for i, k in r.jumps[:5]) + (", ..." if len(r.jumps) > 5 else "")
            say.say(f"{r.stream}: recorded across {len(r.jumps)} discontinuit{'ies' if len(r.jumps) > 1 else 'y'} "
                    f"with a time gap (its source restarted or reconnected) at stream index {at}; the time stamps "
                    f"show the gaps", end="\n")
    missing = [r.stream for r in recorders if not r.found]
    if missing:
        from .._exceptions import StreamNotFoundError

        # A session without one of its streams is not a success (a typo in a name): the file holds the others.
        raise StreamNotFoundError(f"{_missing(missing, address)}: {out} holds only the other streams")
    return written
