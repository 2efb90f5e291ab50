"""Zero copy, leases and the slab pool: held chunks stay intact, policies, limits."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import slabcast


def small_stream(broker, name, **kw):
    args = {"dtype": "int32", "channels": 1, "slab_bytes": 8192, "nslabs": 4, "address": broker.address}
    args.update(kw)
    return slabcast.Publisher(name, **args)


def test_chunk_data_is_a_read_only_view_of_shared_memory(broker, stream_name):
    with small_stream(broker, stream_name) as pub:
        sub = slabcast.Subscriber(stream_name, size=10, clip=True, address=broker.address)
        pub.write(np.arange(10, dtype=np.int32))
        chunk = sub.recv(timeout=5)
        assert not chunk.data.flags.writeable
        assert not chunk.data.flags.owndata
        with pytest.raises(ValueError, match="read-only"):
            chunk.data[0] = 1
        chunk.release()
        with pytest.raises(slabcast.ClosedError, match="released"):
            _ = chunk.data
        sub.close()


def test_held_view_stays_intact_while_the_publisher_writes_many_pools(broker, stream_name):
    frame = 256  # samples; 1 KiB
    with small_stream(broker, stream_name, timeout=5) as pub:
        pool_bytes = 4 * 8192
        sub = slabcast.Subscriber(stream_name, size=frame, clip=True, address=broker.address)
        pub.write(np.full(frame, 7, dtype=np.int32))
        first = sub.recv(timeout=5)
        view = first.data[10:20]  # a view that outlives the chunk
        first.release()
        n = 6 * pool_bytes // (frame * 4)
        for i in range(1, n):
            pub.write(np.full(frame, i + 100, dtype=np.int32))
            with sub.recv(timeout=5) as chunk:
                assert (chunk.data == i + 100).all()
        assert (view == 7).all(), "a held view was overwritten"
        status = slabcast.broker_status(broker.address)["streams"][0]
        assert status["subscribers"][0]["leases"] == 1  # only the chunk behind `view`
        del view
        pub.write(np.zeros(frame, dtype=np.int32))
        sub.recv(timeout=5).release()
        status = slabcast.broker_status(broker.address)["streams"][0]
        assert status["subscribers"][0]["leases"] == 0
        sub.close()


def test_block_policy_makes_the_writer_time_out_and_loses_nothing(broker, stream_name):
    with small_stream(broker, stream_name, timeout=0.3) as pub:
        sub = slabcast.Subscriber(stream_name, size=256, clip=True, max_inflight=1, address=broker.address)
        written = 0
        with pytest.raises(slabcast.WriteTimeout, match="nothing of this frame was written"):
            for _ in range(1000):
                pub.write(np.full(256, written, dtype=np.int32))
                written += 1
        assert 4 <= written < 1000
        got = []
        while len(got) < written:
            with sub.recv(timeout=5) as chunk:
                got.append(int(chunk.data[0]))
        pub.timeout = 10  # (the GRANT for the slab the reader freed may take a while on a loaded machine)
        pub.write(np.full(256, written, dtype=np.int32))  # the pool came back
        with sub.recv(timeout=5) as chunk:
            got.append(int(chunk.data[0]))
        assert got == list(range(written + 1))
        # Every frame went through the compiled path where it is built (core/_hot.c): the timeout came from its
        # slab change (FULL, then no GRANT), and it wrote nothing of the refused frame either.
        assert pub._writer is None or pub._writer.puts == pub.frames == written + 1
        sub.close()


def test_drop_policy_never_blocks_and_counts_drops_exactly(broker, stream_name):
    with small_stream(broker, stream_name, timeout=2) as pub:
        slow = slabcast.Subscriber(
            stream_name, size=256, clip=True, policy="drop", max_inflight=2, address=broker.address
        )
        for i in range(200):
            pub.write(np.full(256, i, dtype=np.int32))
        pub.close()
        got = [(c.seq, int(c.data[0])) for c in slow]
        stats = slow.statistics()
        slow.close()
    # The publisher never waited: the oldest chunks' slabs were written again before the
    # subscriber read their notices, so those are dropped; the newest survive.
    assert got and got[-1] == (199, 199)
    assert all(seq == value for seq, value in got), "seq must match the chunk's position in the stream"
    assert stats.dropped == 200 - len(got) > 0


def test_limits_give_clear_errors(broker, stream_name):
    with small_stream(broker, stream_name, max_chunk_bytes=4096) as pub:
        with pytest.raises(slabcast.RequestError, match=r"a chunk of 2000 samples \(8000 bytes\) is larger"):
            slabcast.Subscriber(stream_name, size=2000, address=broker.address)
        with pytest.raises(ValueError, match=r"larger than stream .* allows"):
            pub.write(np.zeros(1500, dtype=np.int32))
        with pytest.raises(slabcast.RequestError, match="seconds= needs a stream with a rate"):
            slabcast.Subscriber(stream_name, seconds=1.0, address=broker.address)
    with pytest.raises(ValueError, match="slab_bytes must be a multiple of 4096 up to 2\\*\\*30, got 5000"):
        slabcast.Publisher(stream_name, slab_bytes=5000, address=broker.address)
    # max_chunk_bytes alone: slabs twice that (4 MiB at least), so frames get as much room.
    with slabcast.Publisher(stream_name, dtype="uint8", max_chunk_bytes=3 << 20, address=broker.address) as pub:
        assert (pub.slab_bytes, pub.reserve, pub.max_frame) == (6 << 20, 3 << 20, 3 << 20)


def _pool(broker, name):
    status = slabcast.broker_status(broker.address)
    return next(s for s in status["streams"] if s["name"] == name)


def test_the_pool_grows_when_a_subscriber_asks_for_longer_chunks(broker, stream_name):
    # Frames up to 4096 bytes; chunks may grow to 64 MiB, with memory only for what is asked.
    with small_stream(broker, stream_name) as pub:
        before = _pool(broker, stream_name)
        assert before["carried_bytes"] == 4096 and before["max_chunk_bytes"] >= 64 << 20
        small = slabcast.Subscriber(stream_name, size=100, clip=True, address=broker.address)
        big = slabcast.Subscriber(stream_name, size=3000, clip=True, address=broker.address)  # 12000 bytes
        grown = _pool(broker, stream_name)
        assert grown["carried_bytes"] == 12000
        assert grown["shm_bytes"] - before["shm_bytes"] >= 4 * (12000 - 4096)
        sent = np.arange(30_000, dtype=np.int32)
        got_big, got_small = [], []
        for frame in np.split(sent, 30):  # 1000 samples a frame: every big chunk spans 3-4 frames and slabs
            pub.write(frame)
            for sub, got in ((big, got_big), (small, got_small)):
                with contextlib.suppress(slabcast.WouldBlock):
                    while True:
                        with sub.recv_nowait() as chunk:
                            got.append((chunk.index, chunk.data.copy()))
        got_small += [(c.index, c.data.copy()) for c in (small.recv(timeout=10) for _ in range(300 - len(got_small)))]
        got_big += [(c.index, c.data.copy()) for c in (big.recv(timeout=10) for _ in range(10 - len(got_big)))]
        assert [index for index, _ in got_big] == list(range(0, 30_000, 3000))
        assert all(np.array_equal(data, sent[index : index + 3000]) for index, data in got_big)
        assert np.array_equal(np.concatenate([data for _, data in got_small]), sent)
        big.close()
        small.close()
        too_long = 17 << 20  # samples: 68 MiB, past the 64 MiB limit
        with pytest.raises(slabcast.RequestError, match=r"larger than stream .* allows \(max_chunk_bytes=\d+\)"):
            slabcast.Subscriber(stream_name, size=too_long, address=broker.address)


def test_the_pool_gives_back_what_no_subscriber_needs_any_more_and_grows_again(broker, stream_name):
    with small_stream(broker, stream_name, timestamps=True) as pub:
        before = _pool(broker, stream_name)["shm_bytes"]
        small = slabcast.Subscriber(stream_name, size=100, clip=True, address=broker.address)
        sent = np.arange(200_000, dtype=np.int32)
        times = 50.0 + sent / 1000.0
        got: list[np.ndarray] = []
        index = 0

        big_chunks: list[tuple[int, np.ndarray, np.ndarray]] = []
        subs = {"big": None}

        def write(n):  # 1000-sample frames (4000 bytes: one a slab), read as they go
            nonlocal index
            for _ in range(n // 1000):
                pub.write(sent[index : index + 1000], times=times[index : index + 1000])
                index += 1000
                with contextlib.suppress(slabcast.WouldBlock):
                    while True:
                        with small.recv_nowait() as chunk:
                            assert np.array_equal(chunk.times, times[chunk.index : chunk.index + 100])
                            got.append(chunk.data.copy())
                with contextlib.suppress(slabcast.WouldBlock):
                    while subs["big"] is not None:
                        with subs["big"].recv_nowait() as chunk:
                            big_chunks.append((chunk.index, chunk.data.copy(), chunk.times))

        for lap in range(2):
            big = subs["big"] = slabcast.Subscriber(stream_name, size=50_000, clip=True, address=broker.address)
            grown = _pool(broker, stream_name)
            assert grown["carried_bytes"] == 200_000 and grown["shm_bytes"] > before + 4 * 190_000
            big_chunks.clear()
            write(60_000)
            # the 50,000-sample chunk lies in one slab, times and all
            (start, data, stamps), = big_chunks[:1]
            assert np.array_equal(data, sent[start : start + 50_000])
            assert np.array_equal(stamps, times[start : start + 50_000])
            subs["big"] = None
            big.close()
            write(10_000)  # every slab granted again after the big subscriber left: its room given back
            shrunk = _pool(broker, stream_name)
            assert shrunk["carried_bytes"] == 4096, lap
            # (a page only partly inside what is given back is kept: at most 2 a slab, 2 more for its times)
            assert shrunk["shm_bytes"] <= before + 4 * 4 * 4096, (lap, shrunk["shm_bytes"], before)
        while len(got) < index // 100:
            with small.recv(timeout=10) as chunk:
                got.append(chunk.data.copy())
        assert np.array_equal(np.concatenate(got), sent[:index])  # the small subscriber lost nothing meanwhile
        small.close()


def test_a_grown_pool_keeps_per_sample_times(broker, stream_name):
    with small_stream(broker, stream_name, timestamps=True) as pub:
        sub = slabcast.Subscriber(stream_name, size=2500, clip=True, address=broker.address)  # 10000 bytes > 4096
        assert _pool(broker, stream_name)["carried_bytes"] == 10000
        times = 1000.0 + np.cumsum(np.full(10_000, 1e-3))
        seen = []

        def check(chunk):
            with chunk:
                assert np.array_equal(chunk.data, np.arange(chunk.index, chunk.index + 2500))
                assert np.array_equal(chunk.times, times[chunk.index : chunk.index + 2500])
                seen.append(chunk.index)

        for k in range(10):  # 1000 samples a frame, 4 slabs: a lossless subscriber must keep up
            pub.write(np.arange(k * 1000, (k + 1) * 1000, dtype=np.int32), times=times[k * 1000 : (k + 1) * 1000])
            with contextlib.suppress(slabcast.WouldBlock):
                while True:
                    check(sub.recv_nowait())
        while len(seen) < 4:
            check(sub.recv(timeout=10))
        assert seen == [0, 2500, 5000, 7500]
        sub.close()


def test_growing_past_dev_shm_is_a_clear_error_and_the_stream_goes_on(broker, stream_name):
    # 4096 slabs that may carry chunks of almost 1 GiB, with memory for 4 KiB frames only.
    with small_stream(broker, stream_name, slab_bytes=1 << 30, nslabs=4096, max_chunk_bytes=(1 << 30) - 4096) as pub:
        with pytest.raises(slabcast.ShmFullError, match=r"no room for \d+ more bytes .*--shm-size"):
            slabcast.Subscriber(stream_name, size=50_000_000, address=broker.address)  # 4096 x 200 MB
        sub = slabcast.Subscriber(stream_name, size=1000, clip=True, address=broker.address)
        pub.write(np.arange(1000, dtype=np.int32))
        with sub.recv(timeout=10) as chunk:
            assert np.array_equal(chunk.data, np.arange(1000))
        sub.close()


def test_full_dev_shm_is_a_clear_error_not_sigbus(broker, stream_name):
    # 4096 slabs of 1 GiB cannot be allocated anywhere; ftruncate alone would succeed.
    with pytest.raises(slabcast.ShmFullError, match="no room"):
        slabcast.Publisher(stream_name, slab_bytes=1 << 30, nslabs=4096, address=broker.address)
    with small_stream(broker, stream_name) as pub:  # the broker is unharmed
        pub.write(np.zeros(4, dtype=np.int32))


def test_a_write_timeout_names_the_block_subscriber_furthest_behind_and_who_holds_chunks(broker, stream_name):
    # A newcomer: "no free slab ... a policy='block' subscriber is behind" named nobody, while the broker knew who.
    with small_stream(broker, stream_name, timeout=1.0) as pub:
        slow = slabcast.Subscriber(stream_name, size=256, clip=True, address=broker.address, label="slow-one")
        keeper = slabcast.Subscriber(stream_name, size=256, clip=True, policy="drop", address=broker.address,
                                     label="chunk-keeper")  # fmt: skip
        pub.write(np.zeros(256, dtype=np.int32))
        held = keeper.recv(timeout=5)  # held: its lease keeps a slab
        with contextlib.suppress(TimeoutError):  # (its next look reports what it holds)
            keeper.recv(timeout=0).release()
        try:
            with pytest.raises(slabcast.WriteTimeout) as caught:
                for i in range(1000):
                    pub.write(np.full(256, i, dtype=np.int32))
            said = str(caught.value)
            assert "furthest behind: 'slow-one' (pid " in said and "policy block" in said, said
            assert f"holding chunks: 'chunk-keeper' (pid {os.getpid()}, 1)" in said, said
            assert said.endswith("nothing of this frame was written"), said
        finally:
            held.release()
            keeper.close()
            slow.close()


def test_status_shows_a_publisher_held_back_and_the_subscriber_behind(broker, stream_name):
    # A newcomer: with a Publisher held back by a stopped block subscriber, `slabcast status` showed no publisher
    # at all (hosted sources say `blocked`).  Now its row says since when, and by whom (the broker's sweep: 0.5 s).
    with small_stream(broker, stream_name, timeout=30) as pub:
        slow = slabcast.Subscriber(stream_name, size=256, clip=True, address=broker.address, label="slow-one")
        stop, failure = threading.Event(), []

        def write() -> None:
            try:
                while not stop.is_set():
                    pub.write(np.zeros(256, dtype=np.int32))
            except BaseException as exc:
                failure.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            deadline = time.monotonic() + 10
            while True:
                (row,) = slabcast.broker_status(broker.address)["streams"]
                if row["publisher"]["held_back_s"] is not None:
                    break
                assert time.monotonic() < deadline and not failure, (row["publisher"], failure)
                time.sleep(0.05)
            assert row["publisher"]["label"] == f"publisher:{stream_name}", row["publisher"]
            assert row["publisher"]["held_back_by"] == "slow-one", row["publisher"]
            text = subprocess.run([sys.executable, "-m", "slabcast", "status", "--address", broker.address],
                                  capture_output=True, text=True, timeout=30).stdout  # fmt: skip
            assert f"publisher publisher:{stream_name} pid " in text and "held back" in text, text
            assert "by slow-one" in text, text
        finally:
            stop.set()
            slow.close()  # (the publisher goes on: nobody holds it back)
            writer.join(30)
        assert not failure, failure
        (row,) = slabcast.broker_status(broker.address)["streams"]
        assert row["publisher"]["label"] == f"publisher:{stream_name}"
