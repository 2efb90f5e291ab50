"""Recordings in standard formats (issue 12): WAV and FLAC read back by soundfile, Zarr v3 by zarr, without
slabcast; replay from any of them; what was flushed before a kill -9 of the recorder can be read."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import slabcast
from tests.integration.test_record import record_cli

soundfile = pytest.importorskip("soundfile")
zarr = pytest.importorskip("zarr")


def wait_recorder(address, name):
    deadline = time.monotonic() + 20
    while True:
        streams = [s for s in slabcast.broker_status(address)["streams"] if s["name"] == name]
        if streams and any(u["label"].startswith("record:") for u in streams[0]["subscribers"]):
            return
        assert time.monotonic() < deadline, "the recorder never subscribed"
        time.sleep(0.05)  # polling the broker's status: the only signal a separate CLI process gives


def publish(address, name, dtype, channels, data, rate=8000.0):
    pub = slabcast.Publisher(name, dtype=dtype, channels=channels, rate=rate, address=address,
                             channel_names=[f"emg{i:02d}" for i in range(channels)])  # fmt: skip
    return pub, [(k, data[k : k + 700]) for k in range(0, len(data), 700)]


@pytest.mark.parametrize(
    ("suffix", "dtype", "channels"),
    [(".flac", "int16", 2), (".wav", "float32", 2), (".wav", "int32", 1), (".zarr", "float32", 64)],
)
def test_a_recording_opens_in_the_standard_library_and_replays_bit_exact(broker, stream_name, tmp_path, suffix,
                                                                         dtype, channels):  # fmt: skip
    rng = np.random.default_rng(3)
    data = (rng.standard_normal((8000, channels)) * (0.3 if dtype.startswith("float") else 3000)).astype(dtype)
    out = tmp_path / f"take{suffix}"
    pub, frames = publish(broker.address, stream_name, dtype, channels, data)
    rec = record_cli(broker.address, stream_name, out)
    wait_recorder(broker.address, stream_name)
    for k, part in frames:
        pub.write(part, t0=50.0 + k / 8000.0)
    pub.close()
    assert rec.wait(20) == 0, rec.stderr.read()
    rec.stderr.close()
    # Read back by the library users would use, without slabcast.
    if suffix == ".zarr":
        group = zarr.open_group(str(out), mode="r")
        back = group["samples"][:]
        assert group.attrs["slabcast"]["channel_names"][63] == "emg63"
        assert group.attrs["slabcast"]["rate"] == 8000.0
        assert np.allclose(group["frames/t0"][:], [50.0 + k / 8000.0 for k, _ in frames])
    else:
        back, rate = soundfile.read(str(out), dtype=dtype, always_2d=True)
        assert rate == 8000
    assert back.shape == data.shape and np.array_equal(back, data)
    # And by slabcast: the stream info, and a replay recorded again is the same.
    recording = slabcast.open_recording(str(out))
    assert recording.info.channel_names[0] == "emg00" and recording.info.dtype == np.dtype(dtype)
    assert np.array_equal(np.asarray(recording.samples[:]), data)
    # A time per sample from the frames (no per-sample times kept): frame k's t0 plus its samples at 8 kHz.
    np.testing.assert_allclose(recording.sample_times(), 50.0 + np.arange(len(data)) / 8000.0, rtol=0, atol=1e-9)
    replay_name = stream_name + "r"
    again = tmp_path / "again"
    spec = f"replay:path={out},name={replay_name},speed=100,wait_for=1"
    with slabcast.BrokerProcess(tmp_path / "r.sock", args=("--source", spec)) as second:
        rec2 = record_cli(second.address, replay_name, again)
        code = rec2.wait(30)
        assert code == 0, rec2.stderr.read() + second.stderr()
        rec2.stderr.close()
    replayed = slabcast.open_recording(str(again))
    assert np.array_equal(np.asarray(replayed.samples), data)
    assert np.array_equal(replayed.frames["t0"], recording.frames["t0"])


@pytest.mark.parametrize("suffix", [".wav", ".zarr"])
def test_what_was_flushed_before_a_kill_9_of_the_recorder_reads_back(broker, stream_name, tmp_path, suffix):
    out = tmp_path / f"crash{suffix}"
    pub = slabcast.Publisher(stream_name, dtype="int16", channels=2, rate=8000.0, address=broker.address)
    rec = record_cli(broker.address, stream_name, out)
    wait_recorder(broker.address, stream_name)
    for k in range(20):
        pub.write(np.full((800, 2), k, np.int16), t0=k * 0.1)
    pub.flush()
    deadline = time.monotonic() + 10
    while True:  # wait until a flush (every 0.5 s) has put some of it in the file
        try:
            if len(slabcast.open_recording(str(out)).samples) >= 8000:
                break
        except (ValueError, KeyError, FileNotFoundError):
            pass
        assert time.monotonic() < deadline, "nothing was flushed"
        time.sleep(0.1)  # polling the file; the recorder sends no signal
    rec.send_signal(signal.SIGKILL)
    rec.wait(10)
    rec.stderr.close()
    recording = slabcast.open_recording(str(out))
    n = len(recording.samples)
    assert n >= 8000 and n % 800 == 0
    back = np.asarray(recording.samples[:])
    assert np.array_equal(back[:, 0], np.repeat(np.arange(n // 800), 800).astype(np.int16))
    pub.close()


def record_all(broker, stream_name, out, dtype, channels, data, rate=8000.0):
    """Publish ``data`` to a recorder writing ``out``; return the recorder's exit code and stderr."""
    pub, frames = publish(broker.address, stream_name, dtype, channels, data, rate)
    rec = record_cli(broker.address, stream_name, out)
    wait_recorder(broker.address, stream_name)
    for k, part in frames:
        pub.write(part, t0=k / rate)
    pub.close()
    code = rec.wait(30)
    said = rec.stderr.read()
    rec.stderr.close()
    return code, said


def test_a_wav_is_written_ready_for_rf64_and_its_header_is_true_at_each_flush(broker, stream_name, tmp_path):
    # A WAV of any length reads back whole: it is libsndfile's RF64 with auto-downgrade, a plain WAV with a JUNK
    # chunk holding room for RF64's ds64 while it is under 4 GiB, RF64 past it (measured by hand, 4.36 GB,
    # docs/recording.md). A plain WAV (before) has 0xffffffff sizes past 4 GiB and reads back cut.
    data = (np.arange(24000 * 2) % 30000).astype(np.int16).reshape(-1, 2)
    out = tmp_path / "take.wav"
    pub, frames = publish(broker.address, stream_name, "int16", 2, data)
    rec = record_cli(broker.address, stream_name, out)
    wait_recorder(broker.address, stream_name)
    for k, part in frames[: len(frames) // 2]:
        pub.write(part, t0=k / 8000.0)
    pub.flush()
    head = b""
    deadline = time.monotonic() + 10
    while True:  # while it records: the header already says how much is there (any tool, not only libsndfile)
        if out.exists() and len(head := out.read_bytes()[:120]) >= 80 and b"data" in head:
            size = int.from_bytes(head[head.index(b"data") + 4 :][:4], "little")
            if size >= 4 * 8000:
                break
        assert time.monotonic() < deadline, "the header never said what was flushed"
        time.sleep(0.05)  # polling the file; the recorder sends no signal
    for k, part in frames[len(frames) // 2 :]:
        pub.write(part, t0=k / 8000.0)
    pub.close()
    assert rec.wait(30) == 0, rec.stderr.read()
    rec.stderr.close()
    raw = out.read_bytes()
    assert raw[:4] == b"RIFF" and raw[8:16] == b"WAVEJUNK", raw[:16]  # the room for RF64's ds64 chunk
    assert int.from_bytes(raw[16:20], "little") >= 24
    back, rate = soundfile.read(str(out), dtype="int16")
    assert rate == 8000 and np.array_equal(back, data)


@pytest.mark.parametrize(
    ("suffix", "dtype", "channels", "subtype", "as_int16"),
    [(".wav", "uint8", 2, "PCM_U8", lambda x: (x.astype(np.int16) - 128) << 8),
     (".flac", "int8", 1, "PCM_S8", lambda x: x.astype(np.int16) << 8)],
)  # fmt: skip
def test_8_bit_streams_record_to_the_formats_own_8_bit_subtype(broker, stream_name, tmp_path, suffix, dtype,
                                                              channels, subtype, as_int16):  # fmt: skip
    info = np.iinfo(dtype)
    data = np.random.default_rng(5).integers(info.min, info.max + 1, (8000, channels)).astype(dtype)
    out = tmp_path / f"take{suffix}"
    code, said = record_all(broker, stream_name, out, dtype, channels, data)
    assert code == 0, said
    assert soundfile.info(str(out)).subtype == subtype
    back, _ = soundfile.read(str(out), dtype="int16", always_2d=True)
    assert np.array_equal(back, as_int16(data))
    recording = slabcast.open_recording(str(out))
    assert recording.info.dtype == np.dtype(dtype)
    assert np.array_equal(np.asarray(recording.samples[:]), data)


def test_24_bit_samples_record_to_flac(broker, stream_name, tmp_path):
    # What a 24-bit file source publishes: int32 samples << 8. FLAC holds 24 bits; more is refused, not cut.
    data = np.random.default_rng(6).integers(-(1 << 23), 1 << 23, (8000, 2)).astype(np.int32) << 8
    out = tmp_path / "take.flac"
    code, said = record_all(broker, stream_name, out, "int32", 2, data)
    assert code == 0, said
    assert soundfile.info(str(out)).subtype == "PCM_24"
    back, _ = soundfile.read(str(out), dtype="int32", always_2d=True)
    assert np.array_equal(back, data)
    assert np.array_equal(np.asarray(slabcast.open_recording(str(out)).samples[:]), data)
    wide = tmp_path / "wide.flac"
    code, said = record_all(broker, stream_name + "w", wide, "int32", 2, data + 1)
    assert code == 2 and "sample 0 of" in said and "32 significant bits" in said, said
    # Refused at its first sample: nothing is left (it left an empty wide.flac no tool reads, and its sidecars).
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("wide")) == []


def test_a_zarr_recording_opens_in_xarray(broker, stream_name, tmp_path):
    xarray = pytest.importorskip("xarray")
    data = np.random.default_rng(7).standard_normal((8000, 3)).astype(np.float32)
    out = tmp_path / "take.zarr"
    code, said = record_all(broker, stream_name, out, "float32", 3, data)
    assert code == 0, said
    ds = xarray.open_zarr(str(out), consolidated=False)
    assert ds["samples"].dims == ("sample", "channel")
    assert np.array_equal(ds["samples"].values, data)
    assert ds.attrs["slabcast"]["channel_names"] == ["emg00", "emg01", "emg02"]
    frames = xarray.open_zarr(str(out), group="frames", consolidated=False)
    assert frames["n"].dims == ("frame",) and int(frames["n"].sum()) == 8000


def test_a_flac_whose_recorder_was_killed_reads_back_and_repairs_bit_exact(broker, stream_name, tmp_path):
    # A FLAC says its length only once closed: after a kill -9 soundfile saw 2**63-1 frames and could not read it.
    # What survives: every block the encoder wrote out (4096 samples each), read by open_recording as it is and by
    # any tool after `slabcast record --repair`.
    out = tmp_path / "crash.flac"
    data = (np.arange(40000 * 2) % 32000 - 16000).astype(np.int16).reshape(-1, 2)
    pub = slabcast.Publisher(stream_name, dtype="int16", channels=2, rate=8000.0, address=broker.address)
    rec = record_cli(broker.address, stream_name, out)
    wait_recorder(broker.address, stream_name)
    for k in range(0, len(data), 800):
        pub.write(data[k : k + 800], t0=k / 8000.0)
    pub.flush()
    deadline = time.monotonic() + 10
    while True:  # until a flush put the frame records of all of it in the sidecar
        if (tmp_path / "crash.flac.frames").exists() and (tmp_path / "crash.flac.frames").stat().st_size >= 50 * 24:
            break
        assert time.monotonic() < deadline, "nothing was flushed"
        time.sleep(0.05)  # polling the file; the recorder sends no signal
    rec.send_signal(signal.SIGKILL)
    rec.wait(10)
    rec.stderr.close()
    pub.close()
    recording = slabcast.open_recording(str(out))
    n = len(recording.samples)
    assert len(data) - 4096 <= n <= len(data) and n % 4096 == 0, n
    assert np.array_equal(np.asarray(recording.samples[:]), data[:n])
    assert int(recording.frames["n"].sum()) == n
    fixed = subprocess.run([sys.executable, "-m", "slabcast", "record", "--repair", str(out)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    assert f"{n} samples" in fixed.stderr
    assert soundfile.info(str(out)).frames == n
    back, _ = soundfile.read(str(out), dtype="int16")
    assert np.array_equal(back, data[:n])
    again = slabcast.open_recording(str(out))
    assert np.array_equal(np.asarray(again.samples[:]), data[:n]) and int(again.frames["n"].sum()) == n


def test_a_format_that_cannot_hold_the_stream_is_refused_before_subscribing(broker, stream_name, tmp_path):
    out = tmp_path / "take.flac"
    with slabcast.Publisher(stream_name, dtype="float64", channels=1, rate=8000.0, address=broker.address):
        result = subprocess.run([sys.executable, "-m", "slabcast", "record", stream_name, "--out", str(out),
                                 "--address", broker.address], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 2
    assert "FLAC cannot hold float64 samples losslessly" in result.stderr
    assert "waiting for the stream" not in result.stderr  # refused from the broker's status, never subscribed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("take")]
