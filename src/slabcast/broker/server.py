"""The broker: owns every stream's slabs, grants them, tracks readers' cursors and liveness, reclaims slabs.

One thread, one ZeroMQ ROUTER socket, the control plane only.  Publishers copy
each frame once into a slab the broker granted them, publish one notice on their
own notice socket (read by every local subscriber of the stream, who cut their
own chunks) and send the broker a FRAME so it knows the stream's head.  The
broker grants slabs, holds back their reuse for lossless subscribers' cursors
(reported by ACK), and cuts chunks itself only for version-1 and TCP
subscribers.  See docs/architecture.md and docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import resource
import secrets
import signal
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import zmq

from .._exceptions import ProtocolError, ShmFullError
from .._info import StreamInfo
from ..core.pool import SlabPool
from ..core.rechunk import Rechunker
from ..core.shm import (
    CLIENT_BASE,
    GEN_OFFSET,
    PUBLISHER_BYTE,
    Segment,
    header_bytes,
    lock_held,
    lock_slab,
    pid_alive,
    reap_stale,
    segment_prefix,
    time_at,
)
from ..wire import messages as M
from ..wire import protocol as P
from ..wire.address import ipc_path, normalize
from .lock import AddressLock

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

_MAX_STAT_FRAMES = 65536  # frames kept for statistics, whatever their t0
_REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about clients refused for want of descriptors


def _open_fds() -> int:
    """Descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used


def _raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (the soft limit now, the one before).

    libzmq aborts the whole process when it cannot get a descriptor (an accept or a
    signaler), so the broker takes every descriptor it is allowed and keeps count.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (1 << 20 if now == resource.RLIM_INFINITY else now), soft


def _warn_unreachable(sock_path: str, shm_mode: int) -> None:
    """Log when the group that ``shm_mode`` shares with cannot even reach the socket's directory."""
    if not shm_mode & 0o060:
        return
    directory = os.path.dirname(sock_path)
    while True:
        with contextlib.suppress(OSError):
            st = os.stat(directory)
            mode = stat.S_IMODE(st.st_mode)
            if not (mode & 0o001 or (mode & 0o010 and st.st_gid == os.getegid())):
                log.warning(
                    "--shm-mode %o shares the segments with group %d, but %s (mode %04o, group %d) does not let that "
                    "group reach the socket %s: clients of the group will get a PermissionError",
                    shm_mode, os.getegid(), directory, mode, st.st_gid, sock_path,
                )  # fmt: skip
                return
        parent = os.path.dirname(directory)
        if parent == directory:
            return
        directory = parent


_HANDSHAKE_FAILED = int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_HANDSHAKE_ERRORS = {
    int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): "its hello could not be decrypted: the client holds another public "
    "key for this broker (its server key file is not this broker's *.key)",
    int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): "the client does not speak CURVE (no keys given?)",
}


def _authenticator(base: Any, ctx: zmq.Context[Any], clients: str) -> Any:
    """pyzmq's ZAP authenticator for the ``clients`` key directory, logging each refused key at WARNING with
    the peer's address (pyzmq logs refusals at DEBUG, so an operator never saw them)."""

    class Authenticator(base):  # type: ignore[misc]
        peer = "?"
        key = "?"

        async def handle_zap_message(self, msg: list[bytes]) -> None:
            self.peer = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
            await super().handle_zap_message(msg)

        async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
            from zmq.utils import z85

            self.key = z85.encode(client_key).decode()
            return await super()._authenticate_curve(domain, client_key)  # type: ignore[no-any-return]

        def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                            user_id: str = "anonymous") -> None:  # fmt: skip
            if status_code != b"200":
                log.warning(
                    "refused a CURVE client at %s: %s (public key %s is not in %s)",
                    self.peer, status_text.decode(errors="replace"), self.key, clients,
                )  # fmt: skip
            super()._send_zap_reply(request_id, status_code, status_text, user_id)

    return Authenticator(ctx, log=logging.getLogger("slabcast.broker.auth"))


def fd_headroom(limit: int) -> int:
    """Descriptors the broker keeps free for what is not a client's connection (new streams' segments,
    hosted sources' files, TCP connections that have not said HELLO yet, a burst of connects)."""
    return max(32, limit // 16)


def _peer_pid(frame: zmq.Frame) -> int:
    """The pid of the process at the other end of the ipc connection a message came on, in our PID namespace
    (``SO_PEERCRED``; 0 when that process is outside our namespace or the transport has none)."""
    try:
        fd = frame.get(zmq.SRCFD)
        with socket.socket(fileno=os.dup(fd)) as peer:
            pid, _, _ = struct.unpack("3i", peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, zmq.ZMQError, ValueError):
        return 0
    return int(pid)


class _Refused(Exception):
    """A request the broker answers with ERROR ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Client:
    __slots__ = ("ident", "label", "last_seen", "live", "local_pid", "pid", "remote", "role", "stream", "sub",
                 "version")  # fmt: skip

    def __init__(self, ident: bytes, pid: int, role: str, label: str, version: int) -> None:
        self.ident = ident  # routing id; prefixed with b"T" for clients of the TCP socket
        self.remote = ident[:1] == _TCP
        self.last_seen = time.monotonic()
        self.pid = pid  # as the client said (its own namespace): for logs and status
        self.local_pid = 0  # as our namespace sees it (SO_PEERCRED); 0: unknown
        self.role = role
        self.label = label
        self.version = version
        self.stream: _Stream | None = None  # the stream this client publishes
        self.sub: _Sub | None = None
        # (segment's stream, lock byte) this client holds while it lives; None: judged by its pid.
        self.live: tuple[_Stream, int] | None = None


class _Sub:
    """One subscription.

    ``cut == "local"``: the subscriber cuts its own chunks from the stream's frame
    notices; the broker only keeps its cursor (for ``block``) and its counters as
    reported by ACK.  ``cut == "broker"`` (protocol version 1 and TCP clients): the
    broker runs its rechunker, leases and flow control as version 1 did.
    """

    __slots__ = (
        "backlog",
        "chunker",
        "client",
        "clip",
        "const_pause",
        "cursor",
        "cut",
        "delivered",
        "delivered_at",
        "dropped",
        "end",
        "held",
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
        "size",
        "stalled_since",
        "starts",
        "stream",
        "token",
    )

    def __init__(
        self,
        client: _Client,
        stream: _Stream,
        size: int,
        clip: bool,
        policy: str,
        max_inflight: int,
        sampler: Any,
        cut: str,
    ) -> None:
        self.client = client
        self.stream = stream
        self.size = size
        self.clip = clip
        self.cut = cut
        self.policy = policy
        self.max_inflight = max_inflight
        self.cursor = stream.head  # local cut: index just past the last frame it has read
        self.stalled_since: float | None = None
        self.token = b""  # local cut: the token topic it waits to see JOINED on
        self.held = 0  # local cut: chunks it holds, as last reported
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
        self.chunker = Rechunker(size, clip, stream.rate, next_pause) if cut == "broker" else None

    def _const(self) -> float:
        return self.const_pause  # type: ignore[return-value]

    def _next_pause(self) -> float:
        # Pauses are drawn in the subscriber's process ahead of use; when it has fallen
        # further behind than its prefetch, the last value drawn stands in.
        if self.pauses:
            self.last_pause = self.pauses.popleft()
        return self.last_pause


class _Stream:
    """A stream's segment, slab pool, notice counter and the position of its newest sample."""

    def __init__(
        self,
        name: str,
        sid: int,
        dtype: np.dtype[Any],
        channels: int,
        rate: float | None,
        slab_bytes: int,
        nslabs: int,
        reserve: int,
        channel_names: list[str],
        segment: Segment,
        header: int,
        notice_path: str,
        committed: int,
    ) -> None:
        self.name = name
        self.sid = sid
        self.notice_path = notice_path  # the publisher's notice socket (ipc file)
        self.dtype = dtype
        self.channels = channels
        self.rate = rate
        self.sample_bytes = dtype.itemsize * channels
        self.slab_bytes = slab_bytes
        self.nslabs = nslabs
        self.reserve = reserve  # the carried part of each slab: the largest chunk any subscriber may ask for
        # How much of it is in memory, per slab: grown for all as subscribers ask, given back slab by slab as
        # slabs are granted again; never below what the stream opened with.
        self.first_committed = committed
        self.slab_committed = [committed] * nslabs
        self.peak = committed  # the most any slab has (looked at on every grant)
        self.give_back = True  # False where holes cannot be punched
        self.header = header
        self.channel_names = channel_names
        self.segment = segment
        self.u8 = np.frombuffer(segment.buf, dtype=np.uint8)
        self.gens = np.frombuffer(segment.buf, dtype="<u4", count=nslabs, offset=GEN_OFFSET)
        fd = segment.fd

        def take(slab: int) -> bool:
            return lock_slab(fd, slab, fcntl.F_WRLCK)

        def put(slab: int) -> None:
            lock_slab(fd, slab, fcntl.F_UNLCK)

        self.pool = SlabPool(nslabs, self.gens, take, put)  # type: ignore[arg-type]
        self.base_index = 0  # offset(index) = base_offset + (index - base_index) * sample_bytes
        self.base_offset = 0
        self.next_offset = -1
        self.slab_end = 0
        self.floor = 0  # lowest index readable contiguously from the current slab (its carry)
        self.carry = 0  # bytes of each slab's tail the publisher copies into the next (asked)
        self.carried = 0  # ... (confirmed by the publisher: new subscriptions are admitted against this)
        self.head = 0  # index of the next sample
        self.frames = 0
        self.publisher: _Client | None = None
        self.subs: list[_Sub] = []
        self.broker_cut: list[_Sub] = []  # subs whose chunks the broker cuts (v1, TCP): kept, not searched per frame
        self.waiting: list[_Sub] = []  # local subscriptions waiting until the publisher carries enough
        self.joining: list[_Sub] = []  # offered (SUBSCRIBED), waiting for their ATTACH
        self.meta: dict[str, Any] = StreamInfo.check_metadata(None, channels)  # channel types, units, source_id
        self.tokens: list[bytes] = []  # those the publisher must see join before its first frame
        self.ended = False
        self.stats = _Statistics(dtype, channels, rate)

    def slab_start(self, slab: int) -> int:
        return self.header + slab * self.slab_bytes

    @property
    def committed(self) -> int:
        """How much of its carried part every slab has in memory: the longest chunk it carries now."""
        return min(self.slab_committed)

    def grow(self, need: int) -> bool:
        """Commit each slab's carried part up to ``need`` bytes (a new subscriber's chunk); True if it grew.

        Raises
        ------
        ShmFullError
            /dev/shm has no room for it; the pool stays as it was.
        """
        if need <= self.committed:
            return False
        hi = min(self.reserve, -(-need // self.sample_bytes) * self.sample_bytes)
        ranges = _pool_ranges(self.header, self.slab_bytes, self.nslabs, self.reserve, self.sample_bytes,
                              bool(self.meta.get("timestamps")), self.slab_committed, hi)  # fmt: skip
        self.segment.commit(ranges, headroom=True)  # other programs keep some of /dev/shm
        self.slab_committed = [max(c, hi) for c in self.slab_committed]
        self.peak = max(self.peak, hi)
        return True

    def shrink(self, slabs: list[int]) -> int:
        """Give back the carried part of ``slabs`` (just granted: nobody can read them, the publisher has not
        been told yet) that no subscriber needs any more; return the bytes given back.

        Never below what the publisher may still carry (asked or confirmed) nor the stream's first size.
        """
        # Safe because (1) nothing reads or writes a slab between its grant and its GRANT message, (2) the
        # publisher gets CARRY and GRANT in order on one socket, so it carries at most `carry` into this slab,
        # and (3) every carry raise goes through grow(), which commits every slab again first. Reading a
        # punched page allocates it (SIGBUS on a full /dev/shm) just as writing does.
        keep = max(self.carry, self.carried, self.needed_carry(), self.first_committed)
        keep = -(-keep // self.sample_bytes) * self.sample_bytes
        ranges: list[tuple[int, int]] = []
        shrunk = [s for s in slabs if self.slab_committed[s] > keep]
        for slab in shrunk:
            ranges += _pool_ranges(self.header, self.slab_bytes, self.nslabs, self.reserve, self.sample_bytes,
                                   bool(self.meta.get("timestamps")), keep, self.slab_committed[slab],
                                   slabs=[slab])  # fmt: skip
        if not ranges:
            return 0
        if not self.segment.release(ranges):
            self.give_back = False  # not here (no hole punching): the pool keeps what it grew to
            return 0
        for slab in shrunk:
            self.slab_committed[slab] = keep
        self.peak = max(self.slab_committed)
        return sum(n for _, n in ranges)

    def floor_index(self) -> int | None:
        """The lowest cursor of the lossless local subscribers, or None if there are none."""
        cursors = [u.cursor for u in self.subs if u.cut == "local" and u.policy == "block"]
        return min(cursors) if cursors else None

    def needed_carry(self) -> int:
        """Bytes of tail every subscriber's chunks may need carried into a new slab."""
        size = max((u.size for u in [*self.subs, *self.waiting, *self.joining]), default=0)
        return min(self.reserve, size * self.sample_bytes)


def _pool_ranges(header: int, slab_bytes: int, nslabs: int, reserve: int, sample_bytes: int, timestamps: bool,
                 lo: int | Sequence[int], hi: int, frames: bool = False,
                 slabs: Iterable[int] | None = None) -> list[tuple[int, int]]:  # fmt: skip
    """The ``(offset, length)`` ranges of each slab's carried part between ``lo`` (per slab, or one for all)
    and ``hi`` bytes before its data (and, with ``frames``, of its frame area), with their per-sample times
    when the stream keeps them; for ``slabs`` (default: all), those whose ``lo`` is below ``hi``.

    A slab is ``reserve`` bytes for the tail carried from the slab before, then its frames; the carried part
    is committed from its end backwards, as subscribers ask for longer chunks (``Stream.grow``), and given
    back when none needs it any more (``Stream.shrink``).
    """
    out: list[tuple[int, int]] = []
    for slab in range(nslabs) if slabs is None else slabs:
        low = lo if isinstance(lo, int) else lo[slab]
        if low >= hi and not frames:
            continue
        data = header + slab * slab_bytes + reserve
        first, end = data - hi, (header + (slab + 1) * slab_bytes if frames else data - low)
        out.append((first, end - first))
        if timestamps:
            at = time_at(first, header, slab_bytes, nslabs, sample_bytes)
            out.append((at, time_at(end - 1, header, slab_bytes, nslabs, sample_bytes) + 8 - at))
    return out


class _Statistics:
    """Rolling per-channel statistics over the last ``window`` seconds of stream time.

    Bounded whatever the frames' ``t0`` (constant, NaN, backwards, longer than the
    window): frames are kept by *sample count* (``window * rate`` samples, at
    least the newest frame) and by number (``_MAX_STAT_FRAMES``), never by time.
    Nothing here is on the notice path: the broker calls :meth:`account` after the
    notices are out, and an error in it is logged and switches statistics off.
    """

    def __init__(self, dtype: np.dtype[Any], channels: int, rate: float | None) -> None:
        self.dtype = dtype
        self.channels = channels
        self.rate = rate
        self.window = 0.0
        self.limit = 0  # samples kept
        self.kept = 0
        # Per frame: (arrival, n, sum, sum of squares, min, max), the last four per channel.
        self.frames: deque[tuple[float, int, Any, Any, Any, Any]] = deque()

    def configure(self, window: float) -> None:
        self.window = window
        self.limit = max(1, round(window * self.rate)) if self.rate else 0

    def account(self, u8: np.ndarray[Any, Any], offset: int, n: int) -> None:
        """Add a frame: a few vectorised reductions, no per-sample Python."""
        sample_bytes = self.dtype.itemsize * self.channels
        v = u8[offset : offset + n * sample_bytes].view(self.dtype).reshape(n, self.channels)
        # Reductions down the strided sample axis are several times slower than along
        # contiguous rows: one channels-first copy pays for itself.
        w = np.ascontiguousarray(v.T)
        frames = self.frames
        frames.append(
            (
                time.monotonic(),
                n,
                w.sum(axis=1, dtype=np.float64),
                np.einsum("ij,ij->i", w, w, dtype=np.float64),
                w.min(axis=1),
                w.max(axis=1),
            )
        )
        self.kept += n
        if self.rate:
            # Keep the newest frames that cover `limit` samples (by count: t0 may be anything).
            while len(frames) > 1 and self.kept - frames[0][1] >= self.limit:
                self.kept -= frames.popleft()[1]
        else:
            # No rate: the window is arrival time, which only moves forward.
            horizon = frames[-1][0] - self.window
            while len(frames) > 1 and frames[0][0] < horizon:
                self.kept -= frames.popleft()[1]
        while len(frames) > _MAX_STAT_FRAMES:
            self.kept -= frames.popleft()[1]

    def summary(self, out: dict[str, Any]) -> dict[str, Any]:
        frames = self.frames
        if not frames:
            return out
        n = sum(f[1] for f in frames)
        total = np.sum([f[2] for f in frames], axis=0)
        squares = np.sum([f[3] for f in frames], axis=0)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
        lo = np.min([f[4] for f in frames], axis=0)
        hi = np.max([f[5] for f in frames], axis=0)
        span = frames[-1][0] - frames[0][0]
        out.update(
            window_samples=n,
            observed_rate=(n - frames[0][1]) / span if span > 0 else None,
            mean=mean.tolist(),
            std=std.tolist(),
            min=lo.tolist(),
            max=hi.tolist(),
            ptp=(hi.astype(np.float64) - lo).tolist(),
        )
        return out


class Broker:
    """The broker's state and event loop.

    Parameters
    ----------
    address : str, optional
        ``ipc://path``, a socket path, or ``None`` for the per-user default.
    shm_mode : int
        Permission bits of the segments it creates (``0o600``, or ``0o660`` for
        consumers in a shared group).
    sources : callable, optional
        Returns the status of the sources this process hosts (``slabcast status``
        shows them); ``slabcast broker`` hands it in with the sources it starts.

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
        sources: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.address = normalize(address)
        self._sources = sources  # the hosted sources' status rows: the broker imports no source
        self.shm_mode = shm_mode
        self.lease_timeout = lease_timeout
        self.pid = os.getpid()
        self.epoch = secrets.randbits(32)
        self.started = time.time()
        self.fd_limit, self._fd_soft_before = _raise_nofile()
        self._fd_headroom = fd_headroom(self.fd_limit)
        self._fd_check_at = 0  # number of clients at which to count descriptors again
        self._refused = 0  # clients refused for want of descriptors since the last log line about it
        self._refused_logged = 0.0
        self._lock = AddressLock(self.address, shm_mode) if ipc_path(self.address) else None
        reaped = reap_stale()
        if reaped:
            log.info("removed %d segments of dead brokers: %s", len(reaped), ", ".join(reaped))
        if self._lock is not None:
            self._remove_stale_notice_sockets()
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
        if self._lock is not None:
            self._lock.share()
            _warn_unreachable(self._lock.sock_path, shm_mode)
        self._monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._tcp: zmq.Socket[Any] | None = None
        self._auth: Any = None
        self._tcp_monitor: zmq.Socket[Any] | None = None
        self.tcp_address: str | None = None
        if tcp is not None:
            self._bind_tcp(tcp, curve_secret, curve_clients)
        self._clients: dict[bytes, _Client] = {}
        self._streams: dict[str, _Stream] = {}  # open streams by name
        self._draining: list[_Stream] = []  # ended streams whose subscribers are still attached
        self._pending: dict[str, list[tuple[_Client, M.Subscribe]]] = {}  # SUBSCRIBE before OPEN
        self._outbox: dict[bytes, deque[Any]] = {}
        self._peer_pid = 0  # of the connection the last new client's first message came on
        self._segments = 0
        self._stopping = False
        self._last_sweep = 0.0
        self._handlers: dict[int, Callable[[_Client, Any], None]] = {
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

    def _remove_stale_notice_sockets(self) -> None:
        """The address is ours (its lock): notice sockets beside it are those of dead brokers' publishers."""
        path = ipc_path(self.address)
        assert path is not None
        directory, base = os.path.split(path)
        pattern = re.compile(re.escape(base) + r"\.[0-9a-f]{8}\.\d+")
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                if pattern.fullmatch(name):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(directory, name))

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
        self._auth = _authenticator(ThreadAuthenticator, self._ctx, curve_clients)
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
        # A client that holds the wrong public key for us fails before the authenticator hears of it.
        self._tcp_monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)

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
        parent_fd: int | None = None,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM; then shut down cleanly.

        ``start()`` runs once the socket is bound, before the loop (start hosted
        sources there); ``ready()`` runs as soon as ``ready_when()`` is true
        (checked every loop turn; at once without it).  ``parent_fd``: the read end
        of a pipe whose writer is the process that started us; its end of file
        (that process died) stops the broker.  ``tick()`` runs every loop turn (at
        least every sweep interval, and after every signal).
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
        if parent_fd is not None:
            poller.register(parent_fd, zmq.POLLIN)
        if self._tcp is not None:
            poller.register(self._tcp, zmq.POLLIN)
        if self._tcp_monitor is not None:
            poller.register(self._tcp_monitor, zmq.POLLIN)
        log.info("broker %d serving %s", self.pid, self.address)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.info(
            "open-file limit (RLIMIT_NOFILE) %d (was %d; hard %s): room for about %d more clients (one descriptor "
            "each, %d kept free); raise it with LimitNOFILE= in the unit or `ulimit -n`",
            self.fd_limit,
            self._fd_soft_before,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            self.fd_limit - self._fd_headroom - _open_fds(),
            self._fd_headroom,
        )
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
                if self._tcp_monitor is not None and self._tcp_monitor in events:
                    self._log_failed_handshakes(self._tcp_monitor)
                if wake_r.fileno() in events:
                    with contextlib.suppress(OSError):
                        wake_r.recv(4096)
                if parent_fd is not None and parent_fd in events and not os.read(parent_fd, 64):
                    log.warning("the process that started this broker is gone; stopping")
                    self._stopping = True
                if self._outbox:
                    self._flush_outbox()
                if time.monotonic() - self._last_sweep >= _SWEEP_INTERVAL:
                    self._sweep()
                if tick is not None:
                    tick()
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
            key = prefix + ident
            if key in self._clients or prefix:
                parts = [recv(_NOBLOCK)]  # a ROUTER delivers whole messages: the rest is there
            else:
                # A new local client: learn its pid as *our* PID namespace sees it, from the socket.
                frame = router.recv(_NOBLOCK, copy=False)
                self._peer_pid = _peer_pid(frame)
                parts = [frame.bytes]
            while router.getsockopt(_RCVMORE):
                parts.append(recv(_NOBLOCK))
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

    def _log_failed_handshakes(self, monitor: zmq.Socket[Any]) -> None:
        from zmq.utils.monitor import parse_monitor_message

        with contextlib.suppress(zmq.Again):
            while True:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
                code = event["value"]
                reason = _HANDSHAKE_ERRORS.get(code, f"a malformed handshake (ZMTP error {code:#x})")
                log.warning("refused a CURVE handshake on %s: %s", self.tcp_address, reason)

    def _sweep(self) -> None:
        """Drop dead clients (after handling what they sent); evict subscribers that hold leases too long."""
        now = self._last_sweep = time.monotonic()
        for stream in list(self._streams.values()):
            # Readers that died (kill -9) dropped their lease locks with their descriptors.
            self._grant(stream)
            if self.lease_timeout > 0:
                self._check_gating(stream, now)
                for sub in list(stream.subs):
                    if sub.chunker is not None:
                        self._check_leases(sub, now)
        dead = [c for c in self._clients.values() if not self._alive(c, now)]
        if not dead:
            return
        self._drain()
        if self._tcp is not None:
            self._drain(self._tcp)
        for client in dead:
            if client.ident in self._clients:
                log.warning("client %s (pid %d, %s) died; reclaiming its leases", client.label, client.pid, client.role)
                self._drop_client(client, gone=True)

    def _alive(self, client: _Client, now: float) -> bool:
        """Whether a client still lives: by the lock it holds on its stream's segment when it has one (true
        in any PID namespace), by its silence over TCP, else by its pid."""
        if client.remote:
            return now - client.last_seen <= _REMOTE_SILENCE
        live = client.live
        if live is None and client.stream is not None and client.stream.frames:
            live = (client.stream, PUBLISHER_BYTE)  # a publisher holds it from before its first frame
        if live is not None:
            stream, byte = live
            if not stream.ended or stream in self._draining:
                with contextlib.suppress(OSError):
                    return lock_held(stream.segment.fd, byte)
        if client.role == "ctl":
            return True  # holds nothing; it says BYE
        return client.local_pid <= 0 or pid_alive(client.local_pid)

    def _check_gating(self, stream: _Stream, now: float) -> None:
        """Evict a lossless local subscriber whose cursor has kept the publisher without a slab too long."""
        if stream.publisher is None or stream.pool.granted:
            for sub in stream.subs:
                sub.stalled_since = None
            return
        floor = stream.floor_index()
        if floor is None or stream.pool.gated(floor) is None:
            return
        for sub in list(stream.subs):
            if sub.cut != "local" or sub.policy != "block" or sub.cursor != floor:
                continue
            if sub.stalled_since is None:
                sub.stalled_since = now
            elif now - sub.stalled_since > self.lease_timeout:
                # Chunks it holds stay intact (its lease locks); only its claim on unread frames ends.
                log.warning(
                    "evicting %s (pid %d) from %r: it kept the publisher waiting %.1f s > lease_timeout %.1f s",
                    sub.client.label,
                    sub.client.pid,
                    stream.name,
                    now - sub.stalled_since,
                    self.lease_timeout,
                )
                self._detach(sub)
                message = (
                    f"evicted: a chunk was held (or the stream left unread) longer than the broker's "
                    f"lease_timeout ({self.lease_timeout:g} s) while the publisher waited"
                )
                self._send(sub.client.ident, M.encode(M.End(P.END_EVICTED, message, sub.seq)))

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
        self._send(sub.client.ident, M.encode(M.End(P.END_EVICTED, message, sub.seq)))

    # ------------------------------------------------------------- messages

    def _on_message(self, ident: bytes, raw: bytes) -> None:
        client = self._clients.get(ident)
        if client is not None:
            client.last_seen = time.monotonic()
        try:
            msg = P.unpack(raw)
            if client is None:
                if msg[0] == P.BYE:  # from a client already forgotten (its process looked dead): goodbye
                    self._send(ident, M.encode(M.End(P.END_BYE, "goodbye")))
                    return
                if msg[0] != P.HELLO:
                    raise ProtocolError(f"expected HELLO as the first message, got kind {msg[0]}")
                self._on_hello(ident, msg)
                return
            handler = self._handlers.get(msg[0])
            if handler is None:
                raise ProtocolError(f"unknown message kind {msg[0]}")
            # FRAME, one per frame, checks its own fields on a fast path; every other message is decoded
            # and checked by its type (wire/messages.py).
            handler(client, msg if msg[0] == P.FRAME else M.decode(msg))
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
        self._send(ident, M.encode(M.Error(code, message)))

    def _on_hello(self, ident: bytes, msg: tuple[Any, ...]) -> None:
        if len(msg) < 2 or type(msg[1]) is not int:
            raise ProtocolError("HELLO must start [HELLO, version, ...]")
        if msg[1] != P.VERSION and msg[1] not in P.LEGACY_VERSIONS:
            raise _Refused(
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
            raise _Refused(P.ERR_VERSION, f"publishers must speak protocol version {P.VERSION}, got {version}")
        # `slabcast status` still answers a full broker: control connections (brief, BYE at once) may use half
        # of the descriptors kept free.
        spare = self._fd_headroom // 2 if role == "ctl" else 0
        self._check_descriptors(f"{hello.label[:128]} (pid {hello.pid}, {role})", spare=spare)
        client = self._clients[ident] = _Client(ident, hello.pid, role, hello.label[:128], version)
        # Liveness by pid uses the socket's view (our namespace), never the pid the client says it has.
        client.local_pid = 0 if client.remote else self._peer_pid
        self._send(ident, M.encode(M.Welcome(version, self.pid, self.epoch)))

    def _check_descriptors(self, who: str, force: bool = False, spare: int = 0) -> None:
        """Refuse (``ERROR limit``) what would take the broker within its headroom of RLIMIT_NOFILE.

        Counting is a directory listing: done again only when the clients that came
        since could have used half of the room left (at most two descriptors each).
        """
        clients = len(self._clients)
        if clients < self._fd_check_at and not force:
            return
        used = _open_fds()
        free = self.fd_limit - self._fd_headroom - used
        self._fd_check_at = clients + free // 4
        if free + spare > 0:
            return
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %s: %d descriptors open of the open-file limit %d (RLIMIT_NOFILE; %d kept free) with %d "
                "clients (%d refused since the last such line); raise the limit: LimitNOFILE= in the unit or "
                "`ulimit -n` before starting the broker",
                who, used, self.fd_limit, self._fd_headroom, clients, self._refused,
            )  # fmt: skip
            self._refused_logged = now
            self._refused = 0
        raise _Refused(
            P.ERR_LIMIT,
            f"the broker (pid {self.pid}) cannot take another client: {used} of its {self.fd_limit} descriptors "
            f"are in use (its open-file limit, RLIMIT_NOFILE; {self._fd_headroom} are kept free so that it never "
            f"runs out) with {clients} clients; raise the limit where the broker starts: LimitNOFILE=N in its "
            f"systemd unit, or `ulimit -n N` (and the hard limit) in the shell that starts `slabcast broker`",
        )

    def _on_open(self, client: _Client, msg: M.Open) -> None:
        name, dtype_s, channels, rate, slab_bytes, nslabs, max_chunk_bytes, names, stats_window, meta = msg
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
            names = tuple(f"ch_{i}" for i in range(channels))
        elif len(names) != channels:
            raise _Refused(P.ERR_BAD_REQUEST, f"channel_names must be {channels} strings, got {names!r}")
        try:
            meta = StreamInfo.check_metadata(meta, channels)
        except ValueError as exc:
            raise _Refused(P.ERR_BAD_REQUEST, str(exc)) from None
        if not 0 <= stats_window <= 3600:
            raise _Refused(P.ERR_BAD_REQUEST, f"statistics window must be 0..3600 s, got {stats_window!r}")
        if name in self._streams:
            raise _Refused(P.ERR_STREAM_EXISTS, f"stream {name!r} already has a publisher")
        self._check_descriptors(f"stream {name!r} of {client.label} (pid {client.pid})", force=True)
        sid = self._segments
        path = ipc_path(self.address)
        if path is None:
            raise _Refused(P.ERR_BAD_REQUEST, "publishers need a broker on an ipc:// address")
        notice_path = f"{path}.{self.epoch:08x}.{sid}"  # never the path of an earlier broker's stream
        seg_name = segment_prefix(self.pid, self.epoch) + str(sid)
        self._segments += 1
        header = header_bytes(nslabs)
        try:
            slots = slab_bytes // sample_bytes
            times = 8 * slots * nslabs if meta.get("timestamps") else 0  # per-sample times, when asked for
            # Memory for the frame area and as much carried room as frames; the rest of the carried part
            # stays address space until a subscriber asks for longer chunks.
            committed = min(reserve, (slab_bytes - reserve) // sample_bytes * sample_bytes)
            ranges = _pool_ranges(header, slab_bytes, nslabs, reserve, sample_bytes, bool(meta.get("timestamps")),
                                  0, committed, frames=True)  # fmt: skip
            segment = Segment(seg_name, header + nslabs * slab_bytes + times, self.shm_mode,
                              commit=[(0, header), *ranges])  # fmt: skip
        except ShmFullError as exc:
            raise _Refused(P.ERR_SHM_FULL, str(exc)) from None
        segment.write_header(
            header_bytes=header,
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
            name,
            sid,
            dtype,
            channels,
            float(rate) if rate else None,
            slab_bytes,
            nslabs,
            reserve,
            list(names),
            segment,
            header,
            notice_path,
            committed,
        )
        stream.meta = meta
        # Raw byte streams have no sample values to summarise.
        byte_stream = dtype == np.uint8 and channels == 1
        if dtype.kind in "iuf" and not byte_stream and stats_window > 0:
            stream.stats.configure(float(stats_window))
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
        # Subscribers that came first start at index 0: the publisher waits (bounded) until
        # each has joined its notice socket before it writes.
        stream.publisher = None  # no CARRY before OPENED: OPENED itself says how much to carry
        for waiting, request in self._pending.pop(name, []):
            if waiting.ident in self._clients and waiting.sub is None:
                self._on_message_safely(waiting, functools.partial(self._on_subscribe, waiting, request, True))
        stream.publisher = client
        stream.carry = stream.carried = stream.needed_carry()  # OPENED tells the publisher: confirmed
        self._send(
            client.ident,
            M.encode(M.Opened(seg_name, segment.nbytes, header, slab_bytes, nslabs, reserve, sample_bytes,
                              f"ipc://{notice_path}", sid, stream.carry, tuple(stream.tokens))),
        )
        stream.tokens = []
        self._grant(stream)

    def _on_message_safely(self, client: _Client, call: Callable[[], None]) -> None:
        try:
            call()
        except _Refused as exc:
            self._error(client.ident, exc.code, str(exc))
        except ProtocolError as exc:
            self._error(client.ident, P.ERR_MALFORMED, str(exc))

    def _update_carry(self, stream: _Stream) -> None:
        carry = stream.needed_carry()
        if carry != stream.carry and stream.publisher is not None:
            stream.carry = carry
            self._send(stream.publisher.ident, M.encode(M.Carry(carry)))

    def _on_carried(self, client: _Client, msg: M.Carried) -> None:
        # From now on every slab change carries this much; waiting subscriptions start.
        stream = client.stream
        if stream is None:
            raise _Refused(P.ERR_BAD_REQUEST, "CARRIED from a connection that publishes no stream")
        stream.carried = max(0, msg.nbytes)
        ready = [u for u in stream.waiting if u.size * stream.sample_bytes <= msg.nbytes]
        for sub in ready:
            stream.waiting.remove(sub)
            if sub.client.ident in self._clients:
                self._activate(stream, sub, offer_only=True)

    def _grant(self, stream: _Stream) -> None:
        publisher = stream.publisher
        if publisher is None:
            return
        pool = stream.pool
        pool.advance(stream.floor_index())
        granted = pool.grant(_GRANT_AHEAD)
        if granted and stream.give_back and stream.peak > stream.first_committed:  # room it may give back
            freed = stream.shrink(granted)
            if freed:
                log.debug("stream %r: %d bytes of carried room given back", stream.name, freed)
        for slab in granted:
            self._send(publisher.ident, M.encode(M.Grant(slab)))

    def _on_frame(self, client: _Client, msg: tuple[Any, ...]) -> None:
        # [FRAME, offset, n, t0, flags, carry]; version-2 publishers always send all six.
        stream = client.stream
        if stream is None:
            raise _Refused(P.ERR_BAD_REQUEST, "FRAME from a connection that publishes no stream")
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

    def _on_frames(self, client: _Client, msg: M.Frames) -> None:
        # Frames packed back to back from offset, in one slab.
        stream = client.stream
        if stream is None:
            raise _Refused(P.ERR_BAD_REQUEST, "FRAMES from a connection that publishes no stream")
        offset, ns, t0s, carry = msg
        if len(ns) != len(t0s) or not 1 <= len(ns) <= P.MAX_BATCH:
            raise ProtocolError(f"FRAMES needs 1..{P.MAX_BATCH} sizes and as many times, got {len(ns)} and {len(t0s)}")
        for n, t0 in zip(ns, t0s, strict=True):
            if type(n) is not int or type(t0) not in (float, int) or n <= 0:
                raise ProtocolError(f"FRAMES sizes must be positive ints and times numbers, got {n!r} and {t0!r}")
        total = sum(ns)
        self._frame(stream, offset, total, float(t0s[0]), 0, carry, ns, tuple(float(t) for t in t0s))
        self._after_frames(stream, offset, ns)

    def _frame(
        self,
        stream: _Stream,
        offset: int,
        n: int,
        t0: float,
        jump: int,
        carry: int,
        ns: tuple[int, ...] | None = None,
        t0s: tuple[float, ...] | None = None,
    ) -> None:
        """Account for frames (``n`` samples in all) the publisher wrote at ``offset``.

        Broker-cut subscribers get their chunks here; local-cut ones cut their own
        from the publisher's notice.
        """
        nbytes = n * stream.sample_bytes
        if n <= 0:
            raise _Refused(P.ERR_FRAME, f"FRAME must hold at least one sample, got n={n}")
        if offset != stream.next_offset:
            # The first frame of a new slab: the publisher moved to the oldest slab it was granted.
            granted = stream.pool.granted
            if not granted or offset != stream.slab_start(granted[0]) + stream.reserve:
                expected = f"{stream.next_offset}" if stream.pool.current is not None else "none yet"
                raise _Refused(
                    P.ERR_FRAME,
                    f"FRAME offset {offset} is neither the next offset ({expected}) nor the data start "
                    f"of the next granted slab (granted: {list(granted)})",
                )
            if not 0 <= carry <= stream.reserve:
                raise _Refused(P.ERR_FRAME, f"FRAME carry must be 0..{stream.reserve} bytes, got {carry}")
            self._switch_slab(stream, granted[0], carry)
        if offset + nbytes > stream.slab_end:
            raise _Refused(P.ERR_FRAME, f"FRAME of {nbytes} bytes at offset {offset} overruns its slab")
        stream.next_offset = offset + nbytes
        broker_cut = stream.broker_cut
        if broker_cut:
            if jump:
                # The source was swapped or reconnected: no chunk may span the jump.
                for sub in broker_cut:
                    sub.chunker.start = None  # type: ignore[union-attr]
                    sub.jumped = True
            for k, t in zip(ns or (n,), t0s or (t0,), strict=True):
                index = stream.head
                stream.head = index + k
                for sub in broker_cut:
                    chunks = sub.chunker.feed(index, k, t)  # type: ignore[union-attr]
                    for start, length, ct0 in chunks:
                        self._emit(stream, sub, start, length, ct0)
        else:
            stream.head += n
        stream.frames += len(ns) if ns else 1

    def _after_frames(self, stream: _Stream, offset: int, ns: tuple[int, ...]) -> None:
        """Statistics, after the notices are out: off the latency path, and never able to stop it."""
        stats = stream.stats
        if not stats.window:
            return
        try:
            for n in ns:
                stats.account(stream.u8, offset, n)
                offset += n * stream.sample_bytes
        except Exception:
            log.exception("statistics of stream %r failed; turning them off for this stream", stream.name)
            stats.window = 0.0

    def _switch_slab(self, stream: _Stream, slab: int, carry: int) -> None:
        head = stream.head
        old_end = stream.next_offset
        old = stream.pool.switch(slab, head)
        start = stream.slab_start(slab)
        need = stream.needed_carry()
        if old is not None and carry < need:
            # A subscription arrived after the publisher last heard how much to carry: copy the
            # missing older part here (the old slab is intact: only we decide when it is reused).
            data = start + stream.reserve
            stream.u8[data - need : data - carry] = stream.u8[old_end - need : old_end - carry]
            if stream.meta.get("timestamps"):  # and the times of those samples

                def at(offset: int) -> int:
                    return time_at(offset, stream.header, stream.slab_bytes, stream.nslabs, stream.sample_bytes)

                stream.u8[at(data - need) : at(data - carry)] = stream.u8[at(old_end - need) : at(old_end - carry)]
            carry = need
        stream.base_index = head
        stream.base_offset = start + stream.reserve
        stream.slab_end = start + stream.slab_bytes
        # The publisher copied the last `carry` bytes before this slab's data: chunks may start there.
        floor = head - carry // stream.sample_bytes if old is not None else head
        stream.floor = floor
        for sub in stream.subs:
            chunker = sub.chunker
            if chunker is not None and chunker.start is not None and chunker.start < floor:
                # Only right after a subscription that asked for a longer carry than this slab got.
                if chunker.rate:
                    chunker.t0 += (floor - chunker.start) / chunker.rate
                chunker.start = floor
        if old is not None and not stream.ended:
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
        payload = M.encode(M.Chunk(seq, start, length, t0, 0 if remote else offset, flags))
        slab = stream.pool.current
        assert slab is not None
        stream.pool.pin(slab)
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
            stream.pool.unpin(sub.leases.pop(seq))  # the bytes were copied into the message
            sub.remote_held.add(seq)
        else:
            self._send(sub.client.ident, payload)

    def _on_close(self, client: _Client, msg: M.Close) -> None:
        if client.stream is None:
            raise _Refused(P.ERR_BAD_REQUEST, "CLOSE from a connection that publishes no stream")
        stream = client.stream
        self._end_stream(stream, P.END_CLOSED, "the publisher closed the stream")
        self._send(client.ident, M.encode(M.End(P.END_CLOSED, f"stream {stream.name!r} closed")))

    def _end_stream(self, stream: _Stream, code: str, message: str) -> None:
        if stream.ended:
            return
        stream.ended = True
        log.info("stream %r ended (%s) after %d samples", stream.name, code, stream.head)
        if stream.publisher is not None:
            stream.publisher.stream = None
            stream.publisher = None
        self._streams.pop(stream.name, None)
        for sub in [*stream.waiting, *stream.joining]:
            self._send(sub.client.ident, M.encode(M.End(code, message, 0, stream.head)))
            sub.client.sub = None
        stream.waiting.clear()
        stream.joining.clear()
        # The publisher removes its notice socket's file; not if it died.
        with contextlib.suppress(OSError):
            os.unlink(stream.notice_path)
        stream.pool.close()
        for sub in stream.subs:
            if sub.cut == "local":
                # It ends once it has read the notices up to `head` (the publisher's own NOTICE_END
                # usually gets there first, in order with them).
                self._send(sub.client.ident, M.encode(M.End(code, message, sub.seq, stream.head)))
                continue
            if sub.backlog:
                sub.end = (code, message)  # sent once the backlog has drained
            else:
                self._send(sub.client.ident, M.encode(M.End(code, message, sub.seq)))
        if stream.subs:
            self._draining.append(stream)
        else:
            self._destroy(stream)

    def _destroy(self, stream: _Stream) -> None:
        del stream.u8
        del stream.gens
        stream.pool.gens = []  # the last view of the segment: it can be unmapped
        stream.segment.destroy()
        with contextlib.suppress(ValueError):
            self._draining.remove(stream)
        log.info("stream %r: segment %s unlinked", stream.name, stream.segment.name)

    def _on_subscribe(self, client: _Client, msg: M.Subscribe, opening: bool = False) -> None:
        name, size, seconds, clip, policy, max_inflight, sampler, cut, wait, token = msg
        if cut == "local" and (token is None or not 1 <= len(token) <= 32):
            raise _Refused(P.ERR_BAD_REQUEST, "a local subscription needs a token of 1..32 bytes")
        if client.role != "sub" or client.sub is not None:
            raise _Refused(P.ERR_BAD_REQUEST, "SUBSCRIBE is for a subscriber connection with no subscription yet")
        if cut not in P.CUTS:
            raise _Refused(P.ERR_BAD_REQUEST, f"cut must be 'local' or 'broker', got {cut!r}")
        if cut == "local" and client.remote:
            raise _Refused(P.ERR_BAD_REQUEST, "a TCP subscriber shares no memory: it must ask for cut='broker'")
        if policy not in P.POLICIES:
            raise _Refused(P.ERR_BAD_REQUEST, f"policy must be 'block' or 'drop', got {policy!r}")
        if not 1 <= max_inflight <= _MAX_INFLIGHT:
            raise _Refused(P.ERR_BAD_REQUEST, f"max_inflight must be 1..{_MAX_INFLIGHT}, got {max_inflight}")
        if (size is None) == (seconds is None):
            raise _Refused(P.ERR_BAD_REQUEST, "give exactly one of size (samples) and seconds")
        if seconds is not None and not (seconds > 0 and seconds < float("inf")):
            raise _Refused(P.ERR_BAD_REQUEST, f"seconds must be a finite number > 0, got {seconds!r}")
        if size is not None and size <= 0:
            raise _Refused(P.ERR_BAD_REQUEST, f"size must be a positive integer number of samples, got {size}")
        if sampler is not None and not isinstance(sampler, int | float | tuple):
            raise ProtocolError(f"SUBSCRIBE sampler must be nil, a number or an array of numbers, got {sampler!r}")
        values = sampler if isinstance(sampler, tuple) else (sampler,) if sampler is not None else ()
        if len(values) > _PAUSE_PREFETCH_MAX or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= P.MAX_SAMPLER_SECONDS
            for v in values
        ):
            raise _Refused(
                P.ERR_BAD_REQUEST, f"sampler values must be numbers in 0..{P.MAX_SAMPLER_SECONDS:g} s, got {sampler!r}"
            )
        stream = self._streams.get(name)
        if stream is None:
            if wait:
                # Held until the stream opens; the subscriber's own timeout bounds the wait.
                self._pending.setdefault(name, []).append((client, msg))
                log.info("%s waits for stream %r", client.label, name)
                return
            known = ", ".join(sorted(self._streams)) or "none"
            raise _Refused(P.ERR_UNKNOWN_STREAM, f"no stream named {name!r} on this broker (streams: {known})")
        if seconds is not None:
            if stream.rate is None:
                raise _Refused(P.ERR_BAD_REQUEST, f"seconds= needs a stream with a rate; {name!r} has none, use size=")
            size = max(1, round(seconds * stream.rate))
        assert size is not None
        if size * stream.sample_bytes > stream.reserve:
            raise _Refused(
                P.ERR_BAD_REQUEST,
                f"a chunk of {size} samples ({size * stream.sample_bytes} bytes) is larger than stream {name!r} "
                f"allows (max_chunk_bytes={stream.reserve}); open the stream with a larger max_chunk_bytes",
            )
        if len(stream.subs) >= _MAX_SUBSCRIBERS:
            raise _Refused(P.ERR_BAD_REQUEST, f"stream {name!r} has the maximum of {_MAX_SUBSCRIBERS} subscribers")
        try:
            if stream.grow(size * stream.sample_bytes):
                log.info("stream %r: slabs grown to carry chunks of %d bytes (%d bytes of shared memory)",
                         name, stream.committed, stream.segment.allocated)  # fmt: skip
        except ShmFullError as exc:
            raise _Refused(P.ERR_SHM_FULL, f"chunks of {size} samples on stream {name!r}: {exc}") from None
        sub = _Sub(client, stream, size, clip, policy, max_inflight, sampler, cut)
        client.sub = sub
        if cut == "local":
            sub.token = P.token_topic(token)  # type: ignore[arg-type]  # cut="local" has one (checked above)
            if opening:
                stream.tokens.append(sub.token)
            elif size * stream.sample_bytes > stream.carried and stream.publisher is not None:
                # Its chunks need a longer carry than the publisher makes: offer it once it confirms.
                stream.waiting.append(sub)
                self._update_carry(stream)
                return
            else:
                self._activate(stream, sub, offer_only=True)
                return
        self._activate(stream, sub)

    def _activate(self, stream: _Stream, sub: _Sub, offer_only: bool = False) -> None:
        """Send SUBSCRIBED; a broker-cut (or opening) subscription starts now, a local one at its ATTACH."""
        client = sub.client
        if offer_only:
            stream.joining.append(sub)  # until ATTACH: its notice socket is not proven connected yet
        else:
            self._start(stream, sub)
        reply = M.Subscribed(stream.segment.name, stream.segment.nbytes, stream.dtype.str, stream.channels,
                             stream.rate, sub.size, stream.head, tuple(stream.channel_names), stream.sid,
                             stream.header, stream.slab_bytes, stream.nslabs, stream.sample_bytes,
                             f"ipc://{stream.notice_path}", stream.meta)  # fmt: skip
        # A version-1 client gets the fields it knows.
        self._send(client.ident, M.encode(reply, None if client.version == P.VERSION else 8))
        self._update_carry(stream)

    def _start(self, stream: _Stream, sub: _Sub) -> None:
        sub.cursor = stream.head
        stream.subs.append(sub)
        if sub.chunker is not None:
            stream.broker_cut.append(sub)
        log.info("%s subscribed to %r: size=%d clip=%s policy=%s cut=%s", sub.client.label, stream.name, sub.size,
                 sub.clip, sub.policy, sub.cut)  # fmt: skip

    def _on_attach(self, client: _Client, msg: M.Attach) -> None:
        # [ATTACH, slot|nil]: the subscriber's notice socket is connected (JOINED came): it starts at the head.
        # `slot`: it holds a shared lock on byte CLIENT_BASE + slot of the segment while it lives.
        sub = client.sub
        if sub is None or sub.cut != "local":
            raise _Refused(P.ERR_BAD_REQUEST, "ATTACH from a connection with no local subscription")
        stream = sub.stream
        if sub in stream.waiting:
            raise _Refused(P.ERR_BAD_REQUEST, "ATTACH before SUBSCRIBED")
        if msg.slot is not None:
            if not 0 <= msg.slot < 1 << 31:
                raise _Refused(P.ERR_BAD_REQUEST, f"ATTACH slot must be 0..2**31-1, got {msg.slot}")
            client.live = (stream, CLIENT_BASE + msg.slot)
        if sub in stream.joining:
            stream.joining.remove(sub)
            self._start(stream, sub)
        self._send(client.ident, M.encode(M.Attached(sub.cursor)))

    def _on_ack(self, client: _Client, msg: M.Ack) -> None:
        # [ACK, consumed_index, delivered, dropped, held]: cumulative, so a late one costs nothing.
        sub = client.sub
        if sub is None or sub.cut != "local":
            raise _Refused(P.ERR_BAD_REQUEST, "ACK from a connection with no local-cut subscription")
        stream = sub.stream
        # The cursor may run ahead of `head`: notices reach subscribers before FRAME reaches us.
        if msg.cursor > sub.cursor:
            sub.cursor = msg.cursor
            sub.stalled_since = None
        sub.delivered, sub.dropped, sub.held = msg.delivered, msg.dropped, msg.held
        sub.seq = sub.delivered + sub.dropped
        if not stream.ended:
            self._grant(stream)

    def _on_release(self, client: _Client, msg: M.Release) -> None:
        sub = client.sub
        if sub is None or sub.cut != "broker":
            raise _Refused(P.ERR_BAD_REQUEST, "RELEASE from a connection with no subscription cut by the broker")
        stream = sub.stream
        unknown = []
        for seq in msg.seqs:
            sub.starts.pop(seq, None)
            slab = sub.leases.pop(seq, None)
            if slab is not None:
                stream.pool.unpin(slab)
            elif seq in sub.remote_held:
                sub.remote_held.discard(seq)
            else:
                unknown.append(seq)
                continue
            sub.inflight -= 1
        for value in msg.pauses[: _PAUSE_PREFETCH_MAX - len(sub.pauses)]:
            if 0 <= value <= P.MAX_SAMPLER_SECONDS:
                sub.pauses.append(float(value))
        while sub.backlog and sub.inflight < sub.max_inflight and sub in stream.subs:
            self._deliver(sub, *sub.backlog.popleft())
        if sub.end is not None and not sub.backlog:
            code, message = sub.end
            sub.end = None
            self._send(client.ident, M.encode(M.End(code, message, sub.seq)))
        if not stream.ended:
            self._grant(stream)
        if unknown:
            raise ProtocolError(f"RELEASE of chunks this subscriber does not hold: {unknown[:10]!r}")

    def _on_bye(self, client: _Client, msg: M.Bye) -> None:
        seq = client.sub.seq if client.sub is not None else 0
        self._drop_client(client, gone=False)
        self._send(client.ident, M.encode(M.End(P.END_BYE, "goodbye", seq)))

    def _on_unsubscribe(self, client: _Client, msg: M.Unsubscribe) -> None:
        # No more chunks; the leases it holds stay until RELEASE, BYE or its death.
        sub = client.sub
        if sub is None:
            raise _Refused(P.ERR_BAD_REQUEST, "UNSUBSCRIBE from a connection with no subscription")
        self._detach(sub)

    def _detach(self, sub: _Sub) -> None:
        stream = sub.stream
        for seq, *_ in sub.backlog:
            stream.pool.unpin(sub.leases.pop(seq))
        sub.backlog.clear()
        if sub in stream.subs:
            stream.subs.remove(sub)
        if sub in stream.broker_cut:
            stream.broker_cut.remove(sub)
        for pending in (stream.waiting, stream.joining):
            if sub in pending:
                pending.remove(sub)
        if stream.ended and not stream.subs:
            if stream in self._draining:
                self._destroy(stream)
        elif not stream.ended:
            self._update_carry(stream)
            self._grant(stream)

    def _drop_client(self, client: _Client, gone: bool) -> None:
        """Forget a client: reclaim its leases, or end the stream it publishes."""
        self._clients.pop(client.ident, None)
        self._outbox.pop(client.ident, None)
        for waiting in self._pending.values():
            waiting[:] = [(c, m) for c, m in waiting if c is not client]
        if client.stream is not None:
            self._end_stream(client.stream, P.END_PUBLISHER_GONE, f"the publisher ({client.label}) went away")
        sub = client.sub
        if sub is not None:
            client.sub = None
            stream = sub.stream
            log.info("%s left %r (%s)", client.label, stream.name, "died" if gone else "bye")
            self._detach(sub)
            for slab in sub.leases.values():
                stream.pool.unpin(slab)
            sub.leases.clear()
            if stream.ended and not stream.subs and stream in self._draining:
                self._destroy(stream)
            elif not stream.ended:
                self._grant(stream)

    def _on_stats(self, client: _Client, msg: M.Stats) -> None:
        stream = self._streams.get(msg.name) or next((s for s in self._draining if s.name == msg.name), None)
        if stream is None:
            known = ", ".join(sorted(self._streams)) or "none"
            raise _Refused(P.ERR_UNKNOWN_STREAM, f"no stream named {msg.name!r} on this broker (streams: {known})")
        stats = self._statistics(stream)
        stats["subscribers"] = [
            {"label": u.client.label, "pid": u.client.pid, "delivered": u.delivered, "dropped": u.dropped,
             "overflows": u.overflows}
            for u in stream.subs
        ]  # fmt: skip
        self._send(client.ident, M.encode(M.StatsReply(stats)))

    @staticmethod
    def _statistics(stream: _Stream) -> dict[str, Any]:
        out: dict[str, Any] = {"name": stream.name, "samples": stream.head, "frames": stream.frames,
                               "window_seconds": stream.stats.window}  # fmt: skip
        return stream.stats.summary(out)

    def _on_sync(self, client: _Client, msg: M.Sync) -> None:
        self._send(client.ident, M.encode(M.Synced(msg.token)))

    def _on_status(self, client: _Client, msg: M.Status) -> None:
        self._send(client.ident, M.encode(M.StatusReply(self.status())))

    @staticmethod
    def _sub_status(stream: _Stream, sub: _Sub) -> dict[str, Any]:
        # Lag: samples between the oldest one this subscriber is not done with and the newest.
        if sub.chunker is not None:
            pending = sub.chunker.start if sub.chunker.start is not None else stream.head
            lag = stream.head - min(sub.starts.values(), default=pending)
            leases = len(sub.leases)
        else:
            lag = stream.head - sub.cursor
            leases = sub.held
        return {
            "label": sub.client.label,
            "pid": sub.client.pid,
            "size": sub.size,
            "clip": sub.clip,
            "policy": sub.policy,
            "cut": sub.cut,
            "seq": sub.seq,
            "delivered": sub.delivered,
            "dropped": sub.dropped,
            "leases": leases,
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
                    "max_chunk_bytes": s.reserve,
                    "carried_bytes": s.committed,
                    "shm_bytes": s.segment.allocated,
                    "slabs_free": len(s.pool.free),
                    "statistics": self._statistics(s),
                    "channel_names": s.channel_names,
                    **s.meta,
                    "subscribers": [self._sub_status(s, u) for u in s.subs],
                }
            )
        from .._version import __version__

        return {
            "pid": self.pid,
            "version": __version__,
            "protocol": P.VERSION,
            "address": self.address,
            "tcp_address": self.tcp_address,
            "uptime": time.time() - self.started,
            "clients": len(self._clients),
            "streams": streams,
            "sources": self._sources() if self._sources is not None else [],
        }

    # -------------------------------------------------------------- shutdown

    def _shutdown(self) -> None:
        log.info("broker %d shutting down", self.pid)
        with contextlib.suppress(zmq.ZMQError):
            self._drain()
        for ident, client in list(self._clients.items()):
            seq = client.sub.seq if client.sub is not None else 0
            with contextlib.suppress(zmq.ZMQError):
                self._send(ident, M.encode(M.End(P.END_BROKER_SHUTDOWN, "the broker shut down", seq)))
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
        tcp_monitor = getattr(self, "_tcp_monitor", None)
        if self._tcp is not None:
            if tcp_monitor is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._tcp.disable_monitor()
                tcp_monitor.close(linger=0)
            self._tcp.close(linger=1000)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
