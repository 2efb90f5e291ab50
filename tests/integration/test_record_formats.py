"""Recordings in standard formats (issue 12): WAV and FLAC read back by soundfile, Zarr v3 by zarr, without
slabcast; replay from any of them; what was flushed before a kill -9 of the recorder can be read."""

from __future__ import annotations

import signal
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
