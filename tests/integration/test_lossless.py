"""A lossless (``policy="block"``) subscriber receives every sample, holds the publisher back, or says
exactly which samples it missed: never a clean end after a hole (issue 19, item 1).

The publisher runs in the test process with every write its own notice (the sporadic path, forced),
one-sample uint8 frames whose value is their index modulo 256, so every sample can be checked.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import zlib

import numpy as np
import pytest

import slabcast
from slabcast.client import _pubstate
from slabcast.wire import protocol as P
from tests.integration import workers as W

from .test_c_client import CSub, c_sub  # noqa: F401  (the session fixture that builds the C client)


@pytest.fixture
def one_notice_per_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of this process's publishers sends its own notice (no batching)."""
    monkeypatch.setattr(_pubstate, "SPORADIC", 0.0)


def _write(pub: slabcast.Publisher, start: int, count: int, held: threading.Event | None = None) -> None:
    """Write samples start..start+count, one per frame; set ``held`` when a write waits 0.2 s for a slab."""
    state: dict[str, float | None] = {"since": None}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            since = state["since"]
            if held is not None and since is not None and time.monotonic() - since > 0.2:
                held.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    one = np.zeros(1, np.uint8)
    try:
        for i in range(start, start + count):
            one[0] = i & 0xFF
            state["since"] = time.monotonic()
            pub.write(one)
            state["since"] = None
    finally:
        done.set()
        watcher.join(5)


def _tiles(events: list[tuple], total: int) -> list[tuple[int, int]]:
    """Check the chunks' and holes' ranges follow each other from 0 to ``total``; return the holes."""
    at, holes = 0, []
    for ev in events:
        if ev[0] == "chunk":
            _, index, n, ok, _disc = ev
            assert ok, f"chunk at {index} does not hold the samples written there"
            assert index == at, f"chunk at {index}, expected {at}: samples {at}..{index} vanished without a word"
            at = index + n
        else:
            _, start, stop, _msg = ev
            assert start == at, f"a hole reported at {start}, expected {at}"
            holes.append((start, stop))
            at = stop
    assert at == total, f"the stream ended at {at} of {total} samples"
    return holes


@pytest.mark.parametrize("size", [4096, 200_000])
def test_paused_block_subscriber_holds_the_publisher_and_gets_every_sample(
    broker, workers, queue, stream_name, one_notice_per_write, size
):
    # size 200,000: a carry longer than the first slab's frames (the cap once waited for the slab to hold
    # the whole carry: 200,000 notices went out unchecked and 50,001 were lost; review finding 1).
    # 300,000 notices: more than a subscriber's notice queues hold (P.NOTICE_BACKLOG + P.NOTICE_HWM); before
    # the fix it received about half and then ended clean.
    total = 300_000
    assert total > P.NOTICE_BACKLOG + P.NOTICE_HWM
    ctx_go, results = workers.queue(), workers.queue()
    go = workers._ctx.Event()
    pub = slabcast.Publisher(stream_name, dtype="uint8", rate=16_000, address=broker.address, timeout=60)
    try:
        workers.spawn(W.read_paused, broker.address, stream_name,
                      {"size": size, "policy": "block", "partial_tail": True}, queue, go, results)  # fmt: skip
        assert queue.get(timeout=30)[0] == "sub-ready"
        held = threading.Event()
        # The reader starts once the publisher is held back (what a paused block subscriber must cause).
        threading.Thread(target=lambda: (held.wait(120), go.set()), daemon=True).start()
        _write(pub, 0, total, held)
    finally:
        go.set()
        pub.close()
    events, end, dropped = results.get(timeout=120)
    assert held.is_set(), "the publisher was never held back although the subscriber read nothing"
    assert _tiles(events, total) == []
    assert not any(ev[4] for ev in events if ev[0] == "chunk"), "a discontinuity in a stream without holes"
    assert (end, dropped) == ("EndOfStream", 0)
    ctx_go.close()


@pytest.mark.parametrize("where", ["tail", "middle"])
def test_dropped_notices_lose_nothing_the_ring_holds_every_frame(
    broker, workers, queue, stream_name, one_notice_per_write, monkeypatch, where
):
    # A stopped subscriber process (SIGSTOP: its ZeroMQ threads too) behind a publisher whose notice queue
    # is tiny: notices are dropped for it, in bursts.  Version 2 named the samples it missed; version 3 reads
    # the frames' descriptors from the ring, where a notice only wakes it: it gets every sample, in order.
    monkeypatch.setattr(P, "NOTICE_HWM", 50)
    results = workers.queue()
    go, drained = workers._ctx.Event(), workers._ctx.Event()
    pub = slabcast.Publisher(stream_name, dtype="uint8", rate=16_000, address=broker.address)
    first = 20_000
    try:
        proc = workers.spawn(W.read_paused, broker.address, stream_name, {"size": 1, "policy": "block"},
                             queue, go, results, drained if where == "middle" else None)  # fmt: skip
        assert queue.get(timeout=30)[0] == "sub-ready"
        go.set()
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            _write(pub, 0, first)
            if where == "tail":
                pub.close()  # the notices still queued for the stopped subscriber go with the publisher
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        total = first
        if where == "middle":
            assert drained.wait(60), "the subscriber did not drain what it had"
            _write(pub, first, 40)
            total += 40
    finally:
        pub.close()
    events, end, dropped = results.get(timeout=60)
    assert _tiles(events, total) == [], "samples were lost"
    assert [ev[1] for ev in events if ev[0] == "chunk"] == list(range(total))
    assert not any(ev[4] for ev in events if ev[0] == "chunk"), "a chunk was flagged as a discontinuity"
    assert (end, dropped) == ("EndOfStream", 0)


@pytest.mark.parametrize("wake", ["doorbell", "futex"])
def test_paused_c_client_gets_every_sample_from_the_ring_and_exits_0(
    c_sub,  # noqa: F811
    broker,
    stream_name,
    one_notice_per_write,
    monkeypatch,
    wake,
):
    # The C client stopped (SIGSTOP) while 20,000 one-sample frames go by and the publisher closes, behind a
    # notice queue so small that most notices for it are dropped.  Version 2 named the samples whose notices
    # were lost and exited 7; version 3 reads every frame's descriptor from the ring (a notice only wakes it).
    monkeypatch.setattr(P, "NOTICE_HWM", 50)
    pub = slabcast.Publisher(stream_name, dtype="uint8", rate=16_000, address=broker.address)
    c = CSub(c_sub, broker.address, stream_name, "--size", "1", "--wake", wake, "--show-flags")
    total = 20_000
    try:
        c.wait_ready()
        os.kill(c.proc.pid, signal.SIGSTOP)
        try:
            _write(pub, 0, total)
            pub.close()
        finally:
            os.kill(c.proc.pid, signal.SIGCONT)
        assert c.finish(60) == 0, c.stderr
        assert c.stderr == ""
        got = [(index, n, crc) for _seq, index, n, _t0, crc in c.chunks()]
        assert got == [(i, 1, zlib.crc32(bytes([i & 0xFF]))) for i in range(total)], "samples lost or wrong"
        assert not any(c.flags()), "a chunk was flagged as a discontinuity"
    finally:
        pub.close()
        c.close()


def test_a_slab_change_never_carries_bytes_that_are_not_the_streams(c_sub, broker, stream_name):  # noqa: F811
    # 3 MiB chunks in 4 MiB slabs: the first slab holds 1 MiB of frames, less than the carry.  The publisher
    # copied the whole carry anyway (bytes of nothing) and published a negative floor, which the C client
    # refuses as a malformed NOTICE (review finding 2).
    n = 3 * (1 << 20) // 4
    pub = slabcast.Publisher(stream_name, dtype="float32", rate=48_000, address=broker.address,
                             slab_bytes=4 << 20, max_chunk_bytes=3 << 20, nslabs=16)  # fmt: skip
    c = CSub(c_sub, broker.address, stream_name, "--size", str(n), "--clip")
    try:
        c.wait_ready()
        sub = slabcast.Subscriber(stream_name, n, clip=True, address=broker.address)
        frames = [np.arange(k * 150_000, (k + 1) * 150_000, dtype=np.float32) for k in range(12)]
        for frame in frames:
            pub.write(frame)
        pub.close()
        whole = np.concatenate(frames)
        got = []
        for chunk in sub:
            with chunk:
                got.append(chunk.index)
                assert np.array_equal(chunk.data, whole[chunk.index : chunk.index + n])
        sub.close()
        assert got == [0, n]
        assert c.finish(60) == 0, c.stderr
        assert [(index, size) for _seq, index, size, _t0, _crc in c.chunks()] == [(0, n), (n, n)]
    finally:
        pub.close()
        c.close()
