"""Marker streams (issue 23, item 2) through real brokers, recorders, LSL outlets and the view: every string and
every stamp exact, and the lab's session (EEG, accelerometer, markers) in one XDF that pyxdf (and MNE) read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import slabcast
from slabcast.client.markers import decode_markers
from tests.integration.test_record_xdf import EEG_LABELS, EEG_RATE, Lab, by_name, record_cli, wait_recorders

TEXTS = ["start", "stim/left", "réponse ✓", "stim/right", "", "x" * 64]


def test_markers_reach_subscribers_with_their_own_stamps_and_nothing_breaks(broker, stream_name):
    pub = slabcast.MarkerPublisher(stream_name, source_id="exp-1", address=broker.address)
    assert (pub.dtype, pub.channels, pub.rate, pub.timestamps) == (np.dtype("S64"), 1, None, True)
    sub = slabcast.Subscriber(stream_name, 1, address=broker.address)
    window = slabcast.Window(stream_name, samples=4, address=broker.address)
    assert sub.info.channel_types == ("Markers",) and sub.info.channel_names == ("marker",)
    stamps = 1000.0 + np.array([0.0, 0.125, 0.5, 0.75, 1.0, 2.5])
    pub.write(TEXTS[:2], times=stamps[:2])
    with pytest.raises(ValueError, match=r"marker 1 is 65 bytes in UTF-8, longer than stream .* \(64 bytes"):
        pub.write(["fine", "y" * 65], times=[1.5, 1.6])  # nothing of it is written
    for text, t in zip(TEXTS[2:], stamps[2:], strict=True):
        pub.write(text, t0=t)  # one str: one marker, at t0
    before = time.time()
    pub.write("now")  # no time given: stamped now
    pub.flush()
    got, times = [], []
    while len(got) < len(TEXTS) + 1:
        with sub.recv(timeout=10) as chunk:
            assert chunk.data.dtype == np.dtype("S64")
            got += chunk.markers
            times += chunk.times.tolist()
    assert got == [*TEXTS, "now"]
    assert times[:-1] == stamps.tolist() and before <= times[-1] <= time.time()
    # The broker keeps no statistics of strings, and says so without error; status and top show the stream.
    stats = slabcast.stream_statistics(stream_name, address=broker.address)
    assert stats.samples == 7 and stats.window_seconds == 0.0 and stats.mean == ()
    status = subprocess.run([sys.executable, "-m", "slabcast", "status", "--address", broker.address],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert status.returncode == 0 and f"stream {stream_name}: |S64 x 1, no rate, 7 samples" in status.stdout
    # A Window of samples holds the newest markers; an envelope of strings is refused by name.
    assert window.wait(7, timeout=10)
    data, wtimes = window.get()
    assert decode_markers(data[0]) == [*TEXTS[3:], "now"] and wtimes[:3].tolist() == stamps[3:].tolist()
    with pytest.raises(TypeError, match=r"is a marker stream .*no min/max envelope"):
        window.get_display(100)
    with pytest.raises(ValueError, match="needs a stream with a rate"):
        slabcast.Window(stream_name, 2.0, address=broker.address)
    window.close()
    pub.close()
    sub.close()


def test_a_plain_publisher_of_bytes_is_a_marker_stream_too(broker, stream_name):
    # What a C or raw client does: dtype S16, statistics asked for (the broker skips them for strings).
    pub = slabcast.Publisher(stream_name, "S16", address=broker.address, timestamps=True, statistics=10.0)
    sub = slabcast.Subscriber(stream_name, 2, clip=True, address=broker.address)
    pub.write(np.array([b"a", "é".encode(), b"c"], dtype="S16"), times=[1.0, 2.0, 3.0])
    with sub.recv(timeout=10) as chunk:
        assert chunk.markers == ["a", "é"] and chunk.times.tolist() == [1.0, 2.0]
    with pytest.raises(TypeError, match=r"numeric numpy dtype .* or fixed-width bytes S<N>.*text goes in S<N>"):
        slabcast.Publisher(stream_name + "u", "<U8", address=broker.address)
    pub.close()
    sub.close()


def lab_with_markers(broker, name, seconds, base=5000.0):
    """The lab of test_record_xdf (EEG 32 x 500 Hz, accelerometer 3 x 100 Hz) and a marker stream, whose
    markers fall in the same span: one per ``seconds / len(TEXTS)``."""
    lab = Lab(broker.address, name, seconds=seconds, base=base)
    lab.mk_name = name + "mk"
    lab.mk_pub = slabcast.MarkerPublisher(lab.mk_name, source_id="psychopy-1", address=broker.address)
    lab.mk_times = base + 0.05 + np.arange(len(TEXTS)) * (seconds / len(TEXTS))
    return lab


def publish_with_markers(lab, markers=True):
    """0.1 s of EEG and accelerometer at a time, each marker with the step its stamp falls in."""
    for k in range(lab.steps):
        lab.publish(k, k + 1)
        due = [i for i, t in enumerate(lab.mk_times) if k / 10 <= t - lab.eeg_times[0] < (k + 1) / 10]
        if markers and due:
            lab.mk_pub.write([TEXTS[i] for i in due], times=lab.mk_times[due])
    lab.mk_pub.flush()


def record_lab_session(broker, stream_name, out, seconds):
    """The lab's session recorded by `slabcast record` into ``out`` (every stream to its end); the lab."""
    lab = lab_with_markers(broker, stream_name, seconds=seconds)
    names = [lab.eeg_name, lab.acc_name, lab.mk_name]
    rec = record_cli(broker.address, names, out)
    wait_recorders(broker.address, names)
    publish_with_markers(lab)
    lab.close()
    lab.mk_pub.close()
    assert rec.wait(30) == 0, rec.stderr.read()
    rec.stderr.close()
    return lab


def test_the_lab_session_eeg_accelerometer_and_markers_in_one_xdf_read_by_pyxdf(broker, stream_name, tmp_path):
    pyxdf = pytest.importorskip("pyxdf")
    out = tmp_path / "session.xdf"
    lab = record_lab_session(broker, stream_name, out, seconds=3.0)
    for synchronize in (False, True):  # as written, and with pyxdf's defaults (clock sync, dejittering)
        got = by_name(pyxdf.load_xdf(str(out), synchronize_clocks=synchronize, dejitter_timestamps=synchronize)[0])
        eeg, acc, mk = got[lab.eeg_name], got[lab.acc_name], got[lab.mk_name]
        assert np.array_equal(eeg["time_series"], lab.eeg) and np.array_equal(acc["time_series"], lab.acc)
        assert mk["time_series"] == [[t] for t in TEXTS]  # every marker, a list of strings per sample
        assert np.array_equal(mk["time_stamps"], lab.mk_times)  # each with its own stamp, bit-exact
        if not synchronize:
            assert np.array_equal(eeg["time_stamps"], lab.eeg_times)
    info = mk["info"]
    assert (info["channel_format"], info["nominal_srate"], info["type"]) == (["string"], ["0.0"], ["Markers"])
    assert info["source_id"] == ["psychopy-1"] and mk["footer"]["info"]["sample_count"] == [str(len(TEXTS))]
    labels = [c["label"][0] for c in eeg["info"]["desc"][0]["channels"][0]["channel"]]
    assert labels == EEG_LABELS
    # slabcast reads the markers back, and replays them with their stamps.
    back = slabcast.open_recording(str(out), stream=lab.mk_name)
    assert back.info.dtype == np.dtype("S64") and decode_markers(back.samples) == TEXTS
    assert np.array_equal(back.times, lab.mk_times)
    spec = f"replay:path={out},stream={lab.mk_name},name={stream_name}r,speed=20,wait_for=1"
    with slabcast.BrokerProcess(tmp_path / "r.sock", args=("--source", spec)) as second:
        sub = slabcast.Subscriber(stream_name + "r", 1, address=second.address, wait=20)
        replayed, stamps = [], []
        for chunk in sub:
            with chunk:
                replayed += chunk.markers
                stamps += chunk.times.tolist()
        sub.close()
    assert replayed == TEXTS and stamps == lab.mk_times.tolist()


def test_mne_reads_the_lab_session_through_pyxdf_with_the_markers_as_annotations(broker, stream_name, tmp_path):
    pyxdf = pytest.importorskip("pyxdf")
    mne = pytest.importorskip("mne")
    out = tmp_path / "session.xdf"
    lab = record_lab_session(broker, stream_name, out, seconds=2.0)
    # As docs/lsl.md ("Markers") shows it, on the stamps as written.
    got = by_name(pyxdf.load_xdf(str(out), synchronize_clocks=False, dejitter_timestamps=False)[0])
    eeg, mk = got[lab.eeg_name], got[lab.mk_name]
    labels = [c["label"][0] for c in eeg["info"]["desc"][0]["channels"][0]["channel"]]
    raw = mne.io.RawArray(eeg["time_series"].T * 1e-6, mne.create_info(labels, EEG_RATE, "eeg"), verbose=False)
    raw.set_annotations(mne.Annotations(mk["time_stamps"] - eeg["time_stamps"][0], 0.0,
                                        [m[0] for m in mk["time_series"]]))  # fmt: skip
    assert raw.ch_names == EEG_LABELS and raw.n_times == len(lab.eeg)
    assert np.allclose(raw.get_data(), lab.eeg.T * 1e-6)
    assert list(raw.annotations.description) == TEXTS
    # (MNE keeps onsets to the microsecond.)
    np.testing.assert_allclose(raw.annotations.onset, lab.mk_times - lab.eeg_times[0], rtol=0, atol=1e-6)


def test_seconds_ends_a_session_whose_marker_stream_stays_silent(broker, stream_name, tmp_path):
    pyxdf = pytest.importorskip("pyxdf")
    out = tmp_path / "short.xdf"
    lab = lab_with_markers(broker, stream_name, seconds=2.0)
    names = [lab.eeg_name, lab.mk_name]
    rec = record_cli(broker.address, names, out, "--seconds", "1")
    wait_recorders(broker.address, names)
    publish_with_markers(lab)  # markers at 0.05, 0.38, 0.72 s (inside the first second), 1.05, 1.38, 1.72 s
    # Every publisher stays open and the markers silent: the recording ends at the EEG's last stamp recorded.
    assert rec.wait(30) == 0, rec.stderr.read()
    rec.stderr.close()
    got = by_name(pyxdf.load_xdf(str(out), synchronize_clocks=False)[0])
    assert np.array_equal(got[lab.eeg_name]["time_series"], lab.eeg[:500])
    inside = lab.mk_times <= lab.eeg_times[499]
    assert inside.sum() == 3 and got[lab.mk_name]["time_series"] == [[t] for t in np.array(TEXTS)[inside]]
    lab.close()
    lab.mk_pub.close()


def test_a_marker_stream_alone_to_zarr_and_never_to_wav(broker, stream_name, tmp_path):
    pub = slabcast.MarkerPublisher(stream_name, max_bytes=16, address=broker.address)
    wav = subprocess.run([sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(tmp_path / "m.wav"),
                          "--address", broker.address], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert wav.returncode == 2 and "WAV holds audio; this is a marker stream (|S16" in wav.stderr, wav.stderr
    assert not (tmp_path / "m.wav").exists() and "Traceback" not in wav.stderr
    out = tmp_path / "m.zarr"
    rec = record_cli(broker.address, [stream_name], out, "--seconds", "1.5")
    wait_recorders(broker.address, [stream_name])
    pub.write(["a", "b ✓"], times=[10.0, 10.5])
    pub.write("c", t0=11.0)
    pub.flush()
    assert rec.wait(30) == 0, rec.stderr.read()  # silent after: --seconds of wall time ends it
    rec.stderr.close()
    back = slabcast.open_recording(str(out))
    assert back.info.dtype == np.dtype("S16") and decode_markers(back.samples) == ["a", "b ✓", "c"]
    assert back.times.tolist() == [10.0, 10.5, 11.0]
    xarray = pytest.importorskip("xarray")
    ds = xarray.open_zarr(str(out), consolidated=False)
    assert [str(v) for v in ds["samples"].values[:, 0]] == ["a", "b ✓", "c"]  # strings for any Zarr reader
    pub.close()


def test_an_lsl_string_outlet_becomes_a_marker_stream_with_every_stamp(tmp_path, stream_name):
    pylsl = pytest.importorskip("pylsl")
    lsl_name = f"mk-{stream_name}"
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(lsl_name, "Markers", 1, 0, "string", f"src-{stream_name}"))
    spec = f"lsl:name={stream_name},stream={lsl_name},timeout=2,max_bytes=16"
    with slabcast.BrokerProcess(tmp_path / "b.sock", args=("--source", spec), startup_timeout=30) as broker:
        sub = slabcast.Subscriber(stream_name, 1, address=broker.address, wait=20)
        info = sub.info
        assert (info.dtype, info.rate, info.timestamps, info.channel_types) == (np.dtype("S16"), None, True,
                                                                                 ("Markers",))  # fmt: skip
        assert info.source_id == f"src-{stream_name}" and info.channel_names == ("marker",)
        assert outlet.wait_for_consumers(10)
        base = pylsl.local_clock()
        texts = ["trial 1", "réponse ✓", "", "a" * 15 + "é"]  # the last is 17 bytes: cut at "é"
        stamps = base + np.array([0.0, 0.2501, 0.5, 1.75])
        for text, stamp in zip(texts, stamps, strict=True):
            outlet.push_sample([text], stamp)
        offset = time.time() - pylsl.local_clock()
        got, times = [], []
        while len(got) < len(texts):
            with sub.recv(timeout=10) as chunk:
                got += chunk.markers
                times += chunk.times.tolist()
        assert got == [*texts[:3], "a" * 15]
        np.testing.assert_allclose(times, stamps + offset, rtol=0, atol=0.005)
        assert np.allclose(np.diff(times), np.diff(stamps), rtol=0, atol=1e-6)  # each marker's own LSL stamp
        sub.close()
    err = broker.stderr()
    assert "a marker of 17 bytes is longer than max_bytes=16, cut there" in err and "Traceback" not in err
    del outlet


def test_lsl_out_serves_markers_as_an_lsl_string_outlet(broker, stream_name):
    pylsl = pytest.importorskip("pylsl")
    lsl_name = f"out-{stream_name}"
    pub = slabcast.MarkerPublisher(stream_name, address=broker.address)
    proc = subprocess.Popen([sys.executable, "-m", "slabcast", "lsl-out", stream_name, "--name", lsl_name,
                             "--address", broker.address], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        found = pylsl.resolve_byprop("name", lsl_name, 1, 20)
        assert found, "the outlet never appeared"
        inlet = pylsl.StreamInlet(found[0])
        full = inlet.info(10)
        assert (full.channel_format(), full.nominal_srate(), full.type()) == (pylsl.cf_string, 0.0, "Markers")
        inlet.open_stream(10)
        time.sleep(0.5)  # LSL's inlet needs a moment after open_stream before it receives (no signal exists)
        t0 = time.time()
        stamps = t0 + np.array([0.0, 0.01, 0.3])
        pub.write(TEXTS[:3], times=stamps)
        got, lsl_stamps = [], []
        deadline = time.monotonic() + 20
        while len(got) < 3 and time.monotonic() < deadline:
            samples, ts = inlet.pull_chunk(timeout=1.0)
            got += [s[0] for s in samples]
            lsl_stamps += ts
        assert got == TEXTS[:3]
        offset = time.time() - pylsl.local_clock()
        np.testing.assert_allclose(np.asarray(lsl_stamps) + offset, stamps, rtol=0, atol=0.01)
        assert np.allclose(np.diff(lsl_stamps), np.diff(stamps), rtol=0, atol=1e-6)  # each marker's own stamp
        pub.close()
        assert proc.wait(20) == 0
        assert "3 samples" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_the_view_sends_the_markers_of_the_span_shown(broker, stream_name):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from websockets.sync.client import connect

    from tests.integration.test_view import view_server

    pub = slabcast.MarkerPublisher(stream_name, address=broker.address)
    with view_server("--address", broker.address, "--seconds", "5") as (url, _):
        base, _, query = url.partition("/?")
        with connect(base.replace("http://", "ws://") + "/ws?" + query, max_size=None, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            ws.send(json.dumps({"type": "select", "streams": {stream_name: None}}))
            deadline = time.monotonic() + 20
            while not any(u["label"].startswith("window:") for s in slabcast.broker_status(broker.address)["streams"]
                          for u in s["subscribers"]):  # fmt: skip
                assert time.monotonic() < deadline, "the view never subscribed to the marker stream"
                time.sleep(0.05)  # polling the broker's status: the view says nothing when its window subscribes
            now = time.time()
            sent = [[now - 8.0, "too old"], [now - 1.0, "stim/left"], [now, "réponse ✓"]]
            pub.write([t for _, t in sent], times=[t for t, _ in sent])
            while True:  # display frames, as a page asks for them, until one shows the markers
                ws.send(json.dumps({"type": "frame", "width": 200, "seconds": 5}))
                while not isinstance(msg := ws.recv(timeout=10), bytes):
                    pass
                hlen = int(np.frombuffer(msg[:4], "<u4")[0])
                head = json.loads(msg[4 : 4 + hlen])
                assert not head["failed"], head["failed"]
                if head["streams"]:
                    break
                assert time.monotonic() < deadline, head
            (part,) = head["streams"]
            assert part["markers"] == sent[1:] and part["columns"] == 0 and part["rate"] is None
            assert len(msg) == 4 + hlen  # no samples to draw, only the list
    pub.close()


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs chromium (apt-get install chromium)")
def test_the_page_lists_the_markers_and_draws_them_over_the_other_streams(broker, stream_name):
    from tests.integration.test_view import TIMEOUT_MS, Signal, browser_page, view_server

    signal = Signal(stream_name, broker.address, make=lambda k: np.sin(k / 50.0).astype(np.float32), rate=1000.0,
                    frame=50, dtype="float32", channels=1)  # fmt: skip
    signal.start()
    mk = stream_name + "mk"
    pub = slabcast.MarkerPublisher(mk, address=broker.address)
    try:
        with view_server("--address", broker.address, "--seconds", "3") as (url, _), browser_page(url) as page:
            deadline = time.monotonic() + 20
            while not any(s["name"] == mk and any(u["label"].startswith("window:") for u in s["subscribers"])
                          for s in slabcast.broker_status(broker.address)["streams"]):  # fmt: skip
                assert time.monotonic() < deadline, "the view never subscribed to the marker stream"
                time.sleep(0.05)  # polling the broker's status: the view says nothing when its window subscribes
            now = time.time()
            pub.write(["stim/left", "réponse ✓"], times=[now - 0.5, now])
            items = page.locator(f'section.panel[data-name="{mk}"] ol.markers li span')
            pytest.importorskip("playwright.sync_api").expect(items).to_have_text(["réponse ✓", "stim/left"],
                                                                                   timeout=TIMEOUT_MS)  # fmt: skip
            # Both drawn as lines over the signal's plot while they are in its last 3 s.
            page.wait_for_function("(n) => window.slabcastView.lines[n] === 2", arg=stream_name, timeout=TIMEOUT_MS)
    finally:
        pub.close()
        signal.close()
