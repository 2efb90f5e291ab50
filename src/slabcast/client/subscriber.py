"""The subscriber: receives a stream in chunks of its own size, zero-copy, read-only views.

How chunks arrive depends on the broker's address, and each way is one transport behind
the seam of :mod:`._transport`: :mod:`._local` for ``ipc://`` (this process cuts its own
chunks from the publisher's frame notices, under kernel leases of the slabs) and
:mod:`._remote` for ``tcp://`` (chunks cut by the broker, by value).  :class:`Subscriber`
checks the settings, subscribes (again, after a broker restart, with ``reconnect=``),
iterates, counts across brokers and closes; its receiver does the rest.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._exceptions import (
    AccessDeniedError,
    BrokerGoneError,
    ClosedError,
    EndOfStream,
    EvictedError,
    StreamNotFoundError,
    WouldBlock,
)
from .._info import StreamInfo, SubscriberStatistics
from ..client.connection import FORKS, Connection, error_for, unexpected
from ..core.shm import attach
from ..wire import messages as M
from ..wire import protocol as P
from ._attach import open_local
from ._local import _ACK_INTERVAL as _ACK_INTERVAL  # the C client's test compares these with its own
from ._local import _LOOK as _LOOK
from ._remote import RemoteReceiver, pauses
from ._subargs import recv_timeout, subscribe_args
from ._transport import Receiver
from .chunk import Chunk

__all__ = ["Chunk", "Subscriber"]


def _streams(address: str) -> list[str] | None:
    """The streams the (local) broker at ``address`` serves now, not ended (for an error's words: None if
    unsure)."""
    from .control import broker_status

    try:
        return sorted(s["name"] for s in broker_status(address, timeout=1.0)["streams"] if not s.get("ended"))
    except Exception:
        return None


_HELD = 1  # the token of the SYNC after a SUBSCRIBE that waits: its SYNCED says the broker holds it (ready=)


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
    ready : callable, optional
        Called once, with no argument, in this thread, as soon as the broker holds
        this subscription: for a stream not there yet, while the constructor still
        waits for it, so that a stream opened after the call is received from
        index 0; for a stream already there, before the constructor returns.  The
        place for a worker to tell whoever starts the publisher that it may
        (``ready=lambda: queue.put("ready")``); telling it before the constructor
        races with the subscription on its way.  What it raises comes out of the
        constructor (the subscription closed).
    label : str, optional
        This subscriber's name in logs and ``slabcast status``.
    partial_tail : bool
        When the stream ends, hand out the samples accumulated towards an
        unfinished chunk as one last, shorter chunk with ``partial`` set (a
        recorder loses nothing); likewise before a frame flagged as a
        discontinuity (a source restarted), whose chunk follows it with
        ``discontinuity`` set (a ``drop`` subscriber's may be dropped, and
        counted, as any of its chunks).  Local (``ipc://``) subscribers only.
    history : float, optional
        Start this many seconds before the newest sample, from what the stream's
        pool still holds (a stream without a rate: by the samples' times, the
        per-sample times if it keeps them, else the frames' t0): ``start_index``
        is where it starts, and the samples come exactly as a subscriber that was
        there would have had them.  When the pool holds less, it starts at its
        oldest sample and the first chunk has ``discontinuity`` set.  Size the
        pool with the publisher's ``history=``.  Local (``ipc://``) subscribers only.
    wake : {"doorbell", "futex", "busy"}
        How this subscriber waits for frames when it has read everything (a local one
        reads frame descriptors from shared memory; this only says how it sleeps):
        ``"doorbell"`` (default): in a blocking ``recv``, the ring's futex word, which the
        publisher wakes only while this subscriber sleeps there; under an event loop
        (``recv_nowait``, then a poll of :meth:`pollables`), a ZeroMQ notice the publisher
        sends only while it sleeps.  ``"futex"``: always the futex word, woken by the
        publisher's ``FUTEX_WAKE`` after every write (not pollable); ``"busy"`` spins on the
        position and never sleeps (the lowest latency, a whole core).  Remote (``tcp://``)
        subscribers wait for the broker's messages whatever this says.
    spin : float
        Seconds to spin on the position before sleeping (``"doorbell"`` and ``"futex"``;
        0 to 0.01): a frame within that time is taken without a wake-up, at the cost of
        that much CPU per wait.
    reconnect : bool or float or None
        When the broker goes away, wait up to this many seconds (``True``: 60; ``False``, 0 or None: not)
        for a broker at the same address with this stream and subscribe again
        with the same settings.  The first chunk after that has
        ``discontinuity`` set; ``seq`` and ``index`` restart with the new broker.

    Attributes
    ----------
    auto_resubscribe : bool
        With ``reconnect=``: ``True`` (default), :meth:`recv` waits for the next
        broker itself; ``False``, it raises :class:`BrokerGoneError` and the caller
        calls :meth:`resubscribe` (an event loop does, in a worker thread).

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
        reconnect: bool | float | None = False,
        wait: float | None = None,
        ready: Callable[[], Any] | None = None,
        label: str | None = None,
        partial_tail: bool = False,
        history: float | None = None,
        wake: str = "doorbell",
        spin: float = 0.0,
    ) -> None:
        P.check_stream_name(stream)
        args = subscribe_args(size, seconds, sampler, policy, max_inflight, timeout, reconnect, wait, history, wake,
                              spin)  # fmt: skip
        self._wake = wake
        self._spin = args.spin
        max_inflight = args.max_inflight
        self._release_batch = max(1, max_inflight // 2)
        self._sampler = args.sampler
        self._prefetch = args.prefetch
        self.name = stream
        self.clip = bool(clip)
        self.policy = policy
        self._where = f"subscriber of stream {stream!r}"
        self._closed = False
        # Counters of the subscriptions to earlier brokers (reconnect=): received, released, dropped.
        self._before = (0, 0, 0)
        self._reconnect = args.reconnect
        # The settings of SUBSCRIBE (the rest is filled per connection: local or remote).
        self._request = M.Subscribe(stream, args.size, args.seconds, self.clip, policy, max_inflight,
                                    args.wire_sampler, history=args.history, wake=wake)  # fmt: skip
        self._max_inflight = max_inflight
        self._partial_tail = bool(partial_tail)
        self._curve = curve
        self._timeout = args.timeout
        self._wait = args.wait
        if ready is not None and not callable(ready):
            raise TypeError(f"ready must be a callable taking no argument or None, got {ready!r}")
        self._ready_call = ready  # (called once: not again for a subscription to a broker come back)
        self._label = label or f"subscriber:{stream}"
        self._pid = os.getpid()
        self._forks = FORKS[0]
        self.auto_resubscribe = True
        self._rx: Receiver
        self._connect(address)

    def _connect(self, address: str | None) -> None:
        conn = Connection(address, "sub", self._label, curve=self._curve)
        mm: Any = None
        try:
            local = not conn.remote
            if self._partial_tail and not local:
                raise ValueError(f"partial_tail=True needs a local (ipc://) broker, got {conn.address}")
            if self._request.history is not None and not local:
                raise ValueError(f"history= needs a local (ipc://) broker (the pool is in its shared memory), "
                                 f"got {conn.address}")  # fmt: skip
            token = os.urandom(8)
            wire_sampler = None if local else self._request.sampler
            if not local and self._prefetch:
                wire_sampler = pauses(self._sampler, self._prefetch, self._where)  # type: ignore[arg-type]
            conn.send(self._request._replace(sampler=wire_sampler, cut="local" if local else "broker",
                                             wait=self._wait > 0, token=token if local else None))  # fmt: skip
            held = self._ready_call is not None and self._wait > 0
            if held:
                # Answered once the broker handled our SUBSCRIBE: a SYNCED before SUBSCRIBED says it holds it
                # (protocol section 4).  A SYNCED after SUBSCRIBED is skipped by whoever receives it.
                conn.send(M.Sync(_HELD))
            deadline = time.monotonic() + (self._wait if self._wait > 0 else self._timeout)
            while True:
                reply = conn.recv(max(0.0, deadline - time.monotonic()))
                if not isinstance(reply, M.Synced):
                    break
                if held and reply.token == _HELD:
                    held = False
                    self._say_ready()
            if reply is None:
                names = _streams(conn.address) if local else None
                if self._wait > 0 or (names is not None and self.name in names):
                    if names is not None and self.name in names:
                        waited = self._wait if self._wait > 0 else self._timeout
                        raise StreamNotFoundError(
                            f"stream {self.name!r} is on the broker, but its publisher did not take this "
                            f"subscription within {waited:g} s (chunks longer than it carries wait for its "
                            f"CARRIED: a C publisher answers in sc_pub_write and sc_pub_service) ({conn.where})"
                        )
                    known = "" if names is None else f"; {P.streams_hint(self.name, names)}"
                    raise StreamNotFoundError(
                        f"stream {self.name!r} did not appear within wait={self._wait:g} s{known} ({conn.where})"
                    )
                raise BrokerGoneError(f"no answer to SUBSCRIBE from the {conn.where} within {self._timeout} s")
            if isinstance(reply, M.Error | M.End):  # (END: the stream ended while we waited to start)
                raise error_for(reply, self._where)
            if not isinstance(reply, M.Subscribed):
                raise unexpected(reply, "SUBSCRIBED", self._where)
            size, start, meta = reply.size, reply.start, reply.meta or {}
            info = StreamInfo(self.name, np.dtype(reply.dtype), reply.channels, reply.rate, tuple(reply.channel_names),
                              tuple(meta.get("channel_types") or ()), tuple(meta.get("channel_units") or ()),
                              meta.get("source_id") or "", bool(meta.get("timestamps")))  # fmt: skip
            rx: Receiver
            if local:
                try:
                    mm = attach(reply.segment, reply.segment_bytes)  # an older mapping lives on in views taken from it
                    rx = local_rx = open_local(
                        conn, reply, info, mm, token, self._timeout, clip=self.clip, policy=self.policy,
                        max_inflight=self._max_inflight, partial_tail=self._partial_tail, sampler=self._sampler,
                        where=self._where, wake=self._wake, spin=self._spin,
                    )  # fmt: skip
                except FileNotFoundError:
                    # The segment went before we opened it (to map, lock or write our page): the stream ended
                    # after SUBSCRIBED and the broker removed its pool; its END follows (docs/protocol.md 10.2).
                    end = conn.recv(min(self._timeout, 2.0))
                    if isinstance(end, M.Error | M.End):
                        raise error_for(end, self._where) from None
                    raise FileNotFoundError(
                        f"the segment {reply.segment!r} of stream {self.name!r} is gone and no END followed: does "
                        f"this process see the broker's /dev/shm? ({self._where})"
                    ) from None
                start = local_rx.start
            else:
                rx = RemoteReceiver(conn, info, release_batch=self._release_batch,
                                    sampler=self._sampler if self._prefetch else None,
                                    reconnect=bool(self._reconnect), where=self._where)  # fmt: skip
        except BaseException:
            if mm is not None:
                with contextlib.suppress(BufferError):
                    mm.close()
            conn.close()
            raise
        self._conn = conn
        self._rx = rx
        self._request = self._request._replace(history=None)  # a broker come back has another pool: no history
        if self._ready_call is not None:
            try:
                self._say_ready()  # (the stream was there: subscribed)
            except BaseException:
                self.close()
                raise
        self.size = size
        self.start_index = start
        self.address = conn.address
        self.epoch = conn.epoch
        self.info = info

    def _say_ready(self) -> None:
        """Call ``ready`` (once)."""
        ready, self._ready_call = self._ready_call, None
        if ready is not None:
            ready()

    # ------------------------------------------------------------ for event loops

    @property
    def reconnect(self) -> float:
        """Seconds this subscriber waits for a broker to come back (``reconnect=``); 0: it does not."""
        return self._reconnect

    def pollables(self) -> tuple[Any, ...]:
        """The ZeroMQ sockets whose input may wake this subscriber, for an event loop to watch.

        Wait until one is readable (their ``zmq.FD`` is edge-triggered: look at ``zmq.EVENTS``
        before sleeping on it), then call :meth:`recv_nowait`.  They change with
        :meth:`resubscribe`.
        """
        return self._rx.pollables()

    def keepalive(self, interval: float = 1.0) -> None:
        """Prove to a remote broker that this subscriber lives, when it sent nothing for ``interval`` seconds.

        An event loop that waits on :meth:`pollables` instead of :meth:`recv` calls this at least
        every ``interval`` (a ``tcp://`` broker drops a client silent for 10 s); a no-op for a
        local subscriber, whose liveness is a lock.
        """
        self._rx.keepalive(interval)

    def resubscribe(self, cause: BrokerGoneError) -> None:
        """After the broker went away: wait up to ``reconnect`` seconds for one at the same address, subscribe
        again with the same settings.

        :meth:`recv` does this itself unless :attr:`auto_resubscribe` is False: then it raises
        :class:`BrokerGoneError` and the caller (an event loop, in a worker thread) calls this.
        The first chunk after it has ``discontinuity`` set.

        Raises
        ------
        BrokerGoneError
            If no broker with the stream came back in time (``cause`` is its ``__cause__``).
        EvictedError
            For a ``policy="block"`` subscriber whose connection went while the same broker went on.
        """
        deadline = time.monotonic() + self._reconnect
        old = self._conn
        old.close(bye=False)
        received, released, dropped, _ = self._totals()
        self._rx.abandon()
        while True:
            try:
                self._connect(old.address)
            except (BrokerGoneError, StreamNotFoundError, AccessDeniedError) as exc:
                # Hung up during the handshake, with keys that worked before: a proxy or tunnel whose broker is
                # still down, not a key refused (that one stays final).
                if isinstance(exc, AccessDeniedError) and not exc.hung_up:
                    raise
                if time.monotonic() >= deadline:
                    raise BrokerGoneError(f"{cause}; no broker with stream {self.name!r} came back at {old.address} "
                                          f"within reconnect={self._reconnect:g} s") from cause  # fmt: skip
                time.sleep(0.05)  # back off between attempts to reach the new broker
                continue
            if self.epoch == old.epoch and self.policy == "block":
                # The same broker, still running: it was our connection that went (the broker dropped a client
                # silent past its limit: a paused process), while the stream went on.  A lossless subscriber is
                # not taken on from the head past what it missed.
                self.close()
                raise EvictedError(
                    f"the connection to the {old.where} was lost while the broker went on (a client silent for "
                    f"{P.REMOTE_SILENCE:g} s is dropped: a process paused or stopped that long?); the samples written "
                    f"meanwhile were not delivered, and a policy='block' subscriber is not resubscribed past them "
                    f"({self._where})"
                ) from cause
            self._rx.jumped = True
            self._before = (received, released, dropped)
            return

    def _gone(self, exc: BrokerGoneError) -> None:
        """The broker went away: the end, or (``reconnect=``) subscribe again, here or by our caller."""
        if not self._reconnect:
            self._rx.end = exc
            raise exc
        if not self.auto_resubscribe:
            raise exc  # aio.Subscriber resubscribes in a thread: its event loop never waits
        self.resubscribe(exc)

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
        ValueError
            ``timeout`` is neither None (wait for ever, as ``math.inf`` does) nor a number of seconds >= 0.
        """
        chunk = self._recv(recv_timeout(timeout))
        if chunk is None:
            raise self.timeout_error(timeout)
        return chunk

    def timeout_error(self, timeout: float | None, where: str | None = None) -> TimeoutError:
        """The ``TimeoutError`` :meth:`recv` raises after ``timeout`` seconds without a chunk, for an event loop
        that waits on :meth:`pollables` itself: it says why none comes when a ``drop`` subscriber holds
        ``max_inflight`` chunks (and the drops so far, locally).  ``where``: who waited (default: this
        subscriber)."""
        said = f"no chunk within {timeout} s ({where or self._where})"
        if self.policy == "drop":
            counts = self._rx.counts(report=False)
            held = counts.received - counts.released
            if held >= self._max_inflight:
                # (A remote subscriber learns of its drops from the next chunk's seq: no count to give yet.)
                so_far = "" if isinstance(self._rx, RemoteReceiver) else f" ({counts.dropped} so far)"
                chunks = f"{held} chunk{'s' * (held != 1)}"
                said += (f": this policy='drop' subscriber holds {chunks} (max_inflight={self._max_inflight}), so the "
                         f"chunks cut meanwhile were dropped{so_far}; release the chunks you are done with "
                         f"(chunk.release(), or `with chunk:`)")  # fmt: skip
        return TimeoutError(said)

    def recv_nowait(self) -> Chunk:
        """Return a chunk that is ready now, else raise :class:`WouldBlock`."""
        chunk = self._recv(0)
        if chunk is None:
            raise WouldBlock(f"no chunk ready ({self._where})")
        return chunk

    def _recv(self, timeout: float | None) -> Chunk | None:
        if self._closed:
            raise ClosedError(f"{self._where} is closed")
        if FORKS[0] != self._forks:
            raise ClosedError(
                f"{self._where} was created in process {self._pid}; its ZeroMQ sockets do not survive fork(): "
                "create the Subscriber in the process that uses it"
            )
        while True:
            try:
                return self._rx.recv(timeout)
            except BrokerGoneError as exc:
                self._gone(exc)

    def __iter__(self) -> Iterator[Chunk]:
        """Yield chunks until the publisher closes the stream."""
        while True:
            try:
                chunk = self._recv(None)  # (recv without its timeout's check: one call less per chunk)
            except EndOfStream as exc:
                if type(exc) is EndOfStream:
                    return
                raise
            if chunk is not None:  # (always: no timeout)
                yield chunk

    def _totals(self) -> tuple[int, int, int, int]:
        """Received, released, dropped (under every broker so far), and the last seq (under this one)."""
        counts = self._rx.counts(report=not self._closed)
        received, released, dropped = self._before
        return received + counts.received, released + counts.released, dropped + counts.dropped, counts.last_seq

    def statistics(self) -> SubscriberStatistics:
        """Return this subscriber's counters (and bring the broker's copy, shown by ``slabcast status``, up to date).

        ``dropped`` counts the chunks cut from every frame notice read so far
        that were not handed out: the newest count once :meth:`recv` has run.
        """
        received, released, dropped, last_seq = self._totals()
        return SubscriberStatistics(received=received, released=released, held=received - released,
                                    dropped=dropped, last_seq=last_seq)  # fmt: skip

    # ------------------------------------------------------------ closing

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
        self._rx.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<Subscriber {self.name!r} size={getattr(self, 'size', '?')} clip={self.clip} policy={self.policy}>"
