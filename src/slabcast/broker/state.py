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

Everything that affects the broker's state lives here and in :mod:`.model`
(the records), :mod:`.checks` (a request's fields by themselves) and
:mod:`.delivery` (chunks the broker cuts).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._exceptions import ProtocolError, ShmFullError
from .._version import __version__
from ..core.shm import CLIENT_BASE, PUBLISHER_BYTE, Segment, header_bytes, lock_held, pid_alive, segment_prefix
from ..wire import messages as M
from ..wire import protocol as P
from ..wire.address import ipc_path
from . import delivery
from .checks import Refused, check_open, check_subscribe
from .model import BrokerCutSub, Client, LocalSub, Out, Stream, pool_ranges
from .report import statistics, stream_status

__all__ = ["BrokerState", "Out", "System", "open_fds"]

log = logging.getLogger("slabcast.broker")

GRANT_AHEAD = 2  # slabs a publisher may hold beyond the one it writes
MAX_SUBSCRIBERS = 256  # per stream
REMOTE_SILENCE = 10.0  # seconds without a message (clients ping every second) before a TCP client is dropped
_REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about clients refused for want of descriptors
_TYPED = frozenset(M.MESSAGES.values())


def open_fds() -> int:
    """Descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@dataclass
class System:
    """The broker's seams to the operating system; unit tests replace the ones they fake."""

    segment: Callable[..., Segment] = Segment  # (name, nbytes, mode, commit=ranges) -> a new segment
    lock_held: Callable[[int, int], bool] = lock_held  # (segment fd, byte): its holder lives
    pid_alive: Callable[[int], bool] = pid_alive
    open_fds: Callable[[], int] = open_fds
    unlink: Callable[[str], None] = _unlink  # a dead publisher's notice socket file


class BrokerState:
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
        self.fd_limit = fd_limit
        self.fd_headroom = fd_headroom
        self.system = system or System()
        self.started = now
        self.clients: dict[bytes, Client] = {}
        self.streams: dict[str, Stream] = {}  # open streams by name
        self.draining: list[Stream] = []  # ended streams whose subscribers are still attached
        self.pending: dict[str, list[tuple[Client, M.Subscribe]]] = {}  # SUBSCRIBE before OPEN
        self.forgotten: list[bytes] = []  # clients dropped since the shell last looked (it empties their outbox)
        self._segments = 0
        self._fd_check_at = 0  # number of clients at which to count descriptors again
        self._refused = 0  # clients refused for want of descriptors since the last log line about it
        self._refused_logged = -_REFUSAL_LOG_INTERVAL
        self._now = now
        self._out: list[Out] = []
        self._handlers: dict[int, Callable[[Client, Any], None]] = {
            P.OPEN: self._on_open,
            P.FRAME: self._on_frame,
            P.FRAMES: self._on_frames,
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
                elif msg[0] != P.HELLO:
                    raise ProtocolError(f"expected HELLO as the first message, got kind {msg[0]}")
                else:
                    self._on_hello(ident, msg, peer_pid)
                return out
            handler = self._handlers.get(msg[0])
            if handler is None:
                raise ProtocolError(f"unknown message kind {msg[0]}")
            # FRAME, one per frame, checks its own fields on a fast path; every other message is decoded
            # and checked by its type (wire/messages.py).
            handler(client, msg if msg[0] == P.FRAME else M.decode(msg))
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
            self._grant(stream)
            if self.lease_timeout > 0:
                self._check_gating(stream, now)
                for sub in list(stream.broker_cut):
                    if delivery.overdue(sub, now, self.lease_timeout):
                        self._detach(sub)
                        message = (f"evicted: a chunk was held longer than the broker's lease_timeout "
                                   f"({self.lease_timeout:g} s)")  # fmt: skip
                        self._send(sub.client.ident, M.End(P.END_EVICTED, message, sub.seq))
        return out

    def dead(self, now: float) -> list[Client]:
        """The clients whose process is gone (the shell handles what they sent before calling :meth:`reap`)."""
        return [c for c in self.clients.values() if not self._alive(c, now)]

    def reap(self, now: float) -> list[Out]:
        """Forget the clients whose process is gone: reclaim their leases, end the streams they published."""
        out = self._out = []
        self._now = now
        for client in self.dead(now):
            log.warning("client %s (pid %d, %s) died; reclaiming its leases", client.label, client.pid, client.role)
            self._drop_client(client, gone=True)
        return out

    def shutdown(self) -> list[Out]:
        """Tell every client the broker shuts down and destroy every segment; return the ENDs to send."""
        out = self._out = []
        for ident, client in list(self.clients.items()):
            seq = client.sub.seq if client.sub is not None else 0
            self._send(ident, M.End(P.END_BROKER_SHUTDOWN, "the broker shut down", seq))
        for stream in [*self.streams.values(), *self.draining]:
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

    # ------------------------------------------------------------ liveness

    def _alive(self, client: Client, now: float) -> bool:
        """Whether a client still lives: by the lock it holds on its stream's segment when it has one (true
        in any PID namespace), by its silence over TCP, else by its pid."""
        if client.remote:
            return now - client.last_seen <= REMOTE_SILENCE
        live = client.live
        if live is None and client.stream is not None and client.stream.frames:
            live = (client.stream, PUBLISHER_BYTE)  # a publisher holds it from before its first frame
        if live is not None:
            stream, byte = live
            if not stream.ended or stream in self.draining:
                with contextlib.suppress(OSError):
                    return self.system.lock_held(stream.segment.fd, byte)
        if client.role == "ctl":
            return True  # holds nothing; it says BYE
        return client.local_pid <= 0 or self.system.pid_alive(client.local_pid)

    def _check_gating(self, stream: Stream, now: float) -> None:
        """Evict a lossless local subscriber whose cursor has kept the publisher without a slab too long."""
        if stream.publisher is None or stream.pool.granted:
            for sub in stream.subs:
                if isinstance(sub, LocalSub):
                    sub.stalled_since = None
            return
        floor = stream.floor_index()
        if floor is None or stream.pool.gated(floor) is None:
            return
        for sub in list(stream.subs):
            if not isinstance(sub, LocalSub) or sub.policy != "block" or sub.cursor != floor:
                continue
            if sub.stalled_since is None:
                sub.stalled_since = now
            elif now - sub.stalled_since > self.lease_timeout:
                # Chunks it holds stay intact (its lease locks); only its claim on unread frames ends.
                log.warning(
                    "evicting %s (pid %d) from %r: it kept the publisher waiting %.1f s > lease_timeout %.1f s",
                    sub.client.label, sub.client.pid, stream.name, now - sub.stalled_since, self.lease_timeout,
                )  # fmt: skip
                self._detach(sub)
                message = (
                    f"evicted: a chunk was held (or the stream left unread) longer than the broker's "
                    f"lease_timeout ({self.lease_timeout:g} s) while the publisher waited"
                )
                self._send(sub.client.ident, M.End(P.END_EVICTED, message, sub.seq))

    # ------------------------------------------------------------ clients

    def _on_hello(self, ident: bytes, msg: tuple[Any, ...], peer_pid: int) -> None:
        if len(msg) < 2 or type(msg[1]) is not int:
            raise ProtocolError("HELLO must start [HELLO, version, ...]")
        if msg[1] != P.VERSION and msg[1] not in P.LEGACY_VERSIONS:
            raise Refused(
                P.ERR_VERSION,
                f"protocol version mismatch: broker speaks version {P.VERSION}, client speaks version {msg[1]}",
            )
        hello = M.decode(msg)
        assert isinstance(hello, M.Hello)
        role = hello.role
        if role not in ("pub", "sub", "ctl"):
            raise ProtocolError(f"HELLO role must be 'pub', 'sub' or 'ctl', got {role!r}")
        version = hello.version
        if version != P.VERSION and role == "pub":
            raise Refused(P.ERR_VERSION, f"publishers must speak protocol version {P.VERSION}, got {version}")
        # `slabcast status` still answers a full broker: control connections (brief, BYE at once) may use half
        # of the descriptors kept free.
        spare = self.fd_headroom // 2 if role == "ctl" else 0
        self._check_descriptors(f"{hello.label[:128]} (pid {hello.pid}, {role})", spare=spare)
        client = Client(ident, hello.pid, role, hello.label[:128], version, self._now)  # type: ignore[arg-type]
        self.clients[ident] = client
        # Liveness by pid uses the socket's view (our namespace), never the pid the client says it has.
        client.local_pid = 0 if client.remote else peer_pid
        self._send(ident, M.Welcome(version, self.pid, self.epoch))

    def _check_descriptors(self, who: str, force: bool = False, spare: int = 0) -> None:
        """Refuse (``ERROR limit``) what would take the broker within its headroom of RLIMIT_NOFILE.

        Counting is a directory listing: done again only when the clients that came
        since could have used half of the room left (at most two descriptors each).
        """
        clients = len(self.clients)
        if clients < self._fd_check_at and not force:
            return
        used = self.system.open_fds()
        free = self.fd_limit - self.fd_headroom - used
        self._fd_check_at = clients + free // 4
        if free + spare > 0:
            return
        self._refused += 1
        if self._now - self._refused_logged >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %s: %d descriptors open of the open-file limit %d (RLIMIT_NOFILE; %d kept free) with %d "
                "clients (%d refused since the last such line); raise the limit: LimitNOFILE= in the unit or "
                "`ulimit -n` before starting the broker",
                who, used, self.fd_limit, self.fd_headroom, clients, self._refused,
            )  # fmt: skip
            self._refused_logged = self._now
            self._refused = 0
        raise Refused(
            P.ERR_LIMIT,
            f"the broker (pid {self.pid}) cannot take another client: {used} of its {self.fd_limit} descriptors "
            f"are in use (its open-file limit, RLIMIT_NOFILE; {self.fd_headroom} are kept free so that it never "
            f"runs out) with {clients} clients; raise the limit where the broker starts: LimitNOFILE=N in its "
            f"systemd unit, or `ulimit -n N` (and the hard limit) in the shell that starts `slabcast broker`",
        )

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
            self._end_stream(client.stream, P.END_PUBLISHER_GONE, f"the publisher ({client.label}) went away")
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
        name, dtype, channels, sample_bytes, nslabs, slab_bytes, reserve = (
            req.name, req.dtype, req.channels, req.sample_bytes, req.nslabs, req.slab_bytes, req.reserve)  # fmt: skip
        if name in self.streams:
            raise Refused(P.ERR_STREAM_EXISTS, f"stream {name!r} already has a publisher")
        self._check_descriptors(f"stream {name!r} of {client.label} (pid {client.pid})", force=True)
        path = ipc_path(self.address)
        if path is None:
            raise Refused(P.ERR_BAD_REQUEST, "publishers need a broker on an ipc:// address")
        sid = self._segments
        notice_path = f"{path}.{self.epoch:08x}.{sid}"  # never the path of an earlier broker's stream
        seg_name = segment_prefix(self.pid, self.epoch) + str(sid)
        self._segments += 1
        header = header_bytes(nslabs)
        timestamps = bool(req.meta.get("timestamps"))
        try:
            times = 8 * (slab_bytes // sample_bytes) * nslabs if timestamps else 0  # per-sample times, if asked
            # Memory for the frame area and as much carried room as frames; the rest of the carried part
            # stays address space until a subscriber asks for longer chunks.
            committed = min(reserve, (slab_bytes - reserve) // sample_bytes * sample_bytes)
            ranges = pool_ranges(header, slab_bytes, nslabs, reserve, sample_bytes, timestamps, 0, committed,
                                 frames=True)  # fmt: skip
            segment = self.system.segment(seg_name, header + nslabs * slab_bytes + times, self.shm_mode,
                                          commit=[(0, header), *ranges])  # fmt: skip
        except ShmFullError as exc:
            raise Refused(P.ERR_SHM_FULL, str(exc)) from None
        segment.write_header(header_bytes=header, slab_bytes=slab_bytes, nslabs=nslabs, sample_bytes=sample_bytes,
                             channels=channels, broker_pid=self.pid, rate=req.rate, dtype=dtype.str,
                             epoch=self.epoch, name=name)  # fmt: skip
        stream = Stream(name, sid, dtype, channels, req.rate, slab_bytes, nslabs, reserve, list(req.channel_names),
                        segment, header, notice_path, committed)  # fmt: skip
        stream.meta = req.meta
        # Raw byte streams have no sample values to summarise.
        byte_stream = dtype == np.uint8 and channels == 1
        if dtype.kind in "iuf" and not byte_stream and req.stats_window > 0:
            stream.stats.configure(req.stats_window)
        client.stream = stream
        self.streams[name] = stream
        log.info("stream %r opened by %s: %s x %d @ %s Hz, %d slabs of %d bytes", name, client.label, dtype,
                 channels, req.rate, nslabs, slab_bytes)  # fmt: skip
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
        self._send(client.ident, M.Opened(seg_name, segment.nbytes, header, slab_bytes, nslabs, reserve, sample_bytes,
                                          f"ipc://{notice_path}", sid, stream.carry, tuple(stream.tokens)))  # fmt: skip
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
        if publisher is None:
            return
        pool = stream.pool
        pool.advance(stream.floor_index())
        granted = pool.grant(GRANT_AHEAD)
        if granted and stream.give_back and stream.peak > stream.first_committed:  # room it may give back
            freed = stream.shrink(granted)
            if freed:
                log.debug("stream %r: %d bytes of carried room given back", stream.name, freed)
        for slab in granted:
            self._send(publisher.ident, M.Grant(slab))

    def _on_frame(self, client: Client, msg: tuple[Any, ...]) -> None:
        # [FRAME, offset, n, t0, flags, carry]; version-2 publishers always send all six.
        stream = client.stream
        if stream is None:
            raise Refused(P.ERR_BAD_REQUEST, "FRAME from a connection that publishes no stream")
        if (
            len(msg) != 6
            or type(msg[1]) is not int
            or type(msg[2]) is not int
            or type(msg[3]) not in (float, int)
            or type(msg[4]) is not int
            or type(msg[5]) is not int
        ):
            M.decode(msg)  # raises, naming the field
            if len(msg) != 6:
                raise ProtocolError(f"FRAME takes 5 fields in protocol version {P.VERSION}, got {len(msg) - 1}")
        _, offset, n, t0, flags, carry = msg
        self._frame(stream, offset, n, float(t0), flags & P.FLAG_DISCONTINUITY, carry)
        self._after_frames(stream, offset, (n,))

    def _on_frames(self, client: Client, msg: M.Frames) -> None:
        # Frames packed back to back from offset, in one slab.
        stream = client.stream
        if stream is None:
            raise Refused(P.ERR_BAD_REQUEST, "FRAMES from a connection that publishes no stream")
        offset, ns, t0s, carry = msg
        if len(ns) != len(t0s) or not 1 <= len(ns) <= P.MAX_BATCH:
            raise ProtocolError(f"FRAMES needs 1..{P.MAX_BATCH} sizes and as many times, got {len(ns)} and {len(t0s)}")
        for n, t0 in zip(ns, t0s, strict=True):
            if type(n) is not int or type(t0) not in (float, int) or n <= 0:
                raise ProtocolError(f"FRAMES sizes must be positive ints and times numbers, got {n!r} and {t0!r}")
        self._frame(stream, offset, sum(ns), float(t0s[0]), 0, carry, ns, tuple(float(t) for t in t0s))
        self._after_frames(stream, offset, ns)

    def _frame(self, stream: Stream, offset: int, n: int, t0: float, jump: int, carry: int,
               ns: tuple[int, ...] | None = None, t0s: tuple[float, ...] | None = None) -> None:  # fmt: skip
        """Account for frames (``n`` samples in all) the publisher wrote at ``offset``.

        Broker-cut subscribers get their chunks here; local-cut ones cut their own
        from the publisher's notice.
        """
        nbytes = n * stream.sample_bytes
        if n <= 0:
            raise Refused(P.ERR_FRAME, f"FRAME must hold at least one sample, got n={n}")
        if offset != stream.next_offset:
            # The first frame of a new slab: the publisher moved to the oldest slab it was granted.
            granted = stream.pool.granted
            if not granted or offset != stream.slab_start(granted[0]) + stream.reserve:
                expected = f"{stream.next_offset}" if stream.pool.current is not None else "none yet"
                raise Refused(
                    P.ERR_FRAME,
                    f"FRAME offset {offset} is neither the next offset ({expected}) nor the data start "
                    f"of the next granted slab (granted: {list(granted)})",
                )
            if not 0 <= carry <= stream.reserve:
                raise Refused(P.ERR_FRAME, f"FRAME carry must be 0..{stream.reserve} bytes, got {carry}")
            if stream.switch_slab(granted[0], carry) and not stream.ended:
                self._grant(stream)
        if offset + nbytes > stream.slab_end:
            raise Refused(P.ERR_FRAME, f"FRAME of {nbytes} bytes at offset {offset} overruns its slab")
        stream.next_offset = offset + nbytes
        if stream.broker_cut:
            delivery.cut(stream, n, t0, jump, ns, t0s, self._now, self._out)
        else:
            stream.head += n
        stream.frames += len(ns) if ns else 1

    def _after_frames(self, stream: Stream, offset: int, ns: tuple[int, ...]) -> None:
        """Statistics, after the notices are out: off the latency path, and never able to stop it."""
        stats = stream.stats
        if not stats.window:
            return
        try:
            for n in ns:
                stats.account(self._now, stream.u8, offset, n)
                offset += n * stream.sample_bytes
        except Exception:
            log.exception("statistics of stream %r failed; turning them off for this stream", stream.name)
            stats.window = 0.0

    def _on_close(self, client: Client, msg: M.Close) -> None:
        if client.stream is None:
            raise Refused(P.ERR_BAD_REQUEST, "CLOSE from a connection that publishes no stream")
        stream = client.stream
        self._end_stream(stream, P.END_CLOSED, "the publisher closed the stream")
        self._send(client.ident, M.End(P.END_CLOSED, f"stream {stream.name!r} closed"))

    def _end_stream(self, stream: Stream, code: str, message: str) -> None:
        if stream.ended:
            return
        stream.ended = True
        log.info("stream %r ended (%s) after %d samples", stream.name, code, stream.head)
        if stream.publisher is not None:
            stream.publisher.stream = None
            stream.publisher = None
        self.streams.pop(stream.name, None)
        for sub in [*stream.waiting, *stream.joining]:
            self._send(sub.client.ident, M.End(code, message, 0, stream.head))
            sub.client.sub = None
        stream.waiting.clear()
        stream.joining.clear()
        self.system.unlink(stream.notice_path)  # the publisher removes its notice socket's file; not if it died
        stream.pool.close()
        for u in stream.subs:
            if isinstance(u, LocalSub):
                # It ends once it has read the notices up to `head` (the publisher's own NOTICE_END
                # usually gets there first, in order with them).
                self._send(u.client.ident, M.End(code, message, u.seq, stream.head))
            elif u.backlog:
                u.end = (code, message)  # sent once the backlog has drained
            else:
                self._send(u.client.ident, M.End(code, message, u.seq))
        if stream.subs:
            self.draining.append(stream)
        else:
            self._destroy(stream)

    def _destroy(self, stream: Stream) -> None:
        del stream.u8
        del stream.gens
        stream.pool.gens = []  # the last view of the segment: it can be unmapped
        stream.segment.destroy()
        with contextlib.suppress(ValueError):
            self.draining.remove(stream)
        log.info("stream %r: segment %s unlinked", stream.name, stream.segment.name)

    # ------------------------------------------------------ subscriptions

    def _on_subscribe(self, client: Client, msg: M.Subscribe, opening: bool = False) -> None:
        if client.role != "sub" or client.sub is not None:
            raise Refused(P.ERR_BAD_REQUEST, "SUBSCRIBE is for a subscriber connection with no subscription yet")
        check_subscribe(msg, client.remote)
        name, size, seconds, clip, policy, max_inflight, sampler, cut, wait, token = msg
        stream = self.streams.get(name)
        if stream is None:
            if wait:
                # Held until the stream opens; the subscriber's own timeout bounds the wait.
                self.pending.setdefault(name, []).append((client, msg))
                log.info("%s waits for stream %r", client.label, name)
                return
            known = ", ".join(sorted(self.streams)) or "none"
            raise Refused(P.ERR_UNKNOWN_STREAM, f"no stream named {name!r} on this broker (streams: {known})")
        if seconds is not None:
            if stream.rate is None:
                raise Refused(P.ERR_BAD_REQUEST, f"seconds= needs a stream with a rate; {name!r} has none, use size=")
            size = max(1, round(seconds * stream.rate))
        assert size is not None
        if size * stream.sample_bytes > stream.reserve:
            raise Refused(
                P.ERR_BAD_REQUEST,
                f"a chunk of {size} samples ({size * stream.sample_bytes} bytes) is larger than stream {name!r} "
                f"allows (max_chunk_bytes={stream.reserve}); open the stream with a larger max_chunk_bytes",
            )
        if len(stream.subs) >= MAX_SUBSCRIBERS:
            raise Refused(P.ERR_BAD_REQUEST, f"stream {name!r} has the maximum of {MAX_SUBSCRIBERS} subscribers")
        try:
            if stream.grow(size * stream.sample_bytes):
                log.info("stream %r: slabs grown to carry chunks of %d bytes (%d bytes of shared memory)",
                         name, stream.committed, stream.segment.allocated)  # fmt: skip
        except ShmFullError as exc:
            raise Refused(P.ERR_SHM_FULL, f"chunks of {size} samples on stream {name!r}: {exc}") from None
        if cut != "local":
            client.sub = sub = BrokerCutSub(client, stream, size, clip, policy, max_inflight, sampler)  # type: ignore[arg-type]
            self._activate(stream, sub)
            return
        assert token is not None  # checked: a local subscription has one
        local = LocalSub(client, stream, size, clip, policy, max_inflight, P.token_topic(token))  # type: ignore[arg-type]
        client.sub = local
        if opening:
            stream.tokens.append(local.token)
            self._activate(stream, local)
        elif size * stream.sample_bytes > stream.carried and stream.publisher is not None:
            # Its chunks need a longer carry than the publisher makes: offer it once it confirms.
            stream.waiting.append(local)
            self._update_carry(stream)
        else:
            self._activate(stream, local, offer_only=True)

    def _activate(self, stream: Stream, sub: LocalSub | BrokerCutSub, offer_only: bool = False) -> None:
        """Send SUBSCRIBED; a broker-cut (or opening) subscription starts now, a local one at its ATTACH."""
        client = sub.client
        if offer_only:
            assert isinstance(sub, LocalSub)
            stream.joining.append(sub)  # until ATTACH: its notice socket is not proven connected yet
        else:
            self._start(stream, sub)
        reply = M.Subscribed(stream.segment.name, stream.segment.nbytes, stream.dtype.str, stream.channels,
                             stream.rate, sub.size, stream.head, tuple(stream.channel_names), stream.sid,
                             stream.header, stream.slab_bytes, stream.nslabs, stream.sample_bytes,
                             f"ipc://{stream.notice_path}", stream.meta)  # fmt: skip
        # A version-1 client gets the fields it knows.
        self._send(client.ident, reply if client.version == P.VERSION else M.encode(reply, 8))
        self._update_carry(stream)

    def _start(self, stream: Stream, sub: LocalSub | BrokerCutSub) -> None:
        if isinstance(sub, LocalSub):
            sub.cursor = stream.head
        else:
            stream.broker_cut.append(sub)
        stream.subs.append(sub)
        log.info("%s subscribed to %r: size=%d clip=%s policy=%s cut=%s", sub.client.label, stream.name, sub.size,
                 sub.clip, sub.policy, sub.cut)  # fmt: skip

    def _on_attach(self, client: Client, msg: M.Attach) -> None:
        # The subscriber's notice socket is connected (JOINED came): it starts at the head.
        # `slot`: it holds a shared lock on byte CLIENT_BASE + slot of the segment while it lives.
        sub = client.sub
        if not isinstance(sub, LocalSub):
            raise Refused(P.ERR_BAD_REQUEST, "ATTACH from a connection with no local subscription")
        stream = sub.stream
        if sub in stream.waiting:
            raise Refused(P.ERR_BAD_REQUEST, "ATTACH before SUBSCRIBED")
        if msg.slot is not None:
            if not 0 <= msg.slot < 1 << 31:
                raise Refused(P.ERR_BAD_REQUEST, f"ATTACH slot must be 0..2**31-1, got {msg.slot}")
            client.live = (stream, CLIENT_BASE + msg.slot)
        if sub in stream.joining:
            stream.joining.remove(sub)
            self._start(stream, sub)
        self._send(client.ident, M.Attached(sub.cursor))

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
        if isinstance(sub, BrokerCutSub):
            delivery.drop_backlog(sub)
            if sub in stream.broker_cut:
                stream.broker_cut.remove(sub)
        else:
            for pending in (stream.waiting, stream.joining):
                if sub in pending:
                    pending.remove(sub)
        if sub in stream.subs:
            stream.subs.remove(sub)
        if stream.ended and not stream.subs:
            if stream in self.draining:
                self._destroy(stream)
        elif not stream.ended:
            self._update_carry(stream)
            self._grant(stream)

    # ------------------------------------------------------------ status

    def _on_stats(self, client: Client, msg: M.Stats) -> None:
        stream = self.streams.get(msg.name) or next((s for s in self.draining if s.name == msg.name), None)
        if stream is None:
            known = ", ".join(sorted(self.streams)) or "none"
            raise Refused(P.ERR_UNKNOWN_STREAM, f"no stream named {msg.name!r} on this broker (streams: {known})")
        stats = statistics(stream)
        stats["subscribers"] = [
            {"label": u.client.label, "pid": u.client.pid, "delivered": u.delivered, "dropped": u.dropped,
             "overflows": u.overflows}
            for u in stream.subs
        ]  # fmt: skip
        self._send(client.ident, M.StatsReply(stats))

    def _on_sync(self, client: Client, msg: M.Sync) -> None:
        self._send(client.ident, M.Synced(msg.token))

    def _on_status(self, client: Client, msg: M.Status) -> None:
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
            "streams": [stream_status(s) for s in [*self.streams.values(), *self.draining]],
            "sources": self.sources() if self.sources is not None else [],
        }
