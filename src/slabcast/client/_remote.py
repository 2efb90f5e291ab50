"""The remote (``tcp://``) transport of a subscriber: chunks cut by the broker, carried by value in its messages.

Releases go back in RELEASE messages, batched while the subscriber is behind; a
callable sampler is drawn ahead here (a few chunks' worth of pauses travel with
SUBSCRIBE and each RELEASE), since the broker cuts.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .._exceptions import BrokerGoneError, ProtocolError, SlabcastError
from .._info import StreamInfo
from ..wire import messages as M
from ..wire import protocol as P
from ._subargs import pause_error
from ._transport import Counts
from .chunk import Chunk
from .connection import Connection, error_for, unexpected

__all__ = ["RemoteReceiver", "pauses"]

_CONNECTIONS_KEPT: list[Connection] = []  # see RemoteReceiver.close


def _on_dead(dead: deque[int], seq: int, _ref: object) -> None:
    # Runs when the last view of a chunk dies, in whatever thread dropped it: only queue.
    dead.append(seq)


def pauses(sampler: Callable[[], float], n: int, where: str) -> tuple[float, ...]:
    """Draw ``n`` pauses from a callable sampler, for the broker to apply (it cuts a remote subscriber's chunks)."""
    drawn = []
    for _ in range(n):
        value = float(sampler())
        error = pause_error(value, where)  # (as a local subscriber's: NaN and inf too)
        if error is not None:
            raise error
        drawn.append(value)
    return tuple(drawn)


class RemoteReceiver:
    """Receive the chunks the broker cuts for this subscriber and send their releases back."""

    def __init__(
        self,
        conn: Connection,
        info: StreamInfo,
        *,
        release_batch: int,
        sampler: Callable[[], float] | None,
        reconnect: bool,
        where: str,
    ) -> None:
        self.end: SlabcastError | None = None
        self.jumped = False  # the next chunk follows a jump (a broker restart)
        self._conn = conn
        self._info = info
        self._dtype = info.dtype
        self._channels = info.channels
        self._where = where
        self._release_batch = release_batch
        self._sampler = sampler  # a callable sampler: one pause drawn ahead per chunk released
        self._reconnect = reconnect
        self._owner_thread = threading.get_ident()  # ZeroMQ sockets are not thread-safe: who receives, sends
        self._dead: deque[int] = deque()  # seqs whose views are all gone, to release
        self._refs: dict[int, weakref.ref[np.ndarray[Any, Any]]] = {}
        self._received = 0
        self._released = 0
        self._last_seq = -1
        self._cut = 0  # chunks the broker cut for us, as told by END
        self._on_release = self.on_release

    def pollables(self) -> tuple[Any, ...]:
        return self._conn.pollables()

    def keepalive(self, interval: float) -> None:
        """A remote client proves it is alive by talking: a SYNC if nothing was sent for ``interval`` s."""
        self._conn.keepalive(interval)

    def recv(self, timeout: float | None) -> Chunk | None:
        self._owner_thread = threading.get_ident()
        if len(self._dead) >= self._release_batch:
            self._flush_releases()
        if self.end is not None:
            self._flush_releases()
            raise self.end
        while True:
            # Releases go out in one message when this subscriber is behind (notices
            # waiting), and at the latest before it waits for the next notice.
            msg = self._conn.recv(timeout, self._flush_releases)
            if msg is None:
                return None
            if isinstance(msg, M.Chunk):
                return self._chunk(msg)
            if isinstance(msg, M.Synced):  # the answer to a keep-alive
                continue
            if isinstance(msg, M.End | M.Error):
                exc = error_for(msg, self._where)
                if isinstance(msg, M.End) and msg.code == P.END_BROKER_SHUTDOWN and self._reconnect:
                    raise exc  # BrokerGoneError: the subscriber subscribes again
                if isinstance(msg, M.End):
                    self.end = exc
                    self._cut = msg.seq
                raise exc
            raise unexpected(msg, "CHUNK or END", self._where)

    def _chunk(self, msg: M.Chunk) -> Chunk:
        seq, index, n, t0, _, flags = msg
        channels = self._channels
        frame = self._conn.payload
        if not flags & P.FLAG_INLINE or frame is None or len(frame) != n * channels * self._dtype.itemsize:
            got = "none" if frame is None or not flags & P.FLAG_INLINE else f"{len(frame)} bytes"
            raise ProtocolError(f"CHUNK seq={seq} announced {n} samples inline, got {got} ({self._where})")
        base = np.frombuffer(frame.buffer, dtype=self._dtype)
        base.flags.writeable = False  # read-only, as a local chunk is: the same code works with both
        # Every view derived from `data` keeps `base` alive, so this fires when the last view dies.
        self._refs[seq] = weakref.ref(base, functools.partial(_on_dead, self._dead, seq))
        self._received += 1
        self._last_seq = seq
        if self.jumped:
            self.jumped = False
            flags |= P.FLAG_DISCONTINUITY
        data = base.reshape(n, channels) if channels > 1 else base
        # (FLAG_INLINE says how the samples came: the wire's, not the chunk's)
        return Chunk(data, seq, index, t0, flags & ~P.FLAG_INLINE, self._info, self._on_release)

    def on_release(self) -> None:
        """A chunk was given back: send its release now, unless more chunks are already waiting, in which
        case the next recv sends this release together with the next ones."""
        if threading.get_ident() != self._owner_thread:
            return  # ZeroMQ sockets are not thread-safe: the thread that receives sends the releases
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
        drawn = pauses(self._sampler, len(seqs), self._where) if self._sampler is not None else ()
        with contextlib.suppress(BrokerGoneError):
            self._conn.send(M.Release(tuple(seqs), drawn))

    def counts(self, report: bool = True) -> Counts:
        dropped = max(self._last_seq + 1, self._cut) - self._received
        # Given back: every view gone, whether its RELEASE has gone out yet or waits for the next recv's batch.
        return Counts(self._received, self._released + len(self._dead), dropped, self._last_seq)

    def close(self) -> None:
        conn = self._conn
        if conn.closed:
            return
        # Chunks already queued were never seen by the caller: give them straight back.
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

    def abandon(self) -> None:
        """Releases of chunks from the old broker mean nothing to the next one: forget them."""
        self._dead = deque()
        self._refs = {}
