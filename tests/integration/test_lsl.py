"""Lab Streaming Layer both ways (issue 13), against real pylsl outlets and inlets on loopback."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

import slabcast

pylsl = pytest.importorskip("pylsl", reason="the lsl extra: pip install 'slabcast[lsl]'")


def emg_outlet(name, source_id, channels=4, rate=512.0):
    info = pylsl.StreamInfo(name, "EMG", channels, rate, "float32", source_id)
    chans = info.desc().append_child("channels")
    for i in range(channels):
        ch = chans.append_child("channel")
        ch.append_child_value("label", f"EMG{i + 1:02d}")
        ch.append_child_value("type", "EMG")
        ch.append_child_value("unit", "microvolts")
    return pylsl.StreamOutlet(info)


def push(outlet, start, n, channels=4):
    data = (np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones(channels, np.float32))
    outlet.push_chunk(data)
    return data


def test_labels_units_and_source_id_reach_subscribers_windows_and_recordings(tmp_path, stream_name):
    lsl_name = f"sc-{stream_name}"
    outlet = emg_outlet(lsl_name, f"dev-{stream_name}")
    spec = f"lsl:name={stream_name},stream={lsl_name},timeout=2"
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", spec), startup_timeout=30) as broker:
        sub = slabcast.Subscriber(stream_name, size=64, clip=True, address=broker.address, wait=20)
        info = sub.info
        assert info.channel_names == ("EMG01", "EMG02", "EMG03", "EMG04")
        assert info.channel_types == ("EMG",) * 4 and info.channel_units == ("microvolts",) * 4
        assert info.source_id == f"dev-{stream_name}" and info.rate == 512.0
        win = slabcast.Window(stream_name, 1.0, address=broker.address)
        assert win.info.channel_units == info.channel_units
        out = tmp_path / "emg.zarr"
        rec = subprocess.Popen([sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(out),
                                "--address", broker.address, "--seconds", "0.5"],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert outlet.wait_for_consumers(10)
        # The recorder must be there before the samples (a slow start under load would miss them).
        deadline = time.monotonic() + 30
        while len(_subscribers(broker.address, stream_name)) < 3:  # sub, win and the recorder
            assert time.monotonic() < deadline and rec.poll() is None, "the recorder did not subscribe"
            time.sleep(0.05)
        for k in range(0, 1024, 64):
            push(outlet, k, 64)
        with sub.recv(timeout=10) as chunk:
            assert chunk.info.channel_names[0] == "EMG01" and chunk.data.shape == (64, 4)
        assert rec.wait(30) == 0, rec.stderr.read()
        rec.stderr.close()
        win.close()
        sub.close()
    recording = slabcast.open_recording(str(out))
    assert recording.info.channel_units == ("microvolts",) * 4 and recording.info.source_id == f"dev-{stream_name}"


@pytest.mark.slow
@pytest.mark.parametrize("second", ["same-device", "new-device"])  # restarted, or replaced by another outlet
def test_an_outlet_started_7_s_after_the_broker_then_gone_is_followed_with_a_discontinuity(tmp_path, stream_name,
                                                                                         second):  # fmt: skip
    lsl_name = f"sc-{stream_name}"
    spec = f"lsl:name={stream_name},stream={lsl_name},timeout=0.5,lost_after=1.0"
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", spec), startup_timeout=30) as broker:
        # No outlet yet: the broker serves, the source waits (a subscriber waits for the stream).
        assert not slabcast.broker_status(broker.address)["streams"]
        # The outlet comes 7 s after the broker (a wait for time, not readiness: the source's looks, 0.5 s each
        # here, have backed off to their 2 s from about 6.7 s on); once is enough: the second case is about the
        # outlet that replaces it.
        time.sleep(7.0 if second == "same-device" else 0.0)
        outlet = emg_outlet(lsl_name, "same-device")
        sub = slabcast.Subscriber(stream_name, size=128, clip=True, address=broker.address, wait=20)
        assert outlet.wait_for_consumers(10)
        first = push(outlet, 0, 256)
        got = [sub.recv(timeout=10), sub.recv(timeout=10)]
        assert [c.discontinuity for c in got] == [False, False]
        assert np.array_equal(np.concatenate([c.data for c in got]), first)
        for c in got:
            c.release()
        del outlet  # the device goes away ...
        time.sleep(2.0)  # ... for 2 s (longer than lost_after) ...
        outlet = emg_outlet(lsl_name, second)  # ... and comes back, or another takes its place
        deadline = time.monotonic() + 20
        k = 1000
        while True:  # until the source has found it again
            push(outlet, k, 128)
            k += 128
            try:
                chunk = sub.recv(timeout=0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "the restarted outlet was never followed"
        assert chunk.discontinuity and chunk.data[0, 0] >= 1000
        chunk.release()
        sub.close()


def test_a_source_that_fails_ends_its_stream_as_gone_never_as_closed(tmp_path, stream_name):
    # A newcomer (a montage change: the outlet came back with 8 channels instead of 4): the source failed, and its
    # subscribers and recorders got a clean end (EndOfStream; the recorder exited 0).  A failure is never a clean
    # end: PublisherGoneError naming it, after every sample written.
    lsl_name = f"sc-{stream_name}"
    outlet = emg_outlet(lsl_name, f"dev-{stream_name}")
    spec = f"lsl:name={stream_name},stream={lsl_name},timeout=0.5,lost_after=0.5"
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", spec), startup_timeout=30) as broker:
        sub = slabcast.Subscriber(stream_name, size=64, clip=True, address=broker.address, wait=20)
        assert outlet.wait_for_consumers(10)
        push(outlet, 0, 128)
        for k in range(2):
            with sub.recv(timeout=10) as chunk:
                assert chunk.index == 64 * k and chunk.data[0, 0] == 64 * k
        del outlet  # gone; another with 8 channels takes its name
        outlet = emg_outlet(lsl_name, f"dev-{stream_name}", channels=8)
        deadline = time.monotonic() + 20
        with pytest.raises(slabcast.PublisherGoneError, match=r"source '.*' failed: .*came back as float32 x 8"):
            while True:
                push(outlet, 0, 64, channels=8)
                assert time.monotonic() < deadline, "the source never failed"
                with contextlib.suppress(TimeoutError):
                    sub.recv(timeout=0.2).release()
        sub.close()
    del outlet


def test_strings_in_several_channels_are_refused_in_one_clear_line(tmp_path, stream_name):
    # (One channel of strings is a marker stream: tests/integration/test_markers.py.)
    lsl_name = f"sc-{stream_name}"
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(lsl_name, "Markers", 2, 0, "string", lsl_name))
    spec = f"lsl:name={stream_name},stream={lsl_name},timeout=2"
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", spec), startup_timeout=30) as broker:
        deadline = time.monotonic() + 15
        while not any(s["state"] == "failed" for s in slabcast.broker_status(broker.address)["sources"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)  # polling the broker's status: no event says a source gave up
        assert slabcast.broker_status(broker.address)["pid"] == broker.pid  # the broker is unharmed
    err = broker.stderr()
    assert "carries strings in 2 channels; a slabcast marker stream has one" in err and "Traceback" not in err
    del outlet


def test_slabcast_lsl_out_serves_a_stream_to_a_pylsl_inlet_exactly(broker, stream_name):
    lsl_name = f"out-{stream_name}"
    pub = slabcast.Publisher(stream_name, "float32", 3, rate=250.0, address=broker.address,
                             channel_names=["Fz", "Cz", "Pz"], channel_types=["EEG"] * 3,
                             channel_units=["microvolts"] * 3)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "slabcast", "lsl-out", stream_name, "--name", lsl_name,
                             "--address", broker.address], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        found = pylsl.resolve_byprop("name", lsl_name, 1, 20)
        assert found, "the outlet never appeared"
        inlet = pylsl.StreamInlet(found[0])
        full = inlet.info(10)
        ch = full.desc().child("channels").child("channel")
        assert (ch.child_value("label"), ch.child_value("type"), ch.child_value("unit")) == ("Fz", "EEG",
                                                                                             "microvolts")  # fmt: skip
        assert (full.channel_count(), full.nominal_srate(), full.type()) == (3, 250.0, "EEG")
        inlet.open_stream(10)
        time.sleep(0.5)  # LSL's inlet needs a moment after open_stream before it receives (no signal exists)
        data = np.arange(3 * 500, dtype=np.float32).reshape(500, 3)
        t0 = time.time()
        for k in range(0, 500, 50):
            pub.write(data[k : k + 50], t0=t0 + k / 250.0)
        got, stamps = [], []
        deadline = time.monotonic() + 20
        while sum(len(g) for g in got) < 500 and time.monotonic() < deadline:
            samples, ts = inlet.pull_chunk(timeout=1.0)
            if ts:
                got.append(np.asarray(samples, dtype=np.float32))
                stamps.extend(ts)
        values = np.concatenate(got)
        assert np.array_equal(values, data)
        # Timestamps on LSL's clock: sample k at t0 + k/250, within the clock offset measurement.
        offset = time.time() - pylsl.local_clock()
        assert np.allclose(np.asarray(stamps) + offset, t0 + np.arange(500) / 250.0, atol=0.01)
        pub.close()
        assert proc.wait(20) == 0
        assert "500 samples" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _subscribers(address: str, name: str) -> list:
    """The subscribers the broker lists for stream ``name`` (its status)."""
    for stream in slabcast.broker_status(address)["streams"]:
        if stream["name"] == name:
            return list(stream.get("subscribers", []))
    return []


def test_each_samples_own_lsl_time_reaches_chunk_times_and_a_recording(tmp_path, stream_name):
    lsl_name = f"sc-{stream_name}"
    outlet = emg_outlet(lsl_name, f"dev-{stream_name}", channels=2, rate=100.0)
    spec = f"lsl:name={stream_name},stream={lsl_name},timeout=2"
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", spec), startup_timeout=30) as broker:
        sub = slabcast.Subscriber(stream_name, size=50, clip=True, address=broker.address, wait=20)
        assert sub.info.timestamps
        out = tmp_path / "t.zarr"
        rec = subprocess.Popen([sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(out),
                                "--address", broker.address, "--seconds", "1.0"],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert outlet.wait_for_consumers(10)
        # The recorder must be there before the samples (a slow start under load missed them all, and a
        # recording of 1 s of stream time then waited for samples that never came).
        deadline = time.monotonic() + 30
        while len(_subscribers(broker.address, stream_name)) < 2:
            assert time.monotonic() < deadline and rec.poll() is None, "the recorder did not subscribe"
            time.sleep(0.05)
        # Jittered stamps, as a real device's are: each sample keeps its own.
        base = pylsl.local_clock()
        stamps = base + np.arange(100) / 100.0 + np.random.default_rng(1).uniform(0, 0.003, 100)
        data = np.arange(200, dtype=np.float32).reshape(100, 2)
        for k in range(100):
            outlet.push_sample(data[k], stamps[k])
        offset = time.time() - pylsl.local_clock()
        with sub.recv(timeout=10) as chunk:
            assert np.allclose(chunk.times, stamps[:50] + offset, atol=0.005)
            assert not np.allclose(np.diff(chunk.times), 0.01, atol=1e-6)  # the jitter is there, not t0 + k/rate
            assert not chunk.times.flags.writeable
        assert rec.wait(30) == 0, rec.stderr.read()
        rec.stderr.close()
        sub.close()
    recording = slabcast.open_recording(str(out))
    assert recording.times is not None and len(recording.times) == len(recording.samples) == 100
    assert np.allclose(recording.times, stamps + offset, atol=0.005)


def test_a_publisher_with_timestamps_and_chunk_times(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "int16", rate=1000.0, timestamps=True, address=broker.address,
                             slab_bytes=4096, nslabs=3, max_chunk_bytes=1024)  # fmt: skip
    sub = slabcast.Subscriber(stream_name, size=300, clip=True, address=broker.address)
    plain = slabcast.Subscriber(stream_name, size=300, clip=True, address=broker.address)
    times = 5.0 + np.sort(np.random.default_rng(2).uniform(0, 10, 3000))
    for k in range(0, 3000, 100):  # several slabs: times are carried with the samples
        pub.write(np.arange(k, k + 100, dtype=np.int16), times=times[k : k + 100])
    with pytest.raises(ValueError, match=r"one value per sample, shape \(100,\), got \(3,\)"):
        pub.write(np.zeros(100, np.int16), times=[1.0, 2.0, 3.0])
    pub.close()
    got = [(c.index, c.times.copy(), c.t0) for c in sub]
    assert [g[0] for g in got] == list(range(0, 3000, 300))
    for index, t, t0 in got:
        assert np.array_equal(t, times[index : index + 300]) and t0 == times[index]
    sub.close()
    plain.close()


@pytest.mark.slow
def test_an_lsl_source_never_takes_slabcasts_own_outlet_unless_asked_by_name(broker, stream_name):
    # Issue 19, item 7: with `slabcast lsl-out S` running, an lsl source resolving by type and source_id (the
    # form docs/lsl.md shows) latched onto slabcast's copy of the device and missed ~4 s when it came back.
    from slabcast.sources import LslSource

    device = f"dev-{stream_name}"
    pub = slabcast.Publisher(stream_name, "float32", 2, rate=250.0, address=broker.address,
                             channel_types=["EMG", "EMG"], source_id=device)  # fmt: skip
    copy = f"copy-{stream_name}"
    proc = subprocess.Popen([sys.executable, "-m", "slabcast", "lsl-out", stream_name, "--name", copy,
                             "--address", broker.address], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        by_name = LslSource(name="x", stream=copy, timeout=1.0)
        (found,) = pylsl.resolve_bypred(by_name.predicate, 1, 20)  # asked for by name: it is there
        assert found.type() == "EMG" and found.source_id() == f"slabcast:{device}"  # never the device's own
        inlet = pylsl.StreamInlet(found)
        assert inlet.info(10).desc().child_value("slabcast_outlet") == stream_name  # recognizable
        inlet.close_stream()
        # A lab newcomer: `lsl-out S --name N` under the device's own LSL name, and the source of S asking for N:
        # while the device was away the source took S's own copy (feeding S its own samples), and missed the
        # device when it came back.  Never a copy of the stream it feeds, even by name.
        own = LslSource(name=stream_name, stream=copy, timeout=1.0)
        assert not pylsl.resolve_bypred(own.predicate, 0, 1.5), own.predicate
        for options in ({"type": "EMG", "source_id": device}, {"type": "EMG"},
                        {"source_id": found.source_id()}, {"predicate": f"name='{copy}'"}):  # fmt: skip
            source = LslSource(name="y", timeout=1.0, **options)
            # (other tests' EMG outlets may still be visible on this host: only the copy must never be found)
            found_now = pylsl.resolve_bypred(source.predicate, 0, 1.5)
            assert not [s for s in found_now if s.name() == copy], (options, found_now)
        # The device itself (not slabcast's) is found by the same type and source_id.
        outlet = emg_outlet(f"real-{stream_name}", device, channels=2)
        (real,) = pylsl.resolve_bypred(LslSource(name="z", type="EMG", source_id=device).predicate, 1, 20)
        assert real.name() == f"real-{stream_name}"
        del outlet
    finally:
        pub.close()
        assert proc.wait(20) == 0
        proc.stderr.close()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("timeout", 0, "timeout must be a positive, finite number of seconds, got 0"),
    ("timeout", -1, "timeout must be a positive, finite number of seconds, got -1"),
    ("lost_after", 0, "lost_after must be a positive, finite number of seconds, got 0"),
    ("lost_after", float("inf"), "lost_after must be a positive, finite number of seconds, got inf"),
    ("max_samples", 0, "max_samples must be a positive integer, got 0"),
])  # fmt: skip
def test_lsl_source_options_out_of_range_are_refused_where_they_enter(option, value, message):
    # A lab newcomer: timeout=0 connected 4 s late, timeout=-1 blocked the broker's stop, lost_after <= 0 made
    # spurious reconnections, max_samples=0 read one sample a frame; all were taken without a word.
    from slabcast.sources import LslSource

    with pytest.raises(ValueError, match=re.escape(message)):
        LslSource(name="x", stream="y", **{option: value})


def test_status_tells_a_lost_outlet_from_a_running_one(tmp_path, stream_name):
    lsl_name = f"sc-{stream_name}"
    spec = f"lsl:name={stream_name},stream={lsl_name},timeout=0.5,lost_after=0.5"
    outlet = emg_outlet(lsl_name, f"dev-{stream_name}", channels=2, rate=500.0)
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", spec), startup_timeout=30) as broker:
        sub = slabcast.Subscriber(stream_name, size=50, address=broker.address, wait=20)
        assert outlet.wait_for_consumers(10)
        push(outlet, 0, 500, channels=2)
        sub.recv(timeout=10).release()
        del outlet  # the device goes away
        deadline = time.monotonic() + 20
        while (src := slabcast.broker_status(broker.address)["sources"][0])["state"] != "reconnecting":
            assert time.monotonic() < deadline, src
            time.sleep(0.1)  # polling the broker's status
        assert src["reconnects"] == 1
        while slabcast.broker_status(broker.address)["sources"][0]["last_sample_age"] < 2.0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        human = subprocess.run([sys.executable, "-m", "slabcast", "status", "--address", broker.address],
                               capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        assert f"source {stream_name} (LslSource): reconnecting, reconnects 1" in human, human
        assert "observed" not in human and re.search(r"none for [\d.]+ s", human), human
        sub.close()
        # Stopped while it reconnects: it exits 0 (a liblsl call may still hold its source's thread past the 5 s
        # the broker gives it: it says so, and leaves without it).
        assert broker.stop(15) == 0, broker.stderr()


def test_history_sizes_the_pool_of_an_lsl_source_once_its_outlet_gives_the_rate(tmp_path, stream_name):
    # `history = S` in `up` or `--source`: the rate is the outlet's, known only when the source connects, so
    # the pool is sized then. 40 s of 4 x float32 at 512 Hz over 32 KiB of frames per slab: 13 slabs, where
    # the default 8 hold 16 s: a subscriber starting 35 s back gets them all, unflagged.
    lsl_name = f"sc-{stream_name}"
    outlet = emg_outlet(lsl_name, f"dev-{stream_name}")
    spec = f"lsl:name={stream_name},stream={lsl_name},timeout=2,slab_bytes=65536,history=40"
    total = 40 * 512
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", spec), startup_timeout=30) as broker:
        with slabcast.Subscriber(stream_name, 512, clip=True, policy="drop", address=broker.address, wait=20) as sub:
            assert outlet.wait_for_consumers(10)
            for k in range(0, total, 256):
                push(outlet, k, 256)
            while True:  # until the broker's source has written every sample
                with sub.recv(timeout=10) as chunk:
                    if chunk.index + len(chunk.data) == total:
                        break
        late = slabcast.Subscriber(stream_name, 512, clip=True, address=broker.address, history=35)
        with late:
            assert late.start_index == total - 35 * 512
            with late.recv(timeout=10) as chunk:
                assert not chunk.discontinuity
                np.testing.assert_array_equal(chunk.data[:, 0], np.arange(total - 35 * 512, total - 34 * 512))



@contextlib.contextmanager
def lsl_out(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`slabcast lsl-out ARGS`, its standard error piped; killed if still running after."""
    proc = subprocess.Popen([sys.executable, "-m", "slabcast", "lsl-out", *args], stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_lsl_out_stopped_by_sigterm_exits_0(broker, stream_name):
    from tests.integration.test_record import wait_subscribed

    # A service manager stops it with SIGTERM: that is its normal end, not a failure (it exited 130).
    pub = slabcast.Publisher(stream_name, dtype="float32", rate=100.0, address=broker.address)
    with pub, lsl_out(stream_name, "--name", f"sc-{stream_name}", "--address", broker.address) as proc:
        wait_subscribed(broker.address, stream_name, label="lsl-out:")
        proc.terminate()
        assert proc.wait(20) == 0
        assert f"stopped serving {stream_name}" in proc.stderr.read()


def test_lsl_out_for_a_stream_the_broker_lacks_says_it_waits_and_for_what(broker, stream_name):
    # A typo waited silently (an hour), and SIGTERM then said "stopped serving" a stream it never served.
    pub = slabcast.Publisher(stream_name, dtype="float32", rate=100.0, address=broker.address)
    typo = stream_name + "x"
    with pub, lsl_out(typo, "--address", broker.address) as proc:
        said = proc.stderr.readline()
        assert f"waiting for stream {typo!r}" in said and f"did you mean {stream_name!r}?" in said, said
        proc.terminate()
        assert proc.wait(20) == 0
        assert f"stopped waiting for {typo}" in proc.stderr.read()


def test_an_lsl_source_with_a_mistyped_name_says_which_outlets_it_sees(stream_name):
    # A typo in `stream=` only said "no LSL outlet matches ... (yet); waiting for it", forever.
    from slabcast.sources.lsl import LslSource

    outlet = emg_outlet(f"sc-{stream_name}", f"dev-{stream_name}")
    source = LslSource(name="x", stream=f"sc-{stream_name[:-1]}x", timeout=1.0)  # (a stream name is hex)
    with pytest.raises(OSError, match=r"no LSL outlet matches") as first:
        source.connect()
    assert f"closest: sc-{stream_name} (EMG)" in str(first.value), first.value
    with pytest.raises(OSError) as again:  # said once: the retries that follow do not look again
        source.connect()
    assert "outlets visible" not in str(again.value)
    del outlet


def test_an_lsl_source_waits_in_liblsl_for_its_next_sample_instead_of_looking_every_2_ms(stream_name):
    # Its source thread looked at the inlet every 2 ms: 500 wake-ups a second per LSL source in the broker, 28 ms
    # of CPU a second here even for a marker outlet that sends nothing.  Now read() waits in liblsl (the GIL
    # released) for up to 0.1 s and comes back with the first sample that arrives, and what came with it.
    from slabcast.sources import LslSource

    outlet = emg_outlet(f"sc-{stream_name}", f"dev-{stream_name}", channels=2, rate=250.0)
    source = LslSource(name="emg", stream=f"sc-{stream_name}", timeout=10.0)
    source.connect()
    try:
        assert source.wait() == 0.0  # (the thread's pause between reads: none, read waits)
        reads, until = 0, time.monotonic() + 0.5
        while time.monotonic() < until:
            assert source.read() is None  # (nothing sent)
            reads += 1
        assert reads <= 8, f"{reads} reads in 0.5 s of silence"
        sent = push(outlet, 0, 5, channels=2)
        got, deadline = [], time.monotonic() + 10
        while sum(len(d) for d in got) < 5:
            assert time.monotonic() < deadline, "the samples never came"
            frame = source.read()
            if frame is not None:
                got.append(frame[0])
        assert np.array_equal(np.concatenate(got), sent)
    finally:
        source.disconnect()
        del outlet
