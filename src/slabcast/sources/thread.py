"""The acquisition thread of a hosted source: read, write through a :class:`~slabcast.Publisher`, repeat.

A source runs on its own thread inside the broker process and writes through an
ordinary publisher: its samples go straight into shared memory, only the small
FRAME notice crosses the (in-host) socket.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .._exceptions import SlabcastError, WriteTimeout
from .._info import StreamInfo
from ..client.publisher import Publisher
from .base import _Lap

__all__ = ["SourceThread"]

log = logging.getLogger("slabcast.source")

_UNREAD_AFTER = 3.0  # seconds without a subscriber before a source says what it writes is discarded
_BLOCKED_AFTER = 0.5  # seconds a write waits for a free slab before the status says the source is blocked


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
        self.discarded = 0  # samples written while the stream had no subscriber (only history may read them)
        self._unread_since = 0.0  # time.monotonic() since when the stream has had no subscriber (0: it has one)
        self._told_unread = False
        self.last_sample = 0.0  # time.time() of the last write
        self.state = "starting"
        self.error: BaseException | None = None
        self.publisher: Publisher | None = None  # the stream's, while it is open

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
        self.publisher = pub
        self.state = "running"
        self.opened.set()
        attach = getattr(self.source, "attach", None)
        if attach is not None:
            # A source whose frames arrive on another thread's callback (Zenoh's) writes them there itself,
            # through this, with no queue and thread hop; its read() only watches (errors, silence).
            attach(functools.partial(self._write_frame, pub, info))
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
                jumped = not self._write_frame(pub, info, data, stamps, jumped)
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
            if self.state == "failed":  # never a clean end: its subscribers get PublisherGoneError
                pub.abort(f"source {info.name!r} failed: {self.error}")
            pub.close()

    def _write_frame(self, pub: Publisher, info: StreamInfo, data: Any, stamps: Any, jumped: bool,
                     wait: bool = True) -> bool:  # fmt: skip
        """Write one frame the source read (or pushed, from its own thread); False when the stream refused it
        (it is lost: counted, said).  With ``wait`` false, ``WriteTimeout`` when no slab is free at once."""
        timeout = pub.timeout
        try:
            if not wait:
                pub.timeout = 0.0  # only the slabs granted already: the source drops what they cannot take
            self._write(pub, info.name, data, float(stamps[0]), jumped, stamps if info.timestamps else None, wait)
        except (ValueError, TypeError) as exc:  # a frame the stream refuses: it is lost, the source goes on
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th ... said
                log.warning("source %r: a frame was refused (%d so far): %s", info.name, self.refused, exc)
            return False
        finally:
            pub.timeout = timeout
        return True

    def _write(self, pub: Publisher, name: str, data: Any, t0: float, jumped: bool, times: Any = None,
               wait: bool = True) -> None:  # fmt: skip
        """Write one frame (in pieces the stream's slabs hold, if it is longer); while a ``block`` subscriber
        holds every slab, wait (nothing is dropped) and say so, unless not ``wait``."""
        most = pub.max_frame
        n = len(data)
        if self.subscribers is not None and self.subscribers(name) == 0:
            # Nobody subscribes: the samples go into the pool and out of it unseen. A live source may do so
            # (nobody asked yet); it is never silent: counted, and said once when it lasted _UNREAD_AFTER (the
            # tasks `slabcast up` starts with its sources subscribe a second or two after their first write).
            now = time.monotonic()
            if not self._unread_since:
                self._unread_since = now
            elif not self._told_unread and now - self._unread_since >= _UNREAD_AFTER:
                self._told_unread = True
                log.warning("source %r: no subscriber for %.0f s; what it writes meanwhile is discarded once its "
                            "slab is written again, unless read by history (counted in `slabcast status`: "
                            "discarded); said once", name, now - self._unread_since)  # fmt: skip
            self.discarded += n
        else:
            self._unread_since = 0.0
        if n > most:
            rate = pub.rate
            for start in range(0, n, most):
                piece_t0 = float(times[start]) if times is not None else t0 + (start / rate if rate else 0.0)
                piece_times = times[start : start + most] if times is not None else None
                self._write(pub, name, data[start : start + most], piece_t0, jumped and start == 0, piece_times, wait)
            return
        since = 0.0
        while True:
            began = time.monotonic()
            try:
                pub.write(data, t0=t0, discontinuity=jumped, times=times)
            except WriteTimeout:
                if self.stopping.is_set() or not wait:
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
            elif time.monotonic() - began >= _BLOCKED_AFTER:
                self.blocked_episodes += 1  # (held back, as its status said, for less than its write's timeout)
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
        pub = self.publisher
        since = None if pub is None else pub.held_back_since
        if state == "running" and since is not None and time.monotonic() - since >= _BLOCKED_AFTER:
            state = "blocked"  # (a write waits for a free slab: its WriteTimeout, which says so too, may be far)
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
