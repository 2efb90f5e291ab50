"""Streams across hosts through Zenoh: :class:`ZenohBridge` publishes them (the ``zenoh`` source re-serves one).

``slabcast bridge --zenoh`` runs a :class:`ZenohBridge` beside a broker: one
subscriber per stream, each frame put on ``<prefix>/<stream>`` (samples as the
payload, index/t0/times in the attachment, see :mod:`slabcast.wire.bridge`),
the stream info answered on ``<prefix>/<stream>/@info``.  A broker on another
host hosts a :class:`~slabcast.sources.zenoh.ZenohSource`
(``--source zenoh:key=<prefix>/<stream>``) that re-publishes those frames into its
own shared memory; the Zenoh session set-up is that module's, used here too.  Needs the ``zenoh``
extra (``pip install 'slabcast[zenoh]'``); ``zenoh`` is imported only when used.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from .._exceptions import BrokerGoneError, EndOfStream, StreamNotFoundError
from ..sources.zenoh import import_zenoh, open_session, zenoh_config
from ..wire.bridge import FLAG_DISCONTINUITY, FrameHeader, encode_info
from ..wire.protocol import check_stream_name

__all__ = ["ZenohBridge", "default_prefix", "open_session", "zenoh_config"]

log = logging.getLogger("slabcast.bridge")


def default_prefix() -> str:
    """``slabcast/<host>``: the key prefix a bridge uses unless told otherwise."""
    return f"slabcast/{socket.gethostname()}"


class _Forwarder(threading.Thread):
    """One stream: a slabcast subscriber, each chunk (one frame) put on Zenoh."""

    def __init__(self, bridge: ZenohBridge, stream: str, found_late: bool = False) -> None:
        super().__init__(name=f"bridge-{stream}", daemon=True)
        self.bridge = bridge
        self.stream = stream
        # Found by a later look of every-stream mode, so opened since the one before: its first subscription starts
        # back in the pool that far (FOUND_LATE_HISTORY), from index 0 for a stream opened since (it started at the
        # head: the first second or so of a new stream never crossed).
        self.history = FOUND_LATE_HISTORY if found_late else None
        self.key = f"{bridge.prefix}/{stream}"
        self.info_reply: bytes | None = None
        self.frames = 0
        self.bytes = 0
        self.error: BaseException | None = None
        self.retire = threading.Event()  # the stream is gone for good (every-stream mode): leave
        self._trying: str | None = None  # why the last subscription failed (said once a spell, at INFO)

    def _on_query(self, query: Any) -> None:
        reply = self.info_reply
        if reply is not None:  # no stream here now: no answer, the asker waits
            query.reply(f"{self.key}/@info", reply)

    def run(self) -> None:
        b = self.bridge
        zenoh = import_zenoh()
        congestion = zenoh.CongestionControl.BLOCK if b.policy == "block" else zenoh.CongestionControl.DROP
        publisher = b.session.declare_publisher(self.key, congestion_control=congestion)
        # A direct callback (on Zenoh's thread): an indirect one runs on a Python thread made from this daemon
        # thread, hence a daemon too, which interpreter exit may stop inside Zenoh's code: the process aborted
        # ("FATAL: exception not rethrown") after printing its totals.
        queryable = b.session.declare_queryable(f"{self.key}/@info",
                                                zenoh.handlers.Callback(self._on_query, indirect=False))  # fmt: skip
        try:
            while not (b.stopping.is_set() or self.retire.is_set()):
                self._serve_once(publisher)
        except BaseException as exc:
            self.error = exc
            log.exception("bridge of stream %r failed", self.stream)
            b.stopping.set()
        finally:
            self.info_reply = None
            for entity in (queryable, publisher):
                try:
                    entity.undeclare()
                except Exception as exc:  # the session may be closing: best effort
                    log.debug("undeclare: %s", exc)

    def _serve_once(self, publisher: Any) -> None:
        from ..client.subscriber import Subscriber

        b = self.bridge
        try:
            # A subscription made before the stream exists starts at its index 0.
            # Woken by the publisher's FUTEX_WAKE, not a ZeroMQ notice: no I/O thread hop before each put
            # (this loop needs no pollable socket).
            sub = Subscriber(self.stream, 1, policy=b.policy, max_inflight=64, address=b.address, wait=1.0,
                             label=f"bridge:{self.stream}", wake="futex", history=self.history)  # fmt: skip
            self.history = None  # (later subscriptions, to the stream come back, wait for it: index 0)
        except StreamNotFoundError:
            self._trying = None  # (the broker answers: a later outage is said again)
            return
        except (BrokerGoneError, EndOfStream) as exc:
            # Once, then at DEBUG while the same reason holds (it logged at INFO every second meanwhile).
            level = logging.DEBUG if type(exc).__name__ == self._trying else logging.INFO
            self._trying = type(exc).__name__
            log.log(level, "stream %r: %s; trying again every second", self.stream, exc)
            b.stopping.wait(1.0)
            return
        self._trying = None
        epoch = int.from_bytes(os.urandom(8), "little")
        info = sub.info
        timestamps = info.timestamps
        self.info_reply = encode_info(info, epoch, b.host)
        print(f"bridge: {self.stream} -> {self.key} from index {sub.start_index} (epoch {epoch:x})", flush=True)
        dtype, channels = info.dtype, info.channels
        try:
            while not b.stopping.is_set():
                try:
                    chunk = sub.recv(timeout=0.2)
                except TimeoutError:
                    continue
                with chunk:
                    data = chunk.data
                    n = len(data)
                    head = FrameHeader(FLAG_DISCONTINUITY if chunk.discontinuity else 0, channels, dtype, epoch,
                                       chunk.index, chunk.t0, n)  # fmt: skip
                    attachment = head.encode(chunk.times if timestamps else None)
                    # Zenoh's Python API takes bytes (no buffer: its wheel is built for the stable ABI of Python
                    # 3.9), and copies them into its own message: a view cannot be put; this is our one copy.
                    payload = data.tobytes()
                publisher.put(payload, attachment=attachment)  # after the release: the slab is free meanwhile
                self.frames += 1
                self.bytes += len(payload)
        except EndOfStream as exc:
            log.info("stream %r ended (%s); waiting for it to come back", self.stream, exc)
            print(f"bridge: {self.stream} ended", flush=True)
        except BrokerGoneError as exc:
            log.warning("stream %r: %s; waiting for the broker", self.stream, exc)
            print(f"bridge: {self.stream} lost its broker", flush=True)
            b.stopping.wait(1.0)
        finally:
            self.info_reply = None
            sub.close()


RETIRE_AFTER = 60.0
"""Seconds a stream may be absent from the broker before every-stream mode stops bridging it."""
FOUND_LATE_HISTORY = 3.0  # seconds back a stream found by a later look (every second) is bridged from


class ZenohBridge:
    """Publish a broker's streams on Zenoh (``slabcast bridge --zenoh``).

    Parameters
    ----------
    streams : list of str
        Streams to publish; empty: every stream of the broker, found as they appear.
    address : str, optional
        The local broker.
    prefix : str, optional
        Key prefix, default ``slabcast/<host>``; stream ``mic`` goes on ``<prefix>/mic``.
    policy : {"drop", "block"}
        ``drop`` (default): a slow network never slows the local stream; frames it
        cannot take are dropped (here, or by Zenoh's congestion control) and the far
        side sees index gaps as discontinuities.  ``block``: lossless end to end;
        a slow network or far side holds the local publisher back.
    session : zenoh.Session
        An open session (the bridge does not close it).
    retire_after : float
        Seconds a stream may be gone from the broker before every-stream mode (no
        ``streams``) stops bridging it; one that comes back later is bridged again.
    """

    def __init__(self, session: Any, streams: Sequence[str] = (), address: str | None = None,
                 prefix: str | None = None, policy: str = "drop",
                 retire_after: float = RETIRE_AFTER) -> None:  # fmt: skip
        if policy not in ("block", "drop"):
            raise ValueError(f"policy must be 'block' or 'drop', got {policy!r}")
        self.session = session
        self.streams = [check_stream_name(s) for s in streams]
        self.address = address
        self.prefix = (prefix or default_prefix()).rstrip("/")
        self.host = socket.gethostname()
        self.policy = policy
        self.stopping = threading.Event()
        self.forwarders: dict[str, _Forwarder] = {}
        self._retired = (0, 0)  # frames and bytes of forwarders retired
        self.retire_after = float(retire_after)

    def _add(self, stream: str, found_late: bool = False) -> None:
        if stream not in self.forwarders:
            fw = self.forwarders[stream] = _Forwarder(self, stream, found_late)
            fw.start()

    def run(self) -> None:
        """Forward until :meth:`stop` (or a forwarder fails); stream ends and broker restarts are followed."""
        from ..client.control import broker_status

        for s in self.streams:
            self._add(s)
        seen: dict[str, float] = {}
        looked = False  # (streams there at the first look are bridged from their head, later ones from their start)
        while not self.stopping.is_set():
            if not self.streams:
                try:
                    names = [s["name"] for s in broker_status(self.address, timeout=1.0)["streams"] if not s["ended"]]
                except BrokerGoneError:
                    names = list(self.forwarders)  # the broker restarts: nothing is gone for good yet
                now = time.monotonic()
                for name in names:
                    seen[name] = now
                    self._add(name, found_late=looked)
                looked = True
                for name, fw in list(self.forwarders.items()):
                    if now - seen.get(name, now) > self.retire_after:
                        # Gone for a while: its key, queryable and subscription attempts go (a broker whose
                        # stream names change would otherwise keep one forwarder for every name it ever had).
                        fw.retire.set()
                        fw.join(5.0)
                        del self.forwarders[name], seen[name]
                        frames, nbytes = self._retired
                        self._retired = (frames + fw.frames, nbytes + fw.bytes)
                        log.info("stream %r gone for %g s: no longer bridged", name, self.retire_after)
            self.stopping.wait(1.0)
        for fw in self.forwarders.values():
            fw.join(5.0)

    def stop(self) -> None:
        """Ask every forwarder to leave (within about a second)."""
        self.stopping.set()

    def totals(self) -> tuple[int, int]:
        """Frames and payload bytes put on Zenoh so far."""
        frames, nbytes = self._retired
        return (frames + sum(f.frames for f in self.forwarders.values()),
                nbytes + sum(f.bytes for f in self.forwarders.values()))  # fmt: skip

    def failed(self) -> BaseException | None:
        """The first error a forwarder stopped on, if any."""
        return next((f.error for f in self.forwarders.values() if f.error is not None), None)
