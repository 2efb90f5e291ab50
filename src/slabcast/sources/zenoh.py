"""The ``zenoh`` source: a stream bridged by ``slabcast bridge --zenoh`` on another host, re-served here.

It subscribes to ``<prefix>/<stream>`` and re-publishes each frame (samples as the
payload, index/t0/times in the attachment: :mod:`slabcast.wire.bridge`) into this
broker's shared memory.  The Zenoh session set-up (:func:`zenoh_config`,
:func:`open_session`) is here, below the bridge, which uses it too.  Needs the
``zenoh`` extra (``pip install 'slabcast[zenoh]'``); ``zenoh`` is imported only when used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._exceptions import WriteTimeout
from .._info import StreamInfo
from ..wire.bridge import FLAG_DISCONTINUITY, FrameHeader, decode_info
from ..wire.protocol import check_stream_name
from .base import positive_seconds

__all__ = ["ZenohSource", "import_zenoh", "open_session", "zenoh_config"]

log = logging.getLogger("slabcast.bridge")  # the name its log lines always had: the far end of a bridge


def import_zenoh() -> Any:
    """The ``zenoh`` module, or an ``ImportError`` naming the extra that installs it."""
    try:
        import zenoh
    except ImportError as exc:
        raise ImportError("the Zenoh bridge and source need eclipse-zenoh: pip install 'slabcast[zenoh]'") from exc
    return zenoh


def _endpoints(value: str | Sequence[str] | None) -> list[str]:
    """Endpoints from a list, or from one string separated by ``;`` (a source option cannot hold commas)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [e.strip() for e in value.split(";") if e.strip()]
    return [str(e) for e in value]


def _flag(value: Any) -> bool:
    """A boolean option, also when it comes as text from ``--source kind:key=value``."""
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


_RETRY = {"period_init_ms": 250, "period_max_ms": 1000, "period_increase_factor": 2}  # (Zenoh's: 1000, 4000, 2)


def zenoh_config(mode: str | None = None, connect: str | Sequence[str] | None = None,
                 listen: str | Sequence[str] | None = None, config: str | None = None, multicast: Any = None,
                 cfg: str | Sequence[str] | None = None) -> Any:  # fmt: skip
    """A ``zenoh.Config``: a file (``config``) or Zenoh's defaults, then these settings over it.

    Parameters
    ----------
    mode : {"peer", "client", "router"}, optional
    connect, listen : str or list of str, optional
        Endpoints (``tcp/10.0.0.5:7447``); one string may hold several separated by ``;``.
    config : str, optional
        A Zenoh JSON5 configuration file.  Without one, Zenoh's defaults with its
        shared-memory transport off (``transport/shared_memory/enabled``) and a peer
        that went tried again every second at most (``connect/retry``: 0.25 s, then
        doubling up to 1 s; Zenoh's own goes up to 4 s).
    multicast : bool, optional
        Multicast scouting (Zenoh's default: on); off for explicit endpoints only.
    cfg : str or list of str, optional
        ``KEY:JSON5`` settings (``"transport/unicast/max_links:2"``), as Zenoh's own tools take ``--cfg``.

    Raises
    ------
    ValueError
        For a setting Zenoh refuses (naming it).
    """
    zenoh = import_zenoh()
    if config and not os.path.isfile(config):
        raise ValueError(f"no Zenoh configuration file at {config!r}")
    try:
        conf = zenoh.Config.from_file(config) if config else zenoh.Config()
        if not config:
            # Zenoh's own shared-memory transport is for peers on one host, where slabcast already is; it
            # leaves a <id>.zenoh file in /dev/shm per session, even after a clean close. On by `cfg` or a file.
            conf.insert_json5("transport/shared_memory/enabled", "false")
            # A peer that went (a bridge restarted) is tried again every second at most, not Zenoh's 1, 2, 4, 4 s:
            # a bridge back after 3 s was heard from 4 s later, its frames meanwhile lost.
            conf.insert_json5("connect/retry", json.dumps(_RETRY))
        if mode:
            conf.insert_json5("mode", json.dumps(mode))
        if connect:
            conf.insert_json5("connect/endpoints", json.dumps(_endpoints(connect)))
        if listen:
            conf.insert_json5("listen/endpoints", json.dumps(_endpoints(listen)))
        if multicast is not None:
            conf.insert_json5("scouting/multicast/enabled", json.dumps(_flag(multicast)))
        for item in _endpoints(cfg):
            key, sep, value = item.partition(":")
            if not sep:
                raise ValueError(f"a Zenoh setting is KEY:JSON5, got {item!r}")
            conf.insert_json5(key.strip(), value.strip())
    except zenoh.ZError as exc:
        raise ValueError(f"Zenoh configuration refused: {exc}") from exc
    return conf


def open_session(conf: Any) -> Any:
    """Open a Zenoh session (``OSError`` naming why it cannot)."""
    zenoh = import_zenoh()
    try:
        return zenoh.open(conf)
    except zenoh.ZError as exc:
        raise OSError(f"cannot open a Zenoh session: {exc}") from exc


class ZenohSource:
    """A stream bridged by ``slabcast bridge --zenoh`` on another host, re-served from this broker's shared memory.

    Parameters
    ----------
    key : str
        The bridged stream's key expression, ``slabcast/<host>/<stream>``.
    name : str, optional
        The local stream name (default: the key's last chunk).
    connect, listen : str, optional
        Zenoh endpoints, several separated by ``;`` (``tcp/10.0.0.5:7447``).
    config : str, optional
        A Zenoh JSON5 configuration file (the other options apply over it).
    mode : str
        ``peer`` (default) or ``client`` (through a Zenoh router).
    multicast : bool, optional
        Multicast scouting (default: Zenoh's, on).
    cfg : str, optional
        More Zenoh settings, ``KEY:JSON5`` separated by ``;``.
    timeout : float
        Seconds each query for the stream info waits.  A bridge that is not there
        yet is waited for (the queries repeat, logged), never a failure.
    policy : {"block", "drop"}
        When the local pool has no free slab (a ``block`` subscriber here holds the
        publisher back): ``block`` waits, holding Zenoh's delivery back (with a
        bridge in ``--policy block``, back to the origin: lossless end to end);
        ``drop`` drops the frame here, seen as a gap.
    queue : int
        Frames kept, at most, while the local stream is being opened (between the
        subscription and the stream's publisher); beyond, the oldest go and the
        local stream starts later, as a late joiner's does.
    lost_after : float
        Seconds without a frame after which the broker's log says the key went
        silent (a killed bridge or a cut network sends nothing to say so).

    Each frame is decoded and written into shared memory in the Zenoh
    subscriber's callback (:meth:`attach`): no queue and no thread between the
    callback and the stream.

    What is exact: samples (bit for bit), ``t0`` of every frame, per-sample times
    of a stream that has them, channel names, types, units, rate and source_id.
    Indices: the local index is the origin's index minus the samples this source
    did not receive (it joined late, frames were dropped, the bridge restarted);
    with the source up before the stream starts and nothing lost, they are equal.
    Every gap (a jump in the origin's index, or a new stream behind the key) makes
    the next frame a ``discontinuity``, and is logged with both indices.
    """

    def __init__(self, key: str, name: str | None = None, connect: str | None = None, listen: str | None = None,
                 config: str | None = None, mode: str = "peer", multicast: Any = None, cfg: str | None = None,
                 timeout: float = 2.0, policy: str = "block", queue: int = 256,
                 lost_after: float = 2.0) -> None:  # fmt: skip
        import_zenoh()  # a missing extra is said at once, not on the source's thread
        self.key = str(key).rstrip("/")
        if not self.key or "*" in self.key or "@" in self.key:
            raise ValueError(f"key must be one bridged stream's key, slabcast/<host>/<stream>, got {key!r}")
        self.name = check_stream_name(name or self.key.rsplit("/", 1)[-1])
        if policy not in ("block", "drop"):
            raise ValueError(f"policy must be 'block' or 'drop', got {policy!r}")
        self.policy = policy
        self.timeout = positive_seconds(timeout, "timeout")
        self._conf_args = {"mode": mode, "connect": connect, "listen": listen, "config": config,
                           "multicast": multicast, "cfg": cfg}  # fmt: skip
        zenoh_config(**self._conf_args)  # bad settings fail here, where the broker reports them
        # Frames are written in Zenoh's callback, on its thread; this lock keeps them one at a time and in
        # order (Zenoh may call from several threads), and lets disconnect() wait for the one in flight.
        self._lock = threading.Lock()
        self._write: Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any], bool, bool], bool] | None = None
        self._early: deque[tuple[bytes, bytes]] = deque(maxlen=max(1, int(queue)))  # before attach()
        self._session: Any = None
        self._subscriber: Any = None
        self._callback_threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._news = threading.Event()  # something for the source's thread: an error, a new epoch
        self._failure: BaseException | None = None  # raised by read(), on the source's thread
        self._requery = False  # a new epoch: read() asks for the info again (a query never runs in the callback)
        self._other: str | None = None  # a frame of another dtype or channel count came: read() asks why
        self._info: StreamInfo | None = None
        self._epoch = 0
        self._next: int | None = None  # the origin index expected next
        self._local = 0  # samples this source has written (the local index of the next one)
        self._jump = False
        self.dropped = 0  # frames dropped here (policy="drop", before the stream opened), refused or malformed
        self._dropping = 0  # frames dropped in a row for want of a slab (policy="drop")
        self.gaps = 0
        self.lost_after = positive_seconds(lost_after, "lost_after")
        self._last_frame = 0.0  # time.monotonic() of the last frame received
        self._silent = False

    def connect(self) -> StreamInfo:
        """Open the session, subscribe, ask the bridge for the stream info (``OSError`` while none answers)."""
        if self._session is None:
            self._closing.clear()
            self._failure = None
            self._session = open_session(zenoh_config(**self._conf_args))
            # Zenoh's default for a Python callback: a thread of its binding runs it, fed by Zenoh's receiving
            # thread through a channel of 256 samples. A direct callback, on the receiving thread itself
            # (Callback(..., indirect=False)), measured the same latency and about 30% fewer frames per second
            # flat out: Zenoh stops reading while a frame is written (docs/zenoh.md, Figures).
            known = set(threading.enumerate())
            self._subscriber = self._session.declare_subscriber(self.key, self._on_sample)
            # That thread is a daemon when made from ours: joined on disconnect, so that the interpreter's exit
            # never stops it inside Zenoh's code (which aborts the process).
            self._callback_threads = [t for t in threading.enumerate() if t not in known and "pyo3" in t.name]
        info, epoch = self._query_info()
        with self._lock:
            self._info, self._epoch = info, epoch
            self._next = None  # the local stream goes on (its index with it); the first frame is not a gap
            self._other = None
            if self._write is not None:  # connected again (the stream is open): its next frame follows a hole
                self._jump = True
        log.info("zenoh key %r (epoch %x: %d x %s @ %s Hz) feeds stream %r", self.key, epoch, info.channels,
                 info.dtype, info.rate, self.name)  # fmt: skip
        return info

    def attach(self, write: Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any], bool, bool], bool]) -> None:
        """From now on, write each frame on arrival with ``write(data, times, discontinuity, wait)``.

        The source's thread (:class:`~slabcast.sources.SourceThread`) calls this once
        the local stream is open; ``write`` returns False for a frame the stream
        refused, and with ``wait`` false (``policy="drop"``) raises
        :class:`~slabcast.WriteTimeout` when no slab is free at once.  Frames that
        came before are written first, in order.
        """
        try:
            with self._lock:
                self._write = write
                while self._early and not self._closing.is_set():
                    self._write_locked(*self._early.popleft())
        except BaseException as exc:  # said by read(), on the source's thread, as a callback's would be
            self._fail(exc)

    def _on_sample(self, sample: Any) -> None:
        # On Zenoh's callback thread. Zenoh's payload exposes no buffer in the Python API: to_bytes() is the
        # one copy out of it (numpy views it); the publisher's write is the copy into shared memory.
        payload = sample.payload.to_bytes()
        attachment = sample.attachment
        raw = attachment.to_bytes() if attachment is not None else b""
        try:
            with self._lock:
                if self._closing.is_set():
                    return
                now = time.monotonic()
                if self._silent:
                    self._silent = False
                    log.log(self._silence_level(), "stream %r: frames on %r again after %.1f s", self.name,
                            self.key, now - self._last_frame)  # fmt: skip
                self._last_frame = now
                if self._write is None or self._info is None:  # the local stream is being opened
                    if len(self._early) == self._early.maxlen:
                        self.dropped += 1
                    self._early.append((payload, raw))
                    return
                self._write_locked(payload, raw)
        except BaseException as exc:  # the broker closing under us: the source's thread ends on it (read)
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None and not self._closing.is_set():
            self._failure = exc
            self._news.set()

    def _write_locked(self, payload: bytes, raw: bytes) -> None:
        """Decode a frame and write it (caller holds the lock, ``_write`` and ``_info`` are set)."""
        got = self._decode(payload, raw)
        if got is None:
            return
        data, times = got
        jump, self._jump = self._jump, False
        assert self._write is not None
        try:
            written = self._write(data, times, jump, self.policy == "block")
        except WriteTimeout:
            if self.policy == "block":  # it waits for a slab as long as the source's thread is not stopping
                raise
            if not self._dropping:
                log.warning("stream %r: no free slab here (a policy='block' subscriber is behind); frames on %r are "
                            "dropped (policy='drop') until one is free", self.name, self.key)  # fmt: skip
            self._dropping += 1
            written = False
        else:
            if written and self._dropping:
                log.warning("stream %r: writing again after %d frames dropped", self.name, self._dropping)
                self._dropping = 0
        if not written:  # dropped, or refused by the stream (the source's thread said so): the next follows a hole
            self.dropped += 1
            self._jump = True

    def _decode(self, payload: bytes, raw: bytes) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """A frame's samples and times, the index bookkeeping done; None for a frame not to write."""
        info = self._info
        assert info is not None
        if self._failure is not None:  # the source's thread is ending on it
            return None
        try:
            head, times = FrameHeader.decode(raw, len(payload))
        except ValueError as exc:
            self.dropped += 1
            log.warning("stream %r: a frame on %r was refused: %s", self.name, self.key, exc)
            return None
        if (head.dtype, head.channels) != (info.dtype, info.channels):
            # Another kind of samples: a new stream behind the key, or a stray peer. The source's thread asks
            # the bridge (read); meanwhile such frames are not written.
            self.dropped += 1
            if self._other is None:
                self._other = f"{head.dtype} x {head.channels}"
                self._news.set()
            return None
        if head.epoch != self._epoch:
            log.info("stream %r: the bridge of %r (re)subscribed (epoch %x)", self.name, self.key, head.epoch)
            self._epoch = head.epoch
            self._requery = True
            self._news.set()
        if self._next is None:
            self._next = head.index
            if head.index:
                log.info("stream %r: first frame at origin index %d (local %d)", self.name, head.index, self._local)
        elif head.index != self._next:
            self.gaps += 1
            self._jump = True
            log.warning("stream %r: %s at origin index %d (expected %d; local index %d): discontinuity", self.name,
                        "a gap" if head.index > self._next else "a new stream", head.index, self._next,
                        self._local)  # fmt: skip
        if head.flags & FLAG_DISCONTINUITY:
            self._jump = True
        self._next = head.index + head.n
        self._local += head.n
        data = np.frombuffer(payload, dtype=head.dtype)
        if head.channels > 1:
            data = data.reshape(head.n, head.channels)
        if not info.timestamps:  # no per-sample times kept: the first sample's is all the broker takes
            times = np.array([head.t0])
        elif times is None:  # the origin sends none (any more): the rate's
            rate = info.rate
            times = head.t0 + np.arange(head.n) / rate if rate else np.full(head.n, head.t0)
        return data, times

    def _query_info(self) -> tuple[StreamInfo, int]:
        zenoh = import_zenoh()
        try:
            replies = list(self._session.get(f"{self.key}/@info", timeout=self.timeout))
        except zenoh.ZError as exc:
            raise OSError(f"query of {self.key}/@info failed: {exc}") from exc
        for reply in replies:
            if reply.ok is not None:
                try:
                    return decode_info(reply.ok.payload.to_bytes(), self.name)
                except ValueError as exc:
                    raise OSError(f"{self.key}/@info: {exc}") from exc
        raise OSError(f"no slabcast bridge answers at {self.key}/@info (yet)")

    def read(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Watch, for up to 50 ms: frames are written on arrival (:meth:`attach`); return ``None``.

        Raises
        ------
        ValueError
            When the bridge serves another kind of samples under the key (the local
            stream cannot change its dtype or channel count: the source ends).
        SlabcastError
            What a write in Zenoh's callback met (the broker closing).
        """
        self._news.wait(0.05)
        self._news.clear()
        if self._failure is not None:
            raise self._failure
        info = self._info
        if self._other is not None and info is not None:
            # Asked on the session that is up (a reconnection would drop the peers that found it).
            try:
                new, _ = self._query_info()
            except OSError as exc:  # no answer now: such frames keep being refused; asked again at the next
                log.warning("stream %r: a frame of %s on %r, not %s x %s, was refused; %s", self.name, self._other,
                            self.key, info.dtype, info.channels, exc)  # fmt: skip
            else:
                if (new.dtype, new.channels) != (info.dtype, info.channels):
                    raise ValueError(f"source {self.name!r} came back as {new.dtype} x {new.channels}, was "
                                     f"{info.dtype} x {info.channels}")  # fmt: skip
                log.warning("stream %r: a frame of %s on %r was refused (the bridge still serves %s x %s: a stray "
                            "peer?)", self.name, self._other, self.key, info.dtype, info.channels)  # fmt: skip
            self._other = None
        if self._requery:
            self._requery = False
            with contextlib.suppress(OSError):  # no answer now: the frames say enough to go on
                new, _ = self._query_info()
                if new != info:
                    # The local stream keeps its format (dtype and channels are checked per frame); times
                    # are made up from t0 and the rate when the origin stopped sending them.
                    log.warning("stream %r: the stream info on %r changed (%s); the local stream keeps %s",
                                self.name, self.key, new, info)  # fmt: skip
        # Under the callback's lock (a frame coming meanwhile said "again" before this said "no frame"); not waited
        # for: held, a frame is being written, and the stream is not silent.
        if self._lock.acquire(blocking=False):
            try:
                silent = time.monotonic() - self._last_frame
                if self._last_frame and not self._silent and silent > self.lost_after:
                    self._silent = True  # a bridge killed or cut off says nothing: its frames just stop
                    log.log(self._silence_level(), "stream %r: no frame on %r for %.1f s (the bridge or its stream "
                            "stopped, or the network is cut; or nothing happened, for a stream without a rate); "
                            "waiting", self.name, self.key, silent)  # fmt: skip
            finally:
                self._lock.release()
        return None

    def _silence_level(self) -> int:
        """How a silence is said: a warning, but for a stream without a rate (markers), often quiet that long."""
        return logging.WARNING if self._info is not None and self._info.rate else logging.INFO

    def wait(self) -> float:
        """``read`` waits by itself: no pause between reads."""
        return 0.0

    def disconnect(self) -> None:
        """Close the session; return once no frame is being written (the stream's publisher may close)."""
        self._closing.set()
        if self._session is not None:
            try:
                self._session.close()
            except Exception as exc:  # zenoh.ZError: closing is best effort
                log.debug("closing the Zenoh session: %s", exc)
            self._session = self._subscriber = None
        for thread in self._callback_threads:  # it leaves once the closed session drops the callback
            thread.join(2.0)
        self._callback_threads = []
        with self._lock:  # a frame being written when closing began is written (or refused) by now
            self._early.clear()
