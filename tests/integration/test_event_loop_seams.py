"""Subscriber's public seams for event loops (pollables, keepalive, recv_nowait) drive a loop other than asyncio."""

from __future__ import annotations

import selectors
import time

import numpy as np
import zmq

import slabcast


def _drain(sub: slabcast.Subscriber, want: int, timeout: float = 10.0) -> list[int]:
    """Receive ``want`` chunks with a selectors loop on ``sub.pollables()``, never blocking in recv."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            with sub.recv_nowait() as chunk:
                got.append(int(chunk.data[0]))
            continue
        except slabcast.WouldBlock:
            pass
        sub.keepalive(1.0)
        socks = sub.pollables()
        # ZeroMQ's descriptor is edge-triggered: look at EVENTS before sleeping on it.
        if any(s.getsockopt(zmq.EVENTS) & zmq.POLLIN for s in socks):
            continue
        with selectors.DefaultSelector() as sel:
            for s in socks:
                sel.register(s.getsockopt(zmq.FD), selectors.EVENT_READ)
            sel.select(min(0.5, max(0.0, deadline - time.monotonic())))
    return got


def test_a_selectors_loop_on_the_public_seams_gets_every_chunk(broker, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    sub = slabcast.Subscriber(stream_name, 4, clip=True, address=broker.address)
    assert all(isinstance(s, zmq.Socket) for s in sub.pollables())
    assert len(sub.pollables()) == 3  # a local subscriber: its notice socket, its connection and that one's monitor
    for k in range(20):
        pub.write(np.full(4, k, dtype=np.int32))
    assert _drain(sub, 20) == list(range(20))
    pub.close()
    sub.close()


def test_counters_span_a_broker_restart_and_the_caller_may_resubscribe_itself(broker, stream_name):
    # auto_resubscribe=False: recv raises BrokerGoneError and the caller calls resubscribe() (as aio does, in a
    # thread). The counters add both brokers' chunks: released ones are no longer counted as held (a local
    # subscriber counted only the new broker's releases against every chunk received).
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    sub = slabcast.Subscriber(stream_name, 4, clip=True, address=broker.address, reconnect=10)
    sub.auto_resubscribe = False
    assert sub.reconnect == 10
    for k in range(3):
        pub.write(np.full(4, k, dtype=np.int32))
        sub.recv(timeout=5).release()
    broker.kill()
    pub.close()
    with slabcast.BrokerProcess(broker.address) as second:
        pub2 = slabcast.Publisher(stream_name, dtype="int32", address=second.address)
        try:
            sub.recv(timeout=5)
        except slabcast.BrokerGoneError as exc:
            sub.resubscribe(exc)
        else:
            raise AssertionError("recv resubscribed although auto_resubscribe is False")
        pub2.write(np.full(4, 9, dtype=np.int32))
        with sub.recv(timeout=5) as chunk:
            assert chunk.discontinuity and int(chunk.data[0]) == 9
        stats = sub.statistics()
        assert (stats.received, stats.released, stats.held, stats.dropped) == (4, 4, 0, 0)
        pub2.close()
        sub.close()
