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
import queue as _queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._info import StreamInfo
from ..wire.bridge import FLAG_DISCONTINUITY, FrameHeader, decode_info
from ..wire.protocol import check_stream_name

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
        shared-memory transport off (``transport/shared_memory/enabled``).
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
        When ``queue`` frames wait for the local publisher (a ``block`` subscriber
        here holds it back): ``block`` holds Zenoh's delivery back (with a bridge
        in ``--policy block``, back to the origin: lossless end to end); ``drop``
        drops frames here, seen as gaps.
    queue : int
        Frames received and not yet written locally, at most.
    lost_after : float
        Seconds without a frame after which the broker's log says the key went
        silent (a killed bridge or a cut network sends nothing to say so).

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
        self.timeout = float(timeout)
        self._conf_args = {"mode": mode, "connect": connect, "listen": listen, "config": config,
                           "multicast": multicast, "cfg": cfg}  # fmt: skip
        zenoh_config(**self._conf_args)  # bad settings fail here, where the broker reports them
        self._frames: _queue.Queue[tuple[bytes, bytes]] = _queue.Queue(max(1, int(queue)))
        self._session: Any = None
        self._subscriber: Any = None
        self._closing = threading.Event()
        self._info: StreamInfo | None = None
        self._epoch = 0
        self._next: int | None = None  # the origin index expected next
        self._local = 0  # samples this source has written (the local index of the next one)
        self._jump = False
        self.dropped = 0  # frames dropped here (policy="drop"), or refused (malformed)
        self.gaps = 0
        self.lost_after = float(lost_after)
        self._last_frame = 0.0  # time.monotonic() of the last frame received
        self._silent = False

    def _on_sample(self, sample: Any) -> None:
        # On Zenoh's thread: copy out and queue; never touch numpy or the publisher here.
        attachment = sample.attachment
        item = (sample.payload.to_bytes(), attachment.to_bytes() if attachment is not None else b"")
        if self.policy == "drop":
            try:
                self._frames.put_nowait(item)
            except _queue.Full:
                self.dropped += 1
            return
        while not self._closing.is_set():
            try:
                self._frames.put(item, timeout=0.1)
                return
            except _queue.Full:
                continue

    def connect(self) -> StreamInfo:
        """Open the session, subscribe, ask the bridge for the stream info (``OSError`` while none answers)."""
        if self._session is None:
            self._closing.clear()
            self._session = open_session(zenoh_config(**self._conf_args))
            self._subscriber = self._session.declare_subscriber(self.key, self._on_sample)
        info, epoch = self._query_info()
        self._info, self._epoch = info, epoch
        self._next = None  # the local stream goes on (its index with it); the first frame is not a gap
        log.info("zenoh key %r (epoch %x: %d x %s @ %s Hz) feeds stream %r", self.key, epoch, info.channels,
                 info.dtype, info.rate, self.name)  # fmt: skip
        return info

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
        """Return the next frame received (waiting up to 50 ms), or ``None``.

        Raises
        ------
        OSError
            When the bridge serves another kind of samples under the key (the
            broker reconnects, then refuses a changed dtype or channel count).
        """
        try:
            payload, attachment = self._frames.get(timeout=0.05)
        except _queue.Empty:
            silent = time.monotonic() - self._last_frame
            if self._last_frame and not self._silent and silent > self.lost_after:
                self._silent = True  # a bridge killed or cut off says nothing: its frames just stop
                log.warning("stream %r: no frame on %r for %.1f s (the bridge or its stream stopped, or the "
                            "network is cut); waiting", self.name, self.key, silent)  # fmt: skip
            return None
        if self._silent:
            self._silent = False
            log.warning("stream %r: frames on %r again after %.1f s", self.name, self.key,
                        time.monotonic() - self._last_frame)  # fmt: skip
        self._last_frame = time.monotonic()
        info = self._info
        assert info is not None
        try:
            head, times = FrameHeader.decode(attachment, len(payload))
        except ValueError as exc:
            self.dropped += 1
            log.warning("stream %r: a frame on %r was refused: %s", self.name, self.key, exc)
            return None
        if (head.dtype, head.channels) != (info.dtype, info.channels):
            raise OSError(f"{self.key} now carries {head.channels} x {head.dtype}, was {info.channels} x {info.dtype}")
        if head.epoch != self._epoch:
            log.info("stream %r: the bridge of %r (re)subscribed (epoch %x)", self.name, self.key, head.epoch)
            self._epoch = head.epoch
            with contextlib.suppress(OSError):  # no answer now: the frames say enough to go on
                new, _ = self._query_info()
                if new != info:
                    # The local stream keeps its format (dtype and channels are checked per frame); times
                    # are made up from t0 and the rate when the origin stopped sending them.
                    log.warning("stream %r: the stream info on %r changed (%s); the local stream keeps %s",
                                self.name, self.key, new, info)  # fmt: skip
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

    def wait(self) -> float:
        """``read`` waits by itself: no pause between reads."""
        return 0.0

    def take_jump(self) -> bool:
        """Whether the next frame follows a hole (cleared by asking)."""
        jump, self._jump = self._jump, False
        return jump

    def disconnect(self) -> None:
        """Undeclare the subscription and close the session."""
        self._closing.set()
        if self._session is not None:
            try:
                self._session.close()
            except Exception as exc:  # zenoh.ZError: closing is best effort
                log.debug("closing the Zenoh session: %s", exc)
            self._session = self._subscriber = None
        while not self._frames.empty():
            self._frames.get_nowait()
