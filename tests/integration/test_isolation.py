"""Data path v2: one subscriber's settings, callables and stalls can only hurt that subscriber."""

from __future__ import annotations

import gc
import math
import threading
import time
import weakref

import numpy as np
import pytest

import slabcast


def test_a_sampler_returning_inf_hurts_only_its_own_subscriber(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "float32", 1, rate=1000.0, address=broker.address)
    odd = slabcast.Subscriber(stream_name, size=100, sampler=lambda: math.inf, address=broker.address)
    other = slabcast.Subscriber(stream_name, size=100, address=broker.address)
    for i in range(5):
        pub.write(np.full(100, i, np.float32), t0=i * 0.1)
    assert [int(other.recv(timeout=5).data[0]) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"sampler must return seconds in 0\.\.1e\+09, got inf"):
        odd.recv(timeout=5)
    chunk = odd.recv(timeout=5)  # the chunk whose sampler call failed is still delivered
    assert chunk.index == 0
    chunk.release()
    with pytest.raises(ValueError, match=r"sampler must be a number of seconds in 0\.\.1e"):
        slabcast.Subscriber(stream_name, size=100, sampler=1e306, address=broker.address)
    for s in (odd, other):
        s.close()
    pub.close()


def test_a_sampler_that_raises_once_loses_no_chunk_and_no_lease(broker, stream_name):
    calls = []

    def sampler():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("model not loaded yet")
        return 0.0

    pub = slabcast.Publisher(stream_name, "int32", 1, rate=100.0, address=broker.address, slab_bytes=8192, nslabs=4)
    sub = slabcast.Subscriber(stream_name, size=10, clip=True, sampler=sampler, address=broker.address)
    for i in range(50):
        pub.write(np.full(10, i, np.int32), t0=i * 0.1)
    pub.close()
    got, errors = [], 0
    while True:
        try:
            with sub.recv(timeout=5) as chunk:
                got.append(int(chunk.data[0]))
        except RuntimeError:
            errors += 1
        except slabcast.EndOfStream:
            break
    stats = sub.statistics()
    sub.close()
    assert errors == 1
    assert got == list(range(50)), "a sampler of 0 s drops nothing, before or after the error"
    assert stats.held == 0 and stats.dropped == 0


def test_frames_longer_than_the_statistics_window_lose_nothing(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "float32", 1, rate=100.0, address=broker.address, statistics=1.0)
    sub = slabcast.Subscriber(stream_name, size=1000, clip=True, address=broker.address)
    for i in range(10):
        pub.write(np.full(1100, i, np.float32), t0=11.0 * i)
    pub.flush()
    got = 0
    while got < 11000:
        with sub.recv(timeout=5) as chunk:
            got += len(chunk)
    stats = slabcast.stream_statistics(stream_name, address=broker.address)
    assert got == 11000 and stats.samples == 11000
    assert stats.window_samples == 1100  # the newest frame only: the window is 100 samples
    sub.close()
    pub.close()


def test_statistics_stay_bounded_when_t0_never_advances(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "float32", 1, rate=48000.0, address=broker.address, statistics=1.0)
    for _ in range(5000):
        pub.write(np.ones(48, np.float32), t0=0.0)
    pub.flush()
    stats = slabcast.stream_statistics(stream_name, address=broker.address)
    assert stats.samples == 240_000
    assert 48_000 <= stats.window_samples < 48_000 + 48  # one second of samples, whatever t0 says
    pub.close()


def wait_held(address: str, name: str, made: threading.Event) -> None:
    """Wait until the broker holds a subscription to ``name`` made before the stream (its SUBSCRIBE, not only its
    connection: a publisher writing first would start it at the head); ``made``: the subscriber is already made
    (it stopped waiting: no use looking further)."""
    for _ in range(500):
        if slabcast.broker_status(address)["waiting"].get(name) or made.is_set():
            return
        made.wait(0.01)
    pytest.fail(f"the broker never held the subscription to {name!r} made before its stream")


def test_a_subscriber_created_before_its_stream_gets_index_0(broker, stream_name):
    box: dict = {}
    made = threading.Event()

    def subscribe():
        box["sub"] = slabcast.Subscriber(stream_name, size=5, clip=True, wait=10, address=broker.address)
        made.set()

    t = threading.Thread(target=subscribe)
    t.start()
    wait_held(broker.address, stream_name, made)
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address)
    pub.write(np.arange(20, dtype=np.int32))
    t.join(10)
    sub = box["sub"]
    assert sub.start_index == 0
    with sub.recv(timeout=5) as chunk:
        assert (chunk.index, list(chunk.data)) == (0, [0, 1, 2, 3, 4])
    with pytest.raises(slabcast.StreamNotFoundError, match=r"did not appear within wait=0\.2 s"):
        slabcast.Subscriber(stream_name + "x", size=5, wait=0.2, address=broker.address)
    sub.close()
    pub.close()


def test_a_worker_that_says_ready_from_its_subscribers_ready_callback_gets_the_stream_from_index_0(
    broker, stream_name
):
    # A newcomer: a spawned worker told its parent "ready" just before (or, aio, just after) making its subscriber
    # of a stream not there yet, and the parent opened the publisher at that word, wrote 20,000 samples and closed:
    # 3 runs of 6 ended with nothing received, and aio ones started mid-stream (index 7350) or ended empty.  The
    # SUBSCRIBE was still on its way.  `ready=` is called once the broker holds it: every run gets every sample.
    import multiprocessing as mp

    from tests.integration import workers as W

    ctx = mp.get_context("spawn")
    ready_q, result_q = ctx.Queue(), ctx.Queue()
    names = [f"{stream_name}{k}" for k in range(4)]
    procs = [ctx.Process(target=W.subscribe_ready, args=(broker.address, name, {"size": 100, "clip": True,
                                                                               "wait": 30}, k, ready_q, result_q))
             for k, name in enumerate(names)]  # fmt: skip
    procs.append(ctx.Process(target=W.aio_subscribe_then_ready, args=(broker.address, stream_name + "a", 100,
                                                                      ready_q, result_q)))  # fmt: skip
    for proc in procs:
        proc.start()
    try:
        data = np.arange(2000, dtype=np.int32)
        for _ in procs:
            said = ready_q.get(timeout=60)
            name = names[said[1]] if isinstance(said, tuple) else stream_name + "a"
            # The broker holds it already (before the constructor returned, for aio):
            assert slabcast.broker_status(broker.address)["waiting"].get(name) == 1
            pub = slabcast.Publisher(name, "int32", address=broker.address)
            for start in range(0, len(data), 50):
                pub.write(data[start : start + 50], t0=1.0 + start)
            pub.close()
        results = [result_q.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
    want = [(i, 100) for i in range(0, 2000, 100)]
    for got in results:
        if isinstance(got, tuple):
            assert got[2] == "end", got
            assert [(index, n) for _seq, index, n, _t0, _crc in got[1]] == want
        else:
            assert got == want
    assert all(proc.exitcode == 0 for proc in procs)


def test_ready_and_the_aio_constructor_wait_for_a_subscribe_slow_on_its_way(broker, stream_name, monkeypatch):
    # A reviewer: the test above checks the broker's word after a queue's round trip, by which time a SUBSCRIBE
    # has nearly always arrived: `ready` called before it was sent, or an aio constructor that did not wait, passed
    # there.  Here each waiting SUBSCRIBE takes 0.3 s on its way.
    import asyncio

    from slabcast.client.connection import Connection
    from slabcast.wire import messages as M

    send = Connection.send

    def slow_send(self, msg, fields=None):
        if isinstance(msg, M.Subscribe) and msg.wait:
            time.sleep(0.3)
        return send(self, msg, fields)

    monkeypatch.setattr(Connection, "send", slow_send)
    seen: list = []
    pubs: list = []

    def publish():
        pubs.append(slabcast.Publisher(stream_name, "int32", address=broker.address))
        pubs[0].write(np.arange(10, dtype=np.int32))

    def ready():  # (then the stream comes, from another thread: the constructor waits for it)
        seen.append(slabcast.broker_status(broker.address)["waiting"].get(stream_name))
        threading.Thread(target=publish).start()

    sub = slabcast.Subscriber(stream_name, 10, address=broker.address, wait=10, ready=ready)
    assert seen == [1]
    with sub.recv(timeout=10) as chunk:
        assert chunk.index == 0
    sub.close()
    pubs[0].close()

    async def main():
        made = slabcast.aio.Subscriber(stream_name + "a", 10, address=broker.address, wait=10,
                                       ready=lambda: seen.append("aio ready"))  # fmt: skip
        seen.append(slabcast.broker_status(broker.address)["waiting"].get(stream_name + "a"))
        made.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert seen[1:] == ["aio ready", 1]


def test_ready_is_called_once_for_a_stream_already_there_and_what_it_raises_comes_out_of_the_constructor(
    broker, stream_name
):
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address)
    calls = []
    sub = slabcast.Subscriber(stream_name, 10, address=broker.address, ready=lambda: calls.append(1))
    assert calls == [1]
    pub.write(np.arange(10, dtype=np.int32))
    with sub.recv(timeout=10) as chunk:  # (the SYNCED after SUBSCRIBED was skipped)
        assert chunk.data.tolist() == list(range(10))
    sub.close()

    def refuse():
        raise RuntimeError("not ready")

    for wait in (0, 5):
        with pytest.raises(RuntimeError, match="not ready"):
            slabcast.Subscriber(stream_name, 10, address=broker.address, wait=wait, ready=refuse)
        with pytest.raises(RuntimeError, match="not ready"):
            slabcast.Subscriber(stream_name + "w", 10, address=broker.address, wait=5, ready=refuse)
    with pytest.raises(TypeError, match="ready must be a callable"):
        slabcast.Subscriber(stream_name, 10, address=broker.address, ready="yes")
    deadline = time.monotonic() + 5  # (their connections closed: the broker forgets them, a connection of its own)
    while True:
        status = slabcast.broker_status(broker.address)
        subs = [len(s["subscribers"]) for s in status["streams"] if s["name"] == stream_name]
        if subs == [0] and not status["waiting"].get(stream_name + "w"):
            break
        assert time.monotonic() < deadline, f"subscriptions left at the broker: {subs}, {status['waiting']}"
        time.sleep(0.01)
    pub.close()


@pytest.mark.slow
def test_sixteen_subscribers_one_stalled_drop_holding_chunks_the_rest_exact(broker, stream_name):
    frames, n = 400, 256
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address, slab_bytes=16384, nslabs=8, timeout=5)
    stalled = slabcast.Subscriber(stream_name, size=n, clip=True, policy="drop", max_inflight=2,
                                  address=broker.address)  # fmt: skip
    subs = [slabcast.Subscriber(stream_name, size=n * (1 + i % 3), clip=True, address=broker.address)
            for i in range(15)]  # fmt: skip
    pub.write(np.full(n, -1, np.int32))
    held = [stalled.recv(timeout=5)]  # it holds this chunk and never reads again
    expect = [-1, *range(frames)]
    got: list[list[int]] = [[] for _ in subs]
    for i in range(frames):
        pub.write(np.full(n, i, np.int32))  # would time out if anyone's stall blocked the publisher
        for k, s in enumerate(subs):
            while True:
                try:
                    chunk = s.recv_nowait()
                except slabcast.WouldBlock:
                    break
                with chunk:
                    got[k].extend(chunk.data[::n].tolist())
    pub.close()
    for k, s in enumerate(subs):
        for chunk in s:
            with chunk:
                got[k].extend(chunk.data[::n].tolist())
        size = 1 + k % 3
        assert got[k] == expect[: len(expect) // size * size], k
        s.close()
    assert (held[0].data == -1).all(), "a held chunk was overwritten"
    held.pop().release()
    stalled.close()


def test_a_view_kept_past_close_gives_its_slab_back_when_it_dies(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address, slab_bytes=8192, nslabs=3, timeout=2)
    views = []
    for _ in range(3):  # each round pins one slab through a view that outlives its subscriber
        sub = slabcast.Subscriber(stream_name, size=256, clip=True, address=broker.address)
        pub.write(np.full(256, 7, np.int32))
        with sub.recv(timeout=5) as chunk:
            views.append(chunk.data[:4])
        sub.close()
    assert all((v == 7).all() for v in views)
    views.clear()
    gc.collect()
    for i in range(40):  # the pool is whole again: no WriteTimeout
        pub.write(np.full(256, i, np.int32))
    pub.close()


@pytest.mark.parametrize("policy", ["block", "drop"])
def test_partial_tail_hands_out_the_unfinished_last_chunk(broker, stream_name, policy):
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address, slab_bytes=8192, nslabs=4)
    sub = slabcast.Subscriber(stream_name, size=400, clip=True, partial_tail=True, policy=policy,
                              address=broker.address)  # fmt: skip
    plain = slabcast.Subscriber(stream_name, size=400, clip=True, address=broker.address)
    for k in range(0, 1000, 300):
        pub.write(np.arange(k, min(k + 300, 1000), dtype=np.int32))
    pub.close()
    got = [(c.index, len(c), c.partial, int(c.data[0]), int(c.data[-1])) for c in sub]
    assert got == [(0, 400, False, 0, 399), (400, 400, False, 400, 799), (800, 200, True, 800, 999)]
    assert [len(c) for c in plain] == [400, 400]  # without it the tail is dropped, as before
    sub.close()
    plain.close()


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("policy", ["block", "drop"])
def test_partial_tail_hands_out_what_came_before_a_discontinuity_too(broker, stream_name, policy, clip):
    # A newcomer's `up` recorder (partial_tail=true, an LSL outlet that restarted): the samples accumulated before
    # the jump were dropped (protocol rule 7), 26 samples the file never had.  A subscriber that takes partial
    # chunks gets them as one, before the chunk after the jump (which says discontinuity).
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address, slab_bytes=8192, nslabs=4)
    sub = slabcast.Subscriber(stream_name, size=400, clip=clip, partial_tail=True, policy=policy,
                              address=broker.address)  # fmt: skip
    plain = slabcast.Subscriber(stream_name, size=400, clip=clip, address=broker.address)
    for k, n in ((0, 300), (300, 300), (600, 250)):
        pub.write(np.arange(k, k + n, dtype=np.int32))
    pub.write(np.arange(850, 1350, dtype=np.int32), discontinuity=True)  # (a source restarted)
    pub.close()
    got = [(c.index, len(c), c.partial, c.discontinuity, int(c.data[0]), int(c.data[-1])) for c in sub]
    if clip:
        assert got == [(0, 400, False, False, 0, 399), (400, 400, False, False, 400, 799),
                       (800, 50, True, False, 800, 849), (850, 400, False, True, 850, 1249),
                       (1250, 100, True, False, 1250, 1349)]  # fmt: skip
    else:  # (whole frames)
        assert got == [(0, 600, False, False, 0, 599), (600, 250, True, False, 600, 849),
                       (850, 500, False, True, 850, 1349)]  # fmt: skip
    # Without partial chunks, what came before the jump is dropped, as rule 7 says.
    assert [(c.index, len(c)) for c in plain] == ([(0, 400), (400, 400), (850, 400)] if clip else
                                                  [(0, 600), (850, 500)])  # fmt: skip
    sub.close()
    plain.close()


# Found by a review of data path v2: each was reproduced before it was fixed.


def test_a_drop_subscriber_keeps_receiving_after_a_broker_restart(tmp_path, stream_name):
    address = tmp_path / "b.sock"
    first = slabcast.BrokerProcess(address).start()
    pub = slabcast.Publisher(stream_name, "int32", address=first.address)
    sub = slabcast.Subscriber(stream_name, size=4, clip=True, policy="drop", max_inflight=2, reconnect=20,
                              address=first.address)  # fmt: skip
    for i in range(5):
        pub.write(np.full(4, i, np.int32))
        with sub.recv(timeout=5) as chunk:
            assert chunk.data[0] == i
    first.kill()
    pub.close()
    with slabcast.BrokerProcess(address) as second:
        pub = slabcast.Publisher(stream_name, "int32", address=second.address)
        with pytest.raises(slabcast.WouldBlock):
            sub.recv_nowait()  # it notices the restart and subscribes again
        got = []
        for i in range(5):
            pub.write(np.full(4, 10 + i, np.int32))
            with sub.recv(timeout=5) as chunk:
                got.append(int(chunk.data[0]))
        assert got == [10, 11, 12, 13, 14]  # not dropped as if the old broker's chunks were still held
        sub.close()
        pub.close()


def test_a_drop_subscriber_holding_max_inflight_chunks_is_told_why_none_comes(broker, stream_name):
    # Found by a newcomer: holding its max_inflight chunks, a drop subscriber's recv timed out with "no chunk
    # within 2 s" while data flowed and `slabcast top` counted its drops.  The timeout now says why.
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address)
    sub = slabcast.Subscriber(stream_name, size=4, policy="drop", max_inflight=2, address=broker.address)
    try:
        held = []
        for k in range(2):
            pub.write(np.arange(4 * k, 4 * k + 4, dtype=np.int32))
            held.append(sub.recv(timeout=5))
        pub.write(np.arange(8, 12, dtype=np.int32))
        pub.write(np.arange(12, 16, dtype=np.int32))
        with pytest.raises(TimeoutError, match=r"holds 2 chunks \(max_inflight=2\).*dropped \(2 so far\).*release"):
            sub.recv(timeout=0.3)
        for chunk in held:
            chunk.release()
        pub.write(np.arange(16, 20, dtype=np.int32))
        with sub.recv(timeout=5) as chunk:
            assert list(chunk.data) == [16, 17, 18, 19]
        with pytest.raises(TimeoutError) as info:
            sub.recv(timeout=0.1)
        assert "max_inflight" not in str(info.value)  # (holding nothing: a plain timeout)
    finally:
        sub.close()
        pub.close()


def test_paused_drop_subscribers_hold_no_slab(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address, slab_bytes=8192, nslabs=4, timeout=2)
    viewers = [slabcast.Subscriber(stream_name, size=256, policy="drop", address=broker.address) for _ in range(3)]
    pub.write(np.zeros(256, np.int32))
    for v in viewers:
        v.recv(timeout=5).release()  # each read once, gave it back, and now pauses
        with pytest.raises(slabcast.WouldBlock):
            v.recv_nowait()
    for i in range(40):  # 10 pools' worth: would time out if the paused viewers kept slabs locked
        pub.write(np.full(256, i, np.int32))
    for v in viewers:
        v.close()
    pub.close()


def test_a_publisher_dropped_without_close_is_collected_and_its_stream_ends(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address)
    pub.write(np.zeros(4, np.int32))
    ref = weakref.ref(pub)
    del pub
    gc.collect()
    # Its background thread holds it only during a turn (the write's GRANT may have woken it): collected after.
    deadline = time.monotonic() + 5
    while ref() is not None:
        assert time.monotonic() < deadline, "a publisher dropped without close() stayed alive"
        time.sleep(0.005)
        gc.collect()
    again = slabcast.Publisher(stream_name, "int32", address=broker.address)  # the name is free again
    again.close()


def test_a_short_stream_that_ends_before_a_waiting_subscriber_attaches_is_all_received(broker, stream_name):
    for k in range(5):
        name = f"{stream_name}{k}"
        box: dict = {}
        made = threading.Event()

        def subscribe(name=name, box=box, made=made):
            box["sub"] = slabcast.Subscriber(name, size=1, wait=10, address=broker.address)
            made.set()

        t = threading.Thread(target=subscribe)
        t.start()
        wait_held(broker.address, name, made)
        pub = slabcast.Publisher(name, "uint8", address=broker.address)
        for i in range(20):
            pub.write(bytes([i]))
        pub.close()
        t.join(10)
        sub = box["sub"]
        assert [bytes(c.data)[0] for c in sub] == list(range(20))
        sub.close()


def test_an_old_publisher_closing_after_a_broker_restart_leaves_the_new_stream_alone(tmp_path, stream_name):
    address = tmp_path / "b.sock"
    first = slabcast.BrokerProcess(address).start()
    old = slabcast.Publisher(stream_name, "uint8", address=first.address)
    first.kill()
    with slabcast.BrokerProcess(address) as second:
        new = slabcast.Publisher(stream_name, "uint8", address=second.address)  # stream id 0 again
        old.close()  # removes its own notice socket file, not the new one's
        sub = slabcast.Subscriber(stream_name, size=1, address=second.address, timeout=5)
        new.write(b"n")
        assert bytes(sub.recv(timeout=5).data) == b"n"
        sub.close()
        new.close()


def test_carried_is_confirmed_only_after_the_published_of_a_slab_change_made_with_the_old_carry(broker, stream_name):
    # A subscriber the broker starts on CARRIED must never meet a slab change that carried less than it needs.
    # The rule is PublisherState's (tests/unit/test_publisher_state.py); here, that the publisher sends in its order.
    from slabcast.wire import messages as M

    pub = slabcast.Publisher(stream_name, "int32", address=broker.address)
    sent = []
    real_send = pub._conn.send
    # Record what goes out; only CARRIED reaches the broker.
    pub._conn.send = lambda msg: (sent.append(msg), isinstance(msg, M.Carried) and real_send(msg))
    frame = M.Published(0)
    with pub._lock:
        pub._state.switch_unsent = True  # a slab change whose PUBLISHED has not gone out yet
        pub._on_carry(M.Carry(4096))
        assert not any(isinstance(m, M.Carried) for m in sent)
        pub._published()
        assert sent == [frame, M.Carried(4096)]
        pub._on_carry(M.Carry(8192))  # no change in flight: at once
        assert sent == [frame, M.Carried(4096), M.Carried(8192)]
    pub._conn.send = real_send
    pub.close()


def test_a_subscriber_that_waits_for_every_chunk_sends_no_message_per_chunk(broker, stream_name):
    # Data path v2's promise: ACKs per slab (or to refresh counters at most every 0.1 s), never per chunk.
    from slabcast.wire import messages as M

    pub = slabcast.Publisher(stream_name, "int32", address=broker.address)
    sub = slabcast.Subscriber(stream_name, size=4, address=broker.address)
    sent = []
    real_send = sub._conn.send
    sub._conn.send = lambda msg: (sent.append(type(msg)), real_send(msg))
    t = time.monotonic()
    for _ in range(200):
        pub.write(np.zeros(4, np.int32))
        with sub.recv(timeout=5):
            pass
    elapsed = time.monotonic() - t
    assert sent.count(M.Ack) <= 2 + elapsed / 0.1  # one slab; counters at most every 0.1 s
    sub._conn.send = real_send
    sub.close()
    pub.close()
