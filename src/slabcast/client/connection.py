"""A client's connection to the broker: DEALER socket, HELLO handshake, broker-death detection, error mapping."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from .._exceptions import (
    AccessDeniedError,
    BrokerGoneError,
    ClosedError,
    EndOfStream,
    EvictedError,
    LimitError,
    ProtocolError,
    PublisherGoneError,
    RequestError,
    ShmFullError,
    SlabcastError,
    StreamExistsError,
    StreamNotFoundError,
)
from ..wire import messages as M
from ..wire import protocol as P
from ..wire.address import ipc_path, load_key, normalize

__all__ = ["Connection", "check_ipc_access", "error_for", "limit_error", "share_socket_file"]

CONNECT_TIMEOUT = 5.0
BYE_TIMEOUT = 2.0

_ctx_lock = threading.Lock()
_ctx: zmq.Context[Any] | None = None
_ctx_pid = 0

_ERRORS: dict[str, type[SlabcastError]] = {
    P.ERR_MALFORMED: ProtocolError,
    P.ERR_VERSION: ProtocolError,
    P.ERR_UNKNOWN_STREAM: StreamNotFoundError,
    P.ERR_STREAM_EXISTS: StreamExistsError,
    P.ERR_SHM_FULL: ShmFullError,
    P.ERR_LIMIT: LimitError,
    P.ERR_INTERNAL: SlabcastError,  # a bug of the broker (its log has the traceback): not this request's fault
}
_ENDS: dict[str, type[SlabcastError]] = {
    P.END_CLOSED: EndOfStream,
    P.END_PUBLISHER_GONE: PublisherGoneError,
    P.END_BROKER_SHUTDOWN: BrokerGoneError,
    P.END_EVICTED: EvictedError,
}
_AUTH_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_KEEPALIVE = 1.0  # seconds between pings while a TCP client waits (the broker drops it after 10 s of silence)


# Descriptors a client needs free before it connects: a Subscriber holds about 9 (its broker connection
# and monitor, its notice socket, each ZeroMQ socket's mailbox, the segment's lock descriptor), a Publisher
# about as many (and its background thread's eventfd); the rest is room for what the program itself opens meanwhile.
_CLIENT_FDS = 16
_FDS_PER_CLIENT = 9
_SOCKETS_PER_CLIENT = 4  # ZeroMQ sockets of a Subscriber or Publisher (connection, monitor pair, notices)


def open_fds() -> int:
    """How many descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself used
    except OSError:
        return -1


def limit_error(what: str) -> LimitError:
    """The error for a process that ran out of descriptors or ZeroMQ sockets while opening ``what``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = open_fds()
    hard_s = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    how = (
        f"close the Subscribers and Publishers you no longer use, or raise the limit: `ulimit -n N` in the shell "
        f"that starts the program, LimitNOFILE=N in its systemd unit, or resource.setrlimit(resource.RLIMIT_NOFILE, "
        f"(N, hard)) before its first Subscriber or Publisher (the hard limit is {hard_s})"
    )
    sockets = _ctx.get(zmq.MAX_SOCKETS) if _ctx is not None else zmq.MAX_SOCKETS
    if used < 0 or used + _CLIENT_FDS >= soft:
        return LimitError(
            f"cannot open {what}: this process has {used} descriptors open and its open-file limit "
            f"(RLIMIT_NOFILE) is {soft}; each Subscriber or Publisher holds about {_FDS_PER_CLIENT}, so about "
            f"{max(0, soft - _CLIENT_FDS) // _FDS_PER_CLIENT} fit: {how}"
        )
    return LimitError(
        f"cannot open {what}: this process reached its limit of {sockets} ZeroMQ sockets (about "
        f"{_SOCKETS_PER_CLIENT} per Subscriber or Publisher; slabcast sets it to the open-file limit, "
        f"RLIMIT_NOFILE {soft}, when the process makes its first one): {how}"
    )


class _Context(zmq.Context):  # type: ignore[type-arg]
    """slabcast's ZeroMQ context: running out of sockets or descriptors is a :class:`LimitError`."""

    def socket(self, socket_type: int, socket_class: Any = None, **kwargs: Any) -> Any:
        try:
            return super().socket(socket_type, socket_class, **kwargs)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EMFILE:
                raise limit_error("a ZeroMQ socket") from exc
            raise


# fork()s this process went through (bumped in the child): a client made before the last one belongs to
# its parent.  Publisher.write and Subscriber.recv compare it instead of calling os.getpid(), a system
# call of 0.2 us on paths of about 3 us.
FORKS = [0]
os.register_at_fork(after_in_child=lambda: FORKS.__setitem__(0, FORKS[0] + 1))


def _context() -> zmq.Context[Any]:
    """One ZeroMQ context per process (a forked child gets a fresh one).

    pyzmq's default of 1023 sockets is about 255 Subscribers; the context holds as
    many sockets as the process may open descriptors (each socket needs at least one).
    """
    global _ctx, _ctx_pid
    with _ctx_lock:
        if _ctx is None or _ctx_pid != os.getpid():
            ctx = _Context()
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft == resource.RLIM_INFINITY:
                soft = 1 << 20
            most = min(soft, ctx.get(zmq.SOCKET_LIMIT))
            if most > ctx.get(zmq.MAX_SOCKETS):
                ctx.set(zmq.MAX_SOCKETS, most)
            _ctx = ctx
            _ctx_pid = os.getpid()
        return _ctx


def error_for(msg: M.End | M.Error, where: str) -> SlabcastError:
    """Turn an ERROR or END message into the exception it stands for (``where`` added unless it says it)."""
    text = msg.message if where in msg.message else f"{msg.message} ({where})"
    if isinstance(msg, M.End):
        return _ENDS.get(msg.code, EndOfStream)(text)
    return _ERRORS.get(msg.code, RequestError)(text)


def unexpected(msg: M.Message, expected: str, where: str) -> ProtocolError:
    """The error for a message that is not the one expected here."""
    return ProtocolError(f"expected {expected}, got {M.name_of(msg)} ({where})")


_EFFECTIVE = os.access in os.supports_effective_ids  # judge by the effective uid and groups, as connect does


def _describe(path: str) -> str:
    """``mode 0750, owner slabcast, group slabcast`` for a file or directory (numbers where there are no names)."""
    import grp
    import pwd

    st = os.stat(path)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"mode {stat.S_IMODE(st.st_mode):04o} ({stat.filemode(st.st_mode)}), owner {owner}, group {group}"


def _who() -> str:
    groups = sorted({os.getegid(), *os.getgroups()})
    return f"this user (uid {os.geteuid()}, groups {', '.join(map(str, groups))})"


def check_ipc_access(path: str, what: str) -> None:
    """Raise :class:`AccessDeniedError` when this user cannot reach or connect to the socket file ``path``.

    ZeroMQ retries a connect refused by file permissions silently, forever: without
    this check a client without permission would only see a timeout.
    """
    directory = os.path.dirname(path)
    parts = directory.split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i]) or os.sep
        if os.path.isdir(d) and not os.access(d, os.X_OK, effective_ids=_EFFECTIVE):
            raise AccessDeniedError(
                f"{_who()} may not enter {d} ({_describe(d)}), the directory of the {what} {path}: a broker "
                f"started with --shm-mode 660 shares its socket with its group; the directory must let that group "
                f"in too (e.g. RuntimeDirectoryMode=0750 in its unit) and this user must be in the group"
            )
    if os.path.exists(path) and not os.access(path, os.W_OK, effective_ids=_EFFECTIVE):
        raise AccessDeniedError(
            f"{_who()} may not connect to the {what} {path} ({_describe(path)}): connecting needs write "
            f"permission; a broker started with --shm-mode 660 gives it to its group (add this user to the group)"
        )


def listened_on(path: str) -> bool:
    """Whether a process listens on the socket file ``path``: False only when a connection is refused (a file
    left by a broker that was killed), where ZeroMQ would retry in silence until the HELLO's timeout (5 s).
    Anything else (a listener, no permission, a path too long for a raw socket) is left to ZeroMQ."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    except OSError:
        pass
    finally:
        probe.close()
    return True


def share_socket_file(endpoint: str, like: str) -> None:
    """Give the socket file of a bound ``ipc://`` ``endpoint`` the permission bits of the socket file ``like``.

    ZeroMQ creates socket files under the process umask; a stream's notice socket
    must admit whoever the broker's own socket admits.
    """
    path, model = ipc_path(endpoint), ipc_path(like)
    if path is None or model is None:
        return
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IMODE(os.stat(model).st_mode) & 0o666)


class Connection:
    """A DEALER socket to the broker that has completed the HELLO handshake.

    Parameters
    ----------
    address : str or None
        Broker address; ``None`` for the default.
    role : {"pub", "sub", "ctl"}
        What this connection is for.
    label : str
        A name for logs and ``slabcast status``.
    """

    def __init__(
        self,
        address: str | None,
        role: str,
        label: str,
        timeout: float = CONNECT_TIMEOUT,
        curve: tuple[str, str] | None = None,
    ) -> None:
        self.address = normalize(address)
        self.remote = self.address.startswith("tcp://")
        self.payload: Any = None  # the data frame of the last message, for TCP chunks
        self._last_send = 0.0
        self.where = f"broker at {self.address}"
        path = ipc_path(self.address)
        if path is not None:
            check_ipc_access(path, "broker socket")
            if not os.path.exists(path):
                raise BrokerGoneError(f"no broker at {self.address} (no socket file); start one with `slabcast "
                                      f"broker`, or give the address of the one running (--address or "
                                      f"$SLABCAST_ADDRESS)")  # fmt: skip
            if not listened_on(path):
                raise BrokerGoneError(f"no broker at {self.address}: nothing listens on its socket file, left by a "
                                      f"broker that is gone (killed?); start one with `slabcast broker`, which "
                                      f"takes the file over")  # fmt: skip
        self.closed = False
        self.gone = False
        self._handshaken = False  # a CURVE handshake completed (TCP)
        self._tcp_connected = False  # a TCP connection was made (no handshake after it: the keys')
        self._curve = curve
        self._pid = os.getpid()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and open_fds() + _CLIENT_FDS > soft:
            # Checked first: libzmq retries a connect that found no descriptor, silently, until a timeout.
            raise limit_error(f"a connection to the {self.where}")
        ctx = _context()
        self.sock = ctx.socket(zmq.DEALER)
        try:
            self.sock.setsockopt(zmq.LINGER, 500)
            self.sock.setsockopt(zmq.SNDHWM, 0)
            self.sock.setsockopt(zmq.RCVHWM, 0)
            if self.remote:
                self._setup_curve(curve)
            elif curve is not None:
                raise ValueError("curve= is for tcp:// addresses; ipc connections are protected by file permissions")
            events = zmq.EVENT_DISCONNECTED | _AUTH_FAILED | \
                (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECTED if self.remote else 0)  # fmt: skip
            self._monitor = self.sock.get_monitor_socket(events)
        except zmq.ZMQError as exc:
            self.sock.close(linger=0)
            if exc.errno == errno.EMFILE:
                raise limit_error(f"a connection to the {self.where}") from exc
            raise BrokerGoneError(f"cannot connect to the {self.where}: {exc}") from exc
        except BaseException:
            self.sock.close(linger=0)
            raise
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        try:
            self.sock.connect(self.address)
            self.send(M.Hello(P.VERSION, os.getpid(), role, label))
            reply = self.recv(timeout)
        except BaseException:
            self.close(bye=False)
            raise
        if reply is None:
            if self.remote and self._monitor.poll(0):
                with contextlib.suppress(AccessDeniedError):
                    self._read_monitor()
            self.close(bye=False)
            if self.remote and not self._handshaken and not self._tcp_connected:
                raise BrokerGoneError(f"no broker reachable at {self.address} within {timeout} s (nothing accepted "
                                      f"the TCP connection: the host, the port, a firewall?)")  # fmt: skip
            if self.remote and not self._handshaken:
                # A broker that refuses the keys hangs up (handled in _read_monitor); one that holds the connection
                # and answers nothing is there but not serving (stopped, overloaded).
                raise BrokerGoneError(f"a TCP connection to {self.address} was accepted, but no broker answered "
                                      f"within {timeout} s")  # fmt: skip
            raise BrokerGoneError(f"no answer from the {self.where} within {timeout} s")
        if isinstance(reply, M.Error):
            self.close(bye=False)
            raise error_for(reply, self.where)
        if not isinstance(reply, M.Welcome) or reply.version != P.VERSION:
            self.close(bye=False)
            got = reply.version if isinstance(reply, M.Welcome) else f"a {M.name_of(reply)}"
            raise ProtocolError(f"protocol version mismatch: client speaks version {P.VERSION}, broker answered {got}")
        self.broker_pid: int = reply.broker_pid
        self.epoch: int = reply.epoch

    def _setup_curve(self, curve: tuple[str, str] | None) -> None:
        if curve is None:
            self.sock.close(linger=0)
            raise ValueError(
                f"a tcp:// broker requires CURVE keys: this client's secret key file and the broker's public key "
                f"file, made by `slabcast keygen` (curve=(secret, public) in Python, --curve SECRET PUBLIC on the "
                f"command line; address {self.address})"
            )
        try:
            public, secret = load_key(curve[0], "this client's secret key file, curve[0]")
            server_public, _ = load_key(curve[1], "the broker's public key file, curve[1]")
        except BaseException:
            self.sock.close(linger=0)
            raise
        if secret is None:
            self.sock.close(linger=0)
            raise ValueError(f"{curve[0]} holds no secret key (pass the *.key_secret file)")
        self.sock.curve_publickey = public
        self.sock.curve_secretkey = secret
        self.sock.curve_serverkey = server_public
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, int(P.HEARTBEAT_IVL * 1000))
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(P.HEARTBEAT_TIMEOUT * 1000))  # (> REMOTE_SILENCE)

    def send(self, msg: M.Message, fields: int | None = None) -> None:
        """Send one message (only its first ``fields`` fields: for a broker that knows no more); raise
        :class:`BrokerGoneError` if the socket is unusable."""
        if self.closed:
            raise ClosedError("this connection was closed")
        try:
            self.sock.send(M.encode(msg, fields), copy=True)
            self._last_send = time.monotonic()
        except zmq.ZMQError as exc:
            raise BrokerGoneError(f"cannot send to the {self.where}: {exc}") from exc

    def pollables(self) -> tuple[Any, Any]:
        """The connection's socket and its monitor: input on either may wake a client waiting on it."""
        return (self.sock, self._monitor)

    def keepalive(self, interval: float) -> None:
        """On a remote connection, send a keep-alive (SYNC 0) if nothing went out for ``interval`` seconds."""
        if self.remote and time.monotonic() - self._last_send >= interval:
            self.send(M.Sync(0))

    def has_input(self) -> bool:
        """Whether a message is waiting to be received (no system call when one is)."""
        return bool(self.sock.getsockopt(_EVENTS) & _POLLIN)

    def recv(
        self, timeout: float | None, before_wait: Callable[[], None] | None = None
    ) -> M.Message | None:
        """Return the next message, ``None`` after ``timeout`` seconds (``None``: wait forever).

        Messages are decoded and checked by their type; fields appended by a later
        protocol version are ignored.

        ``before_wait()`` runs whenever no message is ready, before waiting (or
        before returning ``None``).  Messages the broker sent before it died are
        still returned; after them, :class:`BrokerGoneError` is raised.
        """
        if self.closed:
            raise ClosedError("this connection was closed")
        sock = self.sock
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                raw = sock.recv(_NOBLOCK)
                self.payload = sock.recv(copy=False) if self.remote and sock.rcvmore else None
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise BrokerGoneError(f"cannot receive from the {self.where}: {exc}") from exc
            else:
                msg = M.decode(raw, strict=False)
                if not (self.remote and isinstance(msg, M.Synced) and msg.token == 0):
                    return msg
                continue  # (the answer to our keep-alive: nobody waits for it, a SUBSCRIBE's caller least of all)
            if before_wait is not None:
                before_wait()
            if self.gone:
                raise BrokerGoneError(f"the {self.where} went away")
            if deadline is None:
                wait = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    if self.poll_gone():
                        continue  # deliver what is queued, then raise
                    return None
                wait = max(1, int(left * 1000))
            if self.remote:
                # A remote client proves it is alive by talking; the broker has no pid to check.
                if time.monotonic() - self._last_send >= _KEEPALIVE:
                    self.send(M.Sync(0))
                wait = int(_KEEPALIVE * 1000) if wait < 0 else min(wait, int(_KEEPALIVE * 1000))
            events = dict(self._poller.poll(wait))
            if self._monitor in events:
                self._read_monitor()

    def _no_handshake(self, when: str) -> str:
        server = f" ({self._curve[1]})" if self._curve else ""
        return (
            f"no CURVE handshake with {self.address} {when}: wrong server key{server}, or this client's key is "
            f"not authorized (its public key must be in the broker's --curve-clients directory)"
        )

    def _read_monitor(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        with contextlib.suppress(zmq.Again):
            while True:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._handshaken = True
                    continue
                if event == zmq.EVENT_CONNECTED:
                    self._tcp_connected = True
                    continue
                self.gone = True
                if event & zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise AccessDeniedError(
                        f"the {self.where} refused this client's CURVE key (its public key must be in the "
                        f"broker's --curve-clients directory)"
                    )
                if self.remote and not self._handshaken:
                    # A broker that cannot decrypt our hello (we hold the wrong server key) just hangs up; so
                    # does a proxy or tunnel whose broker is down.
                    err = AccessDeniedError(self._no_handshake("(the peer closed the connection during it: a "
                                                               "proxy or tunnel with no broker behind it does "
                                                               "too)"))  # fmt: skip
                    err.hung_up = True
                    raise err

    def fds(self) -> tuple[int, int]:
        """The file descriptors of the socket and of its monitor (``zmq.FD``): readable when either may have
        something to read (edge-triggered, as ZeroMQ says: what another call on the socket takes first, it
        does not signal; check ``has_input`` after such a call)."""
        return int(self.sock.getsockopt(zmq.FD)), int(self._monitor.getsockopt(zmq.FD))

    def poll_gone(self) -> bool:
        """Check, without blocking, whether the broker connection dropped."""
        if not self.gone and self._monitor.poll(0):
            self._read_monitor()
        return self.gone

    def close(self, bye: bool = True) -> None:
        """Say BYE (unless the broker is gone) and close the sockets (idempotent)."""
        if self.closed:
            return
        if os.getpid() != self._pid:  # inherited through fork: not ours to close
            self.closed = True
            return
        if bye and not self.gone:
            # BYE is answered, so everything sent before it has been handled when we go.
            with contextlib.suppress(zmq.ZMQError, BrokerGoneError, ProtocolError):
                self.sock.send(M.encode(M.Bye()), zmq.NOBLOCK)
                deadline = time.monotonic() + BYE_TIMEOUT
                while (left := deadline - time.monotonic()) > 0:
                    msg = self.recv(left)
                    if msg is None or (isinstance(msg, M.End) and msg.code == P.END_BYE):
                        break
        self.closed = True
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
