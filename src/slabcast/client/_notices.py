"""The publisher's notice socket: a ZeroMQ XPUB that every local subscriber of the stream joins."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import zmq

from ..wire import messages as M
from ..wire import protocol as P
from .connection import _context, share_socket_file

__all__ = ["NoticeSocket"]

_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


class NoticeSocket:
    """Bind the notice socket at ``endpoint``; wait (bounded) until the subscribers that came before the stream
    (their join ``tokens``, from OPENED) joined it.  ``address``: the broker's, whose users may join."""

    def __init__(self, endpoint: str, tokens: Any, timeout: float, address: str, topic: bytes) -> None:
        self._topic = topic
        sock = _context().socket(zmq.XPUB)
        try:
            sock.setsockopt(zmq.SNDHWM, P.NOTICE_HWM)
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            sock.setsockopt(zmq.LINGER, 500)
            sock.bind(endpoint)
            share_socket_file(endpoint, address)  # whoever may reach the broker may join
            waiting = {bytes(t) for t in tokens}
            deadline = time.monotonic() + min(timeout, 5.0)
            while waiting and (left := deadline - time.monotonic()) > 0:
                if sock.poll(int(left * 1000) + 1):
                    event = sock.recv()
                    _answer_join(sock, event)
                    waiting.discard(event[1:])
        except BaseException:
            sock.close(linger=0)
            raise
        self._sock = sock

    @property
    def fd(self) -> int:
        """The socket's ``zmq.FD``: readable when a subscriber may be joining (edge-triggered; see
        :meth:`joining`)."""
        return int(self._sock.getsockopt(zmq.FD))

    def joining(self) -> bool:
        """Whether a join waits to be answered (``zmq.EVENTS``; takes ZeroMQ's pending commands)."""
        return bool(self._sock.getsockopt(_EVENTS) & _POLLIN)

    def send(self, msg: M.Notice) -> None:
        """Publish a NOTICE; a subscriber whose queue is full loses this one (it sees the seq gap), nobody waits."""
        try:  # noqa: SIM105  (per doorbell: a try costs nothing in 3.11; suppress() is an object and two calls)
            self._sock.send(self._topic + M.encode(msg), _NOBLOCK)
        except zmq.Again:
            pass

    def send_end(self, msg: M.NoticeEnd) -> None:
        """Publish the stream's end, in order after its last notice (raises zmq.Again if it cannot go now)."""
        self._sock.send(self._topic + M.encode(msg), _NOBLOCK)

    def serve_joins(self) -> None:
        """Answer subscribers joining the notice socket."""
        sock = self._sock
        while sock.getsockopt(_EVENTS) & _POLLIN:
            _answer_join(sock, sock.recv(_NOBLOCK))

    def close(self) -> None:
        self._sock.close()  # lingers up to 0.5 s for subscribers still reading


def _answer_join(sock: Any, event: bytes) -> None:
    # A new token subscription: say JOINED on it, so the subscriber knows every later notice reaches it.
    if len(event) > 2 and event[0] == 1 and event[1] == 1:
        with contextlib.suppress(zmq.Again):
            sock.send(event[1:] + M.encode(M.Joined()), _NOBLOCK)
