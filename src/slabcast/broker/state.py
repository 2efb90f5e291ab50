"""The broker's state and every decision it makes, as a sans-io object: messages and the time in, messages out.

:class:`BrokerState` holds the clients, the streams and the subscriptions waiting
for a stream.  :meth:`~BrokerState.handle` takes one message from a client (its
bytes, its unpacked msgpack array, or a typed message of
:mod:`slabcast.wire.messages`) and the time; :meth:`~BrokerState.tick` takes the
time (liveness, eviction after ``lease_timeout``, slabs back to the publisher).
Both return what to send, as :class:`Out` records, in order.  No sockets, no
threads, no clock: the ZeroMQ loop in :mod:`slabcast.broker.server` decodes,
calls, and sends what comes back.  What touches the operating system (creating
segments, probing a client's liveness, counting descriptors, removing a notice
socket's file) goes through :class:`System`, whose defaults are the real ones.

Everything that affects the broker's state lives here, in its two mixins
:mod:`.reading` (the publisher's ring, read lazily) and :mod:`.subscribing`
(the subscription handlers), and in :mod:`.model`
(the records), :mod:`.checks` (a request's fields by themselves),
:mod:`.grants` (slabs for the publisher, ACKs asked for), :mod:`.history`
(where a subscription back in the stream starts) and :mod:`.delivery` (chunks
the broker cuts).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from .._exceptions import ProtocolError
from .._version import __version__
from ..core.ring import futex_wake
from ..core.shm import segment_prefix
from ..wire import messages as M
from ..wire import protocol as P
from ..wire.address import ipc_path
from . import delivery
from .checks import (
    DescriptorGuard,
    Refused,
    check_hello,
    check_open,
)
from .grants import grant
from .liveness import REMOTE_SILENCE, alive, stalled
from .model import BrokerCutSub, Client, LocalSub, Out, Stream, open_stream
from .reading import RingReading
from .report import stats_reply, stream_status
from .subscribing import Subscribing
from .system import System, open_fds

__all__ = ["BrokerState", "Out", "System", "open_fds"]

log = logging.getLogger("slabcast.broker")

SILENT_KEPT = 1024  # remote clients dropped for silence, remembered to tell them why (BrokerState.silent)
ENDED_KEPT, ENDED_FOR = 32, 60.0  # final status rows of ended streams: how many, for how many seconds
DEPARTED_KEPT, DEPARTED_FOR = 32, 60.0  # clients that died, went silent or were evicted: how many, how long said
_TYPED = frozenset(M.MESSAGES.values())


def _mib(n: int) -> str:
    """Bytes for a log line: ``"44.0 MiB"``, ``"512 KiB"``."""
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


class BrokerState(RingReading, Subscribing):
    """Clients, streams and subscriptions, and the rules that move them.

    Parameters
    ----------
    pid, epoch : int
        The broker's pid and random epoch (segment and notice-socket names, WELCOME).
    address : str
        The normalized ``ipc://`` address (notice sockets are files beside it).
    now : float
        The time (seconds, monotonic) at the start: status' ``uptime`` counts from it.
    shm_mode, lease_timeout, fd_limit, fd_headroom
        As :class:`slabcast.broker.server.Broker` takes and computes them.
    system : System, optional
        The operating-system seams (default: the real ones).
    """

    def __init__(self, *, pid: int, epoch: int, address: str, now: float, shm_mode: int = 0o600,
                 lease_timeout: float = 30.0, fd_limit: int = 1 << 20, fd_headroom: int = 32,
                 system: System | None = None,
                 sources: Callable[[], list[dict[str, Any]]] | None = None) -> None:  # fmt: skip
        self.pid = pid
        self.epoch = epoch
        self.address = address
        self.tcp_address: str | None = None
        self.sources = sources
        self.shm_mode = shm_mode
        self.lease_timeout = lease_timeout
        self.system = system or System()
        self.started = now
        self.clients: dict[bytes, Client] = {}
        self.streams: dict[str, Stream] = {}  # open streams by name
        self.draining: list[Stream] = []  # ended streams whose subscribers are still attached
        # The final status rows of streams that ended, (when, row), listed for ENDED_FOR seconds: a stream with no
        # subscriber left is gone the moment it ends, and `slabcast status` or the view would never see its end.
        self.ended_rows: deque[tuple[float, dict[str, Any]]] = deque(maxlen=ENDED_KEPT)
        # Who left without saying goodbye, and when (status: `departed`; the log said it, status did not).
        self.departed: deque[tuple[float, dict[str, Any]]] = deque(maxlen=DEPARTED_KEPT)
        self.pending: dict[str, list[tuple[Client, M.Subscribe]]] = {}  # SUBSCRIBE before OPEN
        self.forgotten: list[bytes] = []  # clients dropped since the shell last looked (it empties their outbox)
        # Remote clients dropped for their silence (the newest SILENT_KEPT): a message from one is answered with
        # an END that says why, not "expected HELLO".
        self.silent: dict[bytes, None] = {}
        self._segments = 0
        self.descriptors = DescriptorGuard(pid, fd_limit, fd_headroom, self.system.open_fds)
        self._now = now
        self._out: list[Out] = []
        self._handlers: dict[int, Callable[[Client, Any], None]] = {
            P.OPEN: self._on_open,
            P.PUBLISHED: self._on_published,
            P.CLOSE: self._on_close,
            P.SUBSCRIBE: self._on_subscribe,
            P.RELEASE: self._on_release,
            P.BYE: self._on_bye,
            P.STATUS: self._on_status,
            P.UNSUBSCRIBE: self._on_unsubscribe,
            P.SYNC: self._on_sync,
            P.STATS: self._on_stats,
            P.ACK: self._on_ack,
            P.CARRIED: self._on_carried,
            P.ATTACH: self._on_attach,
        }

    # ------------------------------------------------------------ events in

    def handle(self, ident: bytes, message: bytes | tuple[Any, ...], now: float, peer_pid: int = 0) -> list[Out]:
        """One message from client ``ident`` at ``now``; return what to send.

        ``peer_pid``: for a client's first message, its pid as our PID namespace sees it (0: unknown).
        A message that breaks the protocol is answered ``ERROR malformed``, a refused request ``ERROR
        <code>``, and a bug of the broker ``ERROR internal`` (logged with its traceback): one bad message
        never takes the broker down.
        """
        out = self._out = []
        self._now = now
        client = self.clients.get(ident)
        if client is not None:
            client.last_seen = now
        try:
            if type(message) in _TYPED:
                message = (message.KIND, *message)  # type: ignore[union-attr]
            msg = P.unpack(message) if isinstance(message, bytes) else message
            if client is None:
                if msg[0] == P.BYE:  # from a client already forgotten (its process looked dead): goodbye
                    self._send(ident, M.End(P.END_BYE, "goodbye"))
                elif msg[0] != P.HELLO and ident in self.silent:
                    self._send(ident, M.End(P.END_EVICTED, f"dropped: this remote client sent nothing for "
                                                          f"{REMOTE_SILENCE:g} s, and looked dead (a tcp:// client "
                                                          f"calls recv (C: sc_recv) at least every few seconds, "
                                                          f"or Python's Subscriber.keepalive())"))  # fmt: skip
                elif msg[0] != P.HELLO:
                    raise ProtocolError(f"expected HELLO as the first message, got kind {msg[0]}")
                else:
                    self._on_hello(ident, msg, peer_pid)
                return out
            if client.stream is not None:
                self._catch_up(client.stream)  # whatever a publisher says comes after the frames it described
            handler = self._handlers.get(msg[0])
            if handler is None:
                raise ProtocolError(f"unknown message kind {msg[0]}")
            handler(client, M.decode(msg))  # decoded and checked by its type (wire/messages.py)
        except Exception as exc:
            self._answer_error(ident, exc)
        return out

    def tick(self, now: float) -> list[Out]:
        """Everything that happens with time: :meth:`sweep`, then :meth:`reap`."""
        return self.sweep(now) + self.reap(now)

    def sweep(self, now: float) -> list[Out]:
        """Grant slabs that readers gave back (readers that died dropped their lease locks), and evict
        subscribers that kept a lease, or the publisher, waiting longer than ``lease_timeout``."""
        out = self._out = []
        self._now = now
        for stream in list(self.streams.values()):
            self._catch_up(stream)
            if stream.ended:
                continue
            self._grant(stream)
            if self.lease_timeout > 0:
                timeout = f"lease_timeout ({self.lease_timeout:g} s)"
                for local in stalled(stream, now, self.lease_timeout):
                    self._evict(local, f"evicted: a chunk was held (or the stream left unread) longer than the "
                                       f"broker's {timeout} while the publisher waited")  # fmt: skip
                for cut in list(stream.broker_cut):
                    if delivery.overdue(cut, now, self.lease_timeout):
                        self._evict(cut, f"evicted: a chunk was held longer than the broker's {timeout}")
        return out

    def _departed(self, client: Client, how: str) -> None:
        """Remember a client that left without BYE (``how``: ``died``, ``silent``, ``evicted``) for the status."""
        sub = client.sub
        stream = sub.stream.name if sub is not None else (client.stream.name if client.stream is not None else None)
        self.departed.append((self._now, {"label": client.label, "pid": client.pid, "role": client.role,
                                          "stream": stream, "how": how}))  # fmt: skip

    def _evict(self, sub: LocalSub | BrokerCutSub, message: str) -> None:
        self._departed(sub.client, "evicted")
        self._detach(sub)
        futex_wake(sub.stream.ring.futex_address)  # a futex subscriber asleep looks at its connection now
        self._send(sub.client.ident, M.End(P.END_EVICTED, message, sub.seq))

    def dead(self, now: float) -> list[Client]:
        """The clients whose process is gone (the shell handles what they sent before calling :meth:`reap`)."""
        return [c for c in self.clients.values() if not alive(c, now, self.system, self.draining)]

    def reap(self, now: float) -> list[Out]:
        """Forget the clients whose process is gone: reclaim their leases, end the streams they published."""
        out = self._out = []
        self._now = now
        for client in self.dead(now):
            if client.remote:
                log.warning("client %s (pid %d, %s) over TCP silent for %g s: dropped as dead; reclaiming its leases",
                            client.label, client.pid, client.role, REMOTE_SILENCE)  # fmt: skip
                self.silent[client.ident] = None
                if len(self.silent) > SILENT_KEPT:
                    del self.silent[next(iter(self.silent))]
            else:
                log.warning("client %s (pid %d, %s) died; reclaiming its leases", client.label, client.pid,
                            client.role)  # fmt: skip
            self._departed(client, "silent" if client.remote else "died")
            self._drop_client(client, gone=True)
        return out

    def shutdown(self) -> list[Out]:
        """Tell every client the broker shuts down and destroy every segment; return the ENDs to send."""
        out = self._out = []
        for ident, client in list(self.clients.items()):
            seq = client.sub.seq if client.sub is not None else 0
            self._send(ident, M.End(P.END_BROKER_SHUTDOWN, "the broker shut down", seq))
        for stream in [*self.streams.values(), *self.draining]:
            futex_wake(stream.ring.futex_address)  # a subscriber asleep on the ring looks at its connection (END)
            self._destroy(stream)
        self.streams.clear()
        return out

    # ------------------------------------------------------------- answers

    def _send(self, ident: bytes, message: Any, data: bytes | None = None) -> None:
        self._out.append(Out(ident, message, data))

    def _answer_error(self, ident: bytes, exc: Exception) -> None:
        if isinstance(exc, Refused):
            error = M.Error(exc.code, str(exc))
        elif isinstance(exc, ProtocolError):
            error = M.Error(P.ERR_MALFORMED, str(exc))
        else:  # a bug of the broker, not the client's fault
            log.exception("internal error handling a message from %r", ident)
            error = M.Error(P.ERR_INTERNAL, f"the broker failed on this request: {type(exc).__name__}: {exc} "
                                            f"(a bug of the broker; its log has the traceback)")  # fmt: skip
        self._send(ident, error)

    # ------------------------------------------------------------ clients

    def _on_hello(self, ident: bytes, msg: tuple[Any, ...], peer_pid: int) -> None:
        hello = check_hello(msg)
        role, version = hello.role, hello.version
        # `slabcast status` still answers a full broker: control connections (brief, BYE at once) may use half
        # of the descriptors kept free.
        spare = self.descriptors.headroom // 2 if role == "ctl" else 0
        self.descriptors.check(
            f"{hello.label[:128]} (pid {hello.pid}, {role})", len(self.clients), self._now, spare=spare
        )
        client = Client(ident, hello.pid, role, hello.label[:128], version, self._now)  # type: ignore[arg-type]
        self.clients[ident] = client
        # Liveness by pid uses the socket's view (our namespace), never the pid the client says it has.
        client.local_pid = 0 if client.remote else peer_pid
        self._send(ident, M.Welcome(version, self.pid, self.epoch))

    def _on_bye(self, client: Client, msg: M.Bye) -> None:
        seq = client.sub.seq if client.sub is not None else 0
        self._drop_client(client, gone=False)
        self._send(client.ident, M.End(P.END_BYE, "goodbye", seq))

    def _drop_client(self, client: Client, gone: bool) -> None:
        """Forget a client: reclaim its leases, or end the stream it publishes."""
        self.clients.pop(client.ident, None)
        self.forgotten.append(client.ident)
        for waiting in self.pending.values():
            waiting[:] = [(c, m) for c, m in waiting if c is not client]
        if client.stream is not None:
            self._end_stream(client.stream, P.END_PUBLISHER_GONE, f"{client.label} left without closing the stream "
                             f"(its process ended or its connection dropped)")  # fmt: skip
        sub = client.sub
        if sub is not None:
            client.sub = None
            stream = sub.stream
            log.info("%s left %r (%s)", client.label, stream.name, "died" if gone else "bye")
            self._detach(sub)
            if isinstance(sub, BrokerCutSub):
                for slab in sub.leases.values():
                    stream.pool.unpin(slab)
                sub.leases.clear()
            if stream.ended and not stream.subs and stream in self.draining:
                self._destroy(stream)
            elif not stream.ended:
                self._grant(stream)

    # ------------------------------------------------------------ streams

    def _on_open(self, client: Client, msg: M.Open) -> None:
        if client.role != "pub" or client.stream is not None or client.sub is not None:
            raise Refused(P.ERR_BAD_REQUEST, "OPEN is for a publisher connection that has no stream yet")
        if client.remote:
            raise Refused(P.ERR_BAD_REQUEST, "publishers must run on the broker's host (they write shared memory)")
        req = check_open(msg)
        name = req.name
        if name in self.streams:
            raise Refused(P.ERR_STREAM_EXISTS, f"stream {name!r} already has a publisher")
        self.descriptors.check(
            f"stream {name!r} of {client.label} (pid {client.pid})", len(self.clients), self._now, force=True
        )
        path = ipc_path(self.address)
        if path is None:
            raise Refused(P.ERR_BAD_REQUEST, "publishers need a broker on an ipc:// address")
        sid = self._segments
        notice_path = f"{path}.{self.epoch:08x}.{sid}"  # never the path of an earlier broker's stream
        seg_name = segment_prefix(self.pid, self.epoch) + str(sid)
        self._segments += 1
        stream = open_stream(req, sid, seg_name, notice_path, self.pid, self.epoch, self.shm_mode, self.system.segment)
        client.stream = stream
        self.streams[name] = stream
        # What the pool holds for late joiners (history=, record --pre-buffer) at least: the room for frames of
        # its slabs but the one being written and those the broker grants ahead (history_nslabs counts them).
        g = stream.geometry
        ahead = P.GRANT_AHEAD_FAST if stream.may_be_fast else P.GRANT_AHEAD
        frames = max(0, g.nslabs - 1 - ahead) * g.frame_bytes // g.sample_bytes
        holds = f"{frames / req.rate:.1f} s" if req.rate else f"{frames} samples"
        log.info("stream %r opened by %s: %s x %d @ %s, %d slabs, each %s for frames (and up to %s of address "
                 "space for chunks carried over, in memory only as subscribers ask); %s of /dev/shm now; the pool "
                 "holds at least about %s behind the slab being written", name, client.label, req.dtype, req.channels,
                 f"{req.rate:g} Hz" if req.rate else "no rate", g.nslabs, _mib(g.frame_bytes),
                 _mib(g.slab_bytes - g.frame_bytes), _mib(stream.segment.allocated), holds)  # fmt: skip
        # Subscribers that came first start at index 0: the publisher waits (bounded) until
        # each has joined its notice socket before it writes.  No CARRY before OPENED (publisher still
        # None): OPENED itself says how much to carry.
        for waiting, request in self.pending.pop(name, []):
            if waiting.ident in self.clients and waiting.sub is None:
                try:
                    self._on_subscribe(waiting, request, opening=True)
                except Exception as exc:
                    self._answer_error(waiting.ident, exc)
        stream.publisher = client
        stream.carry = stream.carried = stream.needed_carry()  # OPENED tells the publisher: confirmed
        self._send(client.ident, M.Opened(seg_name, stream.segment.nbytes, stream.header, stream.slab_bytes,
                                          stream.nslabs, stream.reserve, stream.sample_bytes, f"ipc://{notice_path}",
                                          sid, stream.carry, tuple(stream.tokens)))  # fmt: skip
        stream.tokens = []
        self._grant(stream)

    def _update_carry(self, stream: Stream) -> None:
        carry = stream.needed_carry()
        if carry != stream.carry and stream.publisher is not None:
            stream.carry = carry
            self._send(stream.publisher.ident, M.Carry(carry))

    def _on_carried(self, client: Client, msg: M.Carried) -> None:
        # From now on every slab change carries this much; waiting subscriptions start.
        stream = client.stream
        if stream is None:
            raise Refused(P.ERR_BAD_REQUEST, "CARRIED from a connection that publishes no stream")
        stream.carried = max(0, msg.nbytes)
        ready = [u for u in stream.waiting if u.size * stream.sample_bytes <= msg.nbytes]
        for sub in ready:
            stream.waiting.remove(sub)
            if sub.client.ident in self.clients:
                self._activate(stream, sub, offer_only=True)

    def _grant(self, stream: Stream) -> None:
        publisher = stream.publisher
        if publisher is not None:
            for slab in grant(stream, self._now):
                self._send(publisher.ident, M.Grant(slab))

    def _on_published(self, client: Client, msg: M.Published) -> None:
        # The frames themselves were read from the ring before this handler ran (handle: _catch_up).
        if client.role != "pub":
            raise Refused(P.ERR_BAD_REQUEST, "PUBLISHED from a connection that publishes no stream")

    def _on_close(self, client: Client, msg: M.Close) -> None:
        if client.stream is None:
            raise Refused(P.ERR_BAD_REQUEST, "CLOSE from a connection that publishes no stream")
        stream = client.stream
        self._end_stream(stream, P.END_CLOSED, "the publisher closed the stream")
        self._send(client.ident, M.End(P.END_CLOSED, f"stream {stream.name!r} closed"))

    def _end_stream(self, stream: Stream, code: str, message: str) -> None:
        if stream.ended:
            return
        self._catch_up(stream)  # what it published before it closed or died is the stream's
        self.streams.pop(stream.name, None)
        try:
            row = stream_status(stream)
        except Exception:  # (a status row must never stop a stream's end)
            log.exception("stream %r: its final status row failed", stream.name)
        else:
            stream.final_row = {**row, "ended": True, "end": code}  # (its subscribers' counters, as they leave)
            stream.final_subs = list(stream.subs)  # (in the row's order)
            self.ended_rows.append((self._now, stream.final_row))
        self._out += stream.end(code, message)
        self.system.unlink(stream.notice_path)  # the publisher removes its notice socket's file; not if it died
        if stream.subs:
            self.draining.append(stream)
        else:
            self._destroy(stream)

    def _destroy(self, stream: Stream) -> None:
        stream.destroy()
        with contextlib.suppress(ValueError):
            self.draining.remove(stream)

    # ------------------------------------------------------------ status

    def _on_stats(self, client: Client, msg: M.Stats) -> None:
        stream = self.streams.get(msg.name) or next((s for s in self.draining if s.name == msg.name), None)
        if stream is None:
            raise Refused(P.ERR_UNKNOWN_STREAM, f"no stream named {msg.name!r} on this broker "
                                                f"({P.streams_hint(msg.name, self.streams)})")  # fmt: skip
        self._catch_up(stream)
        self._send(client.ident, M.StatsReply(stats_reply(stream)))

    def _on_sync(self, client: Client, msg: M.Sync) -> None:
        self._send(client.ident, M.Synced(msg.token))

    def _on_status(self, client: Client, msg: M.Status) -> None:
        for stream in list(self.streams.values()):
            # The cursors posted in the ring's table first, then the ring: a subscriber that reads on meanwhile
            # posts a cursor the head already covers (read after the head, a cursor ran up to a slab ahead of it:
            # a negative lag, a newcomer found).
            stream.read_cursors()
            self._catch_up(stream)
        self._send(client.ident, M.StatusReply(self.status(self._now)))

    def status(self, now: float) -> dict[str, Any]:
        """The broker's state as plain data (streams, subscribers, pool use) at ``now``."""
        return {
            "pid": self.pid,
            "version": __version__,
            "protocol": P.VERSION,
            "address": self.address,
            "tcp_address": self.tcp_address,
            "uptime": now - self.started,
            "clients": len(self.clients),
            "waiting": {name: len(subs) for name, subs in self.pending.items() if subs},  # subscribed before OPEN
            "streams": [stream_status(s, now) for s in [*self.streams.values(), *self.draining]],
            # Streams that ended in the last ENDED_FOR seconds, as they were when they ended (the newest last).
            "ended_streams": [{**row, "ended_ago": now - t} for t, row in self.ended_rows if now - t <= ENDED_FOR],
            # Clients that left without BYE in the last DEPARTED_FOR seconds (the newest last).
            "departed": [{**row, "ago": now - t} for t, row in self.departed if now - t <= DEPARTED_FOR],
            "sources": self.sources() if self.sources is not None else [],
        }
