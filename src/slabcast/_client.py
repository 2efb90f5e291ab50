"""A client's connection to the broker: DEALER socket, HELLO handshake, broker-death detection, error mapping."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import zmq

from . import _protocol as P
from ._address import ipc_path, normalize
from ._exceptions import (
    BrokerGoneError,
    ClosedError,
    EndOfStream,
    ProtocolError,
    PublisherGoneError,
    RequestError,
    ShmFullError,
    SlabcastError,
    StreamExistsError,
    StreamNotFoundError,
)

__all__ = ["Connection", "error_for"]

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
}
_ENDS: dict[str, type[SlabcastError]] = {
    P.END_CLOSED: EndOfStream,
    P.END_PUBLISHER_GONE: PublisherGoneError,
    P.END_BROKER_SHUTDOWN: BrokerGoneError,
}


def _context() -> zmq.Context[Any]:
    """One ZeroMQ context per process (a forked child gets a fresh one)."""
    global _ctx, _ctx_pid
    with _ctx_lock:
        if _ctx is None or _ctx_pid != os.getpid():
            _ctx = zmq.Context()
            _ctx_pid = os.getpid()
        return _ctx


def error_for(msg: tuple[Any, ...], where: str) -> SlabcastError:
    """Turn an ERROR or END message into the exception it stands for."""
    code = msg[1] if len(msg) > 1 else "?"
    text = msg[2] if len(msg) > 2 else ""
    if msg[0] == P.END:
        return _ENDS.get(code, EndOfStream)(f"{text} ({where})")
    return _ERRORS.get(code, RequestError)(f"{text} ({where})")


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

    def __init__(self, address: str | None, role: str, label: str, timeout: float = CONNECT_TIMEOUT) -> None:
        self.address = normalize(address)
        self.where = f"broker at {self.address}"
        path = ipc_path(self.address)
        if path is not None and not os.path.exists(path):
            raise BrokerGoneError(f"no broker at {self.address} (no socket file); start one with `slabcast broker`")
        self.closed = False
        self.gone = False
        self._pid = os.getpid()
        ctx = _context()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        try:
            self.sock.connect(self.address)
            self.send([P.HELLO, P.VERSION, os.getpid(), role, label])
            reply = self.recv(timeout)
        except BaseException:
            self.close(bye=False)
            raise
        if reply is None:
            self.close(bye=False)
            raise BrokerGoneError(f"no answer from the {self.where} within {timeout} s")
        if reply[0] == P.ERROR:
            self.close(bye=False)
            raise error_for(reply, self.where)
        if reply[0] != P.WELCOME or len(reply) < 4 or reply[1] != P.VERSION:
            self.close(bye=False)
            got = reply[1] if len(reply) > 1 and reply[0] == P.WELCOME else f"a {P.NAMES.get(reply[0], reply[0])}"
            raise ProtocolError(f"protocol version mismatch: client speaks version {P.VERSION}, broker answered {got}")
        self.broker_pid: int = reply[2]
        self.epoch: int = reply[3]

    def send(self, msg: list[Any]) -> None:
        """Send one message; raise :class:`BrokerGoneError` if the socket is unusable."""
        if self.closed:
            raise ClosedError("this connection was closed")
        try:
            self.sock.send(P.pack(msg), copy=True)
        except zmq.ZMQError as exc:
            raise BrokerGoneError(f"cannot send to the {self.where}: {exc}") from exc

    def recv(self, timeout: float | None) -> tuple[Any, ...] | None:
        """Return the next message, ``None`` after ``timeout`` seconds (``None``: wait forever).

        Messages the broker sent before it died are still returned; after them,
        :class:`BrokerGoneError` is raised.
        """
        if self.closed:
            raise ClosedError("this connection was closed")
        sock = self.sock
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise BrokerGoneError(f"cannot receive from the {self.where}: {exc}") from exc
            else:
                return P.unpack(raw)
            if self.gone:
                raise BrokerGoneError(f"the {self.where} went away")
            if deadline is None:
                wait = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait = max(1, int(left * 1000))
            events = dict(self._poller.poll(wait))
            if self._monitor in events:
                with contextlib.suppress(zmq.Again):
                    while True:
                        self._monitor.recv_multipart(zmq.NOBLOCK)
                self.gone = True

    def poll_gone(self) -> bool:
        """Check, without blocking, whether the broker connection dropped."""
        if not self.gone and self._monitor.poll(0):
            self.gone = True
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
                self.sock.send(P.pack([P.BYE]), zmq.NOBLOCK)
                deadline = time.monotonic() + BYE_TIMEOUT
                while (left := deadline - time.monotonic()) > 0:
                    msg = self.recv(left)
                    if msg is None or (msg[0] == P.END and len(msg) > 1 and msg[1] == P.END_BYE):
                        break
        self.closed = True
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
