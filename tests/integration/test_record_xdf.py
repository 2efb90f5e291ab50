"""XDF recordings (issue 23, items 1 and 5): several streams in one file, read back by pyxdf sample for sample,
stamp for stamp, with each stream's labels; a kill -9 of the recorder leaves a file pyxdf reads; replay."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import slabcast
from slabcast.client.record import recording_streams
from slabcast.client.record_xdf import read_xdf

pyxdf = pytest.importorskip("pyxdf")

EEG_RATE, ACC_RATE = 500.0, 100.0
EEG_LABELS = [f"E{k:02d}" for k in range(32)]


def record_cli(address, streams, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "slabcast", "record", *streams, "--out", str(out),
                             "--address", address, *extra], stderr=subprocess.PIPE, text=True)  # fmt: skip


def finished(rec):
    """Wait for a recorder started by record_cli to exit: (exit code, what it said on stderr)."""
    code = rec.wait(30)
    said = rec.stderr.read()
    rec.stderr.close()
    return code, said


def wait_recorders(address, names):
    deadline = time.monotonic() + 20
    while True:
        streams = {s["name"]: s for s in slabcast.broker_status(address)["streams"]}
        if all(n in streams and any(u["label"] == f"record:{n}" for u in streams[n]["subscribers"]) for n in names):
            return
        assert time.monotonic() < deadline, "the recorder never subscribed to every stream"
        time.sleep(0.05)  # polling the broker's status: the only signal a separate CLI process gives


class Lab:
    """A 32-channel EEG at 500 Hz (per-sample stamps, jittered, as an LSL source gives them) and a 3-axis
    accelerometer at 100 Hz (no per-sample stamps: t0 + k / rate), published 0.1 s at a time."""

    def __init__(self, address, name, seconds, base=5000.0):
        rng = np.random.default_rng(23)
        self.eeg_name, self.acc_name = name + "eeg", name + "acc"
        n_eeg, n_acc = int(seconds * EEG_RATE), int(seconds * ACC_RATE)
        self.eeg = (rng.standard_normal((n_eeg, 32)) * 50).astype(np.float32)
        self.eeg_times = base + np.arange(n_eeg) / EEG_RATE + rng.uniform(-1e-4, 1e-4, n_eeg)
        self.acc = rng.integers(-2000, 2000, (n_acc, 3)).astype(np.int16)
        self.acc_times = base + np.arange(n_acc) / ACC_RATE
        self.eeg_pub = slabcast.Publisher(self.eeg_name, "float32", 32, EEG_RATE, address=address,
                                          channel_names=EEG_LABELS, channel_types=["EEG"] * 32,
                                          channel_units=["microvolts"] * 32, source_id="amp-1234",
                                          timestamps=True)  # fmt: skip
        self.acc_pub = slabcast.Publisher(self.acc_name, "int16", 3, ACC_RATE, address=address,
                                          channel_names=["X", "Y", "Z"], channel_types=["ACC"] * 3,
                                          channel_units=["mg"] * 3)  # fmt: skip
        self.steps = int(seconds * 10)

    def publish(self, start, stop, pace=0.0):
        t = time.monotonic()
        for k in range(start, stop):
            e, a = slice(k * 50, (k + 1) * 50), slice(k * 10, (k + 1) * 10)
            self.eeg_pub.write(self.eeg[e], times=self.eeg_times[e])
            self.acc_pub.write(self.acc[a], t0=self.acc_times[a.start])
            if pace:  # a live device: 0.1 s of samples every 0.1 s of wall time
                time.sleep(max(0.0, t + (k - start + 1) * pace - time.monotonic()))
        self.eeg_pub.flush()
        self.acc_pub.flush()

    def close(self):
        self.eeg_pub.close()
        self.acc_pub.close()


def by_name(streams):
    return {s["info"]["name"][0]: s for s in streams}


def test_eeg_and_accelerometer_in_one_xdf_read_by_pyxdf_with_every_sample_stamp_and_label(broker, stream_name,
                                                                                         tmp_path):  # fmt: skip
    out = tmp_path / "session.xdf"
    lab = Lab(broker.address, stream_name, seconds=6.0)
    rec = record_cli(broker.address, [lab.eeg_name, lab.acc_name], out)
    wait_recorders(broker.address, [lab.eeg_name, lab.acc_name])
    lab.publish(0, lab.steps, pace=0.1)  # 6 s of wall time: ClockOffset chunks at 0 and 5 s, and at the end
    lab.close()
    assert rec.wait(30) == 0, rec.stderr.read()
    rec.stderr.close()
    streams, header = pyxdf.load_xdf(str(out), synchronize_clocks=False, dejitter_timestamps=False)
    assert header["info"]["version"] == ["1.0"]
    got = by_name(streams)
    eeg, acc = got[lab.eeg_name], got[lab.acc_name]
    assert eeg["time_series"].dtype == np.float32 and np.array_equal(eeg["time_series"], lab.eeg)
    assert np.array_equal(eeg["time_stamps"], lab.eeg_times)  # every sample's own stamp, bit-exact
    assert np.array_equal(acc["time_series"], lab.acc)
    np.testing.assert_allclose(acc["time_stamps"], lab.acc_times, rtol=0, atol=1e-9)
    channels = eeg["info"]["desc"][0]["channels"][0]["channel"]
    assert [c["label"][0] for c in channels] == EEG_LABELS
    assert {c["type"][0] for c in channels} == {"EEG"} and {c["unit"][0] for c in channels} == {"microvolts"}
    assert [c["label"][0] for c in acc["info"]["desc"][0]["channels"][0]["channel"]] == ["X", "Y", "Z"]
    assert eeg["info"]["nominal_srate"] == ["500.0"] and eeg["info"]["source_id"] == ["amp-1234"]
    assert eeg["info"]["channel_format"] == ["float32"] and acc["info"]["channel_format"] == ["int16"]
    assert eeg["footer"]["info"]["sample_count"] == [str(len(lab.eeg))]
    # ClockOffset chunks every 5 s (wall clock: offset 0), one at the start and one at the end.
    assert len(eeg["clock_times"]) >= 3 and set(eeg["clock_values"]) == {0.0}
    assert np.all(np.diff(eeg["clock_times"]) > 0)
    # pyxdf's defaults (clock synchronisation, dejittering) read it too.
    synced = by_name(pyxdf.load_xdf(str(out))[0])
    assert np.array_equal(synced[lab.eeg_name]["time_series"], lab.eeg)
    # slabcast reads it back: the stream info, the samples, the stamps.
    assert set(recording_streams(str(out))) == {lab.eeg_name, lab.acc_name}  # in the order they appeared
    back = slabcast.open_recording(str(out), stream=lab.eeg_name)
    assert back.info.channel_names == tuple(EEG_LABELS) and back.info.channel_units[0] == "microvolts"
    assert back.info.rate == EEG_RATE and back.info.timestamps
    assert np.array_equal(back.samples, lab.eeg) and np.array_equal(back.times, lab.eeg_times)
    with pytest.raises(ValueError, match="holds the streams"):
        slabcast.open_recording(str(out))


def test_a_kill_9_halfway_leaves_an_xdf_pyxdf_reads_up_to_the_last_chunk(broker, stream_name, tmp_path):
    out = tmp_path / "crash.xdf"
    lab = Lab(broker.address, stream_name, seconds=4.0)
    rec = record_cli(broker.address, [lab.eeg_name, lab.acc_name], out)
    wait_recorders(broker.address, [lab.eeg_name, lab.acc_name])
    lab.publish(0, lab.steps // 2)
    deadline = time.monotonic() + 10
    while True:  # until the recorder has written the first half: every chunk goes out as it comes
        got = read_xdf(str(out)) if out.exists() else {}
        if (
            all(n in got for n in (lab.eeg_name, lab.acc_name))
            and len(got[lab.eeg_name].samples) == 1000
            and len(got[lab.acc_name].samples) == 200
        ):
            break
        assert time.monotonic() < deadline, "the first half never reached the file"
        time.sleep(0.05)  # polling the file; the recorder sends no signal
    rec.send_signal(signal.SIGKILL)
    rec.wait(10)
    rec.stderr.close()
    lab.publish(lab.steps // 2, lab.steps)  # the second half: nobody records it
    lab.close()
    streams = by_name(pyxdf.load_xdf(str(out), synchronize_clocks=False, dejitter_timestamps=False)[0])
    eeg, acc = streams[lab.eeg_name], streams[lab.acc_name]
    assert np.array_equal(eeg["time_series"], lab.eeg[:1000]) and np.array_equal(eeg["time_stamps"],
                                                                                  lab.eeg_times[:1000])  # fmt: skip
    assert np.array_equal(acc["time_series"], lab.acc[:200])
    assert "footer" not in eeg  # killed: no footer, and nothing else missing
    recording = slabcast.open_recording(str(out), stream=lab.acc_name)
    assert np.array_equal(recording.samples, lab.acc[:200])


def test_an_xdf_replays_and_records_again_bit_exact(broker, stream_name, tmp_path):
    out = tmp_path / "take.xdf"
    lab = Lab(broker.address, stream_name, seconds=1.0)
    rec = record_cli(broker.address, [lab.eeg_name, lab.acc_name], out)
    wait_recorders(broker.address, [lab.eeg_name, lab.acc_name])
    lab.publish(0, lab.steps)
    lab.close()
    assert rec.wait(30) == 0, rec.stderr.read()
    rec.stderr.close()
    again = tmp_path / "again.xdf"
    spec = f"replay:path={out},stream={lab.eeg_name},name={stream_name}r,speed=100,wait_for=1"
    with slabcast.BrokerProcess(tmp_path / "r.sock", args=("--source", spec)) as second:
        rec2 = record_cli(second.address, [stream_name + "r"], again)
        code = rec2.wait(30)
        assert code == 0, rec2.stderr.read() + second.stderr()
        rec2.stderr.close()
    replayed = slabcast.open_recording(str(again))
    assert replayed.info.channel_names == tuple(EEG_LABELS) and replayed.info.timestamps
    assert np.array_equal(replayed.samples, lab.eeg) and np.array_equal(replayed.times, lab.eeg_times)


def test_xdf_refuses_what_it_cannot_hold_and_other_formats_take_one_stream(broker, stream_name, tmp_path):
    pub = slabcast.Publisher(stream_name, "complex64", 1, 100.0, address=broker.address)
    rec = record_cli(broker.address, [stream_name], tmp_path / "c.xdf")
    assert rec.wait(30) == 2
    said = rec.stderr.read()
    rec.stderr.close()
    assert "complex64" in said and "XDF holds float32" in said, said
    assert not (tmp_path / "c.xdf").exists()
    pub.close()
    two = subprocess.run([sys.executable, "-m", "slabcast", "record", "a", "b", "--out", str(tmp_path / "t.wav"),
                          "--address", broker.address], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert two.returncode == 2 and "takes one stream" in two.stderr, two.stderr


def test_the_xdf_file_task_callable_writes_a_stream_pyxdf_reads(broker, stream_name, tmp_path):
    from slabcast import examples

    out = tmp_path / "{stream}.xdf"
    lab = Lab(broker.address, stream_name, seconds=1.0)
    sub = slabcast.Subscriber(lab.eeg_name, 100, policy="block", address=broker.address, partial_tail=True)
    lab.publish(0, lab.steps)
    lab.close()
    try:
        while True:
            with sub.recv(timeout=10) as chunk:
                examples.xdf_file(chunk, out=str(out))
    except slabcast.EndOfStream:
        pass
    sub.close()
    examples._close_xdf()  # what the worker's exit does
    path = tmp_path / f"{lab.eeg_name}.xdf"
    (eeg,), _ = pyxdf.load_xdf(str(path), synchronize_clocks=False, dejitter_timestamps=False)
    assert np.array_equal(eeg["time_series"], lab.eeg) and np.array_equal(eeg["time_stamps"], lab.eeg_times)
    assert eeg["footer"]["info"]["sample_count"] == [str(len(lab.eeg))]


def test_an_xdf_recording_goes_on_across_a_flagged_discontinuity_as_labrecorder_does(broker, stream_name, tmp_path):
    # A lab newcomer: an LSL outlet restarted (its source flags the next chunk `discontinuity`) and the XDF
    # recording ended there, exit 1; LabRecorder records across a restart.  Each sample's stamp shows the gap; a
    # stream with a rate and no per-sample stamps too (t0 per chunk); a `.wav` still ends there.
    out = tmp_path / "across.xdf"
    eeg, acc = stream_name + "eeg", stream_name + "acc"
    eeg_pub = slabcast.Publisher(eeg, "float32", 2, EEG_RATE, address=broker.address, timestamps=True)
    acc_pub = slabcast.Publisher(acc, "int16", 1, ACC_RATE, address=broker.address)
    rec = record_cli(broker.address, [eeg, acc], out)
    wait_recorders(broker.address, [eeg, acc])
    before, after = np.arange(200, dtype=np.float32).reshape(100, 2), -np.arange(200, dtype=np.float32).reshape(100, 2)
    stamps = np.concatenate([100.0 + np.arange(100) / EEG_RATE, 130.0 + np.arange(100) / EEG_RATE])  # 30 s away
    eeg_pub.write(before, times=stamps[:100])
    acc_pub.write(np.arange(20, dtype=np.int16), t0=100.0)
    eeg_pub.write(after, times=stamps[100:], discontinuity=True)  # the outlet came back 30 s later
    acc_pub.write(np.arange(20, 40, dtype=np.int16), t0=130.0, discontinuity=True)
    eeg_pub.close()
    acc_pub.close()
    code, said = finished(rec)
    assert code == 0, said
    assert (f"{eeg}: recorded across 1 discontinuity with a time gap (its source restarted or reconnected) at "
            f"stream index 100 (100 in the file)") in said  # fmt: skip
    got = by_name(pyxdf.load_xdf(str(out), synchronize_clocks=False, dejitter_timestamps=False)[0])
    assert np.array_equal(got[eeg]["time_series"], np.concatenate([before, after]))
    assert np.array_equal(got[eeg]["time_stamps"], stamps)
    assert np.array_equal(got[acc]["time_series"][:, 0], np.arange(40))
    np.testing.assert_allclose(got[acc]["time_stamps"], np.concatenate([100.0 + np.arange(20) / ACC_RATE,
                                                                       130.0 + np.arange(20) / ACC_RATE]),
                               rtol=0, atol=1e-9)  # fmt: skip


def test_an_xdf_recording_ends_at_a_discontinuity_whose_stamps_go_on_as_if_contiguous(broker, stream_name, tmp_path):
    # A reviewer: a looping file source flags each lap, its stamps going on without a gap; written across, the
    # laps read as one contiguous take.  Without a time gap the recording ends there, as every format does.
    out = tmp_path / "lap.xdf"
    pub = slabcast.Publisher(stream_name, "int16", 1, 100.0, address=broker.address)
    rec = record_cli(broker.address, [stream_name], out)
    wait_recorders(broker.address, [stream_name])
    pub.write(np.arange(50, dtype=np.int16), t0=10.0)
    pub.write(np.arange(50, dtype=np.int16), t0=10.5, discontinuity=True)  # the next lap, stamped on
    pub.close()
    code, said = finished(rec)
    assert code == 1 and "ended at a discontinuity at index 50" in said, said
    got = by_name(pyxdf.load_xdf(str(out), synchronize_clocks=False, dejitter_timestamps=False)[0])
    assert np.array_equal(got[stream_name]["time_series"][:, 0], np.arange(50))


def test_markers_within_the_signals_span_are_all_recorded_when_the_signal_has_a_gap(broker, stream_name, tmp_path):
    # A lab newcomer: `record eeg events --seconds 30` with an outlet that was away twice.  The EEG, counted in
    # samples, recorded past 30 s of stamps; the markers stopped after 30 s of their own, and the last ones
    # stamped within the EEG's span were missing.  A stream without a rate ends with the session's signals.
    out = tmp_path / "gap.xdf"
    eeg, events = stream_name + "eeg", stream_name + "ev"
    eeg_pub = slabcast.Publisher(eeg, "float32", 1, 100.0, address=broker.address, timestamps=True)
    ev_pub = slabcast.MarkerPublisher(events, address=broker.address)
    rec = record_cli(broker.address, [eeg, events], out, "--seconds", "2")
    wait_recorders(broker.address, [eeg, events])
    stamps = np.concatenate([100.0 + np.arange(100) / 100.0, 110.0 + np.arange(200) / 100.0])  # away 9 s
    eeg_pub.write(np.arange(100, dtype=np.float32), times=stamps[:100])
    ev_pub.write(["a", "b"], times=[100.5, 105.0])  # b: while the outlet was away
    eeg_pub.write(np.arange(100, 150, dtype=np.float32), times=stamps[100:150], discontinuity=True)
    deadline = time.monotonic() + 20
    while True:  # until the recorder has written both (an XDF chunk is written whole as it comes)
        try:
            got = by_name(pyxdf.load_xdf(str(out), synchronize_clocks=False, dejitter_timestamps=False)[0])
            if events in got and len(got[events]["time_stamps"]) == 2:
                break
        except Exception:  # (a file not yet written whole)
            pass
        assert time.monotonic() < deadline, "the recorder never wrote the first markers"
        time.sleep(0.05)  # polling the file: the only signal a separate CLI process gives
    ev_pub.write(["c"], times=[110.8])  # within the EEG's span: its 200th sample is at 110.99
    eeg_pub.write(np.arange(150, 300, dtype=np.float32), times=stamps[150:])
    eeg_pub.close()
    ev_pub.close()
    code, said = finished(rec)
    assert code == 0, said
    got = by_name(pyxdf.load_xdf(str(out), synchronize_clocks=False, dejitter_timestamps=False)[0])
    assert len(got[eeg]["time_stamps"]) == 200 and got[eeg]["time_stamps"][-1] == stamps[199]
    assert [m[0] for m in got[events]["time_series"]] == ["a", "b", "c"]
