"""The broker's ZeroMQ shell: binds, polls, decodes, hands each message to :class:`BrokerState`, sends what it returns.

The broker owns every stream's slabs, grants them, tracks readers' cursors and
liveness, reclaims slabs; those decisions are :mod:`slabcast.broker.state`'s (no
sockets, no clock).  Here: the sockets (ipc ROUTER, TCP ROUTER with CURVE, their
monitors), an outbox per client for what a full pipe refused, signals, the
descriptor limit and a clean shutdown.

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
from collections.abc import Callable
from typing import Any

import zmq

from ..core.shm import reap_stale
from ..wire import messages as M
from ..wire import protocol as P
from ..wire.address import ipc_path, normalize
from .lock import AddressLock
from .model import TCP_PREFIX as _TCP
from .model import Out
from .state import BrokerState, System, open_fds
from .tcp import TcpListener

__all__ = ["Broker"]

log = logging.getLogger("slabcast.broker")

_SWEEP_INTERVAL = 0.5  # seconds between liveness checks of client processes
# Plain ints: pyzmq's flag enums cost Python time on every call of the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_ENCODED = (bytes,)
_RCVMORE = int(zmq.RCVMORE)


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


class Broker:
    """The broker's sockets and event loop around its :class:`~slabcast.broker.state.BrokerState`.

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
    system : System, optional
        The state's seams to the operating system (tests fake some).

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
        system: System | None = None,
    ) -> None:
        self.address = normalize(address)
        self.shm_mode = shm_mode
        self.lease_timeout = lease_timeout
        self.pid = os.getpid()
        self.epoch = secrets.randbits(32)
        self.started = time.time()
        self.fd_limit, self._fd_soft_before = _raise_nofile()
        self._fd_headroom = fd_headroom(self.fd_limit)
        self._lock = AddressLock(self.address, shm_mode) if ipc_path(self.address) else None
        reaped = reap_stale()
        if reaped:
            log.warning("removed %d shared-memory segment%s left by brokers that died (kill -9, a crash): %s",
                        len(reaped), "s" * (len(reaped) != 1), ", ".join(reaped))  # fmt: skip
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
        self._listener: TcpListener | None = None
        self._tcp: zmq.Socket[Any] | None = None
        self.tcp_address: str | None = None
        if tcp is not None:
            try:
                self._listener = TcpListener(self._ctx, tcp, curve_secret, curve_clients)
            except BaseException:
                self._close_sockets()
                if self._lock:
                    self._lock.release()  # (and our socket's file: no broker serves there)
                raise
            self._tcp = self._listener.sock
            self.tcp_address = self._listener.address
        self.state = BrokerState(
            pid=self.pid, epoch=self.epoch, address=self.address, now=time.monotonic(), shm_mode=shm_mode,
            lease_timeout=lease_timeout, fd_limit=self.fd_limit, fd_headroom=self._fd_headroom,
            system=system, sources=sources,
        )  # fmt: skip
        self.state.tcp_address = self.tcp_address
        self._outbox: dict[bytes, deque[Any]] = {}
        self._stopping = False
        self._last_sweep = 0.0

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
        on_sigterm: Callable[..., None] | None = None,
    ) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM; then shut down cleanly.

        ``on_sigterm``: SIGTERM's handler instead of stopping (a broker under ``slabcast up``, which
        stops it with SIGINT).

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
            old = [signal.signal(signal.SIGTERM, on_sigterm or self.stop), signal.signal(signal.SIGINT, self.stop)]
            old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        if parent_fd is not None:
            poller.register(parent_fd, zmq.POLLIN)
        if self._listener is not None:
            poller.register(self._listener.sock, zmq.POLLIN)
            poller.register(self._listener.monitor, zmq.POLLIN)
        log.info("broker %d listening at %s", self.pid, self.address)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.info(
            "open-file limit (RLIMIT_NOFILE) %d (was %d; hard %s): room for about %d more clients (one descriptor "
            "each, %d kept free); raise it with LimitNOFILE= in the unit or `ulimit -n`",
            self.fd_limit,
            self._fd_soft_before,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            self.fd_limit - self._fd_headroom - open_fds(),
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
                if self._listener is not None and self._listener.monitor in events:
                    self._listener.log_failed_handshakes()
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
            try:
                # Our handlers stay until the shutdown is done: a second signal meanwhile (`timeout` sends its
                # SIGINT to the broker, then to its whole process group) only asks again, and never cuts the
                # shutdown short (its sockets' files and the segments were left, exit 130).
                self._shutdown()
            finally:
                if handle_signals:
                    signal.set_wakeup_fd(old_fd)
                    signal.signal(signal.SIGTERM, old[0])
                    signal.signal(signal.SIGINT, old[1])
                wake_r.close()
                wake_w.close()

    def _drain(self, sock: zmq.Socket[Any] | None = None, limit: int = 10_000) -> None:
        router = sock if sock is not None else self._router
        prefix = _TCP if router is self._tcp else b""
        recv = router.recv
        state = self.state
        clients = state.clients
        for _ in range(limit):
            # Plain recv with integer flags: recv_multipart's per-call Python costs show in profiles.
            try:
                ident = recv(_NOBLOCK)
            except zmq.Again:
                return
            key = prefix + ident
            peer_pid = 0
            if key in clients or prefix:
                parts = [recv(_NOBLOCK)]  # a ROUTER delivers whole messages: the rest is there
            else:
                # A new local client: learn its pid as *our* PID namespace sees it, from the socket.
                frame = router.recv(_NOBLOCK, copy=False)
                peer_pid = _peer_pid(frame)
                parts = [frame.bytes]
            while router.getsockopt(_RCVMORE):
                parts.append(recv(_NOBLOCK))
            if len(parts) != 1:
                self._send(key, M.Error(P.ERR_MALFORMED, f"expected one message part, got {len(parts)}"))
                continue
            self._send_all(state.handle(key, parts[0], time.monotonic(), peer_pid))

    def _send_all(self, out: list[Out]) -> None:
        """Send what the state returned, in order (after forgetting the outbox of clients it dropped)."""
        forgotten = self.state.forgotten
        if forgotten:
            for ident in forgotten:
                self._outbox.pop(ident, None)
            forgotten.clear()
        for ident, message, data in out:
            if data is None:
                self._send(ident, message)
            else:
                self._send_by_value(ident, message, data)

    def _send(self, ident: bytes, message: Any) -> None:
        payload = message if type(message) is bytes else M.encode(message)
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

    def _send_by_value(self, ident: bytes, message: Any, data: bytes) -> None:
        # A TCP client shares no memory with us: the samples travel in a second message part.
        payload = M.encode(message)
        box = self._outbox.get(ident)
        if box is None:
            try:
                self._sock_for(ident).send_multipart((ident.removeprefix(_TCP), payload, data), zmq.NOBLOCK)
                return
            except zmq.Again:
                box = self._outbox[ident] = deque()
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                return
        box.append((payload, data))

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

    def _sweep(self) -> None:
        """Evict subscribers that hold leases too long; drop dead clients after handling what they sent."""
        now = self._last_sweep = time.monotonic()
        self._send_all(self.state.sweep(now))
        if not self.state.dead(now):
            return
        self._drain()
        if self._tcp is not None:
            self._drain(self._tcp)
        self._send_all(self.state.reap(time.monotonic()))

    def status(self) -> dict[str, Any]:
        """Return the broker's state as plain data (streams, subscribers, pool use)."""
        return self.state.status(time.monotonic())

    def subscribers(self, name: str) -> int:
        """How many subscribers stream ``name`` has now (0 if it is not open); safe from another thread,
        one message stale at worst."""
        stream = self.state.streams.get(name)
        return len(stream.subs) if stream is not None else 0

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

    # -------------------------------------------------------------- shutdown

    def _shutdown(self) -> None:
        log.info("broker %d shutting down", self.pid)
        with contextlib.suppress(zmq.ZMQError):
            self._drain()
        out = self.state.shutdown()
        with contextlib.suppress(zmq.ZMQError):
            self._send_all(out)
        with contextlib.suppress(zmq.ZMQError):
            self._flush_outbox()
        self._close_sockets()
        if self._lock is not None:
            self._lock.release()

    def _close_sockets(self) -> None:
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            self._router.disable_monitor()
            monitor.close(linger=0)
        self._router.close(linger=1000)
        listener = getattr(self, "_listener", None)
        if listener is not None:
            listener.close()
        self._ctx.term()
