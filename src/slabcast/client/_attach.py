"""Opening a local (``ipc://``) subscription, once the broker answered SUBSCRIBE: map the sleeper page, join the
publisher's notice socket, take the liveness lock, ATTACH, and build the :class:`~slabcast.client._local.LocalReceiver`
that receives from then on."""

from __future__ import annotations

import os
import time
from typing import Any

import zmq

from .._exceptions import BrokerGoneError, ProtocolError
from .._info import StreamInfo
from ..core.ring import DESCRIPTOR_BYTES, ring_layout, wakes_futex_sleepers
from ..core.shm import CLIENT_BASE, attach_page, hold, open_locks
from ..wire import messages as M
from ..wire import protocol as P
from ._local import LocalReceiver
from .connection import Connection, _context, error_for, unexpected

__all__ = ["open_local"]


def open_local(
    conn: Connection, reply: M.Subscribed, info: StreamInfo, mm: Any, token: bytes, timeout: float, **settings: Any
) -> LocalReceiver:
    """Join the publisher's notice socket and ATTACH (``reply`` answered a local SUBSCRIBE with ``token``).

    The receiver's ``start`` is the stream index the subscription starts at.  On an error,
    what this opened is closed (the connection and the mapping are the caller's).
    """
    where = settings["where"]
    if not reply.notice_endpoint:
        raise ProtocolError(f"SUBSCRIBED for a local subscriber names no notice endpoint ({where})")
    notices = None
    lock_fd = -1
    page = None
    early_end: M.End | None = None
    history: list[M.History] = []
    try:
        lock_fd = open_locks(reply.segment)
        # Our byte of the sleeper table (a doorbell) and our cursor table entry are in a page we map writable
        # (None: we may only read the segment; then the publisher sends a doorbell subscriber a notice for every
        # frame, and we send an ACK for every slab).
        try:
            offset, slots = ring_layout(mm)
        except ValueError as exc:
            raise ProtocolError(f"{exc} ({where})") from None
        page = attach_page(reply.segment, offset + slots * DESCRIPTOR_BYTES)
        notices, early_end = _join(conn, reply.notice_endpoint, info.name, P.token_topic(token), timeout, where)
        # Every notice from now on reaches us: the broker starts us at its head (or at 0 for
        # a subscription made before the stream existed).
        # Our liveness mark, which the broker can test in any PID namespace; gone with our files.
        slot = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        hold(lock_fd, CLIENT_BASE + slot)
        # A futex subscriber sleeps with its byte in the futex sleeper table when the publisher looks there
        # (sleep_futex): the publisher then wakes it only when it sleeps, with its mask, not at every frame.
        # Only to a broker that says (SUBSCRIBED) it takes that field: an earlier one refuses an ATTACH of three.
        futex_sleeper = reply.futex_sleeper is True and settings.get("wake") == "futex" and page is not None \
            and _table_woken(mm)  # fmt: skip
        if futex_sleeper:
            conn.send(M.Attach(slot, page is not None, True))
        else:
            conn.send(M.Attach(slot, page is not None), fields=2)  # (the two fields every broker takes)
        while True:
            answer = conn.recv(timeout)
            if answer is None:
                raise BrokerGoneError(f"no answer to ATTACH from the {conn.where} within {timeout} s")
            if isinstance(answer, M.End) and answer.code in (P.END_CLOSED, P.END_PUBLISHER_GONE):
                # A short stream may end before our ATTACH is answered: its notices are with us.
                early_end = answer
                continue
            if isinstance(answer, M.History):  # the history it asked for, before ATTACHED
                history.append(answer)
                continue
            if isinstance(answer, M.Synced):  # (the answer to the SYNC after our SUBSCRIBE: Subscriber(ready=))
                continue
            break
        if isinstance(answer, M.Error) and early_end is not None:
            raise error_for(early_end, where)  # the stream ended before it started us: nothing after our start
        if isinstance(answer, M.Error | M.End):
            raise error_for(answer, where)
        if not isinstance(answer, M.Attached):
            raise unexpected(answer, "ATTACHED", where)
    except BaseException:
        if notices is not None:
            notices.close(linger=0)
        if lock_fd >= 0:
            os.close(lock_fd)  # else it would keep the (soon unlinked) segment's memory alive
        if page is not None:
            page.close()
        raise
    if answer.cursor_tag is not None and not 0 < answer.cursor_tag <= 0xFFFF:
        raise ProtocolError(f"ATTACHED cursor_tag must be 1..65535 or nil, got {answer.cursor_tag} ({where})")
    if answer.seq is None:
        raise ProtocolError(f"ATTACHED names no ring descriptor to start from: the broker speaks protocol version 2, "
                            f"this subscriber version 3 ({where})")  # fmt: skip
    return LocalReceiver(conn, reply, info, mm, notices, lock_fd, answer.start, early_end, history=history,
                         ring_seq=answer.seq, page=page, entry=answer.sleeper if page is not None else None,
                         sleeper=answer.sleeper if page is not None and settings.get("wake", "doorbell") == "doorbell"
                         else None, tag=answer.cursor_tag or 0, futex_sleeper=futex_sleeper, **settings)  # fmt: skip


_SLEEP_FUTEX_WAIT = 0.1  # seconds a futex subscriber waits for its publisher to say it looks at the table


def _table_woken(mm: Any) -> bool:
    """Whether the stream's publisher wakes subscribers asleep with a byte in the futex sleeper table (its
    ``sleep_futex``), waiting a moment for it: a subscription that waited for its stream is answered when the stream
    opens, as its publisher maps the segment, before or after the publisher says so."""
    deadline = time.monotonic() + _SLEEP_FUTEX_WAIT
    while not wakes_futex_sleepers(mm):
        if time.monotonic() >= deadline:
            return False  # (a publisher that never says it: counted in futex_waiters, woken after every frame)
        time.sleep(0.001)
    return True


def _join(conn: Connection, endpoint: str, name: str, token: bytes, timeout: float,
          where: str) -> tuple[Any, M.End | None]:  # fmt: skip
    """Connect a SUB socket to the publisher's notice socket; wait until it proves it reaches us, or the stream
    ends (an END closed or publisher-gone, returned with the socket: no JOINED comes then, and the frames are in
    the ring)."""
    sock = _context().socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        # A paused subscriber's backlog is bounded: past it the publisher's socket drops notices for
        # it alone, and it sees the gap (a discontinuity) when it comes back.
        sock.setsockopt(zmq.RCVHWM, P.NOTICE_BACKLOG)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)  # the publisher may bind a moment after we connect
        sock.connect(endpoint)
        sock.setsockopt(zmq.SUBSCRIBE, P.stream_topic(name))
        sock.setsockopt(zmq.SUBSCRIBE, token)
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(conn.sock, zmq.POLLIN)  # the stream may end, or the broker go, meanwhile
        while True:
            left = deadline - time.monotonic()
            events = dict(poller.poll(int(left * 1000) + 1)) if left > 0 else {}
            if not events:
                raise BrokerGoneError(
                    f"the publisher of stream {name!r} did not answer on its notice socket "
                    f"{endpoint} within {timeout} s"
                )
            if conn.sock in events:
                msg = conn.recv(0)
                if isinstance(msg, M.End) and msg.code in (P.END_CLOSED, P.END_PUBLISHER_GONE):
                    sock.setsockopt(zmq.UNSUBSCRIBE, token)
                    return sock, msg
                if isinstance(msg, M.End | M.Error):
                    raise error_for(msg, where)
            if sock in events and sock.recv().startswith(token):
                break
        sock.setsockopt(zmq.UNSUBSCRIBE, token)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock, None
