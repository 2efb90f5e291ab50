"""Crashes and hostile input: kill -9 of each party, malformed messages, a second broker, signals."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

import slabcast
from slabcast.wire import protocol as P
from tests.conftest import slabcast_segments
from tests.integration import workers as W

FRAME = 256  # int32 samples = 1 KiB


def consume_all(address, name, out, ready):
    """Thread body: a healthy lossless subscriber that records the first value of every chunk."""
    sub = slabcast.Subscriber(name, size=FRAME, clip=True, address=address)
    ready.set()
    try:
        for chunk in sub:
            with chunk:
                out.append(int(chunk.data[0]))
    except slabcast.SlabcastError as exc:
        out.append(type(exc).__name__)
    finally:
        sub.close()


def test_kill9_subscriber_holding_chunks_unblocks_the_publisher(broker, workers, queue, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", slab_bytes=8192, nslabs=4, timeout=10, address=broker.address)
    healthy: list = []
    ready = threading.Event()
    t = threading.Thread(target=consume_all, args=(broker.address, stream_name, healthy, ready))
    t.start()
    assert ready.wait(10)
    victim = workers.spawn(W.hold_and_wait, broker.address, stream_name, FRAME, queue)
    assert queue.get(timeout=30)[0] == "sub-ready"
    for i in range(2):
        pub.write(np.full(FRAME, i, dtype=np.int32))
    assert queue.get(timeout=30) == ("holding", [0, 1])

    done = threading.Event()
    written = []

    def writer():
        for i in range(2, 60):  # far more than the 4-slab pool: blocks on the victim's backlog
            pub.write(np.full(FRAME, i, dtype=np.int32))
            written.append(i)
        done.set()

    w = threading.Thread(target=writer)
    w.start()
    assert not done.wait(0.5), "the publisher should be held back by the block-policy victim"
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    assert done.wait(5), "publisher still blocked after the subscriber died"
    unblocked = time.monotonic() - killed_at
    w.join()
    assert unblocked < 2.0, f"leases reclaimed after {unblocked:.2f} s"
    status = slabcast.broker_status(broker.address)["streams"][0]
    assert [s["pid"] for s in status["subscribers"]] == [os.getpid()]
    pub.close()
    t.join(10)
    assert healthy == list(range(60)), "the healthy subscriber lost or reordered chunks"


def test_kill9_publisher_mid_stream_ends_with_publisher_gone(broker, workers, queue, stream_name):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    spec = [FRAME] * 10
    sub_done = ctx.Queue()
    # A publisher that writes 10 frames and then never closes; we kill it.
    pub_proc = workers.spawn(W.publish_and_hang, broker.address, stream_name, spec, queue, go, results)
    assert queue.get(timeout=30)[0] == "pub-ready"
    workers.spawn(W.subscribe, broker.address, stream_name, {"size": 300, "clip": True}, "s", queue, sub_done)
    assert queue.get(timeout=30)[0] == "sub-ready"
    go.set()
    assert results.get(timeout=30) == ("pub-wrote", 10)
    t = time.monotonic()
    os.kill(pub_proc.pid, signal.SIGKILL)
    _, got, end, _ = sub_done.get(timeout=10)
    elapsed = time.monotonic() - t
    assert end == "PublisherGoneError"
    assert elapsed < 2.0
    assert [g[1] for g in got] == list(range(0, 10 * FRAME - 299, 300))  # every complete chunk
    for q in (results, sub_done):
        q.close()
        q.join_thread()


def test_kill9_broker_raises_broker_gone_and_a_new_broker_takes_over(broker, stream_name, tmp_path):
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    sub = slabcast.Subscriber(stream_name, size=FRAME, address=broker.address)
    pub.write(np.zeros(FRAME, dtype=np.int32))
    sub.recv(timeout=5).release()
    segments = {n for n in slabcast_segments() if n.startswith(f"slabcast.{broker.pid}.")}
    assert len(segments) == 1
    t = time.monotonic()
    broker.kill(group=True)  # broker and its resource tracker: the segments leak
    with pytest.raises(slabcast.BrokerGoneError):
        sub.recv(timeout=5)
    assert time.monotonic() - t < 2.0
    with pytest.raises(slabcast.BrokerGoneError):
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            pub.write(np.zeros(FRAME, dtype=np.int32))
    assert segments <= slabcast_segments(), "the whole group was killed: nobody unlinked"
    with slabcast.BrokerProcess(broker.address) as second:
        assert not segments & slabcast_segments(), "the new broker did not reap the dead broker's segments"
        with slabcast.Publisher(stream_name, address=second.address) as p2:
            p2.write(np.zeros(3, dtype=np.float32))
    sub.close()
    pub.close()


def test_a_subscriber_told_of_its_streams_end_before_the_broker_stopped_reads_it_all_and_ends_clean(tmp_path,
                                                                                                   stream_name):  # fmt: skip
    # A newcomer: `slabcast record` paused behind a finished stream, whose `up` then stopped the broker, wrote the
    # whole stream to its file and exited 1 "the broker went away", without its summary.  The stream's END came
    # first: the ring held the whole stream, and the end is a clean one.
    with slabcast.BrokerProcess(tmp_path / "b.sock") as broker:
        pub = slabcast.Publisher(stream_name, "int32", address=broker.address)
        sub = slabcast.Subscriber(stream_name, 100, clip=True, address=broker.address)
        pub.write(np.arange(1000, dtype=np.int32))
        pub.close()  # (answered once the broker sent every subscriber the END)
    assert broker.process.returncode == 0
    assert [c.index for c in sub] == list(range(0, 1000, 100))  # and no BrokerGoneError
    sub.close()


def test_a_paced_writer_is_told_of_the_broker_death_by_its_background_thread_before_it_writes(broker, stream_name):
    # Publisher.write no longer looks at the broker connection (its background thread does, woken by it): a
    # writer with slabs granted ahead, writing now and then, gets BrokerGoneError on its next write, with
    # nothing of that frame in the ring.
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    pub.write(np.zeros(FRAME, dtype=np.int32))
    broker.kill()
    deadline = time.monotonic() + 5
    while pub._failure is None:  # (the background thread's look, when the connection's monitor wakes it)
        assert time.monotonic() < deadline, "the background thread never saw the broker die"
        time.sleep(0.005)
    position = pub._ring.position
    with pytest.raises(slabcast.BrokerGoneError):
        pub.write(np.zeros(FRAME, dtype=np.int32))
    assert pub._ring.position == position == 1  # nothing of the refused frame was published
    pub.close()


def test_a_flush_that_sees_the_broker_die_makes_the_next_write_raise(broker, stream_name):
    # flush() waits on the broker connection from the writer's thread: its poll takes the connection monitor's
    # signal of the death, on which the background thread sleeps.  The next write raises all the same.
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    try:
        pub.write(np.zeros(FRAME, dtype=np.int32))
        pub.flush()
        os.kill(broker.pid, signal.SIGSTOP)  # (the SYNC below stays unanswered)
        killer = threading.Timer(0.2, os.kill, (broker.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(slabcast.BrokerGoneError):
            pub.flush(timeout=10)
        killer.join()
        broker.kill()  # (reaped: killed on purpose, for the fixture)
        position = pub._ring.position
        with pytest.raises(slabcast.BrokerGoneError):
            pub.write(np.zeros(FRAME, dtype=np.int32))  # (slabs granted ahead: it would have gone in)
        assert pub._ring.position == position
    finally:
        pub.close()


@pytest.mark.parametrize("wake", ["doorbell", "futex"])
def test_an_idle_subscriber_looks_at_its_broker_less_often_and_still_sees_it_die(broker, stream_name, monkeypatch,
                                                                                 wake):  # fmt: skip
    # A subscriber waiting in recv looks at its broker connection when each bounded wait ends: every 0.1 s while
    # frames come, then each empty wait doubles the next up to _LOOK_IDLE (0.8 s); a frame brings it back to
    # 0.1 s.  A broker killed with kill -9 (nobody rings) is seen when the wait ends.
    from slabcast.client import _local

    waits: list[float] = []
    idle = _local.LocalReceiver._idle

    def recorded(self: _local.LocalReceiver, wait: float) -> int:
        waits.append(wait)
        return idle(self, wait)

    monkeypatch.setattr(_local.LocalReceiver, "_idle", recorded)
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    sub = slabcast.Subscriber(stream_name, size=4, address=broker.address, wake=wake)
    try:
        with pytest.raises(TimeoutError):
            sub.recv(timeout=2.0)  # 0.1, 0.2, 0.4, 0.8, then what is left
        assert [round(w, 3) for w in waits[:4]] == [0.1, 0.2, 0.4, 0.8], waits
        pub.write(np.arange(4, dtype=np.int32))
        with sub.recv(timeout=5) as chunk:
            assert list(chunk.data) == [0, 1, 2, 3]
        # The same with no timeout (recv(), `for chunk in sub`), found by review: its waits stayed at 0.1 s.
        waits.clear()
        got: list[slabcast.Chunk] = []
        waiter = threading.Thread(target=lambda: got.append(sub.recv()), daemon=True)
        waiter.start()
        deadline = time.monotonic() + 10
        while 0.8 not in [round(w, 3) for w in waits]:  # (0.1 s while the count of the chunk it read is not
            assert time.monotonic() < deadline, waits  # sent: up to 0.4 s; then 0.1, 0.2, 0.4, 0.8)
            time.sleep(0.01)
        pub.write(np.arange(4, 8, dtype=np.int32))
        waiter.join(5)
        rounded = [round(w, 3) for w in waits]
        k = rounded.index(0.2)
        assert set(rounded[:k]) == {0.1} and rounded[k : k + 3] == [0.2, 0.4, 0.8] and k <= 6, rounded
        with got[0] as chunk:
            assert list(chunk.data) == [4, 5, 6, 7]
        waits.clear()
        with pytest.raises(TimeoutError):
            sub.recv(timeout=0.35)
        assert waits[0] == pytest.approx(0.1, abs=0.01), waits  # (a frame came: short waits again)
        with pytest.raises(TimeoutError):
            sub.recv(timeout=2.0)  # (long waits again)
        broker.kill()
        killed = time.monotonic()
        with pytest.raises(slabcast.BrokerGoneError):
            sub.recv(timeout=10)
        assert time.monotonic() - killed < 2.0  # (the wait under way ends within 0.8 s)
    finally:
        sub.close()
        pub.close()


def test_a_caller_polling_faster_than_the_gone_check_still_sees_the_broker_die(broker, stream_name):
    """An event loop that calls recv_nowait every 2 ms (more often than the subscriber's 50 ms look at its broker
    connection): each look used to put the next one off, so the broker's death was never seen and the loop spun."""
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    sub = slabcast.Subscriber(stream_name, size=FRAME, address=broker.address)
    pub.write(np.zeros(FRAME, dtype=np.int32))
    sub.recv(timeout=5).release()

    def poll_once() -> None:
        with contextlib.suppress(slabcast.WouldBlock):
            sub.recv_nowait().release()
        time.sleep(0.002)  # the event loop's own pace, woken by something else

    for _ in range(10):
        poll_once()
    broker.kill()
    calls = 0
    with pytest.raises(slabcast.BrokerGoneError):
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            calls += 1
            poll_once()
    assert calls < 250, f"seen only after {calls} calls"
    sub.close()
    pub.close()


def test_second_broker_at_the_same_address_is_refused(broker):
    with pytest.raises(slabcast.BrokerRunningError, match=f"already serves {broker.address}"):
        slabcast.BrokerProcess(broker.address).start()
    assert slabcast.broker_status(broker.address)["pid"] == broker.pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_broker_cleanly(tmp_path, sig, stream_name):
    proc = slabcast.BrokerProcess(tmp_path / "b.sock").start()
    try:
        pub = slabcast.Publisher(stream_name, address=proc.address)
        sub = slabcast.Subscriber(stream_name, size=10, address=proc.address)
        pub.write(np.zeros(10, dtype=np.float32))
        chunk = sub.recv(timeout=5)
        proc.process.send_signal(sig)
        assert proc.wait_exit(10) == 0
        assert float(chunk.data.sum()) == 0.0  # still mapped after the unlink
        chunk.release()
        with pytest.raises(slabcast.BrokerGoneError):
            sub.recv(timeout=5)
        sub.close()
        pub.close()
        assert not any(n.startswith(f"slabcast.{proc.pid}.") for n in slabcast_segments())
        assert not (tmp_path / "b.sock").exists()
    finally:
        proc.stop()


@pytest.mark.parametrize("gap", [0.0, 0.02])
def test_a_signal_repeated_while_the_broker_stops_its_sources_still_stops_it_cleanly(tmp_path, stream_name, gap):
    # A newcomer's `timeout -s INT 30 slabcast broker --source ... &`, then a kill -INT of timeout: timeout sends
    # SIGINT to the broker and then to its whole process group, so the broker gets two; the second one, taken
    # while it shut down (or while its sources stopped), ended it with exit 130 and left its socket's files.
    proc = slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", f"synthetic:name={stream_name}")).start()
    try:
        with slabcast.Subscriber(stream_name, size=480, address=proc.address, wait=10) as sub:
            sub.recv(timeout=10).release()  # its source writes
        proc.process.send_signal(signal.SIGINT)
        time.sleep(gap)  # (the second signal a moment later: a time, not a readiness, is what is tested)
        proc.process.send_signal(signal.SIGINT)
        assert proc.wait_exit(15) == 0, proc.stderr()
        assert not any(n.startswith(f"slabcast.{proc.pid}.") for n in slabcast_segments())
        assert sorted(p.name for p in tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())
    finally:
        proc.stop()


def test_version_mismatch_names_both_versions(broker, stream_name, monkeypatch):
    monkeypatch.setattr(P, "VERSION", 4)
    with pytest.raises(slabcast.ProtocolError, match="broker speaks version 3, client speaks version 4"):
        slabcast.Subscriber(stream_name, size=1, address=broker.address)


def raw_socket(address):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(address)
    return s


MALFORMED = [
    (b"", "expected a msgpack array"),
    (b"\xc1\xc1\xc1", "expected a msgpack array"),
    (msgpack.packb({"a": 1}), "starting with an integer kind"),
    (msgpack.packb([]), "starting with an integer kind"),
    (msgpack.packb(["HELLO"]), "starting with an integer kind"),
    (msgpack.packb([P.PUBLISHED, 1]), "expected HELLO as the first message"),
    (msgpack.packb([P.HELLO]), "HELLO must start"),
    (msgpack.packb([P.HELLO, 1, "pid", "sub", "x"]), "HELLO field 2 (pid) must be int, got 'pid'"),
    (msgpack.packb([P.HELLO, 1, 1, "boss", "x"]), "role must be"),
    # (a reliability newcomer: a version of the wrong type was answered without the field, nor what came)
    (msgpack.packb([P.HELLO, "3", 0, "sub", "x"]), "HELLO field 1 (version) must be an integer, got '3' (a str)"),
]


def test_malformed_messages_get_errors_and_hurt_no_one(broker, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    healthy: list = []
    ready = threading.Event()
    t = threading.Thread(target=consume_all, args=(broker.address, stream_name, healthy, ready))
    t.start()
    assert ready.wait(10)
    s = raw_socket(broker.address)
    for i, (raw, expect) in enumerate(MALFORMED):
        pub.write(np.full(FRAME, i, dtype=np.int32))
        s.send(raw)
        reply = msgpack.unpackb(s.recv())
        assert reply[:2] == [P.ERROR, P.ERR_MALFORMED], reply
        assert expect in reply[2]
    # After a proper HELLO: wrong arity, wrong types, unknown kinds, out-of-role requests.
    s.send(msgpack.packb([P.HELLO, 1, 0, "sub", "fuzz"]))
    assert msgpack.unpackb(s.recv())[0] == P.WELCOME
    for raw, code, expect in [
        (msgpack.packb([99]), P.ERR_MALFORMED, "unknown message kind 99"),
        (msgpack.packb([P.SUBSCRIBE, stream_name]), P.ERR_MALFORMED, "SUBSCRIBE takes 7 to 12 fields, got 1"),
        (
            msgpack.packb([P.SUBSCRIBE, stream_name, -5, None, True, "block", 8, None]),
            P.ERR_BAD_REQUEST,
            "size must be a positive integer",
        ),
        (
            msgpack.packb([P.SUBSCRIBE, "nope", 5, None, True, "block", 8, None]),
            P.ERR_UNKNOWN_STREAM,
            "no stream named 'nope'",
        ),
        (msgpack.packb([P.PUBLISHED, 1]), P.ERR_BAD_REQUEST, "PUBLISHED from a connection that publishes no stream"),
        # (a reliability newcomer: too many sampler values were said out of range, the whole array echoed back)
        (msgpack.packb([P.SUBSCRIBE, stream_name, 5, None, True, "block", 8, [1.0] * 100_000]), P.ERR_BAD_REQUEST,
         "sampler may hold at most 4096 values, got 100000"),
        (msgpack.packb([P.SUBSCRIBE, stream_name, 5, None, True, "block", 8, [1.0, 2.0, -1.0] + [0.0] * 3000]),
         P.ERR_BAD_REQUEST, "sampler values must be numbers in 0..1e+09 s, got -1.0 (value 2 of 3003)"),
        (msgpack.packb([P.RELEASE, [1, 2], []]), P.ERR_BAD_REQUEST, "RELEASE from a connection with no subscription"),
        (
            msgpack.packb([P.OPEN, "x", "<f4", 1, None, 4096, 2, 2048, None, 0.0]),
            P.ERR_BAD_REQUEST,
            "OPEN is for a publisher",
        ),
    ]:
        pub.write(np.full(FRAME, 0, dtype=np.int32))
        s.send(raw)
        reply = msgpack.unpackb(s.recv())
        assert reply[:2] == [P.ERROR, code], reply
        assert expect in reply[2], reply
        assert len(reply[2]) < 1000, len(reply[2])  # (no field echoed back whole)
    s.send_multipart([b"two", b"parts"])
    assert "expected one message part" in msgpack.unpackb(s.recv())[2]
    s.close()
    pub.close()
    t.join(10)
    assert healthy[: len(MALFORMED)] == list(range(len(MALFORMED)))
    assert len(healthy) == len(MALFORMED) + 9 and healthy[-9:] == [0] * 9


def test_bad_frames_are_refused_and_nothing_is_written(broker, stream_name):
    with slabcast.Publisher(stream_name, dtype="float32", channels=2, address=broker.address) as pub:
        sub = slabcast.Subscriber(stream_name, size=2, clip=True, address=broker.address)
        cases = [
            (np.zeros((3, 2), dtype=np.float64), TypeError, "frame dtype must be float32 .* got float64"),
            (np.zeros((3, 3), dtype=np.float32), ValueError, r"frame shape must be \(n, 2\) .* got \(3, 3\)"),
            (np.zeros(6, dtype=np.float32), ValueError, r"frame shape must be \(n, 2\)"),
            (np.zeros((0, 2), dtype=np.float32), ValueError, "at least one sample"),
            (b"\x00" * 8, TypeError, "bytes are accepted only on a byte stream"),
            ([[0.0, 0.0]], TypeError, "must be a numpy array"),
        ]
        for data, exc, match in cases:
            with pytest.raises(exc, match=match):
                pub.write(data)
        good = np.arange(4, dtype=np.float32).reshape(2, 2)
        pub.write(good, t0=5.0)
        with sub.recv(timeout=5) as chunk:
            assert chunk.index == 0 and chunk.t0 == 5.0
            np.testing.assert_array_equal(chunk.data, good)
        sub.close()


def test_bad_arguments_and_unknown_stream(broker, stream_name):
    with pytest.raises(slabcast.StreamNotFoundError, match=f"no stream named '{stream_name}'"):
        slabcast.Subscriber(stream_name, size=10, address=broker.address, wait=0)
    with pytest.raises(ValueError, match="size must be a positive integer number of samples, got 0"):
        slabcast.Subscriber(stream_name, size=0, address=broker.address)
    with pytest.raises(ValueError, match="got -3"):
        slabcast.Subscriber(stream_name, size=-3, address=broker.address)
    with pytest.raises(ValueError, match="max_inflight must be a positive integer number of chunks, got 0"):
        slabcast.Subscriber(stream_name, size=10, max_inflight=0, address=broker.address)
    with pytest.raises(TypeError, match="exactly one of size"):
        slabcast.Subscriber(stream_name, address=broker.address)
    with pytest.raises(ValueError, match="policy must be"):
        slabcast.Subscriber(stream_name, size=1, policy="maybe", address=broker.address)
    with pytest.raises(TypeError, match="numeric numpy dtype"):
        slabcast.Publisher(stream_name, dtype=object, address=broker.address)
    with pytest.raises(ValueError, match="stream name must be"):
        slabcast.Publisher("bad name!", address=broker.address)
    with (
        slabcast.Publisher(stream_name, address=broker.address),
        pytest.raises(slabcast.StreamExistsError, match="already has a publisher"),
    ):
        slabcast.Publisher(stream_name, address=broker.address)
    with pytest.raises(slabcast.BrokerGoneError, match="no broker at"):
        slabcast.Subscriber(stream_name, size=1, address=str(broker.address) + ".nothing")


def test_sizes_and_seconds_computed_with_numpy_are_taken_as_numbers(broker, stream_name):
    # A size or seconds from numpy arithmetic (np.int64, np.float32) is a number like any other (a newcomer: they
    # were refused with "must be a positive integer ..., got np.int64(10)"); a numpy bool is not.
    with slabcast.Publisher(stream_name, "float32", np.int64(2), rate=np.float64(1000.0), history=np.float32(1.0),
                            slab_bytes=np.int64(65536), nslabs=np.int32(8), address=broker.address) as pub:  # fmt: skip
        subs = [slabcast.Subscriber(stream_name, size=np.int64(300), clip=True, address=broker.address),
                slabcast.Subscriber(stream_name, seconds=np.float32(0.25), clip=True, sampler=np.float64(0.25),
                                    wait=np.float64(5), address=broker.address)]  # fmt: skip
        pub.write(np.zeros((1000, 2), np.float32), t0=1.0)
        assert [(c.index, len(c.data)) for c in (subs[0].recv(timeout=5), subs[1].recv(timeout=5))] == \
            [(0, 300), (0, 250)]  # fmt: skip
        with subs[1].recv(timeout=5) as chunk:  # (a sampler of 0.25 s: the next chunk 0.25 s later)
            assert (chunk.index, len(chunk.data)) == (500, 250)
        for sub in subs:
            sub.close()
        with pytest.raises(TypeError, match=re.escape("got np.True_")):
            slabcast.Subscriber(stream_name, size=np.bool_(True), address=broker.address)
        with pytest.raises(ValueError, match=re.escape("got np.float64(nan)")):
            slabcast.Subscriber(stream_name, seconds=np.float64("nan"), address=broker.address)


def test_reconnect_resubscribes_after_a_broker_restart(broker, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    sub = slabcast.Subscriber(stream_name, size=FRAME, clip=True, address=broker.address, reconnect=10)
    pub.write(np.full(FRAME, 1, dtype=np.int32))
    with sub.recv(timeout=5) as chunk:
        assert (chunk.seq, chunk.index, chunk.discontinuity) == (0, 0, False)
    first_epoch = sub.epoch
    broker.kill()
    pub.close()
    with slabcast.BrokerProcess(broker.address) as second:
        pub2 = slabcast.Publisher(stream_name, dtype="int32", address=second.address)
        with pytest.raises(slabcast.WouldBlock):
            sub.recv_nowait()  # notices the restart and subscribes again, same settings
        assert sub.epoch != first_epoch
        pub2.write(np.full(FRAME, 2, dtype=np.int32))
        with sub.recv(timeout=5) as chunk:
            assert (chunk.seq, chunk.index, chunk.discontinuity) == (0, 0, True)
            assert (chunk.data == 2).all()
        pub2.write(np.full(FRAME, 3, dtype=np.int32))
        with sub.recv(timeout=5) as chunk:
            assert (chunk.seq, chunk.discontinuity, int(chunk.data[0])) == (1, False, 3)
        assert sub.statistics().dropped == 0
        pub2.close()
        sub.close()


def test_limits_of_names_and_numbers_are_clear_errors_where_they_enter(broker, stream_name, monkeypatch, tmp_path):
    # Issue 14, items 5-8.
    with pytest.raises(slabcast.BrokerRunningError, match="already serves"):
        slabcast.BrokerProcess(broker.address, startup_timeout=30).start()  # at once, not after 30 s
    pub = slabcast.Publisher(stream_name, "uint8", address=broker.address)
    with pytest.raises(TypeError, match="must be contiguous"):
        pub.write(memoryview(b"abcdef")[::2])
    sub = slabcast.Subscriber(stream_name, size=2, sampler=lambda: -1.0, address=broker.address)
    pub.write(b"abcd")
    with pytest.raises(ValueError, match=r"sampler must return seconds in 0\.\.1e\+09, got -1\.0"):
        sub.recv(timeout=5)
    assert bytes(sub.recv(timeout=5).data) == b"abcd"  # the chunk is still there, the error came once
    sub.close()
    pub.close()
    monkeypatch.delenv("SLABCAST_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/tmp/" + "x" * 100)
    with pytest.raises(ValueError, match=r"XDG_RUNTIME_DIR=.* ipc socket path must be at most 90 bytes"):
        slabcast.default_address()
    with pytest.raises(ValueError, match="abstract sockets"):
        slabcast.Subscriber(stream_name, size=1, address="ipc://@slabcast")


def test_a_broker_outlives_the_thread_that_started_it_and_dies_with_its_process(tmp_path, stream_name):
    # Issue 14: PR_SET_PDEATHSIG fires when the *thread* that started a child ends; the broker watches a pipe
    # only its starting *process* holds instead.
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("b", slabcast.BrokerProcess(tmp_path / "t.sock").start()))
    t.start()
    t.join(30)
    broker = box["b"]
    try:
        assert slabcast.broker_status(broker.address)["pid"] == broker.pid  # alive after its thread ended
    finally:
        assert broker.stop() == 0
    code = f"""
import slabcast, sys
b = slabcast.BrokerProcess({str(tmp_path / "p.sock")!r}).start()
print(b.pid, flush=True)
sys.stdin.read()
"""
    starter = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(starter.stdout.readline())
    starter.kill()  # kill -9 of the process that started the broker
    starter.wait(10)
    starter.stdin.close()
    starter.stdout.close()
    deadline = time.monotonic() + 10
    while slabcast.core.shm.pid_alive(pid):
        assert time.monotonic() < deadline, "the broker outlived the process that started it"
        time.sleep(0.05)  # waiting for another process to exit: no signal reaches us
    slabcast.BrokerProcess(tmp_path / "p.sock").start().stop()  # its segments and socket are cleaned up


def test_a_client_inherited_through_fork_says_so_instead_of_hanging(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "uint8", address=broker.address)
    sub = slabcast.Subscriber(stream_name, size=1, address=broker.address)
    pid = os.fork()
    if pid == 0:  # the child: both must refuse at once, and closing them must not touch the parent's sockets
        code = 0
        for call in (lambda: sub.recv(timeout=1), lambda: pub.write(b"x")):
            try:
                call()
                code += 1
            except slabcast.ClosedError as exc:
                code += 0 if "do not survive fork()" in str(exc) else 10
        sub.close()
        pub.close()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    pub.write(b"y")  # the parent's are intact
    assert bytes(sub.recv(timeout=5).data) == b"y"
    sub.close()
    pub.close()


def test_a_publisher_that_never_answers_is_named_not_a_missing_stream(broker, workers, queue, stream_name):
    # A newcomer (a C publisher that never called sc_pub_service): a subscriber of chunks longer than the stream
    # carried waited for the publisher's CARRIED and was told the stream "did not appear".  Here the publisher's
    # process is stopped.
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    proc = workers.spawn(W.publish_and_hang, broker.address, stream_name, [10], queue, go, results)
    assert queue.get(timeout=30)[0] == "pub-ready"
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        for wait, timeout in ((1.0, 10.0), (0, 1.0)):  # (wait=0: it was BrokerGoneError, "no answer to SUBSCRIBE")
            with pytest.raises(slabcast.StreamNotFoundError, match=r"is on the broker, but its publisher did not "
                                                                   r"take this subscription within 1 s"):  # fmt: skip
                slabcast.Subscriber(stream_name, size=4_000_000, wait=wait, timeout=timeout, address=broker.address)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # (it would wait for `go`; a stopped process dies of SIGKILL too)


def test_what_a_newcomer_got_wrong_is_said_where_it_enters(broker, stream_name, tmp_path):
    # Found by a newcomer trying the README: each of these was late, cryptic or silent.
    t = time.monotonic()
    other = slabcast.Publisher(stream_name + "-other", "int16", address=broker.address)
    # (the streams there are named, as at wait=0: a lab newcomer's typo waited 10 s for a bare "did not appear")
    with pytest.raises(slabcast.StreamNotFoundError,
                       match=rf"did not appear within wait=0\.5 s; streams: {stream_name}-other; did you mean "
                             rf"'{stream_name}-other'\? \("):  # fmt: skip
        slabcast.Subscriber(stream_name, size=1, wait=0.5, timeout=10, address=broker.address)
    assert time.monotonic() - t < 3.0  # wait= bounds it, not wait + timeout (was 10.5 s)
    other.close()
    with pytest.raises(ValueError, match=r"rate must be a positive number .* got '48000'"):
        slabcast.Publisher(stream_name, "float32", rate="48000", address=broker.address)
    bad = subprocess.run([sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(tmp_path / "y.mp3"),
                          "--address", broker.address], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and "unknown recording format '.mp3'" in bad.stderr
    from slabcast.cli.up_config import resolve

    with pytest.raises(AttributeError, match="did you mean 'spl'"):
        resolve("slabcast.examples:spll")


def test_bad_timeouts_and_flags_are_said_where_they_enter_and_nothing_is_made(broker, stream_name):
    # A reliability newcomer: Publisher(timeout=-1) sent OPEN, then blamed the broker ("no answer ... within -1 s"),
    # leaving an ended stream behind; nan and inf failed converting to an integer; Subscriber(timeout=nan) named
    # `wait`; reconnect=-1 passed; recv("1") failed adding a str; write(discontinuity="no") set the flag; a
    # big-endian frame was said "must be float32, got float32".
    for bad in (-1, 0, math.nan, math.inf, "10"):
        with pytest.raises(ValueError, match=rf"timeout must be a positive finite number of seconds .*got {bad!r}"):
            slabcast.Publisher(stream_name, "float32", timeout=bad, address=broker.address)
    assert not slabcast.broker_status(broker.address)["streams"], "a refused publisher opened its stream"
    with slabcast.Publisher(stream_name, "float32", address=broker.address) as pub:
        for bad in (math.nan, math.inf, -1):
            with pytest.raises(ValueError, match=rf"^timeout must be a positive finite number .*got {bad!r}"):
                slabcast.Subscriber(stream_name, 4, timeout=bad, address=broker.address)
        for bad in (-1, math.nan, "yes"):
            with pytest.raises(ValueError, match=rf"reconnect must be True, False or a finite number .*got {bad!r}"):
                slabcast.Subscriber(stream_name, 4, reconnect=bad, address=broker.address)
        for fine in (None, np.True_, 0.0, 2):  # (as before: None no reconnection, a numpy bool a bool)
            slabcast.Subscriber(stream_name, 4, reconnect=fine, address=broker.address).close()

        async def aio_recv(bad: object) -> None:
            async with slabcast.aio.Subscriber(stream_name, 4, address=broker.address) as sub:
                await asyncio.wait_for(sub.recv(bad), 10)  # type: ignore[arg-type]  (bounded: NaN waited for ever)

        for bad in ("1", math.nan):  # (the async recv too: NaN waited for ever)
            with pytest.raises(ValueError, match=rf"recv's timeout must be a number of seconds >= 0 .*got {bad!r}"):
                asyncio.run(aio_recv(bad))
        with slabcast.Subscriber(stream_name, 4, clip=True, address=broker.address) as sub:
            for bad in ("1", -1, math.nan):
                with pytest.raises(ValueError, match=rf"recv's timeout must be a number of seconds >= 0 or None, "
                                                     rf"got {bad!r}"):  # fmt: skip
                    sub.recv(bad)
            with pytest.raises(TypeError, match=r"discontinuity must be True or False, got 'no' .*nothing was written"):
                pub.write(np.zeros(4, dtype=np.float32), discontinuity="no")
            with pytest.raises(TypeError, match=r"must be <f4 for stream .*, got >f4 \(nothing is cast\)"):
                pub.write(np.zeros(4, dtype=">f4"))
            pub.write(np.arange(4, dtype=np.float32), discontinuity=np.bool_(False))
            with sub.recv(math.inf) as chunk:  # (inf: for ever, as None)
                assert chunk.index == 0 and not chunk.discontinuity and chunk.data.tolist() == [0, 1, 2, 3]


def test_the_synthetic_source_writes_whole_frames(tmp_path, stream_name):
    spec = f"synthetic:name={stream_name},rate=48000,channels=1,frame=480"
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", spec)) as b:
        sub = slabcast.Subscriber(stream_name, size=4800, clip=True, address=b.address, wait=10)
        for _ in range(3):
            sub.recv(timeout=5).release()
        stream = slabcast.broker_status(b.address)["streams"][0]
        assert stream["samples"] == 480 * stream["frames"]  # never a frame of what came due during a write
        sub.close()


def test_bye_from_a_client_the_broker_already_forgot_is_answered(broker):
    # A local subscriber's liveness lock goes with its lease file; a broker that saw it go first had
    # forgotten the client and left its BYE unanswered, so close() waited out its 2 s (1 close in 15).
    s = raw_socket(broker.address)
    try:
        s.send(msgpack.packb([P.BYE]))
        reply = msgpack.unpackb(s.recv())
    finally:
        s.close()
    assert reply[:2] == [P.END, P.END_BYE], reply
