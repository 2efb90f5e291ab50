"""asyncio subscriber: ``async for chunk in slabcast.aio.Subscriber(...)``, same semantics as the blocking one."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq

from ._exceptions import BrokerGoneError, ClosedError, EndOfStream, StreamNotFoundError, WouldBlock
from ._info import StreamInfo
from .client._subargs import check_waits, recv_timeout
from .client.subscriber import Chunk
from .client.subscriber import Subscriber as _BlockingSubscriber

__all__ = ["Subscriber"]

_KEEPALIVE = 1.0


class Subscriber:
    """An asyncio subscriber; takes the same arguments as :class:`slabcast.Subscriber`.

    Waiting for chunks, or for a stream that is not there yet, never blocks the
    event loop: the socket's file descriptor is watched by the loop (the
    constructor makes one round trip to the broker, as the blocking subscriber
    does).  A stream that is already there is subscribed when the
    constructor returns (``info`` and ``size`` at once), as with the blocking
    subscriber; one that is not yet there is waited for (``wait=``, default
    ``timeout``) by a thread the constructor starts, whose ``SUBSCRIBE`` the
    broker holds until the stream opens; the constructor returns once the broker
    holds it (one round trip), so the subscriber receives from index 0 any stream
    opened after the constructor returned (``ready=``, if given, is called just
    before it returns, in its thread; not when the broker did not answer in time,
    or refused, which the first ``await`` raises): ``info`` and ``size`` then come
    with the first ``await`` (``recv``, ``async for`` or ``async with``), which
    raises :class:`~slabcast.StreamNotFoundError` if it did not appear in time.
    Cancelling a task that awaits :meth:`recv` takes nothing from the stream;
    leaving ``async with`` (or cancelling ``async for``) closes the subscription
    and releases every chunk no longer viewed.

    Examples
    --------
    >>> async with slabcast.aio.Subscriber("mic", seconds=0.5, clip=True) as sub:  # doctest: +SKIP
    ...     async for chunk in sub:
    ...         with chunk:
    ...             level = float(abs(chunk.data).max())
    """

    def __init__(self, stream: str, size: int | None = None, **options: Any) -> None:
        if options.get("wake", "doorbell") != "doorbell":
            raise ValueError(f"slabcast.aio.Subscriber waits on sockets the event loop polls: wake must be 'doorbell', "
                             f"got {options['wake']!r} (a futex or a spin would block the loop)")  # fmt: skip
        self._sub: _BlockingSubscriber | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._waiting: concurrent.futures.Future[_BlockingSubscriber] | None = None
        _, wait = check_waits(options.get("timeout", 10.0), options.get("wait"))  # (here: the first look has none)
        ready = options.pop("ready", None)
        if ready is not None and not callable(ready):
            raise TypeError(f"ready must be a callable taking no argument or None, got {ready!r}")
        try:
            # (no wait: the broker answers at once, SUBSCRIBED or an unknown stream)
            self._adopt(_BlockingSubscriber(stream, size, **{**options, "wait": 0}))
        except StreamNotFoundError:
            if not wait:
                raise
            waiting: concurrent.futures.Future[_BlockingSubscriber] = concurrent.futures.Future()
            self._waiting = waiting
            held = threading.Event()  # (set once the broker holds it, or the subscription came or failed)

            def subscribe() -> None:  # (the broker holds its SUBSCRIBE until the stream opens)
                try:
                    sub = _BlockingSubscriber(stream, size, ready=held.set, **options)
                except BaseException as exc:
                    with self._lock:
                        if not waiting.done():
                            waiting.set_exception(exc)
                    return
                finally:
                    held.set()  # (the constructor waits no longer: subscribed, or failed)
                with self._lock:  # (close() now or before: either it or we close it)
                    closed = waiting.done()  # (closed while it waited: close() said so to whoever awaited it)
                    if not closed:
                        waiting.set_result(sub)
                if closed:
                    sub.close()

            threading.Thread(target=subscribe, daemon=True, name=f"slabcast-aio-wait-{stream}").start()
            # Until the broker holds that SUBSCRIBE (a round trip, as the look above; bounded by the broker's
            # answer time): a stream opened from now on is received from index 0.  An error comes with the
            # first await.
            if not held.wait(options.get("timeout", 10.0)) or (waiting.done() and waiting.exception() is not None):
                ready = None  # (not held in time, or failed: the first await says why; nothing is ready)
        if ready is not None:
            try:
                ready()
            except BaseException:
                self.close()
                raise

    def _adopt(self, sub: _BlockingSubscriber) -> None:
        sub.auto_resubscribe = False  # we resubscribe in a worker thread (reconnect=)
        self._sub = sub

    async def _subscribed(self) -> _BlockingSubscriber:
        """The blocking subscriber, once its stream is there (waiting for it off the event loop)."""
        if self._sub is None and not self._closed and self._waiting is not None:
            # (shielded: a cancelled await takes nothing, the subscription goes on for the next one)
            await asyncio.shield(asyncio.wrap_future(self._waiting))
        return self._ready()

    def _ready(self) -> _BlockingSubscriber:
        if self._sub is None and self._closed:
            raise ClosedError("this subscriber was closed")
        if self._sub is None:
            if self._waiting is not None and self._waiting.done() and not self._closed:
                self._adopt(self._waiting.result())  # (raises what the subscription raised)
            else:
                raise RuntimeError("this subscriber's stream was not there when it was made: its info and size come "
                                   "with the first await (recv, async for, async with)")  # fmt: skip
        assert self._sub is not None
        return self._sub

    @property
    def info(self) -> StreamInfo:
        """The stream's :class:`~slabcast.StreamInfo` (see the class docstring for when it is known)."""
        return self._ready().info

    @property
    def size(self) -> int:
        """Samples per chunk (see the class docstring for when it is known)."""
        return self._ready().size

    async def recv(self, timeout: float | None = None) -> Chunk:
        """Wait for the next chunk; raises as :meth:`slabcast.Subscriber.recv` does."""
        timeout = recv_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        sub = await self._subscribed()
        while True:
            try:
                return sub.recv_nowait()
            except WouldBlock:
                pass
            except BrokerGoneError as exc:
                if not sub.reconnect:
                    raise
                # Waiting for the next broker takes seconds: off the event loop.
                await asyncio.to_thread(sub.resubscribe, exc)
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise sub.timeout_error(timeout, f"async subscriber of stream {sub.name!r}")
            sub.keepalive(_KEEPALIVE)  # a remote client proves it is alive by talking
            try:
                await _readable(sub.pollables(), min(left, _KEEPALIVE) if left is not None else _KEEPALIVE)
            except BrokerGoneError:
                continue  # recv_nowait() says so, and resubscribes when asked to

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        try:
            while True:
                try:
                    chunk = await self.recv()
                except EndOfStream as exc:
                    if type(exc) is EndOfStream:
                        return
                    raise
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self.close()
            raise

    def statistics(self) -> Any:
        """This subscriber's counters (see :meth:`slabcast.Subscriber.statistics`)."""
        return self._ready().statistics()

    def close(self) -> None:
        """Unsubscribe and release every chunk no longer viewed (idempotent); a subscription still waiting for its
        stream is closed when it comes."""
        with self._lock:
            self._closed = True
            sub, waiting = self._sub, self._waiting
            if sub is None and waiting is not None:
                if not waiting.done():  # (a recv awaiting the stream raises this at once; the thread closes it)
                    waiting.set_exception(ClosedError("this subscriber was closed while it waited for its stream"))
                elif waiting.exception() is None:
                    sub = waiting.result()
        if sub is not None:
            sub.close()

    async def __aenter__(self) -> Subscriber:
        await self._subscribed()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def _readable(sockets: tuple[zmq.Socket[Any], ...], timeout: float) -> None:
    """Wait until one of the ZeroMQ sockets may have input, or ``timeout`` seconds pass."""
    loop = asyncio.get_running_loop()
    # ZeroMQ's descriptor is edge-triggered: look at EVENTS before sleeping on it.
    if _has_input(sockets):
        return
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    try:
        fds = [int(s.getsockopt(zmq.FD)) for s in sockets]
    except zmq.ZMQError as exc:  # a socket closed under us: the broker connection is gone
        raise BrokerGoneError(f"the broker connection closed while waiting ({exc})") from exc
    for fd in fds:
        loop.add_reader(fd, wake)
    try:
        if _has_input(sockets):
            return
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        pass
    finally:
        for fd in fds:
            loop.remove_reader(fd)


def _has_input(sockets: tuple[zmq.Socket[Any], ...]) -> bool:
    try:
        return any(int(s.getsockopt(zmq.EVENTS)) & zmq.POLLIN for s in sockets)
    except zmq.ZMQError as exc:  # never a raw zmq error out of slabcast
        raise BrokerGoneError(f"the broker connection closed while waiting ({exc})") from exc
