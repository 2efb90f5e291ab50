"""Worker functions for test_data_path_v3.py, run in spawned processes (importable by spawn)."""

from __future__ import annotations

import os
import signal
import struct
import time

import numpy as np

import slabcast


def record_arrivals(address, name, kwargs, ready_q, result_q, look=None):
    """Subscribe (int64 stream, each sample's value its index), say ready, then note for every chunk the
    CLOCK_MONOTONIC time it came (``time.monotonic`` is system-wide on Linux: comparable with the writer's)
    beside its index, t0 and whether its values are right, until the end.  ``look``: the subscriber's bounded
    wait in seconds (client/_local.py ``_LOOK``, 0.1 s)."""
    try:
        if look is not None:
            from slabcast.client import _local

            _local._LOOK = look
        sub = slabcast.Subscriber(name, address=address, wait=30, **kwargs)
        ready_q.put(("sub-ready", os.getpid()))
        arrived, index, t0, bad = [], [], [], []
        end = "?"
        while True:
            try:
                chunk = sub.recv(timeout=60)
            except slabcast.SlabcastError as exc:
                end = type(exc).__name__
                break
            now = time.monotonic()
            with chunk:
                arrived.append(now)
                index.append(chunk.index)
                t0.append(chunk.t0)
                if not np.array_equal(chunk.data, np.arange(chunk.index, chunk.index + len(chunk.data))):
                    bad.append(chunk.index)
        stats = sub.statistics()
        sub.close()
        result_q.put(("sub-done", np.array(index), np.array(t0), np.array(arrived), bad, end, stats.dropped))
    except BaseException as exc:
        result_q.put(("sub-error", repr(exc)))
        raise


def read_all(address, name, kwargs, ready_q, result_q, mark=None, reached=None):
    """Subscribe (uint8 stream, each sample's value its index modulo 256), say ready, then note every
    chunk's (seq, index, length, values right, discontinuity) until the end; set ``reached`` once a chunk
    reaches stream index ``mark``.  Report the arrays, how it ended, statistics().dropped and its start."""
    try:
        sub = slabcast.Subscriber(name, address=address, wait=30, **kwargs)
        ready_q.put(("sub-ready", os.getpid()))
        seq, index, length, ok, disc = [], [], [], [], []
        end = "?"
        while True:
            try:
                chunk = sub.recv(timeout=60)
            except slabcast.SlabcastError as exc:
                end = type(exc).__name__
                break
            with chunk:
                values = chunk.data
                n = len(values)
                seq.append(chunk.seq)
                index.append(chunk.index)
                length.append(n)
                ok.append(bool(np.array_equal(values, np.arange(chunk.index, chunk.index + n) & 0xFF)))
                disc.append(chunk.discontinuity)
                if reached is not None and chunk.index + n > mark:
                    reached.set()
        stats = sub.statistics()
        sub.close()
        arrays = [np.array(a, np.int64) for a in (seq, index, length)] + [np.array(a, bool) for a in (ok, disc)]
        result_q.put(("sub-done", *arrays, end, stats.dropped, sub.start_index))
    except BaseException as exc:
        result_q.put(("sub-error", repr(exc)))
        raise


def frame_sizes(seed):
    """The frame lengths write_until_killed writes, in order (1 .. 2999 samples)."""
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(1, 3000))


def write_until_killed(address, name, seed, ready_q, go_event, written, die_at=None, die_in=None):
    """Write int64 frames (each sample's value its index, t0 the index of the frame's first sample) as fast
    as possible, forever: a test kills this process.  After each write returns, ``written`` (a shared
    int64) holds the samples of the frames written.

    ``die_in="descriptor"``: kill itself (SIGKILL) with descriptor ``die_at`` half written (its seq, index
    and t0); ``die_in="position"``: with it whole but the position that publishes it not stored."""
    from slabcast.core.ring import Ring

    if die_in == "descriptor":
        write = Ring.write

        def torn_write(self, seq, index, t0, *rest):
            if seq == die_at:
                struct.pack_into("<QQd", self._bytes, (seq & self.mask) * 64, seq, index, t0)
                os.kill(os.getpid(), signal.SIGKILL)
            write(self, seq, index, t0, *rest)

        Ring.write = torn_write
    elif die_in == "position":
        publish = Ring.publish

        def unpublished(self, position):
            if position == die_at + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            publish(self, position)

        Ring.publish = unpublished
    pub = slabcast.Publisher(name, dtype="int64", address=address, slab_bytes=64 << 10, max_chunk_bytes=32 << 10,
                             nslabs=8, timeout=60)  # fmt: skip
    if die_in is not None and pub._writer is not None:
        # The deterministic deaths are injected into the Python path's Ring.write / Ring.publish; the compiled
        # path (core/_hot.c) would write every frame without calling them.
        pub._writer.close()
        pub._writer = None
    ready_q.put(("pub-ready", os.getpid()))
    go_event.wait(60)
    index = 0
    for n in frame_sizes(seed):
        pub.write(np.arange(index, index + n, dtype=np.int64), t0=float(index))
        index += n
        written.value = index


def recv_woken_from_the_futex_word(sub: slabcast.Subscriber, write, timeout: float = 10.0):
    """One chunk, taken by a thread blocked in ``sub.recv`` that ``write()`` wakes once the subscriber sleeps on
    the futex word (its byte of the futex sleeper table set: protocol 7.8).  Make ``_LOOK`` long (the
    subscriber's bounded wait): a lost wake-up then shows as no chunk within ``timeout`` seconds."""
    import threading

    rx = sub._rx
    got: list = []
    thread = threading.Thread(target=lambda: got.append(sub.recv(timeout=60)), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not rx._ring.futex_sleepers[rx._sleeper]:  # (its store, seen through the same mapping)
        assert thread.is_alive() and time.monotonic() < deadline, "the subscriber never slept on the futex word"
        time.sleep(0.001)
    write()
    thread.join(timeout)
    assert not thread.is_alive(), f"not woken within {timeout} s: a lost wake-up"
    return got[0]
