"""Fan-out through a real broker: publisher and subscribers in separate processes, exact chunks."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import slabcast
from tests.integration import workers as W
from tests.reference import expected_chunks


def expected(spec, sub_kwargs, dtype, channels, rate):
    """The chunks a subscriber must receive, with the crc of their bytes."""
    frames = W.frames_for(spec, dtype, channels, rate)
    whole = np.concatenate([a for a, _ in frames])
    size = sub_kwargs.get("size") or round(sub_kwargs["seconds"] * rate)
    out = []
    for seq, (i, n, t0) in enumerate(
        expected_chunks(
            [(len(a), t) for a, t in frames], size, sub_kwargs.get("clip", False), rate, sub_kwargs.get("sampler")
        )
    ):
        out.append((seq, i, n, t0, zlib.crc32(whole[i : i + n].tobytes())))
    return out


def run_fanout(broker, workers, queue, name, spec, pub_kwargs, subs):
    """Start subscribers and a publisher in their own processes; return {tag: (chunks, end, dropped)}."""
    ready = queue
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    go = ctx.Event()
    results = ctx.Queue()
    workers.spawn(W.publish, broker.address, name, spec, pub_kwargs, ready, go, results)
    assert ready.get(timeout=30)[0] == "pub-ready"
    for tag, kw in subs.items():
        workers.spawn(W.subscribe, broker.address, name, kw, tag, ready, results)
    for _ in subs:
        msg = ready.get(timeout=30)
        assert msg[0] == "sub-ready", msg
    go.set()
    out = {}
    for _ in range(len(subs) + 1):
        msg = results.get(timeout=60)
        if msg[0] == "pub-done":
            continue
        assert msg[0] in subs, msg
        out[msg[0]] = msg[1:]
    results.close()
    results.join_thread()
    return out


def check(out, spec, subs, dtype, channels, rate):
    for tag, kw in subs.items():
        got, end, dropped = out[tag]
        assert end == "end", (tag, got)
        want = expected(spec, kw, dtype, channels, rate)
        assert [g[:3] for g in got] == [w[:3] for w in want], tag
        assert [g[4] for g in got] == [w[4] for w in want], f"{tag}: chunk bytes differ"
        assert [g[3] for g in got] == pytest.approx([w[3] for w in want], abs=1e-9), tag
        assert dropped == 0


def test_three_subscribers_each_get_their_own_exact_chunks(broker, workers, queue, stream_name):
    rng = np.random.default_rng(7)
    spec = [int(x) for x in rng.integers(1, 900, 120)]
    pub = {"dtype": "float32", "channels": 2, "rate": 1000.0, "slab_bytes": 1 << 16, "nslabs": 6}
    subs = {
        "spl": {"seconds": 0.5, "clip": True},
        "raw": {"size": 1000},
        "model": {"size": 2048, "clip": True, "sampler": 1.0},
    }
    out = run_fanout(broker, workers, queue, stream_name, spec, pub, subs)
    check(out, spec, subs, "float32", 2, 1000.0)
    assert len(out["spl"][0]) == sum(spec) // 500


def test_byte_stream_and_int16_mono(broker, workers, queue, stream_name):
    spec = [3, 700, 1, 1, 4096, 12, 999] * 6
    for dtype, channels, name in (("uint8", 1, stream_name + "b"), ("int16", 1, stream_name + "i")):
        pub = {"dtype": dtype, "channels": channels, "rate": None, "slab_bytes": 1 << 14, "nslabs": 4}
        subs = {"a": {"size": 100, "clip": True}, "b": {"size": 777}}
        out = run_fanout(broker, workers, queue, name, spec, pub, subs)
        check(out, spec, subs, dtype, channels, None)


def test_bytes_are_accepted_on_a_byte_stream(broker, stream_name):
    with slabcast.Publisher(stream_name, dtype="uint8", address=broker.address) as pub:
        sub = slabcast.Subscriber(stream_name, size=5, clip=True, address=broker.address)
        pub.write(b"hello world", t0=1.0)
        pub.write(bytearray(b"!!"), t0=2.0)
        pub.close()
        got = [bytes(c.data) for c in sub]
        sub.close()
    assert got == [b"hello", b" worl"]


def test_fast_small_frames_are_batched_without_losing_a_frame_or_its_time(broker, stream_name):
    with slabcast.Publisher(stream_name, dtype="uint8", address=broker.address) as pub:
        sub = slabcast.Subscriber(stream_name, size=1, address=broker.address, max_inflight=1024)
        for i in range(3000):  # far faster than one message each: notices go in FRAMES batches
            pub.write(bytes([i % 256]) * 3, t0=1000.0 + i)
        # No flush, no close: the tail of the last batch must arrive by itself.
        got = []
        while len(got) < 3000:
            with sub.recv(timeout=5) as chunk:
                got.append((chunk.index, len(chunk.data), chunk.t0, int(chunk.data[0])))
        assert got == [(3 * i, 3, 1000.0 + i, i % 256) for i in range(3000)]
        pub.flush()  # notices reach subscribers before the FRAMEs reach the broker: wait for those
        assert slabcast.broker_status(broker.address)["streams"][0]["frames"] == 3000
        sub.close()
