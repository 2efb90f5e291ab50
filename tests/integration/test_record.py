"""Recording and replay: a record -> replay -> record round trip is bit-exact, replay keeps time."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import slabcast
from slabcast.client.record import Recording


def record_cli(address, stream, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "slabcast", "record", stream, "--out", str(out), "--address", address, *extra],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in ("samples.bin", "frames.bin")}


def test_record_replay_record_is_bit_exact_and_replay_keeps_time(broker, stream_name, tmp_path):
    rate, channels = 1000.0, 2
    first = tmp_path / "first"
    pub = slabcast.Publisher(stream_name, dtype="float32", channels=channels, rate=rate, address=broker.address,
                             channel_names=["left", "right"])  # fmt: skip
    rec = record_cli(broker.address, stream_name, first)
    # The recorder is subscribed once the broker lists it (its label says so).
    deadline = time.monotonic() + 20
    while not any(s["label"].startswith("record:") for s in slabcast.broker_status(broker.address)["streams"][0]
                  ["subscribers"]):  # fmt: skip
        assert time.monotonic() < deadline, "the recorder never subscribed"
        time.sleep(0.05)  # polling the broker's status: the only signal a separate CLI process gives
    rng = np.random.default_rng(9)
    data = rng.standard_normal((2000, channels)).astype(np.float32)
    sizes = rng.integers(1, 90, 100)
    start = 0
    for n in sizes:
        if start >= 2000:
            break
        pub.write(data[start : start + n], t0=100.0 + start / rate)
        start += int(n)
    pub.close()
    assert rec.wait(20) == 0
    assert "recorded" in rec.stderr.read()
    rec.stderr.close()
    recording = Recording.open(str(first))
    np.testing.assert_array_equal(recording.samples, data[:start])
    assert recording.info.channel_names == ("left", "right")
    assert recording.info.rate == rate

    # Replay it (a source in a second broker) and record the replay.
    second = tmp_path / "second"
    source = f"replay:path={first},speed=1,wait_for=2"
    with slabcast.BrokerProcess(tmp_path / "b2.sock", args=("--source", source)) as replay_broker:
        sub = slabcast.Subscriber(stream_name, 1, address=replay_broker.address, wait=10)
        rec2 = record_cli(replay_broker.address, stream_name, second)
        t_first = t_last = None
        for chunk in sub:  # wait_for=2: playback starts once this reader and the recorder are in
            with chunk:
                t_first = t_first or time.monotonic()
                t_last = time.monotonic()
        sub.close()
        assert rec2.wait(20) == 0
        rec2.stderr.close()
    assert files(second) == files(first), "record -> replay -> record changed the samples or frames"
    info1 = (first / "info.json").read_text().splitlines()
    info2 = (second / "info.json").read_text().splitlines()
    assert [x for x in info1 if "created" not in x] == [x for x in info2 if "created" not in x]
    # The last frame starts this long after the first: replay must take as long (speed 1), +-5 %.
    span = float(recording.frames["t0"][-1]) - float(recording.frames["t0"][0])
    assert abs((t_last - t_first) - span) <= 0.05 * span + 0.02, (t_last - t_first, span)


def record_beside_publisher(broker, stream_name, out):
    """``slabcast record`` of a live stream into ``out``, run to its end (a refusal here)."""
    with slabcast.Publisher(stream_name, address=broker.address):
        return subprocess.run(
            [sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(out), "--address", broker.address],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip


def test_a_recording_directory_is_never_overwritten(broker, stream_name, tmp_path):
    out = tmp_path / "rec"
    out.mkdir()
    (out / "info.json").write_text("{}")
    result = record_beside_publisher(broker, stream_name, out)
    assert result.returncode == 2
    assert "already holds a recording" in result.stderr


@pytest.mark.parametrize("side", [".json", ".frames"])
def test_an_audio_files_sidecars_are_never_overwritten_and_nothing_is_created(broker, stream_name, tmp_path, side):
    out = tmp_path / "rec.flac"
    left = tmp_path / f"rec.flac{side}"
    left.write_text("{}")
    result = record_beside_publisher(broker, stream_name, out)
    assert result.returncode == 2
    assert f"{left} already exists (left by an earlier recording to {out})" in result.stderr
    assert not out.exists() and left.read_text() == "{}"


def test_record_of_a_stream_the_broker_lacks_says_what_it_has(broker, stream_name, tmp_path):
    with slabcast.Publisher(stream_name, address=broker.address):
        proc = subprocess.Popen([sys.executable, "-m", "slabcast", "record", stream_name + "x", "--out",
                                 str(tmp_path / "r.wav"), "--address", broker.address], stderr=subprocess.PIPE)  # fmt: skip
        said, deadline = b"", time.monotonic() + 20
        try:
            while b"Ctrl-C to give up" not in said and time.monotonic() < deadline:
                if select.select([proc.stderr], [], [], 1.0)[0]:
                    said += os.read(proc.stderr.fileno(), 4096)
            # Ctrl-C while it waits: a failure that names the stream (a newcomer: exit 130, nothing said).
            proc.send_signal(signal.SIGINT)
            code = proc.wait(10)
            said += proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stderr.close()
    assert f"waiting for the stream (the broker has '{stream_name}' now; did you mean '{stream_name}'?".encode() in said
    assert code == 1, said
    assert f"'{stream_name}x' never appeared on the broker (it has '{stream_name}' now; did you mean " \
           f"'{stream_name}'?): nothing was recorded".encode() in said, said
    assert not (tmp_path / "r.wav").exists()


def wait_subscribed(address, name, label="record:"):
    deadline = time.monotonic() + 20
    while True:
        streams = [s for s in slabcast.broker_status(address)["streams"] if s["name"] == name]
        if streams and any(u["label"].startswith(label) for u in streams[0]["subscribers"]):
            return
        assert time.monotonic() < deadline, "the recorder never subscribed"
        time.sleep(0.05)  # polling the broker's status: the only signal a separate CLI process gives


def recorded(address, name):
    """Samples the recorder released (so wrote): its cursor, from the broker's status."""
    for s in slabcast.broker_status(address)["streams"]:
        for u in s["subscribers"] if s["name"] == name else ():
            if u["label"].startswith("record:"):
                return s["samples"] - u["lag_samples"]
    return 0


def test_a_closed_stderr_never_stops_a_recording(broker, stream_name, tmp_path):
    # `slabcast record ... 2>&1 | head -1`: the reader of the progress line leaves; the recording goes on to the end.
    out = tmp_path / "piped"
    pub = slabcast.Publisher(stream_name, dtype="int32", channels=1, rate=1000.0, address=broker.address)
    rec = record_cli(broker.address, stream_name, out)
    assert rec.stderr.read(9) == "recording"  # what `head -1` reads before it leaves
    rec.stderr.close()  # the pipe's only reader is gone: the recorder's next progress write gets EPIPE
    wait_subscribed(broker.address, stream_name)
    data = np.arange(3000, dtype=np.int32)
    for k in range(0, 3000, 50):  # 1.5 s at its rate: progress lines (every 0.5 s) fall into the broken pipe
        pub.write(data[k : k + 50], t0=k / 1000.0)
        time.sleep(0.025)  # a producer at its own pace
    pub.close()
    assert rec.wait(20) == 0
    np.testing.assert_array_equal(Recording.open(str(out)).samples[:, 0], data)


def test_an_evicted_recorder_ends_its_file_at_the_hole_and_exits_non_zero(stream_name, tmp_path):
    # SIGSTOP past the lease timeout, then SIGCONT: what was published meanwhile never reached the recorder; it
    # must not be written as if contiguous (before: the samples after the hole followed those before it, exit 1).
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--lease-timeout", "0.5")) as broker:
        out = tmp_path / "take.wav"
        pub = slabcast.Publisher(stream_name, dtype="int32", channels=1, rate=1000.0, address=broker.address,
                                 timeout=30.0)  # fmt: skip
        rec = record_cli(broker.address, stream_name, out)
        wait_subscribed(broker.address, stream_name)
        written, stop = [0], threading.Event()

        def produce():  # a ramp, so a splice shows as a jump; fast enough to fill the pool of a stopped reader
            while not stop.is_set():
                pub.write(np.arange(written[0], written[0] + 16384, dtype=np.int32), t0=written[0] / 1000.0)
                written[0] += 16384

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            while written[0] < 200_000 or recorded(broker.address, stream_name) < 16384:
                # waiting for the producer's count, and for the recorder to have written a frame: stopped
                # before its first, it would end with nothing written and leave no file
                time.sleep(0.01)
            rec.send_signal(signal.SIGSTOP)  # mid-stream: it holds chunks
            deadline = time.monotonic() + 20
            while any(u["label"].startswith("record:") for s in slabcast.broker_status(broker.address)["streams"]
                      for u in s["subscribers"]):  # fmt: skip
                assert time.monotonic() < deadline, "the stopped recorder was never evicted"
                time.sleep(0.05)  # polling the broker's status
            after = written[0]
            while written[0] < after + 1_000_000:  # published after the eviction: never reaches the recorder
                time.sleep(0.01)
            rec.send_signal(signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):  # the stream goes on while it wakes up
                rec.wait(5)
        finally:
            rec.send_signal(signal.SIGCONT)
            stop.set()
            producer.join(30)
        code = rec.wait(30)
        said = rec.stderr.read()
        rec.stderr.close()
        pub.close()
    assert code != 0, said
    back = slabcast.open_recording(str(out))
    samples = np.asarray(back.samples[:])[:, 0]
    assert len(samples) > 0
    # Contiguous: every sample is the one after the one before it (the ramp has no jump).
    np.testing.assert_array_equal(samples, np.arange(samples[0], samples[0] + len(samples)))
    assert int(back.frames["n"].sum()) == len(samples)
    if "hole" in said:  # the recorder saw chunks after the hole: it names it
        assert "the next chunk starts at" in said and "missing" in said, said
    else:
        assert "evicted" in said, said


def test_a_discontinuity_ends_a_recording_with_a_message_that_says_so(broker, stream_name, tmp_path):
    # A jump the publisher flagged (a file source looping) was told as "a hole in the stream: index went back to
    # 1000 (the next chunk starts at 1000, 1000 was due)": no sample was missing.
    pytest.importorskip("soundfile")
    from slabcast.client import record as record_module
    from tests.integration.test_record_xdf import wait_recorders

    out = tmp_path / "d.wav"
    failed: list[BaseException] = []

    def run() -> None:
        try:
            record_module.record(stream_name, str(out), address=broker.address, progress=False)
        except BaseException as exc:
            failed.append(exc)

    pub = slabcast.Publisher(stream_name, dtype="int16", rate=1000.0, address=broker.address)
    recorder = threading.Thread(target=run)
    recorder.start()
    try:
        wait_recorders(broker.address, [stream_name])
        pub.write(np.arange(1000, dtype=np.int16), t0=0.0)
        pub.write(np.arange(500, dtype=np.int16), t0=0.0, discontinuity=True)  # (a loop: the same samples again)
    finally:
        pub.close()
        recorder.join(30)
    assert not recorder.is_alive() and len(failed) == 1 and isinstance(failed[0], record_module.RecordingHoleError)
    said = str(failed[0])
    assert "a discontinuity at index 1000" in said and "holds the 1000 samples before it" in said, said
    assert "hole" not in said and "went back" not in said, said
    back = slabcast.open_recording(str(out))
    np.testing.assert_array_equal(np.asarray(back.samples[:])[:, 0], np.arange(1000))


def test_record_into_a_pipe_writes_lines_not_carriage_returns_and_repair_names_a_missing_file(broker, stream_name,
                                                                                              tmp_path):
    # A log file got "waiting for the stream^Mrecorded ..."; --repair of a missing file said "System error".
    import subprocess
    import sys

    out = tmp_path / "r.wav"
    with slabcast.Publisher(stream_name, dtype="int16", rate=8000, address=broker.address) as pub:
        rec = subprocess.Popen([sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(out),
                                "--address", broker.address], stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not any(s["name"] == stream_name and s["subscribers"]
                          for s in slabcast.broker_status(broker.address)["streams"]):  # fmt: skip
                assert time.monotonic() < deadline and rec.poll() is None, "the recorder never subscribed"
                time.sleep(0.05)  # the broker's status is the only place its subscription shows
            for k in range(4):
                pub.write(np.full(100, k, np.int16))
        except BaseException:
            rec.kill()
            rec.wait(10)
            raise
    err = rec.communicate(timeout=60)[1]
    assert rec.returncode == 0, err
    assert "\r" not in err and "recorded" in err, err
    assert f"recording {stream_name}\n" in err and "waiting for the stream" not in err, err  # (it was live)
    bad = subprocess.run([sys.executable, "-m", "slabcast", "record", "--repair", str(tmp_path / "nothere.flac")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "nothere.flac: no such file" in bad.stderr, bad.stderr


def test_a_recorder_whose_broker_dies_says_what_its_file_holds_before_the_error(broker, stream_name, tmp_path):
    # A newcomer: a recorder that lost its broker exited 1 with "the broker went away" alone: nothing said its file
    # held 2,798,400 samples, complete up to where it stopped.
    import soundfile

    out = tmp_path / "r.wav"
    pub = slabcast.Publisher(stream_name, dtype="int16", rate=8000, address=broker.address)
    rec = record_cli(broker.address, stream_name, out)
    try:
        wait_subscribed(broker.address, stream_name)
        for k in range(4):
            pub.write(np.full(100, k, np.int16))
        deadline = time.monotonic() + 30
        while not any(s["name"] == stream_name and s["subscribers"] and s["subscribers"][0]["delivered"] >= 4
                      for s in slabcast.broker_status(broker.address)["streams"]):  # fmt: skip
            assert time.monotonic() < deadline and rec.poll() is None, "the recorder never read the 4 frames"
            time.sleep(0.05)
        broker.kill()
        err = rec.communicate(timeout=60)[1]
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait(10)
        with contextlib.suppress(slabcast.SlabcastError):
            pub.close()
    assert rec.returncode == 1, err
    assert f"recorded {stream_name}: 400 samples to {out}, then stopped by the error below" in err, err
    assert "went away" in err.rsplit("then stopped", 1)[1], err
    data, rate = soundfile.read(out, dtype="int16")
    assert rate == 8000 and data.tolist() == [k for k in range(4) for _ in range(100)]


def test_a_recorder_started_with_sigint_ignored_still_stops_on_it(broker, stream_name, tmp_path):
    # `slabcast record ... &` from a script: the shell ignores SIGINT for it, and Python then installs no
    # handler; `kill -INT` did nothing (a hung job). Both SIGINT and SIGTERM stop it, file complete, exit 0.
    pub = slabcast.Publisher(stream_name, dtype="int16", rate=1000.0, address=broker.address)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            out = tmp_path / f"take-{sig.name}"
            rec = subprocess.Popen(
                [sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(out), "--address",
                 broker.address], stderr=subprocess.PIPE, text=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # (hung: SIGABRT prints where, below)
            )  # fmt: skip
            try:
                wait_subscribed(broker.address, stream_name)
                # Its subscription shows in the broker before its Subscriber returns: a signal then interrupts
                # the set-up (exit 130, nothing recorded yet; CI caught it once). The recording exists once
                # info.json does (polled: the recorder sends no signal).
                deadline = time.monotonic() + 20
                while not (out / "info.json").exists():
                    assert time.monotonic() < deadline and rec.poll() is None, "the recording never began"
                    time.sleep(0.02)
                pub.write(np.arange(100, dtype=np.int16), t0=1.0)
                pub.flush()
                rec.send_signal(sig)
                try:
                    code = rec.wait(20)
                except subprocess.TimeoutExpired:  # (once in CI, SIGTERM: where it hangs, for the next time)
                    rec.send_signal(signal.SIGABRT)
                    rec.wait(10)
                    pytest.fail(f"the recorder did not stop on {sig.name} within 20 s:\n{rec.stderr.read()}")
                assert code == 0, rec.stderr.read()
            finally:
                if rec.poll() is None:
                    rec.kill()
                    rec.wait()
                rec.stderr.close()
            assert (out / "info.json").exists()
    finally:
        pub.close()


def test_a_pre_buffer_the_pool_cannot_hold_is_said_and_the_recording_starts_at_its_oldest_sample(
    broker, stream_name, tmp_path
):
    # A newcomer asked `record --pre-buffer 10` of a stream whose pool held 0.9 s: the file started 0.9 s back and
    # nothing said so.  The first chunk of a history cut short is flagged (protocol 8): the recorder says it.
    rate, frame = 1000.0, 100
    pub = slabcast.Publisher(stream_name, "float32", 1, rate, address=broker.address, slab_bytes=4096, nslabs=4,
                             max_chunk_bytes=1024)  # fmt: skip
    start = time.time() - 3.0
    for k in range(30):  # 3 s of the stream, on the wall clock, up to now: the pool holds about 1 s of it
        pub.write(np.full(frame, k, np.float32), t0=start + k * frame / rate)
    out = tmp_path / "pb.wav"
    rec = record_cli(broker.address, stream_name, out, "--pre-buffer", "10", "--seconds", "2")
    try:
        wait_subscribed(broker.address, stream_name)
        for k in range(30, 60):
            pub.write(np.full(frame, k, np.float32), t0=start + k * frame / rate)
        assert rec.wait(20) == 0, rec.stderr.read()
        said = rec.stderr.read()
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait(10)
        rec.stderr.close()
        pub.close()
    assert "the pool held less than the 10 s of --pre-buffer (about " in said, said
    back = slabcast.open_recording(str(out))
    first = float(back.samples[0, 0])
    assert 0 < first < 30 and float(back.samples[-1, 0]) >= first  # (from its oldest sample, not from the start)


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--seconds", "0", "seconds (--seconds) must be a finite number of seconds > 0 (or none: until the stream ends), got 0.0"),
    ("--seconds", "inf", "got inf"), ("--seconds", "nan", "got nan"),
    ("--pre-buffer", "-1", "pre_buffer (--pre-buffer) must be a finite number of seconds >= 0 (0: none), got -1.0"),
])  # fmt: skip
def test_a_length_of_no_time_is_refused_before_anything_is_written(broker, stream_name, tmp_path, option, value, said):
    # A newcomer's `record --seconds 0` wrote an empty file and exited 0.
    out = tmp_path / "zero.wav"
    with slabcast.Publisher(stream_name, address=broker.address):
        result = subprocess.run([sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(out),
                                 "--address", broker.address, option, value],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert said in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".wav", ".xdf"])  # (one stream's recorder, and the session's)
def test_a_length_shorter_than_one_sample_records_one_sample(broker, stream_name, tmp_path, suffix):
    # A lab newcomer: `record --seconds 0.001` of a 500 Hz stream (half a sample) wrote an empty file and exited 0,
    # where `Subscriber(seconds=)` gives at least one sample.
    if suffix == ".wav":
        pytest.importorskip("soundfile")
    from slabcast.client import record as record_module
    from tests.integration.test_record_xdf import wait_recorders

    out = tmp_path / f"tiny{suffix}"
    written: list[int] = []
    pub = slabcast.Publisher(stream_name, dtype="int16", rate=500.0, address=broker.address)
    recorder = threading.Thread(target=lambda: written.append(record_module.record(
        stream_name, str(out), seconds=0.001, address=broker.address, progress=False)), daemon=True)  # fmt: skip
    recorder.start()
    try:
        wait_recorders(broker.address, [stream_name])
        pub.write(np.arange(7, 17, dtype=np.int16), t0=0.0)
        recorder.join(30)
    finally:
        pub.close()
        recorder.join(30)
    assert written == [1]
    back = slabcast.open_recording(str(out), stream=stream_name) if suffix == ".xdf" else slabcast.open_recording(
        str(out))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(back.samples[:]).reshape(-1), [7])
