"""The subscriber: cuts its own chunks from the stream's frame notices and hands out zero-copy, read-only views.

Local subscribers (``ipc://``) read one notice per publisher message from the
broker's notice socket (a ZeroMQ SUB shared by every subscriber of the stream),
run their own :class:`~slabcast.core.rechunk.Rechunker` (sampler included, in this
process), take a kernel lease lock on the slab of each chunk (once per slab, not
per chunk) and tell the broker how far they have read with one cumulative ACK
per slab.  Nothing any subscriber does can slow the broker's loop for the others.
Remote subscribers (``tcp://``) get chunks cut by the broker, by value.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import zmq

from .._exceptions import (
    BrokerGoneError,
    ClosedError,
    EndOfStream,
    ProtocolError,
    SamplesLostError,
    StreamNotFoundError,
    WouldBlock,
)
from .._info import StreamInfo, SubscriberStatistics
from ..client.connection import Connection, _context, error_for, unexpected
from ..core.rechunk import Rechunker, check_sampler, check_size
from ..core.shm import CLIENT_BASE, GEN_OFFSET, attach, hold, lock_slab, open_locks, time_at
from ..wire import messages as M
from ..wire import protocol as P

__all__ = ["Chunk", "Subscriber"]

_CONNECTIONS_KEPT: list[Connection] = []  # see Subscriber.close
log = logging.getLogger("slabcast.subscriber")
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_GEN = struct.Struct("<I")
_ACK_INTERVAL = 0.1  # seconds between ACKs that only refresh counters
_END_GRACE = 0.5  # once the stream's end is known: seconds without a notice before the rest counts as lost
_LOOK_MS = 100  # while waiting for notices, look at the broker connection this often


def _on_dead(dead: deque[int], seq: int, _ref: object) -> None:
    # Runs when the last view of a chunk dies, in whatever thread dropped it: only queue.
    dead.append(seq)


class _Leases:
    """This subscriber's kernel lease locks, one per slab it has chunks in (see :mod:`slabcast.core.shm`).

    Kept apart from the :class:`Subscriber` so that views outliving it (or its
    ``close()``) still give their slab back the moment they die.
    """

    def __init__(self, fd: int, mm: Any) -> None:
        self.fd = fd
        self.mm = mm
        self.guard = threading.RLock()  # a view dying in a GC run inside a guarded section calls back in
        self.locks: dict[int, list[int]] = {}  # slab -> [generation, chunks in it still viewed or queued]
        self.slab_of: dict[int, int] = {}  # seq -> slab, for chunks handed out
        self.refs: dict[int, Any] = {}  # seq -> weakref whose callback says the last view died
        self.dead: deque[int] = deque()  # seqs whose last view died
        self.handed = 0  # chunks handed out under these leases (this broker's segment)
        self.released = 0
        self.unlocked = False
        self.closed = False

    def claim(self, slab: int, gen: int) -> bool:
        """Lease ``slab`` for one more chunk: lock it, then check it still holds generation ``gen``."""
        with self.guard:
            entry = self.locks.get(slab)
            if entry is not None:
                if entry[0] != gen:
                    return False  # a notice older than our lease: its data is gone
                entry[1] += 1
                return True
            if not lock_slab(self.fd, slab, fcntl.F_RDLCK):
                return False  # the broker is handing it to the publisher right now
            if _GEN.unpack_from(self.mm, GEN_OFFSET + 4 * slab)[0] != gen:
                lock_slab(self.fd, slab, fcntl.F_UNLCK)
                return False
            self.locks[slab] = [gen, 1]
            return True

    def unclaim(self, slab: int) -> None:
        with self.guard:
            self.locks[slab][1] -= 1

    def on_dead(self, seq: int, _ref: object) -> None:
        # Runs when the last view of a chunk dies, in whatever thread dropped it.
        self.dead.append(seq)
        if self.closed:
            self.reap()

    def reap(self) -> None:
        """Account for chunks whose last view died."""
        dead = self.dead
        with self.guard:
            while dead:
                seq = dead.popleft()
                self.refs.pop(seq, None)
                slab = self.slab_of.pop(seq, None)
                self.released += 1
                entry = self.locks.get(slab) if slab is not None else None
                if entry is not None:
                    entry[1] -= 1
                    if self.closed and entry[1] == 0:
                        self._unlock(slab)  # type: ignore[arg-type]

    def _unlock(self, slab: int) -> None:
        # Caller holds the guard.
        del self.locks[slab]
        if self.fd >= 0:
            lock_slab(self.fd, slab, fcntl.F_UNLCK)
        self.unlocked = True
        if self.closed and not self.locks and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def unlock_idle(self, keep: int, current: int = -1) -> None:
        """Drop the leases of slabs with no chunk left, except ``keep``.

        Giving back ``current`` (the slab still being read) is not worth an ACK: the broker
        does not wait for it, and it is locked again with the next chunk.
        """
        if self.dead:
            self.reap()
        with self.guard:
            unlocked = self.unlocked
            for slab, entry in list(self.locks.items()):
                if entry[1] == 0 and slab != keep:
                    self._unlock(slab)
                    unlocked = unlocked or slab != current
            self.unlocked = unlocked

    def close(self) -> None:
        """No more chunks: leases go as soon as their last view dies (now, for most)."""
        with self.guard:
            self.closed = True
        self.reap()
        with self.guard:
            for slab, entry in list(self.locks.items()):
                if entry[1] <= 0:
                    self._unlock(slab)
            if not self.locks and self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class Chunk:
    """One chunk of a stream, leased to this subscriber until released.

    Attributes
    ----------
    data : numpy.ndarray
        Read-only view into shared memory, ``(n,)`` for one channel, else
        ``(n, channels)``.  Valid until :meth:`release`.
    t0 : float
        Timestamp of the first sample.
    index : int
        Absolute index of the first sample in the stream.
    seq : int
        This subscriber's chunk counter; a gap means chunks were dropped.
    discontinuity : bool
        The stream jumped before this chunk (source swap, broker restart).

    Notes
    -----
    Leaving a ``with chunk:`` block releases it.  The memory goes back to the
    pool only once every numpy view taken from ``data`` is gone as well, so a
    view kept past the release stays intact.
    """

    __slots__ = ("_data", "_sub", "_times_at", "flags", "index", "seq", "t0")

    def __init__(self, sub: Subscriber, data: np.ndarray[Any, Any], seq: int, index: int, t0: float, flags: int):
        self._sub = sub
        self._times_at: tuple[Any, int] | None = None  # (mapping, byte) of its per-sample times, if kept
        self._data: np.ndarray[Any, Any] | None = data
        self.seq = seq
        self.index = index
        self.t0 = t0
        self.flags = flags

    @property
    def data(self) -> np.ndarray[Any, Any]:
        """The samples, a read-only view of shared memory."""
        if self._data is None:
            raise ClosedError(f"chunk seq={self.seq} was released; keep a view or copy before releasing")
        return self._data

    @property
    def discontinuity(self) -> bool:
        """Whether the stream jumped right before this chunk."""
        return bool(self.flags & P.FLAG_DISCONTINUITY)

    @property
    def times(self) -> np.ndarray[Any, Any]:
        """``(n,)`` seconds, one per sample, on the publisher's clock (``time.time()`` for hosted sources).

        For a stream with ``info.timestamps`` (an LSL source keeps each sample's own
        stamp), read from the chunk's slab: a read-only copy (8 bytes a sample) that
        stays valid after the chunk is released; else computed as ``t0 + k / rate``
        (``t0`` for every sample without a rate).
        """
        if self._data is None:
            raise ClosedError(f"chunk seq={self.seq} was released")
        return self._sub._times(self)

    @property
    def info(self) -> StreamInfo:
        """What the chunk's stream carries (name, dtype, channels, rate, channel names, types, units)."""
        return self._sub.info

    @property
    def partial(self) -> bool:
        """Whether this is the shorter last chunk of an ended stream (``partial_tail=True``)."""
        return bool(self.flags & P.FLAG_PARTIAL)

    def release(self) -> None:
        """Give the chunk back (idempotent); its memory is reused once no view of it remains."""
        if self._data is not None:
            self._data = None
            self._sub._on_release()

    def __len__(self) -> int:
        return 0 if self._data is None else len(self._data)

    def __enter__(self) -> Chunk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._data is None else f"{len(self._data)} samples"
        return f"<Chunk seq={self.seq} index={self.index} t0={self.t0:.6f} {state}>"


class Subscriber:
    """Receive a stream in chunks of this subscriber's own size.

    Parameters
    ----------
    stream : str
        Name of a stream that has a publisher.
    size : int, optional
        Chunk size in samples (bytes on a byte stream).
    seconds : float, optional
        Chunk size in seconds, for streams with a rate (exclusive with ``size``).
    clip : bool
        ``True``: every chunk has exactly ``size`` samples, the remainder carries
        over.  ``False``: chunks hold whole frames, ``len >= size``.
    sampler : float or callable, optional
        Seconds of stream time to skip after each chunk, or a zero-argument
        callable returning them (called in this process, a few chunks ahead).
    policy : {"block", "drop"}
        When this subscriber falls ``max_inflight`` chunks behind: ``"block"``
        makes the publisher wait (lossless), ``"drop"`` drops whole chunks
        (counted, visible as gaps in ``seq``).
    max_inflight : int
        Chunks delivered and not yet released before the policy applies.
    address : str, optional
        Broker address: ``ipc://...`` (shared memory, zero copy) or ``tcp://host:port``
        (a remote broker: chunks travel inside the messages, same semantics).
    curve : (str, str), optional
        For ``tcp://``: this client's secret key file and the broker's public key
        file, as written by ``slabcast keygen``.
    timeout : float
        Seconds to wait for the broker's answer to the subscription.
    wait : float, optional
        Seconds to wait for the stream to appear when it does not exist yet
        (a worker started before its publisher: it then starts at index 0).
        Default: ``timeout``.  0 raises :class:`StreamNotFoundError` at once.
    label : str, optional
        This subscriber's name in logs and ``slabcast status``.
    partial_tail : bool
        When the stream ends, hand out the samples accumulated towards an
        unfinished chunk as one last, shorter chunk with ``partial`` set (a
        recorder loses nothing).  Local (``ipc://``) subscribers only.
    reconnect : bool or float
        When the broker goes away, wait up to this many seconds (``True``: 60)
        for a broker at the same address with this stream and subscribe again
        with the same settings.  The first chunk after that has
        ``discontinuity`` set; ``seq`` and ``index`` restart with the new broker.

    Raises
    ------
    StreamNotFoundError
        If the stream has no publisher.
    RequestError
        If the settings are refused (chunk larger than the stream allows, ...).
    """

    def __init__(
        self,
        stream: str,
        size: int | None = None,
        *,
        seconds: float | None = None,
        clip: bool = False,
        sampler: float | Callable[[], float] | None = None,
        policy: str = "block",
        max_inflight: int = 8,
        address: str | None = None,
        curve: tuple[str, str] | None = None,
        timeout: float = 10.0,
        reconnect: bool | float = False,
        wait: float | None = None,
        label: str | None = None,
        partial_tail: bool = False,
    ) -> None:
        P.check_stream_name(stream)
        if (size is None) == (seconds is None):
            raise TypeError(f"give exactly one of size= (samples) and seconds=, got size={size!r} seconds={seconds!r}")
        if size is not None:
            size = check_size(size)
        elif isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
            raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
        if isinstance(sampler, int | float) and not isinstance(sampler, bool) and sampler > P.MAX_SAMPLER_SECONDS:
            raise ValueError(f"sampler must be a number of seconds in 0..{P.MAX_SAMPLER_SECONDS:g}, got {sampler!r}")
        if policy not in P.POLICIES:
            raise ValueError(f"policy must be 'block' or 'drop', got {policy!r}")
        max_inflight = check_size(max_inflight, "max_inflight")
        self._release_batch = max(1, max_inflight // 2)
        self._sampler = check_sampler(sampler)
        self._prefetch = 0
        wire_sampler: Any = None
        if self._sampler is not None:
            if callable(sampler):
                # Drawn ahead only for a broker-cut (TCP) subscription; a local one calls it in place.
                self._prefetch = max_inflight + 4
            else:
                wire_sampler = float(sampler)  # type: ignore[arg-type]
        self.name = stream
        self.clip = bool(clip)
        self.policy = policy
        self._where = f"subscriber of stream {stream!r}"
        self._closed = False
        self._end: EndOfStream | BrokerGoneError | None = None
        self._dead: deque[int] = deque()  # seqs whose views are all gone, to release
        self._refs: dict[int, weakref.ref[np.ndarray[Any, Any]]] = {}
        self._received = 0
        self._released = 0
        self._last_seq = -1
        self._cut = 0  # chunks the broker cut for us, as told by END
        self._epoch_received = 0  # chunks received from the current broker
        self._dropped_before = 0  # drops counted under earlier brokers (reconnect=)
        self._mm: Any = None
        self._reconnect = 60.0 if reconnect is True else float(reconnect or 0)
        self._jumped = False  # the next chunk follows a broker restart
        # The settings of SUBSCRIBE (the rest is filled per connection: local or remote).
        self._request = M.Subscribe(stream, size, seconds, self.clip, policy, max_inflight, wire_sampler)
        self._max_inflight = max_inflight
        self._partial_tail = bool(partial_tail)
        self._curve = curve
        self._timeout = timeout
        if wait is None:
            wait = timeout
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait < math.inf:
            raise ValueError(f"wait must be a finite number of seconds >= 0 or None, got {wait!r}")
        self._wait = float(wait)
        self._label = label or f"subscriber:{stream}"
        self._pid = os.getpid()
        self._owner_thread = threading.get_ident()
        self._local = False
        self._auto_reconnect = True  # False: BrokerGoneError goes to the caller, which calls _resubscribe
        self._notices: Any = None
        self._sampler_error: BaseException | None = None
        self._connect(address)

    def _connect(self, address: str | None) -> None:
        conn = Connection(address, "sub", self._label, curve=self._curve)
        notices = None
        lock_fd = -1
        mm: Any = None
        early_end: M.End | None = None
        meta: dict[str, Any] = {}
        try:
            local = not conn.remote
            if self._partial_tail and not local:
                raise ValueError(f"partial_tail=True needs a local (ipc://) broker, got {conn.address}")
            token = os.urandom(8)
            wire_sampler = None if local else self._request.sampler
            if not local and self._prefetch:
                wire_sampler = tuple(self._pause() for _ in range(self._prefetch))
            conn.send(self._request._replace(sampler=wire_sampler, cut="local" if local else "broker",
                                             wait=self._wait > 0, token=token if local else None))  # fmt: skip
            reply = conn.recv(self._wait if self._wait > 0 else self._timeout)
            if reply is None:
                if self._wait > 0:
                    raise StreamNotFoundError(
                        f"stream {self.name!r} did not appear within wait={self._wait:g} s ({conn.where})"
                    )
                raise BrokerGoneError(f"no answer to SUBSCRIBE from the {conn.where} within {self._timeout} s")
            if isinstance(reply, M.Error | M.End):  # (END: the stream ended while we waited to start)
                raise error_for(reply, self._where)
            if not isinstance(reply, M.Subscribed):
                raise unexpected(reply, "SUBSCRIBED", self._where)
            if local and not reply.notice_endpoint:
                raise ProtocolError(f"SUBSCRIBED for a local subscriber names no notice endpoint ({self._where})")
            seg, seg_bytes, dtype, channels, rate, self.size, self.start_index, names = reply[:8]
            meta = reply.meta or {}
            mm = None if conn.remote else attach(seg, seg_bytes)
            if local:
                self._sid, self._header, self._slab_bytes = reply.stream_id, reply.header_bytes, reply.slab_bytes
                self._nslabs, self._sample_bytes, endpoint = reply.nslabs, reply.sample_bytes, reply.notice_endpoint
                lock_fd = open_locks(seg)
                notices = self._join(conn, endpoint, P.token_topic(token))
                # Every notice from now on reaches us: the broker starts us at its head (or at 0 for
                # a subscription made before the stream existed).
                # Our liveness mark, which the broker can test in any PID namespace; gone with our files.
                slot = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
                hold(lock_fd, CLIENT_BASE + slot)
                conn.send(M.Attach(slot))
                while True:
                    reply = conn.recv(self._timeout)
                    if reply is None:
                        raise BrokerGoneError(f"no answer to ATTACH from the {conn.where} within {self._timeout} s")
                    if isinstance(reply, M.End) and reply.code in (P.END_CLOSED, P.END_PUBLISHER_GONE):
                        # A short stream may end before our ATTACH is answered: its notices are with us.
                        early_end = reply
                        continue
                    break
                if isinstance(reply, M.Error | M.End):
                    raise error_for(reply, self._where)
                if not isinstance(reply, M.Attached):
                    raise unexpected(reply, "ATTACHED", self._where)
                self.start_index = reply.start
        except BaseException:
            if notices is not None:
                notices.close(linger=0)
            if lock_fd >= 0:
                os.close(lock_fd)  # else it would keep the (soon unlinked) segment's memory alive
            if mm is not None:
                with contextlib.suppress(BufferError):
                    mm.close()
            conn.close()
            raise
        self._conn = conn
        self._mm = mm  # an older mapping lives on in the views taken from it
        self.address = conn.address
        self.epoch = conn.epoch
        self.info = StreamInfo(self.name, np.dtype(dtype), channels, rate, tuple(names),
                               tuple(meta.get("channel_types") or ()), tuple(meta.get("channel_units") or ()),
                               meta.get("source_id") or "", bool(meta.get("timestamps")))  # fmt: skip
        self._dtype = self.info.dtype
        self._channels = channels
        self._local = local
        if local:
            self._notices = notices
            self._leases = _Leases(lock_fd, mm)
            self._topic = P.stream_topic(self.name)
            sampler = self._checked_pause if self._sampler is not None else None
            self._chunker = Rechunker(self.size, self.clip, rate, sampler)
            self._ready: deque[tuple[int, int, int, float, int, int, int]] = deque()
            self._frames: deque[list[Any]] = deque()  # unread frames: notices not yet cut
            self._seq = 0
            self._dropped = 0
            self._nseq = -1  # the next notice seq expected; -1: none seen yet
            self._noticed = self.start_index  # the stream index just past the last sample a notice announced
            self._last_notice = time.monotonic()
            self._noticed_any = False
            self._cursor = self.start_index
            self._cur_slab = -1
            self._acked = (-1, -1, -1, -1)  # (slab, dropped, held, delivered) at the last ACK
            self._acked_at = 0.0
            self._stream_end: M.End | None = early_end  # its head: the samples in the stream
            self._end_seen = time.monotonic()
            self._last = (-1, 0, 0)  # (slab, gen, byte offset just past the last frame cut)
            self._rcvtimeo = -1

    def _join(self, conn: Connection, endpoint: str, token: bytes) -> Any:
        """Connect a SUB socket to the publisher's notice socket; wait until it proves it reaches us."""
        sock = _context().socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # A paused subscriber's backlog is bounded: past it the publisher's socket drops notices for
            # it alone, and it sees the gap (a discontinuity) when it comes back.
            sock.setsockopt(zmq.RCVHWM, P.NOTICE_BACKLOG)
            sock.setsockopt(zmq.RECONNECT_IVL, 10)  # the publisher may bind a moment after we connect
            sock.connect(endpoint)
            sock.setsockopt(zmq.SUBSCRIBE, P.stream_topic(self.name))
            sock.setsockopt(zmq.SUBSCRIBE, token)
            deadline = time.monotonic() + self._timeout
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(conn.sock, zmq.POLLIN)  # the stream may end, or the broker go, meanwhile
            while True:
                left = deadline - time.monotonic()
                events = dict(poller.poll(int(left * 1000) + 1)) if left > 0 else {}
                if not events:
                    raise BrokerGoneError(
                        f"the publisher of stream {self.name!r} did not answer on its notice socket "
                        f"{endpoint} within {self._timeout} s"
                    )
                if conn.sock in events:
                    msg = conn.recv(0)
                    if isinstance(msg, M.End | M.Error):
                        raise error_for(msg, self._where)
                if sock in events and sock.recv().startswith(token):
                    break
            sock.setsockopt(zmq.UNSUBSCRIBE, token)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _sockets(self) -> tuple[Any, ...]:
        """The ZeroMQ sockets whose input wakes this subscriber (for event loops)."""
        conn = self._conn
        if self._local:
            return (self._notices, conn.sock, conn._monitor)
        return (conn.sock, conn._monitor)

    def _checked_pause(self) -> float:
        # Runs inside the rechunker: whatever the user's sampler does, the rechunker gets a
        # valid pause (0), and the error is raised from recv() once, with no chunk lost.
        try:
            value = float(self._sampler())  # type: ignore[misc]
        except Exception as exc:
            self._sampler_error = exc
            return 0.0
        if not 0 <= value <= P.MAX_SAMPLER_SECONDS:
            self._sampler_error = ValueError(
                f"sampler must return seconds in 0..{P.MAX_SAMPLER_SECONDS:g}, got {value!r} ({self._where})"
            )
            return 0.0
        return value

    def _gone(self, exc: BrokerGoneError) -> None:
        """The broker went away: the end, or (``reconnect=``) subscribe again, here or by our caller."""
        if not self._reconnect:
            self._end = exc
            raise exc
        if not self._auto_reconnect:
            raise exc  # aio.Subscriber resubscribes in a thread: its event loop never waits
        self._resubscribe(exc)

    def _resubscribe(self, cause: BrokerGoneError) -> None:
        """After a broker restart: subscribe again with the same settings (``reconnect=``)."""
        deadline = time.monotonic() + self._reconnect
        old = self._conn
        old.close(bye=False)
        dropped = self.statistics().dropped
        if self._local:
            for item in self._ready:
                self._leases.unclaim(item[5])
            self._ready.clear()
            self._notices.close(linger=0)
            self._leases.close()  # the old segment is gone with its broker; views keep their mapping
        # Releases of chunks from the old broker mean nothing to the new one.
        self._dead = deque()
        self._refs = {}
        while True:
            try:
                self._connect(old.address)
            except (BrokerGoneError, StreamNotFoundError):
                if time.monotonic() >= deadline:
                    raise cause from None
                time.sleep(0.05)  # back off between attempts to reach the new broker
                continue
            self._jumped = True
            self._dropped_before = dropped
            self._epoch_received, self._last_seq, self._cut = 0, -1, 0
            return

    def _pause(self) -> float:
        value = float(self._sampler())  # type: ignore[misc]
        if not value >= 0:
            raise ValueError(f"sampler must return seconds >= 0, got {value!r} ({self._where})")
        return value

    # ------------------------------------------------------------ receiving

    def recv(self, timeout: float | None = None) -> Chunk:
        """Wait for the next chunk.

        Raises
        ------
        EndOfStream
            The publisher closed the stream and every complete chunk was received
            (:class:`PublisherGoneError` if it died instead).
        BrokerGoneError
            The broker died or shut down.
        TimeoutError
            No chunk within ``timeout`` seconds.
        """
        chunk = self._recv(timeout)
        if chunk is None:
            raise TimeoutError(f"no chunk within {timeout} s ({self._where})")
        return chunk

    def recv_nowait(self) -> Chunk:
        """Return a chunk that is ready now, else raise :class:`WouldBlock`."""
        chunk = self._recv(0)
        if chunk is None:
            raise WouldBlock(f"no chunk ready ({self._where})")
        return chunk

    def _recv(self, timeout: float | None) -> Chunk | None:
        if self._closed:
            raise ClosedError(f"{self._where} is closed")
        if os.getpid() != self._pid:
            raise ClosedError(
                f"{self._where} was created in process {self._pid}; its ZeroMQ sockets do not survive fork(): "
                "create the Subscriber in the process that uses it"
            )
        self._owner_thread = threading.get_ident()  # the thread that receives is the one that sends
        if self._local:
            while True:
                try:
                    return self._recv_local(timeout)
                except BrokerGoneError as exc:
                    self._gone(exc)
        if len(self._dead) >= self._release_batch:
            self._flush_releases()
        if self._end is not None:
            self._flush_releases()
            raise self._end
        while True:
            try:
                # Releases go out in one message when this subscriber is behind (notices
                # waiting), and at the latest before it waits for the next notice.
                msg = self._conn.recv(timeout, self._flush_releases)
            except BrokerGoneError as exc:
                self._gone(exc)
                continue
            if msg is None:
                return None
            if isinstance(msg, M.Chunk):
                return self._chunk(msg)
            if isinstance(msg, M.Synced):  # the answer to a keep-alive
                continue
            if isinstance(msg, M.End | M.Error):
                exc2 = error_for(msg, self._where)
                if isinstance(msg, M.End) and msg.code == P.END_BROKER_SHUTDOWN and self._reconnect:
                    self._gone(exc2)  # type: ignore[arg-type]
                    continue
                if isinstance(msg, M.End):
                    self._end = exc2  # type: ignore[assignment]
                    self._cut = msg.seq
                raise exc2
            raise unexpected(msg, "CHUNK or END", self._where)

    # ------------------------------------------------------- local cutting

    def _recv_local(self, timeout: float | None) -> Chunk | None:
        if self._leases.dead:
            self._leases.reap()
        if self._end is not None:
            raise self._end
        deadline = None if timeout is None else time.monotonic() + timeout
        notices = self._notices
        conn = self._conn
        while True:
            if self._sampler_error is not None:
                exc, self._sampler_error = self._sampler_error, None
                raise exc
            if self._ready:
                return self._hand_out()
            if self._frames:
                self._step()
                continue
            try:
                raw = notices.recv(_NOBLOCK)
            except zmq.Again:
                pass
            else:
                self._on_notice(raw)
                continue
            end = self._stream_end
            if end is not None and self._cursor < end.head:
                # Notices already with us come first: only when none came for _END_GRACE (since the end
                # was known and since the last one) is the rest lost.
                if time.monotonic() - max(self._end_seen, self._last_notice) > _END_GRACE:
                    if conn.poll_gone():
                        raise BrokerGoneError(f"the {conn.where} went away ({self._where})")
                    if self._partial_tail and self._cut_tail():
                        continue
                    start = self._cursor
                    if end.code == P.END_CLOSED:
                        self._lost(start, end.head)
                    else:  # the publisher died with notices unsent: its error names the range
                        self._cursor = end.head
                        self._stream_end = end._replace(
                            message=f"{end.message}; samples {start}..{end.head} never reached this subscriber")
                    continue
            elif end is not None:
                # Everything the stream held is cut.
                if conn.poll_gone():
                    raise BrokerGoneError(f"the {conn.where} went away ({self._where})")
                if self._partial_tail and self._cut_tail():
                    continue
                self._send_ack(force=True)
                self._end = error_for(end, self._where)  # type: ignore[assignment]
                raise self._end  # type: ignore[misc]
            if conn.sock.getsockopt(_EVENTS) & _POLLIN:
                self._on_direct(conn.recv(0))
                continue
            if conn.gone or conn.poll_gone():
                raise BrokerGoneError(f"the {conn.where} went away ({self._where})")
            # About to wait: give back every slab no chunk of ours is in (a paused subscriber must
            # not hold any), tell the broker where we are.
            self._leases.unlock_idle(-1, self._cur_slab)
            self._send_ack()
            if deadline is None:
                wait = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait = max(1, int(left * 1000))
            # Wait in the notice socket itself (what a plain SUB does: the lowest latency), looking
            # at our own connection (END, eviction, the broker's death) at least every _LOOK seconds.
            wait = _LOOK_MS if wait < 0 else min(wait, _LOOK_MS)
            if wait != self._rcvtimeo:
                notices.setsockopt(zmq.RCVTIMEO, wait)
                self._rcvtimeo = wait
            try:
                raw = notices.recv()
            except zmq.Again:
                continue
            self._on_notice(raw)

    def _on_direct(self, msg: M.Message | None) -> None:
        """A message from the broker on our own connection: an END (evicted, shutdown) or an ERROR."""
        if msg is None or isinstance(msg, M.Synced):
            return
        if isinstance(msg, M.End) and msg.code in (P.END_CLOSED, P.END_PUBLISHER_GONE):
            # The stream ended: finish what its notices hold first (they may still be on their way).
            if self._stream_end is None:
                self._stream_end = msg
                self._end_seen = time.monotonic()
            return
        if isinstance(msg, M.End | M.Error):
            exc = error_for(msg, self._where)
            if isinstance(msg, M.End) and msg.code == P.END_BROKER_SHUTDOWN:
                raise exc  # BrokerGoneError: reconnect= may take over
            if isinstance(msg, M.End):
                self._end = exc  # type: ignore[assignment]
            raise exc
        raise unexpected(msg, "END or ERROR", self._where)

    def _on_notice(self, raw: bytes) -> None:
        topic = self._topic
        if not raw.startswith(topic):
            return  # a JOINED of another subscriber's token
        raw_msg = P.unpack(raw[len(topic) :])
        if len(raw_msg) < 3 or raw_msg[1] != self._sid:
            return  # an earlier stream of the same name
        # One per frame or batch: the field count is checked, the values by the cutting that uses them.
        msg = M.decode(raw_msg, strict=False, check=False)
        seq = raw_msg[2]
        if seq < self._nseq:
            return  # duplicate or stale
        # Notices lost on the way (this subscriber's queue overflowed): never cut across the hole.
        flags = P.FLAG_DISCONTINUITY if 0 <= self._nseq < seq else 0
        self._nseq = seq + 1
        self._last_notice = time.monotonic()
        if isinstance(msg, M.NoticeEnd):
            self._stream_end = M.End(msg.code, msg.message, 0, msg.head)
            self._end_seen = time.monotonic()
            return
        if not isinstance(msg, M.Notice):
            raise unexpected(msg, "NOTICE or NOTICE_END on the notice socket", self._where)
        _, _, index, slab, gen, offset, n, t0, jump, floor = msg
        ns: tuple[int, ...] = (n,) if type(n) is int else n  # type: ignore[assignment]
        t0s = (t0,) if type(n) is int else t0
        if index < self._noticed:
            return  # written before this subscription started (the notice socket was already connected)
        flags |= jump
        if index > self._noticed and self._noticed_any:
            # The samples of the lost notices: named by _lost (a block subscriber raises).
            self._frames.append([self._noticed, -1, index])
            flags |= P.FLAG_DISCONTINUITY
        self._frames.append([index, slab, gen, offset, ns, t0s, 0, flags, floor])
        self._noticed = index + sum(ns)
        # (A gap before the first notice is no loss: a frame noticed just before our notice socket
        # joined may reach the broker after our ATTACH; we start at the first frame we are told of.)
        self._noticed_any = True

    def _step(self) -> None:
        """Cut the chunks of the next unread frame (one at a time: a drop subscriber's max_inflight counts
        the chunks it holds, not those a long notice batch would cut at once)."""
        entry = self._frames[0]
        if entry[1] < 0:
            self._frames.popleft()
            self._lost(entry[0], entry[2])
            return
        index, slab, gen, offset, ns, t0s, i, flags, floor = entry
        chunker = self._chunker
        if i == 0:
            if flags & P.FLAG_DISCONTINUITY:
                chunker.start = None
                self._jumped = True
            start = chunker.start
            if start is not None and start < floor:
                # The slab's carry does not reach back that far; the broker makes this impossible
                # for every subscription it knew of at the slab change.
                log.warning("%s: samples %d..%d not contiguous; skipped", self._where, start, floor)
                if chunker.rate:
                    chunker.t0 += (floor - start) / chunker.rate
                chunker.start = floor
                self._jumped = True
            if slab != self._cur_slab:
                self._cur_slab = slab
                self._unlock_idle()
        n = ns[i]
        chunks = chunker.feed(index, n, t0s[i])
        if chunker.jumped:  # the clock stepped back (no rate): the sampler's schedule restarted
            chunker.jumped = False
            self._jumped = True
        if chunks:
            sb = self._sample_bytes
            for cstart, length, ct0 in chunks:
                self._cut_chunk(cstart, length, ct0, offset - (index - cstart) * sb, slab, gen)
        self._cursor = index + n
        self._last = (slab, gen, offset + n * self._sample_bytes)
        if i + 1 < len(ns):
            entry[0] = index + n
            entry[3] = offset + n * self._sample_bytes
            entry[6] = i + 1
            return
        self._frames.popleft()
        if self._acked[0] != slab:
            self._send_ack()  # the broker may free the slab we left

    def _lost(self, start: int, stop: int) -> None:
        """Samples ``start`` to ``stop`` will never come (their notices were lost): a ``block`` subscriber says
        so with :class:`SamplesLostError`, a ``drop`` subscriber counts and logs them."""
        self._cursor = max(self._cursor, stop)
        self._jumped = True
        what = f"samples {start}..{stop} ({stop - start} samples) of stream {self.name!r} were lost"
        if self.policy == "block":
            raise SamplesLostError(f"{what} before this subscriber read them: their notices never reached it "
                                   f"(its notice queue overflowed, or the publisher went away first) "
                                   f"({self._where})", start, stop)  # fmt: skip
        self._dropped += -(-(stop - start) // self.size)
        log.warning("%s: %s (notices lost); the next chunk is flagged as a discontinuity", self._where, what)

    def _cut_tail(self) -> bool:
        """At the end of the stream: the unfinished chunk, as one partial chunk (once)."""
        self._partial_tail = False
        chunker = self._chunker
        start = chunker.start
        if start is None or start >= self._cursor:
            return False
        slab, gen, end = self._last
        n = self._cursor - start
        chunker.start = None
        self._cut_chunk(start, n, chunker.t0, end - n * self._sample_bytes, slab, gen, P.FLAG_PARTIAL)
        return True

    def _cut_chunk(
        self, start: int, length: int, t0: float, offset: int, slab: int, gen: int, flags: int = 0
    ) -> None:
        seq = self._seq
        self._seq = seq + 1
        leases = self._leases
        if self.policy == "drop" and len(self._ready) + leases.handed - leases.released >= self._max_inflight:
            self._dropped += 1
            return
        if not self._leases.claim(slab, gen):
            # The publisher already reuses this slab: only a drop subscriber that fell a pool behind.
            self._dropped += 1
            return
        if self._jumped:
            self._jumped = False
            flags |= P.FLAG_DISCONTINUITY
        self._ready.append((seq, start, length, t0, offset, slab, flags))

    def _times(self, chunk: Chunk) -> np.ndarray[Any, Any]:
        info = self.info
        n = len(chunk)
        if info.timestamps and chunk._times_at is not None:
            mm, at = chunk._times_at
            # A copy (8 bytes a sample): it stays right after the chunk is released and its slab reused.
            times = np.frombuffer(mm, dtype="<f8", count=n, offset=at).copy()
            times.flags.writeable = False
            return times
        step = 1.0 / info.rate if info.rate else 0.0
        return chunk.t0 + np.arange(n, dtype=np.float64) * step

    def _hand_out(self) -> Chunk:
        seq, index, n, t0, offset, slab, flags = self._ready.popleft()
        channels = self._channels
        base = np.frombuffer(self._mm, dtype=self._dtype, count=n * channels, offset=offset)
        # Every view derived from `data` keeps `base` alive, so this fires when the last view dies.
        leases = self._leases
        leases.slab_of[seq] = slab
        leases.refs[seq] = weakref.ref(base, functools.partial(leases.on_dead, seq))
        leases.handed += 1
        self._received += 1
        self._last_seq = seq
        chunk = Chunk(self, base.reshape(n, channels) if channels > 1 else base, seq, index, t0, flags)
        if self.info.timestamps:
            chunk._times_at = (self._mm, time_at(offset, self._header, self._slab_bytes, self._nslabs,
                                                 self._sample_bytes))  # fmt: skip
        return chunk

    def _unlock_idle(self) -> None:
        self._leases.unlock_idle(self._cur_slab)

    def _send_ack(self, force: bool = False) -> None:
        """Tell the broker how far we have read: at once when we left a slab or gave one back, otherwise
        (counters for ``slabcast status``) at most every ``_ACK_INTERVAL`` seconds."""
        state = (self._cur_slab, self._dropped, self._leases.handed - self._leases.released, self._received)
        acked = self._acked
        if self._conn.closed:
            return
        urgent = force or self._leases.unlocked or state[0] != acked[0]
        if not urgent and (state == acked or time.monotonic() - self._acked_at < _ACK_INTERVAL):
            return
        self._acked = state
        self._acked_at = time.monotonic()
        self._leases.unlocked = False
        with contextlib.suppress(BrokerGoneError):
            self._conn.send(M.Ack(self._cursor, self._received, self._dropped, state[2]))

    def _chunk(self, msg: M.Chunk) -> Chunk:
        seq, index, n, t0, offset, flags = msg
        channels = self._channels
        if flags & P.FLAG_INLINE:
            frame = self._conn.payload
            if frame is None or len(frame) != n * channels * self._dtype.itemsize:
                got = "none" if frame is None else f"{len(frame)} bytes"
                raise ProtocolError(f"CHUNK seq={seq} announced {n} samples inline, got {got} ({self._where})")
            base = np.frombuffer(frame.buffer, dtype=self._dtype)
            base.flags.writeable = False  # read-only, as a local chunk is: the same code works with both
        else:
            base = np.frombuffer(self._mm, dtype=self._dtype, count=n * channels, offset=offset)
        # Every view derived from `data` keeps `base` alive, so this fires when the last view dies.
        dead = self._dead
        self._refs[seq] = weakref.ref(base, functools.partial(_on_dead, dead, seq))
        self._received += 1
        self._epoch_received += 1
        self._last_seq = seq
        if self._jumped:
            self._jumped = False
            flags |= P.FLAG_DISCONTINUITY
        return Chunk(self, base.reshape(n, channels) if channels > 1 else base, seq, index, t0, flags)

    def _on_release(self) -> None:
        if self._local:
            leases = self._leases
            if leases.dead:
                leases.reap()  # the broker hears of freed slabs with our next ACK (and retries them itself)
            return
        if threading.get_ident() != self._owner_thread:
            return  # ZeroMQ sockets are not thread-safe: the thread that receives sends the releases
        # A chunk was given back: send now, unless more notices are already waiting, in
        # which case the next recv sends this release together with the next ones.
        dead = self._dead
        if dead and (len(dead) >= self._release_batch or self._conn.closed or not self._conn.has_input()):
            self._flush_releases()

    def _flush_releases(self) -> None:
        dead = self._dead
        if not dead or self._conn.closed:
            return
        seqs = []
        while dead:
            seq = dead.popleft()
            self._refs.pop(seq, None)
            seqs.append(seq)
        self._released += len(seqs)
        pauses = [self._pause() for _ in seqs] if self._prefetch else []
        with contextlib.suppress(BrokerGoneError):
            self._conn.send(M.Release(tuple(seqs), tuple(pauses)))

    def __iter__(self) -> Iterator[Chunk]:
        """Yield chunks until the publisher closes the stream."""
        while True:
            try:
                chunk = self.recv()
            except EndOfStream as exc:
                if type(exc) is EndOfStream:
                    return
                raise
            yield chunk

    def statistics(self) -> SubscriberStatistics:
        """Return this subscriber's counters (and bring the broker's copy, shown by ``slabcast status``, up to date).

        ``dropped`` counts the chunks cut from every frame notice read so far
        that were not handed out: the newest count once :meth:`recv` has run.
        """
        if self._local:
            leases = self._leases
            if leases.dead:
                leases.reap()
            if not self._closed:
                self._send_ack(force=True)
            return SubscriberStatistics(
                received=self._received,
                released=leases.released,
                held=self._received - leases.released,
                dropped=self._dropped_before + self._dropped,
                last_seq=self._last_seq,
            )
        return SubscriberStatistics(
            received=self._received,
            released=self._released,
            held=self._received - self._released,
            dropped=self._dropped_before + max(self._last_seq + 1, self._cut) - self._epoch_received,
            last_seq=self._last_seq,
        )

    # -------------------------------------------------------------- closing

    def close(self) -> None:
        """Unsubscribe and release every chunk no longer viewed (idempotent).

        Chunks whose views are still alive stay leased (their memory untouched)
        until this process exits.
        """
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:  # inherited through fork(): the parent's to close, not ours
            return
        conn = self._conn
        if self._local:
            self._close_local()
            return
        if conn.closed:
            return
        # Notices already queued were never seen by the caller: give them straight back.
        with contextlib.suppress(Exception):
            while (msg := conn.recv(0)) is not None:
                if isinstance(msg, M.Chunk):
                    self._dead.append(msg.seq)
        self._flush_releases()
        if self._refs and not conn.gone:
            # Views are alive: the broker must not reuse their memory, so the lease
            # outlives this object and ends with the process (the broker notices).
            with contextlib.suppress(BrokerGoneError):
                conn.send(M.Unsubscribe())
            _CONNECTIONS_KEPT.append(conn)
        else:
            conn.close()

    def _close_local(self) -> None:
        leases = self._leases
        for item in self._ready:  # cut but never handed out
            leases.unclaim(item[5])
        self._ready.clear()
        self._notices.close(linger=0)
        # BYE first: closing the lease file gives up our liveness lock too, and a broker that saw that
        # before our BYE would forget us as dead and leave BYE unanswered (a 2 s close).  The broker
        # forgets us at once; a chunk still viewed keeps its slab through its lease lock, which goes
        # when the last view does (whether or not this object still exists).
        self._conn.close()
        leases.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<Subscriber {self.name!r} size={getattr(self, 'size', '?')} clip={self.clip} policy={self.policy}>"
