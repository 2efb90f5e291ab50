"""The broker: owns every stream's slabs, rechunks for each subscriber, sends notices, reclaims leases.

One thread, one ZeroMQ ROUTER socket.  Publishers copy each frame once into a
slab the broker granted them and send a small FRAME notice; the broker runs every
subscriber's :class:`~slabcast._rechunk.Rechunker` over the frame's position and
sends each completed chunk as a CHUNK notice (offset, length, t0, seq).  A chunk's
slab is leased until the subscriber releases it, and only slabs with no lease go
back to the publisher.  See docs/protocol.md for the messages.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from . import _protocol as P
from ._address import AddressLock, ipc_path, normalize
from ._exceptions import ProtocolError, ShmFullError
from ._rechunk import Rechunker
from ._shm import HEADER_BYTES, Segment, pid_alive, reap_stale, segment_prefix

__all__ = ["Broker"]

log = logging.getLogger("slabcast.broker")

_SWEEP_INTERVAL = 0.5  # seconds between liveness checks of client processes
_GRANT_AHEAD = 2  # slabs a publisher may hold beyond the one it writes
_MAX_SUBSCRIBERS = 256  # per stream
_REMOTE_SILENCE = 10.0  # seconds without a message (clients ping every second) before a TCP client is dropped
_MAX_INFLIGHT = 1024
_PAUSE_PREFETCH_MAX = 4096

_TCP = b"T"  # routing ids of TCP clients get this prefix (ZeroMQ's own ids start with 0x00)
# Plain ints: pyzmq's flag enums cost Python time on every call of the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)

# Slab states.
_FREE, _GRANTED, _CURRENT, _RETIRED = range(4)


class _Refused(Exception):
    """A request the broker answers with ERROR ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Client:
    __slots__ = ("ident", "label", "last_seen", "pid", "remote", "role", "stream", "sub")

    def __init__(self, ident: bytes, pid: int, role: str, label: str) -> None:
        self.ident = ident  # routing id; prefixed with b"T" for clients of the TCP socket
        self.remote = ident[:1] == _TCP
        self.last_seen = time.monotonic()
        self.pid = pid
        self.role = role
        self.label = label
        self.stream: _Stream | None = None  # the stream this client publishes
        self.sub: _Sub | None = None


class _Sub:
    """One subscription: its rechunker, its leases and its flow control."""

    __slots__ = (
        "backlog",
        "chunker",
        "client",
        "const_pause",
        "delivered",
        "delivered_at",
        "dropped",
        "end",
        "inflight",
        "jumped",
        "last_pause",
        "leases",
        "max_inflight",
        "overflows",
        "pauses",
        "policy",
        "remote_held",
        "seq",
        "starts",
        "stream",
    )

    def __init__(
        self, client: _Client, stream: _Stream, size: int, clip: bool, policy: str, max_inflight: int, sampler: Any
    ) -> None:
        self.client = client
        self.stream = stream
        self.policy = policy
        self.max_inflight = max_inflight
        self.inflight = 0
        self.leases: dict[int, int] = {}  # seq -> slab
        self.backlog: deque[tuple[int, bytes, int, int]] = deque()  # (seq, CHUNK, offset, nbytes) awaiting credit
        self.delivered_at: deque[tuple[int, float]] = deque()  # (seq, monotonic time), oldest first
        self.starts: dict[int, int] = {}  # seq -> stream index of the chunk's first sample, while leased
        self.remote_held: set[int] = set()  # chunks sent by value to a TCP client, not yet released
        self.seq = 0
        self.delivered = 0
        self.dropped = 0
        self.overflows = 0  # chunks that had to wait for credit (policy="block")
        self.jumped = False  # the next chunk follows a discontinuity
        self.end: tuple[str, str] | None = None  # END to send once the backlog is empty
        self.pauses: deque[float] = deque()
        self.last_pause = 0.0
        self.const_pause: float | None = None
        next_pause: Callable[[], float] | None = None
        if isinstance(sampler, int | float):
            self.const_pause = float(sampler)
            next_pause = self._const
        elif isinstance(sampler, tuple):
            self.pauses.extend(sampler)
            next_pause = self._next_pause
        self.chunker = Rechunker(size, clip, stream.rate, next_pause)

    def _const(self) -> float:
        return self.const_pause  # type: ignore[return-value]

    def _next_pause(self) -> float:
        # Pauses are drawn in the subscriber's process ahead of use; when it has fallen
        # further behind than its prefetch, the last value drawn stands in.
        if self.pauses:
            self.last_pause = self.pauses.popleft()
        return self.last_pause


class _Stream:
    """A stream's segment, slab states and the position of its newest sample."""

    def __init__(
        self,
        name: str,
        dtype: np.dtype[Any],
        channels: int,
        rate: float | None,
        slab_bytes: int,
        nslabs: int,
        reserve: int,
        channel_names: list[str],
        segment: Segment,
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.channels = channels
        self.rate = rate
        self.sample_bytes = dtype.itemsize * channels
        self.slab_bytes = slab_bytes
        self.nslabs = nslabs
        self.reserve = reserve
        self.channel_names = channel_names
        self.segment = segment
        self.u8 = np.frombuffer(segment.buf, dtype=np.uint8)
        self.state = [_FREE] * nslabs
        self.leases = [0] * nslabs
        self.free: deque[int] = deque(range(nslabs))
        self.granted: deque[int] = deque()
        self.current: int | None = None
        self.base_index = 0  # offset(index) = base_offset + (index - base_index) * sample_bytes
        self.base_offset = 0
        self.next_offset = -1
        self.slab_end = 0
        self.head = 0  # index of the next sample
        self.frames = 0
        self.publisher: _Client | None = None
        self.subs: list[_Sub] = []
        self.ended = False
        self.stats_window = 0.0  # seconds of stream time kept for rolling statistics; 0: none
        # Per frame: (t0, arrival, n, sum, sum of squares, min, max), the last three per channel.
        self.stat_frames: deque[tuple[float, float, int, Any, Any, Any, Any]] = deque()

    def account(self, offset: int, n: int, t0: float) -> None:
        """Add a frame to the rolling statistics: a few vectorised reductions, no per-sample Python."""
        v = self.u8[offset : offset + n * self.sample_bytes].view(self.dtype).reshape(n, self.channels)
        # Reductions down the strided sample axis are several times slower than along
        # contiguous rows: one channels-first copy pays for itself.
        w = np.ascontiguousarray(v.T)
        frames = self.stat_frames
        frames.append(
            (
                t0,
                time.monotonic(),
                n,
                w.sum(axis=1, dtype=np.float64),
                np.einsum("ij,ij->i", w, w, dtype=np.float64),
                w.min(axis=1),
                w.max(axis=1),
            )
        )
        # Keep the frames that start within the last window of stream time (up to the newest sample's end).
        horizon = t0 + (n / self.rate if self.rate else 0.0) - self.stats_window - 1e-9
        while frames[0][0] < horizon:
            frames.popleft()

    def statistics(self) -> dict[str, Any]:
        """Rolling per-channel statistics over the last ``stats_window`` seconds, plus totals."""
        out: dict[str, Any] = {"name": self.name, "samples": self.head, "frames": self.frames,
                               "window_seconds": self.stats_window}  # fmt: skip
        frames = self.stat_frames
        if not frames:
            return out
        n = sum(f[2] for f in frames)
        total = np.sum([f[3] for f in frames], axis=0)
        squares = np.sum([f[4] for f in frames], axis=0)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
        lo = np.min([f[5] for f in frames], axis=0)
        hi = np.max([f[6] for f in frames], axis=0)
        span = frames[-1][1] - frames[0][1]
        out.update(
            window_samples=n,
            observed_rate=(n - frames[0][2]) / span if span > 0 else None,
            mean=mean.tolist(),
            std=std.tolist(),
            min=lo.tolist(),
            max=hi.tolist(),
            ptp=(hi.astype(np.float64) - lo).tolist(),
        )
        return out

    def slab_start(self, slab: int) -> int:
        return HEADER_BYTES + slab * self.slab_bytes

    def unpin(self, slab: int) -> None:
        self.leases[slab] -= 1
        if self.leases[slab] == 0 and self.state[slab] == _RETIRED:
            self.state[slab] = _FREE
            self.free.append(slab)


class Broker:
    """The broker's state and event loop.

    Parameters
    ----------
    address : str, optional
        ``ipc://path``, a socket path, or ``None`` for the per-user default.
    shm_mode : int
        Permission bits of the segments it creates (``0o600``, or ``0o660`` for
        consumers in a shared group).

    Notes
    -----
    Construct it, then call :meth:`serve` (blocking).  SIGINT and SIGTERM, or
    :meth:`stop` from a signal handler, end :meth:`serve` cleanly: every client is
    told, every segment is unlinked, the socket and lock files are removed.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        shm_mode: int = 0o600,
        lease_timeout: float = 30.0,
        tcp: str | None = None,
        curve_secret: str | None = None,
        curve_clients: str | None = None,
    ) -> None:
        self.address = normalize(address)
        self.shm_mode = shm_mode
        self.lease_timeout = lease_timeout
        self.pid = os.getpid()
        self.epoch = secrets.randbits(32)
        self.started = time.time()
        self._lock = AddressLock(self.address) if ipc_path(self.address) else None
        reaped = reap_stale()
        if reaped:
            log.info("removed %d segments of dead brokers: %s", len(reaped), ", ".join(reaped))
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        self._router.setsockopt(zmq.SNDHWM, 0)  # credit-based flow control bounds what we queue
        self._router.setsockopt(zmq.RCVHWM, 0)
        self._router.setsockopt(zmq.LINGER, 1000)
        try:
            self._router.bind(self.address)
        except zmq.ZMQError as exc:
            self._close_sockets()
            if self._lock:
                self._lock.release()
            raise OSError(f"cannot bind the broker to {self.address}: {exc}") from exc
        self._monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._tcp: zmq.Socket[Any] | None = None
        self._auth: Any = None
        self.tcp_address: str | None = None
        if tcp is not None:
            self._bind_tcp(tcp, curve_secret, curve_clients)
        self._clients: dict[bytes, _Client] = {}
        self._streams: dict[str, _Stream] = {}  # open streams by name
        self._draining: list[_Stream] = []  # ended streams whose subscribers are still attached
        self._outbox: dict[bytes, deque[Any]] = {}
        self._segments = 0
        self._stopping = False
        self._last_sweep = 0.0
        self._handlers: dict[int, Callable[[_Client, tuple[Any, ...]], None]] = {
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
        }

    def _bind_tcp(self, tcp: str, curve_secret: str | None, curve_clients: str | None) -> None:
        """Listen on TCP for remote subscribers; CURVE encryption and a client allow-list are required."""
        from zmq.auth import load_certificate
        from zmq.auth.thread import ThreadAuthenticator

        if not curve_secret or not curve_clients:
            self._close_sockets()
            raise ValueError("TCP needs CURVE: give the broker's secret key file and a directory of client public keys")
        public, secret = load_certificate(curve_secret)
        if secret is None:
            self._close_sockets()
            raise ValueError(f"{curve_secret} holds no secret key (use the *.key_secret file from `slabcast keygen`)")
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("slabcast.broker.auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=curve_clients)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        endpoint = tcp if tcp.startswith("tcp://") else f"tcp://{tcp}"
        sock.bind(endpoint)
        self._tcp = sock
        self.tcp_address = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------------ loop

    def stop(self, *_: Any) -> None:
        """Ask :meth:`serve` to finish (safe from a signal handler)."""
        self._stopping = True

    def serve(
        self,
        ready: Callable[[], None] | None = None,
        handle_signals: bool = True,
        start: Callable[[], None] | None = None,
        ready_when: Callable[[], bool] | None = None,
    ) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM; then shut down cleanly.

        ``start()`` runs once the socket is bound, before the loop (start hosted
        sources there); ``ready()`` runs as soon as ``ready_when()`` is true
        (checked every loop turn; at once without it).
        """
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old: list[Any] = []
        if handle_signals:
            old = [signal.signal(signal.SIGTERM, self.stop), signal.signal(signal.SIGINT, self.stop)]
            old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        if self._tcp is not None:
            poller.register(self._tcp, zmq.POLLIN)
        log.info("broker %d serving %s", self.pid, self.address)
        if start is not None:
            start()
        pending_ready = ready
        try:
            while not self._stopping:
                if pending_ready is not None and (ready_when is None or ready_when()):
                    pending_ready()  # the TCP endpoint, if any, is in self.tcp_address
                    pending_ready = None
                timeout = _SWEEP_INTERVAL if pending_ready is None else 0.01
                events = dict(poller.poll(int(timeout * 1000)))
                if self._router in events:
                    self._drain()
                if self._tcp is not None and self._tcp in events:
                    self._drain(self._tcp)
                if self._monitor in events:
                    self._drain_monitor()
                if wake_r.fileno() in events:
                    with contextlib.suppress(OSError):
                        wake_r.recv(4096)
                if self._outbox:
                    self._flush_outbox()
                if time.monotonic() - self._last_sweep >= _SWEEP_INTERVAL:
                    self._sweep()
        finally:
            if handle_signals:
                signal.set_wakeup_fd(old_fd)
                signal.signal(signal.SIGTERM, old[0])
                signal.signal(signal.SIGINT, old[1])
            wake_r.close()
            wake_w.close()
            self._shutdown()

    def _drain(self, sock: zmq.Socket[Any] | None = None, limit: int = 10_000) -> None:
        router = sock if sock is not None else self._router
        prefix = _TCP if router is self._tcp else b""
        recv = router.recv
        for _ in range(limit):
            # Plain recv with integer flags: recv_multipart's per-call Python costs show in profiles.
            try:
                ident = recv(_NOBLOCK)
            except zmq.Again:
                return
            parts = [recv(_NOBLOCK)]  # a ROUTER delivers whole messages: the rest is there
            while router.getsockopt(_RCVMORE):
                parts.append(recv(_NOBLOCK))
            key = prefix + ident
            if len(parts) != 1:
                self._error(key, P.ERR_MALFORMED, f"expected one message part, got {len(parts)}")
                continue
            self._on_message(key, parts[0])

    def _drain_monitor(self) -> None:
        disconnected = False
        while True:
            try:
                self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            disconnected = True
        if disconnected:
            self._sweep()

    def _sweep(self) -> None:
        """Drop dead clients (after handling what they sent); evict subscribers that hold leases too long."""
        now = self._last_sweep = time.monotonic()
        if self.lease_timeout > 0:
            for stream in list(self._streams.values()):
                for sub in list(stream.subs):
                    self._check_leases(sub, now)
        dead = [
            c
            for c in self._clients.values()
            if (c.pid > 0 and not c.remote and not pid_alive(c.pid))
            or (c.remote and now - c.last_seen > _REMOTE_SILENCE)
        ]
        if not dead:
            return
        self._drain()
        if self._tcp is not None:
            self._drain(self._tcp)
        for client in dead:
            if client.ident in self._clients:
                log.warning("client %s (pid %d, %s) died; reclaiming its leases", client.label, client.pid, client.role)
                self._drop_client(client, gone=True)

    def _check_leases(self, sub: _Sub, now: float) -> None:
        held = sub.delivered_at
        while held and held[0][0] not in sub.leases and held[0][0] not in sub.remote_held:
            held.popleft()
        if not held or now - held[0][1] <= self.lease_timeout:
            return
        # Evicting stops the chunks and frees its queue; memory it may still see stays leased
        # until it releases it or dies, because overwriting a visible chunk is never an option.
        log.warning(
            "evicting %s (pid %d) from %r: chunk seq=%d held for %.1f s > lease_timeout %.1f s",
            sub.client.label,
            sub.client.pid,
            sub.stream.name,
            held[0][0],
            now - held[0][1],
            self.lease_timeout,
        )
        held.clear()
        self._detach(sub)
        message = f"evicted: a chunk was held longer than the broker's lease_timeout ({self.lease_timeout:g} s)"
        self._send(sub.client.ident, P.pack([P.END, P.END_EVICTED, message, sub.seq]))

    # ------------------------------------------------------------- messages

    def _on_message(self, ident: bytes, raw: bytes) -> None:
        client = self._clients.get(ident)
        if client is not None:
            client.last_seen = time.monotonic()
        try:
            msg = P.unpack(raw)
            if client is None:
                if msg[0] != P.HELLO:
                    raise ProtocolError(f"expected HELLO as the first message, got kind {msg[0]}")
                self._on_hello(ident, msg)
                return
            handler = self._handlers.get(msg[0])
            if handler is None:
                raise ProtocolError(f"unknown message kind {msg[0]}")
            handler(client, msg)
        except ProtocolError as exc:
            self._error(ident, P.ERR_MALFORMED, str(exc))
        except _Refused as exc:
            self._error(ident, exc.code, str(exc))
        except Exception as exc:  # one bad message must never take the broker down
            log.exception("error handling a message from %r", ident)
            self._error(ident, P.ERR_MALFORMED, f"{type(exc).__name__}: {exc}")

    def _send(self, ident: bytes, payload: bytes) -> None:
        box = self._outbox.get(ident)
        if box is not None:
            box.append(payload)
            return
        try:
            sock = self._tcp if ident[:1] == _TCP and self._tcp is not None else self._router
            sock.send(ident.removeprefix(_TCP), _SNDMORE_NOBLOCK)
            sock.send(payload, _NOBLOCK)  # the ROUTER took the first part: the message goes whole
        except zmq.Again:
            self._outbox[ident] = deque([payload])
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer's connection is gone, but what it sent before may still
            # be queued here; it is dropped on its BYE or when its process is found dead.
            if exc.errno != errno.EHOSTUNREACH:
                raise

    def _sock_for(self, ident: bytes) -> zmq.Socket[Any]:
        if ident[:1] == _TCP and self._tcp is not None:
            return self._tcp
        return self._router

    def _send_chunk_by_value(self, ident: bytes, payload: bytes, data: Any) -> None:
        # A TCP client shares no memory with us: the samples travel in a second frame.
        parts = (ident.removeprefix(_TCP), payload, data)
        box = self._outbox.get(ident)
        if box is None:
            try:
                self._sock_for(ident).send_multipart(parts, zmq.NOBLOCK, copy=True)
                return
            except zmq.Again:
                box = self._outbox[ident] = deque()
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                return
        box.append((payload, bytes(data)))

    def _flush_outbox(self) -> None:
        for ident in list(self._outbox):
            box = self._outbox[ident]
            while box:
                head = box[0]
                frames = head if isinstance(head, tuple) else (head,)
                try:
                    self._sock_for(ident).send_multipart((ident.removeprefix(_TCP), *frames), zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    box.clear()
                    break
                box.popleft()
            if not box:
                del self._outbox[ident]

    def _error(self, ident: bytes, code: str, message: str) -> None:
        self._send(ident, P.pack([P.ERROR, code, message]))

    def _on_hello(self, ident: bytes, msg: tuple[Any, ...]) -> None:
        if len(msg) < 2 or type(msg[1]) is not int:
            raise ProtocolError("HELLO must start [HELLO, version, ...]")
        if msg[1] != P.VERSION:
            raise _Refused(
                P.ERR_VERSION,
                f"protocol version mismatch: broker speaks version {P.VERSION}, client speaks version {msg[1]}",
            )
        P.check_fields(msg, int, int, str, str)
        role = msg[3]
        if role not in ("pub", "sub", "ctl"):
            raise ProtocolError(f"HELLO role must be 'pub', 'sub' or 'ctl', got {role!r}")
        self._clients[ident] = _Client(ident, msg[2], role, msg[4][:128])
        self._send(ident, P.pack([P.WELCOME, P.VERSION, self.pid, self.epoch]))

    def _on_open(self, client: _Client, msg: tuple[Any, ...]) -> None:
        P.check_fields(msg, str, str, int, (int, float, type(None)), int, int, int, (tuple, type(None)), (int, float))
        _, name, dtype_s, channels, rate, slab_bytes, nslabs, max_chunk_bytes, names, stats_window = msg
        if client.role != "pub" or client.stream is not None or client.sub is not None:
            raise _Refused(P.ERR_BAD_REQUEST, "OPEN is for a publisher connection that has no stream yet")
        if client.remote:
            raise _Refused(P.ERR_BAD_REQUEST, "publishers must run on the broker's host (they write shared memory)")
        try:
            P.check_stream_name(name)
            dtype = P.check_dtype(dtype_s)
        except (TypeError, ValueError) as exc:
            raise _Refused(P.ERR_BAD_REQUEST, str(exc)) from None
        if not 1 <= channels <= 65535:
            raise _Refused(P.ERR_BAD_REQUEST, f"channels must be 1..65535, got {channels}")
        if rate is not None and not (rate > 0 and rate < float("inf")):
            raise _Refused(P.ERR_BAD_REQUEST, f"rate must be a positive number of Hz or nil, got {rate!r}")
        if slab_bytes < 4096 or slab_bytes % 4096 or slab_bytes > 1 << 30:
            raise _Refused(P.ERR_BAD_REQUEST, f"slab_bytes must be a multiple of 4096 in 4096..2**30, got {slab_bytes}")
        if not 2 <= nslabs <= 4096:
            raise _Refused(P.ERR_BAD_REQUEST, f"nslabs must be 2..4096, got {nslabs}")
        sample_bytes = dtype.itemsize * channels
        reserve = max_chunk_bytes // sample_bytes * sample_bytes
        if reserve < sample_bytes or slab_bytes - reserve < sample_bytes:
            raise _Refused(
                P.ERR_BAD_REQUEST,
                f"max_chunk_bytes must leave room for one sample ({sample_bytes} bytes) on each side of "
                f"a {slab_bytes}-byte slab, got {max_chunk_bytes}",
            )
        if names is None:
            names = [f"ch_{i}" for i in range(channels)]
        elif len(names) != channels or not all(isinstance(n, str) for n in names):
            raise _Refused(P.ERR_BAD_REQUEST, f"channel_names must be {channels} strings, got {names!r}")
        if name in self._streams:
            raise _Refused(P.ERR_STREAM_EXISTS, f"stream {name!r} already has a publisher")
        seg_name = segment_prefix(self.pid, self.epoch) + str(self._segments)
        self._segments += 1
        try:
            segment = Segment(seg_name, HEADER_BYTES + nslabs * slab_bytes, self.shm_mode)
        except ShmFullError as exc:
            raise _Refused(P.ERR_SHM_FULL, str(exc)) from None
        segment.write_header(
            slab_bytes=slab_bytes,
            nslabs=nslabs,
            sample_bytes=sample_bytes,
            channels=channels,
            broker_pid=self.pid,
            rate=rate,
            dtype=dtype.str,
            epoch=self.epoch,
            name=name,
        )
        stream = _Stream(
            name, dtype, channels, float(rate) if rate else None, slab_bytes, nslabs, reserve, list(names), segment
        )
        if stats_window < 0 or stats_window > 3600:
            raise _Refused(P.ERR_BAD_REQUEST, f"statistics window must be 0..3600 s, got {stats_window!r}")
        # Raw byte streams have no sample values to summarise.
        byte_stream = dtype == np.uint8 and channels == 1
        stream.stats_window = float(stats_window) if dtype.kind in "iuf" and not byte_stream else 0.0
        stream.publisher = client
        client.stream = stream
        self._streams[name] = stream
        log.info(
            "stream %r opened by %s: %s x %d @ %s Hz, %d slabs of %d bytes",
            name,
            client.label,
            dtype,
            channels,
            rate,
            nslabs,
            slab_bytes,
        )
        self._send(
            client.ident,
            P.pack([P.OPENED, seg_name, segment.nbytes, HEADER_BYTES, slab_bytes, nslabs, reserve, sample_bytes]),
        )
        self._grant(stream)

    def _grant(self, stream: _Stream) -> None:
        publisher = stream.publisher
        if publisher is None:
            return
        while stream.free and len(stream.granted) < _GRANT_AHEAD:
            slab = stream.free.popleft()
            stream.state[slab] = _GRANTED
            stream.granted.append(slab)
            self._send(publisher.ident, P.pack([P.GRANT, slab]))

    def _on_frame(self, client: _Client, msg: tuple[Any, ...]) -> None:
        jump = False
        if len(msg) == 5:  # [FRAME, offset, n, t0, flags]
            P.check_fields(msg, int, int, (int, float), int)
            jump = bool(msg[4] & P.FLAG_DISCONTINUITY)
            msg = msg[:4]
        elif len(msg) != 4 or type(msg[1]) is not int or type(msg[2]) is not int or type(msg[3]) not in (float, int):
            P.check_fields(msg, int, int, (int, float))
        _, offset, n, t0 = msg
        stream = client.stream
        if stream is None:
            raise _Refused(P.ERR_BAD_REQUEST, "FRAME from a connection that publishes no stream")
        self._frame(stream, offset, n, float(t0), jump)  # CHUNK carries t0 as a float whatever FRAME held

    def _on_frames(self, client: _Client, msg: tuple[Any, ...]) -> None:
        # [FRAMES, offset, [n, ...], [t0, ...]]: frames packed back to back from offset, in one slab.
        P.check_fields(msg, int, tuple, tuple)
        _, offset, ns, t0s = msg
        stream = client.stream
        if stream is None:
            raise _Refused(P.ERR_BAD_REQUEST, "FRAMES from a connection that publishes no stream")
        if len(ns) != len(t0s) or not 1 <= len(ns) <= P.MAX_BATCH:
            raise ProtocolError(f"FRAMES needs 1..{P.MAX_BATCH} sizes and as many times, got {len(ns)} and {len(t0s)}")
        for n, t0 in zip(ns, t0s, strict=True):
            if type(n) is not int or type(t0) not in (float, int):
                raise ProtocolError(f"FRAMES sizes must be int and times numbers, got {n!r} and {t0!r}")
        for n, t0 in zip(ns, t0s, strict=True):
            self._frame(stream, offset, n, float(t0), False)
            offset += n * stream.sample_bytes

    def _frame(self, stream: _Stream, offset: int, n: int, t0: float, jump: bool) -> None:
        """Account for one frame the publisher wrote at ``offset``: cut and send the chunks it completes."""
        nbytes = n * stream.sample_bytes
        if n <= 0:
            raise _Refused(P.ERR_FRAME, f"FRAME must hold at least one sample, got n={n}")
        if offset != stream.next_offset:
            # The first frame of a new slab: the publisher moved to the oldest slab it was granted.
            if not stream.granted or offset != stream.slab_start(stream.granted[0]) + stream.reserve:
                expected = f"{stream.next_offset}" if stream.current is not None else "none yet"
                raise _Refused(
                    P.ERR_FRAME,
                    f"FRAME offset {offset} is neither the next offset ({expected}) nor the data start "
                    f"of the next granted slab (granted: {list(stream.granted)})",
                )
            self._switch_slab(stream, stream.granted.popleft())
        if offset + nbytes > stream.slab_end:
            raise _Refused(P.ERR_FRAME, f"FRAME of {nbytes} bytes at offset {offset} overruns its slab")
        stream.next_offset = offset + nbytes
        index = stream.head
        stream.head = index + n
        stream.frames += 1
        if jump:
            # The source was swapped or reconnected: no chunk may span the jump.
            for sub in stream.subs:
                sub.chunker.start = None
                sub.jumped = True
        for sub in stream.subs:
            chunks = sub.chunker.feed(index, n, t0)
            if chunks:
                for start, length, ct0 in chunks:
                    self._emit(stream, sub, start, length, ct0)
        if stream.stats_window:  # after the notices are out: off the latency path
            stream.account(offset, n, t0)

    def _switch_slab(self, stream: _Stream, slab: int) -> None:
        start = stream.slab_start(slab)
        new_base = start + stream.reserve
        old = stream.current
        if old is not None:
            # Carry what subscribers have accumulated so every chunk stays inside one slab.
            pending = [s.chunker.start for s in stream.subs if s.chunker.start is not None]
            if pending:
                lo = min(pending)
                nbytes = (stream.head - lo) * stream.sample_bytes
                src = stream.base_offset + (lo - stream.base_index) * stream.sample_bytes
                stream.u8[new_base - nbytes : new_base] = stream.u8[src : src + nbytes]
            stream.state[old] = _RETIRED
            if stream.leases[old] == 0:
                stream.state[old] = _FREE
                stream.free.append(old)
        stream.state[slab] = _CURRENT
        stream.current = slab
        stream.base_index = stream.head
        stream.base_offset = new_base
        stream.slab_end = start + stream.slab_bytes
        self._grant(stream)

    def _emit(self, stream: _Stream, sub: _Sub, start: int, length: int, t0: float) -> None:
        seq = sub.seq
        sub.seq = seq + 1
        if sub.policy == "drop" and (sub.inflight >= sub.max_inflight or sub.backlog):
            sub.dropped += 1
            return
        offset = stream.base_offset + (start - stream.base_index) * stream.sample_bytes
        remote = sub.client.remote
        flags = P.FLAG_INLINE if remote else 0
        if sub.jumped:
            sub.jumped = False
            flags |= P.FLAG_DISCONTINUITY
        payload = P.pack([P.CHUNK, seq, start, length, t0, 0 if remote else offset, flags])
        slab = stream.current
        assert slab is not None
        stream.leases[slab] += 1
        sub.leases[seq] = slab
        sub.starts[seq] = start
        if sub.inflight < sub.max_inflight and not sub.backlog:
            self._deliver(sub, seq, payload, offset, length * stream.sample_bytes)
        else:
            sub.backlog.append((seq, payload, offset, length * stream.sample_bytes))
            sub.overflows += 1

    def _deliver(self, sub: _Sub, seq: int, payload: bytes, offset: int, nbytes: int) -> None:
        sub.inflight += 1
        sub.delivered += 1
        sub.delivered_at.append((seq, time.monotonic()))
        if sub.client.remote:
            stream = sub.stream
            self._send_chunk_by_value(sub.client.ident, payload, stream.u8[offset : offset + nbytes])
            stream.unpin(sub.leases.pop(seq))  # the bytes were copied into the message
            sub.remote_held.add(seq)
        else:
            self._send(sub.client.ident, payload)

    def _on_close(self, client: _Client, msg: tuple[Any, ...]) -> None:
        P.check_fields(msg)
        if client.stream is None:
            raise _Refused(P.ERR_BAD_REQUEST, "CLOSE from a connection that publishes no stream")
        stream = client.stream
        self._end_stream(stream, P.END_CLOSED, "the publisher closed the stream")
        self._send(client.ident, P.pack([P.END, P.END_CLOSED, f"stream {stream.name!r} closed", 0]))

    def _end_stream(self, stream: _Stream, code: str, message: str) -> None:
        if stream.ended:
            return
        stream.ended = True
        log.info("stream %r ended (%s) after %d samples", stream.name, code, stream.head)
        if stream.publisher is not None:
            stream.publisher.stream = None
            stream.publisher = None
        self._streams.pop(stream.name, None)
        for slab in stream.granted:
            stream.state[slab] = _FREE
        stream.granted.clear()
        for sub in stream.subs:
            if sub.backlog:
                sub.end = (code, message)  # sent once the backlog has drained
            else:
                self._send(sub.client.ident, P.pack([P.END, code, message, sub.seq]))
        if stream.subs:
            self._draining.append(stream)
        else:
            self._destroy(stream)

    def _destroy(self, stream: _Stream) -> None:
        del stream.u8
        stream.segment.destroy()
        with contextlib.suppress(ValueError):
            self._draining.remove(stream)
        log.info("stream %r: segment %s unlinked", stream.name, stream.segment.name)

    def _on_subscribe(self, client: _Client, msg: tuple[Any, ...]) -> None:
        P.check_fields(msg, str, (int, type(None)), (int, float, type(None)), bool, str, int, None)
        _, name, size, seconds, clip, policy, max_inflight, sampler = msg
        if client.role != "sub" or client.sub is not None:
            raise _Refused(P.ERR_BAD_REQUEST, "SUBSCRIBE is for a subscriber connection with no subscription yet")
        stream = self._streams.get(name)
        if stream is None:
            known = ", ".join(sorted(self._streams)) or "none"
            raise _Refused(P.ERR_UNKNOWN_STREAM, f"no stream named {name!r} on this broker (streams: {known})")
        if policy not in P.POLICIES:
            raise _Refused(P.ERR_BAD_REQUEST, f"policy must be 'block' or 'drop', got {policy!r}")
        if not 1 <= max_inflight <= _MAX_INFLIGHT:
            raise _Refused(P.ERR_BAD_REQUEST, f"max_inflight must be 1..{_MAX_INFLIGHT}, got {max_inflight}")
        if (size is None) == (seconds is None):
            raise _Refused(P.ERR_BAD_REQUEST, "give exactly one of size (samples) and seconds")
        if seconds is not None:
            if stream.rate is None:
                raise _Refused(P.ERR_BAD_REQUEST, f"seconds= needs a stream with a rate; {name!r} has none, use size=")
            if not seconds > 0:
                raise _Refused(P.ERR_BAD_REQUEST, f"seconds must be > 0, got {seconds!r}")
            size = max(1, round(seconds * stream.rate))
        assert size is not None
        if size <= 0:
            raise _Refused(P.ERR_BAD_REQUEST, f"size must be a positive integer number of samples, got {size}")
        if size * stream.sample_bytes > stream.reserve:
            raise _Refused(
                P.ERR_BAD_REQUEST,
                f"a chunk of {size} samples ({size * stream.sample_bytes} bytes) is larger than stream {name!r} "
                f"allows (max_chunk_bytes={stream.reserve}); open the stream with larger slab_bytes/max_chunk_bytes",
            )
        if sampler is not None and not isinstance(sampler, int | float | tuple):
            raise ProtocolError(f"SUBSCRIBE sampler must be nil, a number or an array of numbers, got {sampler!r}")
        values = sampler if isinstance(sampler, tuple) else (sampler,) if sampler is not None else ()
        if len(values) > _PAUSE_PREFETCH_MAX or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            raise _Refused(P.ERR_BAD_REQUEST, f"sampler values must be numbers >= 0, got {sampler!r}")
        if len(stream.subs) >= _MAX_SUBSCRIBERS:
            raise _Refused(P.ERR_BAD_REQUEST, f"stream {name!r} has the maximum of {_MAX_SUBSCRIBERS} subscribers")
        sub = _Sub(client, stream, size, clip, policy, max_inflight, sampler)
        client.sub = sub
        stream.subs.append(sub)
        log.info("%s subscribed to %r: size=%d clip=%s policy=%s", client.label, name, size, clip, policy)
        self._send(
            client.ident,
            P.pack(
                [
                    P.SUBSCRIBED,
                    stream.segment.name,
                    stream.segment.nbytes,
                    stream.dtype.str,
                    stream.channels,
                    stream.rate,
                    size,
                    stream.head,
                    stream.channel_names,
                ]
            ),
        )

    def _on_release(self, client: _Client, msg: tuple[Any, ...]) -> None:
        if len(msg) != 3 or type(msg[1]) is not tuple or type(msg[2]) is not tuple:
            P.check_fields(msg, tuple, tuple)
        sub = client.sub
        if sub is None:
            raise _Refused(P.ERR_BAD_REQUEST, "RELEASE from a connection with no subscription")
        stream = sub.stream
        unknown = []
        for seq in msg[1]:
            sub.starts.pop(seq, None)
            slab = sub.leases.pop(seq, None) if type(seq) is int else None
            if slab is not None:
                stream.unpin(slab)
            elif seq in sub.remote_held:
                sub.remote_held.discard(seq)
            else:
                unknown.append(seq)
                continue
            sub.inflight -= 1
        for value in msg[2][: _PAUSE_PREFETCH_MAX - len(sub.pauses)]:
            if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                sub.pauses.append(float(value))
        while sub.backlog and sub.inflight < sub.max_inflight and sub in stream.subs:
            self._deliver(sub, *sub.backlog.popleft())
        if sub.end is not None and not sub.backlog:
            code, message = sub.end
            sub.end = None
            self._send(client.ident, P.pack([P.END, code, message, sub.seq]))
        if not stream.ended:
            self._grant(stream)
        if unknown:
            raise ProtocolError(f"RELEASE of chunks this subscriber does not hold: {unknown[:10]!r}")

    def _on_bye(self, client: _Client, msg: tuple[Any, ...]) -> None:
        P.check_fields(msg)
        seq = client.sub.seq if client.sub is not None else 0
        self._drop_client(client, gone=False)
        self._send(client.ident, P.pack([P.END, P.END_BYE, "goodbye", seq]))

    def _on_unsubscribe(self, client: _Client, msg: tuple[Any, ...]) -> None:
        # No more chunks; the leases it holds stay until RELEASE, BYE or its death.
        P.check_fields(msg)
        sub = client.sub
        if sub is None:
            raise _Refused(P.ERR_BAD_REQUEST, "UNSUBSCRIBE from a connection with no subscription")
        self._detach(sub)

    def _detach(self, sub: _Sub) -> None:
        stream = sub.stream
        for seq, *_ in sub.backlog:
            stream.unpin(sub.leases.pop(seq))
        sub.backlog.clear()
        if sub in stream.subs:
            stream.subs.remove(sub)
        if stream.ended and not stream.subs:
            if stream in self._draining:
                self._destroy(stream)
        elif not stream.ended:
            self._grant(stream)

    def _drop_client(self, client: _Client, gone: bool) -> None:
        """Forget a client: reclaim its leases, or end the stream it publishes."""
        self._clients.pop(client.ident, None)
        self._outbox.pop(client.ident, None)
        if client.stream is not None:
            self._end_stream(client.stream, P.END_PUBLISHER_GONE, f"the publisher ({client.label}) went away")
        sub = client.sub
        if sub is not None:
            client.sub = None
            stream = sub.stream
            log.info("%s left %r (%s)", client.label, stream.name, "died" if gone else "bye")
            self._detach(sub)
            for slab in sub.leases.values():
                stream.unpin(slab)
            sub.leases.clear()
            if stream.ended and not stream.subs and stream in self._draining:
                self._destroy(stream)
            elif not stream.ended:
                self._grant(stream)

    def _on_stats(self, client: _Client, msg: tuple[Any, ...]) -> None:
        P.check_fields(msg, str)
        stream = self._streams.get(msg[1]) or next((s for s in self._draining if s.name == msg[1]), None)
        if stream is None:
            known = ", ".join(sorted(self._streams)) or "none"
            raise _Refused(P.ERR_UNKNOWN_STREAM, f"no stream named {msg[1]!r} on this broker (streams: {known})")
        stats = stream.statistics()
        stats["subscribers"] = [
            {"label": u.client.label, "pid": u.client.pid, "delivered": u.delivered, "dropped": u.dropped,
             "overflows": u.overflows}
            for u in stream.subs
        ]  # fmt: skip
        self._send(client.ident, P.pack([P.STATS_REPLY, stats]))

    def _on_sync(self, client: _Client, msg: tuple[Any, ...]) -> None:
        P.check_fields(msg, int)
        self._send(client.ident, P.pack([P.SYNCED, msg[1]]))

    def _on_status(self, client: _Client, msg: tuple[Any, ...]) -> None:
        P.check_fields(msg)
        self._send(client.ident, P.pack([P.STATUS_REPLY, self.status()]))

    @staticmethod
    def _sub_status(stream: _Stream, sub: _Sub) -> dict[str, Any]:
        # Lag: samples between the oldest one this subscriber is not done with and the newest.
        pending = sub.chunker.start if sub.chunker.start is not None else stream.head
        lag = stream.head - min(sub.starts.values(), default=pending)
        return {
            "label": sub.client.label,
            "pid": sub.client.pid,
            "size": sub.chunker.size,
            "clip": sub.chunker.clip,
            "policy": sub.policy,
            "seq": sub.seq,
            "delivered": sub.delivered,
            "dropped": sub.dropped,
            "leases": len(sub.leases),
            "lag_samples": lag,
            "lag_seconds": lag / stream.rate if stream.rate else None,
            "backlog": len(sub.backlog),
            "overflows": sub.overflows,
        }

    def status(self) -> dict[str, Any]:
        """Return the broker's state as plain data (streams, subscribers, pool use)."""
        streams = []
        for s in [*self._streams.values(), *self._draining]:
            streams.append(
                {
                    "name": s.name,
                    "dtype": s.dtype.str,
                    "channels": s.channels,
                    "rate": s.rate,
                    "samples": s.head,
                    "frames": s.frames,
                    "ended": s.ended,
                    "slabs": s.nslabs,
                    "slab_bytes": s.slab_bytes,
                    "slabs_free": len(s.free),
                    "statistics": s.statistics(),
                    "channel_names": s.channel_names,
                    "subscribers": [self._sub_status(s, u) for u in s.subs],
                }
            )
        from . import __version__

        return {
            "pid": self.pid,
            "version": __version__,
            "protocol": P.VERSION,
            "address": self.address,
            "tcp_address": self.tcp_address,
            "uptime": time.time() - self.started,
            "clients": len(self._clients),
            "streams": streams,
        }

    # -------------------------------------------------------------- shutdown

    def _shutdown(self) -> None:
        log.info("broker %d shutting down", self.pid)
        with contextlib.suppress(zmq.ZMQError):
            self._drain()
        for ident, client in list(self._clients.items()):
            seq = client.sub.seq if client.sub is not None else 0
            with contextlib.suppress(zmq.ZMQError):
                self._send(ident, P.pack([P.END, P.END_BROKER_SHUTDOWN, "the broker shut down", seq]))
        with contextlib.suppress(zmq.ZMQError):
            self._flush_outbox()
        for stream in [*self._streams.values(), *self._draining]:
            self._destroy(stream)
        self._streams.clear()
        self._close_sockets()
        if self._lock is not None:
            self._lock.release()

    def _close_sockets(self) -> None:
        self._tcp = getattr(self, "_tcp", None)
        self._auth = getattr(self, "_auth", None)
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            self._router.disable_monitor()
            monitor.close(linger=0)
        self._router.close(linger=1000)
        if self._tcp is not None:
            self._tcp.close(linger=1000)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
