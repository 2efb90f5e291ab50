"""Hard to break: eviction, a storm of malformed messages, crash/restart cycles, permissions."""

from __future__ import annotations

import os
import stat
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

import slabcast
from slabcast.wire import protocol as P
from tests.conftest import slabcast_segments


def test_a_lease_held_past_lease_timeout_evicts_and_never_overwrites(tmp_path, stream_name):
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--lease-timeout", "0.5")) as broker:
        pub = slabcast.Publisher(stream_name, dtype="int32", slab_bytes=8192, nslabs=4, timeout=5,
                                 address=broker.address)  # fmt: skip
        sub = slabcast.Subscriber(stream_name, size=256, clip=True, max_inflight=2, address=broker.address)
        pub.write(np.full(256, 42, dtype=np.int32))
        held = sub.recv(timeout=5)
        t = time.monotonic()
        # The stuck subscriber would block this writer for good; eviction frees it.
        for i in range(40):
            pub.write(np.full(256, i, dtype=np.int32))
        assert time.monotonic() - t < 3.0
        assert (held.data == 42).all(), "an evicted subscriber's chunk was overwritten"
        with pytest.raises(slabcast.EvictedError, match=r"lease_timeout \(0.5 s\)"):
            while True:
                sub.recv(timeout=5).release()
        held.release()
        sub.close()
        pub.close()


@pytest.mark.parametrize("then", ["closed", "open"])
def test_an_evicted_block_subscriber_ends_with_evicted_error_and_never_a_chunk_past_its_hole(tmp_path, stream_name,
                                                                                            then):  # fmt: skip
    # A newcomer: an evicted block subscriber whose stream then closed took the chunks left after the hole and
    # ended clean (EndOfStream, with 2340 chunks counted dropped); with the stream open it took 654 chunks past
    # the hole before EvictedError.  Every chunk it gets follows the one before; then EvictedError.
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--lease-timeout", "0.5")) as broker:
        pub = slabcast.Publisher(stream_name, dtype="int32", slab_bytes=8192, nslabs=4, timeout=5,
                                 address=broker.address)  # fmt: skip
        sub = slabcast.Subscriber(stream_name, size=256, clip=True, policy="block", address=broker.address)
        pub.write(np.arange(256, dtype=np.int32))
        held = sub.recv(timeout=5)
        for k in range(1, 41):  # five slabs of frames: the pool is lapped once the broker evicts the holder
            pub.write(np.arange(k * 256, (k + 1) * 256, dtype=np.int32))
        if then == "closed":
            pub.close()
        expect = 256
        with pytest.raises(slabcast.EvictedError, match=r"lease_timeout \(0.5 s\)"):
            for _ in range(100):
                with sub.recv(timeout=5) as chunk:
                    assert chunk.index == expect and not chunk.discontinuity, (chunk.index, expect)
                    assert np.array_equal(chunk.data, np.arange(expect, expect + 256, dtype=np.int32))
                    expect += 256
        assert expect < 41 * 256  # (the hole: what it had not read when the pool went round)
        assert np.array_equal(held.data, np.arange(256, dtype=np.int32)), "an evicted subscriber's chunk changed"
        held.release()
        sub.close()
        if then == "open":
            pub.close()


def test_an_evicted_subscriber_that_still_has_chunks_to_take_stops_and_frees_the_publisher(tmp_path, stream_name):
    # A newcomer (C and Python alike): a block subscriber of small chunks that held each one 3 s was evicted after
    # 1 s, but it always had a chunk ready, so it never looked at its connection: it went on taking chunks (its
    # leases) for 30 s, and the publisher timed out as if nobody had been evicted.  It looks for the broker's word
    # every 0.1 s now, chunk or not.
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--lease-timeout", "0.5")) as broker:
        pub = slabcast.Publisher(stream_name, dtype="int32", slab_bytes=8192, nslabs=2, timeout=8,
                                 address=broker.address)  # fmt: skip
        sub = slabcast.Subscriber(stream_name, size=100, clip=True, address=broker.address)
        failure: list[BaseException] = []

        def write() -> None:
            try:
                for k in range(0, 20_000, 500):
                    pub.write(np.arange(k, k + 500, dtype=np.int32))
            except BaseException as exc:
                failure.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        taken = 0
        with pytest.raises(slabcast.EvictedError, match=r"lease_timeout \(0.5 s\)"):
            for _ in range(10):  # (without the look: a chunk every time, for as long as it asks)
                with sub.recv(timeout=5) as chunk:
                    assert chunk.index == 100 * taken
                    taken += 1
                    time.sleep(0.7)  # the slow work, holding the chunk (past lease_timeout)
        sub.close()  # (its leases go: nothing holds the publisher back)
        writer.join(20)
        assert not writer.is_alive() and not failure, failure
        assert taken <= 3, taken
        pub.close()


def _fuzz_messages(rng: np.random.Generator, name: str, n: int):
    """Yield (raw bytes, expects_reply) for malformed, truncated, wrong-typed and out-of-order messages."""
    good = [
        [P.OPEN, name, "<f4", 1, None, 4096, 2, 2048, None],
        [P.PUBLISHED, 10],
        [P.SUBSCRIBE, name, 10, None, True, "block", 8, None],
        [P.RELEASE, [1, 2, 3], []],
        [P.CLOSE],
        [P.SYNC, 1],
        [P.UNSUBSCRIBE],
        # Protocol v2 and v3.
        [P.PUBLISHED, 2**40],
        [3, 4096, 10, 1.0, 0, 0],  # version 2's FRAME and FRAMES, retired
        [12, 4096, [10, 20], [1.0, 2.0], 0],
        [P.SUBSCRIBE, name, 10, None, True, "drop", 8, None, "local", False, b"token123", None, "futex"],
        [P.SUBSCRIBE, name, 10, None, True, "drop", 8, None, "local", False, b"token123"],
        [P.ACK, 100, 3, 0, 1],
        [P.ATTACH, 12345],
        [P.CARRIED, 4096],
    ]
    junk = [None, True, -1, 2**63, 1.5, "x" * 70, b"\x00\xff", [], {}, [[1]], {"k": [1, 2]}, "<O8", -(2**40)]
    for _ in range(n):
        kind = rng.integers(0, 6)
        if kind == 0:  # random bytes
            yield rng.bytes(int(rng.integers(0, 64))), True
        elif kind == 1:  # truncated valid message
            raw = msgpack.packb(good[rng.integers(len(good))])
            yield raw[: int(rng.integers(0, len(raw)))], True
        elif kind == 2:  # a field replaced by junk
            msg = list(good[rng.integers(len(good))])
            if len(msg) > 1:
                msg[int(rng.integers(1, len(msg)))] = junk[rng.integers(len(junk))]
            yield msgpack.packb(msg), True
        elif kind == 3:  # unknown kinds and wrong arity
            yield msgpack.packb([int(rng.integers(11, 200))] + [1] * int(rng.integers(0, 4))), True
        elif kind == 4:  # a valid message out of order or out of role
            yield msgpack.packb(good[rng.integers(len(good))]), True
        else:  # extra fields
            yield msgpack.packb([*good[rng.integers(len(good))], 1, 2]), True


def test_ten_thousand_malformed_messages_from_several_clients(broker, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    healthy: list[int] = []
    ready = threading.Event()

    def consume():
        with slabcast.Subscriber(stream_name, size=64, clip=True, address=broker.address) as sub:
            ready.set()
            for chunk in sub:
                with chunk:
                    healthy.append(int(chunk.data[0]))

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert ready.wait(10)
    errors = {"replies": 0, "sent": 0}
    lock = threading.Lock()

    def fuzz(seed: int, greeted: bool):
        rng = np.random.default_rng(seed)
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 5000)
        s.connect(broker.address)
        if greeted:  # subscribers: seed 1 speaks protocol v1, seed 3 v2
            s.send(msgpack.packb([P.HELLO, 2 if seed == 3 else 1, 0, "sub", f"fuzz{seed}"]))
            assert msgpack.unpackb(s.recv())[0] == P.WELCOME
        sent = replies = 0
        for raw, _ in _fuzz_messages(rng, f"{stream_name}-{seed}", 2500):
            s.send(raw)
            sent += 1
            while s.poll(0):
                reply = msgpack.unpackb(s.recv(), strict_map_key=False)
                replies += reply[0] == P.ERROR and isinstance(reply[2], str) and len(reply[2]) > 10
        deadline = time.monotonic() + 10
        while replies < sent and time.monotonic() < deadline and s.poll(1000):
            reply = msgpack.unpackb(s.recv(), strict_map_key=False)
            replies += reply[0] == P.ERROR
        s.close()
        with lock:
            errors["sent"] += sent
            errors["replies"] += replies

    fuzzers = [threading.Thread(target=fuzz, args=(i, i % 2 == 1)) for i in range(4)]
    for f in fuzzers:
        f.start()
    written = 0
    while any(f.is_alive() for f in fuzzers):
        pub.write(np.full(64, written, dtype=np.int32))
        written += 1
    for f in fuzzers:
        f.join()
    pub.close()
    consumer.join(10)
    assert errors["sent"] == 10_000
    # Valid requests in the mix (a SYNC, an OPEN on a fresh name) get answers that are not errors.
    assert errors["replies"] >= 9_000, errors
    assert healthy == list(range(written)), "the healthy subscriber lost chunks during the storm"
    assert slabcast.broker_status(broker.address)["pid"] == broker.pid


@pytest.mark.slow
def test_thirty_crash_restart_cycles_leave_no_stale_segments(tmp_path, stream_name):
    address = tmp_path / "b.sock"
    pids = []
    for i in range(30):
        proc = slabcast.BrokerProcess(address).start()
        pids.append(proc.pid)
        pub = slabcast.Publisher(f"{stream_name}-{i}", slab_bytes=4096, nslabs=2, address=proc.address)
        proc.kill(group=True)  # broker and resource tracker: nobody unlinks
        pub.close()

    def ours():
        return {n for n in slabcast_segments() if int(n.split(".")[1]) in pids}

    assert ours(), "the killed brokers' segments should still be there"
    with slabcast.BrokerProcess(address):
        assert not ours(), f"stale segments left: {sorted(ours())}"
    assert not address.exists()


def test_group_mode_segments_and_private_socket_directory(tmp_path, stream_name):
    with slabcast.BrokerProcess(tmp_path / "sub" / "b.sock", args=("--shm-mode", "660")) as broker:
        with slabcast.Publisher(stream_name, address=broker.address) as pub:
            mode = stat.S_IMODE(os.stat(f"/dev/shm/{pub.segment}").st_mode)
            assert mode == 0o660
        # The group may enter it to reach the socket, which is 0660 too (issue 19, item 15); only the broker writes.
        assert stat.S_IMODE(os.stat(tmp_path / "sub").st_mode) == 0o750
        assert stat.S_IMODE(os.stat(tmp_path / "sub" / "b.sock").st_mode) == 0o660
    with (
        slabcast.BrokerProcess(tmp_path / "b2.sock") as broker,
        slabcast.Publisher(stream_name, address=broker.address) as pub,
    ):
        assert stat.S_IMODE(os.stat(f"/dev/shm/{pub.segment}").st_mode) == 0o600
