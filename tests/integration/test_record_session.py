"""Several streams into one Zarr group (issue 23, item 6) and the LSL clock in XDF recordings (item 5)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

import slabcast
from slabcast.client import record as record_module
from slabcast.client import record_session
from tests.integration.test_record_xdf import Lab, by_name, record_cli, wait_recorders

xarray = pytest.importorskip("xarray")
pyxdf = pytest.importorskip("pyxdf")


def record_lab(broker, stream_name, out, *extra, seconds=1.0, base=5000.0):
    lab = Lab(broker.address, stream_name, seconds=seconds, base=base)
    rec = record_cli(broker.address, [lab.eeg_name, lab.acc_name], out, *extra)
    wait_recorders(broker.address, [lab.eeg_name, lab.acc_name])
    lab.publish(0, lab.steps)
    lab.close()
    assert rec.wait(30) == 0, rec.stderr.read()
    rec.stderr.close()
    return lab


def test_several_streams_into_one_zarr_open_in_xarray_with_channel_labels(broker, stream_name, tmp_path):
    out = tmp_path / "session.zarr"
    lab = record_lab(broker, stream_name, out)
    eeg = xarray.open_zarr(str(out), group=lab.eeg_name, consolidated=False)
    assert eeg["samples"].dims == ("sample", "channel")
    assert list(eeg["channel"].values) == [f"E{k:02d}" for k in range(32)]
    np.testing.assert_array_equal(eeg["samples"].values, lab.eeg)
    np.testing.assert_array_equal(eeg["times"].values, lab.eeg_times)  # a stream with per-sample stamps
    np.testing.assert_array_equal(eeg["samples"].sel(channel="E05").values, lab.eeg[:, 5])
    acc = xarray.open_zarr(str(out), group=lab.acc_name, consolidated=False)
    assert list(acc["channel"].values) == ["X", "Y", "Z"] and acc.attrs["slabcast"]["channel_units"] == ["mg"] * 3
    np.testing.assert_array_equal(acc["samples"].values, lab.acc)
    assert set(record_module.recording_streams(str(out))) == {lab.eeg_name, lab.acc_name}
    back = slabcast.open_recording(str(out), stream=lab.acc_name)
    assert back.info.channel_names == ("X", "Y", "Z") and np.array_equal(np.asarray(back.samples[:]), lab.acc)
    with pytest.raises(ValueError, match="holds the streams"):
        slabcast.open_recording(str(out))


def test_an_xdf_on_the_lsl_clock_carries_the_measured_offsets(broker, stream_name, tmp_path):
    pylsl = pytest.importorskip("pylsl")
    import time

    out = tmp_path / "lsl.xdf"
    # Stamps on the wall clock, as slabcast's are: pyxdf fits the offsets against them (a line through them).
    lab = record_lab(broker, stream_name, out, "--clock", "lsl", base=time.time())
    offset = pylsl.local_clock() - time.time()
    raw = by_name(pyxdf.load_xdf(str(out), synchronize_clocks=False, dejitter_timestamps=False)[0])
    eeg = raw[lab.eeg_name]
    assert np.array_equal(eeg["time_stamps"], lab.eeg_times)  # as written: wall time
    assert len(eeg["clock_values"]) >= 2
    np.testing.assert_allclose(eeg["clock_values"], offset, rtol=0, atol=0.01)  # LSL clock - wall clock
    assert eeg["info"]["desc"][0]["slabcast"][0]["clock"] == ["lsl"]
    synced = by_name(pyxdf.load_xdf(str(out), dejitter_timestamps=False)[0])
    np.testing.assert_allclose(synced[lab.eeg_name]["time_stamps"], lab.eeg_times + offset, rtol=0, atol=0.01)
    np.testing.assert_allclose(synced[lab.acc_name]["time_stamps"], lab.acc_times + offset, rtol=0, atol=0.01)


def test_auto_clock_is_lsl_only_for_a_stream_an_lsl_source_feeds(monkeypatch):
    pytest.importorskip("pylsl")
    monkeypatch.setattr(record_session, "_lsl_fed", lambda streams, address: "eeg" in streams)
    assert record_session._session_clock("auto", ["eeg", "acc"], None) == "lsl"
    assert record_session._session_clock("auto", ["acc"], None) == "wall"
    assert record_session._session_clock("wall", ["eeg"], None) == "wall"
    with pytest.raises(ValueError, match="clock must be"):
        record_session._session_clock("gps", ["eeg"], None)


def test_a_session_naming_a_stream_that_never_appears_ends_in_an_error_naming_it(broker, stream_name, tmp_path):
    # A typo in one name (`slabcast record eg acc --out s.xdf`) recorded the others and exited 0: a session with
    # no EEG that looked like a success. It records the others and ends with exit 1, naming the missing stream.
    import signal

    pyxdf = pytest.importorskip("pyxdf")
    out = tmp_path / "s.xdf"
    pub = slabcast.Publisher(stream_name, dtype="float32", rate=100.0, address=broker.address)
    typo = stream_name[:-1]
    rec = record_cli(broker.address, [typo, stream_name], out)
    try:
        wait_recorders(broker.address, [stream_name])
        pub.write(np.arange(50, dtype=np.float32), t0=10.0)
        pub.close()  # its stream ends: its recorder reads it to the end and leaves; the typo's waits until told
        deadline = time.monotonic() + 20
        while any(s["name"] == stream_name for s in slabcast.broker_status(broker.address)["streams"]):
            assert time.monotonic() < deadline, "the recorder never read the stream to its end"
            time.sleep(0.05)  # polling the broker's status: the only signal a separate CLI process gives
        rec.send_signal(signal.SIGINT)
        assert rec.wait(30) == 1
        err = rec.stderr.read()
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
        rec.stderr.close()
    assert f"{typo!r} never appeared on the broker" in err and f"did you mean {stream_name!r}?" in err, err
    (got,) = pyxdf.load_xdf(str(out))[0]
    assert got["info"]["name"] == [stream_name] and np.array_equal(got["time_series"][:, 0], np.arange(50))


def test_under_seconds_a_session_ends_without_a_stream_that_never_appears(broker, stream_name, tmp_path):
    # With --seconds, the recorder of a mistyped name waited for its stream forever and the session never
    # ended; it ends once every stream there is has its --seconds, with the error naming the missing one.
    pyxdf = pytest.importorskip("pyxdf")
    out = tmp_path / "s.xdf"
    with slabcast.Publisher(stream_name, dtype="float32", rate=100.0, address=broker.address) as pub:
        pub.write(np.arange(100, dtype=np.float32), t0=10.0)  # 1 s, taken from the pool by the pre-buffer
        with pytest.raises(slabcast.StreamNotFoundError, match=rf"'{stream_name}x' never appeared on the broker"):
            record_module.record([stream_name, stream_name + "x"], str(out), seconds=0.5, address=broker.address,
                                 progress=False, pre_buffer=5)  # fmt: skip
    (got,) = pyxdf.load_xdf(str(out))[0]
    assert np.array_equal(got["time_series"][:, 0], np.arange(50))


@pytest.mark.parametrize("suffix", [".xdf", ".zarr"])
def test_a_session_none_of_whose_streams_appeared_leaves_no_file(broker, stream_name, tmp_path, suffix):
    # Stopped while it waited for streams that never came (or with no broker at all), it left an XDF header or
    # an empty store behind, which the next try refused as existing; and said it had recorded 0 samples there.
    import signal
    import threading

    out = tmp_path / f"s{suffix}"
    rec = record_cli(broker.address, [stream_name + "a", stream_name + "b"], out)
    seen: list[str] = []
    waiting = threading.Event()

    def read() -> None:
        assert rec.stderr is not None
        while ch := rec.stderr.read(1):
            seen.append(ch)
            if "waiting for the streams" in "".join(seen[-40:]):
                waiting.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert waiting.wait(30), "".join(seen)
        assert out.exists()  # (made before the streams are waited for)
        rec.send_signal(signal.SIGINT)
        code = rec.wait(30)
        reader.join(10)
        assert code == 1, "".join(seen)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
        rec.stderr.close()
    err = "".join(seen)
    assert f"nothing was recorded ({out} was not kept)" in err and "recorded 0 samples" not in err, err
    assert not out.exists()
    with pytest.raises(slabcast.BrokerGoneError, match="no broker"):
        record_module.record([stream_name + "a", stream_name + "b"], str(out), address=f"ipc://{tmp_path}/no.sock",
                             progress=False)  # fmt: skip
    assert not out.exists()
    cli = subprocess.run([sys.executable, "-m", "slabcast", "record", "a", "b", "--out", str(out), "--address",
                          f"ipc://{tmp_path}/no.sock"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 1 and cli.stderr.startswith("slabcast: no broker at"), cli.stderr  # (no line before)
    assert not out.exists()


def test_under_seconds_a_session_of_markers_and_a_missing_stream_ends_with_the_markers(broker, stream_name, tmp_path):
    # Streams without a rate wait for every stream of the session (one may turn out to have a rate): a
    # mistyped one held the markers back for ever. --seconds after the session began recording, it is not
    # coming: the markers are written and the error names it.
    pyxdf = pytest.importorskip("pyxdf")
    out = tmp_path / "m.xdf"
    with slabcast.MarkerPublisher(stream_name, address=broker.address) as pub:
        pub.write(["a", "b"], times=[10.0, 11.0])
        with pytest.raises(slabcast.StreamNotFoundError, match=rf"'{stream_name}x' never appeared on the broker"):
            record_module.record([stream_name, stream_name + "x"], str(out), seconds=0.5, address=broker.address,
                                 progress=False, pre_buffer=5)  # fmt: skip
    (got,) = pyxdf.load_xdf(str(out))[0]
    assert got["time_series"] == [["a"], ["b"]] and list(got["time_stamps"]) == [10.0, 11.0]
