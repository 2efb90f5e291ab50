"""History for late joiners (issue 23, item 4): ``Subscriber(history=S)`` and ``record --pre-buffer S`` start S
seconds back, from what the pool still holds, exactly; flagged when the pool held less.

Samples are int32 whose value is their stream index, so every sample is checked; frames are written whole
and the chunks cross slab changes (which the publisher did not carry for before the subscriber came).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

import slabcast

RATE = 1000.0
FRAME = 10  # samples per write


def _write(pub: slabcast.Publisher, start: int, stop: int) -> None:
    for i in range(start, stop, FRAME):
        pub.write(np.arange(i, min(i + FRAME, stop), dtype=np.int32), t0=i / RATE)


def _read_all(sub: slabcast.Subscriber) -> list[tuple[int, np.ndarray, bool, float]]:
    out = []
    with sub:
        while True:
            try:
                chunk = sub.recv(timeout=20)
            except slabcast.EndOfStream:
                return out
            with chunk:
                out.append((chunk.index, np.array(chunk.data), chunk.discontinuity, chunk.t0))


def _check_exact(chunks: list[tuple[int, np.ndarray, bool, float]], first: int, total: int) -> None:
    at = first
    for index, data, _, t0 in chunks:
        assert index == at, f"chunk at {index}, expected {at}"
        np.testing.assert_array_equal(data, np.arange(index, index + len(data), dtype=np.int32))
        assert t0 == pytest.approx(index / RATE)
        at += len(data)
    assert at == total


@pytest.mark.parametrize("policy", ["block", "drop"])
def test_a_subscriber_joining_2_s_late_with_history_5_gets_every_sample_from_the_start(broker, stream_name, policy):
    # Slabs of 768 samples of frames: 2 s of stream span 3 of them, and chunks of 64 straddle each slab change.
    pub = slabcast.Publisher(stream_name, dtype="int32", rate=RATE, address=broker.address, slab_bytes=4096,
                             nslabs=16, max_chunk_bytes=1024)  # fmt: skip
    try:
        _write(pub, 0, 2000)
        sub = slabcast.Subscriber(stream_name, 64, clip=True, policy=policy, max_inflight=1000, address=broker.address,
                                  history=5)  # fmt: skip
        assert sub.start_index == 0
        writer = threading.Thread(target=_write, args=(pub, 2000, 3000))
        writer.start()
        chunks: list = []
        reader = threading.Thread(target=lambda: chunks.extend(_read_all(sub)))
        reader.start()
        writer.join(30)
        pub.close()
        reader.join(30)
        assert not reader.is_alive()
    finally:
        pub.close()
    assert chunks[0][0] == 0
    assert not any(c[2] for c in chunks), "nothing was missing: no chunk is flagged"
    _check_exact(chunks, 0, 3000 // 64 * 64)


def test_history_longer_than_the_pool_starts_at_its_oldest_frame_flagged(broker, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", rate=RATE, address=broker.address, slab_bytes=4096,
                             nslabs=6, max_chunk_bytes=1024)  # fmt: skip
    try:
        _write(pub, 0, 20000)
        sub = slabcast.Subscriber(stream_name, 50, address=broker.address, history=100)
        start = sub.start_index
        # The pool holds at most 6 slabs of 768 samples, of which the publisher was granted 2 ahead.
        assert 20000 - 6 * 768 <= start < 20000 - 768, start
        assert start % FRAME == 0  # a frame's first sample: what the broker kept of it
        reader_chunks: list = []
        reader = threading.Thread(target=lambda: reader_chunks.extend(_read_all(sub)))
        reader.start()
        _write(pub, 20000, 20500)
        pub.close()
        reader.join(30)
        assert not reader.is_alive()
    finally:
        pub.close()
    assert reader_chunks[0][2], "the first chunk says less history than asked was there"
    assert not any(c[2] for c in reader_chunks[1:])
    _check_exact(reader_chunks, start, reader_chunks[-1][0] + len(reader_chunks[-1][1]))
    assert reader_chunks[-1][0] + len(reader_chunks[-1][1]) > 20400


def test_history_without_it_or_nothing_written_starts_at_the_head(broker, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", rate=RATE, address=broker.address)
    try:
        with slabcast.Subscriber(stream_name, 10, address=broker.address, history=3) as sub:
            assert sub.start_index == 0
        _write(pub, 0, 100)
        with slabcast.Subscriber(stream_name, 10, address=broker.address) as sub:
            assert sub.start_index == 100
        with pytest.raises(ValueError, match="history must be a positive finite number"):
            slabcast.Subscriber(stream_name, 10, address=broker.address, history=-1)
    finally:
        pub.close()


def test_a_recorder_with_pre_buffer_holds_the_lead_in(broker, stream_name, tmp_path):
    out = tmp_path / "late.wav"
    pub = slabcast.Publisher(stream_name, dtype="float32", rate=RATE, address=broker.address, slab_bytes=4096,
                             nslabs=16)  # fmt: skip
    data = np.random.default_rng(4).standard_normal(4000).astype(np.float32) * 0.1
    rec = None
    try:
        for i in range(0, 2000, FRAME):
            pub.write(data[i : i + FRAME], t0=i / RATE)
        rec = subprocess.Popen([sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(out),
                                "--address", broker.address, "--pre-buffer", "10"],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 20
        while not any(s["label"].startswith("record:") for s in slabcast.broker_status(broker.address)["streams"][0]
                      ["subscribers"]):  # fmt: skip
            assert rec.poll() is None, rec.stderr.read() if rec.stderr else ""
            assert time.monotonic() < deadline, "the recorder never subscribed"
            time.sleep(0.05)  # polling the broker's status: the only signal a separate CLI process gives
        for i in range(2000, 4000, FRAME):
            pub.write(data[i : i + FRAME], t0=i / RATE)
        pub.close()
        assert rec.wait(20) == 0, rec.stderr.read() if rec.stderr else ""
    finally:
        pub.close()
        if rec is not None:
            if rec.poll() is None:
                rec.kill()
                rec.wait(5)
            if rec.stderr:
                rec.stderr.close()
    samples, rate = sf.read(str(out), dtype="float32")
    assert rate == RATE
    np.testing.assert_array_equal(samples, data)


def test_history_of_a_stream_without_a_rate_goes_back_by_its_frames_times(broker, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", address=broker.address)
    try:
        _write(pub, 0, 1000)  # frames of 10 samples, t0 = first index / 1000: the newest frame's t0 is 0.990
        sub = slabcast.Subscriber(stream_name, 10, address=broker.address, history=0.055)
        assert sub.start_index == 930  # 0.935 lies in the frame whose t0 is 0.930: the whole frame
        with sub:
            chunk = sub.recv(timeout=10)
            with chunk:
                assert (chunk.index, chunk.discontinuity, chunk.t0) == (930, False, pytest.approx(0.930))
                np.testing.assert_array_equal(chunk.data, np.arange(930, 940, dtype=np.int32))
    finally:
        pub.close()


def test_history_of_a_marker_stream_holds_the_markers_of_the_last_seconds(broker, stream_name):
    # A marker stream has no rate, and its markers come in frames of several at uneven times: history goes
    # back by each marker's own time from the newest marker's, cutting a frame where it must.
    pub = slabcast.MarkerPublisher(stream_name, address=broker.address)
    try:
        times = 100.0 + np.cumsum(np.tile([0.25, 0.75, 1.0], 20))  # 60 markers, 100.25 .. 140.0
        for k in range(0, 60, 3):
            pub.write([f"m{i}" for i in range(k, k + 3)], times=times[k : k + 3])
        cutoff = times[-1] - 10.2  # 129.8: the first marker at or after it is m44 (130.0); m43 is at 129.0
        first = int(np.flatnonzero(times >= cutoff)[0])
        assert first == 44 and first % 3 != 0  # (inside a frame of three: the frame is cut)
        sub = slabcast.Subscriber(stream_name, 1, clip=True, address=broker.address, history=10.2)
        assert sub.start_index == first
        got = []
        with sub:
            while len(got) < 60 - first:
                with sub.recv(timeout=10) as chunk:
                    assert not chunk.discontinuity
                    got.append((chunk.index, chunk.markers[0], float(chunk.times[0])))
        assert got == [(i, f"m{i}", times[i]) for i in range(first, 60)]
    finally:
        pub.close()


def test_history_of_a_marker_stream_older_than_the_pool_starts_at_its_oldest_marker_unflagged(broker, stream_name):
    # Nothing was lost: every marker the stream ever had is still in the pool, so the first chunk is not flagged.
    pub = slabcast.MarkerPublisher(stream_name, address=broker.address)
    try:
        pub.write(["a", "b"], times=[10.0, 11.0])
        pub.write(["c"], times=[12.0])
        sub = slabcast.Subscriber(stream_name, 1, clip=True, address=broker.address, history=3600)
        assert sub.start_index == 0
        with sub, sub.recv(timeout=10) as chunk:
            assert (chunk.markers, chunk.discontinuity) == (["a"], False)
    finally:
        pub.close()


def test_a_publishers_history_raises_its_slabs_to_hold_that_many_seconds(broker, stream_name):
    # 1000 Hz int32 over 32 KiB of frames per slab (slab_bytes 64 KiB): 60 s is 240,000 bytes, 8 slabs + 3.
    pub = slabcast.Publisher(stream_name, dtype="int32", rate=RATE, address=broker.address, slab_bytes=65536,
                             history=60)  # fmt: skip
    try:
        assert pub.nslabs == 11
    finally:
        pub.close()
    for bad in (0, -1.0, float("inf"), float("nan"), True, "10"):
        with pytest.raises(ValueError, match=r"history must be a positive finite number of seconds or None, got"):
            slabcast.Publisher(stream_name, dtype="int32", rate=RATE, address=broker.address, history=bad)
