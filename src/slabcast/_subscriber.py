"""The subscriber: receives chunk notices and hands out zero-copy, read-only numpy views of shared memory."""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import _protocol as P
from ._client import Connection, error_for
from ._exceptions import BrokerGoneError, ClosedError, EndOfStream, ProtocolError, StreamNotFoundError, WouldBlock
from ._info import StreamInfo, SubscriberStatistics
from ._rechunk import check_sampler, check_size
from ._shm import attach

__all__ = ["Chunk", "Subscriber"]

_CONNECTIONS_KEPT: list[Connection] = []  # see Subscriber.close


def _on_dead(dead: deque[int], seq: int, _ref: object) -> None:
    # Runs when the last view of a chunk dies, in whatever thread dropped it: only queue.
    dead.append(seq)


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

    __slots__ = ("_data", "_sub", "flags", "index", "seq", "t0")

    def __init__(self, sub: Subscriber, data: np.ndarray[Any, Any], seq: int, index: int, t0: float, flags: int):
        self._sub = sub
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
    wait : float
        Seconds to wait for the stream to appear when it does not exist yet
        (a worker started before its source); 0 raises at once.
    label : str, optional
        This subscriber's name in logs and ``slabcast status``.
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
        wait: float = 0.0,
        label: str | None = None,
    ) -> None:
        P.check_stream_name(stream)
        if (size is None) == (seconds is None):
            raise TypeError(f"give exactly one of size= (samples) and seconds=, got size={size!r} seconds={seconds!r}")
        if size is not None:
            size = check_size(size)
        elif isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            raise ValueError(f"seconds must be a positive number, got {seconds!r}")
        if policy not in P.POLICIES:
            raise ValueError(f"policy must be 'block' or 'drop', got {policy!r}")
        max_inflight = check_size(max_inflight, "max_inflight")
        self._release_batch = max(1, max_inflight // 2)
        self._sampler = check_sampler(sampler)
        self._prefetch = 0
        wire_sampler: Any = None
        if self._sampler is not None:
            if callable(sampler):
                self._prefetch = max_inflight + 4
                wire_sampler = [self._pause() for _ in range(self._prefetch)]
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
        self._request = [P.SUBSCRIBE, stream, size, seconds, self.clip, policy, max_inflight, wire_sampler]
        self._curve = curve
        self._timeout = timeout
        self._label = label or f"subscriber:{stream}"
        deadline = time.monotonic() + wait
        while True:
            try:
                self._connect(address)
                break
            except StreamNotFoundError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)  # poll for the stream; its publisher may still be starting

    def _connect(self, address: str | None) -> None:
        conn = Connection(address, "sub", self._label, curve=self._curve)
        try:
            conn.send(self._request)
            reply = conn.recv(self._timeout)
            if reply is None:
                raise BrokerGoneError(f"no answer to SUBSCRIBE from the {conn.where} within {self._timeout} s")
            if reply[0] == P.ERROR:
                raise error_for(reply, self._where)
            if reply[0] != P.SUBSCRIBED:
                raise ProtocolError(f"expected SUBSCRIBED, got {P.NAMES.get(reply[0], reply[0])}")
            P.need(reply, 8)  # fields appended by a later version are ignored
            _, seg, seg_bytes, dtype, channels, rate, self.size, self.start_index, names = reply[:9]
            mm = None if conn.remote else attach(seg, seg_bytes)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._mm = mm  # an older mapping lives on in the views taken from it
        self.address = conn.address
        self.epoch = conn.epoch
        self.info = StreamInfo(self.name, np.dtype(dtype), channels, rate, tuple(names))
        self._dtype = self.info.dtype
        self._channels = channels

    def _resubscribe(self, cause: BrokerGoneError) -> None:
        """After a broker restart: subscribe again with the same settings (``reconnect=``)."""
        deadline = time.monotonic() + self._reconnect
        old = self._conn
        old.close(bye=False)
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
            self._dropped_before = self.statistics().dropped
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
                if not self._reconnect:
                    self._end = exc
                    raise
                self._resubscribe(exc)
                continue
            if msg is None:
                return None
            kind = msg[0]
            if kind == P.CHUNK:
                return self._chunk(msg)
            if kind == P.SYNCED:  # the answer to a keep-alive
                continue
            if kind in (P.END, P.ERROR):
                exc2 = error_for(msg, self._where)
                if kind == P.END and msg[1] == P.END_BROKER_SHUTDOWN and self._reconnect:
                    self._resubscribe(exc2)  # type: ignore[arg-type]
                    continue
                if kind == P.END:
                    self._end = exc2  # type: ignore[assignment]
                    if len(msg) > 3 and type(msg[3]) is int:
                        self._cut = msg[3]
                raise exc2
            raise ProtocolError(f"unexpected {P.NAMES.get(kind, kind)} from the broker ({self._where})")

    def _chunk(self, msg: tuple[Any, ...]) -> Chunk:
        P.need(msg, 6)
        _, seq, index, n, t0, offset, flags = msg[:7]
        channels = self._channels
        if flags & P.FLAG_INLINE:
            frame = self._conn.payload
            if frame is None or len(frame) != n * channels * self._dtype.itemsize:
                got = "none" if frame is None else f"{len(frame)} bytes"
                raise ProtocolError(f"CHUNK seq={seq} announced {n} samples inline, got {got} ({self._where})")
            base = np.frombuffer(frame.buffer, dtype=self._dtype)
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
            self._conn.send([P.RELEASE, seqs, pauses])

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
        """Return this subscriber's counters."""
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
        conn = self._conn
        if conn.closed:
            return
        # Notices already queued were never seen by the caller: give them straight back.
        with contextlib.suppress(Exception):
            while (msg := conn.recv(0)) is not None:
                if msg[0] == P.CHUNK:
                    self._dead.append(msg[1])
        self._flush_releases()
        if self._refs and not conn.gone:
            # Views are alive: the broker must not reuse their memory, so the lease
            # outlives this object and ends with the process (the broker notices).
            with contextlib.suppress(BrokerGoneError):
                conn.send([P.UNSUBSCRIBE])
            _CONNECTIONS_KEPT.append(conn)
        else:
            conn.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<Subscriber {self.name!r} size={getattr(self, 'size', '?')} clip={self.clip} policy={self.policy}>"
