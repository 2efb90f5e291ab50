"""Subscriptions: SUBSCRIBE (held while its stream does not exist yet), ATTACH, ACK, RELEASE, UNSUBSCRIBE.

A mixin of :class:`~slabcast.broker.state.BrokerState` (the same sans-io object: no socket, no clock).  A local
(``ipc://``) subscription is offered (SUBSCRIBED) once the publisher carries enough for its chunks, and starts at
its ATTACH, at the head or back in the pool (HISTORY); a broker-cut one (TCP, version 1) starts at SUBSCRIBED.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .._exceptions import ProtocolError
from ..core.shm import CLIENT_BASE
from ..wire import messages as M
from ..wire import protocol as P
from . import delivery
from .checks import Refused, check_subscribe
from .history import history as history_of
from .model import BrokerCutSub, Client, LocalSub, Out, Stream
from .report import subscriber_status

__all__ = ["MAX_SUBSCRIBERS", "Subscribing"]

log = logging.getLogger("slabcast.broker")

MAX_SUBSCRIBERS = 256  # per stream


class Subscribing:
    """The subscription handlers of :class:`~slabcast.broker.state.BrokerState` (which sets every field below)."""

    streams: dict[str, Stream]
    clients: dict[bytes, Client]
    pending: dict[str, list[tuple[Client, M.Subscribe]]]
    draining: list[Stream]
    _now: float
    _out: list[Out]

    if TYPE_CHECKING:  # (BrokerState's and RingReading's)

        def _send(self, ident: bytes, message: Any, data: bytes | None = None) -> None: ...

        def _catch_up(self, stream: Stream) -> None: ...

        def _grant(self, stream: Stream) -> None: ...

        def _update_carry(self, stream: Stream) -> None: ...

        def _destroy(self, stream: Stream) -> None: ...

    def _on_subscribe(self, client: Client, msg: M.Subscribe, opening: bool = False) -> None:
        if client.role != "sub" or client.sub is not None:
            raise Refused(P.ERR_BAD_REQUEST, "SUBSCRIBE is for a subscriber connection with no subscription yet")
        check_subscribe(msg, client.remote)
        name, size, seconds, clip, policy, max_inflight, sampler, cut, wait, token, history, wake = msg
        stream = self.streams.get(name)
        if stream is None:
            if wait:
                # Held until the stream opens; the subscriber's own timeout bounds the wait.
                self.pending.setdefault(name, []).append((client, msg))
                log.info("%s waits for stream %r", client.label, name)
                return
            raise Refused(P.ERR_UNKNOWN_STREAM, f"no stream named {name!r} on this broker "
                                                f"({P.streams_hint(name, self.streams)})")  # fmt: skip
        self._catch_up(stream)  # it starts at the head: the newest frame described
        size = stream.chunk_size(size, seconds, MAX_SUBSCRIBERS)
        if cut != "local":
            client.sub = sub = BrokerCutSub(client, stream, size, clip, policy, max_inflight, sampler)  # type: ignore[arg-type]
            self._activate(stream, sub)
            return
        assert token is not None  # checked: a local subscription has one
        local = LocalSub(client, stream, size, clip, policy, max_inflight, P.token_topic(token))  # type: ignore[arg-type]
        local.history = history
        local.wake = wake
        client.sub = local
        if opening:
            stream.tokens.append(local.token)
            self._activate(stream, local)
        elif size * stream.sample_bytes > stream.carried and stream.publisher is not None:
            # Its chunks need a longer carry than the publisher makes: offer it once it confirms.
            stream.waiting.append(local)
            stream.tell_publisher()
            self._update_carry(stream)
        else:
            self._activate(stream, local, offer_only=True)

    def _activate(self, stream: Stream, sub: LocalSub | BrokerCutSub, offer_only: bool = False) -> None:
        """Send SUBSCRIBED; a broker-cut (or opening) subscription starts now, a local one at its ATTACH."""
        client = sub.client
        if offer_only:
            assert isinstance(sub, LocalSub)
            stream.joining.append(sub)  # until ATTACH: its notice socket is not proven connected yet
            stream.tell_publisher()  # a doorbell from now on: the frames after its start wake it
        else:
            stream.start(sub)
        reply = stream.subscribed(sub.size)
        # A version-1 client gets the fields it knows.
        self._send(client.ident, reply if client.version >= 2 else M.encode(reply, 8))
        self._update_carry(stream)

    def _on_attach(self, client: Client, msg: M.Attach) -> None:
        # The subscriber's notice socket is connected (JOINED came): it starts at the head.
        # `slot`: it holds a shared lock on byte CLIENT_BASE + slot of the segment while it lives.
        sub = client.sub
        if not isinstance(sub, LocalSub):
            raise Refused(P.ERR_BAD_REQUEST, "ATTACH from a connection with no local subscription")
        stream = sub.stream
        if sub in stream.waiting:
            raise Refused(P.ERR_BAD_REQUEST, "ATTACH before SUBSCRIBED")
        self._catch_up(stream)
        if not msg.sleeper:
            # It cannot write the sleeper page: no cursor table entry (ACKs), and a doorbell subscriber gets a
            # notice for every frame, as version 2.
            sub.page = False
            if sub.wake == "doorbell":
                sub.wake = None
            stream.remove_sleeper(sub)
        sub.futex_sleeper = bool(msg.futex_sleeper) and sub.wake == "futex" and sub.page
        if sub.futex_sleeper:
            stream.tell_publisher()  # (one started at SUBSCRIBE, its stream opened since, is not started below)
        if msg.slot is not None:
            if not 0 <= msg.slot < 1 << 31:
                raise Refused(P.ERR_BAD_REQUEST, f"ATTACH slot must be 0..2**31-1, got {msg.slot}")
            client.live = (stream, CLIENT_BASE + msg.slot)
        if sub in stream.joining:
            stream.joining.remove(sub)
            stream.start(sub)
            if sub.history:
                # It starts back in the pool: the frames from there to the head come first, as HISTORY, and its
                # cursor holds their slabs (whatever its policy) until it has read them.
                start, history = history_of(stream, sub.history, sub.size)
                sub.cursor, sub.gate = start, stream.head
                for message in history:
                    self._send(client.ident, message)
        tag = stream.post_start(sub)
        self._send(client.ident, M.Attached(sub.cursor, sub.ring_seq, sub.sleeper, tag))

    def _on_ack(self, client: Client, msg: M.Ack) -> None:
        # Cumulative counters, so a late one costs nothing.
        sub = client.sub
        if not isinstance(sub, LocalSub):
            raise Refused(P.ERR_BAD_REQUEST, "ACK from a connection with no local-cut subscription")
        # The cursor may run ahead of `head`: notices reach subscribers before FRAME reaches us.
        if msg.cursor > sub.cursor:
            sub.cursor = msg.cursor
            sub.stalled_since = None
        sub.delivered, sub.dropped, sub.held = msg.delivered, msg.dropped, msg.held
        sub.seq = sub.delivered + sub.dropped
        if not sub.stream.ended:
            self._grant(sub.stream)

    def _on_release(self, client: Client, msg: M.Release) -> None:
        sub = client.sub
        if not isinstance(sub, BrokerCutSub):
            raise Refused(P.ERR_BAD_REQUEST, "RELEASE from a connection with no subscription cut by the broker")
        unknown = delivery.release(sub, msg, self._now, self._out)
        if not sub.stream.ended:
            self._grant(sub.stream)
        if unknown:
            raise ProtocolError(f"RELEASE of chunks this subscriber does not hold: {unknown[:10]!r}")

    def _on_unsubscribe(self, client: Client, msg: M.Unsubscribe) -> None:
        # No more chunks; the leases it holds stay until RELEASE, BYE or its death.
        sub = client.sub
        if sub is None:
            raise Refused(P.ERR_BAD_REQUEST, "UNSUBSCRIBE from a connection with no subscription")
        self._detach(sub)

    def _detach(self, sub: LocalSub | BrokerCutSub) -> None:
        stream = sub.stream
        row = stream.final_row
        if row is not None and sub in stream.final_subs:
            # An ended stream's row keeps each subscriber as it left: what it received after the end (a stream
            # ended right after its frames showed `delivered 0` for a subscriber that had every chunk).  Its place
            # in the row is its place in the stream's subscribers at the end (two of one process share a label).
            rows = list(row["subscribers"])
            rows[stream.final_subs.index(sub)] = subscriber_status(stream, sub)
            row["subscribers"] = rows
        stream.remove(sub)
        if stream.ended and not stream.subs:
            if stream in self.draining:
                self._destroy(stream)
        elif not stream.ended:
            self._update_carry(stream)
            self._grant(stream)
